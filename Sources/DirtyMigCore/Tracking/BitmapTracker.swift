import Foundation

/// `--track bitmap`: KVM_MEM_LOG_DIRTY_PAGES on every slot, KVM_GET_DIRTY_LOG at each sync.
/// With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, GET leaves pages writable and we re-protect only what
/// was dirty, with KVM_CLEAR_DIRTY_LOG over runs of 64-page-aligned chunks; without it, GET
/// re-protects the whole slot each time. No per-vCPU attribution: the bitmap doesn't say who wrote.
public final class BitmapTracker: DirtyTracker, @unchecked Sendable {
    // @unchecked: all mutable state is guarded by `lock`.
    public let mode = TrackingMode.bitmap
    private let vm: KVMVirtualMachine
    private let memory: GuestMemory
    public let manualProtect: Bool

    private let lock = NSLock()
    private var started = false
    private var scratch: [UInt64]
    private var pending: DirtyPageBitmap
    private var totalPages: UInt64 = 0
    private var lastSync: UInt64 = 0

    /// Enables manual protection on the VM when the kernel has it; call before memory slots exist.
    public init(vm: KVMVirtualMachine, memory: GuestMemory) throws(KVMError) {
        self.vm = vm
        self.memory = memory
        let caps = vm.checkExtension(CKVMConstants.capManualDirtyLogProtect2)
        if caps & Int32(CKVMConstants.manualProtectEnable) != 0 {
            try vm.enableCapability(CKVMConstants.capManualDirtyLogProtect2, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                                    args: [CKVMConstants.manualProtectEnable])
            manualProtect = true
        } else {
            manualProtect = false
        }
        let largest = memory.regions.map(\.pageCount).max() ?? 0
        scratch = [UInt64](repeating: 0, count: (largest + 63) / 64)
        pending = DirtyPageBitmap(pageCount: memory.pageCount)
    }

    public func start() throws(KVMError) {
        lock.lock(); defer { lock.unlock() }
        guard !started else { return }
        try vm.setMemorySlots(of: memory, logDirtyPages: true)
        started = true
        lastSync = MonotonicClock.nanoseconds()
    }

    public func stop() {
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

    private func syncLocked() throws(KVMError) {
        guard started else { return }
        for region in memory.regions {
            let wordCount = (region.pageCount + 63) / 64
            try scratch.withUnsafeMutableBufferPointer { (buffer) throws(KVMError) in
                let words = buffer.baseAddress!
                for index in 0..<wordCount { words[index] = 0 }
                try vm.getDirtyLog(slot: region.slot, into: words)
                var found = 0
                for index in 0..<wordCount { found += words[index].nonzeroBitCount }
                guard found > 0 else { return }
                totalPages += UInt64(found)
                pending.merge(words: words, count: wordCount, atWord: region.firstPage / 64)
                if manualProtect { try clearDirtyChunks(words, wordCount: wordCount, region: region) }
            }
        }
        lastSync = MonotonicClock.nanoseconds()
    }

    /// Re-protects only the 64-page chunks that were dirty. Nearby dirty chunks are merged into
    /// one call (a clean word in the middle costs KVM nothing) so a scattered bitmap doesn't turn
    /// into thousands of ioctls.
    private func clearDirtyChunks(_ words: UnsafeMutablePointer<UInt64>, wordCount: Int,
                                  region: GuestMemory.Region) throws(KVMError) {
        let mergeGap = 64   // clean words tolerated inside one CLEAR call
        var index = 0
        while index < wordCount {
            guard words[index] != 0 else { index += 1; continue }
            let start = index
            var end = index + 1    // one past the last dirty word of this run
            var probe = end
            while probe < wordCount && probe - end <= mergeGap {
                if words[probe] != 0 { end = probe + 1 }
                probe += 1
            }
            let firstPage = start * 64
            let pages = min(end * 64, region.pageCount) - firstPage
            try vm.clearDirtyLog(slot: region.slot, firstPage: UInt64(firstPage), pageCount: UInt32(pages),
                                 bitmap: words + start)
            index = end
        }
    }

    public func counters() -> DirtyCounters {
        lock.lock(); defer { lock.unlock() }
        return DirtyCounters(timeNanoseconds: lastSync, totalPages: totalPages, vcpuPages: nil,
                             ringFullExits: nil, ringOverruns: nil, quotaExits: nil)
    }

    public func collect() throws(KVMError) -> DirtyCollection {
        lock.lock(); defer { lock.unlock() }
        try syncLocked()
        let pages = pending
        pending.removeAll()
        return DirtyCollection(pages: pages, losses: [])
    }

    /// Built by scanning the whole bitmap (the cost seed 004 measures against the ring's list).
    public func collectList() throws(KVMError) -> DirtyList {
        lock.lock(); defer { lock.unlock() }
        try syncLocked()
        let pages = pending.pageList()
        pending.removeAll()
        return DirtyList(pages: pages, losses: [])
    }

    /// The bitmap learns of dirty pages only when synced: checkpoints end on the interval alone.
    public var hasDirtyTrigger: Bool { false }
    public func setDirtyTrigger(pages: Int?, _ fire: (@Sendable () -> Void)?) {}

    public func vcpuExitedRingFull(_ vcpu: Int, resetEpochAtEntry: UInt64) throws(KVMError) {}
    public var resetEpoch: UInt64 { 0 }
}
