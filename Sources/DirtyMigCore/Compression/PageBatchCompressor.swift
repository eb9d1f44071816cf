import Glibc

/// What compression did to the page batches of a migration or replication (its report's
/// `compression`).
public struct CompressionTally: Sendable, Equatable {
    /// Batches that carried page data.
    public var batches = 0
    /// Of those, sent compressed.
    public var compressedBatches = 0
    /// Compressed but not smaller by enough, so sent as they were.
    public var incompressibleBatches = 0
    /// Bytes of page data in all batches (before compression).
    public var pageBytes: UInt64 = 0
    /// What those bytes took on the wire.
    public var pageWireBytes: UInt64 = 0
    /// Time spent compressing.
    public var compressNanoseconds: UInt64 = 0

    public init() {}

    /// Page bytes per byte on the wire (1: nothing compressed).
    public var ratio: Double { pageWireBytes == 0 ? 1 : Double(pageBytes) / Double(pageWireBytes) }

    mutating func add(_ other: CompressionTally) {
        batches += other.batches; compressedBatches += other.compressedBatches
        incompressibleBatches += other.incompressibleBatches; pageBytes += other.pageBytes
        pageWireBytes += other.pageWireBytes; compressNanoseconds += other.compressNanoseconds
    }
}

/// The sender's compression of page batches (`--compress zstd|auto`): it decides per batch
/// (`auto`: CompressionChooser), and compresses on its own thread (CompressionWorker) while the
/// sender puts the batch before on the wire: `submit` starts a batch's compression, `collect`
/// waits for it. A batch's data pages are copied into one buffer and compressed with one reused
/// zstd context; a batch that does not shrink by at least 1/16 goes out as it is.
///
/// The copy is needed anyway (zstd compresses one contiguous input), and it also snapshots the
/// pages: the guest keeps writing them meanwhile, and zstd must not see its input change under
/// it. (A page written after the pass's dirty log was collected is sent again in the next pass,
/// whenever the snapshot was taken.)
///
/// Two slots of buffers: the batch on the wire holds one while the next is compressed into the
/// other. The decisions and the tally are kept on the sender's thread alone (at `collect`).
final class PageBatchCompressor: @unchecked Sendable {
    // @unchecked: used by one sending thread at a time (a replication hands it from the thread
    // that made the initial copy to the one that sends checkpoints, which starts after); the
    // worker touches only the slot and the zstd context of the job it runs, and the worker's
    // lock orders its writes before the sender's `collect` reads them.
    let mode: PageCompression
    private let zstd: ZstdCompressor
    private let worker: CompressionWorker
    private let slots: [Slot]
    private var nextSlot = 0
    private(set) var chooser = CompressionChooser()
    private(set) var tally = CompressionTally()
    private let now: @Sendable () -> UInt64

    /// Buffers for one batch's compression, and what it came to.
    private final class Slot: @unchecked Sendable {
        // @unchecked: written by the worker during a job, read by the sender after `wait`.
        var input: UnsafeMutableRawPointer
        var output: UnsafeMutableRawPointer
        var capacity: Int
        var length: Int?
        var nanoseconds: UInt64 = 0
        var ended: UInt64 = 0

        init(capacity: Int) {
            self.capacity = capacity
            input = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
            output = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        }

        /// Only while no job uses the slot.
        func reserve(_ bytes: Int) {
            guard bytes > capacity else { return }
            input.deallocate()
            output.deallocate()
            capacity = bytes
            input = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
            output = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        }

        deinit {
            input.deallocate()
            output.deallocate()
        }
    }

    /// Where a job's pages are: runs of guest memory, copied on the worker into the slot (a
    /// snapshot zstd can read while the guest writes on), or a buffer the caller keeps unchanged
    /// until `collect` (a staged checkpoint's), compressed where it is.
    private enum Source: @unchecked Sendable {
        // @unchecked: raw addresses the caller keeps valid until the job's `collect`.
        case guestRuns(base: UnsafeRawPointer, runs: [(firstPage: Int, count: Int)])
        case stable(UnsafeRawPointer)
    }

    /// A batch's compression (or a sample of it) under way.
    struct Ticket {
        fileprivate let job: CompressionWorker.Ticket
        fileprivate let slot: Int
        /// A sample: measured, never sent.
        let sample: Bool
        fileprivate let pageBytes: Int
    }

    /// nil for `none`, or if zstd cannot make a context (out of memory).
    init?(mode: PageCompression, now: @escaping @Sendable () -> UInt64 = MonotonicClock.nanoseconds) {
        guard mode != .none, let zstd = ZstdCompressor() else { return nil }
        self.mode = mode
        self.zstd = zstd
        self.now = now
        slots = [Slot(capacity: PageSender.batchDataBytes), Slot(capacity: PageSender.batchDataBytes)]
        worker = CompressionWorker()
    }

    deinit { worker.close() }

    /// Starts what the plan for a batch of `dataBytes` says: its `.data` ranges of `table`, from
    /// `memory`, compressed (or a sample of them); nil: it goes out plain, nothing to wait for.
    func submit(_ table: PageBatchTable, dataBytes: Int, from memory: GuestMemory) -> Ticket? {
        guard dataBytes > 0, let sample = planSample() else { return nil }
        var runs: [(firstPage: Int, count: Int)] = []
        var bytes = 0
        let wanted = sample ? min(dataBytes, CompressionChooser.sampleBytes) : dataBytes
        for range in table.ranges where range.kind == .data && bytes < wanted {
            let count = min(Int(range.count), (wanted - bytes + 4095) / 4096)
            runs.append((Int(range.firstPage), count))
            bytes += count * 4096
        }
        return start(.guestRuns(base: UnsafeRawPointer(memory.base), runs: runs), bytes: bytes, sample: sample)
    }

    /// The same for pages already copied out of guest memory (a staged checkpoint's), which the
    /// caller leaves unchanged until `collect`.
    func submit(_ pages: UnsafeRawBufferPointer) -> Ticket? {
        guard pages.count > 0, let base = pages.baseAddress, let sample = planSample() else { return nil }
        let bytes = sample ? min(pages.count, CompressionChooser.sampleBytes) & ~4095 : pages.count
        guard bytes > 0 else { return nil }
        return start(.stable(base), bytes: bytes, sample: sample)
    }

    /// nil: plain, no sample; false: compress the batch; true: a sample.
    private func planSample() -> Bool? {
        if mode == .zstd { return false }
        switch chooser.plan(now: now()) {
        case .plain: return nil
        case .plainWithSample: return true
        case .compressed: return false
        }
    }

    private func start(_ source: Source, bytes: Int, sample: Bool) -> Ticket {
        let index = nextSlot
        nextSlot ^= 1
        let slot = slots[index]
        slot.reserve(bytes)
        let zstd = SendableZstd(zstd), now = self.now
        let job = worker.submit {
            let started = now()
            let input: UnsafeRawPointer
            switch source {
            case .guestRuns(let base, let runs):
                var offset = 0
                for run in runs {
                    memcpy(slot.input + offset, base + run.firstPage * 4096, run.count * 4096)
                    offset += run.count * 4096
                }
                input = UnsafeRawPointer(slot.input)
            case .stable(let pages):
                input = pages
            }
            let bound = bytes - bytes / 16
            slot.length = zstd.compressor.compress(UnsafeRawBufferPointer(start: input, count: bytes),
                                                   into: UnsafeMutableRawBufferPointer(start: slot.output, count: bound))
            slot.ended = now()
            slot.nanoseconds = slot.ended - started
        }
        return Ticket(job: job, slot: index, sample: sample, pageBytes: bytes)
    }

    /// Waits for `ticket`'s job and keeps its measurements: the zstd frame to send, valid until
    /// the slot's next use (two submits on), or nil: send the batch as it is (a sample, or pages
    /// that did not shrink by 1/16).
    func collect(_ ticket: Ticket) -> UnsafeRawBufferPointer? {
        let waitStarted = now()
        worker.wait(ticket.job)
        // A batch the sender had to wait for went into a socket buffer the link had drained
        // meanwhile: its send measures the buffer, not the link (see `sent`).
        sendIsCompressionBound = !ticket.sample && now() - waitStarted > Self.waitedNanoseconds
        let slot = slots[ticket.slot]
        chooser.compressed(pageBytes: ticket.pageBytes, compressedBytes: slot.length, nanoseconds: slot.nanoseconds, now: slot.ended)
        tally.compressNanoseconds += slot.nanoseconds
        if ticket.sample { return nil }
        guard let length = slot.length else {
            tally.incompressibleBatches += 1
            return nil
        }
        return UnsafeRawBufferPointer(start: slot.output, count: length)
    }

    /// Waits for every job submitted (a sender that stops mid-way, before its buffers go).
    func drain() { worker.drain() }

    /// A batch of `pageBytes` went out as `pageWireBytes` (`compressed` or not), its frame of
    /// `frameBytes` taking `sendNanoseconds` (the limiter's wait and the send).
    func sent(pageBytes: Int, pageWireBytes: Int, compressed: Bool, frameBytes: Int, sendNanoseconds: UInt64) {
        if pageBytes > 0 {
            tally.batches += 1
            if compressed { tally.compressedBatches += 1 }
            tally.pageBytes += UInt64(pageBytes)
            tally.pageWireBytes += UInt64(pageWireBytes)
        }
        // Only sends the link paced measure it. Measured at 1 Gbit/s: counting the sends of
        // batches the sender had waited for made the link look several times faster than it
        // is, and auto flipped between compressing and not, compressing about a third of the
        // batches where zstd ran twice as fast as the link.
        if !sendIsCompressionBound { chooser.sent(wireBytes: frameBytes, nanoseconds: sendNanoseconds) }
        sendIsCompressionBound = false
    }

    /// Whether the batch about to be sent was waited for (its compression was slower than the
    /// link drained the one before).
    private var sendIsCompressionBound = false
    /// A wait shorter than this is the worker's hand-over, not compression holding the sender.
    static let waitedNanoseconds: UInt64 = 50_000
}

/// The compressor's zstd context, handed to the worker: one job at a time uses it.
private struct SendableZstd: @unchecked Sendable {
    let compressor: ZstdCompressor
    init(_ compressor: ZstdCompressor) { self.compressor = compressor }
}

/// The receiver's side: a compressed batch's zstd frame is read into one buffer and decompressed
/// into another, both at most `maxCompressedBatchDataBytes` (allocated at the first compressed
/// batch, grown only as far as a batch needs), then landed as a plain batch's bytes would be.
final class PageBatchDecompressor {
    private let zstd: ZstdDecompressor
    private var input: UnsafeMutableRawPointer?
    private var inputCapacity = 0
    private var output: UnsafeMutableRawPointer?
    private var outputCapacity = 0

    /// The window a frame may ask for: that of the largest batch it may hold.
    static let windowLog: Int32 = {
        var log: Int32 = 10
        while 1 << log < MigrationWire.maxCompressedBatchDataBytes { log += 1 }
        return log
    }()

    /// nil if zstd cannot make a context (out of memory).
    init?() {
        guard let zstd = ZstdDecompressor(windowLog: Self.windowLog) else { return nil }
        self.zstd = zstd
    }

    deinit {
        input?.deallocate()
        output?.deallocate()
    }

    /// Where the frame's `count` compressed bytes are to be read (count checked by the caller,
    /// `PageBatchTable.compressedLength`).
    func compressedBuffer(_ count: Int) -> UnsafeMutableRawPointer {
        Self.reserve(&input, &inputCapacity, count)
    }

    /// The `compressedCount` bytes read into `compressedBuffer` decompressed to exactly
    /// `dataBytes` (checked by the caller), or why not.
    func decompress(_ compressedCount: Int, dataBytes: Int) throws(MigrationProtocolError) -> UnsafeRawPointer {
        let target = Self.reserve(&output, &outputCapacity, dataBytes)
        try decompress(compressedCount, into: UnsafeMutableRawBufferPointer(start: target, count: dataBytes))
        return UnsafeRawPointer(target)
    }

    /// The same, into `target` (a checkpoint's staging area), which the frame must fill exactly.
    func decompress(_ compressedCount: Int, into target: UnsafeMutableRawBufferPointer) throws(MigrationProtocolError) {
        try zstd.decompress(UnsafeRawBufferPointer(start: input, count: compressedCount), into: target)
    }

    private static func reserve(_ buffer: inout UnsafeMutableRawPointer?, _ capacity: inout Int, _ count: Int) -> UnsafeMutableRawPointer {
        if let buffer, capacity >= count { return buffer }
        buffer?.deallocate()
        let fresh = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 4096)
        buffer = fresh
        capacity = count
        return fresh
    }
}
