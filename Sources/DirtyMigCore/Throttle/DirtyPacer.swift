/// Paces the vCPUs' dirtying at the harvester's charge points (per-vCPU attribution from the
/// dirty ring): each harvest charges the pages a vCPU dirtied to it, and the pacer answers
/// with the time until which that vCPU must stay out of the guest, if it went over its
/// allowance. The caller then sets the hold and kicks the vCPU out of KVM_RUN.
///
/// Two kinds of ceiling meet here and the tighter one applies: a user's `dirtymig limit` on a
/// vCPU, and the migration throttle's ceiling for it (see MigrationThrottle).
///
/// Not thread-safe: RingTracker calls it under its lock.
protocol DirtyPacer: AnyObject {
    /// Charges `pages` dirtied by `vcpu`, seen at `now`; returns a hold deadline or nil.
    func charge(vcpu: Int, pages: Int, now: UInt64) -> UInt64?
    /// A user limit in pages/s (nil removes it).
    func setUserLimit(_ pagesPerSecond: Double?, vcpu: Int, now: UInt64)
    /// The migration throttle's per-vCPU ceilings in pages/s (nil: no throttle); `pooled` lets
    /// vCPUs draw on what others leave unused (dirty-quota only).
    func setThrottle(_ pagesPerSecond: [Double]?, pooled: Bool, now: UInt64)
    /// Whether any ceiling is set.
    var isActive: Bool { get }
    /// Whether this vCPU has a ceiling (the harvester polls faster while such a vCPU runs).
    func isPaced(_ vcpu: Int) -> Bool
    func state(vcpu: Int) -> PacerVCPUState
}

/// What a pacer tells about one vCPU, for `limit --show` and migration reports.
public struct PacerVCPUState: Sendable, Equatable {
    /// The user's limit, in pages/s.
    public var userLimit: Double?
    /// The migration throttle's ceiling, in pages/s.
    public var throttleLimit: Double?
    /// The ceiling in force (the tighter of the two).
    public var effectiveLimit: Double? {
        switch (userLimit, throttleLimit) {
        case let (user?, throttle?): return min(user, throttle)
        case let (user, throttle): return user ?? throttle
        }
    }
    /// How many times this vCPU was held: dirty-limit penalties or quota exits.
    public var exits: UInt64 = 0
    /// The last penalty (dirty-limit), or the last hold (quota), in nanoseconds.
    public var lastHoldNanoseconds: UInt64 = 0
    /// Dirty-quota only: pages per interval, and pages drawn from the common pool so far.
    public var quotaPagesPerInterval: Double?
    public var pagesFromPool: UInt64 = 0
}

/// Ceilings from the user and the throttle, per vCPU, with the tighter one in force.
struct PacerCeilings {
    var user: [Double?]
    var throttle: [Double?]

    init(vcpuCount: Int) {
        user = [Double?](repeating: nil, count: vcpuCount)
        throttle = [Double?](repeating: nil, count: vcpuCount)
    }

    func effective(_ vcpu: Int) -> Double? {
        switch (user[vcpu], throttle[vcpu]) {
        case let (u?, t?): return min(u, t)
        case let (u, t): return u ?? t
        }
    }

    var isActive: Bool { user.contains { $0 != nil } || throttle.contains { $0 != nil } }
}
