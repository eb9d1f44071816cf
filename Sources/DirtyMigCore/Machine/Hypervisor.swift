import CKVM

/// The hypervisor seam: what `Machine` (and the receiver that builds one) needs of the hypervisor
/// that runs it, in three halves, as Cloud Hypervisor's `hypervisor` crate splits it: the system
/// (`Hypervisor`: limits, CPU features, VMs), the VM (`HypervisorVM`: trackers, memory, vCPUs,
/// in-kernel device state) and the vCPU (`HypervisorVCPU`). KVM is the one hypervisor of the
/// product (`KVMSystem`, `KVMVirtualMachine`, `KVMVCPU`); tests build a Machine, a migration and a
/// replication on a fake one whose dirty pages they decide, without /dev/kvm.
///
/// Associated types, not existentials, carry the vCPU type down to `VCPURunner`: a Machine built
/// on KVM runs `VCPURunner<KVMVCPU>`, specialised, so that nothing per exit goes through a
/// witness table. What Machine calls per pass (pause, save, collect) may.
protocol Hypervisor: AnyObject, Sendable {
    associatedtype VM: HypervisorVM
    /// Most vCPUs one VM may have.
    var maxVCPUs: Int { get }
    /// Largest dirty ring the hypervisor accepts, in entries (0: no dirty ring).
    var maxDirtyRingEntries: Int { get }
    /// The CPUID feature bits a guest may rely on here (what a migrated guest needs).
    var cpuFeatures: CPUFeatureSet { get }
    /// Whether a guest's TSC can be made to tick at another rate than the host's.
    var canScaleTSC: Bool { get }
    /// This host's TSC frequency in kHz, as a guest sees it; nil if it cannot be told.
    var tscKHz: UInt64? { get }
    /// The CPUID leaves the hypervisor can offer a guest.
    func supportedCPUID() throws(KVMError) -> CPUIDTable
    /// The MSRs a saved vCPU state carries, in restore order.
    func migratableMSRIndices() throws(KVMError) -> [UInt32]
    func createVM() throws(KVMError) -> VM
}

/// The VM half of the hypervisor seam: one VM, set up in the order KVM requires (tracking
/// capabilities before any memory slot or vCPU, see `Machine.init`).
protocol HypervisorVM: AnyObject, Sendable {
    associatedtype VCPU: HypervisorVCPU
    /// The dirty tracker of `mode` (its KVM capabilities enabled now), before memory and vCPUs.
    func makeTracker(_ mode: TrackingMode, memory: GuestMemory, configuration: MachineConfiguration,
                     holds: VCPUHolds) throws(KVMError) -> any DirtyTracker
    /// What a VM needs besides its vCPUs: the TSS, the in-kernel irqchip, and `memory` as its RAM.
    func install(memory: GuestMemory) throws(KVMError)
    /// A vCPU with the CPUID it gets; `tracker` learns of it (the ring maps each vCPU's ring).
    func createVCPU(id: Int, cpuid: CPUIDTable, tracker: (any DirtyTracker)?) throws(KVMError) -> VCPU
    /// The in-kernel devices' state (irqchips, clock); every vCPU out of the guest.
    func saveDeviceState() throws(KVMError) -> VMDeviceState
    /// Puts it back into a VM whose vCPUs were restored and have not run.
    func restoreDeviceState(_ state: VMDeviceState) throws(KVMError)
}

extension KVMSystem: Hypervisor {
    var canScaleTSC: Bool { checkExtension(CKVM_CAP_TSC_CONTROL) > 0 }
    var tscKHz: UInt64? { (try? HostTSC.frequency(kvm: self)).map { $0 / 1000 } }
}

extension KVMVirtualMachine: HypervisorVM {
    func makeTracker(_ mode: TrackingMode, memory: GuestMemory, configuration: MachineConfiguration,
                     holds: VCPUHolds) throws(KVMError) -> any DirtyTracker {
        switch mode {
        case .bitmap:
            return try BitmapTracker(vm: self, memory: memory)
        case .ring, .quota:
            return try RingTracker(vm: self, memory: memory, entries: configuration.ringEntries, mode: mode,
                                   holds: holds, pollInterval: configuration.harvestInterval)
        }
    }

    func install(memory: GuestMemory) throws(KVMError) {
        try setTSSAddress(0xFFFB_D000)
        try createIRQChip()
        try setMemorySlots(of: memory, logDirtyPages: false)
    }

    func createVCPU(id: Int, cpuid: CPUIDTable, tracker: (any DirtyTracker)?) throws(KVMError) -> KVMVCPU {
        let vcpu = try createVCPU(id: id)
        try vcpu.setCPUID(cpuid.forVCPU(apicID: UInt32(id)))
        try (tracker as? RingTracker)?.attach(vcpu)
        return vcpu
    }
}
