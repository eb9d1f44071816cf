/// How to run the exported workload guest under QEMU: the same image, the same config block.
public enum QEMUCommand {
    public static func arguments(image: String, config: String, memory: UInt64, vcpus: Int,
                                 extra: [String] = []) -> [String] {
        ["qemu-system-x86_64", "-accel", "kvm", "-m", "\(memory >> 20)M", "-smp", "\(vcpus)",
         "-kernel", image, "-device", "loader,file=\(config),addr=0x\(String(GuestLayout.configAddress, radix: 16))",
         "-display", "none"] + extra
    }
}

/// The host's TSC frequency, which the guest paces its workloads with: asked of KVM (a throwaway
/// VM's vCPU), which is what both our guests and QEMU's see.
public enum HostTSC {
    public static func frequency(kvm: KVMSystem? = nil) throws -> UInt64 {
        let kvm = try kvm ?? KVMSystem()
        let vm = try kvm.createVM()
        let vcpu = try vm.createVCPU(id: 0)
        return try vcpu.tscKHz() * 1000
    }
}
