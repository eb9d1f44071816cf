import DirtyMigCore
import Foundation
import XCTest

/// What users see when things go wrong: no KVM, a guest that dies, a guest that reports an error.
final class VMFailureTests: XCTestCase {
    func testMissingDeviceSaysWhatToDo() {
        XCTAssertThrowsError(try KVMSystem(path: "/nonexistent/kvm")) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("does not exist"), text)
            XCTAssertTrue(text.contains("modprobe"), text)
        }
    }

    func testTripleFaultIsReportedWithRegisters() throws {
        let kvm = try requireKVM()
        let machine = try Machine(MachineConfiguration(memorySize: 64 * MiB, vcpuCount: 1, workloads: [.idle], tracking: nil), kvm: kvm)
        // ud2 at the entry point: with no IDT the #UD escalates to a triple fault (KVM_EXIT_SHUTDOWN).
        machine.memory.write([0x0F, 0x0B], at: GuestImage.workload.entryAddress)
        try machine.start()
        defer { machine.stop() }
        let failure = try XCTUnwrap(machine.events.waitForFailure(timeout: 10))
        let text = "\(failure)"
        print(text)
        XCTAssertTrue(text.contains("vCPU 0 stopped: the guest shut down (triple fault)"), text)
        XCTAssertTrue(text.contains("rip=0x"), "the registers are shown: \(text)")
    }

    func testGuestReportsABadConfigBlock() throws {
        let kvm = try requireKVM()
        let machine = try Machine(MachineConfiguration(memorySize: 64 * MiB, vcpuCount: 1, workloads: [.idle], tracking: nil), kvm: kvm)
        machine.memory.write([UInt8](repeating: 0, count: 64), at: GuestLayout.configAddress)
        try machine.start()
        defer { machine.stop() }
        let failure = try XCTUnwrap(machine.events.waitForFailure(timeout: 10))
        XCTAssertTrue("\(failure)".contains("no config block"), "\(failure)")
        XCTAssertEqual(machine.guestStats().error, .badConfigMagic)
    }

    func testNeverWrittenMemoryIsAHole() throws {
        let kvm = try requireKVM()
        let machine = try Machine(MachineConfiguration(memorySize: 256 * MiB, vcpuCount: 1,
                                                       workloads: [writer(8 * MiB, rate: 0)], tracking: .ring), kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        let data = machine.memory.dataRanges().reduce(UInt64(0)) { $0 + ($1.upperBound - $1.lowerBound) }
        print("populated: \(data >> 20) MiB of 256 MiB")
        XCTAssertLessThan(data, 32 * MiB, "only the system area and the working set hold data; the rest is holes")
        XCTAssertGreaterThanOrEqual(data, 8 * MiB)
    }
}
