import DirtyMigCore
import Foundation
import XCTest

/// Boots the workload guest on real KVM in each tracking mode and checks that the dirty rate
/// the tracker measures matches the rate the guest was told to write at.
/// 1 GiB, 2 vCPUs: vCPU 0 writes 512 MiB sequentially at a paced rate, vCPU 1 reads 256 MiB.
final class TrackingRateTests: XCTestCase {
    private func measure(track: TrackingMode, rate: UInt64, intervals: Int = 3) throws
        -> (reports: [DirtyRateReport], machine: Machine) {
        let kvm = try requireKVM()
        let configuration = MachineConfiguration(
            memorySize: 1 * GiB, vcpuCount: 2,
            workloads: [writer(512 * MiB, rate: rate), reader(256 * MiB, offset: 512 * MiB)],
            tracking: track)
        let machine = try Machine(configuration, kvm: kvm)
        try machine.start()
        machine.waitForGuest()
        Thread.sleep(forTimeInterval: 1.0)   // first interval: the guest settles into its pace
        var previous = try machine.counterSnapshot()
        var reports: [DirtyRateReport] = []
        for _ in 0..<intervals {
            Thread.sleep(forTimeInterval: 1.0)
            let next = try machine.counterSnapshot()
            reports.append(DirtyRateReport.between(previous, next, mode: DirtyRateMode.best(for: track)))
            previous = next
        }
        XCTAssertNil(machine.events.firstFailure)
        return (reports, machine)
    }

    /// What a test can claim from one run: the tracker counts what the guest wrote (the guest's
    /// own counter is the reference, whatever pace it managed on this machine), a paced guest
    /// never exceeds its rate, and a reading vCPU does not look like a writer. Whether the guest
    /// reaches its configured rate depends on the machine: `dirtymig-bench accuracy` reports it.
    private func checkPerVCPU(track: TrackingMode, rateMiB: UInt64) throws {
        let (reports, machine) = try measure(track: track, rate: rateMiB * MiB)
        defer { machine.stop() }
        for report in reports {
            let writer = try XCTUnwrap(report.vcpus[0].dirtyMiBPerSecond)
            let reader = try XCTUnwrap(report.vcpus[1].dirtyMiBPerSecond)
            let guest = report.vcpus[0].guestPagesPerSecond * 4096 / Double(MiB)
            print("\(track) @\(rateMiB) MiB/s: vCPU0 tracked \(writer) MiB/s, guest wrote \(guest) MiB/s; vCPU1 \(reader) MiB/s")
            XCTAssertEqual(writer, guest, accuracy: max(guest * 0.05, 0.05), "\(track): tracked vs the guest's own counter")
            XCTAssertLessThanOrEqual(guest, Double(rateMiB) * 1.05, "the paced guest must not exceed its rate")
            XCTAssertLessThan(reader, 1.0, "\(track) reading vCPU 1")
        }
        let counters = try XCTUnwrap(machine.tracker?.counters())
        XCTAssertEqual(counters.ringOverruns?.reduce(0, +), 0, "no ring overrun with a 1 ms harvester")
    }

    private func checkVMWide(rateMiB: UInt64) throws {
        let (reports, machine) = try measure(track: .bitmap, rate: rateMiB * MiB)
        defer { machine.stop() }
        for report in reports {
            let guest = report.vcpus[0].guestPagesPerSecond * 4096 / Double(MiB)
            print("bitmap @\(rateMiB) MiB/s: total \(report.totalMiBPerSecond) MiB/s, guest wrote \(guest) MiB/s")
            XCTAssertEqual(report.totalMiBPerSecond, guest, accuracy: max(guest * 0.05, 0.05), "bitmap: tracked vs the guest's counter")
            XCTAssertLessThanOrEqual(guest, Double(rateMiB) * 1.05, "the paced guest must not exceed its rate")
            XCTAssertNil(report.vcpus[0].dirtyMiBPerSecond, "bitmap mode has no per-vCPU figures")
        }
    }

    func testRingAt10MiB() throws { try checkPerVCPU(track: .ring, rateMiB: 10) }
    func testRingAt100MiB() throws { try checkPerVCPU(track: .ring, rateMiB: 100) }
    func testRingAt400MiB() throws { try checkPerVCPU(track: .ring, rateMiB: 400) }
    func testQuotaAt10MiB() throws { try checkPerVCPU(track: .quota, rateMiB: 10) }
    func testQuotaAt100MiB() throws { try checkPerVCPU(track: .quota, rateMiB: 100) }
    func testQuotaAt400MiB() throws { try checkPerVCPU(track: .quota, rateMiB: 400) }
    func testBitmapAt10MiB() throws { try checkVMWide(rateMiB: 10) }
    func testBitmapAt100MiB() throws { try checkVMWide(rateMiB: 100) }
    func testBitmapAt400MiB() throws { try checkVMWide(rateMiB: 400) }
}
