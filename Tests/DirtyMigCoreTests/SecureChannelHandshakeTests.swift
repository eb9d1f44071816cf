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
        // Logged, not outcomes: they never took the slot.
        wait { log.all.filter { $0.contains("no complete TLS handshake within 1.0 s") }.count >= 2 }
        XCTAssertEqual(log.all.filter { $0.contains("no complete TLS handshake within 1.0 s") }.count, 2, "\(log.all)")
        XCTAssertEqual(outcomes.all, [])

        // A flood: at most 4 wait at once; the rest are closed at once, and the log says so.
        var flood: [TCPSocket] = []
        for _ in 0..<10 { flood.append(try TCPSocket.connect(endpoint)) }
        wait { log.all.contains { $0.contains("4 connections are already waiting") } }
        XCTAssertTrue(log.all.contains { $0.contains("4 connections are already waiting") }, "\(log.all)")
        for socket in flood { socket.shutdown() }
        print("handshake deadline: silent and halfway clients closed after \(String(format: "%.2f", closedAfter)) s; log: \(log.all.prefix(3))")
    }

    /// The start of a ClientHello record (type 0x16, TLS 1.0 record version, 512 bytes), then
    /// filler: what a peer that trickles its handshake sends.
    private static let clientHelloBytes: [UInt8] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03]
        + [UInt8](repeating: 0x42, count: 500)

    /// Sends `bytes` one at a time every `interval` seconds until a send fails (the peer closed
    /// the connection) or `until` seconds have passed; returns when it stopped and whether the
    /// peer had closed it.
    private static func trickle(_ socket: TCPSocket, _ bytes: [UInt8], every interval: Double, until: Double) -> (Double, Bool) {
        let started = Date()
        var index = 0
        while Date().timeIntervalSince(started) < until {
            // A closed connection shows as the end of the stream (or a reset) on a peek.
            var probe: UInt8 = 0
            let got = recv(socket.fd.rawValue, &probe, 1, Int32(MSG_PEEK | MSG_DONTWAIT))
            if got == 0 || (got < 0 && errno != EAGAIN) { return (Date().timeIntervalSince(started), true) }
            if got > 0 { _ = recv(socket.fd.rawValue, &probe, 1, 0); continue }   // a refusal: read on
            if (try? socket.send([bytes[index % bytes.count]])) == nil { return (Date().timeIntervalSince(started), true) }
            index += 1
            usleep(UInt32(interval * 1e6))
        }
        return (Date().timeIntervalSince(started), false)
    }

    private func startPSKReceiver(_ kvm: KVMSystem, limits: MigrationReceiver.Limits, log: Lines) throws -> (MigrationReceiver, OSThread) {
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, limits: limits,
                                                    security: try security()) { log.append($0) }
        let serving = OSThread(name: "test-receiver") {
            while true {
                do throws(MigrationError) { try receiver.receiveOne().stop() } catch {
                    if case .receiverStopped = error { return }
                }
            }
        }
        return (receiver, serving)
    }

    /// OpenSSL reads the socket itself during the handshake: a ClientHello that trickles in a
    /// byte at a time must still be cut at the handshake deadline, not held for as long as the
    /// bytes keep coming (each read's own timeout is 30 s).
    func testClientHellosThatTrickleAreClosedAtTheHandshakeDeadline() throws {
        let kvm = try requireKVM()
        var limits = MigrationReceiver.Limits()
        limits.handshakeSeconds = 1
        let log = Lines()
        let (receiver, serving) = try startPSKReceiver(kvm, limits: limits, log: log)
        defer { receiver.stop(); serving.join() }
        let endpoint = HostPort(host: "127.0.0.1", port: receiver.port)
        let results = Lines()
        let threads = try (0..<4).map { _ in
            let socket = try TCPSocket.connect(endpoint)
            return OSThread(name: "trickler") {
                let (seconds, closed) = Self.trickle(socket, Self.clientHelloBytes, every: 0.25, until: 6)
                results.append(closed ? String(format: "%.2f", seconds) : "open after \(String(format: "%.1f", seconds)) s")
            }
        }
        for thread in threads { thread.join() }
        print("trickling ClientHellos (a byte every 0.25 s, handshake deadline 1 s): closed after \(results.all)")
        for result in results.all {
            let seconds = try XCTUnwrap(Double(result), "held: \(result)")
            XCTAssertLessThan(seconds, 2.5, "closed at the 1 s handshake deadline")
        }
        wait { log.all.filter { $0.contains("no complete TLS handshake within 1.0 s") }.count >= 4 }
        XCTAssertEqual(log.all.filter { $0.contains("no complete TLS handshake within 1.0 s") }.count, 4, "\(log.all)")
    }

    /// A sender that comes while the receiver already has `maxPendingHandshakes` connections
    /// waiting is told the destination is busy (in clear, before TLS), not that the
    /// credentials differ.
    func testASenderRefusedBecauseHandshakesAreFullIsToldBusy() throws {
        let kvm = try requireKVM()
        var limits = MigrationReceiver.Limits()
        limits.handshakeSeconds = 4
        limits.maxPendingHandshakes = 2
        let log = Lines()
        let (receiver, serving) = try startPSKReceiver(kvm, limits: limits, log: log)
        defer { receiver.stop(); serving.join() }
        let endpoint = HostPort(host: "127.0.0.1", port: receiver.port)
        let waiting = try (0..<2).map { _ in try TCPSocket.connect(endpoint) }
        defer { for socket in waiting { socket.shutdown() } }
        usleep(300_000)   // both are taken in and wait for their handshake

        let started = Date()
        XCTAssertThrowsError(try MigrationConnector.connect(to: endpoint, security: try security())) { error in
            print("TLS sender at a full receiver (after \(String(format: "%.3f", Date().timeIntervalSince(started))) s): \(error)")
            XCTAssertTrue("\(error)".contains("the destination is busy: 2 connections are waiting to complete their handshake"), "\(error)")
            XCTAssertFalse("\(error)".contains("credentials"), "\(error)")
        }
        // A plaintext dirtymig reads the same refusal as a hello reply.
        let plain = try TCPSocket.connect(endpoint)
        plain.setTimeouts(send: 2, receive: 2)
        let header = try plain.receive(count: 8)
        XCTAssertEqual(header[0], UInt8(MigrationFrameType.helloReply.rawValue))
        let length = Int(header[4]) | Int(header[5]) << 8
        let reply = String(decoding: try plain.receive(count: length).filter { $0 >= 0x20 && $0 < 0x7F }, as: UTF8.self)
        XCTAssertTrue(reply.contains("the destination is busy"), reply)
        wait { log.all.filter { $0.contains("2 connections are already waiting") }.count >= 2 }
        XCTAssertEqual(log.all.filter { $0.contains("2 connections are already waiting") }.count, 2, "\(log.all)")
    }

    /// A destination that trickles its side of the handshake: the sender gives up at its
    /// handshake deadline (the connect timeout), and a cancel reaches it before that.
    /// A destination that answers every connection with a ServerHello record header and then
    /// filler, a byte every 0.2 s, for `seconds`; stopped by the returned closure.
    private func tricklingDestination(seconds: Double) throws -> (HostPort, () -> Void) {
        let listener = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        let server = OSThread(name: "trickling-dest") {
            while let socket = try? listener.accept() {
                _ = OSThread(name: "trickle") {
                    _ = Self.trickle(socket, [0x16, 0x03, 0x03, 0x10, 0x00] + [UInt8](repeating: 0x02, count: 4000), every: 0.2, until: seconds)
                    socket.shutdown()
                }
            }
        }
        return (HostPort(host: "127.0.0.1", port: listener.localPort), { listener.shutdown(); server.join() })
    }

    func testASenderGivesUpOnADestinationThatTricklesItsHandshake() throws {
        let (endpoint, stop) = try tricklingDestination(seconds: 8)
        defer { stop() }
        let security = try security()
        let started = Date()
        XCTAssertThrowsError(try MigrationConnector.connect(to: endpoint, security: security, timeout: 1)) { error in
            XCTAssertTrue("\(error)".contains("did not complete the TLS handshake in time"), "\(error)")
        }
        let gaveUpAfter = Date().timeIntervalSince(started)
        print("sender vs a destination trickling its handshake: gave up after \(String(format: "%.2f", gaveUpAfter)) s (connect timeout 1 s)")
        XCTAssertLessThan(gaveUpAfter, 2)
    }

    /// `MigrationSender.cancel` (Ctrl-C on `migrate`, `dirtymig stop` of the source) reaches a
    /// migration whose destination trickles its handshake.
    func testCancellingASenderReachesItsHandshake() throws {
        let kvm = try requireKVM()
        let (endpoint, stop) = try tricklingDestination(seconds: 10)
        defer { stop() }
        let machine = try Machine(MachineConfiguration(memorySize: 64 * MiB, vcpuCount: 1, workloads: [VCPUWorkload(kind: .idle, seed: 0)], tracking: .bitmap), kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        var options = MigrationOptions(destination: endpoint)
        options.security = try security()
        let sender = MigrationSender(machine: machine, options: options)
        let cancelled = Lines()
        let canceller = OSThread(name: "cancel") {
            usleep(500_000)
            cancelled.append("\(Date().timeIntervalSince1970)")
            sender.cancel(reason: "cancelled by the test")
        }
        let report = sender.run()
        let returned = Date().timeIntervalSince1970
        canceller.join()
        let after = returned - (Double(cancelled.all.first ?? "") ?? returned)
        print("cancel during a trickled handshake: run() returned \(String(format: "%.2f", after)) s after cancel: \(report.error ?? "")")
        XCTAssertFalse(report.completed)
        XCTAssertEqual(report.error, "cancelled by the test")
        XCTAssertLessThan(after, 1, "the cancel reached the handshake")
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
