import CKVM
import Glibc

/// One vCPU fd (the `vcpu_` layer): its shared kvm_run page, KVM_RUN, registers, CPUID, MP state,
/// and its dirty ring mapping. KVM_RUN is called only from the vCPU's own thread; `kick`-related
/// state (immediate_exit) may be touched from any thread.
public final class KVMVCPU: @unchecked Sendable {
    // @unchecked: `runPage` is shared with the kernel by design; only the vCPU thread calls run(),
    // other threads only store immediate_exit (atomically, in the C shim).
    public let id: Int
    public let fd: FileDescriptor
    unowned let vm: KVMVirtualMachine
    let runPage: MappedRegion

    init(vm: KVMVirtualMachine, id: Int, fd: FileDescriptor) throws(KVMError) {
        self.vm = vm
        self.id = id
        self.fd = fd
        let size = try vm.system.vcpuMmapSize
        do {
            runPage = try MappedRegion(length: size, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                       fd: fd.rawValue, offset: 0)
        } catch {
            throw .ioctl("mmap kvm_run of vCPU \(id)", error)
        }
    }

    var run: UnsafeMutablePointer<kvm_run> { runPage.base.assumingMemoryBound(to: kvm_run.self) }

    /// Makes the next (or current) KVM_RUN return at once with EINTR; paired with a signal.
    public func requestImmediateExit(_ value: Bool = true) {
        ckvm_run_set_immediate_exit(run, value ? 1 : 0)
    }

    /// Enters the guest until the next exit that needs userspace.
    public func runOnce() throws(KVMError) -> VCPUExit {
        let result = ckvmIoctlValue(fd.rawValue, CKVM_RUN, 0)
        if result < 0 {
            let error = errno
            if error == EINTR || error == EAGAIN {
                requestImmediateExit(false)
                return .interrupted
            }
            throw .ioctl("KVM_RUN on vCPU \(id)", SystemError("KVM_RUN", errno: error))
        }
        return VCPUExit(run: run, page: runPage)
    }

    public func getRegisters() throws(KVMError) -> kvm_regs {
        var regs = kvm_regs()
        try kvmIoctl(fd.rawValue, CKVM_GET_REGS, "KVM_GET_REGS", &regs)
        return regs
    }

    public func setRegisters(_ regs: kvm_regs) throws(KVMError) {
        var copy = regs
        try kvmIoctl(fd.rawValue, CKVM_SET_REGS, "KVM_SET_REGS", &copy)
    }

    public func getSpecialRegisters() throws(KVMError) -> kvm_sregs {
        var sregs = kvm_sregs()
        try kvmIoctl(fd.rawValue, CKVM_GET_SREGS, "KVM_GET_SREGS", &sregs)
        return sregs
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) {
        var copy = sregs
        try kvmIoctl(fd.rawValue, CKVM_SET_SREGS, "KVM_SET_SREGS", &copy)
    }

    public func setCPUID(_ table: CPUIDTable) throws(KVMError) {
        var raw = table.raw
        try kvmIoctl(fd.rawValue, CKVM_SET_CPUID2, "KVM_SET_CPUID2", &raw)
    }

    public func getMPState() throws(KVMError) -> UInt32 {
        var state = kvm_mp_state()
        try kvmIoctl(fd.rawValue, CKVM_GET_MP_STATE, "KVM_GET_MP_STATE", &state)
        return state.mp_state
    }

    /// The guest TSC frequency in kHz.
    public func tscKHz() throws(KVMError) -> UInt64 {
        UInt64(try kvmIoctl(fd.rawValue, CKVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ", value: 0))
    }

    /// Maps this vCPU's dirty ring (enabled on the VM before the vCPU was created).
    public func mapDirtyRing(entries: Int) throws(KVMError) -> MappedRegion {
        let length = entries * MemoryLayout<kvm_dirty_gfn>.stride
        do {
            return try MappedRegion(length: length, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                    fd: fd.rawValue, offset: Int(CKVM_DIRTY_LOG_PAGE_OFFSET) * Int(getpagesize()))
        } catch {
            throw .ioctl("mmap dirty ring of vCPU \(id)", error)
        }
    }

    /// Registers for an error report; nil if even reading them fails.
    public func registerDump() -> VCPURegisterDump? {
        guard let regs = try? getRegisters(), let sregs = try? getSpecialRegisters() else { return nil }
        return VCPURegisterDump(regs: regs, sregs: sregs)
    }
}

/// Why KVM_RUN returned. Port I/O and MMIO exits carry their data (as rust-vmm's `VcpuExit`
/// does): valid only until the vCPU's next KVM_RUN, on its own thread.
public enum VCPUExit: Sendable, Equatable {
    /// The guest wrote `data` to `port` (OUT, or OUTS with several elements).
    case ioOut(port: UInt16, data: IOData)
    /// The guest reads `port` (IN, or INS): what is in `data` when the vCPU enters the guest
    /// again is what it reads.
    case ioIn(port: UInt16, data: IOData)
    /// The guest wrote `data` to an address no memory slot holds.
    case mmioWrite(address: UInt64, data: IOData)
    /// The guest reads an address no memory slot holds: it gets what is in `data`.
    case mmioRead(address: UInt64, data: IOData)
    case hlt
    case shutdown
    case failEntry(hardwareReason: UInt64)
    case internalError(suberror: UInt32)
    case systemEvent(type: UInt32)
    case dirtyRingFull
    case interrupted
    case other(reason: UInt32)

    var isInterrupted: Bool {
        if case .interrupted = self { return true }
        return false
    }

    /// `page`: the vCPU's kvm_run mapping, where KVM puts an I/O exit's data (at its data_offset).
    init(run: UnsafeMutablePointer<kvm_run>, page: MappedRegion) {
        let reason = run.pointee.exit_reason
        switch reason {
        case CKVM_EXIT_IO:
            let io = ckvm_run_io(run)
            let length = Int(io.size) * Int(io.count)
            // KVM keeps the data inside the mapping; anything else is not an exit we understand.
            guard io.size > 0, io.data_offset <= UInt64(page.length), length <= page.length - Int(io.data_offset) else {
                self = .other(reason: reason)
                return
            }
            let data = IOData(bytes: UnsafeMutableRawBufferPointer(start: page.base + Int(io.data_offset), count: length),
                              elementSize: Int(io.size))
            self = io.direction == CKVM_EXIT_IO_OUT ? .ioOut(port: io.port, data: data) : .ioIn(port: io.port, data: data)
        case CKVM_EXIT_MMIO:
            let mmio = ckvm_run_mmio(run)
            let length = min(Int(mmio.len), Int(CKVM_MMIO_DATA_SIZE))
            guard length > 0 else { self = .other(reason: reason); return }
            let data = IOData(bytes: UnsafeMutableRawBufferPointer(start: ckvm_run_mmio_data(run), count: length),
                              elementSize: length)
            self = mmio.is_write != 0 ? .mmioWrite(address: mmio.phys_addr, data: data)
                : .mmioRead(address: mmio.phys_addr, data: data)
        case CKVM_EXIT_HLT: self = .hlt
        case CKVM_EXIT_SHUTDOWN: self = .shutdown
        case CKVM_EXIT_FAIL_ENTRY: self = .failEntry(hardwareReason: ckvm_run_fail_entry_reason(run))
        case CKVM_EXIT_INTERNAL_ERROR: self = .internalError(suberror: ckvm_run_internal_suberror(run))
        case CKVM_EXIT_SYSTEM_EVENT: self = .systemEvent(type: ckvm_run_system_event_type(run))
        case CKVM_EXIT_DIRTY_RING_FULL: self = .dirtyRingFull
        case CKVM_EXIT_INTR: self = .interrupted
        default: self = .other(reason: reason)
        }
    }
}

/// The bytes of one port I/O or MMIO access, where the hypervisor keeps them (KVM: the vCPU's
/// kvm_run page): an OUT's or MMIO write's to read, an IN's or MMIO read's to fill. A string
/// instruction (OUTS, INS with a REP prefix) moves several elements in one exit: `bytes` holds
/// them all, `elementSize` bytes each (1, 2 or 4 for port I/O; an MMIO access is one element of
/// 1 to 8 bytes). Valid only until the vCPU's next KVM_RUN, on its own thread.
public struct IOData: @unchecked Sendable, Equatable, CustomStringConvertible {
    // @unchecked: the bytes are the vCPU's, touched only on its thread while it waits in the exit.
    public let bytes: UnsafeMutableRawBufferPointer
    public let elementSize: Int

    public init(bytes: UnsafeMutableRawBufferPointer, elementSize: Int) {
        precondition(elementSize > 0 && bytes.count % elementSize == 0)
        self.bytes = bytes
        self.elementSize = elementSize
    }

    /// How many elements: more than one only for a string instruction.
    public var count: Int { bytes.count / elementSize }

    /// The first element of a 4-byte access, as the guest stored it (little-endian).
    public var firstDoubleWord: UInt32? {
        elementSize == 4 ? UInt32(littleEndian: bytes.loadUnaligned(as: UInt32.self)) : nil
    }

    /// Equal when they hold the same elements (not necessarily at the same place).
    public static func == (lhs: IOData, rhs: IOData) -> Bool {
        lhs.elementSize == rhs.elementSize && lhs.bytes.elementsEqual(rhs.bytes)
    }

    public var description: String {
        "\(count) x \(elementSize) bytes [\(bytes.map { String($0, radix: 16) }.joined(separator: " "))]"
    }
}

/// The registers worth showing when a vCPU dies.
public struct VCPURegisterDump: Sendable, CustomStringConvertible {
    public let rip, rsp, rflags, rax, rbx, rcx, rdx, rsi, rdi: UInt64
    public let cr0, cr2, cr3, cr4, efer: UInt64
    public let csSelector: UInt16
    public let csLong: Bool

    init(regs: kvm_regs, sregs: kvm_sregs) {
        rip = regs.rip; rsp = regs.rsp; rflags = regs.rflags
        rax = regs.rax; rbx = regs.rbx; rcx = regs.rcx; rdx = regs.rdx; rsi = regs.rsi; rdi = regs.rdi
        cr0 = sregs.cr0; cr2 = sregs.cr2; cr3 = sregs.cr3; cr4 = sregs.cr4; efer = sregs.efer
        csSelector = sregs.cs.selector
        csLong = sregs.cs.l != 0
    }

    public var description: String {
        func hex(_ value: UInt64) -> String { "0x" + String(value, radix: 16) }
        return """
          rip=\(hex(rip)) rsp=\(hex(rsp)) rflags=\(hex(rflags)) cs=\(hex(UInt64(csSelector)))\(csLong ? " (64-bit)" : "")
          rax=\(hex(rax)) rbx=\(hex(rbx)) rcx=\(hex(rcx)) rdx=\(hex(rdx)) rsi=\(hex(rsi)) rdi=\(hex(rdi))
          cr0=\(hex(cr0)) cr2=\(hex(cr2)) cr3=\(hex(cr3)) cr4=\(hex(cr4)) efer=\(hex(efer))
        """
    }
}

extension KVMVCPU {
    /// KVM_PRE_FAULT_MEMORY: builds the stage-2 mappings for [gpa, gpa + size) now, so the
    /// guest's first touch of each page does not take a (nested, expensive) EPT/NPT fault.
    /// Returns false when the kernel lacks the ioctl.
    public func preFaultMemory(guestPhysicalAddress: UInt64, size: UInt64) throws(KVMError) -> Bool {
        guard vm.checkExtension(CKVM_CAP_PRE_FAULT_MEMORY) > 0 else { return false }
        var range = ckvm_pre_fault_memory()
        range.gpa = guestPhysicalAddress
        range.size = size
        while range.size > 0 {
            // The kernel advances gpa/size as it goes and may stop early (EINTR/EAGAIN): resume.
            let result = ckvmIoctl(fd.rawValue, CKVM_PRE_FAULT_MEMORY, &range)
            if result < 0 && errno != EINTR && errno != EAGAIN {
                throw .ioctl("KVM_PRE_FAULT_MEMORY", SystemError("KVM_PRE_FAULT_MEMORY"))
            }
        }
        return true
    }
}
