/// Dirty-quota accounting (seed 000), built on the dirty ring because the kernel API for it was
/// never merged: every harvested page is charged to the vCPU that dirtied it, against a quota of
/// pages per fixed interval. A vCPU that reaches its quota is kicked out of KVM_RUN and held until
/// its interval ends: that is its "quota exit". Ring-full exits are one more charge point.
/// With no quota set for a vCPU, charging is a nil check. Guarded by RingTracker's lock.
final class DirtyQuotaAccounting {
    /// Length of a quota interval. Seed 000 uses 10 ms; the throttling work may tune it.
    var intervalNanoseconds: UInt64 = 10_000_000
    private(set) var quotas: [UInt64?]
    private var intervalIndex: [UInt64]
    private var charged: [UInt64]
    private var holdUntil: [UInt64]
    private(set) var exits: [UInt64]

    init(vcpuCount: Int) {
        quotas = [UInt64?](repeating: nil, count: vcpuCount)
        intervalIndex = [UInt64](repeating: 0, count: vcpuCount)
        charged = [UInt64](repeating: 0, count: vcpuCount)
        holdUntil = [UInt64](repeating: 0, count: vcpuCount)
        exits = [UInt64](repeating: 0, count: vcpuCount)
    }

    func setQuota(_ pages: UInt64?, vcpu: Int) {
        quotas[vcpu] = pages
        if pages == nil { holdUntil[vcpu] = 0 }
    }

    /// Charges `pages` to `vcpu` at time `now`; returns true when the vCPU just used up its quota
    /// and must be kicked out of the guest.
    @inline(__always)
    func charge(vcpu: Int, pages: Int, now: UInt64) -> Bool {
        guard let quota = quotas[vcpu], pages > 0 else { return false }
        let interval = now / intervalNanoseconds
        if interval != intervalIndex[vcpu] {
            intervalIndex[vcpu] = interval
            charged[vcpu] = 0
        }
        charged[vcpu] += UInt64(pages)
        guard charged[vcpu] >= quota, holdUntil[vcpu] <= now else { return false }
        holdUntil[vcpu] = (interval + 1) * intervalNanoseconds
        exits[vcpu] += 1
        return true
    }

    func holdDeadline(vcpu: Int, now: UInt64) -> UInt64? {
        holdUntil[vcpu] > now ? holdUntil[vcpu] : nil
    }
}
