import CKVM

/// One vCPU's dirty ring: an array of kvm_dirty_gfn shared with the kernel. KVM pushes entries
/// with flags = DIRTY at its push index; we read them in order with acquire loads and mark each
/// harvested (RESET, with a release store); KVM_RESET_DIRTY_RINGS (VM-wide) walks each ring from
/// its reset index over consecutive RESET entries, re-protects their pages and clears them
/// (flags = 0), and that frees them for new pushes.
///
/// `resetIndex` mirrors the kernel's reset index exactly: after every reset it is recomputed
/// from what the kernel cleared (it stops at the first entry it did not clear), never assumed.
/// That is what keeps recovery from an overrun safe: the kernel counts as used every entry from
/// its reset index to its push index, so marking entries past the push index would make it wrap
/// that count and keep the vCPU out of the guest for good.
///
/// Not thread-safe on its own: RingTracker serialises every access under its lock.
final class DirtyRing {
    let vcpu: Int
    let entries: Int
    private let mapping: MappedRegion
    private let gfns: UnsafeMutablePointer<kvm_dirty_gfn>
    /// Next entry to look at (free-running; the slot is fetchIndex & (entries - 1)).
    private(set) var fetchIndex: UInt32 = 0
    /// The kernel's reset index: entries from here to fetchIndex are harvested (or lost) but not
    /// yet given back.
    private(set) var resetIndex: UInt32 = 0
    /// Set after dirty information was lost here: the kernel may be pushing past entries it
    /// will never fill again (they were cleared by a reset while it wrapped), so harvests look
    /// ahead for its push position instead of stopping at the first empty entry.
    var searchFrontier = false
    /// One past the highest entry we ever marked harvested: a reset cannot clear beyond it.
    private var markedEnd: UInt32 = 0

    init(vcpu: Int, entries: Int, mapping: MappedRegion) {
        self.vcpu = vcpu
        self.entries = entries
        self.mapping = mapping
        gfns = mapping.base.assumingMemoryBound(to: kvm_dirty_gfn.self)
    }

    /// The kernel asks for a harvest when this many entries are in use (KVM_DIRTY_RING_RSVD_ENTRIES).
    var softLimit: Int { entries - 64 }
    /// How many entries one stuck-ring recovery gives back (see recoverStuck).
    var recoveryStep: Int { entries / 4 }

    /// Entries harvested but not yet given back by a reset.
    var harvestedSinceReset: Int { Int(fetchIndex &- resetIndex) }

    private func flags(_ index: UInt32) -> UInt32 {
        ckvm_dirty_gfn_load_flags(gfns + Int(index & UInt32(entries - 1)))
    }

    private func mark(_ index: UInt32) {
        ckvm_dirty_gfn_store_flags(gfns + Int(index & UInt32(entries - 1)), CKVM_DIRTY_GFN_F_RESET)
        noteMarked(index)
    }

    private func noteMarked(_ index: UInt32) {
        if Int32(bitPattern: index &+ 1 &- markedEnd) > 0 { markedEnd = index &+ 1 }
    }

    /// Reads every entry the kernel has published, calling `page(slot, offset)` for each, within
    /// one ring's length of the reset index. Entries already marked harvested are stepped over.
    /// With `searchFrontier`, empty entries followed by published ones are marked harvested (they
    /// were lost) and counted in `lost`. Returns how many entries were harvested.
    @inline(__always)
    func harvest(lost: inout Int, _ page: (UInt32, UInt64) -> Void) -> Int {
        var count = 0
        while harvestedSinceReset < entries {
            let state = flags(fetchIndex)
            if state == CKVM_DIRTY_GFN_F_DIRTY {
                let gfn = gfns + Int(fetchIndex & UInt32(entries - 1))
                page(gfn.pointee.slot, gfn.pointee.offset)
                ckvm_dirty_gfn_store_flags(gfn, CKVM_DIRTY_GFN_F_RESET)
                noteMarked(fetchIndex)
                fetchIndex &+= 1
                count += 1
            } else if state & CKVM_DIRTY_GFN_F_RESET != 0 {
                fetchIndex &+= 1
            } else if searchFrontier, let next = nextPublished() {
                // Entries the kernel will not fill again: hand them back with the rest.
                while fetchIndex != next { mark(fetchIndex); fetchIndex &+= 1; lost += 1 }
            } else {
                break
            }
        }
        if count > 0 { searchFrontier = false }
        return count
    }

    /// The index of the first published entry after fetchIndex within the window, if any.
    private func nextPublished() -> UInt32? {
        var index = fetchIndex
        while Int(index &- resetIndex) < entries {
            if flags(index) == CKVM_DIRTY_GFN_F_DIRTY { return index }
            index &+= 1
        }
        return nil
    }

    /// After KVM_RESET_DIRTY_RINGS: moves resetIndex over the entries the kernel cleared (it
    /// clears consecutive harvested entries from its reset index, and none past the last one we
    /// marked). An entry we harvested that holds a new push again (the kernel wrapped onto it)
    /// is read again. Returns how many entries of this ring the reset gave back.
    @discardableResult
    func didReset() -> Int {
        let start = resetIndex
        while resetIndex != markedEnd && flags(resetIndex) == 0 { resetIndex &+= 1 }
        if Int32(bitPattern: resetIndex &- fetchIndex) > 0 { fetchIndex = resetIndex }
        if resetIndex != fetchIndex && flags(resetIndex) == CKVM_DIRTY_GFN_F_DIRTY { fetchIndex = resetIndex }
        return Int(resetIndex &- start)
    }

    /// A vCPU stuck in ring-full exits with nothing to harvest: the kernel counts at least a soft
    /// limit of entries as used, but they were lost, and after a wrap its reset index may not be
    /// where we think. Called with no other ring holding harvested entries (the caller resets
    /// first), so `reset` returns only what this ring gave back.
    ///
    /// First finds the kernel's reset index: marks one entry at a time from ours and resets
    /// until the kernel takes one (it takes an entry only at its reset index; a mark it does not
    /// take is cleared again). Then gives back a soft limit's worth from there: safe, because the
    /// kernel's push index is at least that far ahead (never past it, which would wrap the
    /// kernel's count of used entries and keep the vCPU out for good). Returns how many entries
    /// were given back (0: the kernel took none; the caller tries again at the next exit).
    func recoverStuck(reset: () throws(KVMError) -> Int) throws(KVMError) -> Int {
        var given = 0
        var found = false
        for step in 0..<UInt32(entries) {
            let index = resetIndex &+ step
            let old = flags(index)
            if old & CKVM_DIRTY_GFN_F_RESET != 0 { continue }
            ckvm_dirty_gfn_store_flags(gfns + Int(index & UInt32(entries - 1)), CKVM_DIRTY_GFN_F_RESET)
            let consumed = try reset()
            if consumed > 0 {
                resetIndex = index &+ UInt32(consumed)
                given = consumed
                found = true
                break
            }
            ckvm_dirty_gfn_store_flags(gfns + Int(index & UInt32(entries - 1)), old)
        }
        guard found else { return 0 }
        var index = resetIndex
        for _ in 0..<max(recoveryStep - given, 0) {
            ckvm_dirty_gfn_store_flags(gfns + Int(index & UInt32(entries - 1)), CKVM_DIRTY_GFN_F_RESET)
            index &+= 1
        }
        let consumed = try reset()
        resetIndex &+= UInt32(consumed)
        given += consumed
        markedEnd = resetIndex
        fetchIndex = resetIndex
        searchFrontier = true
        return given
    }
}
