import CKVM

/// Everything KVM holds for one x86 vCPU, as Firecracker's `VcpuState` (no kvm_fpu: x87 and
/// SSE travel in the XSAVE area), plus whether the guest parked the vCPU. A plain value: saved
/// from a paused vCPU by `KVMVCPU.saveState`, carried as `encode()` bytes, restored into a new
/// vCPU by `KVMVCPU.restoreState`.
public struct VCPUState: Sendable {
    public static let version: UInt16 = 1
    /// Most MSRs a decoded state may list (KVM's save list has a few dozen to a few hundred).
    public static let maxMSRs = 1024
    /// Largest XSAVE area a decoded state may carry (4 KiB today, ~11 KiB with AMX).
    public static let maxXSAVEBytes = 1 << 20

    /// The vCPU's index (and local APIC ID).
    public var id: UInt32
    /// The guest told the host (park port) that this vCPU will never do anything again: the VMM
    /// does not enter it (see VCPURunner). Not KVM state.
    public var parked: Bool
    public var mpState: UInt32
    public var regs: kvm_regs
    public var sregs: kvm_sregs
    /// struct kvm_xsave: 4096 bytes, or KVM_CAP_XSAVE2's size.
    public var xsave: [UInt8]
    /// nil where the source kernel lacks KVM_CAP_XCRS.
    public var xcrs: kvm_xcrs?
    /// nil where the source kernel lacks KVM_CAP_DEBUGREGS.
    public var debugRegisters: kvm_debugregs?
    public var lapic: kvm_lapic_state
    /// In restore order: KVM_SET_MSRS writes them first to last.
    public var msrs: [MSREntry]
    public var events: kvm_vcpu_events
    /// The guest TSC frequency; 0 when the source could not tell.
    public var tscKHz: UInt32

    public init(id: UInt32, parked: Bool, mpState: UInt32, regs: kvm_regs, sregs: kvm_sregs, xsave: [UInt8],
                xcrs: kvm_xcrs?, debugRegisters: kvm_debugregs?, lapic: kvm_lapic_state, msrs: [MSREntry],
                events: kvm_vcpu_events, tscKHz: UInt32) {
        self.id = id
        self.parked = parked
        self.mpState = mpState
        self.regs = regs
        self.sregs = sregs
        self.xsave = xsave
        self.xcrs = xcrs
        self.debugRegisters = debugRegisters
        self.lapic = lapic
        self.msrs = msrs
        self.events = events
        self.tscKHz = tscKHz
    }

    /// The value of one MSR, if it was saved.
    public func msr(_ index: UInt32) -> UInt64? { msrs.first { $0.index == index }?.value }

    /// Version 1: id u32, parked u8, mp_state u32, then length-prefixed fields: kvm_regs,
    /// kvm_sregs, the XSAVE area, kvm_xcrs (or empty), kvm_debugregs (or empty), kvm_lapic_state,
    /// the MSRs (u32 count, then u32 index + u64 value each), kvm_vcpu_events; then TSC kHz u32.
    public func encode() -> [UInt8] {
        var encoder = StateEncoder(magic: .vcpu, version: Self.version)
        encoder.u32(id)
        encoder.u8(parked ? 1 : 0)
        encoder.u32(mpState)
        encoder.field(raw: regs)
        encoder.field(raw: sregs)
        encoder.field(xsave)
        encoder.field(optional: xcrs)
        encoder.field(optional: debugRegisters)
        encoder.field(raw: lapic)
        encoder.u32(UInt32(msrs.count))
        for entry in msrs {
            encoder.u32(entry.index)
            encoder.u64(entry.value)
        }
        encoder.field(raw: events)
        encoder.u32(tscKHz)
        return encoder.bytes
    }

    public init(decoding bytes: [UInt8]) throws(StateDecodingError) {
        var decoder = try StateDecoder(bytes, kind: .vcpu, version: Self.version)
        id = try decoder.u32("vCPU id")
        parked = try decoder.bool("parked")
        mpState = try decoder.u32("mp_state")
        regs = try decoder.raw("kvm_regs", as: kvm_regs.self)
        sregs = try decoder.raw("kvm_sregs", as: kvm_sregs.self)
        xsave = try decoder.field("XSAVE area", limit: Self.maxXSAVEBytes)
        guard xsave.count >= Int(CKVM_XSAVE_LEGACY_SIZE) else {
            throw .badLength(StateMagic.vcpu.name, field: "XSAVE area", length: xsave.count,
                             expected: "at least \(CKVM_XSAVE_LEGACY_SIZE)")
        }
        xcrs = try decoder.optionalRaw("kvm_xcrs", as: kvm_xcrs.self)
        debugRegisters = try decoder.optionalRaw("kvm_debugregs", as: kvm_debugregs.self)
        lapic = try decoder.raw("kvm_lapic_state", as: kvm_lapic_state.self)
        let count = try decoder.count("MSRs", limit: Self.maxMSRs)
        var msrs: [MSREntry] = []
        for _ in 0..<count {
            msrs.append(MSREntry(index: try decoder.u32("MSR index"), value: try decoder.u64("MSR value")))
        }
        self.msrs = msrs
        events = try decoder.raw("kvm_vcpu_events", as: kvm_vcpu_events.self)
        tscKHz = try decoder.u32("TSC kHz")
        try decoder.finish()
    }
}

extension VCPUState: Equatable {
    /// Equal when their encodings are: KVM's structs are compared byte for byte.
    public static func == (lhs: VCPUState, rhs: VCPUState) -> Bool { lhs.encode() == rhs.encode() }
}
