import DirtyMigCore
import Foundation
import XCTest

/// `--track quota`: pages are charged per vCPU per interval; a vCPU past its quota is kicked
/// out of KVM_RUN and held until its interval ends (a quota exit). Enforcement policy is the
/// throttling work's; here: the mechanism exists, counts, and holds only the vCPU that writes.
final class QuotaTrackingTests: XCTestCase {
    func testQuotaExitsHoldOnlyTheWriter() throws {
        let kvm = try requireKVM()
        let machine = try Machine(MachineConfiguration(
            memorySize: 512 * MiB, vcpuCount: 2,
            workloads: [writer(256 * MiB, rate: 0), reader(64 * MiB, offset: 256 * MiB)],
            tracking: .quota), kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        let tracker = try XCTUnwrap(machine.ringTracker)
        Thread.sleep(forTimeInterval: 1)
        let free = try machine.counterSnapshot()
        Thread.sleep(forTimeInterval: 1)
        let freeEnd = try machine.counterSnapshot()
        let freeRate = DirtyRateReport.between(free, freeEnd, mode: .ring)

        // 20 pages per 10 ms interval = 2,000 pages/s, far below what the writer does unthrottled.
        tracker.setUserLimit(pagesPerSecond: 2_000, vcpu: 0)
        Thread.sleep(forTimeInterval: 1)
        let held = try machine.counterSnapshot()
        Thread.sleep(forTimeInterval: 2)
        let heldEnd = try machine.counterSnapshot()
        let heldRate = DirtyRateReport.between(held, heldEnd, mode: .ring)
        let exits = try XCTUnwrap(tracker.counters().quotaExits)
        print("writer: \(freeRate.vcpus[0].dirtyPagesPerSecond!) pages/s free, \(heldRate.vcpus[0].dirtyPagesPerSecond!) with a 2,000 pages/s quota; quota exits \(exits); reader guest pages/s \(freeRate.vcpus[1].guestPagesPerSecond) -> \(heldRate.vcpus[1].guestPagesPerSecond)")
        // A writer once made no progress here (free 66k pages/s, then 0, no quota exits) and it
        // did not reproduce: if it comes back, these say whether its ring was stuck.
        let counters = tracker.counters()
        print("ring-full exits \(counters.ringFullExits ?? []), overruns \(counters.ringOverruns ?? []), harvester error \(String(describing: tracker.harvestError)), vCPU failure \(String(describing: machine.events.firstFailure)), guest \(machine.guestStats().vcpus.map { ($0.pages, $0.state) })")
        XCTAssertGreaterThan(exits[0], 50, "the writer takes quota exits")
        XCTAssertEqual(exits[1], 0, "the reader has no quota and takes none")
        XCTAssertLessThan(heldRate.vcpus[0].dirtyPagesPerSecond!, freeRate.vcpus[0].dirtyPagesPerSecond! / 2)
        // The reader's pace is printed above, not asserted: it is an unpaced speed, which on a
        // host whose load varies differs between two windows for reasons of its own (issue 4's
        // benchmark compares throttled and unthrottled readers properly).

        tracker.setUserLimit(pagesPerSecond: nil, vcpu: 0)
        Thread.sleep(forTimeInterval: 0.5)
        let exitsAfter = try XCTUnwrap(tracker.counters().quotaExits)[0]
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(try XCTUnwrap(tracker.counters().quotaExits)[0], exitsAfter, "no quota, no exits")
    }
}
