import DirtyMigCore
import Foundation
import XCTest

/// A VM's memory goes when the VM goes, in every tracking mode, run or never started: a
/// receiver that drops a partial VM, or a process that runs many VMs one after another, must
/// not keep their RAM. (The ring tracker's kick once closed a cycle through the vCPU runners
/// and kept each ring-tracked VM's memory for the life of the process.)
final class MachineReleaseTests: XCTestCase {
    func testAVMsMemoryIsReleasedWithIt() throws {
        let kvm = try requireKVM()
        for tracking in [nil, TrackingMode.bitmap, .ring, .quota] {
            for runs in [false, true] {
                weak var memory: GuestMemory?
                do {
                    let machine = try Machine(MachineConfiguration(memorySize: 64 * MiB, vcpuCount: 1,
                                                                   workloads: [writer(8 * MiB, rate: 0, pattern: .random)],
                                                                   tracking: tracking), kvm: kvm)
                    memory = machine.memory
                    if runs {
                        try machine.start()
                        machine.waitForGuest()
                        Thread.sleep(forTimeInterval: 0.1)
                        machine.stop()
                    }
                }
                // The vCPU and harvester threads let go of what they captured as they end.
                let deadline = Date().addingTimeInterval(2)
                while memory != nil && Date() < deadline { usleep(10_000) }
                XCTAssertNil(memory, "tracking \(tracking?.rawValue ?? "none"), \(runs ? "ran" : "never started"): its memory outlived it")
            }
        }
    }
}
