@testable import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// A primary that lost its standby greets it again as the same replication resuming: a standby
/// that still holds a checkpoint of it takes only the pages changed since (real KVM, primary and
/// standby in this process, a relay between them that stalls and restores the link).
final class ReplicationResumeTests: XCTestCase {
    /// Two check workloads (they verify their own memory: after a failover they count pages
    /// found stale, torn or lost), one rewriting 8 MiB at random, one sweeping 8 MiB slowly; and
    /// a writer that fills 64 MiB once and then rests, so that the VM holds far more data than
    /// a short cut dirties. Returned once that writer is done.
    private func primary(_ kvm: KVMSystem) throws -> Machine {
        let workloads = [
            VCPUWorkload(kind: .check, pattern: .random, offset: 0, size: 8 * MiB, rateBytesPerSecond: 8 * MiB, seed: 11),
            VCPUWorkload(kind: .check, pattern: .sequential, offset: 16 * MiB, size: 8 * MiB, rateBytesPerSecond: 2 * MiB, seed: 12),
            VCPUWorkload(kind: .write, pattern: .sequential, offset: 32 * MiB, size: 64 * MiB, rateBytesPerSecond: 512 * MiB,
                         passes: 1, seed: 13),
        ]
        let machine = try Machine(MachineConfiguration(memorySize: 128 * MiB, vcpuCount: workloads.count,
                                                       workloads: workloads, tracking: .ring), kvm: kvm)
        try machine.start()
        machine.waitForGuest()
        XCTAssertTrue(waitUntil(10) { machine.guestStats().vcpus[2].passes >= 1 }, "the filler must finish its pass")
        return machine
    }

    private func replicate(_ machine: Machine, to endpoint: HostPort, reprotectFor: Double) throws -> Replicator {
        var options = ReplicationOptions(standby: endpoint)
        options.intervalSeconds = 0.025
        options.reprotectForSeconds = reprotectFor
        XCTAssertNil(machine.transferClaim.claim("replication"))
        let replicator = Replicator(machine: machine, options: options)
        let figures = replicator.start()
        XCTAssertEqual(figures.status, .protected, "replication did not start: \(figures.error ?? "?")")
        return replicator
    }

    private func waitUntil(_ timeout: Double, _ condition: () -> Bool) -> Bool {
        let deadline = MonotonicClock.seconds() + timeout
        while MonotonicClock.seconds() < deadline {
            if condition() { return true }
            usleep(5_000)
        }
        return condition()
    }

    /// A manual standby cut off past --failover-after waits for `failover` (it no longer reads
    /// the old connection), and the primary reports unprotected. When the link returns, the
    /// primary protects the VM again by itself: the standby, greeted as the same replication,
    /// drops the old connection and takes only what changed since its checkpoint, never taking
    /// over. Its copy is then exactly the VM: after a later failover the check workloads find
    /// no page stale, torn or lost.
    func testAManualStandbyCutOffIsProtectingAgainWithWhatChanged() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let standby = try ReplicationTests.Standby(kvm, options: StandbyOptions(failover: .manual, failoverAfterSeconds: 0.2))
        let relay = try FaultRelay(to: standby.receiver.port, servesMany: true)
        let replicator = try replicate(source, to: relay.endpoint, reprotectFor: 30)
        defer { replicator.stop() }
        Thread.sleep(forTimeInterval: 0.5)
        let session = try XCTUnwrap(standby.receiver.standbySession)
        let initialBytes = replicator.figures.initialBytes

        relay.stall()
        relay.setDown(true)
        XCTAssertTrue(waitUntil(10) { replicator.figures.status == .unprotected }, "the primary must report the loss")
        XCTAssertTrue(waitUntil(5) { session.json["phase"]?.stringValue == "primary lost, awaiting failover" })
        Thread.sleep(forTimeInterval: 0.5)   // the guest dirties pages while nothing is protected
        XCTAssertTrue(replicator.isReprotecting)

        relay.restore()
        let restored = MonotonicClock.seconds()
        XCTAssertTrue(waitUntil(10) { replicator.figures.status == .protected }, "protected again: \(replicator.figures.error ?? "?")")
        let took = MonotonicClock.seconds() - restored
        let figures = replicator.figures
        let last = try XCTUnwrap(figures.lastReprotect)
        print("resume: protected again \(Int(took * 1000)) ms after the link returned; \(last.delta ? "delta" : "full") of \(last.pages) pages, \(last.bytes) bytes (\(Int(last.seconds * 1000)) ms from the dial), against \(initialBytes) bytes for the initial copy: \(String(format: "%.3f", Double(last.bytes) / Double(initialBytes)))")
        XCTAssertTrue(last.delta, "the standby held a checkpoint: only what changed goes (\(last.fullBecause ?? "?"))")
        XCTAssertLessThan(Double(last.bytes), 0.3 * Double(initialBytes), "a resync sends what changed, not the VM")
        XCTAssertEqual(figures.reprotections, 1)
        XCTAssertEqual(figures.reprotectDeltas, 1)
        XCTAssertNil(figures.error)
        XCTAssertNil(standby.next(timeout: 0.1), "the standby took over a VM whose primary lives")
        XCTAssertTrue(session === standby.receiver.standbySession, "the same replication goes on at the standby")
        XCTAssertEqual(session.json["resumes"]?.doubleValue, 1)
        let json = figures.json
        XCTAssertEqual(json["last_reprotect"]?["kind"]?.stringValue, "delta")
        XCTAssertEqual(json["reprotect_deltas"]?.doubleValue, 1)

        // Checkpoints flow on the new connection.
        let acknowledged = figures.checkpointsAcknowledged
        XCTAssertTrue(waitUntil(5) { replicator.figures.checkpointsAcknowledged > acknowledged + 10 })
        XCTAssertEqual(session.json["phase"]?.stringValue, "protecting")

        // The copy is the VM: the link goes for good, an operator fails over, and the check
        // workloads run on the standby's copy without finding a wrong page.
        relay.setDown(true)
        relay.cut()
        XCTAssertTrue(waitUntil(5) { session.json["phase"]?.stringValue == "primary lost, awaiting failover" })
        _ = try session.requestFailover(force: false)
        guard case .success(let taken)? = standby.next(timeout: 5) else { return XCTFail("failover did not resume the VM") }
        defer { taken.stop() }
        let passes = taken.guestStats().vcpus.map(\.passes)
        XCTAssertTrue(waitUntil(30) { zip(taken.guestStats().vcpus.map(\.passes), passes).prefix(2).allSatisfy { $0 >= $1 + 2 } },
                      "the check workloads must run on the standby")
        let after = taken.guestStats().vcpus
        print("after the failover: passes \(passes) -> \(after.map(\.passes)), errors \(after.map(\.errors))")
        XCTAssertEqual(after.prefix(2).map(\.errors), [0, 0], "the resynced copy had stale, torn or lost pages")
        XCTAssertEqual(source.guestStats().vcpus.prefix(2).map(\.errors), [0, 0])
    }

    /// A resume is refused with its kind: to a standby that follows no replication ("nothing to
    /// resume": the primary starts afresh), and for another replication than the one followed
    /// (busy, and the replication followed goes on undisturbed).
    func testAResumeIsRefusedWhereNothingOfItsReplicationIsHeld() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let standby = try ReplicationTests.Standby(kvm, options: StandbyOptions(failover: .auto, failoverAfterSeconds: 5))
        let endpoint = HostPort(host: "127.0.0.1", port: standby.receiver.port)

        func resume(_ session: SessionID) throws -> MigrationHelloReply {
            let socket = try TCPSocket.connect(endpoint, timeout: 5)
            defer { socket.shutdown() }
            socket.setTimeouts(send: 5, receive: 5)
            let channel = MigrationChannel(transport: socket)
            var hello = MigrationHello(announcing: source)
            hello.replicate = true
            hello.resume = true
            hello.session = session
            try channel.send(.hello, hello.encode())
            return try channel.receive(.helloReply, MigrationHelloReply.init(decoding:))
        }

        let nothing = try resume(.random())
        XCTAssertFalse(nothing.accepted)
        XCTAssertEqual(nothing.refusal, .nothingToResume, nothing.reason)
        XCTAssertTrue(nothing.reason.contains("start the replication afresh"), nothing.reason)
        XCTAssertNil(nothing.heldEpoch)

        let replicator = try replicate(source, to: endpoint, reprotectFor: 0)
        defer { replicator.stop() }
        let followed = try XCTUnwrap(standby.receiver.standbySession)
        let other = try resume(.random())
        XCTAssertFalse(other.accepted)
        XCTAssertEqual(other.refusal, .other, other.reason)
        XCTAssertTrue(other.reason.contains("follows replication \(followed.replication)"), other.reason)
        let acknowledged = replicator.figures.checkpointsAcknowledged
        XCTAssertTrue(waitUntil(5) { replicator.figures.checkpointsAcknowledged > acknowledged + 5 }, "the replication followed goes on")
        XCTAssertEqual(replicator.figures.status, .protected)
        XCTAssertEqual(followed.json["resumes"]?.doubleValue, 0)
        XCTAssertEqual(followed.json["phase"]?.stringValue, "protecting")
    }

    /// What the primary remembers for a resync: the pages of each checkpoint not acknowledged,
    /// bounded, and why a standby gets the whole VM instead.
    func testTheLedgerNamesWhatChangedSinceACheckpointOrWhyItCannot() {
        var ledger = CheckpointLedger(capacity: 3)
        XCTAssertEqual(ledger.changed(since: 5, pageCount: 64), .failure(.unknownEpoch(5)), "nothing started yet")
        ledger.started(at: 5)
        ledger.record(epoch: 6, pages: [1, 2])
        ledger.record(epoch: 7, pages: [2, 3])
        ledger.addUnsent([9])
        XCTAssertEqual(try ledger.changed(since: 5, pageCount: 64).get().pageList(), [1, 2, 3, 9])
        XCTAssertEqual(try ledger.changed(since: 6, pageCount: 64).get().pageList(), [2, 3, 9], "6 committed, its ack lost")
        XCTAssertEqual(ledger.changed(since: 4, pageCount: 64), .failure(.unknownEpoch(4)))
        XCTAssertEqual(ledger.changed(since: 8, pageCount: 64), .failure(.unknownEpoch(8)), "never sent")
        XCTAssertEqual(ledger.changed(since: nil, pageCount: 64), .failure(.nothingHeld))
        ledger.acknowledge(6)
        XCTAssertEqual(try ledger.changed(since: 6, pageCount: 64).get().pageList(), [2, 3, 9])
        XCTAssertEqual(ledger.changed(since: 5, pageCount: 64), .failure(.unknownEpoch(5)), "older than acknowledged")
        ledger.record(epoch: 8, pages: [4])
        ledger.record(epoch: 9, pages: [5])
        ledger.record(epoch: 10, pages: [6])   // four unacknowledged: over capacity, the oldest forgotten
        XCTAssertEqual(ledger.changed(since: 9, pageCount: 64), .failure(.dirtyInformationLost))
        ledger.started(at: 12)
        XCTAssertEqual(try ledger.changed(since: 12, pageCount: 64).get().pageList(), [])
        ledger.forget()
        XCTAssertEqual(ledger.changed(since: 12, pageCount: 64), .failure(.dirtyInformationLost))
    }
}
