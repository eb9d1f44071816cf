import CKVM
import Glibc

/// The vCPU ioctls that read and write the state a migration carries (KVM API §4: XSAVE, XCRS,
/// LAPIC, VCPU_EVENTS, MP_STATE, DEBUGREGS, MSRS, TSC_KHZ). Thin: one ioctl each, no ordering;
/// the order they must run in lives in `KVMVCPU.saveState()` / `restoreState(_:)`.
extension KVMVCPU {
    public func setMPState(_ value: UInt32) throws(KVMError) {
        try kvmSet(fd.rawValue, CKVM_SET_MP_STATE, "KVM_SET_MP_STATE", kvm_mp_state(mp_state: value))
    }

    /// Bytes of `struct kvm_xsave` this VM uses: KVM_CAP_XSAVE2's answer (at least 4096; more when
    /// dynamic features such as AMX are enabled), 4096 with only KVM_CAP_XSAVE.
    public var xsaveSize: Int {
        get throws(KVMError) {
            let size = Int(vm.checkExtension(CKVM_CAP_XSAVE2))
            if size >= Int(CKVM_XSAVE_LEGACY_SIZE) { return size }
            guard vm.checkExtension(CKVM_CAP_XSAVE) > 0 else { throw .missingCapability("KVM_CAP_XSAVE (KVM_GET_XSAVE)") }
            return Int(CKVM_XSAVE_LEGACY_SIZE)
        }
    }

    /// KVM_GET_XSAVE2 (or KVM_GET_XSAVE where the kernel lacks KVM_CAP_XSAVE2): x87, SSE, AVX...
    public func getXSAVE() throws(KVMError) -> [UInt8] {
        let size = try xsaveSize
        let (request, name) = vm.checkExtension(CKVM_CAP_XSAVE2) > 0
            ? (CKVM_GET_XSAVE2, "KVM_GET_XSAVE2") : (CKVM_GET_XSAVE, "KVM_GET_XSAVE")
        var bytes = [UInt8](repeating: 0, count: size)
        try kvmIoctl(fd.rawValue, request, name, bytes: &bytes)
        return bytes
    }

    /// KVM_SET_XSAVE, which reads `xsaveSize` bytes: a shorter area (saved where dynamic features
    /// were off) is zero-padded, which leaves the missing components in their initial state.
    public func setXSAVE(_ area: [UInt8]) throws(KVMError) {
        let size = try xsaveSize
        guard area.count <= size || area[size...].allSatisfy({ $0 == 0 }) else {
            throw .ioctl("KVM_SET_XSAVE", SystemError("KVM_SET_XSAVE: saved area of \(area.count) bytes is larger than this VM's \(size)", errno: EINVAL))
        }
        var bytes = Array(area.prefix(size))
        bytes += [UInt8](repeating: 0, count: size - bytes.count)
        try kvmIoctl(fd.rawValue, CKVM_SET_XSAVE, "KVM_SET_XSAVE", bytes: &bytes)
    }

    public func getXCRS() throws(KVMError) -> kvm_xcrs { try kvmGet(fd.rawValue, CKVM_GET_XCRS, "KVM_GET_XCRS") }
    public func setXCRS(_ xcrs: kvm_xcrs) throws(KVMError) { try kvmSet(fd.rawValue, CKVM_SET_XCRS, "KVM_SET_XCRS", xcrs) }

    public func getLAPIC() throws(KVMError) -> kvm_lapic_state { try kvmGet(fd.rawValue, CKVM_GET_LAPIC, "KVM_GET_LAPIC") }
    public func setLAPIC(_ lapic: kvm_lapic_state) throws(KVMError) { try kvmSet(fd.rawValue, CKVM_SET_LAPIC, "KVM_SET_LAPIC", lapic) }

    public func getVCPUEvents() throws(KVMError) -> kvm_vcpu_events { try kvmGet(fd.rawValue, CKVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS") }
    public func setVCPUEvents(_ events: kvm_vcpu_events) throws(KVMError) { try kvmSet(fd.rawValue, CKVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", events) }

    public func getDebugRegisters() throws(KVMError) -> kvm_debugregs { try kvmGet(fd.rawValue, CKVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS") }
    public func setDebugRegisters(_ debugregs: kvm_debugregs) throws(KVMError) { try kvmSet(fd.rawValue, CKVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", debugregs) }

    /// KVM_SET_TSC_KHZ: the guest TSC frequency (needs KVM_CAP_TSC_CONTROL).
    public func setTSCKHz(_ khz: UInt32) throws(KVMError) {
        guard vm.checkExtension(CKVM_CAP_TSC_CONTROL) > 0 else {
            throw .missingCapability("KVM_CAP_TSC_CONTROL (KVM_SET_TSC_KHZ)")
        }
        try kvmIoctl(fd.rawValue, CKVM_SET_TSC_KHZ, "KVM_SET_TSC_KHZ", value: UInt(khz))
    }

    /// KVM_GET_MSRS for `indices`, 256 a call. KVM reads a chunk in order and stops at the first
    /// MSR it refuses, returning how many it read: that index is skipped and the read resumes after
    /// it (as Cloud Hypervisor does). Returns what was read, in order, and the refused indices.
    public func getMSRs(_ indices: [UInt32]) throws(KVMError) -> (entries: [MSREntry], refused: [UInt32]) {
        var entries: [MSREntry] = []
        var refused: [UInt32] = []
        entries.reserveCapacity(indices.count)
        var next = indices[...]
        while !next.isEmpty {
            let chunk = Array(next.prefix(MSREntry.chunk)).map { MSREntry(index: $0, value: 0) }
            let done = try msrIoctl(CKVM_GET_MSRS, "KVM_GET_MSRS", chunk) { entries.append($0) }
            if done < chunk.count { refused.append(chunk[done].index) }
            next = next.dropFirst(min(chunk.count, done + 1))
        }
        return (entries, refused)
    }

    /// KVM_SET_MSRS, chunk by chunk, skipping (and returning) the indices KVM refuses to write.
    public func setMSRs(_ entries: [MSREntry]) throws(KVMError) -> [UInt32] {
        var refused: [UInt32] = []
        var next = entries[...]
        while !next.isEmpty {
            let chunk = Array(next.prefix(MSREntry.chunk))
            let done = try msrIoctl(CKVM_SET_MSRS, "KVM_SET_MSRS", chunk) { _ in }
            if done < chunk.count { refused.append(chunk[done].index) }
            next = next.dropFirst(min(chunk.count, done + 1))
        }
        return refused
    }

    /// One KVM_GET_MSRS/KVM_SET_MSRS call over a `struct kvm_msrs` built from `chunk`; hands the
    /// entries KVM processed to `processed` and returns their count.
    private func msrIoctl(_ request: UInt, _ name: String, _ chunk: [MSREntry],
                          _ processed: (MSREntry) -> Void) throws(KVMError) -> Int {
        let header = Int(CKVM_MSRS_HEADER_SIZE), stride = Int(CKVM_MSR_ENTRY_SIZE)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: header + stride * chunk.count, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: header + stride * chunk.count)
        buffer.storeBytes(of: UInt32(chunk.count), as: UInt32.self)
        for (slot, entry) in chunk.enumerated() {
            let base = buffer + header + stride * slot
            base.storeBytes(of: entry.index, as: UInt32.self)
            base.storeBytes(of: entry.value, toByteOffset: 8, as: UInt64.self)
        }
        let done = min(chunk.count, Int(try kvmIoctl(fd.rawValue, request, name, buffer)))
        for slot in 0..<done {
            let base = buffer + header + stride * slot
            processed(MSREntry(index: base.load(as: UInt32.self), value: base.load(fromByteOffset: 8, as: UInt64.self)))
        }
        return done
    }

    /// Completes an instruction whose exit userspace has handled (port I/O, MMIO...): KVM finishes
    /// it (e.g. moves RIP past an OUT) on the next KVM_RUN, so state read before that would replay
    /// or lose it. Runs KVM_RUN once with immediate_exit set, which completes the pending
    /// instruction and returns EINTR without entering the guest. Returns nil then, or the exit
    /// KVM reported instead (completing it needed userspace again, e.g. the next chunk of a
    /// string I/O instruction): handle that exit and call this again.
    /// Call it only from the thread that runs the vCPU, while nothing else runs it.
    public func completePendingExit() throws(KVMError) -> VCPUExit? {
        requestImmediateExit(true)
        defer { requestImmediateExit(false) }
        let result = ckvmIoctlValue(fd.rawValue, CKVM_RUN, 0)
        if result < 0 {
            let error = errno
            if error == EINTR || error == EAGAIN { return nil }
            throw .ioctl("KVM_RUN (completing vCPU \(id)'s last exit)", SystemError("KVM_RUN", errno: error))
        }
        return VCPUExit(run: run, page: runPage)
    }
}

/// One model-specific register and its value.
public struct MSREntry: Sendable, Equatable {
    public var index: UInt32
    public var value: UInt64

    public init(index: UInt32, value: UInt64) {
        self.index = index
        self.value = value
    }

    /// Entries per KVM_GET_MSRS / KVM_SET_MSRS call (kvm-bindings' KVM_MAX_MSR_ENTRIES).
    static let chunk = 256
    public static let tsc: UInt32 = 0x10
    public static let tscDeadline: UInt32 = 0x6E0
}
