import CKVM

/// The vCPU half of the hypervisor seam (see `Hypervisor`): what a vCPU thread (`VCPURunner`)
/// needs of its vCPU (enter the guest until the next exit, complete a pending exit without
/// entering it, be kicked, read its state, show its registers when it dies), and what `Machine`
/// and a boot source need before it runs (its TSC rate, its entry registers, a restored state).
/// `KVMVCPU` is the one hypervisor of the product; tests step a fake one, so that the vCPU state
/// machine and a whole Machine run without /dev/kvm.
protocol HypervisorVCPU: AnyObject, Sendable {
    /// The vCPU's index (and local APIC ID).
    var id: Int { get }
    /// Enters the guest until the next exit that needs userspace (KVM_RUN); `.interrupted` when
    /// a kick (or immediate_exit set before entry) made it return. An I/O exit's data stays
    /// valid until the next call. Only the vCPU's own thread calls it.
    func runOnce() throws(KVMError) -> VCPUExit
    /// Lets the hypervisor finish the instruction behind the last exit without entering the
    /// guest; nil when done, or the exit completing it took instead (handle it, call again).
    func completePendingExit() throws(KVMError) -> VCPUExit?
    /// Makes the current or next `runOnce` return at once; the one call other threads make.
    func requestImmediateExit(_ value: Bool)
    /// The vCPU's state, read while it is out of the guest with its last exit completed.
    func saveState(msrIndices: [UInt32]) throws(KVMError) -> VCPUState
    /// Writes a saved state into this vCPU, which has never run; returns the MSRs refused.
    @discardableResult
    func restoreState(_ state: VCPUState) throws(KVMError) -> [UInt32]
    /// The guest's TSC frequency in kHz.
    func tscKHz() throws(KVMError) -> UInt64
    /// The entry registers a boot source sets on the boot vCPU before it first runs.
    func getSpecialRegisters() throws(KVMError) -> kvm_sregs
    func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError)
    func setRegisters(_ regs: kvm_regs) throws(KVMError)
    /// Registers for an error report; nil if they cannot be read.
    func registerDump() -> VCPURegisterDump?
}

extension KVMVCPU: HypervisorVCPU {}
