import CKVM
import Glibc

/// One KVM VM fd (the `vm_` layer): memory slots, vCPUs, irqchip, dirty logging ioctls.
public final class KVMVirtualMachine: Sendable {
    public let system: KVMSystem
    public let fd: FileDescriptor

    init(system: KVMSystem, fd: FileDescriptor) {
        self.system = system
        self.fd = fd
    }

    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, ckvmIoctlValue(fd.rawValue, CKVM_CHECK_EXTENSION, UInt(capability)))
    }

    public func enableCapability(_ capability: Int32, _ name: String, args: [UInt64] = []) throws(KVMError) {
        var cap = kvm_enable_cap()
        cap.cap = UInt32(capability)
        withUnsafeMutableBytes(of: &cap.args) { buffer in
            for (index, value) in args.prefix(4).enumerated() {
                buffer.storeBytes(of: value, toByteOffset: index * 8, as: UInt64.self)
            }
        }
        try kvmIoctl(fd.rawValue, CKVM_ENABLE_CAP, "KVM_ENABLE_CAP(\(name))", &cap)
    }

    /// KVM_SET_USER_MEMORY_REGION: installs, changes the flags of, or (size 0) deletes a slot.
    public func setMemoryRegion(slot: UInt32, guestPhysicalAddress: UInt64, size: UInt64,
                                hostAddress: UnsafeMutableRawPointer, logDirtyPages: Bool) throws(KVMError) {
        var region = kvm_userspace_memory_region(
            slot: slot,
            flags: logDirtyPages ? CKVM_MEM_LOG_DIRTY_PAGES : 0,
            guest_phys_addr: guestPhysicalAddress,
            memory_size: size,
            userspace_addr: UInt64(UInt(bitPattern: hostAddress)))
        try kvmIoctl(fd.rawValue, CKVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION(slot \(slot))", &region)
    }

    /// Where KVM may put its real-mode TSS (three pages just below the BIOS area).
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        try kvmIoctl(fd.rawValue, CKVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", value: UInt(address))
    }

    public func createIRQChip() throws(KVMError) {
        try kvmIoctl(fd.rawValue, CKVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP", value: 0)
    }

    public func createVCPU(id: Int) throws(KVMError) -> KVMVCPU {
        let vcpufd = try kvmIoctl(fd.rawValue, CKVM_CREATE_VCPU, "KVM_CREATE_VCPU(\(id))", value: UInt(id))
        return try KVMVCPU(vm: self, id: id, fd: FileDescriptor(owning: vcpufd))
    }

    /// KVM_GET_DIRTY_LOG for one slot into `bitmap` (one bit per page, 64-bit words).
    public func getDirtyLog(slot: UInt32, into bitmap: UnsafeMutablePointer<UInt64>) throws(KVMError) {
        var log = kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        try kvmIoctl(fd.rawValue, CKVM_GET_DIRTY_LOG, "KVM_GET_DIRTY_LOG(slot \(slot))", &log)
    }

    /// KVM_CLEAR_DIRTY_LOG: re-protects the pages whose bits are set in `bitmap`, which covers
    /// `pageCount` pages from `firstPage` (a multiple of 64).
    public func clearDirtyLog(slot: UInt32, firstPage: UInt64, pageCount: UInt32,
                              bitmap: UnsafeMutablePointer<UInt64>) throws(KVMError) {
        var clear = kvm_clear_dirty_log()
        clear.slot = slot
        clear.num_pages = pageCount
        clear.first_page = firstPage
        clear.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        try kvmIoctl(fd.rawValue, CKVM_CLEAR_DIRTY_LOG, "KVM_CLEAR_DIRTY_LOG(slot \(slot))", &clear)
    }

    /// KVM_RESET_DIRTY_RINGS: re-protects every harvested ring entry of every vCPU; returns how many.
    @discardableResult
    public func resetDirtyRings() throws(KVMError) -> Int {
        Int(try kvmIoctl(fd.rawValue, CKVM_RESET_DIRTY_RINGS, "KVM_RESET_DIRTY_RINGS", value: 0))
    }
}
