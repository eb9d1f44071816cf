import CKVM
import Glibc

/// Saving and restoring a vCPU: which ioctls, in which order, and why (Firecracker's
/// `arch/x86_64/vcpu.rs`, Cloud Hypervisor's `KvmVcpu::state` / `set_state`). The vCPU must be
/// out of KVM_RUN with its last exit completed (`completePendingExit`), and stay out meanwhile.
extension KVMVCPU {
    /// Reads the vCPU's whole state; `msrIndices` is `KVMSystem.migratableMSRIndices()`.
    public func saveState(msrIndices: [UInt32]) throws(KVMError) -> VCPUState {
        // MP_STATE first: KVM_GET_MP_STATE runs kvm_apic_accept_events(), which may change
        // vCPU and LAPIC state (a pending INIT or SIPI), so everything after sees the result.
        let mpState = try getMPState()
        let regs = try getRegisters()
        let sregs = try getSpecialRegisters()
        let xsave = try getXSAVE()
        let xcrs = vm.checkExtension(CKVM_CAP_XCRS) > 0 ? try getXCRS() : nil
        let debugRegisters = vm.checkExtension(CKVM_CAP_DEBUGREGS) > 0 ? try getDebugRegisters() : nil
        let lapic = try getLAPIC()
        let tscKHz = UInt32(truncatingIfNeeded: try tscKHz())
        // MSRs KVM refuses to read are skipped (Cloud Hypervisor); the TSC must not be among them.
        let msrs = try getMSRs(msrIndices).entries
        guard !msrIndices.contains(MSREntry.tsc) || msrs.contains(where: { $0.index == MSREntry.tsc }) else {
            throw .ioctl("KVM_GET_MSRS(MSR_IA32_TSC)", SystemError("KVM_GET_MSRS refused MSR_IA32_TSC", errno: EINVAL))
        }
        // Last: reading events after everything else sees any exception the reads above queued.
        let events = try getVCPUEvents()
        return VCPUState(id: UInt32(id), parked: false, mpState: mpState, regs: regs, sregs: sregs, xsave: xsave,
                         xcrs: xcrs, debugRegisters: debugRegisters, lapic: lapic, msrs: msrs, events: events,
                         tscKHz: tscKHz)
    }

    /// Writes a saved state into this vCPU, which has its CPUID set (at creation) and has never
    /// run. Returns the MSRs KVM refused to write (skipped, as Cloud Hypervisor does); the TSC
    /// is never among them (refusing it throws: the guest's clock would jump).
    @discardableResult
    public func restoreState(_ state: VCPUState) throws(KVMError) -> [UInt32] {
        try matchTSCFrequency(savedKHz: state.tscKHz)
        try setMPState(state.mpState)
        // REGS before SREGS and before events: KVM_SET_REGS clears pending exceptions.
        try setRegisters(state.regs)
        try setSpecialRegisters(state.sregs)
        try setXSAVE(state.xsave)
        if let xcrs = state.xcrs {
            guard vm.checkExtension(CKVM_CAP_XCRS) > 0 else { throw .missingCapability("KVM_CAP_XCRS (KVM_SET_XCRS)") }
            try setXCRS(xcrs)
        }
        if let debugRegisters = state.debugRegisters {
            guard vm.checkExtension(CKVM_CAP_DEBUGREGS) > 0 else {
                throw .missingCapability("KVM_CAP_DEBUGREGS (KVM_SET_DEBUGREGS)")
            }
            try setDebugRegisters(debugRegisters)
        }
        // LAPIC after SREGS (which restores the APIC base MSR) and before the MSRs, so that the
        // TSC deadline written with them lands in a LAPIC that is in TSC-deadline mode.
        try setLAPIC(state.lapic)
        let refused = try setMSRs(state.msrs)
        if refused.contains(MSREntry.tsc) {
            throw .ioctl("KVM_SET_MSRS(MSR_IA32_TSC)", SystemError("KVM_SET_MSRS refused MSR_IA32_TSC", errno: EINVAL))
        }
        // Last: pending or injected exceptions, interrupts, NMIs, the interrupt shadow.
        try setVCPUEvents(state.events)
        return refused
    }

    /// The guest's TSC must tick as fast here as where it was saved (its workloads are paced by
    /// it): within 250 ppm (Firecracker's tolerance) nothing is done, otherwise KVM_SET_TSC_KHZ,
    /// which needs KVM_CAP_TSC_CONTROL.
    private func matchTSCFrequency(savedKHz: UInt32) throws(KVMError) {
        guard savedKHz != 0 else { return }
        let here = try tscKHz()
        let difference = here > UInt64(savedKHz) ? here - UInt64(savedKHz) : UInt64(savedKHz) - here
        guard difference * 4000 > UInt64(savedKHz) else { return }
        guard vm.checkExtension(CKVM_CAP_TSC_CONTROL) > 0 else {
            throw .missingCapability("KVM_CAP_TSC_CONTROL (the saved vCPU's TSC runs at \(savedKHz) kHz, this host's at \(here) kHz, and KVM_SET_TSC_KHZ is needed to match them)")
        }
        try setTSCKHz(savedKHz)
    }
}

extension KVMSystem {
    /// The MSRs to carry: KVM_GET_MSR_INDEX_LIST, plus MSR_IA32_TSC if the list lacks it (the
    /// guest's TSC must continue where it was), with MSR_IA32_TSC_DEADLINE moved last so it is
    /// written after the TSC it is compared with (Firecracker's DEFERRED_MSRS).
    public func migratableMSRIndices() throws(KVMError) -> [UInt32] {
        var indices = try msrIndexList()
        if !indices.contains(MSREntry.tsc) { indices.insert(MSREntry.tsc, at: 0) }
        if let deadline = indices.firstIndex(of: MSREntry.tscDeadline) {
            indices.append(indices.remove(at: deadline))
        }
        return indices
    }
}
