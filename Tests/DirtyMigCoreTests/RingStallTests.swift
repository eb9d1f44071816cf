@testable import DirtyMigCore
import Foundation
import XCTest

/// The harvester can fall behind (the host deschedules it, a migration holds the tracker busy):
/// rings then fill, or overrun, while their vCPUs run. However often that happens, every vCPU
/// must get back into its guest. (This is the test that caught a recovery which, by marking an
/// entry past the kernel's push index, wrapped its used count and kept a vCPU out for good.)
final class RingStallTests: XCTestCase {
    func testRepeatedStallsNeverStickAVCPU() throws {
        let kvm = try requireKVM()
        let configuration = MachineConfiguration(
            memorySize: 256 * MiB, vcpuCount: 2,
            workloads: [writer(96 * MiB, rate: 0, pattern: .random, offset: 16 * MiB),
                        writer(96 * MiB, rate: 0, pattern: .random, offset: 128 * MiB)],
            tracking: .ring, ringEntries: 4096)
        let machine = try Machine(configuration, kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        let tracker = try XCTUnwrap(machine.ringTracker)

        var lossesSeen = 0
        for cycle in 0..<25 {
            tracker.stallHarvester(nanoseconds: UInt64(20 + (cycle * 37) % 90) * 1_000_000)
            Thread.sleep(forTimeInterval: 0.15)
            lossesSeen += try tracker.collect().losses.count
            let before = machine.guestStats().vcpus.map(\.pages)
            Thread.sleep(forTimeInterval: 0.25)
            let after = machine.guestStats().vcpus.map(\.pages)
            for vcpu in 0..<2 where after[vcpu] <= before[vcpu] + 100 {
                let counters = tracker.counters()
                XCTFail("cycle \(cycle): vCPU \(vcpu) stuck (guest pages \(before[vcpu]) -> \(after[vcpu])); ring-full exits \(counters.ringFullExits ?? []), overruns \(counters.ringOverruns ?? [])")
                return
            }
        }
        let counters = tracker.counters()
        print("25 stalls: losses reported \(lossesSeen); ring-full exits \(counters.ringFullExits ?? []), overruns \(counters.ringOverruns ?? [])")
        // Whether a stall loses anything depends on how late the kernel's ring-full exit comes;
        // what matters is that it never sticks a vCPU, and that ring-full exits happened.
        XCTAssertGreaterThan((counters.ringFullExits ?? []).reduce(0, +), 0, "stalls of 20-110 ms must fill a 4096-entry ring")
        XCTAssertNil(machine.events.firstFailure)
    }
}
