@testable import DirtyMigCore
import Foundation
import XCTest

/// The guest's recent pace is at hand: a migration's report takes it without sleeping through a
/// measuring window first, and it agrees with a pace measured directly.
final class GuestPaceHistoryTests: XCTestCase {
    func testTheRecentPaceIsAtHandAndAgreesWithAMeasuredOne() throws {
        let kvm = try requireKVM()
        let machine = try Machine(MachineConfiguration(memorySize: 128 * MiB, vcpuCount: 2,
                                                       workloads: [writer(16 * MiB, rate: 20 * MiB), .idle],
                                                       tracking: .ring), kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        Thread.sleep(forTimeInterval: 1.0)

        let asked = MonotonicClock.nanoseconds()
        let recent = machine.pace.recentPace()
        let waited = MonotonicClock.nanoseconds() - asked
        XCTAssertLessThan(waited, GuestPaceHistory.windowNanoseconds / 5, "the pace must come from the samples, not a new window")

        let first = machine.guestStats().vcpus.map(\.pages)
        let start = MonotonicClock.nanoseconds()
        Thread.sleep(forTimeInterval: 0.5)
        let seconds = Double(MonotonicClock.nanoseconds() - start) / 1e9
        let measured = zip(machine.guestStats().vcpus.map(\.pages), first).map { Double($0 &- $1) / seconds }
        print("recent pace \(recent.map { Int($0) }) pages/s (in \(waited / 1000) µs), measured \(measured.map { Int($0) })")
        // A writer paced at 20 MiB/s: 5,120 pages/s either way; the idle vCPU writes nothing.
        XCTAssertEqual(recent[0], measured[0], accuracy: measured[0] * 0.25)
        XCTAssertEqual(recent[0], 5120, accuracy: 5120 * 0.25)
        XCTAssertEqual(recent[1], 0)

        // A stopped VM's timer is gone; its last samples still answer.
        machine.stop()
        XCTAssertEqual(machine.pace.recentPace().count, 2)
    }
}
