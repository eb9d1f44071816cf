@testable import DirtyMigCore
import XCTest

/// Text from outside the process (a peer's reasons, a guest's console) as it reaches a log: one
/// line, control characters escaped, printable Unicode kept, the length bounded.
final class PeerTextTests: XCTestCase {
    func testControlCharactersAreEscapedAndPrintableTextIsKept() {
        XCTAssertEqual(PeerText.escaped("the disk is full"), "the disk is full")
        XCTAssertEqual(PeerText.escaped("\u{1b}[2J\nFAKE LINE"), "\\x1b[2J\\nFAKE LINE")
        XCTAssertEqual(PeerText.escaped("a\r\tb\u{0}c\u{7f}"), "a\\r\\tb\\x00c\\x7f")
        XCTAssertEqual(PeerText.escaped("back\\slash"), "back\\\\slash", "a backslash is doubled: an escape in the output is always ours")
        XCTAssertEqual(PeerText.escaped("Größe 4 GiB – 日本語 ✓"), "Größe 4 GiB – 日本語 ✓")
        // C1 controls (a CSI in one code point), bidi overrides, line separators.
        XCTAssertEqual(PeerText.escaped("x\u{9b}2Jy"), "x\\u{9b}2Jy")
        XCTAssertEqual(PeerText.escaped("abc\u{202e}fed"), "abc\\u{202e}fed")
        XCTAssertEqual(PeerText.escaped("one\u{2028}two"), "one\\u{2028}two")
    }

    func testBytesThatAreNotUTF8AreShownByValue() {
        XCTAssertEqual(PeerText.escaped([0x61, 0xff, 0x62, 0xc3]), "a\\xffb\\xc3")
        XCTAssertEqual(PeerText.escaped([0xed, 0xa0, 0x80]), "\\xed\\xa0\\x80", "a UTF-16 surrogate in UTF-8")
        XCTAssertEqual(PeerText.escaped(Array("ok é".utf8)), "ok é")
    }

    func testLongTextIsCutWithTheCountOfWhatWasLeftOut() {
        let long = PeerText.escaped(String(repeating: "a", count: 4096))
        XCTAssertEqual(long, String(repeating: "a", count: PeerText.maxCharacters) + "… (3584 more bytes)")
        // Escapes count at their printed length and are never split.
        let escapes = PeerText.escaped(String(repeating: "\n", count: 1000))
        XCTAssertEqual(escapes, String(repeating: "\\n", count: PeerText.maxCharacters / 2) + "… (744 more bytes)")
        XCTAssertEqual(PeerText.escaped(Array("abc".utf8), moreBytes: 10), "abc… (10 more bytes)",
                       "bytes dropped before the text was taken count too")
        XCTAssertEqual(PeerText.escaped(String(repeating: "a", count: PeerText.maxCharacters)), String(repeating: "a", count: PeerText.maxCharacters))
    }

    /// Where peer text enters: an abort's reason, a refusal in a hello reply, a result's message.
    func testReasonsFromThePeerAreEscapedWhereTheyAreRead() throws {
        let hostile = "\u{1b}[2J\nFAKE LINE"
        var writer = WireWriter()
        writer.string(hostile)
        XCTAssertEqual(MigrationChannel.abortReason(writer.bytes), "\\x1b[2J\\nFAKE LINE")
        let reply = try MigrationHelloReply(decoding: MigrationHelloReply.refuse(hostile).encode())
        XCTAssertEqual(reply.reason, "\\x1b[2J\\nFAKE LINE")
        let result = try MigrationResult(decoding: MigrationResult(status: .failed, message: hostile).encode())
        XCTAssertEqual(result.message, "\\x1b[2J\\nFAKE LINE")

        // The receiver's state machine, driven in memory: a sender that aborts before its hello.
        let transport = MemoryTransport(input: MigrationWire.frame(.abort, writer.bytes))
        XCTAssertThrowsError(try MigrationReceiver.receive(over: transport, build: { (_: MigrationHello) throws(MigrationError) -> FuzzTests.MemoryOnlyVM in
            throw .refused("not reached")
        })) { error in
            let text = "\(error)"
            XCTAssertEqual(text, "the peer aborted the migration: \\x1b[2J\\nFAKE LINE")
            XCTAssertFalse(text.contains("\n") || text.contains("\u{1b}"), text)
        }
    }

    /// A guest's console, a byte at a time: lines escaped, long ones cut with a count.
    func testConsoleLinesAreEscapedAndBounded() {
        var console = ConsoleLine()
        var lines: [String] = []
        for byte in Array("hi \u{1b}[31mred\r\n".utf8) + [UInt8](repeating: 0x41, count: 5000) + [0x0A] {
            if let line = console.take(byte) { lines.append(line) }
        }
        XCTAssertEqual(lines.count, 2)
        XCTAssertEqual(lines.first, "hi \\x1b[31mred\\r")
        XCTAssertEqual(lines.last, String(repeating: "A", count: PeerText.maxCharacters) + "… (\(5000 - PeerText.maxCharacters) more bytes)")
    }
}
