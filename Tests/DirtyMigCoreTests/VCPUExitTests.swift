import CKVM
import DirtyMigCore
import Foundation
import XCTest

/// On real KVM: port I/O and MMIO exits carry their data, where KVM keeps it, and what the host
/// writes into a read's data is what the guest reads.
final class VCPUExitTests: XCTestCase {
    /// A tiny real-mode guest in 64 KiB of RAM writes a byte past its RAM, reads the next one
    /// back, and writes what it read to port 0x80.
    func testExitsCarryTheirData() throws {
        let kvm = try requireKVM()
        let vm = try kvm.createVM()
        let memory = try GuestMemory(size: 64 * 1024)
        try vm.setMemorySlots(of: memory, logDirtyPages: false)
        memory.write([0xC6, 0x06, 0x00, 0x00, 0x42,   // mov byte [ds:0], 0x42
                      0xA0, 0x01, 0x00,               // mov al, [ds:1]
                      0xE6, 0x80,                     // out 0x80, al
                      0xEB, 0xFE], at: 0x1000)        // jmp $
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(kvm.supportedCPUID())
        var sregs = try vcpu.getSpecialRegisters()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        sregs.ds.base = 0x2_0000   // past the end of RAM: MMIO
        sregs.ds.selector = 0x2000
        try vcpu.setSpecialRegisters(sregs)
        var regs = kvm_regs()
        regs.rip = 0x1000
        regs.rflags = 2
        try vcpu.setRegisters(regs)

        let write = try vcpu.runOnce()
        guard case .mmioWrite(0x2_0000, let written) = write else { return XCTFail("expected an MMIO write, got \(write)") }
        XCTAssertEqual(Array(written.bytes), [0x42])
        XCTAssertEqual(written.elementSize, 1)
        print("exit: \(write)")   // now: its data is valid until the next KVM_RUN

        let read = try vcpu.runOnce()
        guard case .mmioRead(0x2_0001, let into) = read, into.bytes.count == 1 else { return XCTFail("expected an MMIO read, got \(read)") }
        into.bytes[0] = 0x99

        let out = try vcpu.runOnce()
        guard case .ioOut(0x80, let data) = out else { return XCTFail("expected an OUT, got \(out)") }
        XCTAssertEqual(Array(data.bytes), [0x99], "the guest read what the host put in the MMIO read's data")
        print("exits: \(read) (filled with 0x99), \(out)")
    }
}
