import CKVM

/// The CPU state a multiboot loader hands to a kernel (Multiboot 0.6.96 §3.2), set on the boot
/// vCPU so that our VMM starts the guest exactly as QEMU's `-kernel` does: 32-bit protected mode,
/// flat 4 GiB segments, paging off, EAX = 0x2BADB002, EBX = boot information (we pass none: the
/// guest takes everything from its config block). The other vCPUs stay in KVM's wait-for-SIPI
/// state; the guest starts them through its local APIC.
enum MultibootEntry {
    static let bootloaderMagic: UInt64 = 0x2BAD_B002

    static func configure<VCPU: HypervisorVCPU>(_ vcpu: VCPU, entry: UInt64) throws(KVMError) {
        var sregs = try vcpu.getSpecialRegisters()
        func flat(_ selector: UInt16, type: UInt8) -> kvm_segment {
            var segment = kvm_segment()
            segment.base = 0
            segment.limit = 0xFFFF_FFFF
            segment.selector = selector
            segment.type = type
            segment.present = 1
            segment.dpl = 0
            segment.db = 1
            segment.s = 1
            segment.l = 0
            segment.g = 1
            return segment
        }
        sregs.cs = flat(0x08, type: 0x0B)          // execute/read, accessed
        let data = flat(0x10, type: 0x03)          // read/write, accessed
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.cr0 = 0x11                           // PE | ET; paging off, caches on
        sregs.cr4 = 0
        sregs.efer = 0
        try vcpu.setSpecialRegisters(sregs)

        var regs = kvm_regs()
        regs.rip = entry
        regs.rax = bootloaderMagic
        regs.rbx = 0
        regs.rflags = 0x2
        try vcpu.setRegisters(regs)
    }
}
