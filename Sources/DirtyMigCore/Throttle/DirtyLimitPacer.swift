/// `--track ring`: the dirty limit of seeds 001/003, with the penalty taken at a point we
/// control instead of the ring-full exit (which this machine's kernel lets a vCPU overrun).
///
/// The loop, for each vCPU under a ceiling L (pages/s), at every harvest that charges it:
/// - PREPARE: the pages it dirtied since the last harvest, read from its own ring;
/// - CALCULATE: its writes so far are "paid for" until `paidUntil`, which advances by pages/L;
///   the penalty is how far that lies in the future;
/// - SET PENALTY: hold the vCPU until then and kick it out of KVM_RUN;
/// - ACCEPT: the vCPU thread sleeps out the hold, then re-enters the guest.
///
/// Unlike QEMU's controller this needs no dead band (the penalty is computed, not stepped, so
/// a 1 MiB/s ceiling means 1 MiB/s), its time unit is the vCPU's own measured pace, and it reacts
/// at every harvest (every 100 µs while a ceiling is set) rather than once a second. A vCPU that
/// writes less than L is never held; after a quiet spell it may write `burstNanoseconds` worth of
/// L at once (so a reader that dirties its stats page now and then is never slowed).
final class DirtyLimitPacer: DirtyPacer {
    /// How much unused allowance a vCPU may bank, as time at its ceiling.
    static let burstNanoseconds: UInt64 = 5_000_000
    private var ceilings: PacerCeilings
    private var paidUntil: [UInt64]
    private var exits: [UInt64]
    private var lastPenalty: [UInt64]

    init(vcpuCount: Int) {
        ceilings = PacerCeilings(vcpuCount: vcpuCount)
        paidUntil = [UInt64](repeating: 0, count: vcpuCount)
        exits = [UInt64](repeating: 0, count: vcpuCount)
        lastPenalty = [UInt64](repeating: 0, count: vcpuCount)
    }

    var isActive: Bool { ceilings.isActive }
    func isPaced(_ vcpu: Int) -> Bool { ceilings.effective(vcpu) != nil }

    func charge(vcpu: Int, pages: Int, now: UInt64) -> UInt64? {
        guard pages > 0, let limit = ceilings.effective(vcpu) else { return nil }
        let earliest = now > Self.burstNanoseconds ? now - Self.burstNanoseconds : 0
        let cost = UInt64(Double(pages) / limit * 1e9)
        paidUntil[vcpu] = max(paidUntil[vcpu], earliest) &+ cost
        guard paidUntil[vcpu] > now else { return nil }
        exits[vcpu] += 1
        lastPenalty[vcpu] = paidUntil[vcpu] - now
        return paidUntil[vcpu]
    }

    func setUserLimit(_ pagesPerSecond: Double?, vcpu: Int, now: UInt64) {
        ceilings.user[vcpu] = pagesPerSecond
        restart(vcpu, now: now)
    }

    func setThrottle(_ pagesPerSecond: [Double]?, pooled: Bool, now: UInt64) {
        for vcpu in ceilings.throttle.indices {
            ceilings.throttle[vcpu] = pagesPerSecond?[vcpu]
            restart(vcpu, now: now)
        }
    }

    /// A new ceiling starts from now: no debt from the old one, no banked allowance.
    private func restart(_ vcpu: Int, now: UInt64) {
        paidUntil[vcpu] = now
        lastPenalty[vcpu] = 0
    }

    func state(vcpu: Int) -> PacerVCPUState {
        PacerVCPUState(userLimit: ceilings.user[vcpu], throttleLimit: ceilings.throttle[vcpu],
                       exits: exits[vcpu], lastHoldNanoseconds: lastPenalty[vcpu])
    }
}
