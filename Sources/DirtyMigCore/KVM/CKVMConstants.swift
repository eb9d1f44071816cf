import CKVM

/// Constants from <linux/kvm.h> that code outside KVM/ needs, without importing the C module.
public enum CKVMConstants {
    public static let capManualDirtyLogProtect2 = CKVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    public static let manualProtectEnable = CKVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    public static let capDirtyLogRing = CKVM_CAP_DIRTY_LOG_RING
    public static let capDirtyLogRingAcqRel = CKVM_CAP_DIRTY_LOG_RING_ACQ_REL
    public static let dirtyGFNSize = MemoryLayout<kvm_dirty_gfn>.stride
}
