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
    /// The same pages as `pending`, as a list in the order they were first seen (collectList).
    private var pendingList: [UInt32] = []
    private var dirtyTrigger: (pages: Int, fire: @Sendable () -> Void)?
    private var triggerFired = false
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
    /// Tests provoke overruns by stopping the harvester for a while (monotonic deadline).
    private var harvestStalledUntil: UInt64 = 0

    private let running = Atomic<Bool>(false)
    private let epoch = Atomic<UInt64>(0)
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
            harvester = OSThread(name: "ring-harvester") { [self] in harvestLoop() }
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
        pendingList.removeAll(keepingCapacity: true)
        losses.removeAll()
        triggerFired = false
        return collection
    }

    /// Straight from the harvested entries: no RAM-sized bitmap is scanned or cleared, only the
    /// bits of the pages listed.
    public func collectList() throws(KVMError) -> DirtyList {
        lock.lock(); defer { lock.unlock() }
        try syncLocked()
        let list = DirtyList(pages: pendingList, losses: losses)
        for page in pendingList { pending.clear(Int(page)) }
        pendingList.removeAll(keepingCapacity: true)
        losses.removeAll()
        triggerFired = false
        return list
    }

    public var hasDirtyTrigger: Bool { true }

    public func setDirtyTrigger(pages: Int?, _ fire: (@Sendable () -> Void)?) {
        lock.lock(); defer { lock.unlock() }
        if let pages, let fire { dirtyTrigger = (max(pages, 1), fire) } else { dirtyTrigger = nil }
        triggerFired = false
    }

    /// Counts KVM_RESET_DIRTY_RINGS calls. A vCPU reads it before entering KVM_RUN: a ring-full
    /// exit proves that the kernel counts a soft limit of entries as used only if no reset has
    /// happened since (a reset lowers that count).
    public var resetEpoch: UInt64 { epoch.load(ordering: .acquiring) }

    /// On the vCPU's thread, out of KVM_RUN (its ring cannot change). Harvests the whole ring and
    /// gives it back; if that frees nothing and nothing was reset since the vCPU entered the
    /// guest, the vCPU is stuck (the kernel counts entries as used that it overwrote or whose
    /// flags a racing reset cleared): DirtyRing.recoverStuck gives a quarter ring back.
    public func vcpuExitedRingFull(_ vcpu: Int, resetEpochAtEntry: UInt64) throws(KVMError) {
        lock.lock(); defer { lock.unlock() }
        ringFullExits[vcpu] += 1
        let ring = rings[vcpu]
        let now = MonotonicClock.nanoseconds()
        let debug = RingTracker.debug
        // A reset since the exit may have lowered what the kernel counts: then this exit proves
        // nothing, and the vCPU simply runs again (and exits again if it is still full).
        var provesFull = epoch.load(ordering: .acquiring) == resetEpochAtEntry && ring.markedSinceReset == 0
        // Give back every other ring's harvested entries, so that the next reset is this ring's alone.
        if rings.contains(where: { $0.markedSinceReset > 0 }) { try resetLocked() }
        var lost = false
        let harvested = countHarvest(ring, now: now) { ring.harvestAll($0) }
        let empty = ring.emptyAtLastScan
        ring.snapshotMarks()
        let consumed = try resetLocked()
        ring.locateReset(consumed: consumed)
        if debug { StandardStream.error.writeLine("vCPU \(vcpu) ring full: empty \(empty), harvested \(harvested), consumed \(consumed), proves full \(provesFull)") }
        if empty == 0 {
            // A ring without one empty entry: the kernel may have pushed over unharvested ones.
            lost = true
            recordLoss(DirtyLoss(vcpu: vcpu, kind: .ringAtSoftLimit(entries: entries), timeNanoseconds: now))
        }
        if harvested > 0 || consumed > 0 { provesFull = false }
        guard provesFull else { return }
        let given = try ring.recoverStuck { () throws(KVMError) -> Int in try resetKernel() }
        clearCounted()
        if debug { StandardStream.error.writeLine("  stuck: recovery gave back \(given)") }
        if given > 0 && !lost {
            recordLoss(DirtyLoss(vcpu: vcpu, kind: .stuckRingRecovered, timeNanoseconds: now))
        }
    }

    static let debug = ProcessInfo.processInfo.environment["DIRTYMIG_RING_DEBUG"] != nil

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

    /// Fault injection for tests: the next harvest of `vcpu`'s ring that finds entries drops
    /// them (they never reach the migration bitmap) and reports the loss, as an overrun would.
    /// Real overruns are rare and cannot be timed; this lets a test put one inside a migration.
    func dropNextHarvest(vcpu: Int) {
        lock.lock(); defer { lock.unlock() }
        dropHarvestOf = vcpu
    }
    private var dropHarvestOf: Int?

    /// Stops the harvester thread for `nanoseconds` (tests provoke overruns with it).
    func stallHarvester(nanoseconds: UInt64) {
        lock.lock(); defer { lock.unlock() }
        harvestStalledUntil = MonotonicClock.nanoseconds() + nanoseconds
    }

    // MARK: Harvesting (all under `lock`)

    private func harvestLoop() {
        ThreadPriority.preferRealtime()
        while running.load(ordering: .acquiring) {
            lock.lock()
            let now = MonotonicClock.nanoseconds()
            if now < harvestStalledUntil {
                lock.unlock()
                MonotonicClock.sleep(nanoseconds: pollIntervalNanoseconds)
                continue
            }
            var needReset = false
            for ring in rings {
                harvestLocked(ring, now: now)
                if ring.markedSinceReset >= entries / 4 { needReset = true }
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
            if ring.markedSinceReset > 0 { harvestedSinceReset = true }
        }
        if harvestedSinceReset { try resetLocked() }
        lastSync = now
    }

    @discardableResult
    private func harvestLocked(_ ring: DirtyRing, now: UInt64, kickOnHold: Bool = true) -> Int {
        let count = countHarvest(ring, now: now, kickOnHold: kickOnHold) { ring.harvest($0) }
        if count > 0 && ring.markedSinceReset >= ring.softLimit {
            // The vCPU reached its soft limit before we got here; the kernel's exit may come
            // late, and then it pushes over entries we have not read.
            ring.lostTrack = true
            recordLoss(DirtyLoss(vcpu: ring.vcpu, kind: .ringAtSoftLimit(entries: ring.markedSinceReset),
                                 timeNanoseconds: now))
        }
        return count
    }

    /// Runs one harvest of `ring` and charges its pages: to the migration bitmap, to the vCPU's
    /// count (each page once per reset epoch) and to its pacer.
    private func countHarvest(_ ring: DirtyRing, now: UInt64, kickOnHold: Bool = true,
                              _ harvest: ((UInt32, UInt64) -> Void) -> Int) -> Int {
        var distinct = 0
        let dropping = dropHarvestOf == ring.vcpu
        let count = harvest { slot, offset in
            if dropping { return }
            let slotID = Int(slot & 0xFFFF)
            guard slotID < slotFirstPage.count, offset < UInt64(slotPageCount[slotID]) else { return }
            let page = slotFirstPage[slotID] + Int(offset)
            guard !countedSinceReset.contains(page) else { return }
            countedSinceReset.set(page)
            countedPages.append(page)
            if !pending.contains(page) {
                pending.set(page)
                pendingList.append(UInt32(page))
            }
            distinct += 1
        }
        guard count > 0 else { return 0 }
        if dropping {
            dropHarvestOf = nil
            recordLoss(DirtyLoss(vcpu: ring.vcpu, kind: .ringAtSoftLimit(entries: count), timeNanoseconds: now))
        }
        vcpuPages[ring.vcpu] += UInt64(distinct)
        totalPages += UInt64(distinct)
        if let trigger = dirtyTrigger, !triggerFired, pendingList.count >= trigger.pages {
            triggerFired = true
            trigger.fire()
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
        let count = try resetKernel()
        for ring in rings { ring.didReset() }
        clearCounted()
        return count
    }

    /// KVM_RESET_DIRTY_RINGS, counted in the reset epoch (every reset must go through here).
    private func resetKernel() throws(KVMError) -> Int {
        let count = try vm.resetDirtyRings()
        epoch.add(1, ordering: .releasing)
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
