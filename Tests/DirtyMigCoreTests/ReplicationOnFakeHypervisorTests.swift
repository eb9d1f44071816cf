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
    func testCheckpointsCarryTheEpochsDirtyPagesAndTheStandbyResumesAnEqualCopy() throws {
        let primaryHypervisor = FakeHypervisor(), standbyHypervisor = FakeHypervisor()
        let primary = try Machine.onFake(primaryHypervisor)
        defer { primary.stop() }
        let tracker = try XCTUnwrap(primaryHypervisor.vms.first?.tracker)
        let memory = primary.memory
        let base = Int(GuestLayout.workloadBase / 4096)
        PreCopyOnFakeHypervisorTests.write(Array(base..<base + 512), pass: 0, into: memory)
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
        let takenOver = Mutex<Result<Machine, MigrationError>?>(nil)
        let standby = OSThread(name: "fake-standby") {
            let outcome: Result<Machine, MigrationError>
            do throws(MigrationError) { outcome = .success(try receiver.receiveOne()) } catch { outcome = .failure(error) }
            takenOver.withLock { $0 = outcome }
        }
        var options = ReplicationOptions(standby: relay.endpoint)
        options.intervalSeconds = 0.02
        // One collection per epoch, in its pause: each checkpoint is one scripted set.
        options.stagesWhileRunning = false
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
        standby.join()
        guard case .success(let copy)? = takenOver.withLock({ $0 }) else {
            return XCTFail("the standby did not take over: \(String(describing: takenOver.withLock { $0 }))")
        }
        defer { copy.stop() }
        XCTAssertEqual(memcmp(primary.memory.base, copy.memory.base, Int(primary.memory.size)), 0,
                       "the standby's copy is the primary's memory at its last acknowledged checkpoint")
        XCTAssertEqual(try XCTUnwrap(standbyHypervisor.vms.last).vcpus.first?.events.first, "restored")
        _ = replicator.stop()
    }
}

private extension Array where Element: Hashable {
    /// The elements in order, each once.
    func uniqued() -> [Element] {
        var seen = Set<Element>()
        return filter { seen.insert($0).inserted }
    }
}
