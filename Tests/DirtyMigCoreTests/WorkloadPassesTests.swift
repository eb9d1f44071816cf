import DirtyMigCore
import Foundation
import XCTest

/// `passes=N` on real KVM: a vCPU does exactly N passes over its working set, reports itself
/// finished, asks to be parked (port 0x5D4), and from then on dirties nothing and is left out
/// of the CPU, while pause and resume still work for the whole VM.
final class WorkloadPassesTests: XCTestCase {
    func testFinishedVCPUsStopWritingAndPark() throws {
        let kvm = try requireKVM()
        let configuration = MachineConfiguration(
            memorySize: 128 * MiB, vcpuCount: 2,
            workloads: [VCPUWorkload(kind: .write, offset: 0, size: 16 * MiB, passes: 1, seed: 1),
                        VCPUWorkload(kind: .mix, pattern: .random, writePercent: 25, offset: 16 * MiB, size: 16 * MiB,
                                     passes: 2, seed: 2)],
            tracking: .ring)
        let machine = try Machine(configuration, kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()

        let deadline = MonotonicClock.seconds() + 20
        while machine.guestStats().vcpus.contains(where: { $0.state != .finished }) && MonotonicClock.seconds() < deadline {
            usleep(10_000)
        }
        let finished = machine.guestStats().vcpus
        XCTAssertEqual(finished.map(\.state), [.finished, .finished], "both vCPUs finish their passes")
        let pagesPerPass: UInt64 = 16 * MiB / 4096
        XCTAssertEqual(finished[0].passes, 1)
        XCTAssertEqual(finished[0].pages, pagesPerPass, "one pass touches every page of the working set once")
        XCTAssertEqual(finished[0].writes, pagesPerPass)
        XCTAssertEqual(finished[1].passes, 2)
        XCTAssertEqual(finished[1].pages, 2 * pagesPerPass)
        XCTAssertEqual(finished[1].writes, 2 * pagesPerPass * 25 / 100, "mix writes exactly its share")

        // The writer dirtied its whole working set; once finished, nobody dirties anything.
        let done = try machine.counterSnapshot()
        XCTAssertGreaterThanOrEqual(done.vcpuDirtyPages?[0] ?? 0, pagesPerPass)
        Thread.sleep(forTimeInterval: 0.5)
        let later = try machine.counterSnapshot()
        XCTAssertEqual(later.totalDirtyPages, done.totalDirtyPages, "finished vCPUs write nothing more")
        XCTAssertEqual(later.guestPages, done.guestPages)

        // Parked vCPUs count as out of the guest: pausing returns, and resuming keeps them parked.
        machine.pause()
        machine.resume()
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertNil(machine.events.firstFailure)
        XCTAssertEqual(machine.guestStats().vcpus.map(\.state), [.finished, .finished])
    }
}
