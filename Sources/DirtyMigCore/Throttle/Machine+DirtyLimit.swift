import Foundation

/// Why a dirty limit cannot be set.
public enum DirtyLimitError: Error, Equatable, CustomStringConvertible {
    /// Bitmap logging (or no tracking) cannot say which vCPU dirtied a page.
    case needsPerVCPUTracking(TrackingMode?)
    case noSuchVCPU(Int, count: Int)
    case rateOutOfRange(Double)

    public var description: String {
        switch self {
        case .needsPerVCPUTracking(let mode):
            return "dirty limits need per-vCPU dirty counts, which --track \(mode?.rawValue ?? "none") does not give (bitmap logging has no per-vCPU attribution); boot the VM with --track ring (dirty limit) or --track quota (dirty-quota exits)"
        case .noSuchVCPU(let vcpu, let count):
            return "vCPU \(vcpu) does not exist: this VM has vCPUs 0 to \(count - 1)"
        case .rateOutOfRange(let rate):
            return "a dirty limit must be at least 4 KiB/s (one page per second), not \(Int(rate)) bytes/s"
        }
    }
}

/// One vCPU's limit, pace and throttle state, as `limit --show` lists them.
public struct VCPUThrottleStatus: Sendable {
    public var id: Int
    /// The user's ceiling (`dirtymig limit`), bytes/s.
    public var limitBytesPerSecond: Double?
    /// A running migration's ceiling for it (dirty-limit or dirty-quota throttle), bytes/s.
    public var migrationLimitBytesPerSecond: Double?
    /// Dirty bytes/s over the last whole second (ring and quota modes).
    public var currentBytesPerSecond: Double?
    /// Share of the last second the vCPU spent held by a throttle, 0...1.
    public var heldFraction: Double
    /// Dirty-limit penalties or quota exits so far.
    public var exits: UInt64
    /// The last penalty / quota hold, in seconds.
    public var lastHoldSeconds: Double
    /// Quota mode: pages per interval in force.
    public var quotaPagesPerInterval: Double?
    /// Auto-converge's throttle in percent (0 when off); it applies to every vCPU.
    public var cpuThrottlePercent: Int
}

extension Machine {
    /// Sets (or with nil removes) a dirty-rate ceiling in bytes/s on each of `vcpus`. Live: it
    /// takes effect at the vCPU's next harvest, also while the VM migrates.
    public func setDirtyLimit(bytesPerSecond: Double?, vcpus: [Int]) throws(DirtyLimitError) {
        guard let ring = ringTracker else { throw .needsPerVCPUTracking(configuration.tracking) }
        if let rate = bytesPerSecond, !(rate >= 4096 && rate.isFinite) { throw .rateOutOfRange(rate) }
        for vcpu in vcpus where !(0..<configuration.vcpuCount).contains(vcpu) {
            throw .noSuchVCPU(vcpu, count: configuration.vcpuCount)
        }
        for vcpu in vcpus { ring.setUserLimit(pagesPerSecond: bytesPerSecond.map { $0 / 4096 }, vcpu: vcpu) }
    }

    /// Every vCPU's limits, recent dirty rate and throttle state.
    public func throttleStatus() -> [VCPUThrottleStatus] {
        let ring = ringTracker
        let pacers = ring?.pacerStates()
        let rates = ring?.recentPagesPerSecond()
        let held = ring?.recentHeldFractions() ?? [Double](repeating: 0, count: configuration.vcpuCount)
        return (0..<configuration.vcpuCount).map { id in
            let pacer = pacers?[id]
            return VCPUThrottleStatus(
                id: id, limitBytesPerSecond: pacer?.userLimit.map { $0 * 4096 },
                migrationLimitBytesPerSecond: pacer?.throttleLimit.map { $0 * 4096 },
                currentBytesPerSecond: rates.map { $0[id] * 4096 }, heldFraction: held[id],
                exits: pacer?.exits ?? 0, lastHoldSeconds: Double(pacer?.lastHoldNanoseconds ?? 0) / 1e9,
                quotaPagesPerInterval: pacer?.quotaPagesPerInterval, cpuThrottlePercent: cpuThrottle.percent)
        }
    }
}
