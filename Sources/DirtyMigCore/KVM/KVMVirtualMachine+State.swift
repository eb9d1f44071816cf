import CKVM

/// The VM ioctls that read and write in-kernel device state: the irqchip created by
/// KVM_CREATE_IRQCHIP (two PICs and the IOAPIC) and the kvmclock base.
extension KVMVirtualMachine {
    /// The chips KVM_CREATE_IRQCHIP makes, in the order Firecracker saves and restores them.
    public static let irqChipIDs: [UInt32] = [CKVM_IRQCHIP_PIC_MASTER, CKVM_IRQCHIP_PIC_SLAVE, CKVM_IRQCHIP_IOAPIC]

    public func getIRQChip(_ id: UInt32) throws(KVMError) -> kvm_irqchip {
        var chip = kvm_irqchip()
        chip.chip_id = id
        try kvmIoctl(fd.rawValue, CKVM_GET_IRQCHIP, "KVM_GET_IRQCHIP(chip \(id))", &chip)
        return chip
    }

    public func setIRQChip(_ chip: kvm_irqchip) throws(KVMError) {
        try kvmSet(fd.rawValue, CKVM_SET_IRQCHIP, "KVM_SET_IRQCHIP(chip \(chip.chip_id))", chip)
    }

    /// KVM_GET_CLOCK: the kvmclock base (ns) and flags (TSC_STABLE, REALTIME, HOST_TSC).
    public func getClock() throws(KVMError) -> kvm_clock_data {
        guard checkExtension(CKVM_CAP_ADJUST_CLOCK) > 0 else { throw .missingCapability("KVM_CAP_ADJUST_CLOCK (KVM_GET_CLOCK)") }
        return try kvmGet(fd.rawValue, CKVM_GET_CLOCK, "KVM_GET_CLOCK")
    }

    /// KVM_SET_CLOCK with flags 0: kvmclock continues from `clock.clock`, as if no time passed
    /// while the VM was away (its TSC is restored the same way). KVM_CLOCK_REALTIME is not
    /// passed: it would move the guest's clock by the wall-clock time the migration took.
    public func setClock(_ clock: kvm_clock_data) throws(KVMError) {
        var start = kvm_clock_data()
        start.clock = clock.clock
        try kvmSet(fd.rawValue, CKVM_SET_CLOCK, "KVM_SET_CLOCK", start)
    }
}
