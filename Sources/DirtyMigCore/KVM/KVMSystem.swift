import CKVM
import Glibc

/// /dev/kvm: API version, capabilities, and the factory for VMs (the `kvm_` layer).
public final class KVMSystem: Sendable {
    public static let devicePath = "/dev/kvm"
    public let fd: FileDescriptor

    public init(path: String = KVMSystem.devicePath) throws(KVMError) {
        let raw = Glibc.open(path, O_RDWR | O_CLOEXEC)
        if raw < 0 {
            let error = SystemError("open \(path)")
            switch error.errno {
            case ENOENT, ENODEV, ENXIO: throw .deviceMissing(path: path)
            case EACCES, EPERM: throw .permissionDenied(path: path)
            default: throw .deviceUnusable(path: path, error)
            }
        }
        fd = FileDescriptor(owning: raw)
        let version = try kvmIoctl(fd.rawValue, CKVM_GET_API_VERSION, "KVM_GET_API_VERSION", value: 0)
        guard version == CKVM_API_VERSION else { throw .unsupportedAPIVersion(version) }
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, ckvmIoctlValue(fd.rawValue, CKVM_CHECK_EXTENSION, UInt(capability)))
    }

    /// Most vCPUs one VM may have.
    public var maxVCPUs: Int {
        let recommended = Int(checkExtension(CKVM_CAP_NR_VCPUS))
        let maximum = Int(checkExtension(CKVM_CAP_MAX_VCPUS))
        return max(recommended, maximum, 4)
    }

    /// Largest dirty ring the kernel accepts, in entries (0 when the ring is unsupported).
    public var maxDirtyRingEntries: Int {
        let bytes = max(checkExtension(CKVM_CAP_DIRTY_LOG_RING_ACQ_REL), checkExtension(CKVM_CAP_DIRTY_LOG_RING))
        return Int(bytes) / MemoryLayout<kvm_dirty_gfn>.stride
    }

    public var vcpuMmapSize: Int {
        get throws(KVMError) { Int(try kvmIoctl(fd.rawValue, CKVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE", value: 0)) }
    }

    /// The CPUID leaves KVM can offer a guest (KVM_GET_SUPPORTED_CPUID).
    public func supportedCPUID() throws(KVMError) -> CPUIDTable {
        var table = ckvm_cpuid()
        table.nent = UInt32(CKVM_MAX_CPUID_ENTRIES)
        try kvmIoctl(fd.rawValue, CKVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", &table)
        return CPUIDTable(raw: table)
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU (the list a VMM
    /// migrates). Asked twice: first for the count (E2BIG), then for the indices.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        var count: UInt32 = 0
        let name = "KVM_GET_MSR_INDEX_LIST"
        while true {
            let header = Int(CKVM_MSR_LIST_HEADER_SIZE)
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: header + 4 * Int(count), alignment: 4)
            defer { buffer.deallocate() }
            buffer.storeBytes(of: count, as: UInt32.self)
            if ckvmIoctl(fd.rawValue, CKVM_GET_MSR_INDEX_LIST, buffer) >= 0 {
                let returned = min(Int(count), Int(buffer.load(as: UInt32.self)))
                return (0..<returned).map { buffer.load(fromByteOffset: header + 4 * $0, as: UInt32.self) }
            }
            let needed = buffer.load(as: UInt32.self)
            // E2BIG with the count filled in: retry with room for it (bounded: KVM's list is
            // a few hundred entries).
            guard errno == E2BIG || errno == EINTR, needed <= 16384 else { throw .ioctl(name, SystemError(name)) }
            count = max(count, needed)
        }
    }

    public func createVM() throws(KVMError) -> KVMVirtualMachine {
        let vmfd = try kvmIoctl(fd.rawValue, CKVM_CREATE_VM, "KVM_CREATE_VM", value: 0)
        return KVMVirtualMachine(system: self, fd: FileDescriptor(owning: vmfd))
    }
}

/// A KVM CPUID table (struct kvm_cpuid2 with its entries), as got from and given to KVM.
public struct CPUIDTable: @unchecked Sendable {
    // @unchecked: a plain C value type with no pointers.
    var raw: ckvm_cpuid

    /// Returns a copy with the local APIC ID set in leaf 1 (EBX[31:24]) and leaf 0xB (EDX),
    /// so each vCPU sees the ID its in-kernel LAPIC has.
    public func forVCPU(apicID: UInt32) -> CPUIDTable {
        var copy = self
        withUnsafeMutableBytes(of: &copy.raw.entries) { buffer in
            let entries = buffer.bindMemory(to: kvm_cpuid_entry2.self)
            for index in 0..<Int(copy.raw.nent) {
                switch entries[index].function {
                case 1:
                    entries[index].ebx = (entries[index].ebx & 0x00FF_FFFF) | (apicID << 24)
                case 0xB, 0x1F:
                    entries[index].edx = apicID
                default:
                    break
                }
            }
        }
        return copy
    }
}

extension CPUIDTable {
    /// The first entry for `function` (subleaf 0), as (eax, ebx, ecx, edx); zeros when absent.
    public func leaf(_ function: UInt32) -> (eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        var copy = raw
        return withUnsafeBytes(of: &copy.entries) { buffer in
            let entries = buffer.bindMemory(to: kvm_cpuid_entry2.self)
            for index in 0..<Int(raw.nent) where entries[index].function == function && entries[index].index == 0 {
                return (entries[index].eax, entries[index].ebx, entries[index].ecx, entries[index].edx)
            }
            return (0, 0, 0, 0)
        }
    }
}

extension KVMSystem {
    /// The CPUID feature bits KVM can give a guest here (what a migrated guest may rely on).
    public var cpuFeatures: CPUFeatureSet {
        guard let table = try? supportedCPUID() else { return CPUFeatureSet(leaf1EDX: 0, leaf1ECX: 0, extendedEDX: 0) }
        let leaf1 = table.leaf(1), extended = table.leaf(0x8000_0001)
        return CPUFeatureSet(leaf1EDX: leaf1.edx, leaf1ECX: leaf1.ecx, extendedEDX: extended.edx)
    }
}
