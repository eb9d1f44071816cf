/// The guest's own counters, read from its stats area (GuestLayout.statsAddress): how many pages
/// each vCPU's workload loop has touched, so the guest's throughput is known from outside at any
/// time, whatever tracking (or none) the host uses.
public struct GuestStats: Sendable, Equatable {
    public var bootedVCPUs: Int
    public var error: GuestError?
    public var vcpus: [VCPUGuestStats]

    /// Reads the stats area of a running guest in `memory`.
    init(memory: GuestMemory, vcpuCount: Int) {
        self.init(statsArea: UnsafeRawPointer(memory.hostPointer(ramOffset: GuestLayout.statsAddress)), vcpuCount: vcpuCount)
    }

    /// Reads the stats area of a running guest (the host's mapping of guest memory). The guest
    /// writes these words concurrently; 8-byte aligned loads are atomic on x86, which is all a
    /// counter read needs.
    public init(statsArea: UnsafeRawPointer, vcpuCount: Int) {
        func u32(_ offset: Int) -> UInt32 { statsArea.load(fromByteOffset: offset, as: UInt32.self) }
        func u64(_ offset: Int) -> UInt64 { statsArea.load(fromByteOffset: offset, as: UInt64.self) }
        let valid = u32(0) == GuestLayout.statsMagic
        bootedVCPUs = valid ? Int(u32(8)) : 0
        let code = u32(12)
        error = code == 0 ? nil : (GuestError(rawValue: code) ?? GuestError.none)
        vcpus = (0..<vcpuCount).map { index in
            let base = GuestLayout.statsHeaderSize + GuestLayout.statsRecordSize * index
            return VCPUGuestStats(pages: u64(base), passes: u64(base + 8), writes: u64(base + 24),
                                  state: GuestVCPUState(rawValue: u32(base + 16)) ?? .notStarted,
                                  apicID: u32(base + 20), tscStart: u64(base + 32), tscNow: u64(base + 40),
                                  errors: u64(base + 48))
        }
    }

    /// Decodes a dump of the stats area (e.g. QEMU `pmemsave 0x210000 4160 FILE`).
    public init(bytes: [UInt8], vcpuCount: Int) {
        let needed = GuestLayout.statsHeaderSize + GuestLayout.statsRecordSize * vcpuCount
        let padded = bytes + [UInt8](repeating: 0, count: max(0, needed - bytes.count))
        self = padded.withUnsafeBytes { GuestStats(statsArea: $0.baseAddress!, vcpuCount: vcpuCount) }
    }
}

/// One vCPU's record. The guest publishes it about every 8 ms (and when it finishes).
public struct VCPUGuestStats: Sendable, Equatable {
    /// Pages touched (read or written) since the workload started.
    public var pages: UInt64
    /// Completed passes over the working set (every pattern's pass is one working set of pages).
    public var passes: UInt64
    /// Pages written.
    public var writes: UInt64
    public var state: GuestVCPUState
    public var apicID: UInt32
    /// The guest TSC when the workload loop started.
    public var tscStart: UInt64
    /// The guest TSC of the last publish; once finished, when the workload finished. With
    /// `pages` it gives the guest's own rate, free of the host's sampling jitter.
    public var tscNow: UInt64
    /// For a check workload: pages whose first or last word was not what the guest wrote there
    /// on its previous pass (0 before the first): memory lost, stale or torn under it. Counted
    /// when found, not only at a publish.
    public var errors: UInt64

    public init(pages: UInt64, passes: UInt64, writes: UInt64, state: GuestVCPUState, apicID: UInt32,
                tscStart: UInt64, tscNow: UInt64, errors: UInt64 = 0) {
        self.pages = pages
        self.passes = passes
        self.writes = writes
        self.state = state
        self.apicID = apicID
        self.tscStart = tscStart
        self.tscNow = tscNow
        self.errors = errors
    }
}
