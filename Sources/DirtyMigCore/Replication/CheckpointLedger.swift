/// What the primary remembers of the checkpoints its standby has not acknowledged: the pages
/// each carried. After a loss, a standby that comes back names the checkpoint it holds; the
/// pages changed since then are those of every checkpoint after it, and those dirtied since the
/// last checkpoint (the tracker's, and any an unfinished epoch took from it), so that only those
/// cross the link again, not the whole VM.
///
/// Bounded: the epoch thread leaves at most `Replicator.maxUnanswered` checkpoints unanswered
/// and one in flight, so `capacity` entries are kept; should more ever be, the oldest is
/// forgotten, and a standby that holds it or an older one gets a full copy.
struct CheckpointLedger {
    /// Why a standby that came back gets the whole VM rather than what changed.
    enum FullCopyReason: Error, Equatable, CustomStringConvertible {
        /// It holds no checkpoint of this replication.
        case nothingHeld
        /// The tracker lost dirty information since (a ring overrun), or an epoch ended
        /// without its pages being recorded: anything could have changed.
        case dirtyInformationLost
        /// It holds a checkpoint this side does not remember (older than the oldest kept).
        case unknownEpoch(UInt64)

        var description: String {
            switch self {
            case .nothingHeld: return "the standby held no checkpoint of this replication"
            case .dirtyInformationLost: return "dirty information was lost meanwhile (a ring overrun)"
            case .unknownEpoch(let epoch): return "the standby held checkpoint \(epoch), older than any this side remembers"
            }
        }
    }

    let capacity: Int
    private var entries: [(epoch: UInt64, pages: [UInt32])] = []
    /// The newest checkpoint the standby acknowledged; nil before the first.
    private var acknowledged: UInt64?
    /// Pages dirtied after the last checkpoint that the tracker no longer holds.
    private var unsent: [UInt32] = []
    private var incomplete = false

    init(capacity: Int) { self.capacity = capacity }

    /// A first checkpoint was acknowledged (at the start, or after a re-protection): the standby
    /// holds exactly `epoch`, nothing else is owed.
    mutating func started(at epoch: UInt64) {
        entries.removeAll()
        unsent.removeAll()
        acknowledged = epoch
        incomplete = false
    }

    /// Checkpoint `epoch` carried `pages` (recorded before it is sent: one abandoned half-way
    /// may still have reached the standby in part).
    mutating func record(epoch: UInt64, pages: [UInt32]) {
        entries.append((epoch, pages))
        if entries.count > capacity {
            entries.removeFirst()
            incomplete = true
        }
    }

    mutating func acknowledge(_ epoch: UInt64) {
        acknowledged = max(acknowledged ?? 0, epoch)
        entries.removeAll { $0.epoch <= epoch }
    }

    /// Pages taken from the tracker for an epoch that never became a checkpoint.
    mutating func addUnsent(_ pages: [UInt32]) {
        guard !pages.isEmpty else { return }
        unsent.append(contentsOf: pages)
        // Bounded by the VM: a page more than once is no news.
        if unsent.count > 1 << 20 { unsent = Array(Set(unsent)) }
    }

    /// Pages changed without being recorded: the next resync is a full copy.
    mutating func forget() { incomplete = true }

    /// The pages changed since checkpoint `held` (besides what the tracker holds now), or why
    /// only a full copy is exact.
    func changed(since held: UInt64?, pageCount: Int) -> Result<DirtyPageBitmap, FullCopyReason> {
        guard let held else { return .failure(.nothingHeld) }
        guard !incomplete else { return .failure(.dirtyInformationLost) }
        guard let acknowledged, held >= acknowledged else { return .failure(.unknownEpoch(held)) }
        if held > acknowledged && !entries.contains(where: { $0.epoch == held }) { return .failure(.unknownEpoch(held)) }
        var pages = DirtyPageBitmap(pageCount: pageCount)
        for entry in entries where entry.epoch > held {
            for page in entry.pages where Int(page) < pageCount { pages.set(Int(page)) }
        }
        for page in unsent where Int(page) < pageCount { pages.set(Int(page)) }
        return .success(pages)
    }
}
