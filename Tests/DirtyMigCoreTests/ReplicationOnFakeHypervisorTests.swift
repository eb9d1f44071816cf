@testable import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import Synchronization
import XCTest

/// Continuous replication of a Machine on the fake hypervisor to a standby on another, over
/// loopback through a relay: the test decides which pages the guest dirties in each epoch, each
/// checkpoint carries exactly those, and after the link is cut the standby resumes a VM whose
/// memory is the primary's. No /dev/kvm.
final class ReplicationOnFakeHypervisorTests: XCTestCase {
    /// A primary on the fake hypervisor (not started) whose first `pages` pages from the
    /// workload's base hold data; its tracker, and that base page.
    private func fakePrimary(writing pages: Int) throws -> (Machine, FakeTracker, Int) {
        let hypervisor = FakeHypervisor()
        let primary = try Machine.onFake(hypervisor)
        let tracker = try XCTUnwrap(hypervisor.vms.first?.tracker)
        let base = Int(GuestLayout.workloadBase / 4096)
        PreCopyOnFakeHypervisorTests.write(Array(base..<base + pages), pass: 0, into: primary.memory)
        return (primary, tracker, base)
    }

    func testCheckpointsCarryTheEpochsDirtyPagesAndTheStandbyResumesAnEqualCopy() throws {
        let standbyHypervisor = FakeHypervisor()
        let (primary, tracker, base) = try fakePrimary(writing: 512)
        defer { primary.stop() }
        let memory = primary.memory
        // Collection k (the initial copy's are 0 and 1, each epoch's one after) dirties 5k pages,
        // spread over the working set and beyond it, up to k = 30; then the guest writes nothing.
        let lastScripted = 30
        @Sendable func dirtied(_ index: Int) -> [Int] {
            guard (1...lastScripted).contains(index) else { return [] }
            return (0..<5 * index).map { base + ($0 * 37 + index * 11) % 4000 }.uniqued()
        }
        tracker.onCollect = { index in
            let pages = dirtied(index)
            PreCopyOnFakeHypervisorTests.write(pages, pass: UInt8(index), into: memory)
            return pages
        }
        try primary.start()

        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), hypervisor: standbyHypervisor,
                                                    standby: StandbyOptions(failover: .auto, failoverAfterSeconds: 0.3))
        defer { receiver.stop() }
        let relay = try FaultRelay(to: receiver.port)
        let standby = StandbyOutcome(receiver)
        var options = ReplicationOptions(standby: relay.endpoint)
        options.intervalSeconds = 0.02
        // One collection per epoch, in its pause: each checkpoint is one scripted set.
        options.stagesWhileRunning = false
        options.reprotectForSeconds = 0   // the standby takes over at the end: nothing to seek again
        XCTAssertNil(primary.transferClaim.claim("replication"))
        let replicator = Replicator(machine: primary, options: options)
        XCTAssertEqual(replicator.start().status, .protected, replicator.figures.error ?? "")

        // Until every scripted epoch is acknowledged, and two more after it (nothing left out).
        let deadline = MonotonicClock.seconds() + 20
        var acknowledgedAfterScript: UInt64?
        while MonotonicClock.seconds() < deadline {
            let acknowledged = replicator.figures.checkpointsAcknowledged
            if acknowledgedAfterScript == nil, tracker.collections.count > lastScripted + 1 { acknowledgedAfterScript = acknowledged }
            if let after = acknowledgedAfterScript, acknowledged >= after + 2 { break }
            usleep(5_000)
        }
        XCTAssertNotNil(acknowledgedAfterScript, "the scripted epochs did not all run in 20 s")
        let figures = replicator.figures
        let collections = tracker.collections
        print("fake replication: \(figures.checkpointsAcknowledged) checkpoints acknowledged, \(collections.count) collections, dirty pages max \(figures.dirtyPagesMax)")
        // The first checkpoint carries what the initial copy's last pass left (collection 1)
        // with its own epoch's (collection 2); every later one its epoch's alone.
        let largest = max(Set(collections[1] + collections[2]).count, collections.dropFirst(3).map(\.count).max() ?? 0)
        XCTAssertEqual(figures.dirtyPagesMax, Double(largest), "a checkpoint carries exactly its epoch's dirty pages")
        XCTAssertEqual(collections[lastScripted].count, dirtied(lastScripted).count)

        relay.cut()
        let copy = try standby.assertEqualCopy(of: primary, "the standby's copy is the primary's memory at its last acknowledged checkpoint")
        defer { copy.stop() }
        XCTAssertEqual(try XCTUnwrap(standbyHypervisor.vms.last).vcpus.first?.events.first, "restored")
        _ = replicator.stop()
    }
}

extension ReplicationOnFakeHypervisorTests {
    /// The standby's receiver stops (its process ended) and another listens on the same port:
    /// the primary, unprotected and seeking it, protects the VM again by itself, and the new
    /// standby's copy, once it takes over, is the primary's memory.
    func testAPrimaryProtectsItsVMAgainOnAStandbyStartedAgainOnTheSameAddress() throws {
        let (primary, tracker, base) = try fakePrimary(writing: 256)
        defer { primary.stop() }
        let memory = primary.memory
        // Every collection dirties a few pages, with the collection's number in them, until the
        // test says: the copy that takes over must hold the last ones.
        let writes = WritesUntil()
        tracker.onCollect = { index in
            guard index < writes.collection.load(ordering: .acquiring) else { return [] }
            let pages = (0..<8).map { base + (index * 8 + $0) % 1024 }
            PreCopyOnFakeHypervisorTests.write(pages, pass: UInt8(truncatingIfNeeded: index), into: memory)
            return pages
        }
        try primary.start()
        let options = StandbyOptions(failover: .auto, failoverAfterSeconds: 0.3)
        let first = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), hypervisor: FakeHypervisor(),
                                                 standby: options)
        let port = first.port
        let firstOutcome = OSThread(name: "fake-standby-1") { _ = try? first.receiveOne() }
        var replication = ReplicationOptions(standby: HostPort(host: "127.0.0.1", port: port))
        replication.intervalSeconds = 0.02
        replication.reprotectForSeconds = 10
        XCTAssertNil(primary.transferClaim.claim("replication"))
        let replicator = Replicator(machine: primary, options: replication)
        defer { replicator.stop() }
        XCTAssertEqual(replicator.start().status, .protected, replicator.figures.error ?? "")
        Thread.sleep(forTimeInterval: 0.2)

        first.stop()
        firstOutcome.join()
        let lostBy = MonotonicClock.seconds() + 5
        while replicator.figures.status == .protected && MonotonicClock.seconds() < lostBy { usleep(5_000) }
        let seeking = replicator.figures
        XCTAssertEqual(seeking.status, .unprotected)
        XCTAssertNotNil(seeking.reprotectSecondsLeft, "the primary seeks its standby again: \(seeking.error ?? "?")")
        XCTAssertFalse(replicator.isFinished)
        XCTAssertNotNil(primary.transferClaim.claim("a migration"), "a VM seeking its standby is not free to migrate")

        let standbyHypervisor = FakeHypervisor()
        let second = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: port), hypervisor: standbyHypervisor,
                                                  standby: options)
        defer { second.stop() }
        let secondOutcome = StandbyOutcome(second)
        let protectedBy = MonotonicClock.seconds() + 5
        while replicator.figures.status != .protected && MonotonicClock.seconds() < protectedBy { usleep(5_000) }
        let again = replicator.figures
        XCTAssertEqual(again.status, .protected, again.error ?? "")
        XCTAssertEqual(again.reprotections, 1)
        XCTAssertNil(again.reprotectSecondsLeft)
        let acknowledgedBy = MonotonicClock.seconds() + 5
        while replicator.figures.checkpointsAcknowledged < again.checkpointsAcknowledged + 3 && MonotonicClock.seconds() < acknowledgedBy {
            usleep(5_000)
        }
        XCTAssertGreaterThanOrEqual(replicator.figures.checkpointsAcknowledged, again.checkpointsAcknowledged + 3)

        // The new standby's copy is the VM: once the guest writes no more and that is
        // acknowledged, a takeover on request resumes a copy equal to the primary's memory.
        writes.collection.store(tracker.collections.count, ordering: .releasing)
        let settled = replicator.figures.checkpointsAcknowledged
        let settledBy = MonotonicClock.seconds() + 5
        while replicator.figures.checkpointsAcknowledged < settled + 3 && MonotonicClock.seconds() < settledBy { usleep(5_000) }
        let session = try XCTUnwrap(second.standbySession)
        _ = try session.requestFailover(force: true)
        let copy = try secondOutcome.assertEqualCopy(of: primary, "the new standby's copy is the primary's memory at its last checkpoint")
        defer { copy.stop() }
        let supersededBy = MonotonicClock.seconds() + 5
        while replicator.figures.status != .superseded && MonotonicClock.seconds() < supersededBy { usleep(5_000) }
        XCTAssertEqual(replicator.figures.status, .superseded, "a standby that took over is never protected against")
    }
}

extension ReplicationOnFakeHypervisorTests {
    /// A checkpoint whose pause lasts four times the standby's --failover-after (a loaded host
    /// stopping its vCPUs, or a resync copying every data page paused) is not silence: the
    /// primary's heartbeats go on from their own thread, and the standby keeps protecting.
    func testAPauseLongerThanFailoverAfterIsNotTakenForADeadPrimary() throws {
        let (primary, tracker, base) = try fakePrimary(writing: 64)
        defer { primary.stop() }
        let memory = primary.memory
        let slowCollection = Atomic<Int>(Int.max)
        tracker.onCollect = { index in
            // This collection runs in a checkpoint's pause (no staging while the epoch runs).
            if index == slowCollection.load(ordering: .acquiring) { Thread.sleep(forTimeInterval: 1.2) }
            let pages = [base + index % 64]
            PreCopyOnFakeHypervisorTests.write(pages, pass: UInt8(truncatingIfNeeded: index), into: memory)
            return pages
        }
        try primary.start()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), hypervisor: FakeHypervisor(),
                                                    standby: StandbyOptions(failover: .auto, failoverAfterSeconds: 0.3))
        defer { receiver.stop() }
        let standby = StandbyOutcome(receiver)
        var options = ReplicationOptions(standby: HostPort(host: "127.0.0.1", port: receiver.port))
        options.intervalSeconds = 0.02
        options.stagesWhileRunning = false
        options.reprotectForSeconds = 0
        XCTAssertNil(primary.transferClaim.claim("replication"))
        let replicator = Replicator(machine: primary, options: options)
        defer { replicator.stop() }
        XCTAssertEqual(replicator.start().status, .protected, replicator.figures.error ?? "")
        Thread.sleep(forTimeInterval: 0.2)
        let before = replicator.figures.checkpointsAcknowledged
        slowCollection.store(tracker.collections.count + 2, ordering: .releasing)
        // Past the slow pause, and a few checkpoints after it.
        let deadline = MonotonicClock.seconds() + 10
        while MonotonicClock.seconds() < deadline {
            if replicator.figures.pauseMaxMs >= 1_000, replicator.figures.checkpointsAcknowledged >= before + 5 { break }
            if standby.ended { break }
            usleep(10_000)
        }
        let figures = replicator.figures
        print("a \(Int(figures.pauseMaxMs)) ms pause against --failover-after 300 ms: standby phase \(receiver.standbySession?.json["phase"]?.stringValue ?? "none"), \(figures.checkpointsAcknowledged - before) checkpoints acknowledged since")
        XCTAssertGreaterThanOrEqual(figures.pauseMaxMs, 1_000, "the slow pause did not happen")
        XCTAssertEqual(figures.status, .protected, figures.error ?? "")
        XCTAssertFalse(standby.ended, "the standby took over from a primary that lives: \(standby.outcome)")
        XCTAssertEqual(receiver.standbySession?.json["phase"]?.stringValue, StandbySession.Phase.protecting.rawValue)
    }
}

/// A standby's `receiveOne` on a thread of its own: the VM it took over, once it did.
private final class StandbyOutcome: Sendable {
    private final class Slot: Sendable {
        let result = Mutex<Result<Machine, MigrationError>?>(nil)
    }
    private let slot = Slot()
    private let thread: OSThread

    init(_ receiver: MigrationReceiver) {
        let slot = self.slot
        thread = OSThread(name: "fake-standby") {
            let result: Result<Machine, MigrationError>
            do throws(MigrationError) { result = .success(try receiver.receiveOne()) } catch { result = .failure(error) }
            slot.result.withLock { $0 = result }
        }
    }

    /// Whether `receiveOne` returned (a takeover, or a replication that ended).
    var ended: Bool { slot.result.withLock { $0 != nil } }
    var outcome: String { slot.result.withLock { $0.map { "\($0)" } ?? "still receiving" } }

    /// Waits for the takeover; the copy it resumed must equal `primary`'s memory.
    func assertEqualCopy(of primary: Machine, _ message: String, file: StaticString = #filePath, line: UInt = #line) throws -> Machine {
        thread.join()
        let result = slot.result.withLock { $0 }
        let copy = try XCTUnwrap(try? result?.get(), "the standby did not take over: \(String(describing: result))", file: file, line: line)
        XCTAssertEqual(memcmp(primary.memory.base, copy.memory.base, Int(primary.memory.size)), 0, message, file: file, line: line)
        return copy
    }
}

/// The collection from which the fake guest writes nothing more.
private final class WritesUntil: Sendable {
    let collection = Atomic<Int>(Int.max)
}

private extension Array where Element: Hashable {
    /// The elements in order, each once.
    func uniqued() -> [Element] {
        var seen = Set<Element>()
        return filter { seen.insert($0).inserted }
    }
}
