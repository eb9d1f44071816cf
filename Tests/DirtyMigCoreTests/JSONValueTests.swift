import DirtyMigCore
import XCTest

final class JSONValueTests: XCTestCase {
    private func parse(_ text: String, file: StaticString = #filePath, line: UInt = #line) -> JSONValue? {
        do { return try JSONValue.parse(text) } catch {
            XCTFail("\(text): \(error)", file: file, line: line)
            return nil
        }
    }

    private func parseError(_ text: String, file: StaticString = #filePath, line: UInt = #line) -> JSONValue.ParseError? {
        parseError(bytes: Array(text.utf8), file: file, line: line)
    }

    private func parseError(bytes: [UInt8], file: StaticString = #filePath, line: UInt = #line) -> JSONValue.ParseError? {
        do {
            let value = try JSONValue.parse(bytes: bytes)
            XCTFail("\(String(decoding: bytes, as: UTF8.self)) parsed as \(value)", file: file, line: line)
            return nil
        } catch {
            return error
        }
    }

    // MARK: Round trips

    func testCompactRoundTripKeepsKeyOrderAndText() {
        let texts = [
            #"{"dirtymig":{"version":"0.1.0","protocol":1},"vm":"NAME"}"#,
            #"{"z":1,"a":[true,false,null],"m":{"nested":[[],{}]},"s":"x","d":-2.5,"e":1e-07}"#,
            #"[1,-1,0,18446744073709551615,-9223372036854775808,0.5,100.0,1.5e+20]"#,
            #""just a string""#,
            "null", "true", "42", "-0.0",
        ]
        for text in texts {
            guard let value = parse(text) else { continue }
            XCTAssertEqual(value.serialized(), text)
            XCTAssertEqual(parse(value.serialized()), value)
        }
    }

    func testWhitespaceAroundEverything() {
        let value = parse(" \t\r\n{ \"a\" : [ 1 , 2 ] , \"b\" : { } }\n ")
        XCTAssertEqual(value?.serialized(), #"{"a":[1,2],"b":{}}"#)
    }

    func testBuiltValuesSerializeInBuildOrder() {
        var value: JSONValue = ["z": 1, "a": "two", "list": [1, 2.5, "s", nil, true]]
        value["m"] = .number(UInt64.max)
        value["a"] = 3            // replaced in place
        value["gone"] = nil       // absent: no effect
        XCTAssertEqual(value.serialized(), #"{"z":1,"a":3,"list":[1,2.5,"s",null,true],"m":18446744073709551615}"#)
        value["z"] = nil
        XCTAssertEqual(value.keys, ["a", "list", "m"])
        XCTAssertEqual(JSONValue(sortingKeys: ["b": 1, "a": 2]).serialized(), #"{"a":2,"b":1}"#)
        var list: JSONValue = []
        list.append(1)
        list.append("x")
        XCTAssertEqual(list.serialized(), #"[1,"x"]"#)
        XCTAssertEqual(JSONValue.null.setting("k", true).serialized(), #"{"k":true}"#)
    }

    func testPrettyPrinting() {
        let value: JSONValue = ["a": [1, 2], "b": [:], "c": []]
        XCTAssertEqual(value.prettyPrinted(), "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {},\n  \"c\": []\n}")
        XCTAssertEqual(parse(value.prettyPrinted()), value)
    }

    // MARK: Numbers

    func testIntegersStayExact() {
        XCTAssertEqual(parse("9007199254740993"), .int(9_007_199_254_740_993))      // 2^53 + 1: not a double
        XCTAssertEqual(parse("9223372036854775807"), .int(Int64.max))
        XCTAssertEqual(parse("9223372036854775808"), .uint(9_223_372_036_854_775_808))
        XCTAssertEqual(parse("18446744073709551615"), .uint(UInt64.max))
        XCTAssertEqual(parse("-9223372036854775808"), .int(Int64.min))
        XCTAssertEqual(parse("-0"), .int(0))
        XCTAssertEqual(parse("18446744073709551615")?.uint64Value, UInt64.max)
        XCTAssertNil(parse("18446744073709551615")?.int64Value)
        XCTAssertNil(parse("-1")?.uint64Value)
        // Beyond 64 bits: the nearest double.
        XCTAssertEqual(parse("18446744073709551616"), .double(18446744073709551616.0))
        XCTAssertEqual(parse("-9223372036854775809")?.doubleValue, -9223372036854775809.0)
    }

    func testDoublesAndExponents() {
        XCTAssertEqual(parse("1.5"), .double(1.5))
        XCTAssertEqual(parse("-2.5e3"), .double(-2500))
        XCTAssertEqual(parse("1E-2"), .double(0.01))
        XCTAssertEqual(parse("2.5e+10"), .double(2.5e10))
        XCTAssertEqual(parse("1e3"), .double(1000))
        if case .double = parse("1e3") {} else { XCTFail("an exponent makes a double") }
        if case .double = parse("100.0") {} else { XCTFail("a fraction makes a double") }
        XCTAssertEqual(parse("0.1")?.doubleValue, 0.1)
        XCTAssertEqual(parse("1e-400"), .double(0))    // underflow is zero, not an error
    }

    func testNumberSerialization() {
        XCTAssertEqual(JSONValue.int(-42).serialized(), "-42")
        XCTAssertEqual(JSONValue.double(100).serialized(), "100.0")
        XCTAssertEqual(JSONValue.double(0.1).serialized(), "0.1")
        XCTAssertEqual(JSONValue.double(1795390000.123).serialized(), "1795390000.123")
        XCTAssertEqual(JSONValue.double(1e-7).serialized(), "1e-07")
        XCTAssertEqual(JSONValue.double(1.5e300).serialized(), "1.5e+300")
        XCTAssertEqual(JSONValue.double(.nan).serialized(), "null")
        XCTAssertEqual(JSONValue.double(.infinity).serialized(), "null")
        XCTAssertEqual(JSONValue.number(-Double.infinity), .null)
        XCTAssertEqual(JSONValue.number(nil as Double?), .null)
        XCTAssertEqual(JSONValue.number(2.5 as Double?), .double(2.5))
        XCTAssertEqual(JSONValue.number(UInt64.max).serialized(), "18446744073709551615")
        XCTAssertEqual(JSONValue.number(UInt64(5)), .int(5))
        if case .int = JSONValue.number(UInt64(5)) {} else { XCTFail("small unsigned integers are .int") }
        XCTAssertEqual(JSONValue.number(Int32(-7)), .int(-7))
        XCTAssertEqual(JSONValue.number(nil as Int?), .null)
        // Every finite double reads back exactly.
        for double in [0.1, 1.0 / 3.0, 123456789.987654321, Double.leastNonzeroMagnitude, Double.greatestFiniteMagnitude, -0.0] {
            let text = JSONValue.double(double).serialized()
            XCTAssertEqual(parse(text)?.doubleValue, double, text)
        }
    }

    func testNumericEqualityAcrossCases() {
        XCTAssertEqual(JSONValue.int(1), .double(1.0))
        XCTAssertEqual(JSONValue.int(5), .uint(5))
        XCTAssertEqual(JSONValue.uint(UInt64.max), .uint(UInt64.max))
        XCTAssertNotEqual(JSONValue.int(-1), .uint(UInt64.max))
        XCTAssertNotEqual(JSONValue.int(9_007_199_254_740_993), .double(9_007_199_254_740_992))
        XCTAssertNotEqual(JSONValue.int(1), .bool(true))
        XCTAssertNotEqual(JSONValue.int(0), .null)
        XCTAssertEqual(JSONValue.double(5.0).intValue, 5)
        XCTAssertNil(JSONValue.double(5.5).intValue)
        XCTAssertNil(JSONValue.string("5").intValue)
    }

    // MARK: Strings

    func testEscapesParse() {
        XCTAssertEqual(parse(#""\"\\\/\b\f\n\r\t""#)?.stringValue, "\"\\/\u{8}\u{C}\n\r\t")
        XCTAssertEqual(parse(#""\u00e9\u00E9""#)?.stringValue, "éé")
        XCTAssertEqual(parse(#""\ud83d\ude00""#)?.stringValue, "😀")
        XCTAssertEqual(parse(#""\u0000""#)?.stringValue, "\u{0}")
        XCTAssertEqual(parse("\"é😀\"")?.stringValue, "é😀")
    }

    func testEscapesSerialize() {
        XCTAssertEqual(JSONValue.string("a\"b\\c/d").serialized(), #""a\"b\\c/d""#)
        XCTAssertEqual(JSONValue.string("\n\r\t\u{8}\u{C}").serialized(), #""\n\r\t\b\f""#)
        XCTAssertEqual(JSONValue.string("\u{0}\u{1}\u{1F}\u{7F}").serialized(), #""\u0000\u0001\u001f\u007f""#)
        XCTAssertEqual(JSONValue.string("\u{2028}\u{2029}").serialized(), #""\u2028\u2029""#)
        XCTAssertEqual(JSONValue.string("é😀").serialized(), "\"é😀\"")
        XCTAssertEqual(JSONValue.object([("k\n", "v")]).serialized(), #"{"k\n":"v"}"#)
        let tricky = JSONValue.string("line\nbreak \u{2028} \u{0} \"quoted\" 😀")
        XCTAssertFalse(tricky.serialized().contains("\n"), "one line")
        XCTAssertEqual(parse(tricky.serialized()), tricky)
    }

    // MARK: Limits and errors

    func testDepthLimit() {
        let deepest = String(repeating: "[", count: 64) + String(repeating: "]", count: 64)
        XCTAssertNotNil(parse(deepest))
        let tooDeep = String(repeating: "[", count: 65) + String(repeating: "]", count: 65)
        let error = parseError(tooDeep)
        XCTAssertEqual(error?.offset, 64)
        XCTAssertTrue(error?.message.contains("deeper than 64") ?? false, "\(String(describing: error))")
        XCTAssertNotNil(parseError(String(repeating: "{\"a\":", count: 65) + "1" + String(repeating: "}", count: 65)))
        // Far deeper input fails cleanly too (no stack overflow).
        XCTAssertNotNil(parseError(String(repeating: "[", count: 100_000)))
        XCTAssertThrowsError(try JSONValue.parse("[[1]]", maxDepth: 1))
    }

    func testInvalidInputsSayWhatAndWhere() {
        let cases: [(String, Int, String)] = [
            ("", 0, "empty input"),
            ("   ", 3, "empty input"),
            ("{", 1, "expected a string key or '}'"),
            ("[1,]", 3, "unexpected ']'"),
            (#"{"a":1,}"#, 7, "expected a string key"),
            (#"{"a" 1}"#, 5, "expected ':'"),
            ("{1:2}", 1, "expected a string key"),
            ("[1 2]", 3, "expected ',' or ']'"),
            ("01", 1, "leading zero"),
            ("1.", 2, "expected a digit after '.'"),
            (".5", 0, "unexpected '.'"),
            ("+1", 0, "unexpected '+'"),
            ("-", 1, "expected a digit"),
            ("1e", 2, "exponent"),
            ("1e400", 0, "out of range"),
            ("tru", 0, "expected 'true'"),
            ("nul", 0, "expected 'null'"),
            ("NaN", 0, "unexpected word 'NaN'"),
            ("truth", 0, "unexpected word 'truth'"),
            ("'a'", 0, "unexpected '''"),
            ("\"abc", 4, "unterminated string"),
            ("\"a\nb\"", 2, "control character"),
            (#""\x""#, 1, "invalid escape \\x"),
            (#""\u12""#, 5, "hex digits"),
            (#""\ud83d""#, 1, "unpaired surrogate"),
            (#""\ude00""#, 1, "unpaired surrogate"),
            (#""\ud83d\u0041""#, 1, "unpaired surrogate"),
            ("1 2", 2, "after the JSON value"),
            (#"{"a":1,"a":2}"#, 7, "duplicate key \"a\""),
            ("this is not json", 0, "unexpected word 'this'"),
            ("[x]", 1, "unexpected word 'x'"),
        ]
        for (text, offset, fragment) in cases {
            guard let error = parseError(text) else { continue }
            XCTAssertEqual(error.offset, offset, "\(text): \(error)")
            XCTAssertTrue(error.message.contains(fragment), "\(text): \(error)")
            XCTAssertTrue(error.description.hasSuffix("at byte \(offset)"), error.description)
        }
    }

    func testInvalidUTF8IsRejected() {
        let cases: [[UInt8]] = [
            [0x22, 0xFF, 0x22],              // never valid
            [0x22, 0xC3, 0x22],              // truncated 2-byte sequence
            [0x22, 0xC0, 0xAF, 0x22],        // overlong '/'
            [0x22, 0xED, 0xA0, 0x80, 0x22],  // encoded surrogate
            [0x22, 0xF4, 0x90, 0x80, 0x80, 0x22],  // above U+10FFFF
        ]
        for bytes in cases {
            let error = parseError(bytes: bytes)
            XCTAssertEqual(error?.offset, 1)
            XCTAssertTrue(error?.message.contains("UTF-8") ?? false, "\(String(describing: error))")
        }
        XCTAssertEqual(try JSONValue.parse(bytes: [0x22, 0xC3, 0xA9, 0x22]), "é")
    }

    // MARK: Accessors

    func testAccessors() {
        guard let value = parse(#"{"s":"x","b":false,"i":-3,"d":2.5,"a":[1,{"k":"v"}],"n":null,"o":{}}"#) else { return }
        XCTAssertEqual(value["s"]?.stringValue, "x")
        XCTAssertEqual(value["b"]?.boolValue, false)
        XCTAssertEqual(value["i"]?.intValue, -3)
        XCTAssertEqual(value["i"]?.doubleValue, -3)
        XCTAssertEqual(value["d"]?.doubleValue, 2.5)
        XCTAssertEqual(value["a"]?[1]?["k"], "v")
        XCTAssertNil(value["a"]?[2])
        XCTAssertEqual(value["a"]?.arrayValue?.count, 2)
        XCTAssertEqual(value["n"]?.isNull, true)
        XCTAssertNotNil(value["n"], "a null member is present")
        XCTAssertNil(value["missing"])
        XCTAssertNil(value["s"]?["k"], "subscripting a non-object is nil")
        XCTAssertEqual(value["o"]?.objectValue?.count, 0)
        XCTAssertEqual(value.keys, ["s", "b", "i", "d", "a", "n", "o"])
        XCTAssertEqual(value["i"]?.typeName, "a number")
    }

    func testObjectEqualityIgnoresKeyOrder() {
        XCTAssertEqual(parse(#"{"a":1,"b":[2]}"#), parse(#"{"b":[2],"a":1}"#))
        XCTAssertNotEqual(parse(#"{"a":1,"b":2}"#), parse(#"{"a":1,"c":2}"#))
        XCTAssertNotEqual(parse(#"{"a":1}"#), parse(#"{"a":1,"b":2}"#))
        XCTAssertNotEqual(parse("[1,2]"), parse("[2,1]"), "arrays keep their order")
    }
}
