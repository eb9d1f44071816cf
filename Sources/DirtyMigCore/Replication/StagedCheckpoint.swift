import Dispatch
import Glibc

/// One epoch of the primary as it will go to the standby: its dirty pages (a dense list and their
/// bytes, page after page) and its vCPU and device state, copied out of guest memory so that the
/// network transfer happens while the next epoch runs. One buffer, reused from epoch to epoch
/// (grown when an epoch needs more).
///
/// Pages come in two ways. While the epoch runs, `stage(_:from:paused: false)` copies the pages
/// dirtied so far (one thread, beside the running vCPUs); at the epoch's end, with the vCPUs
/// paused, `stage(_:from:paused: true)` copies what was dirtied since (both cores). A page
/// written again after its early copy is in the later list (the tracker re-protected it before
/// the copy was made) and is copied over its older copy, so the checkpoint is still exactly the
/// guest's memory at the pause; the pause pays only for the epoch's last pages.
final class StagedCheckpoint {
    private(set) var epoch: UInt64 = 0
    private(set) var pages: [UInt32] = []
    private(set) var state: [UInt8] = []
    private(set) var resync = false
    /// Where each page staged this epoch sits in `pages` and the buffer (only once a second list
    /// may come: pages staged while the epoch ran).
    private var slots: [UInt32: Int] = [:]
    /// The copies a stage makes: (slot, page), reused so that a paused stage does not allocate.
    private var copies: [(slot: Int, page: UInt32)] = []
    private var buffer: UnsafeMutableRawPointer?
    private var capacityPages = 0
    /// Pages copied by the last paused stage (the part of the epoch the pause paid for).
    private(set) var pagesCopiedPaused = 0

    /// Up to this (256 MiB) the buffer stays as large as the largest epoch so far, warm; beyond
    /// it (a resync of a big VM after a ring overrun) it is given back at the next epoch. A
    /// buffer freed and allocated again costs a first-touch fault per page: with 64 MiB as the
    /// limit, 160 MiB/s writers spiralled into 256 MiB epochs taking seconds each.
    static let keptCapacityPages = 65536

    deinit { buffer?.deallocate() }

    var dataBytes: Int { pages.count * 4096 }

    /// A buffer of `pages` pages, allocated and faulted in now, before any pause needs it: on
    /// this machine the first touch of a fresh page costs microseconds, which a copy made
    /// while the vCPUs are paused would pay page by page.
    init(preparedPages: Int = 4096) {
        self.preparedPages = preparedPages
        reserve(preparedPages)
    }

    private let preparedPages: Int

    /// Room for `needed` pages, keeping the pages staged so far (a buffer grown in mid-epoch).
    private func reserve(_ needed: Int) {
        guard buffer == nil || needed > capacityPages else { return }
        let capacity = max(needed + needed / 2, 256)
        let fresh = UnsafeMutableRawPointer.allocate(byteCount: capacity * 4096, alignment: 4096)
        let kept = buffer == nil ? 0 : pages.count * 4096
        if let old = buffer, kept > 0 { fresh.copyMemory(from: old, byteCount: kept) }
        memset(fresh + kept, 0, capacity * 4096 - kept)
        buffer?.deallocate()
        buffer = fresh
        capacityPages = capacity
    }

    /// Starts the next epoch empty (after the last one was sent, while the guest runs): a buffer
    /// grown past `keptCapacityPages` is given back here and a warm one of the prepared size
    /// made instead.
    func begin() {
        pages.removeAll(keepingCapacity: true)
        slots.removeAll(keepingCapacity: true)
        resync = false
        lossesSeen = 0
        pagesCopiedPaused = 0
        if capacityPages > Self.keptCapacityPages {
            buffer?.deallocate()
            buffer = nil
            reserve(preparedPages)
        }
    }

    /// Whether pages were staged this epoch.
    var isEmpty: Bool { pages.isEmpty }

    /// Losses of dirty information (ring overruns) seen this epoch.
    private(set) var lossesSeen = 0

    /// Marks the epoch as a resync (every data page, after dirty information was lost): what was
    /// staged so far is dropped; the paused stage copies every data page.
    func startResync(losses: Int) {
        pages.removeAll(keepingCapacity: true)
        slots.removeAll(keepingCapacity: true)
        resync = true
        lossesSeen += losses
    }

    /// Copies `list` (distinct pages) from guest memory into the epoch. `paused`: the vCPUs are
    /// stopped, so the other core is free (the copy is split in two from 256 pages on) and no
    /// list comes after this one; otherwise one thread copies, beside the running guest.
    func stage(_ list: [UInt32], from memory: GuestMemory, paused: Bool) {
        copies.removeAll(keepingCapacity: true)
        if slots.isEmpty && pages.isEmpty {
            // The first list of the epoch: every page is new, in order.
            reserve(list.count)
            pages.append(contentsOf: list)
            for (slot, page) in list.enumerated() { copies.append((slot, page)) }
            if !paused { for (slot, page) in list.enumerated() { slots[page] = slot } }
        } else {
            reserve(pages.count + list.count)
            for page in list {
                if let slot = slots[page] {
                    copies.append((slot, page))
                } else {
                    let slot = pages.count
                    pages.append(page)
                    copies.append((slot, page))
                    if !paused { slots[page] = slot }
                }
            }
        }
        if paused { pagesCopiedPaused = copies.count }
        let source = UInt(bitPattern: memory.base), target = UInt(bitPattern: buffer!)
        let count = copies.count
        let parts = paused && count >= 256 ? 2 : 1
        copies.withUnsafeBufferPointer { work in
            let base = UInt(bitPattern: work.baseAddress)
            DispatchQueue.concurrentPerform(iterations: parts) { part in
                let work = UnsafePointer<(slot: Int, page: UInt32)>(bitPattern: base)!
                for index in count * part / parts..<count * (part + 1) / parts {
                    memcpy(UnsafeMutableRawPointer(bitPattern: target)! + work[index].slot * 4096,
                           UnsafeRawPointer(bitPattern: source)! + Int(work[index].page) * 4096, 4096)
                }
            }
        }
    }

    func setState(_ bytes: [UInt8]) { state = bytes }
    func setEpoch(_ value: UInt64) { epoch = value }

    /// Puts the checkpoint on the wire: checkpointPages frames of up to 512 pages straight from
    /// the buffer (one sendmsg each), then checkpointEnd with the digest. Returns the bytes sent,
    /// or nil if `shouldStop` said so between two frames (the standby drops a torn epoch whole).
    /// With a `compressor`, the pages of a frame it chooses to compress travel as one zstd frame
    /// (checkpointCompressedPages), if they shrink.
    func send(over channel: MigrationChannel, compressor: PageBatchCompressor? = nil,
              shouldStop: () -> Bool = { false }) throws(MigrationError) -> UInt64? {
        var digest = CheckpointDigest()
        var sent: UInt64 = 0
        let data = UnsafeRawPointer(buffer)
        // The frame header and the checkpoint pages header, in one buffer reused frame to frame.
        var head = WireWriter()
        // A frame's compression starts before the frame before it goes out (see PageSender):
        // the staged buffer does not change meanwhile.
        defer { compressor?.drain() }
        func frame(at first: Int) -> (first: Int, count: Int, ticket: PageBatchCompressor.Ticket?) {
            let count = min(CheckpointWire.maxPagesPerFrame, pages.count - first)
            return (first, count, compressor?.submit(UnsafeRawBufferPointer(start: data! + first * 4096, count: count * 4096)))
        }
        var next = pages.isEmpty ? nil : frame(at: 0)
        while let (first, count, ticket) = next {
            if shouldStop() { return nil }
            let bytes = UnsafeRawBufferPointer(start: data! + first * 4096, count: count * 4096)
            next = first + count < pages.count ? frame(at: first + count) : nil
            let compressed = ticket.flatMap { compressor?.collect($0) }
            let pageWireBytes = compressed?.count ?? bytes.count
            let payload = CheckpointPagesHeader.size + count * 4 + pageWireBytes
            head.removeAll()
            MigrationFrameHeader(compressed == nil ? .checkpointPages : .checkpointCompressedPages,
                                 payloadLength: payload).encode(into: &head)
            CheckpointPagesHeader(epoch: epoch, count: UInt32(count)).encode(into: &head)
            for index in first..<first + count { digest.add(page: pages[index], bytes: data! + index * 4096) }
            let sendStarted = MonotonicClock.nanoseconds()
            let result = head.bytes.withUnsafeBytes { headBytes in
                CheckpointPageList.withEncoded(pages, first..<first + count) { list in
                    Result { () throws(SystemError) in try channel.transport.send([headBytes, list, compressed ?? bytes]) }
                }
            }
            do { try result.get() } catch { throw .connection(error) }
            let frameBytes = MigrationWire.frameHeaderSize + payload
            compressor?.sent(pageBytes: bytes.count, pageWireBytes: pageWireBytes, compressed: compressed != nil,
                             frameBytes: frameBytes, sendNanoseconds: MonotonicClock.nanoseconds() - sendStarted)
            sent += UInt64(frameBytes)
        }
        if shouldStop() { return nil }
        let end = CheckpointEnd(epoch: epoch, pageCount: UInt32(pages.count), resync: resync,
                                digest: digest.finished(epoch: epoch, state: state), state: state)
        let encoded = end.encode()
        try channel.send(.checkpointEnd, encoded)
        return sent + UInt64(MigrationWire.frameHeaderSize + encoded.count)
    }
}
