import DirtyMigCore
import Foundation
import XCTest

/// The migration wire protocol and the receiver's defences: foreign bytes, a truncated stream,
/// another protocol version, ranges outside RAM. After each, the receiver takes the next
/// migration.
final class MigrationProtocolTests: XCTestCase {
    /// This host's TSC, which a hello must announce to be accepted here (this kernel cannot
    /// scale a guest's TSC).
    private static let tscKHz: UInt64 = ((try? HostTSC.frequency()) ?? 1_000_000_000) / 1000

    private func hello(memory: UInt64 = 64 * MiB, version: UInt32 = MigrationWire.version,
                       tracking: TrackingMode = .bitmap) -> MigrationHello {
        let config = GuestConfig(tscHz: Self.tscKHz * 1000, memorySize: memory, vcpus: [VCPUWorkload(kind: .idle, seed: 0)])
        var hello = MigrationHello(name: "t", memorySize: memory, vcpuCount: 1, tracking: tracking, ringEntries: 4096,
                                   tscKHz: Self.tscKHz, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: config.encode())
        hello.version = version
        return hello
    }

    func testHelloRoundTripAndRejections() throws {
        let original = hello()
        XCTAssertEqual(try MigrationHello(decoding: original.encode()), original)
        XCTAssertThrowsError(try MigrationHello(decoding: Array("GET / HTTP/1.1\r\n".utf8))) {
            guard case .notDirtymig? = $0 as? MigrationProtocolError else { return XCTFail("\($0)") }
        }
        let other = MigrationWire.version + 1
        XCTAssertThrowsError(try MigrationHello(decoding: hello(version: other).encode())) {
            XCTAssertEqual($0 as? MigrationProtocolError, .versionMismatch(peer: other, ours: MigrationWire.version))
            XCTAssertTrue("\($0)".contains("version \(other)"), "\($0)")
        }
        let encoded = original.encode()
        for cut in [9, 20, encoded.count - 1] {
            XCTAssertThrowsError(try MigrationHello(decoding: Array(encoded.prefix(cut))), "cut at \(cut)")
        }
        var trailing = encoded
        trailing.append(0)
        XCTAssertThrowsError(try MigrationHello(decoding: trailing))

        var verifying = original
        verifying.verify = true
        XCTAssertEqual(try MigrationHello(decoding: verifying.encode()), verifying)
        // The flags word follows the CPUID words: a flag this version does not know is refused.
        var unknownFlag = verifying.encode()
        let flags = 12 + 16 + 8 + 4 + 4 + 4 + 8 + 12
        XCTAssertEqual(unknownFlag[flags], 1)
        unknownFlag[flags] = 17   // bit 0 (verify) and bit 4, which no version has
        XCTAssertThrowsError(try MigrationHello(decoding: unknownFlag)) {
            XCTAssertTrue("\($0)".contains("flags"), "\($0)")
        }
        var postcopy = original
        postcopy.postcopy = true
        XCTAssertEqual(try MigrationHello(decoding: postcopy.encode()), postcopy, "bit 2: the source may switch to post-copy")
        var resuming = postcopy
        resuming.resume = true
        XCTAssertEqual(try MigrationHello(decoding: resuming.encode()), resuming, "bit 3: a post-copy resumes over a new link")
        // A resume is of a post-copy or of a replication: neither (bit 3 with verify alone) or
        // both, refused; a replication's is bits 1 and 3.
        for bad in [9, 8 | 2 | 4] as [UInt8] {
            var encoded = resuming.encode()
            encoded[flags] = bad
            XCTAssertThrowsError(try MigrationHello(decoding: encoded)) {
                XCTAssertTrue("\($0)".contains("resuming neither a post-copy nor a replication, or both"), "\($0)")
            }
        }
        var replicationResume = original
        replicationResume.replicate = true
        replicationResume.resume = true
        XCTAssertEqual(try MigrationHello(decoding: replicationResume.encode()), replicationResume, "bits 1 and 3: a replication resumes")
    }

    /// The link timeout follows the flags word; the destination takes the source's deadline,
    /// from 1 s to 1 h: a hostile hello cannot make it give up at once or wait for days.
    func testTheHelloCarriesTheLinkTimeoutWithinItsRange() throws {
        XCTAssertEqual(hello().linkTimeoutMilliseconds, 30_000)
        var long = hello()
        long.linkTimeoutMilliseconds = 3_600_000
        XCTAssertEqual(try MigrationHello(decoding: long.encode()).linkTimeoutMilliseconds, 3_600_000)
        for outOfRange: UInt32 in [0, 999, 3_600_001, .max] {
            var bad = hello()
            bad.linkTimeoutMilliseconds = outOfRange
            XCTAssertThrowsError(try MigrationHello(decoding: bad.encode()), "\(outOfRange) ms") {
                XCTAssertTrue("\($0)".contains("link timeout"), "\($0)")
            }
        }
        var options = MigrationOptions(destination: HostPort(host: "127.0.0.1", port: 1))
        XCTAssertEqual(options.linkTimeoutSeconds, 30)
        XCTAssertNoThrow(try options.set(linkTimeoutSeconds: 5))
        XCTAssertEqual(options.linkTimeoutSeconds, 5)
        for outOfRange in [0.5, 3601, .nan, .infinity] {
            XCTAssertThrowsError(try options.set(linkTimeoutSeconds: outOfRange)) {
                XCTAssertEqual($0 as? MigrationOptions.Invalid, .linkTimeout)
            }
        }
    }

    /// Starts a receiver on a loopback port; `outcomes` collects each receiveOne outcome, and
    /// the log line of each connection refused before it took the slot (those are only logged).
    private func startReceiver(_ kvm: KVMSystem) throws -> (MigrationReceiver, Outcomes) {
        let outcomes = Outcomes()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm) { line in
            if line.hasPrefix("refused a connection") { outcomes.append(line) }
        }
        _ = OSThread(name: "test-receiver") {
            while true {
                do {
                    let machine = try receiver.receiveOne()
                    machine.stop()
                    outcomes.append("received")
                } catch let error as MigrationError {
                    if case .receiverStopped = error { return }
                    outcomes.append("\(error)")
                } catch {
                    outcomes.append("\(error)")
                }
            }
        }
        return (receiver, outcomes)
    }

    private func send(_ bytes: [UInt8], to port: UInt16, readReply: Bool = true) throws -> [UInt8] {
        let socket = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))
        try socket.send(bytes)
        socket.setTimeouts(send: 5, receive: 5)
        var reply: [UInt8] = []
        if readReply {
            var byte = [UInt8](repeating: 0, count: 1)
            while let next = try? socket.receive(count: 1), !next.isEmpty { byte = next; reply += byte }
        }
        return reply
    }

    func testMalformedStreamsAreRejectedAndTheReceiverListensOn() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes) = try startReceiver(kvm)
        defer { receiver.stop() }
        let port = receiver.port

        // Connections are served concurrently: wait for each outcome, so they come in order.
        func settle(_ count: Int) {
            let deadline = Date().addingTimeInterval(10)
            while outcomes.count < count && Date() < deadline { usleep(10_000) }
        }
        // 1. Random bytes.
        var generator = SystemRandomNumberGenerator()
        _ = try send((0..<4096).map { _ in UInt8.random(in: 0...255, using: &generator) }, to: port)
        settle(1)
        // 2. Another protocol version: refused with a message naming both versions.
        let other = MigrationWire.version + 1
        let refusal = try send(MigrationWire.frame(.hello, hello(version: other).encode()), to: port)
        XCTAssertTrue(String(decoding: refusal, as: UTF8.self).contains("version \(other)"), "the sender is told why")
        settle(2)
        // 3. A truncated stream: a good hello, then half a page batch, then the sender vanishes.
        var truncated = MigrationWire.frame(.hello, hello().encode())
        var batch = [UInt8]()
        batch += [1, 0, 0, 0]                                           // one range
        batch += [0, 4, 0, 0, 0, 0, 0, 0] + [4, 0, 0, 0] + [0, 0, 0, 0] // pages 1024..<1028, data
        batch += [UInt8](repeating: 0xAB, count: 4 * 4096)
        truncated += Array(MigrationWire.frame(.pages, batch).prefix(8 + 20 + 6000))
        _ = try send(truncated, to: port, readReply: false)
        settle(3)
        // 4. A range outside RAM (64 MiB = 16384 pages).
        var outside = MigrationWire.frame(.hello, hello().encode())
        outside += MigrationWire.frame(.pages, [1, 0, 0, 0] + [0, 0x40, 0, 0, 0, 0, 0, 0] + [1, 0, 0, 0] + [1, 0, 0, 0])
        _ = try send(outside, to: port)
        settle(4)
        // 5. A frame type that does not belong: state before hello.
        _ = try send(MigrationWire.frame(.state, [1, 2, 3]), to: port)
        settle(5)
        // 6. A pass plan whose bitmap does not fit the announced RAM (16384 pages = 256 words).
        var plan = MigrationWire.frame(.hello, hello().encode())
        plan += MigrationWire.frame(.passPlan, [1, 0, 0, 0] + [UInt8](repeating: 0xFF, count: 8 * 255))
        _ = try send(plan, to: port)

        let deadline = Date().addingTimeInterval(10)
        while outcomes.count < 6 && Date() < deadline { usleep(20_000) }
        let seen = outcomes.all
        XCTAssertEqual(seen.count, 6, "\(seen)")
        guard seen.count == 6 else { return }
        XCTAssertTrue(seen[0].contains("not a dirtymig migration stream"), seen[0])
        XCTAssertTrue(seen[1].contains("version \(other)") && seen[1].contains("version \(MigrationWire.version)"), seen[1])
        XCTAssertTrue(seen[5].contains("pass plan of 2044 bytes for 16384 pages"), seen[5])
        XCTAssertTrue(seen[2].contains("closed") || seen[2].contains("reset"), seen[2])
        XCTAssertTrue(seen[3].contains("outside RAM"), seen[3])
        XCTAssertTrue(seen[4].contains("state frame"), seen[4])
    }

    /// A migration that fails half-way leaves nothing behind, its memory included: three partial
    /// 256 MiB VMs (ring-tracked) each get 32 MiB of pages before the sender vanishes, and the
    /// process then holds no more shared memory than before.
    func testAFailedMigrationLeavesNoMemoryBehind() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes) = try startReceiver(kvm)
        defer { receiver.stop() }
        let before = try residentSharedMemory()
        var batch: [UInt8] = [1, 0, 0, 0] + [0, 0, 0, 0, 0, 0, 0, 0] + [0, 0x20, 0, 0] + [0, 0, 0, 0]   // pages 0..<8192, data
        batch += [UInt8](repeating: 0x5A, count: 8192 * 4096)
        let stream = MigrationWire.frame(.hello, hello(memory: 256 * MiB, tracking: .ring).encode()) + MigrationWire.frame(.pages, batch)
        let deadline = Date().addingTimeInterval(20)
        for attempt in 1...3 {   // one at a time: a second while the first holds the slot is told "busy"
            _ = try send(stream, to: receiver.port, readReply: false)
            while outcomes.count < attempt && Date() < deadline { usleep(10_000) }
        }
        while outcomes.count < 3 && Date() < deadline { usleep(20_000) }
        XCTAssertEqual(outcomes.count, 3, "\(outcomes.all)")
        XCTAssertTrue(outcomes.all.allSatisfy { $0.contains("closed") || $0.contains("reset") }, "\(outcomes.all)")
        var after = try residentSharedMemory()
        while after > before + 16 * MiB && Date() < deadline { usleep(20_000); after = try residentSharedMemory() }
        XCTAssertLessThan(after, before + 16 * MiB, "the partial VMs' memory is gone (\(before >> 20) MiB before, \(after >> 20) MiB after)")
    }

    /// RssShmem of this process: guest RAM is a memfd.
    private func residentSharedMemory() throws -> UInt64 {
        let status = try String(contentsOfFile: "/proc/self/status", encoding: .utf8)
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("RssShmem:") }),
              let kib = UInt64(line.split(separator: " ").dropFirst().first ?? "") else {
            throw XCTSkip("no RssShmem in /proc/self/status")
        }
        return kib * 1024
    }

    /// One page of data, then the state and a complete frame with `memoryDigest`; returns the
    /// result frame's status byte and how the receiver's attempt ended.
    private func completeWithDigest(_ memoryDigest: UInt64, announcingVerify: Bool, to receiver: MigrationReceiver,
                                    outcomes: Outcomes) throws -> (status: UInt8?, outcome: String?) {
        let seen = outcomes.count
        let state: [UInt8] = [1, 2, 3]
        var complete: [UInt8] = [1]
        withUnsafeBytes(of: memoryDigest.littleEndian) { complete += $0 }
        withUnsafeBytes(of: MemoryDigest.hash(state).littleEndian) { complete += $0 }
        var pages: [UInt8] = [1, 0, 0, 0]
        withUnsafeBytes(of: UInt64(100).littleEndian) { pages += $0 }
        pages += [1, 0, 0, 0, 0, 0, 0, 0] + Self.dataPage
        var hello = hello()
        hello.verify = announcingVerify
        let stream = MigrationWire.frame(.hello, hello.encode()) + MigrationWire.frame(.pages, pages)
            + MigrationWire.frame(.iterationEnd, [UInt8](repeating: 0, count: 12))
            + MigrationWire.frame(.state, state) + MigrationWire.frame(.complete, complete)
        let reply = try send(stream, to: receiver.port)
        let deadline = Date().addingTimeInterval(10)
        while outcomes.count <= seen && Date() < deadline { usleep(20_000) }
        // helloReply (a frame header, u32 type and u32 length, then its payload), iterationAck
        // (8 + 4), then the result frame.
        guard reply.count >= 8 else { return (nil, outcomes.all.dropFirst(seen).first) }
        let helloReplyLength = reply[4..<8].reversed().reduce(0) { $0 << 8 | Int($1) }
        let result = 8 + helloReplyLength + 12
        guard reply.count > result + 8, reply[result] == 7 else { return (nil, outcomes.all.dropFirst(seen).first) }
        return (reply[result + 8], outcomes.all.dropFirst(seen).first)
    }

    private static let dataPage: [UInt8] = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }

    /// The receiver compares the source's digest with its own, whether it hashed pages as they
    /// landed (the hello announced --verify) or hashes all of its memory at the end: a wrong one
    /// is refused and the VM dropped; the right one passes verification (this hand-made VM then
    /// fails to restore its made-up state, which is a different failure).
    func testAMemoryDigestMismatchIsRefusedAndTheVMDropped() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes) = try startReceiver(kvm)
        defer { receiver.stop() }
        let expected = try GuestMemory(size: 64 * MiB)
        Self.dataPage.withUnsafeBytes { expected.hostPointer(ramOffset: 100 * 4096).copyMemory(from: $0.baseAddress!, byteCount: 4096) }
        let right = MemoryDigest.compute(expected)
        for announced in [false, true] {
            let wrong = try completeWithDigest(right ^ 1, announcingVerify: announced, to: receiver, outcomes: outcomes)
            XCTAssertEqual(wrong.status, 1, "verification failed (hello announced verify: \(announced))")
            XCTAssertTrue(wrong.outcome?.contains("verification failed: memory digest differs") ?? false, "\(String(describing: wrong.outcome))")
            let good = try completeWithDigest(right, announcingVerify: announced, to: receiver, outcomes: outcomes)
            XCTAssertEqual(good.status, 2, "verification passed, then the made-up state failed (hello announced verify: \(announced))")
            XCTAssertFalse(good.outcome?.contains("verification") ?? true, "\(String(describing: good.outcome))")
        }
    }

    func testOversizedFramesAreRefusedBeforeAllocating() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes) = try startReceiver(kvm)
        defer { receiver.stop() }
        // A hello that claims 4 GiB of payload: refused from its header alone.
        _ = try send([1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF], to: receiver.port)
        let deadline = Date().addingTimeInterval(5)
        while outcomes.count < 1 && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(outcomes.all.first?.contains("at most") ?? false, "\(outcomes.all)")
    }

    func testPortInUseAndNobodyListening() throws {
        let kvm = try requireKVM()
        let first = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm)
        defer { first.stop() }
        XCTAssertThrowsError(try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: first.port), kvm: kvm)) {
            XCTAssertTrue("\($0)".contains("port is in use"), "\($0)")
        }
        // Nobody listens on a port we just released.
        let port: UInt16
        do {
            let probe = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm)
            port = probe.port
            probe.stop()
        }
        XCTAssertThrowsError(try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))) {
            XCTAssertEqual(($0 as? SystemError)?.errno, ECONNREFUSED)
        }
    }
}

/// What a background receiver saw, in order.
final class Outcomes: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [String] = []
    func append(_ item: String) { lock.lock(); items.append(item); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return items }
    var count: Int { all.count }
}
