import DirtyMigCore
import Foundation
import XCTest

/// The receiver cannot be held or knocked over from outside: idle and trickling connections are
/// closed after the handshake deadline while others are served, a second sender is told "busy",
/// a burst of connections is bounded, `stop()` aborts a migration in flight and tells its
/// source, and hellos that cannot be right (TSC, working sets) are refused before allocating.
final class ReceiverHardeningTests: XCTestCase {
    private static let memory: UInt64 = 64 << 20

    private func hello(tscKHz: UInt64? = nil, workload: VCPUWorkload = VCPUWorkload(kind: .idle, seed: 0),
                       kvm: KVMSystem) -> MigrationHello {
        let tsc = tscKHz ?? ((try? HostTSC.frequency(kvm: kvm)) ?? 2_000_000_000) / 1000
        let config = GuestConfig(tscHz: tsc * 1000, memorySize: Self.memory, vcpus: [workload])
        return MigrationHello(name: "t", memorySize: Self.memory, vcpuCount: 1, tracking: .bitmap, ringEntries: 4096,
                              tscKHz: tsc, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: config.encode())
    }

    /// A receiver whose receiveOne outcomes and log lines are collected.
    private func startReceiver(_ kvm: KVMSystem, limits: MigrationReceiver.Limits) throws -> (MigrationReceiver, Outcomes, Outcomes) {
        let log = Outcomes()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, limits: limits) { log.append($0) }
        let outcomes = Outcomes()
        _ = OSThread(name: "test-receiver") {
            while true {
                do throws(MigrationError) {
                    let machine = try receiver.receiveOne()
                    machine.stop()
                    outcomes.append("received")
                } catch {
                    if case .receiverStopped = error { return }
                    outcomes.append("\(error)")
                }
            }
        }
        return (receiver, outcomes, log)
    }

    private func connect(_ receiver: MigrationReceiver) throws -> TCPSocket {
        let socket = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: receiver.port))
        socket.setTimeouts(send: 5, receive: 5)
        return socket
    }

    /// Reads one frame: its type and payload.
    private func readFrame(_ socket: TCPSocket) throws -> (UInt32, [UInt8]) {
        let header = try socket.receive(count: 8)
        let type = header[0..<4].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let length = header[4..<8].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        return (type, try socket.receive(count: Int(length)))
    }

    /// The reason string at the end of a helloReply (u8, u32, then the string) or abort (string).
    private func text(_ payload: [UInt8]) -> String { String(decoding: payload.drop { $0 < 0x20 || $0 > 0x7E }, as: UTF8.self) }

    private func wait(until condition: () -> Bool, seconds: Double = 10) {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() && Date() < deadline { usleep(10_000) }
    }

    func testIdleAndTricklingConnectionsDoNotBlockOthers() throws {
        let kvm = try requireKVM()
        var limits = MigrationReceiver.Limits()
        limits.handshakeSeconds = 1
        let (receiver, _, log) = try startReceiver(kvm, limits: limits)
        defer { receiver.stop() }

        let idle = try connect(receiver)
        let trickler = try connect(receiver)
        let trickle = OSThread(name: "trickle") {
            for byte in MigrationWire.frame(.hello, [1, 2, 3, 4]) {
                guard (try? trickler.send([byte])) != nil else { return }
                usleep(300_000)
            }
        }
        // A real sender, meanwhile, is answered at once.
        let started = Date()
        let sender = try connect(receiver)
        try sender.send(MigrationWire.frame(.hello, hello(kvm: kvm).encode()))
        let (type, reply) = try readFrame(sender)
        let answeredAfter = Date().timeIntervalSince(started)
        XCTAssertEqual(type, MigrationFrameType.helloReply.rawValue)
        XCTAssertEqual(reply.first, 1, "accepted: \(text(reply))")
        XCTAssertLessThan(answeredAfter, 0.9, "answered while an idle and a trickling connection wait (before the 1 s handshake deadline)")
        sender.shutdown()

        // Both stragglers are closed at the deadline, trickle or not (and only logged: they never
        // took the slot).
        wait { log.all.filter { $0.contains("no complete hello within 1.0 s") }.count >= 2 }
        XCTAssertEqual(log.all.filter { $0.contains("no complete hello within 1.0 s") }.count, 2, "\(log.all)")
        XCTAssertThrowsError(try idle.receive(count: 64 << 10), "the idle connection was closed")
        trickle.join()
    }

    func testASecondSenderIsToldBusyAndTheNextOneIsServed() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes, log) = try startReceiver(kvm, limits: MigrationReceiver.Limits())
        defer { receiver.stop() }
        let first = try connect(receiver)
        try first.send(MigrationWire.frame(.hello, hello(kvm: kvm).encode()))
        XCTAssertEqual(try readFrame(first).1.first, 1)

        let second = try connect(receiver)
        try second.send(MigrationWire.frame(.hello, hello(kvm: kvm).encode()))
        let (type, reply) = try readFrame(second)
        XCTAssertEqual(type, MigrationFrameType.helloReply.rawValue)
        XCTAssertEqual(reply.first, 0)
        XCTAssertTrue(text(reply).contains("busy: a migration from 127.0.0.1:"), text(reply))
        wait { log.all.contains { $0.contains("busy") } }
        XCTAssertTrue(log.all.contains { $0.contains("busy") }, "\(log.all)")

        // The first goes away: its partial VM is dropped, and the next sender is served.
        first.shutdown()
        wait { outcomes.count >= 1 && log.all.contains { $0.contains("its partial VM was discarded") } }
        XCTAssertTrue(log.all.contains { $0.contains("its partial VM was discarded") }, "\(log.all)")
        let third = try connect(receiver)
        try third.send(MigrationWire.frame(.hello, hello(kvm: kvm).encode()))
        XCTAssertEqual(try readFrame(third).1.first, 1)
    }

    func testABurstOfConnectionsIsBoundedAndLogged() throws {
        let kvm = try requireKVM()
        var limits = MigrationReceiver.Limits()
        limits.maxPendingHandshakes = 8
        limits.handshakeSeconds = 2
        let (receiver, _, log) = try startReceiver(kvm, limits: limits)
        defer { receiver.stop() }
        let held = try (0..<40).map { _ in try connect(receiver) }
        wait { log.all.filter { $0.contains("already waiting") }.count >= 32 }
        XCTAssertEqual(log.all.filter { $0.contains("already waiting") }.count, 32, "\(log.all.prefix(3))")
        withExtendedLifetime(held) {}
    }

    /// Connections that announce the largest page batch before any hello, and send nothing
    /// more: refused from the header, with nothing allocated for the payload they announced.
    func testHeadersOfHugeFramesBeforeTheHelloCommitNoMemory() throws {
        let kvm = try requireKVM()
        var limits = MigrationReceiver.Limits()
        limits.handshakeSeconds = 3
        let (receiver, _, log) = try startReceiver(kvm, limits: limits)
        defer { receiver.stop() }
        let before = residentBytes()
        var header = [UInt8]()
        for word in [MigrationFrameType.pages.rawValue, UInt32(4 + 16 * MigrationWire.maxRangesPerBatch + MigrationWire.maxBatchDataBytes)] {
            withUnsafeBytes(of: word.littleEndian) { header += $0 }
        }
        let sockets = try (0..<16).map { _ in try connect(receiver) }
        for socket in sockets { try socket.send(header) }
        usleep(1_000_000)
        let during = residentBytes()
        let grew = Int64(during) - Int64(before)
        print("16 connections announcing a \(MigrationWire.maxBatchDataBytes >> 20) MiB page batch before their hello: RSS \(before >> 20) MiB -> \(during >> 20) MiB")
        XCTAssertLessThan(grew, 64 << 20, "RSS grew by \(grew >> 20) MiB")
        wait { log.all.filter { $0.contains("a pages frame where hello belongs") }.count >= 16 }
        XCTAssertEqual(log.all.filter { $0.contains("a pages frame where hello belongs") }.count, 16, "\(log.all.prefix(3))")
        withExtendedLifetime(sockets) {}
    }

    func testStopAbortsTheMigrationInFlightAndTellsTheSource() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes, log) = try startReceiver(kvm, limits: MigrationReceiver.Limits())
        let sender = try connect(receiver)
        try sender.send(MigrationWire.frame(.hello, hello(kvm: kvm).encode()))
        XCTAssertEqual(try readFrame(sender).1.first, 1)
        var batch: [UInt8] = [1, 0, 0, 0] + [0, 4, 0, 0, 0, 0, 0, 0] + [4, 0, 0, 0] + [0, 0, 0, 0]
        batch += [UInt8](repeating: 0xAB, count: 4 * 4096)
        try sender.send(MigrationWire.frame(.pages, batch))
        usleep(100_000)
        XCTAssertNotNil(receiver.activePeer)
        receiver.stop()
        let (type, payload) = try readFrame(sender)
        XCTAssertEqual(type, MigrationFrameType.abort.rawValue)
        XCTAssertTrue(text(payload).contains("the destination is stopping"), text(payload))
        wait { outcomes.count >= 1 }
        XCTAssertTrue(outcomes.all.first?.contains("the destination is stopping") ?? false, "\(outcomes.all)")
        XCTAssertTrue(log.all.contains { $0.contains("its partial VM was discarded") }, "\(log.all)")
    }

    func testHellosThatCannotBeRightAreRefusedBeforeAllocating() throws {
        let kvm = try requireKVM()
        let (receiver, outcomes, log) = try startReceiver(kvm, limits: MigrationReceiver.Limits())
        defer { receiver.stop() }
        func refusal(_ hello: MigrationHello) throws -> String {
            let sender = try connect(receiver)
            try sender.send(MigrationWire.frame(.hello, hello.encode()))
            let (_, reply) = try readFrame(sender)
            XCTAssertEqual(reply.first, 0)
            return text(reply)
        }
        XCTAssertTrue(try refusal(hello(tscKHz: 0, kvm: kvm)).contains("0 kHz, which no x86 host has"))
        if let host = try? HostTSC.frequency(kvm: kvm), kvm.checkExtension(60 /* KVM_CAP_TSC_CONTROL */) <= 0 {
            let other = host / 1000 * 11 / 10
            XCTAssertTrue(try refusal(hello(tscKHz: other, kvm: kvm)).contains("cannot make a guest's TSC tick at another rate"))
        }
        let outside = VCPUWorkload(kind: .write, offset: Self.memory, size: 1 << 20, seed: 1)
        XCTAssertTrue(try refusal(hello(workload: outside, kvm: kvm)).contains("outside the VM's"))
        wait { outcomes.count >= 2 }
        XCTAssertTrue(log.all.allSatisfy { $0.contains("nothing had been allocated") || $0.contains("refused") }, "\(log.all)")
    }

    func testResidentBytesCountWorkingSetsOnce() {
        let a = VCPUWorkload(kind: .write, offset: 0, size: 256 << 20, seed: 1)
        let b = VCPUWorkload(kind: .read, offset: 128 << 20, size: 256 << 20, seed: 2)
        let configuration = MachineConfiguration(memorySize: 1 << 30, vcpuCount: 3,
                                                 workloads: [a, b, VCPUWorkload(kind: .idle, seed: 0)])
        XCTAssertEqual(configuration.residentBytes, GuestLayout.workloadBase + (384 << 20) + MemoryBudget.processOverhead)
        let budget = MemoryBudget.current()
        XCTAssertGreaterThan(budget.availableBytes, 0)
        print("memory budget here: \(budget.availableBytes >> 20) MiB (\(budget.source))")
    }
}
