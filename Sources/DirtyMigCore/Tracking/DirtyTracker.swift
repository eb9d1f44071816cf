/// How a VM learns which pages its guest wrote; chosen at boot with `--track`.
public enum TrackingMode: String, Sendable, CaseIterable {
    /// KVM_GET_DIRTY_LOG (+ KVM_CLEAR_DIRTY_LOG in 64-page chunks): VM-wide counts only.
    case bitmap
    /// Per-vCPU dirty rings harvested every millisecond: per-vCPU counts.
    case ring
    /// The dirty ring plus per-vCPU page quotas per interval (dirty-quota exits, built in userspace).
    case quota

    public var usesDirtyRing: Bool { self != .bitmap }
    public var hasPerVCPUCounts: Bool { self != .bitmap }
}

/// Cumulative counts since tracking started. Rates are differences between two snapshots.
public struct DirtyCounters: Sendable {
    /// CLOCK_MONOTONIC time of the sync these counts reflect, in nanoseconds.
    public var timeNanoseconds: UInt64
    /// Pages found dirty, summed over syncs (a page rewritten between two syncs counts once).
    public var totalPages: UInt64
    /// The same per vCPU (ring and quota modes only).
    public var vcpuPages: [UInt64]?
    public var ringFullExits: [UInt64]?
    public var ringOverruns: [UInt64]?
    public var quotaExits: [UInt64]?
}

/// Dirty information that was lost: the pages a vCPU dirtied around this event may be missing
/// from what the tracker reported. A consumer that needs every dirty page (migration) must treat
/// everything that vCPU could have written since its previous complete collection as dirty.
public struct DirtyLoss: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// A harvest found the ring at or past its soft limit: the kernel may have wrapped it.
        case ringAtSoftLimit(entries: Int)
        /// A ring-full exit with nothing left to harvest: the kernel had overwritten entries and
        /// the vCPU was stuck; recovered by giving those entries back (see DirtyRing).
        case stuckRingRecovered
    }

    public let vcpu: Int
    public let kind: Kind
    public let timeNanoseconds: UInt64

    public var description: String {
        switch kind {
        case .ringAtSoftLimit(let entries):
            return "vCPU \(vcpu): dirty ring overrun (\(entries) entries at one harvest, at or past the soft limit)"
        case .stuckRingRecovered:
            return "vCPU \(vcpu): dirty ring wrapped and stuck; recovered, dirty pages lost"
        }
    }
}

/// What a collection returns: the pages dirtied since the previous collection, and whether
/// any of that information was lost on the way.
public struct DirtyCollection: Sendable {
    public var pages: DirtyPageBitmap
    public var losses: [DirtyLoss]
    public var isComplete: Bool { losses.isEmpty }
}

/// The same as a dense list of RAM page numbers, each page once, in no particular order: what a
/// checkpoint needs. Its cost follows the pages dirtied, not the VM's size (seed 004: at
/// hundreds of checkpoints a second, scanning a VM-sized bitmap for a few set bits is the
/// bottleneck). The ring tracker keeps it as it harvests; the bitmap tracker has to build it
/// by scanning its bitmap, which is the comparison the seed is about.
public struct DirtyList: Sendable {
    public var pages: [UInt32]
    public var losses: [DirtyLoss]
    public var isComplete: Bool { losses.isEmpty }
}

/// The one interface the rest of dirtymig uses, whatever the tracking mode.
public protocol DirtyTracker: AnyObject, Sendable {
    var mode: TrackingMode { get }
    /// Turns dirty logging on for all of RAM; from here on every guest write is seen.
    func start() throws(KVMError)
    /// Harvests one last time and turns dirty logging off.
    func stop()
    /// Brings the counters (and the pending dirty pages) up to date with everything the guest has
    /// written so far.
    func sync() throws(KVMError)
    func counters() -> DirtyCounters
    /// Syncs, then hands over the pages dirtied since the previous call (or since start).
    func collect() throws(KVMError) -> DirtyCollection
    /// Syncs, then hands over the pages dirtied since the previous collection (of either form)
    /// as a dense list.
    func collectList() throws(KVMError) -> DirtyList
    /// Whether `setDirtyTrigger` works: the ring modes count pages as the harvester sees them;
    /// the bitmap only knows at a sync.
    var hasDirtyTrigger: Bool { get }
    /// Calls `fire` once (from the harvester's thread) as soon as at least `pages` distinct pages
    /// are waiting to be collected; it re-arms at every collection. nil removes it.
    func setDirtyTrigger(pages: Int?, _ fire: (@Sendable () -> Void)?)
    /// Called on the vCPU's own thread after KVM_EXIT_DIRTY_RING_FULL.
    func vcpuExitedRingFull(_ vcpu: Int, resetEpochAtEntry: UInt64) throws(KVMError)
    /// Changes whenever tracking gives entries back to the kernel (ring modes; 0 otherwise):
    /// read before each KVM_RUN, passed to vcpuExitedRingFull.
    var resetEpoch: UInt64 { get }
}
