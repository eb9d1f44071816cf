import CKVM

/// The VM-wide in-kernel device state (Firecracker's x86 `VmState` without a PIT, which this VMM
/// does not create): the irqchip KVM_CREATE_IRQCHIP made (PIC master, PIC slave, IOAPIC) and the
/// kvmclock base.
public struct VMDeviceState: Sendable {
    public static let version: UInt16 = 1
    /// Most irqchips a decoded state may hold (x86 has three).
    public static let maxIRQChips = 8

    /// In KVMVirtualMachine.irqChipIDs order; each carries its chip_id.
    public var irqChips: [kvm_irqchip]
    /// nil where the source kernel lacks KVM_CAP_ADJUST_CLOCK.
    public var clock: kvm_clock_data?

    public init(irqChips: [kvm_irqchip], clock: kvm_clock_data?) {
        self.irqChips = irqChips
        self.clock = clock
    }

    /// Version 1: u32 chip count, a kvm_irqchip field per chip, then kvm_clock_data (or empty).
    public func encode() -> [UInt8] {
        var encoder = StateEncoder(magic: .devices, version: Self.version)
        encoder.u32(UInt32(irqChips.count))
        for chip in irqChips { encoder.field(raw: chip) }
        encoder.field(optional: clock)
        return encoder.bytes
    }

    public init(decoding bytes: [UInt8]) throws(StateDecodingError) {
        var decoder = try StateDecoder(bytes, kind: .devices, version: Self.version)
        let count = try decoder.count("irqchips", limit: Self.maxIRQChips)
        var chips: [kvm_irqchip] = []
        for _ in 0..<count { chips.append(try decoder.raw("kvm_irqchip", as: kvm_irqchip.self)) }
        irqChips = chips
        clock = try decoder.optionalRaw("kvm_clock_data", as: kvm_clock_data.self)
        try decoder.finish()
    }
}

extension VMDeviceState: Equatable {
    public static func == (lhs: VMDeviceState, rhs: VMDeviceState) -> Bool { lhs.encode() == rhs.encode() }
}

extension KVMVirtualMachine {
    /// Reads the irqchips and the clock; every vCPU must be out of KVM_RUN.
    public func saveDeviceState() throws(KVMError) -> VMDeviceState {
        var chips: [kvm_irqchip] = []
        for id in Self.irqChipIDs { chips.append(try getIRQChip(id)) }
        let clock = checkExtension(CKVM_CAP_ADJUST_CLOCK) > 0 ? try getClock() : nil
        return VMDeviceState(irqChips: chips, clock: clock)
    }

    /// Writes them into a VM whose vCPUs have been restored and have not run (Firecracker's
    /// order: vCPUs, then clock, then irqchips).
    public func restoreDeviceState(_ state: VMDeviceState) throws(KVMError) {
        if let clock = state.clock { try setClock(clock) }
        for chip in state.irqChips { try setIRQChip(chip) }
    }
}
