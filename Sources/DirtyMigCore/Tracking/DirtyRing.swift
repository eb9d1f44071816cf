import CKVM

/// One vCPU's dirty ring: an array of kvm_dirty_gfn shared with the kernel. KVM pushes entries
/// with flags = DIRTY at its push index; we read them with acquire loads and mark each harvested
/// (RESET, release store); KVM_RESET_DIRTY_RINGS (VM-wide) walks each ring from its reset index
/// over consecutive RESET entries, re-protects their pages and clears them (flags = 0). The
/// kernel counts `push index - reset index` entries as used and keeps the vCPU out of the guest
/// (KVM_EXIT_DIRTY_RING_FULL) while that count is at its soft limit or above.
///
/// The one rule that keeps a vCPU from being stuck for good: **the kernel's reset index must
/// never pass its push index.** If it did, its used count (a u32 difference) would wrap to
/// billions and no reset could bring it back. The reset walk passes exactly the entries marked
/// RESET, so:
/// - a harvest marks only entries it reads as DIRTY: every one of them is a push the kernel has
///   made and not yet reset, so the walk can never cross the push index on their account;
/// - an empty entry (flags 0) is marked only by `recoverStuck`, on the vCPU's own thread (the
///   ring cannot change under it), when the kernel has just said it counts at least a soft limit
///   of entries as used and nothing was reset since: then the first `recoveryStep` entries from
///   its reset index are all pushes it made (the ones it overwrote in an overrun, or whose flag a
///   reset racing an overrun cleared), and giving them back cannot cross the push index.
///
/// Where the kernel pushes next is only a hint here (`fetchIndex`): after an overrun it may push
/// somewhere we do not expect, and then harvests scan the whole ring until they find its pushes
/// again (`lostTrack`). Never guessed: which entries may be marked.
///
/// Not thread-safe on its own: RingTracker serialises every access under its lock.
final class DirtyRing {
    let vcpu: Int
    let entries: Int
    private let mapping: MappedRegion
    private let gfns: UnsafeMutablePointer<kvm_dirty_gfn>
    private let mask: UInt32
    /// Where we expect the kernel's next push (free-running; the slot is fetchIndex & mask).
    private(set) var fetchIndex: UInt32 = 0
    /// Entries marked harvested since the last KVM_RESET_DIRTY_RINGS.
    private(set) var markedSinceReset = 0
    /// Set when fetchIndex may not follow the kernel's pushes (after an overrun or a recovery):
    /// harvests scan every entry until they find one contiguous run of pushes again.
    var lostTrack = false
    /// The kernel's reset index as last determined on the vCPU's thread (a slot, exact when
    /// set; where recoverStuck starts looking).
    private var resetHint: UInt32 = 0
    /// Whole-ring scans to skip: a lost ring whose vCPU pushes nothing is scanned every tenth poll.
    private var scansToSkip = 0
    /// How many entries the last full scan found empty (none: the kernel may have pushed over
    /// entries not yet read).
    private(set) var emptyAtLastScan = 0
    /// Flags seen by the last full scan, per slot (scratch, reused).
    private var scanned: [UInt32]

    init(vcpu: Int, entries: Int, mapping: MappedRegion) {
        precondition(entries > 0 && entries & (entries - 1) == 0)
        self.vcpu = vcpu
        self.entries = entries
        self.mapping = mapping
        mask = UInt32(entries - 1)
        gfns = mapping.base.assumingMemoryBound(to: kvm_dirty_gfn.self)
        scanned = Array(repeating: 0, count: entries)
    }

    /// The kernel asks for a harvest when this many entries are in use (KVM_DIRTY_RING_RSVD_ENTRIES).
    var softLimit: Int { entries - 64 }
    /// How many entries one stuck-ring recovery gives back: less than a soft limit, so it is
    /// safe (see the type's comment), and enough to let the vCPU run again.
    var recoveryStep: Int { entries / 4 }

    private func flags(_ index: UInt32) -> UInt32 {
        ckvm_dirty_gfn_load_flags(gfns + Int(index & mask))
    }

    private func setFlags(_ index: UInt32, _ value: UInt32) {
        ckvm_dirty_gfn_store_flags(gfns + Int(index & mask), value)
    }

    /// Reads one published entry and marks it harvested.
    @inline(__always)
    private func take(_ index: UInt32, _ page: (UInt32, UInt64) -> Void) {
        let gfn = gfns + Int(index & mask)
        page(gfn.pointee.slot, gfn.pointee.offset)
        ckvm_dirty_gfn_store_flags(gfn, CKVM_DIRTY_GFN_F_RESET)
        markedSinceReset += 1
    }

    /// Harvests what the kernel has pushed, calling `page(slot, offset)` for each entry: the run
    /// of published entries from fetchIndex, or (lostTrack) every published entry in the ring.
    /// Returns how many entries were harvested. Safe while the vCPU runs.
    @inline(__always)
    func harvest(_ page: (UInt32, UInt64) -> Void) -> Int {
        if lostTrack {
            if scansToSkip > 0 { scansToSkip -= 1; return 0 }
            let count = harvestAll(page)
            if count == 0 { scansToSkip = 9 }
            return count
        }
        var count = 0
        while count < entries && flags(fetchIndex) == CKVM_DIRTY_GFN_F_DIRTY {
            take(fetchIndex, page)
            fetchIndex &+= 1
            count += 1
        }
        // Healthy, the entry at the push index is empty (its last push was reset long ago). A
        // harvested one there means the kernel is pushing elsewhere: look for it.
        if count == entries || flags(fetchIndex) & CKVM_DIRTY_GFN_F_RESET != 0 { lostTrack = true }
        return count
    }

    /// Harvests every published entry in the ring, in slot order. If they form one contiguous
    /// run, the kernel pushes next right after it: fetchIndex follows it again.
    func harvestAll(_ page: (UInt32, UInt64) -> Void) -> Int {
        scansToSkip = 0
        var count = 0, empty = 0
        for slot in 0..<UInt32(entries) {
            let state = flags(slot)
            scanned[Int(slot)] = state
            if state == CKVM_DIRTY_GFN_F_DIRTY { take(slot, page); count += 1 } else if state == 0 { empty += 1 }
        }
        emptyAtLastScan = empty
        guard count > 0 else { return 0 }
        // Where a published entry is followed by one that is not: one such place is the end of
        // the kernel's pushes; several mean we cannot tell which.
        var runEnd: UInt32?
        var runEnds = 0
        for slot in 0..<UInt32(entries) where scanned[Int(slot)] == CKVM_DIRTY_GFN_F_DIRTY {
            let next = (slot &+ 1) & mask
            if scanned[Int(next)] != CKVM_DIRTY_GFN_F_DIRTY { runEnd = next; runEnds += 1 }
        }
        if runEnds == 1, let runEnd, scanned[Int(runEnd)] == 0 {
            fetchIndex = runEnd
            lostTrack = false
        }
        return count
    }

    /// After a VM-wide KVM_RESET_DIRTY_RINGS.
    func didReset() { markedSinceReset = 0 }

    /// On the vCPU's thread, with every other ring's harvested entries already given back (so a
    /// reset consumes only this ring's): snapshots which entries are marked, for `locateReset`.
    func snapshotMarks() {
        for slot in 0..<UInt32(entries) { scanned[Int(slot)] = flags(slot) }
    }

    /// After a reset that consumed `consumed` entries of this ring only: the consumed entries are
    /// the ones that were marked in the snapshot and are empty now, one contiguous run ending at
    /// the kernel's new reset index. Records that index; with nothing outstanding it is also
    /// where the kernel pushes next.
    func locateReset(consumed: Int) {
        guard consumed > 0, consumed < entries else { return }
        for slot in 0..<UInt32(entries) {
            let previous = (slot &- 1) & mask
            let previousTaken = scanned[Int(previous)] & CKVM_DIRTY_GFN_F_RESET != 0 && flags(previous) == 0
            let taken = scanned[Int(slot)] & CKVM_DIRTY_GFN_F_RESET != 0 && flags(slot) == 0
            if previousTaken && !taken {
                resetHint = slot
                if flags(slot) == 0 { fetchIndex = slot; lostTrack = false }
                return
            }
        }
    }

    /// A vCPU stuck in ring-full exits: the kernel counts at least a soft limit of entries as
    /// used, nothing in the ring is published, and whatever is marked cannot be reset because
    /// the entry at the kernel's reset index is empty (an entry it overwrote or whose flag a
    /// racing reset cleared). Called on the vCPU's thread, with no reset since the exit and no
    /// other ring holding harvested entries (so `reset` returns what this ring gave back).
    ///
    /// Finds the kernel's reset index (marks one empty entry at a time, starting where it was
    /// last seen, and resets: the kernel takes an entry only at its reset index; an entry it did
    /// not take is emptied again), then gives back `recoveryStep` entries from there. Returns
    /// how many entries were given back (0: none taken; the next exit tries again).
    func recoverStuck(reset: () throws(KVMError) -> Int) throws(KVMError) -> Int {
        var given = 0
        for step in 0..<UInt32(entries) {
            let index = resetHint &+ step
            guard flags(index) == 0 else { continue }
            setFlags(index, CKVM_DIRTY_GFN_F_RESET)
            let consumed = try reset()
            if consumed > 0 {
                resetHint = (index &+ UInt32(consumed)) & mask
                given = consumed
                break
            }
            setFlags(index, 0)
        }
        guard given > 0 else { return 0 }
        if given < recoveryStep {
            for step in 0..<UInt32(recoveryStep - given) where flags(resetHint &+ step) == 0 {
                setFlags(resetHint &+ step, CKVM_DIRTY_GFN_F_RESET)
            }
            let consumed = try reset()
            resetHint = (resetHint &+ UInt32(consumed)) & mask
            given += consumed
        }
        markedSinceReset = 0
        lostTrack = true
        return given
    }
}
