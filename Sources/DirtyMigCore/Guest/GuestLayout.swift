// The workload guest's ABI: where things live in guest-physical memory, and the binary layout of
// the config block (written by the host, read by the guest) and the stats area (written by the
// guest, read by the host). The guest's C/assembly source (Guest/src/) mirrors these numbers in
// Guest/src/layout.h; the man page documents them for people driving the guest under QEMU.
//
// Guest-physical map (all below the workload area is "system" memory):
//   0x0000_7000  AP trampoline (16-bit; the BSP copies it here, SIPI vector 0x07)
//   0x0010_0000  the kernel image (multiboot a.out-kludge, flat binary, loaded at 1 MiB)
//   0x0020_0000  config block (64 KiB region)
//   0x0021_0000  stats area: a 64-byte header, then 64 bytes per vCPU
//   0x0021_2000  output records: 64 bytes per vCPU (check workloads with emit=)
//   0x0030_0000  page tables (PML4, PDPT, one PD per GiB identity-mapped with 2 MiB pages)
//   0x0040_0000  stacks, 16 KiB per vCPU
//   0x0100_0000  workload area: working sets are offsets from here
// RAM follows QEMU's `pc` machine: all of it below 4 GiB when it is smaller than 3.5 GiB,
// otherwise 3 GiB below 4 GiB and the rest from 4 GiB up. Working-set offsets count RAM bytes,
// so a working set that crosses 3 GiB continues at 4 GiB.
public enum GuestLayout {
    public static let pageSize: UInt64 = 4096
    public static let trampolineAddress: UInt64 = 0x7000
    public static let imageAddress: UInt64 = 0x10_0000
    public static let configAddress: UInt64 = 0x20_0000
    public static let configRegionSize: UInt64 = 0x1_0000
    public static let statsAddress: UInt64 = 0x21_0000
    public static let outputAddress: UInt64 = 0x21_2000
    public static let pageTablesAddress: UInt64 = 0x30_0000
    public static let stacksAddress: UInt64 = 0x40_0000
    public static let stackSize: UInt64 = 0x4000
    public static let workloadBase: UInt64 = 0x100_0000

    /// Most vCPUs the guest supports (stats, stacks and config are sized for this many).
    public static let maxVCPUs = 64
    /// Most RAM the guest's page tables can map (one page directory per GiB, 64 of them).
    public static let maxAddressableBytes: UInt64 = 64 << 30
    /// Smallest RAM the guest runs in: the system area plus 16 MiB of workload area.
    public static let minimumMemory: UInt64 = 32 << 20

    /// Where RAM starts again above the PCI hole, and the RAM split rule QEMU's `pc` machine uses.
    public static let highMemoryBase: UInt64 = 4 << 30
    public static func lowMemorySize(forTotal total: UInt64) -> UInt64 {
        total >= 0xE000_0000 ? 0xC000_0000 : total
    }

    /// Guest-physical address of a byte counted in RAM offsets (skipping the PCI hole).
    public static func guestPhysicalAddress(ramOffset: UInt64, totalMemory: UInt64) -> UInt64 {
        let low = lowMemorySize(forTotal: totalMemory)
        return ramOffset < low ? ramOffset : highMemoryBase + (ramOffset - low)
    }

    // Config block, little-endian. Header (64 bytes):
    //   0 u32 magic "DMCF" (0x46434D44)   4 u32 version (1)
    //   8 u32 header size (64)           12 u32 per-vCPU entry size (64)
    //  16 u32 vCPU count                 20 u32 flags (0)
    //  24 u64 TSC frequency in Hz
    //  32 u64 total RAM in bytes         40 u64 RAM below 4 GiB in bytes
    //  48 u64 workload area base (GPA)   56 u64 reserved (0)
    // Then one 64-byte entry per vCPU (indexed by local APIC ID):
    //   0 u32 kind (WorkloadKind)         4 u32 pattern (AccessPattern)
    //   8 u32 write percent (mix)        12 u32 hot fraction in millionths (hot pattern)
    //  16 u64 working-set offset (bytes from the workload area, RAM offsets)
    //  24 u64 working-set size (bytes, multiple of 4096)
    //  32 u64 rate in bytes of touched pages per second (0 = unpaced)
    //  40 u64 passes (0 = forever)       48 u64 random seed
    //  56 u64 check: output record interval in microseconds (0 = none; 1,000 to 10,000,000)
    public static let configMagic: UInt32 = 0x4643_4D44
    public static let configVersion: UInt32 = 1
    public static let configHeaderSize = 64
    public static let configEntrySize = 64

    // Stats area. Header (64 bytes) at statsAddress:
    //   0 u32 magic "DMST" (0x54534D44)   4 u32 version (1)
    //   8 u32 vCPUs that reached the workload loop   12 u32 guest error code (0 = none)
    // Then one 64-byte record per vCPU at statsAddress + 64 * (1 + apicID):
    //   0 u64 pages touched               8 u64 completed passes over the working set
    //  16 u32 state (GuestVCPUState)     20 u32 local APIC ID
    //  24 u64 pages written              32 u64 TSC when the workload started
    //  40 u64 TSC of the last publish: once finished, when the workload finished (passes reached)
    //  48 u64 check: mismatches found   56 u64 reserved
    // Counters are published every ~8 ms (and at the end), not per page: every store to the
    // stats page is a dirty page to the tracker, and a reading vCPU must not look like a writer.
    // The workload loop runs in ring 3 with IOPL 3 and keeps its state in registers: the only
    // pages it writes are its working set, the stats page and (check) its output record. Ring 3
    // because some KVMs (PVM, without VT-x/SVM) emulate an unmodified guest's ring 0 instruction
    // by instruction.
    public static let statsMagic: UInt32 = 0x5453_4D44
    public static let statsHeaderSize = 64
    public static let statsRecordSize = 64
    public static func statsRecordAddress(vcpu: Int) -> UInt64 {
        statsAddress + UInt64(statsHeaderSize + statsRecordSize * vcpu)
    }

    // Output records (check workloads): 64 bytes per vCPU at outputAddress + 64 * apicID, on a
    // page of their own, so a vCPU that emits dirties neither the stats page nor a working set.
    //   0 u64 sequence number: 1 for the first record, +1 for each one after
    //   8 u64 pages touched when written   16 u64 mismatches found (as in the stats record)
    //  24 u64 checksum: the wrapping sum of the first words read in the last complete pass
    //  32 u64 complete passes (the checksum is the last one's; 0: none yet, checksum 0)
    //  40 u64 TSC when written            48 u32 APIC ID   52 u32 reserved
    //  56 u64 the guest's own (when the next record is due)
    // The vCPU writes the record, then its APIC ID to outputPort (one OUT) and waits for the
    // host, which reads the record during that exit. `passes` and the last checksum are kept up
    // to date with or without emit= (they are the check loop's own state).
    public static let outputRecordSize = 64
    public static func outputRecordAddress(vcpu: Int) -> UInt64 {
        outputAddress + UInt64(outputRecordSize * vcpu)
    }

    /// I/O ports the guest writes to talk to the host. Under QEMU they are unassigned (ignored),
    /// except 0xE9, which `-debugcon` can show.
    public static let consolePort: UInt16 = 0xE9   // byte: console character
    public static let errorPort: UInt16 = 0x5D0     // dword: guest error code (GuestError)
    /// dword: the APIC ID of a vCPU whose workload finished (its passes are done). It will never
    /// do anything again, so a VMM may stop running it. Where the hypervisor supports it the vCPU
    /// then halts in ring 0; under PVM (ring 3 cannot get back to ring 0 there) it spins on `pause`.
    public static let parkPort: UInt16 = 0x5D4
    /// dword: the APIC ID of a check vCPU whose output record (outputRecordAddress) is new.
    public static let outputPort: UInt16 = 0x5D8
}

public enum WorkloadKind: UInt32, Sendable, CaseIterable {
    /// `check` writes every page it touches (its stats count them as writes): each visit
    /// verifies the page's first and last word against the previous pass's value, then writes
    /// this pass's (CheckWorkload).
    case idle = 0, write = 1, read = 2, mix = 3, check = 4
}

public enum AccessPattern: UInt32, Sendable {
    case sequential = 0, random = 1, hot = 2
}

/// What a write workload puts in the pages it writes (`content=`): one word, the rest as it was
/// (zero unless written otherwise: mostly zero, the default); the whole page as text-like words
/// (zstd -1 compresses it about 3x); the whole page random (incompressible).
public enum PageContent: UInt16, Sendable, CaseIterable {
    case sparse = 0, text = 1, random = 2

    public var name: String {
        switch self {
        case .sparse: return "sparse"
        case .text: return "text"
        case .random: return "random"
        }
    }
}

public enum GuestVCPUState: UInt32, Sendable {
    case notStarted = 0, running = 1, finished = 2, idle = 3, failed = 4
}

/// Codes the guest reports on `errorPort` and in the stats header.
public enum GuestError: UInt32, Sendable {
    case none = 0
    case badConfigMagic = 1
    case badConfigVersion = 2
    case tooManyVCPUs = 3
    case workingSetOutOfRange = 4
    case memoryTooLarge = 5
    case noLongMode = 6
    case badWorkload = 7

    public var explanation: String {
        switch self {
        case .none: return "no error"
        case .badConfigMagic: return "no config block at 0x200000 (magic missing)"
        case .badConfigVersion: return "config block version not understood by this guest"
        case .tooManyVCPUs: return "more vCPUs than the guest supports (64)"
        case .workingSetOutOfRange: return "a working set lies outside guest RAM"
        case .memoryTooLarge: return "more RAM than the guest can map (64 GiB)"
        case .noLongMode: return "the CPU does not support long mode"
        case .badWorkload: return "a vCPU's workload is not one the guest runs (check needs pattern seq or random)"
        }
    }
}
