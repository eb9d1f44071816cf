import DirtyMigCore
import Foundation
import XCTest

/// `dirtyrate --mode sample` on real KVM: page hashing, no write protection, any tracking mode.
final class PageSamplingTests: XCTestCase {
    func testSampledRateWithin15Percent() throws {
        let kvm = try requireKVM()
        let configuration = MachineConfiguration(
            memorySize: 1 * GiB, vcpuCount: 2,
            workloads: [writer(512 * MiB, rate: 100 * MiB), reader(256 * MiB, offset: 512 * MiB)],
            tracking: .bitmap)
        let machine = try Machine(configuration, kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        Thread.sleep(forTimeInterval: 1.0)
        let sampler = PageSampler()
        let pages = sampler.choosePages(pageCount: machine.memory.pageCount)
        // The guest's own count interpolated to the sample's mean reading time.
        func sample() -> (PageSampler.Sample, Double) {
            let (hashes, guest) = MachineControl.sampleWithGuestCounters(machine, sampler: sampler, pages: pages)
            return (hashes, guest[0])
        }
        var (start, guestStart) = sample()
        for _ in 0..<3 {
            Thread.sleep(forTimeInterval: 1.0)
            let (end, guestEnd) = sample()
            let seconds = Double(end.timeNanoseconds - start.timeNanoseconds) / 1e9
            let sampled = PageSampler.dirtyPagesPerSecond(from: start, to: end, pageCount: machine.memory.pageCount) * 4096 / Double(MiB)
            let guest = (guestEnd - guestStart) / seconds * 4096 / Double(MiB)
            print("sampled \(sampled) MiB/s; the guest wrote \(guest) MiB/s (configured 100)")
            XCTAssertEqual(sampled, guest, accuracy: guest * 0.15, "sampling vs the guest's own counter")
            XCTAssertLessThanOrEqual(guest, 105, "the paced guest must not exceed its rate")
            (start, guestStart) = (end, guestEnd)
        }
    }

    func testHashingDoesNotPopulateHoles() throws {
        let memory = try GuestMemory(size: 64 * MiB)
        memory.write([1, 2, 3], at: 32 * MiB)
        let sampler = PageSampler(pagesPerGiB: 16384)
        _ = sampler.hash(memory, pages: sampler.choosePages(pageCount: memory.pageCount))
        let data = memory.dataRanges()
        XCTAssertEqual(data.count, 1)
        XCTAssertEqual(data.first.map { $0.upperBound - $0.lowerBound }, 4096)
    }
}
