/// What a vCPU thread (`VCPURunner`) needs of its vCPU: enter the guest until the next exit,
/// complete a pending exit without entering it, be kicked, read its state, show its registers
/// when it dies. `KVMVCPU` is the one hypervisor today; tests step a fake one, so that the vCPU
/// state machine runs without /dev/kvm. This is the vCPU half of the hypervisor seam in its
/// smallest form: what restore, CPUID and the dirty ring need joins it when Machine is built over
/// the seam too.
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
    /// Registers for an error report; nil if they cannot be read.
    func registerDump() -> VCPURegisterDump?
}

extension KVMVCPU: HypervisorVCPU {}
