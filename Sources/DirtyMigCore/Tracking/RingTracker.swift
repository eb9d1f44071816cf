import Foundation
import Synchronization

/// `--track ring` and `--track quota`: per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
/// harvested by a dedicated thread every `pollInterval` so that no ring ever nears full.
///
/// The kernel on our machines lets a vCPU overrun its ring (its soft-full exit comes late, it
/// wraps and overwrites entries, then exits with KVM_EXIT_DIRTY_RING_FULL forever with nothing to
/// harvest). So: ring-full exits are never relied on, only handled; a harvest that finds a ring at
/// its soft limit, or a ring-full exit with nothing to harvest, is an overrun: it is reported as
/// a DirtyLoss, the vCPU is recovered (every entry marked harvested, then a reset), and our read
/// position is re-synchronised with the kernel's.
///
/// Resets are batched: KVM_RESET_DIRTY_RINGS re-protects pages, and a page written again after a
/// reset is a new dirty entry. Resetting after every 1 ms poll would make a vCPU's few hot pages
/// (its stats record) look like kilobytes per millisecond of dirtying; instead a reset happens
/// when a ring has a quarter of its entries harvested, and at every sync a consumer asks for.
public final class RingTracker: DirtyTracker, @unchecked Sendable {
    // @unchecked: all mutable state is guarded by `lock`; `running` is atomic.
    public let mode: TrackingMode
    public let entries: Int
    public let pollIntervalNanoseconds: UInt64
    private let vm: KVMVirtualMachine
    private let memory: GuestMemory
    private let slotFirstPage: [Int]
    private let slotPageCount: [Int]

    private let lock = NSLock()
    private var rings: [DirtyRing] = []
    private var pending: DirtyPageBitmap
    /// Pages already counted since the last KVM_RESET_DIRTY_RINGS, and the list to clear them.
    /// Dirty logging means "written since it was last re-protected": a page counts once per
    /// reset epoch. Some kernels (PVM here) push an entry for every trapped store, so raw entry
    /// counts would overstate the rate several times over.
    private var countedSinceReset: DirtyPageBitmap
    private var countedPages: [Int] = []
    private var vcpuPages: [UInt64] = []
    private var ringFullExits: [UInt64] = []
    private var ringOverruns: [UInt64] = []
    private var losses: [DirtyLoss] = []
    private var totalPages: UInt64 = 0
    private var lastSync: UInt64 = 0
    private var started = false
    /// Ceilings per vCPU: the dirty limit in ring mode, dirty-quota exits in quota mode.
    private var pacer: DirtyPacer
    private let holds: VCPUHolds
    /// Per-vCPU dirty pages/s over the last whole second the harvester saw (for `limit --show`).
    private var recentRates: [Double] = []
    private var rateWindowStart: UInt64 = 0
    private var rateWindowPages: [UInt64] = []
    private var rateWindowHeld: [UInt64] = []
    private var recentHeld: [Double] = []
    private var harvesterError: KVMError?

    private let running = Atomic<Bool>(false)
    private var harvester: OSThread?
    /// Kicks a vCPU out of KVM_RUN (set by the machine that owns the vCPU threads).
    public var kick: (@Sendable (Int) -> Void)?

    /// Enables the ring on the VM: must run right after VM creation, before any vCPU exists.
    /// The pacer (dirty limit or dirty quota) sets its holds in `holds`.
    public init(vm: KVMVirtualMachine, memory: GuestMemory, entries: Int, mode: TrackingMode,
                holds: VCPUHolds, pollInterval: Duration = .milliseconds(1)) throws(KVMError) {
        precondition(mode.usesDirtyRing)
        let bytes = UInt64(entries * CKVMConstants.dirtyGFNSize)
        if vm.checkExtension(CKVMConstants.capDirtyLogRingAcqRel) > 0 {
            try vm.enableCapability(CKVMConstants.capDirtyLogRingAcqRel, "KVM_CAP_DIRTY_LOG_RING_ACQ_REL", args: [bytes])
        } else if vm.checkExtension(CKVMConstants.capDirtyLogRing) > 0 {
            try vm.enableCapability(CKVMConstants.capDirtyLogRing, "KVM_CAP_DIRTY_LOG_RING", args: [bytes])
        } else {
            throw .missingCapability("KVM_CAP_DIRTY_LOG_RING (use --track bitmap)")
        }
        self.vm = vm
        self.memory = memory
        self.entries = entries
        self.mode = mode
        self.holds = holds
        pacer = mode == .quota ? DirtyQuotaPacer(vcpuCount: 0) : DirtyLimitPacer(vcpuCount: 0)
        let components = pollInterval.components
        pollIntervalNanoseconds = UInt64(components.seconds) * 1_000_000_000 + UInt64(components.attoseconds / 1_000_000_000)
        slotFirstPage = memory.regions.map(\.firstPage)
        slotPageCount = memory.regions.map(\.pageCount)
        pending = DirtyPageBitmap(pageCount: memory.pageCount)
        countedSinceReset = DirtyPageBitmap(pageCount: memory.pageCount)
    }

    /// Maps the ring of a vCPU just created; vCPUs must be attached in id order.
    public func attach(_ vcpu: KVMVCPU) throws(KVMError) {
        let mapping = try vcpu.mapDirtyRing(entries: entries)
        lock.lock(); defer { lock.unlock() }
        precondition(vcpu.id == rings.count)
        rings.append(DirtyRing(vcpu: vcpu.id, entries: entries, mapping: mapping))
        vcpuPages.append(0)
        ringFullExits.append(0)
        ringOverruns.append(0)
        recentRates.append(0)
        recentHeld.append(0)
        pacer = mode == .quota ? DirtyQuotaPacer(vcpuCount: rings.count) : DirtyLimitPacer(vcpuCount: rings.count)
    }

    // MARK: DirtyTracker

    public func start() throws(KVMError) {
        lock.lock()
        if started { lock.unlock(); return }
        do {
            try vm.setMemorySlots(of: memory, logDirtyPages: true)
        } catch { lock.unlock(); throw error }
        started = true
        lastSync = MonotonicClock.nanoseconds()
        lock.unlock()
        if pollIntervalNanoseconds > 0 {
            running.store(true, ordering: .releasing)
            harvester = OSThread(name: "dirty-ring-harvester") { [self] in harvestLoop() }
        }
    }

    public func stop() {
        running.store(false, ordering: .releasing)
        harvester?.join()
        harvester = nil
        lock.lock(); defer { lock.unlock() }
        guard started else { return }
        try? syncLocked()
        try? vm.setMemorySlots(of: memory, logDirtyPages: false)
        started = false
    }

    public func sync() throws(KVMError) {
        lock.lock(); defer { lock.unlock() }
        try syncLocked()
    }

    public func counters() -> DirtyCounters {
        lock.lock(); defer { lock.unlock() }
        return DirtyCounters(timeNanoseconds: lastSync, totalPages: totalPages, vcpuPages: vcpuPages,
                             ringFullExits: ringFullExits, ringOverruns: ringOverruns,
                             quotaExits: mode == .quota ? rings.indices.map { pacer.state(vcpu: $0).exits } : nil)
    }

    public func collect() throws(KVMError) -> DirtyCollection {
        lock.lock(); defer { lock.unlock() }
        try syncLocked()
        let collection = DirtyCollection(pages: pending, losses: losses)
        pending.removeAll()
        losses.removeAll()
        return collection
    }

    public func vcpuExitedRingFull(_ vcpu: Int) throws(KVMError) {
        lock.lock(); defer { lock.unlock() }
        ringFullExits[vcpu] += 1
        let ring = rings[vcpu]
        ring.searchFrontier = true   // nothing normal makes a vCPU exit here: look everywhere
        let harvested = harvestLocked(ring, now: MonotonicClock.nanoseconds())
        let before = ring.resetIndex
        try resetLocked()
        if harvested == 0 && ring.resetIndex == before {
            // Stuck: the kernel says the ring is full, and nothing in it is left to harvest or to
            // give back: what it counts as used was lost. Give back a soft limit's worth; if it
            // still counts a soft limit as used, the next ring-full exit gives back more.
            _ = try resetLocked()   // no other ring may hold harvested entries while we probe
            let vm = self.vm
            _ = try ring.recoverStuck { () throws(KVMError) -> Int in try vm.resetDirtyRings() }
            clearCounted()
            recordLoss(DirtyLoss(vcpu: vcpu, kind: .stuckRingRecovered, timeNanoseconds: MonotonicClock.nanoseconds()))
        }
    }

    // MARK: Ceilings (dirty limit in ring mode, dirty quota in quota mode)

    /// Sets (or with nil removes) a user's dirty-rate ceiling on a vCPU, in pages/s.
    public func setUserLimit(pagesPerSecond: Double?, vcpu: Int) {
        lock.lock(); defer { lock.unlock() }
        pacer.setUserLimit(pagesPerSecond, vcpu: vcpu, now: MonotonicClock.nanoseconds())
        if pagesPerSecond == nil { holds.release(vcpu) }
        updatePacedLocked()
    }

    /// Sets (or with nil removes) the migration throttle's ceilings, one per vCPU, in pages/s.
    /// `pooled`: dirty-quota's common pool of unused quota.
    public func setThrottle(pagesPerSecond: [Double]?, pooled: Bool = false) {
        lock.lock(); defer { lock.unlock() }
        pacer.setThrottle(pagesPerSecond, pooled: pooled, now: MonotonicClock.nanoseconds())
        if pagesPerSecond == nil {
            for vcpu in rings.indices where pacer.state(vcpu: vcpu).effectiveLimit == nil { holds.release(vcpu) }
        }
        updatePacedLocked()
    }

    private func updatePacedLocked() {
        for vcpu in rings.indices { holds.setPaced(vcpu, pacer.isPaced(vcpu)) }
    }

    /// Called on a paced vCPU's own thread when its run slice ended: charges what it dirtied
    /// (which may set its hold). The slice, not the harvester, is what bounds how far a paced
    /// vCPU can overshoot its allowance.
    public func vcpuSliceEnded(_ vcpu: Int) {
        lock.lock(); defer { lock.unlock() }
        harvestLocked(rings[vcpu], now: MonotonicClock.nanoseconds(), kickOnHold: false)
    }

    /// Each vCPU's ceilings and how often it was held.
    public func pacerStates() -> [PacerVCPUState] {
        lock.lock(); defer { lock.unlock() }
        return rings.indices.map { pacer.state(vcpu: $0) }
    }

    /// Each vCPU's dirty pages/s over the last whole second the harvester saw.
    public func recentPagesPerSecond() -> [Double] {
        lock.lock(); defer { lock.unlock() }
        return recentRates
    }

    /// Share of the last whole second each vCPU spent held by a throttle.
    public func recentHeldFractions() -> [Double] {
        lock.lock(); defer { lock.unlock() }
        return recentHeld
    }

    /// Length of a dirty-quota interval (quota mode), in nanoseconds.
    public var quotaIntervalNanoseconds: UInt64 {
        (pacer as? DirtyQuotaPacer)?.intervalNanoseconds ?? 0
    }

    /// The first error the harvester thread hit, if any (it keeps running).
    public var harvestError: KVMError? {
        lock.lock(); defer { lock.unlock() }
        return harvesterError
    }

    // MARK: Harvesting (all under `lock`)

    private func harvestLoop() {
        ThreadPriority.preferRealtime()
        while running.load(ordering: .acquiring) {
            lock.lock()
            let now = MonotonicClock.nanoseconds()
            var needReset = false
            for ring in rings {
                harvestLocked(ring, now: now)
                if ring.harvestedSinceReset >= entries / 4 { needReset = true }
            }
            if needReset {
                do { try resetLocked() } catch { if harvesterError == nil { harvesterError = error } }
            }
            updateRecentRates(now: now)
            lock.unlock()
            MonotonicClock.sleep(nanoseconds: pollIntervalNanoseconds)
        }
    }

    private func syncLocked() throws(KVMError) {
        guard started else { return }
        let now = MonotonicClock.nanoseconds()
        var harvestedSinceReset = false
        for ring in rings {
            harvestLocked(ring, now: now)
            if ring.harvestedSinceReset > 0 { harvestedSinceReset = true }
        }
        if harvestedSinceReset { try resetLocked() }
        lastSync = now
    }

    @discardableResult
    private func harvestLocked(_ ring: DirtyRing, now: UInt64, kickOnHold: Bool = true) -> Int {
        var distinct = 0
        var lost = 0
        let count = ring.harvest(lost: &lost) { slot, offset in
            let slotID = Int(slot & 0xFFFF)
            guard slotID < slotFirstPage.count, offset < UInt64(slotPageCount[slotID]) else { return }
            let page = slotFirstPage[slotID] + Int(offset)
            guard !countedSinceReset.contains(page) else { return }
            countedSinceReset.set(page)
            countedPages.append(page)
            pending.set(page)
            distinct += 1
        }
        if lost > 0 {
            recordLoss(DirtyLoss(vcpu: ring.vcpu, kind: .stuckRingRecovered, timeNanoseconds: now))
        }
        guard count > 0 else { return 0 }
        vcpuPages[ring.vcpu] += UInt64(distinct)
        totalPages += UInt64(distinct)
        if ring.harvestedSinceReset >= ring.softLimit {
            // The kernel may already have wrapped this ring: what it overwrote is gone, and its
            // push position may no longer follow ours.
            ring.searchFrontier = true
            recordLoss(DirtyLoss(vcpu: ring.vcpu, kind: .ringAtSoftLimit(entries: ring.harvestedSinceReset),
                                 timeNanoseconds: now))
        }
        if let deadline = pacer.charge(vcpu: ring.vcpu, pages: distinct, now: now) {
            holds.hold(ring.vcpu, until: deadline)
            if kickOnHold { kick?(ring.vcpu) }
        }
        return count
    }

    private func updateRecentRates(now: UInt64) {
        let elapsed = now - rateWindowStart
        guard elapsed >= 1_000_000_000 else { return }
        let held = holds.heldNanoseconds()
        if rateWindowPages.count == vcpuPages.count {
            for vcpu in vcpuPages.indices {
                recentRates[vcpu] = Double(vcpuPages[vcpu] - rateWindowPages[vcpu]) / (Double(elapsed) / 1e9)
                recentHeld[vcpu] = min(1, Double(held[vcpu] &- rateWindowHeld[vcpu]) / Double(elapsed))
            }
        }
        rateWindowStart = now
        rateWindowPages = vcpuPages
        rateWindowHeld = held
    }

    @discardableResult
    private func resetLocked() throws(KVMError) -> Int {
        let count = try vm.resetDirtyRings()
        for ring in rings { ring.didReset() }
        clearCounted()
        return count
    }

    private func clearCounted() {
        for page in countedPages { countedSinceReset.clear(page) }
        countedPages.removeAll(keepingCapacity: true)
    }

    private func recordLoss(_ loss: DirtyLoss) {
        ringOverruns[loss.vcpu] += 1
        losses.append(loss)
    }
}
