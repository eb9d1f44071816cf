/// The passes of pre-copy, as a migration and a replication's first copy both make them.
///
/// Pass 1 carries every page that holds data (announced first by its plan, so the receiver can
/// allocate ahead); each later pass carries what the guest dirtied while the one before went
/// out. A pass ends only when the receiver has acknowledged it (PassTransfer). Dirty information
/// the tracker lost (a ring overrun) is counted and makes the next pass carry every page that
/// holds data again: anything could have changed. What decides when to stop (the pre-copy rule
/// and the throttles of a migration; a dirty set that stops shrinking, for a replication) stays
/// with the caller.
final class PreCopyPasses {
    let transfer: PassTransfer
    private let memory: GuestMemory
    private let tracker: DirtyTracker
    /// Ring overruns seen so far (each a loss of dirty information).
    private(set) var ringOverruns: UInt64 = 0
    /// Passes made so far.
    private(set) var count = 0
    /// What the next pass carries.
    private(set) var pending: DirtyPageBitmap
    /// Pass 1 carries only what changed since the receiver's copy (a replication's resync), not
    /// every page that holds data.
    let resyncsChanges: Bool

    /// What one pass sent and what the guest dirtied meanwhile (now `pending`).
    struct Outcome {
        var sent: PageSendTally
        /// Pages the pass carried.
        var carried: Int
        var dirty: DirtyPageBitmap
        /// The tracker lost dirty information: `dirty` is every page that holds data.
        var lost: Bool
        /// From the pass's first page to the collection after its acknowledgement.
        var seconds: Double
    }

    /// Starts pre-copy on `channel` (after the hello): forgets what the tracker collected before
    /// now (and any loss in it: pass 1 carries everything anyway) and sends pass 1's plan.
    /// `bandwidth`: the cap in force (nil: none), asked before every batch; `compression`: how
    /// batches may travel (the hello announced its codec).
    ///
    /// `changedSince`: the receiver holds an older copy (a standby that a replication resumes
    /// to), and these pages changed since that copy besides those the tracker holds: pass 1 is
    /// them and what the tracker collected, unless the tracker lost dirty information meanwhile
    /// (then every page that holds data, `resyncsChanges` false).
    init(memory: GuestMemory, tracker: DirtyTracker, channel: MigrationChannel,
         bandwidth: @escaping () -> UInt64? = { nil }, compression: PageCompression = .none,
         changedSince: DirtyPageBitmap? = nil) throws(MigrationError) {
        self.memory = memory
        self.tracker = tracker
        transfer = try PassTransfer(channel: channel, memory: memory, bandwidth: bandwidth, compression: compression)
        let collection: DirtyCollection
        do { collection = try tracker.collect() } catch { throw .machine("dirty tracking failed: \(error)") }
        if var changed = changedSince, collection.isComplete {
            changed.formUnion(collection.pages)
            pending = changed
            resyncsChanges = true
        } else {
            if changedSince != nil { ringOverruns += UInt64(collection.losses.count) }
            pending = memory.dataPages()
            resyncsChanges = false
        }
        try transfer.sendPlan(pending)
    }

    /// One pass: the pending pages, the pass's end and its acknowledgement, then what the guest
    /// dirtied meanwhile, which becomes pending. `shouldStop` is asked between batches (a cancel
    /// throws `.cancelled`); `onBatch` hears of each batch sent (bytes, pages).
    func run(shouldStop: () -> Bool = { false },
             onBatch: (PageSendTally) -> Void = { _ in }) throws(MigrationError) -> Outcome {
        count += 1
        let start = MonotonicClock.nanoseconds()
        let carried = pending.count
        let sent = try transfer.send(pending, shouldStop: shouldStop, onBatch: onBatch)
        try transfer.end(pass: count)
        let (dirty, lost) = try collect()
        pending = dirty
        return Outcome(sent: sent, carried: carried, dirty: dirty, lost: lost,
                       seconds: max(Double(MonotonicClock.nanoseconds() - start) / 1e9, 1e-6))
    }

    /// The pages dirtied since the last collection, or every page that holds data if the tracker
    /// lost some of that (counted in `ringOverruns`). Also what the final, paused pass adds.
    func collect() throws(MigrationError) -> (DirtyPageBitmap, lost: Bool) {
        let collection: DirtyCollection
        do { collection = try tracker.collect() } catch { throw .machine("dirty tracking failed: \(error)") }
        if collection.isComplete { return (collection.pages, false) }
        ringOverruns += UInt64(collection.losses.count)
        return (memory.dataPages(), true)
    }

    /// Adds `pages` to what the next pass carries (the final pass: what was dirtied up to the
    /// pause).
    func addPending(_ pages: DirtyPageBitmap) { pending.formUnion(pages) }
}
