/// `--track quota`: dirty-quota exits (seed 000), built on the dirty ring because the kernel
/// API for them was never merged.
///
/// Time is cut into fixed intervals (10 ms, as seed 000 and its QEMU RFC use: long enough that a
/// quota holds many 100 µs harvests, so its granularity is fine; short enough that a hold never
/// stalls a vCPU for longer than a scheduler tick would). A vCPU under a ceiling L (pages/s) may
/// dirty a quota of L × interval pages per interval. Every harvest charges its pages; a vCPU that
/// goes over its quota first draws on the common pool (when pooled), and if that is empty it
/// takes a quota exit: kicked out of the guest and held until the interval in which its quota
/// covers what it wrote. What it wrote beyond its quota is debt carried into later intervals,
/// so overshooting between two harvests costs later time rather than being forgiven.
///
/// The common pool (migration's dirty-quota throttle): at each new interval, the quota that
/// vCPUs left unused in the interval before goes into the pool, which over-quota vCPUs draw on
/// first come, first served. The pool holds at most one interval's worth of all quotas, so an idle
/// spell does not bank a burst. A vCPU with a user limit never draws on it (its limit is a
/// ceiling), but what it leaves unused still goes in.
final class DirtyQuotaPacer: DirtyPacer {
    static let defaultIntervalNanoseconds: UInt64 = 10_000_000
    let intervalNanoseconds: UInt64
    private var ceilings: PacerCeilings
    private var pooled = false
    private var interval: UInt64 = 0
    /// Pages charged in the current interval, including debt carried from earlier ones.
    private var used: [Double]
    private var pool: Double = 0
    private var exits: [UInt64]
    private var lastHold: [UInt64]
    private var fromPool: [UInt64]

    init(vcpuCount: Int, intervalNanoseconds: UInt64 = DirtyQuotaPacer.defaultIntervalNanoseconds) {
        self.intervalNanoseconds = intervalNanoseconds
        ceilings = PacerCeilings(vcpuCount: vcpuCount)
        used = [Double](repeating: 0, count: vcpuCount)
        exits = [UInt64](repeating: 0, count: vcpuCount)
        lastHold = [UInt64](repeating: 0, count: vcpuCount)
        fromPool = [UInt64](repeating: 0, count: vcpuCount)
    }

    var isActive: Bool { ceilings.isActive }
    func isPaced(_ vcpu: Int) -> Bool { ceilings.effective(vcpu) != nil }

    /// The vCPU's quota in pages per interval, if it has a ceiling.
    func quota(_ vcpu: Int) -> Double? {
        ceilings.effective(vcpu).map { $0 * Double(intervalNanoseconds) / 1e9 }
    }

    func charge(vcpu: Int, pages: Int, now: UInt64) -> UInt64? {
        guard pages > 0, let quota = quota(vcpu) else { return nil }
        advance(to: now / intervalNanoseconds)
        used[vcpu] += Double(pages)
        guard used[vcpu] > quota else { return nil }
        if pooled && ceilings.user[vcpu] == nil && pool > 0 {
            let take = min(pool, used[vcpu] - quota)
            pool -= take
            used[vcpu] -= take
            fromPool[vcpu] += UInt64(take.rounded())
            if used[vcpu] <= quota { return nil }
        }
        // A quota exit: each later interval pays off one quota of the debt; the vCPU runs again in
        // the first interval where what is left of the debt is less than a quota.
        let intervalsToWait = UInt64((used[vcpu] / quota).rounded(.down))
        let deadline = (interval + intervalsToWait) * intervalNanoseconds
        exits[vcpu] += 1
        lastHold[vcpu] = deadline > now ? deadline - now : 0
        return deadline
    }

    /// Rolls the accounting forward to interval `next`: unused quota into the pool, debts paid
    /// down by one quota per interval gone by.
    private func advance(to next: UInt64) {
        guard next > interval else { return }
        let elapsed = Double(next - interval)
        var unused = 0.0
        var capacity = 0.0
        for vcpu in used.indices {
            guard let quota = quota(vcpu) else { used[vcpu] = 0; continue }
            capacity += quota
            // The interval just ended, plus whole quotas for intervals nobody charged in.
            unused += max(0, quota - used[vcpu]) + quota * (elapsed - 1)
            used[vcpu] = max(0, used[vcpu] - quota * elapsed)
        }
        pool = pooled ? min(unused, capacity) : 0
        interval = next
    }

    func setUserLimit(_ pagesPerSecond: Double?, vcpu: Int, now: UInt64) {
        ceilings.user[vcpu] = pagesPerSecond
        used[vcpu] = 0
        lastHold[vcpu] = 0
    }

    func setThrottle(_ pagesPerSecond: [Double]?, pooled: Bool, now: UInt64) {
        for vcpu in ceilings.throttle.indices {
            ceilings.throttle[vcpu] = pagesPerSecond?[vcpu]
            used[vcpu] = 0
            lastHold[vcpu] = 0
        }
        self.pooled = pooled && pagesPerSecond != nil
        pool = 0
    }

    func state(vcpu: Int) -> PacerVCPUState {
        PacerVCPUState(userLimit: ceilings.user[vcpu], throttleLimit: ceilings.throttle[vcpu],
                       exits: exits[vcpu], lastHoldNanoseconds: lastHold[vcpu],
                       quotaPagesPerInterval: quota(vcpu), pagesFromPool: fromPool[vcpu])
    }
}
