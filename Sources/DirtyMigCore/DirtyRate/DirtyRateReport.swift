/// How a dirty rate is measured (`dirtyrate --mode`).
public enum DirtyRateMode: String, Sendable, CaseIterable {
    /// Per-vCPU counts from the dirty rings (VMs booted with --track ring or quota).
    case ring
    /// VM-wide counts from KVM_GET_DIRTY_LOG (VMs booted with --track bitmap).
    case bitmap
    /// Any VM: hash a random sample of pages, re-hash after the interval, no write protection.
    case sample

    /// The mode a VM tracked this way serves best, and whether it can serve `self`.
    public static func best(for tracking: TrackingMode?) -> DirtyRateMode {
        switch tracking {
        case .ring?, .quota?: return .ring
        case .bitmap?: return .bitmap
        case nil: return .sample
        }
    }

    public func isServed(by tracking: TrackingMode?) -> Bool {
        switch self {
        case .sample: return true
        case .ring: return tracking?.usesDirtyRing ?? false
        case .bitmap: return tracking == .bitmap
        }
    }

    /// The `--track` that would make this mode available.
    public var requiredTracking: String {
        switch self {
        case .ring: return "--track ring or --track quota"
        case .bitmap: return "--track bitmap"
        case .sample: return "any --track"
        }
    }
}

/// Cumulative counters at one instant: what the tracker had counted and what the guest had done.
public struct DirtyCounterSnapshot: Sendable, Equatable {
    public var timeNanoseconds: UInt64
    public var unixTime: Double
    /// Pages found dirty VM-wide, cumulative (nil without dirty tracking).
    public var totalDirtyPages: UInt64?
    /// The same per vCPU (nil in VM-wide modes).
    public var vcpuDirtyPages: [UInt64]?
    /// Pages each vCPU's guest loop has touched, from its stats record.
    public var guestPages: [UInt64]
    /// Mismatches each vCPU's check workload has found (0 for other kinds); nil from a VM that
    /// does not report them.
    public var guestErrors: [UInt64]?

    public init(timeNanoseconds: UInt64, unixTime: Double, totalDirtyPages: UInt64?, vcpuDirtyPages: [UInt64]?,
                guestPages: [UInt64], guestErrors: [UInt64]? = nil) {
        self.timeNanoseconds = timeNanoseconds
        self.unixTime = unixTime
        self.totalDirtyPages = totalDirtyPages
        self.vcpuDirtyPages = vcpuDirtyPages
        self.guestPages = guestPages
        self.guestErrors = guestErrors
    }
}

/// One interval's dirty rates: a `dirtyrate` table row or JSON line.
public struct DirtyRateReport: Sendable, Equatable {
    public struct VCPURate: Sendable, Equatable {
        public var id: Int
        public var dirtyPagesPerSecond: Double?
        public var guestPagesPerSecond: Double
        /// The guest's own mismatch count at the interval's end (cumulative; check workloads).
        public var guestErrors: UInt64? = nil
        public var dirtyMiBPerSecond: Double? { dirtyPagesPerSecond.map { $0 * 4096 / 1_048_576 } }
    }

    public var unixTime: Double
    public var mode: DirtyRateMode
    public var intervalSeconds: Double
    public var totalPagesPerSecond: Double
    public var vcpus: [VCPURate]
    public var totalMiBPerSecond: Double { totalPagesPerSecond * 4096 / 1_048_576 }

    /// Rates between two snapshots of the counters (ring and bitmap modes).
    public static func between(_ start: DirtyCounterSnapshot, _ end: DirtyCounterSnapshot,
                               mode: DirtyRateMode) -> DirtyRateReport {
        let seconds = max(Double(end.timeNanoseconds &- start.timeNanoseconds) / 1e9, 1e-9)
        func rate(_ a: UInt64, _ b: UInt64) -> Double { Double(b &- a) / seconds }
        var vcpus: [VCPURate] = []
        for id in 0..<min(start.guestPages.count, end.guestPages.count) {
            var dirty: Double? = nil
            if mode == .ring, let a = start.vcpuDirtyPages, let b = end.vcpuDirtyPages, id < a.count, id < b.count {
                dirty = rate(a[id], b[id])
            }
            vcpus.append(VCPURate(id: id, dirtyPagesPerSecond: dirty,
                                  guestPagesPerSecond: rate(start.guestPages[id], end.guestPages[id]),
                                  guestErrors: end.guestErrors.flatMap { id < $0.count ? $0[id] : nil }))
        }
        let total = rate(start.totalDirtyPages ?? 0, end.totalDirtyPages ?? 0)
        return DirtyRateReport(unixTime: end.unixTime, mode: mode, intervalSeconds: seconds,
                               totalPagesPerSecond: total, vcpus: vcpus)
    }
}
