/// A JSON value (RFC 8259) with exact integers and ordered object keys.
///
/// Why our own: Foundation's JSONSerialization turns booleans and numbers into the same NSNumber,
/// rounds big integers through Double and forgets key order. Here:
/// - integers stay exact: `.int` for everything that fits in Int64, `.uint` only above Int64.max
///   (the `number(_:)` builders and the parser keep to that; equality compares numbers by value);
/// - a number with a fraction or exponent is a `.double`, and a double is always written with a
///   `.` or an exponent (`100.0`, `0.25`, `1e-07`, `1.5e+20`: Swift's shortest round-trip form),
///   so it reads back as a double; NaN and infinities are written as `null`;
/// - objects keep their keys in the order they were built or parsed, so output is stable;
///   equality between objects ignores key order, as JSON does.
public enum JSONValue: Sendable {
    case null
    case bool(Bool)
    case int(Int64)
    /// Only for integers above Int64.max; smaller ones are `.int`.
    case uint(UInt64)
    case double(Double)
    case string(String)
    case array([JSONValue])
    /// Keys in order. The parser rejects duplicate keys; builders should not make any.
    case object([(String, JSONValue)])
}

// MARK: - Building

extension JSONValue {
    /// An integer of any width: `.int` when it fits in Int64, `.uint` above.
    public static func number<T: BinaryInteger>(_ value: T) -> JSONValue {
        if let exact = Int64(exactly: value) { return .int(exact) }
        if let exact = UInt64(exactly: value) { return .uint(exact) }
        return .double(Double(value))
    }

    /// An optional integer; nil is `null`.
    public static func number<T: BinaryInteger>(_ value: T?) -> JSONValue {
        guard let value else { return .null }
        return number(value)
    }

    /// A double; NaN and infinities (which JSON cannot carry) are `null`.
    public static func number(_ value: Double) -> JSONValue {
        value.isFinite ? .double(value) : .null
    }

    /// An optional double; nil, NaN and infinities are `null`.
    public static func number(_ value: Double?) -> JSONValue {
        guard let value else { return .null }
        return number(value)
    }

    /// An object from an unordered dictionary, keys sorted so the output is stable.
    public init(sortingKeys dictionary: [String: JSONValue]) {
        self = .object(dictionary.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })
    }

    /// Adds `key` (or replaces its value) in an object; a non-object becomes `{key: value}`.
    public mutating func set(_ key: String, _ value: JSONValue) {
        self[key] = value
    }

    /// This object with `key` set to `value` (appended, or replaced where it already is).
    public func setting(_ key: String, _ value: JSONValue) -> JSONValue {
        var copy = self
        copy[key] = value
        return copy
    }

    /// Appends an element to an array; a non-array becomes `[element]`.
    public mutating func append(_ element: JSONValue) {
        if case .array(var items) = self {
            self = .null   // drop the second reference so the append does not copy
            items.append(element)
            self = .array(items)
        } else {
            self = .array([element])
        }
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByBooleanLiteral,
                     ExpressibleByFloatLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral,
                     ExpressibleByNilLiteral {
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    /// Keys stay in the order written.
    public init(dictionaryLiteral elements: (String, JSONValue)...) { self = .object(elements) }
    public init(nilLiteral: ()) { self = .null }
}

// MARK: - Reading

extension JSONValue {
    /// The value under `key` in an object (the first, should there be duplicates); nil when this
    /// is not an object or has no such key. Setting replaces the value in place or appends the
    /// key; setting nil removes the key; setting on a non-object makes it a one-key object.
    public subscript(key: String) -> JSONValue? {
        get {
            guard case .object(let pairs) = self else { return nil }
            return pairs.first { $0.0 == key }?.1
        }
        set {
            var pairs: [(String, JSONValue)]
            if case .object(let existing) = self { pairs = existing } else { pairs = [] }
            self = .null   // drop the second reference so edits do not copy
            if let newValue {
                if let index = pairs.firstIndex(where: { $0.0 == key }) {
                    pairs[index].1 = newValue
                } else {
                    pairs.append((key, newValue))
                }
            } else {
                pairs.removeAll { $0.0 == key }
            }
            self = .object(pairs)
        }
    }

    /// The element at `index` of an array; nil when this is not an array or the index is outside it.
    public subscript(index: Int) -> JSONValue? {
        guard case .array(let items) = self, items.indices.contains(index) else { return nil }
        return items[index]
    }

    public var isNull: Bool { if case .null = self { return true }; return false }
    public var boolValue: Bool? { if case .bool(let value) = self { return value }; return nil }
    public var stringValue: String? { if case .string(let value) = self { return value }; return nil }
    public var arrayValue: [JSONValue]? { if case .array(let items) = self { return items }; return nil }
    /// The key/value pairs of an object, in order.
    public var objectValue: [(String, JSONValue)]? { if case .object(let pairs) = self { return pairs }; return nil }
    /// An object's keys, in order (empty for anything else).
    public var keys: [String] { objectValue?.map(\.0) ?? [] }

    /// Any number as a Double (big integers round to the nearest double).
    public var doubleValue: Double? {
        switch self {
        case .int(let value): return Double(value)
        case .uint(let value): return Double(value)
        case .double(let value): return value
        default: return nil
        }
    }

    /// A number that is exactly an Int64: an integer in range, or a double with no fraction (`5.0`).
    public var int64Value: Int64? {
        switch self {
        case .int(let value): return value
        case .uint(let value): return Int64(exactly: value)
        case .double(let value): return Int64(exactly: value)
        default: return nil
        }
    }

    /// A number that is exactly an Int (see `int64Value`).
    public var intValue: Int? { int64Value.flatMap { Int(exactly: $0) } }

    /// A number that is exactly a UInt64: a non-negative integer, or a double with no fraction.
    public var uint64Value: UInt64? {
        switch self {
        case .int(let value): return UInt64(exactly: value)
        case .uint(let value): return value
        case .double(let value): return UInt64(exactly: value)
        default: return nil
        }
    }

    /// Whether this is a number of any kind.
    public var isNumber: Bool { doubleValue != nil }

    /// The JSON type's name, for error messages ("expected a number, got a string").
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .int, .uint, .double: return "a number"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}

// MARK: - Equality

extension JSONValue: Equatable {
    /// Numbers compare by exact value whatever their case (`.int(1) == .double(1.0)`,
    /// `.int(5) == .uint(5)`); objects compare as sets of pairs, ignoring key order.
    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): return true
        case (.bool(let a), .bool(let b)): return a == b
        case (.string(let a), .string(let b)): return a == b
        case (.array(let a), .array(let b)): return a == b
        case (.object(let a), .object(let b)): return objectsEqual(a, b)
        case (.int(let a), .int(let b)): return a == b
        case (.uint(let a), .uint(let b)): return a == b
        case (.double(let a), .double(let b)): return a == b
        case (.int(let a), .uint(let b)), (.uint(let b), .int(let a)): return UInt64(exactly: a) == b
        case (.int(let a), .double(let b)), (.double(let b), .int(let a)): return Int64(exactly: b) == a
        case (.uint(let a), .double(let b)), (.double(let b), .uint(let a)): return UInt64(exactly: b) == a
        default: return false
        }
    }

    private static func objectsEqual(_ a: [(String, JSONValue)], _ b: [(String, JSONValue)]) -> Bool {
        guard a.count == b.count else { return false }
        if zip(a, b).allSatisfy({ $0.0 == $1.0 }) { return zip(a, b).allSatisfy { $0.1 == $1.1 } }
        // Different order: compare sorted by key (ties keep their order).
        func sorted(_ pairs: [(String, JSONValue)]) -> [(String, JSONValue)] {
            pairs.enumerated().sorted { ($0.element.0, $0.offset) < ($1.element.0, $1.offset) }.map(\.element)
        }
        return zip(sorted(a), sorted(b)).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
    }
}

// MARK: - Writing

extension JSONValue: CustomStringConvertible {
    /// The compact form.
    public var description: String { serialized() }

    /// Compact, on one line, no spaces: what the control protocol sends and `--json` prints.
    /// Control characters, `"` and `\` are escaped, and so are U+2028/U+2029 (so the text is also
    /// safe inside JavaScript); other non-ASCII characters are written as UTF-8.
    public func serialized() -> String {
        var out: [UInt8] = []
        out.reserveCapacity(64)
        write(into: &out, indent: nil, level: 0)
        return String(decoding: out, as: UTF8.self)
    }

    /// Indented over several lines, for people (`indent` spaces per level, `"key": value`).
    public func prettyPrinted(indent: Int = 2) -> String {
        var out: [UInt8] = []
        write(into: &out, indent: max(0, indent), level: 0)
        return String(decoding: out, as: UTF8.self)
    }

    /// How a double is written: Swift's shortest representation that reads back exactly, which
    /// always has a `.` or an exponent. Non-finite doubles are `null`.
    public static func format(_ value: Double) -> String {
        value.isFinite ? value.description : "null"
    }

    private func write(into out: inout [UInt8], indent: Int?, level: Int) {
        switch self {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let value): out.append(contentsOf: (value ? "true" : "false").utf8)
        case .int(let value): out.append(contentsOf: String(value).utf8)
        case .uint(let value): out.append(contentsOf: String(value).utf8)
        case .double(let value): out.append(contentsOf: JSONValue.format(value).utf8)
        case .string(let value): JSONValue.writeString(value, into: &out)
        case .array(let items):
            out.append(UInt8(ascii: "["))
            for (index, item) in items.enumerated() {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                JSONValue.newline(&out, indent: indent, level: level + 1)
                item.write(into: &out, indent: indent, level: level + 1)
            }
            if !items.isEmpty { JSONValue.newline(&out, indent: indent, level: level) }
            out.append(UInt8(ascii: "]"))
        case .object(let pairs):
            out.append(UInt8(ascii: "{"))
            for (index, (key, value)) in pairs.enumerated() {
                if index > 0 { out.append(UInt8(ascii: ",")) }
                JSONValue.newline(&out, indent: indent, level: level + 1)
                JSONValue.writeString(key, into: &out)
                out.append(UInt8(ascii: ":"))
                if indent != nil { out.append(UInt8(ascii: " ")) }
                value.write(into: &out, indent: indent, level: level + 1)
            }
            if !pairs.isEmpty { JSONValue.newline(&out, indent: indent, level: level) }
            out.append(UInt8(ascii: "}"))
        }
    }

    private static func newline(_ out: inout [UInt8], indent: Int?, level: Int) {
        guard let indent else { return }
        out.append(0x0A)
        out.append(contentsOf: repeatElement(UInt8(ascii: " "), count: indent * level))
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)

    private static func writeString(_ string: String, into out: inout [UInt8]) {
        out.append(UInt8(ascii: "\""))
        for scalar in string.unicodeScalars {
            switch scalar.value {
            case 0x22: out.append(contentsOf: [0x5C, 0x22])                     // \"
            case 0x5C: out.append(contentsOf: [0x5C, 0x5C])                     // \\
            case 0x0A: out.append(contentsOf: [0x5C, UInt8(ascii: "n")])
            case 0x0D: out.append(contentsOf: [0x5C, UInt8(ascii: "r")])
            case 0x09: out.append(contentsOf: [0x5C, UInt8(ascii: "t")])
            case 0x08: out.append(contentsOf: [0x5C, UInt8(ascii: "b")])
            case 0x0C: out.append(contentsOf: [0x5C, UInt8(ascii: "f")])
            case 0x00..<0x20, 0x7F, 0x2028, 0x2029:
                let code = Int(scalar.value)
                out.append(contentsOf: [0x5C, UInt8(ascii: "u"),
                                        hexDigits[(code >> 12) & 0xF], hexDigits[(code >> 8) & 0xF],
                                        hexDigits[(code >> 4) & 0xF], hexDigits[code & 0xF]])
            default:
                out.append(contentsOf: String(scalar).utf8)
            }
        }
        out.append(UInt8(ascii: "\""))
    }
}

// MARK: - Parsing

extension JSONValue {
    /// Why text is not JSON, and where: `offset` counts bytes of UTF-8 from 0.
    public struct ParseError: Error, Equatable, Sendable, CustomStringConvertible {
        public let message: String
        public let offset: Int

        public init(message: String, offset: Int) {
            self.message = message
            self.offset = offset
        }

        public var description: String { "\(message) at byte \(offset)" }
    }

    /// How deep arrays and objects may nest before parsing gives up (stack safety).
    public static let defaultMaxDepth = 64

    /// Parses one JSON text (RFC 8259: any value at the top level, surrounded by optional whitespace).
    public static func parse(_ text: String, maxDepth: Int = defaultMaxDepth) throws(ParseError) -> JSONValue {
        try parse(bytes: Array(text.utf8), maxDepth: maxDepth)
    }

    /// Parses one JSON text from UTF-8 bytes; invalid UTF-8 inside strings is an error.
    public static func parse(bytes: [UInt8], maxDepth: Int = defaultMaxDepth) throws(ParseError) -> JSONValue {
        var parser = JSONParser(bytes: bytes, maxDepth: maxDepth)
        return try parser.document()
    }
}

private struct JSONParser {
    let bytes: [UInt8]
    let maxDepth: Int
    var index = 0

    init(bytes: [UInt8], maxDepth: Int) {
        self.bytes = bytes
        self.maxDepth = maxDepth
    }

    private static let quote = UInt8(ascii: "\""), backslash = UInt8(ascii: "\\")
    private static let comma = UInt8(ascii: ","), colon = UInt8(ascii: ":")

    mutating func document() throws(JSONValue.ParseError) -> JSONValue {
        skipWhitespace()
        if index == bytes.count { throw error("empty input: expected a JSON value") }
        let value = try value(depth: 0)
        skipWhitespace()
        if index < bytes.count { throw error("unexpected \(found()) after the JSON value") }
        return value
    }

    private func error(_ message: String, at offset: Int? = nil) -> JSONValue.ParseError {
        JSONValue.ParseError(message: message, offset: offset ?? index)
    }

    /// The byte at `index`, described for an error message.
    private func found() -> String {
        guard index < bytes.count else { return "end of input" }
        let byte = bytes[index]
        if byte >= 0x21 && byte < 0x7F { return "'\(Character(Unicode.Scalar(byte)))'" }
        switch byte {
        case 0x20: return "space"
        case 0x0A: return "newline"
        default: return "byte 0x" + String(byte, radix: 16, uppercase: true)
        }
    }

    private mutating func skipWhitespace() {
        while index < bytes.count {
            switch bytes[index] {
            case 0x20, 0x09, 0x0A, 0x0D: index += 1
            default: return
            }
        }
    }

    private mutating func value(depth: Int) throws(JSONValue.ParseError) -> JSONValue {
        skipWhitespace()
        guard index < bytes.count else { throw error("unexpected end of input: expected a value") }
        switch bytes[index] {
        case UInt8(ascii: "{"): return try object(depth: depth + 1)
        case UInt8(ascii: "["): return try array(depth: depth + 1)
        case JSONParser.quote: return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try number()
        default:
            if let word = word() { throw error("unexpected word '\(word)': expected a value (a string needs double quotes)") }
            throw error("unexpected \(found()): expected a value")
        }
    }

    /// The run of letters and digits at `index` (at most 20 shown), when it starts with a letter.
    private func word() -> String? {
        func isWordByte(_ byte: UInt8) -> Bool {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte | 0x20) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
        }
        guard index < bytes.count, (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(bytes[index] | 0x20) else { return nil }
        var end = index
        while end < bytes.count, end - index < 20, isWordByte(bytes[end]) { end += 1 }
        return String(decoding: bytes[index..<end], as: UTF8.self)
    }

    private mutating func literal(_ literal: StaticString) throws(JSONValue.ParseError) {
        let expected = UnsafeBufferPointer(start: literal.utf8Start, count: literal.utf8CodeUnitCount)
        for (offset, byte) in expected.enumerated() {
            guard index + offset < bytes.count, bytes[index + offset] == byte else {
                let word = word() ?? ""
                if expected.starts(with: word.utf8) { throw error("invalid literal '\(word)': expected '\(literal)'") }
                throw error("unexpected word '\(word)': expected a value (a string needs double quotes)")
            }
        }
        index += expected.count
    }

    private mutating func enter(_ depth: Int) throws(JSONValue.ParseError) {
        if depth > maxDepth { throw error("arrays and objects nest deeper than \(maxDepth) levels") }
        index += 1
    }

    private mutating func object(depth: Int) throws(JSONValue.ParseError) -> JSONValue {
        try enter(depth)
        var pairs: [(String, JSONValue)] = []
        var seen = Set<String>()
        skipWhitespace()
        if index < bytes.count && bytes[index] == UInt8(ascii: "}") { index += 1; return .object(pairs) }
        while true {
            skipWhitespace()
            guard index < bytes.count, bytes[index] == JSONParser.quote else {
                throw error("unexpected \(found()): expected a string key\(pairs.isEmpty ? " or '}'" : "")")
            }
            let keyOffset = index
            let key = try string()
            guard seen.insert(key).inserted else { throw error("duplicate key \"\(key)\"", at: keyOffset) }
            skipWhitespace()
            guard index < bytes.count, bytes[index] == JSONParser.colon else {
                throw error("unexpected \(found()): expected ':' after the key \"\(key)\"")
            }
            index += 1
            pairs.append((key, try value(depth: depth)))
            skipWhitespace()
            guard index < bytes.count else { throw error("unexpected end of input: expected ',' or '}'") }
            if bytes[index] == JSONParser.comma { index += 1; continue }
            if bytes[index] == UInt8(ascii: "}") { index += 1; return .object(pairs) }
            throw error("unexpected \(found()): expected ',' or '}'")
        }
    }

    private mutating func array(depth: Int) throws(JSONValue.ParseError) -> JSONValue {
        try enter(depth)
        var items: [JSONValue] = []
        skipWhitespace()
        if index < bytes.count && bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
        while true {
            items.append(try value(depth: depth))
            skipWhitespace()
            guard index < bytes.count else { throw error("unexpected end of input: expected ',' or ']'") }
            if bytes[index] == JSONParser.comma { index += 1; continue }
            if bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
            throw error("unexpected \(found()): expected ',' or ']'")
        }
    }

    private mutating func string() throws(JSONValue.ParseError) -> String {
        let start = index
        index += 1
        var out: [UInt8] = []
        while true {
            guard index < bytes.count else { throw error("unterminated string (it starts at byte \(start))") }
            let byte = bytes[index]
            switch byte {
            case JSONParser.quote:
                index += 1
                return String(decoding: out, as: UTF8.self)
            case JSONParser.backslash:
                try escape(into: &out)
            case 0x00..<0x20:
                throw error("control character \(found()) in a string: write it as an escape such as \\n or \\u00XX")
            case 0x20..<0x80:
                out.append(byte)
                index += 1
            default:
                let length = utf8SequenceLength()
                guard length > 0 else { throw error("invalid UTF-8 in a string") }
                out.append(contentsOf: bytes[index..<index + length])
                index += length
            }
        }
    }

    /// The length of the well-formed UTF-8 sequence starting at `index` (a non-ASCII lead byte),
    /// or 0 when it is malformed (bad lead or continuation byte, overlong, surrogate, > U+10FFFF).
    private func utf8SequenceLength() -> Int {
        let lead = bytes[index]
        let length: Int
        var low: UInt8 = 0x80, high: UInt8 = 0xBF   // allowed range of the second byte
        switch lead {
        case 0xC2...0xDF: length = 2
        case 0xE0: length = 3; low = 0xA0
        case 0xE1...0xEC, 0xEE...0xEF: length = 3
        case 0xED: length = 3; high = 0x9F
        case 0xF0: length = 4; low = 0x90
        case 0xF1...0xF3: length = 4
        case 0xF4: length = 4; high = 0x8F
        default: return 0
        }
        guard index + length <= bytes.count else { return 0 }
        guard (low...high).contains(bytes[index + 1]) else { return 0 }
        for offset in 2..<length where !(0x80...0xBF).contains(bytes[index + offset]) { return 0 }
        return length
    }

    private mutating func escape(into out: inout [UInt8]) throws(JSONValue.ParseError) {
        let escapeOffset = index
        index += 1
        guard index < bytes.count else { throw error("unterminated string") }
        let letter = bytes[index]
        index += 1
        switch letter {
        case JSONParser.quote, JSONParser.backslash, UInt8(ascii: "/"): out.append(letter)
        case UInt8(ascii: "n"): out.append(0x0A)
        case UInt8(ascii: "t"): out.append(0x09)
        case UInt8(ascii: "r"): out.append(0x0D)
        case UInt8(ascii: "b"): out.append(0x08)
        case UInt8(ascii: "f"): out.append(0x0C)
        case UInt8(ascii: "u"):
            var code = try hex4()
            if (0xDC00...0xDFFF).contains(code) {
                throw error("unpaired surrogate \\u\(String(code, radix: 16, uppercase: true)) (a low surrogate must follow a high one)", at: escapeOffset)
            }
            if (0xD800...0xDBFF).contains(code) {
                guard index + 1 < bytes.count, bytes[index] == JSONParser.backslash, bytes[index + 1] == UInt8(ascii: "u") else {
                    throw error("unpaired surrogate \\u\(String(code, radix: 16, uppercase: true)) (a \\uDC00-\\uDFFF escape must follow)", at: escapeOffset)
                }
                index += 2
                let low = try hex4()
                guard (0xDC00...0xDFFF).contains(low) else {
                    throw error("unpaired surrogate \\u\(String(code, radix: 16, uppercase: true)) (a \\uDC00-\\uDFFF escape must follow)", at: escapeOffset)
                }
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            }
            out.append(contentsOf: String(Unicode.Scalar(code)!).utf8)
        default:
            index -= 1
            throw error("invalid escape \\\(found().trimmingQuotes): use \\\", \\\\, \\/, \\b, \\f, \\n, \\r, \\t or \\uXXXX", at: escapeOffset)
        }
    }

    private mutating func hex4() throws(JSONValue.ParseError) -> UInt32 {
        var code: UInt32 = 0
        for _ in 0..<4 {
            guard index < bytes.count else { throw error("unexpected end of input in a \\u escape") }
            let byte = bytes[index]
            let digit: UInt8
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = byte - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = byte - UInt8(ascii: "a") + 10
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = byte - UInt8(ascii: "A") + 10
            default: throw error("unexpected \(found()) in a \\u escape: expected 4 hex digits")
            }
            code = code << 4 | UInt32(digit)
            index += 1
        }
        return code
    }

    private func isDigit(_ offset: Int) -> Bool {
        offset < bytes.count && bytes[offset] >= UInt8(ascii: "0") && bytes[offset] <= UInt8(ascii: "9")
    }

    private mutating func skipDigits() { while isDigit(index) { index += 1 } }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    private mutating func number() throws(JSONValue.ParseError) -> JSONValue {
        let start = index
        let negative = bytes[index] == UInt8(ascii: "-")
        if negative { index += 1 }
        guard isDigit(index) else { throw error("unexpected \(found()): expected a digit") }
        if bytes[index] == UInt8(ascii: "0") {
            index += 1
            if isDigit(index) { throw error("a number cannot have a leading zero") }
        } else {
            skipDigits()
        }
        var integer = true
        if index < bytes.count && bytes[index] == UInt8(ascii: ".") {
            index += 1
            guard isDigit(index) else { throw error("unexpected \(found()): expected a digit after '.'") }
            skipDigits()
            integer = false
        }
        if index < bytes.count && (bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E")) {
            index += 1
            if index < bytes.count && (bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-")) { index += 1 }
            guard isDigit(index) else { throw error("unexpected \(found()): expected a digit in the exponent") }
            skipDigits()
            integer = false
        }
        let text = String(decoding: bytes[start..<index], as: UTF8.self)
        if integer {
            if let value = Int64(text) { return .int(value) }
            if !negative, let value = UInt64(text) { return .uint(value) }
            // Beyond 64 bits: keep it as the nearest double, as JavaScript would.
        }
        guard let value = Double(text), value.isFinite else {
            throw error("number \(text) is out of range", at: start)
        }
        return .double(value)
    }
}

private extension String {
    var trimmingQuotes: String {
        hasPrefix("'") && hasSuffix("'") && count >= 3 ? String(dropFirst().dropLast()) : self
    }
}
