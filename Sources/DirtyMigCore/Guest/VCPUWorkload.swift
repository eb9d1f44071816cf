/// What one vCPU of the workload guest does: the resolved, per-vCPU form of `--workload` specs,
/// exactly what goes into that vCPU's entry of the config block (see GuestLayout).
public struct VCPUWorkload: Sendable, Equatable {
    public var kind: WorkloadKind
    public var pattern: AccessPattern
    /// For `.write`: what the written pages hold.
    public var content: PageContent = .sparse
    /// For `.hot`: the fraction of the working set (at its start) that takes 1 − F of the accesses.
    public var hotFraction: Double
    /// For `.mix`: the percentage of touched pages that are written (0...100).
    public var writePercent: UInt32
    /// Bytes from the workload area's start (GuestLayout.workloadBase), in RAM offsets.
    public var offset: UInt64
    /// Working-set size in bytes, a multiple of the page size (0 only for `.idle`).
    public var size: UInt64
    /// Bytes of touched pages per second; 0 = as fast as the vCPU can.
    public var rateBytesPerSecond: UInt64
    /// Passes over the working set after which the vCPU idles; 0 = forever.
    public var passes: UInt64
    public var seed: UInt64
    /// For `.check`: write an output record (GuestLayout's output records) this often, in
    /// microseconds; 0 = never.
    public var emitMicroseconds: UInt64

    public init(kind: WorkloadKind, pattern: AccessPattern = .sequential, hotFraction: Double = 0.1,
                writePercent: UInt32 = 50, offset: UInt64 = 0, size: UInt64 = 0,
                rateBytesPerSecond: UInt64 = 0, passes: UInt64 = 0, seed: UInt64 = 0,
                emitMicroseconds: UInt64 = 0) {
        self.kind = kind
        self.pattern = pattern
        self.hotFraction = hotFraction
        self.writePercent = writePercent
        self.offset = offset
        self.size = size
        self.rateBytesPerSecond = rateBytesPerSecond
        self.passes = passes
        self.seed = seed
        self.emitMicroseconds = emitMicroseconds
    }

    public static let idle = VCPUWorkload(kind: .idle)

    /// Pages of the working set.
    public var pages: UInt64 { size / GuestLayout.pageSize }
}
