import DirtyMigCore
import Foundation
import XCTest

/// A TLS receiver cannot be held by peers that never authenticate: a silent client and one that
/// stops halfway through its ClientHello are closed at the handshake deadline, a flood of them
/// is bounded (with a line in the log), and a real sender is served meanwhile.
final class SecureChannelHandshakeTests: XCTestCase {
    private var directory = ""

    override func setUpWithError() throws {
        var template = Array("/tmp/dmtlsh-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw XCTSkip("cannot create a temporary directory under /tmp") }
        directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: directory) }

    private func security() throws -> ChannelSecurity {
        let file = directory + "/key.psk"
        _ = FileManager.default.createFile(atPath: file, contents: Data("test:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n".utf8),
                                       attributes: [.posixPermissions: 0o600])
        return try ChannelSecurity.load(pskFile: file, tlsDirectory: nil, peerName: nil, insecure: false)
    }

    func testSilentAndHalfwayClientsAreClosedAtTheHandshakeDeadlineAndAFloodIsBounded() throws {
        let kvm = try requireKVM()
        let security = try security()
        var limits = MigrationReceiver.Limits()
        limits.handshakeSeconds = 1
        limits.maxPendingHandshakes = 4
        let log = Lines(), outcomes = Lines()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, limits: limits,
                                                    security: security) { log.append($0) }
        defer { receiver.stop() }
        let serving = OSThread(name: "test-receiver") {
            while true {
                do throws(MigrationError) {
                    try receiver.receiveOne().stop()
                } catch {
                    if case .receiverStopped = error { return }
                    outcomes.append("\(error)")
                }
            }
        }
        defer { receiver.stop(); serving.join() }
        let endpoint = HostPort(host: "127.0.0.1", port: receiver.port)

        let started = Date()
        let silent = try TCPSocket.connect(endpoint)
        let halfway = try TCPSocket.connect(endpoint)
        try halfway.send([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])   // a ClientHello record that never ends
        // Both are closed at the deadline: a read sees the end of the stream (or a reset).
        for socket in [silent, halfway] {
            socket.setTimeouts(send: 5, receive: 5)
            XCTAssertThrowsError(try socket.receive(count: 1)) { error in
                XCTAssertNotEqual((error as? SystemError)?.errno, ETIMEDOUT, "closed by the receiver, not by our own timeout")
            }
        }
        let closedAfter = Date().timeIntervalSince(started)
        XCTAssertGreaterThan(closedAfter, 0.9)
        XCTAssertLessThan(closedAfter, 3, "closed at the 1 s deadline")
        wait { outcomes.all.filter { $0.contains("no complete TLS handshake within 1.0 s") }.count >= 2 }
        XCTAssertEqual(outcomes.all.filter { $0.contains("no complete TLS handshake within 1.0 s") }.count, 2, "\(outcomes.all)")

        // A flood: at most 4 wait at once; the rest are closed at once, and the log says so.
        var flood: [TCPSocket] = []
        for _ in 0..<10 { flood.append(try TCPSocket.connect(endpoint)) }
        wait { log.all.contains { $0.contains("4 connections are already waiting") } }
        XCTAssertTrue(log.all.contains { $0.contains("4 connections are already waiting") }, "\(log.all)")
        for socket in flood { socket.shutdown() }
        print("handshake deadline: silent and halfway clients closed after \(String(format: "%.2f", closedAfter)) s; log: \(log.all.prefix(3))")
    }

    /// Key files: hex alone (identity from the key's hash), IDENTITY:HEX (QEMU's keys.psk
    /// format), and what is refused, with words that say what to do.
    func testKeyFilesAreReadOrRefusedWithAReason() throws {
        func write(_ name: String, _ text: String, mode: Int = 0o600) -> String {
            let file = directory + "/" + name
            _ = FileManager.default.createFile(atPath: file, contents: Data(text.utf8), attributes: [.posixPermissions: mode])
            return file
        }
        let hex = String(repeating: "ab", count: 32)
        let plain = try PreSharedKey.load(path: write("plain", "# a comment\n\(hex)\n"))
        XCTAssertTrue(plain.identity.hasPrefix("dirtymig-") && plain.identity.count == 25, plain.identity)
        XCTAssertEqual(try PreSharedKey.load(path: write("named", "host-a:\(hex)")).identity, "host-a")
        let refusals: [(String, String, Int, String)] = [
            ("short", "abcd", 0o600, "32 to 128 hex digits"), ("odd", String(hex.dropLast()), 0o600, "32 to 128 hex digits"),
            ("nothex", String(repeating: "zz", count: 32), 0o600, "32 to 128 hex digits"),
            ("two", "\(hex)\n\(hex)\n", 0o600, "expected one line"), ("empty", "", 0o600, "expected one line"),
            ("group", hex, 0o640, "mode 0640"), ("spaces", "a b:\(hex)", 0o600, "printable characters without spaces"),
        ]
        for (name, text, mode, words) in refusals {
            XCTAssertThrowsError(try PreSharedKey.load(path: write(name, text, mode: mode)), name) {
                XCTAssertTrue("\($0)".contains(words), "\(name): \($0)")
            }
        }
        XCTAssertThrowsError(try ChannelSecurity.load(pskFile: write("k", hex), tlsDirectory: directory, peerName: nil, insecure: false))
        XCTAssertThrowsError(try ChannelSecurity.load(pskFile: nil, tlsDirectory: nil, peerName: "x", insecure: false))
        XCTAssertThrowsError(try ChannelSecurity.load(pskFile: write("k2", hex), tlsDirectory: nil, peerName: nil, insecure: true))
        XCTAssertThrowsError(try ChannelSecurity.load(pskFile: nil, tlsDirectory: directory + "/none", peerName: nil, insecure: false)) {
            XCTAssertTrue("\($0)".contains("ca.pem"), "\($0)")
        }
    }

    private func wait(seconds: Double = 10, until condition: () -> Bool) {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() && Date() < deadline { usleep(20_000) }
    }
}

/// Lines collected from other threads.
final class Lines: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.lock(); lines.append(line); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}
