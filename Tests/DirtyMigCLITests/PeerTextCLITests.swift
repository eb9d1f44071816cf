@testable import DirtyMigCore
import Foundation
import XCTest

/// A peer's words reach a log as one escaped line: a sender's abort at a plaintext receiver
/// (before any hello, so anyone who can connect), and a destination's refusal at the sender.
/// Raw, "\e[2J\nFAKE LINE" would clear the operator's terminal and forge a log line.
final class PeerTextCLITests: ProcessTestCase {
    override class var directoryPrefix: String { "dmt" }

    private static let hostile = "\u{1b}[2J\nFAKE LINE"
    private static let escaped = "\\x1b[2J\\nFAKE LINE"

    private func assertOneEscapedLine(_ log: String, file: StaticString = #filePath, line: UInt = #line) {
        let lines = log.split(separator: "\n")
        let mentions = lines.filter { $0.contains("FAKE LINE") }
        XCTAssertEqual(mentions.count, 1, log, file: file, line: line)
        XCTAssertTrue(mentions.first?.contains(Self.escaped) == true, log, file: file, line: line)
        XCTAssertFalse(lines.contains { $0.hasPrefix("FAKE LINE") }, "no forged line: \(log)", file: file, line: line)
        XCTAssertFalse(log.contains("\u{1b}"), "no escape sequence reaches the log: \(log)", file: file, line: line)
    }

    func testAPeersAbortReachesTheReceiversLogAsOneEscapedLine() throws {
        let port = try freePort()
        let (receiver, output, errors) = try start(["receive", "--listen", "127.0.0.1:\(port)", "--control", socket("rx")])
        let ready = try XCTUnwrap(CLI.readLine(output), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening"), ready)

        var writer = WireWriter()
        writer.string(Self.hostile)
        let peer = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))
        try peer.send(MigrationWire.frame(.abort, writer.bytes))
        peer.shutdown()
        var log = ""
        let deadline = Date().addingTimeInterval(5)
        while !log.contains("FAKE LINE") && Date() < deadline {
            usleep(20_000)
            log += stderrText(errors)
        }
        print("the receiver's log: \(log)")
        assertOneEscapedLine(log)
        XCTAssertTrue(receiver.isRunning)
    }

    func testADestinationsRefusalReachesTheSendersOutputAsOneEscapedLine() throws {
        let (vm, output, errors) = try start(["boot", "--memory", "64M", "--vcpus", "1", "--control", socket("vm")])
        let ready = try XCTUnwrap(CLI.readLine(output), "boot printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("running"), ready)

        // A destination that reads the hello and refuses it in the peer's words.
        let listener = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        let port = listener.localPort
        let served = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            defer { served.signal() }
            guard let connection = try? listener.accept(),
                  let header = try? connection.receive(count: MigrationWire.frameHeaderSize) else { return }
            let length = Int(header[4]) | Int(header[5]) << 8 | Int(header[6]) << 16 | Int(header[7]) << 24
            _ = try? connection.receive(count: length)
            try? connection.send(MigrationWire.frame(.helloReply, MigrationHelloReply.refuse(Self.hostile).encode()))
            _ = try? connection.receive(count: 1)   // until the sender hangs up
        }
        let result = try CLI.run(["migrate", "--vm", socket("vm"), "--to", "127.0.0.1:\(port)"])
        XCTAssertEqual(served.wait(timeout: .now() + 10), .success)
        let shown = result.stdout + result.stderr
        print("migrate refused: status \(result.status): \(shown)")
        XCTAssertEqual(result.status, 1)
        assertOneEscapedLine(shown)
        XCTAssertTrue(shown.contains("refused the migration: " + Self.escaped), shown)
        XCTAssertTrue(vm.isRunning)
    }
}
