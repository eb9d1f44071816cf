import CKVM
@testable import DirtyMigCore
import Foundation
import XCTest

/// A register on an I/O port whose value is the device's state: what the guest wrote last (a
/// dword), read back by IN. Its state travels with the VM's.
final class ScratchRegister: StatefulDevice, @unchecked Sendable {
    // @unchecked: `value` is guarded by `lock`.
    static let port: UInt16 = 0x510
    private let lock = NSLock()
    private var stored: UInt32 = 0
    var value: UInt32 { lock.withLock { stored } }

    var machineDevice: MachineDevice { MachineDevice(self, ports: [Self.port...Self.port]) }
    var stateID: String { "scratch" }
    var stateVersion: UInt16 { 1 }

    func read(_ access: DeviceAccess, into data: IOData) -> DeviceRequest {
        withUnsafeBytes(of: value.littleEndian) { data.bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0.prefix(data.bytes.count))) }
        return .none
    }

    func write(_ access: DeviceAccess, _ data: IOData) -> DeviceRequest {
        if let dword = data.firstDoubleWord { lock.withLock { stored = dword } }
        return .none
    }

    func saveState() -> [UInt8] { withUnsafeBytes(of: value.littleEndian, Array.init) }

    func restoreState(_ bytes: [UInt8], version: UInt16) throws(MachineStateError) {
        guard version == stateVersion else { throw .deviceRefused(id: stateID, reason: "version \(version), this one reads 1") }
        guard bytes.count == 4 else { throw .deviceRefused(id: stateID, reason: "\(bytes.count) bytes, not 4") }
        lock.withLock { stored = bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self)) } }
    }
}

/// A whole Machine on the fake hypervisor, without /dev/kvm: it boots the workload guest's image
/// and entry, its vCPU threads pause, resume and save, and its state (vCPUs, in-kernel and
/// userspace devices) moves into an incoming machine.
final class MachineOnFakeHypervisorTests: XCTestCase {
    func testAFreshMachineLoadsItsBootSourceAndPausesResumesAndSaves() throws {
        let hypervisor = FakeHypervisor()
        let machine = try Machine.onFake(hypervisor, vcpus: 2)
        defer { machine.stop() }
        let vm = try XCTUnwrap(hypervisor.vms.first)
        XCTAssertTrue(vm.installedMemory === machine.memory)
        XCTAssertEqual(vm.vcpus.map(\.id), [0, 1])
        // The workload guest's boot source: image at 1 MiB, config block, Multiboot entry on vCPU 0.
        let image = GuestImage.workload
        XCTAssertEqual(machine.memory.read(count: image.bytes.count, at: image.loadAddress), image.bytes)
        let config = try GuestConfig(decoding: machine.memory.read(count: GuestLayout.configHeaderSize + 2 * GuestLayout.configEntrySize,
                                                                 at: GuestLayout.configAddress))
        XCTAssertEqual(config.tscHz, FakeVCPU.tscKHz * 1000)
        XCTAssertEqual(config.vcpus.count, 2)
        XCTAssertEqual(vm.vcpus[0].registers.regs.rip, image.entryAddress)
        XCTAssertEqual(vm.vcpus[0].registers.regs.rax, MultibootEntry.bootloaderMagic)
        XCTAssertEqual(vm.vcpus[0].registers.sregs.cr0, 0x11)
        XCTAssertEqual(machine.tscHz, FakeVCPU.tscKHz * 1000)

        XCTAssertThrowsError(try machine.saveState(), "not paused yet")
        try machine.start()
        XCTAssertTrue(try XCTUnwrap(vm.tracker).started, "tracking starts with the machine")
        for vcpu in vm.vcpus { XCTAssertTrue(vcpu.waitUntilInGuest(), "vCPU \(vcpu.id) must enter the guest") }
        machine.pause()
        let first = try machine.saveState()
        XCTAssertEqual(first.vcpus.map(\.id), [0, 1])
        XCTAssertEqual(first.vcpus[0].regs.rip, image.entryAddress + 1, "vCPU 0 entered the guest once from its entry")
        XCTAssertEqual(first.vcpus[0].msrs.map(\.index), [MSREntry.tsc, 0x10])
        XCTAssertEqual(first.deviceStates, [], "the workload guest's ports have no state")
        machine.resume()
        for vcpu in vm.vcpus { XCTAssertTrue(vcpu.waitUntilInGuest()) }
        machine.pause()
        let second = try machine.saveState()
        XCTAssertGreaterThan(second.vcpus[0].regs.rip, first.vcpus[0].regs.rip, "resumed, it entered the guest again")
        machine.resume()
        XCTAssertNil(machine.events.firstFailure)
    }

    func testTheStateMovesIntoAnIncomingMachineDevicesIncluded() throws {
        let written = ExitBytes([0x78, 0x56, 0x34, 0x12], elementSize: 4)
        let source = FakeHypervisor(vcpu0Exits: [.ioOut(port: ScratchRegister.port, data: written.data)])
        let register = ScratchRegister()
        let machine = try Machine.onFake(source, extraDevices: [register.machineDevice])
        defer { machine.stop() }
        let sourceVM = try XCTUnwrap(source.vms.first)
        sourceVM.clock = 987_654_321
        try machine.start()
        for vcpu in sourceVM.vcpus { XCTAssertTrue(vcpu.waitUntilInGuest()) }
        machine.pause()
        let saved = try MachineState(decoding: machine.saveState().encode())
        XCTAssertEqual(register.value, 0x1234_5678, "the guest's OUT reached the device on the bus")
        XCTAssertEqual(saved.deviceStates, [DeviceState(id: "scratch", version: 1, bytes: [0x78, 0x56, 0x34, 0x12])])

        let destination = FakeHypervisor()
        let arrivedRegister = ScratchRegister()
        let incoming = try Machine.onFake(destination, extraDevices: [arrivedRegister.machineDevice], boot: .incoming)
        defer { incoming.stop() }
        let incomingVM = try XCTUnwrap(destination.vms.first)
        XCTAssertEqual(incoming.memory.read(count: 16, at: GuestImage.workload.loadAddress), [UInt8](repeating: 0, count: 16),
                       "an incoming machine's memory waits for the migration")
        XCTAssertThrowsError(try incoming.start(), "an incoming machine starts only once restored")
        try incoming.restoreState(saved)
        XCTAssertEqual(arrivedRegister.value, 0x1234_5678)
        XCTAssertEqual(incomingVM.clock, 987_654_321)
        for (arrived, left) in zip(incomingVM.vcpus, sourceVM.vcpus) {
            XCTAssertEqual(arrived.registers.regs.rip, left.registers.regs.rip)
            XCTAssertEqual(arrived.registers.sregs.cr0, left.registers.sregs.cr0)
        }
        try incoming.start()
        for vcpu in incomingVM.vcpus { XCTAssertTrue(vcpu.waitUntilInGuest()) }
        incoming.pause()
        let after = try incoming.saveState()
        XCTAssertEqual(after.vcpus[1].regs.rip, saved.vcpus[1].regs.rip + 1, "it goes on from the restored state")
        XCTAssertEqual(after.deviceStates, saved.deviceStates)
    }

    func testAStateWhoseDevicesAreNotThisMachinesIsRefusedBeforeAnythingIsRestored() throws {
        let machine = try Machine.onFake(FakeHypervisor())
        defer { machine.stop() }
        try machine.start()
        machine.pause()
        var saved = try machine.saveState()
        let destination = FakeHypervisor()
        let incoming = try Machine.onFake(destination, extraDevices: [ScratchRegister().machineDevice], boot: .incoming)
        XCTAssertThrowsError(try incoming.checkRestorable(saved)) { error in
            XCTAssertEqual("\(error)", "the saved state has the devices [], this VM [scratch]")
        }
        saved.deviceStates = [DeviceState(id: "scratch", version: 2, bytes: [0, 0, 0, 0])]
        XCTAssertNoThrow(try incoming.checkRestorable(saved))
        XCTAssertThrowsError(try incoming.restoreState(saved)) { error in
            XCTAssertEqual("\(error)", "device 'scratch' cannot take its saved state: version 2, this one reads 1")
        }
        // Two devices with one state id, or devices that overlap on the bus, are refused at build.
        XCTAssertThrowsError(try Machine.onFake(FakeHypervisor(), extraDevices: [ScratchRegister().machineDevice,
                                                                                 MachineDevice(ScratchRegister(), ports: [0x600...0x600])]))
        XCTAssertThrowsError(try Machine.onFake(FakeHypervisor(), extraDevices: [MachineDevice(ScratchRegister(), ports: [GuestLayout.consolePort...GuestLayout.consolePort])])) { error in
            XCTAssertTrue("\(error)".contains("overlap"), "\(error)")
        }
    }
}
