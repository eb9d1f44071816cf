import CKVM

/// One vCPU's dirty ring: an array of kvm_dirty_gfn shared with the kernel. KVM pushes entries
/// with flags = DIRTY; we read them in order with acquire loads, mark each harvested (RESET, with
/// a release store), and KVM_RESET_DIRTY_RINGS (VM-wide) hands them back to the kernel.
/// Not thread-safe on its own: RingTracker serialises every access under its lock.
final class DirtyRing {
    let vcpu: Int
    let entries: Int
    private let mapping: MappedRegion
    private let gfns: UnsafeMutablePointer<kvm_dirty_gfn>
    /// Next entry to look at (free-running; the slot is fetchIndex & (entries - 1)).
    private(set) var fetchIndex: UInt32 = 0
    /// fetchIndex at the last KVM_RESET_DIRTY_RINGS: entries in between are harvested but still
    /// count as used in the kernel's view of the ring.
    private var resetIndex: UInt32 = 0

    init(vcpu: Int, entries: Int, mapping: MappedRegion) {
        self.vcpu = vcpu
        self.entries = entries
        self.mapping = mapping
        gfns = mapping.base.assumingMemoryBound(to: kvm_dirty_gfn.self)
    }

    /// The kernel asks for a harvest when this many entries are in use (KVM_DIRTY_RING_RSVD_ENTRIES).
    var softLimit: Int { entries - 64 }

    /// Entries harvested but not yet given back by a reset.
    var harvestedSinceReset: Int { Int(fetchIndex &- resetIndex) }

    /// Reads every entry the kernel has published, calling `page(slot, offset)` for each.
    /// Returns how many were harvested.
    @inline(__always)
    func harvest(_ page: (UInt32, UInt64) -> Void) -> Int {
        let mask = UInt32(entries - 1)
        var count = 0
        while count < entries {
            let gfn = gfns + Int(fetchIndex & mask)
            guard ckvm_dirty_gfn_load_flags(gfn) == CKVM_DIRTY_GFN_F_DIRTY else { break }
            page(gfn.pointee.slot, gfn.pointee.offset)
            ckvm_dirty_gfn_store_flags(gfn, CKVM_DIRTY_GFN_F_RESET)
            fetchIndex &+= 1
            count += 1
        }
        return count
    }

    /// Called after KVM_RESET_DIRTY_RINGS succeeded: everything harvested is the kernel's again.
    func didReset() { resetIndex = fetchIndex }

    /// Overrun recovery, last resort: marks every entry harvested so the next reset walks the
    /// whole ring (what the machine notes found to un-stick a vCPU). It can also move the
    /// kernel's reset index past its push index, so `recover` tries exact spans first.
    func markEverythingHarvested() {
        for index in 0..<entries {
            ckvm_dirty_gfn_store_flags(gfns + index, CKVM_DIRTY_GFN_F_RESET)
        }
    }

    /// Marks `count` entries ending just before `end` (free-running index) as harvested.
    func markHarvested(endingAt end: UInt32, count: Int) {
        let mask = UInt32(entries - 1)
        for step in 1...UInt32(count) {
            ckvm_dirty_gfn_store_flags(gfns + Int((end &- step) & mask), CKVM_DIRTY_GFN_F_RESET)
        }
    }

    /// Clears marks the kernel did not consume (entries it will push into later).
    func clearMarks(endingAt end: UInt32, count: Int) {
        guard count > 0 else { return }
        let mask = UInt32(entries - 1)
        for step in 1...UInt32(count) {
            let gfn = gfns + Int((end &- step) & mask)
            if ckvm_dirty_gfn_load_flags(gfn) == CKVM_DIRTY_GFN_F_RESET { ckvm_dirty_gfn_store_flags(gfn, 0) }
        }
    }

    /// After a recovery: the kernel publishes next at `index`.
    func restart(at index: UInt32) {
        fetchIndex = index
        resetIndex = index
        needsResynchronisation = false
    }

    /// Set after an overrun: the kernel's push position may no longer be ours (it wrapped, or a
    /// recovery reset a whole ring), so the next harvests first look for where it now publishes.
    var needsResynchronisation = false

    /// Finds the start of the run of DIRTY entries the kernel is publishing (a DIRTY entry whose
    /// predecessor is not DIRTY) and continues harvesting from there. Returns false while the
    /// ring holds nothing to find.
    func resynchronise() -> Bool {
        let mask = UInt32(entries - 1)
        func isDirty(_ index: UInt32) -> Bool {
            ckvm_dirty_gfn_load_flags(gfns + Int(index & mask)) == CKVM_DIRTY_GFN_F_DIRTY
        }
        var found: UInt32? = nil
        for step in 0..<UInt32(entries) {
            let index = fetchIndex &+ step
            if isDirty(index) && !isDirty(index &- 1) { found = index; break }
        }
        if found == nil && isDirty(fetchIndex) { found = fetchIndex }   // the whole ring is dirty
        guard let start = found else { return false }
        fetchIndex = start
        resetIndex = start
        needsResynchronisation = false
        return true
    }
}
