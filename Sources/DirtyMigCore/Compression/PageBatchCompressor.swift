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
/// (`auto`: CompressionChooser), copies the batch's data pages into one buffer, compresses them
/// with one reused zstd context, and keeps the tally. A batch that does not shrink by at least
/// 1/16 goes out as it is.
///
/// The copy is needed anyway (zstd compresses one contiguous input), and it also snapshots the
/// pages: the guest keeps writing them meanwhile, and zstd must not see its input change under
/// it. Compression runs on the sending thread: at level 1 it compresses faster than the links
/// it pays on carry (see CompressionChooser for the rule that keeps it off faster ones).
final class PageBatchCompressor: @unchecked Sendable {
    // @unchecked: used by one thread at a time; a replication hands it from the thread that
    // made the initial copy to the one that sends checkpoints, which starts after.
    let mode: PageCompression
    private let zstd: ZstdCompressor
    private var input: UnsafeMutableRawPointer
    private var output: UnsafeMutableRawPointer
    private var capacity: Int
    private(set) var chooser = CompressionChooser()
    private(set) var tally = CompressionTally()
    /// When the last batch's sending ended (for the link's rate).
    private let now: () -> UInt64

    /// nil for `none`, or if zstd cannot make a context (out of memory).
    init?(mode: PageCompression, now: @escaping () -> UInt64 = MonotonicClock.nanoseconds) {
        guard mode != .none, let zstd = ZstdCompressor() else { return nil }
        self.mode = mode
        self.zstd = zstd
        self.now = now
        capacity = PageSender.batchDataBytes
        input = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        output = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    }

    deinit {
        input.deallocate()
        output.deallocate()
    }

    /// Compress the next batch?
    func wantsBatch() -> Bool { mode == .zstd || chooser.shouldCompress(now: now()) }

    /// The `.data` ranges of `table` (`dataBytes` of them), from `memory`, compressed: the
    /// zstd frame, valid until the next call; nil if they did not shrink by 1/16.
    func compress(_ table: PageBatchTable, dataBytes: Int, from memory: GuestMemory) -> UnsafeRawBufferPointer? {
        let started = now()
        reserve(dataBytes)
        var offset = 0
        for range in table.ranges where range.kind == .data {
            let bytes = Int(range.count) * 4096
            memcpy(input + offset, memory.base + Int(range.firstPage) * 4096, bytes)
            offset += bytes
        }
        return compress(UnsafeRawBufferPointer(start: input, count: dataBytes), started: started)
    }

    /// Pages already copied out of guest memory (a staged checkpoint's), compressed as above.
    func compress(_ pages: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer? {
        let started = now()
        reserve(pages.count)
        return compress(pages, started: started)
    }

    private func compress(_ pages: UnsafeRawBufferPointer, started: UInt64) -> UnsafeRawBufferPointer? {
        let bound = pages.count - pages.count / 16
        let length = zstd.compress(pages, into: UnsafeMutableRawBufferPointer(start: output, count: bound))
        let ended = now()
        chooser.compressed(pageBytes: pages.count, compressedBytes: length, nanoseconds: ended - started, now: ended)
        tally.compressNanoseconds += ended - started
        if length == nil { tally.incompressibleBatches += 1 }
        return length.map { UnsafeRawBufferPointer(start: output, count: $0) }
    }

    private func reserve(_ bytes: Int) {
        guard bytes > capacity else { return }
        input.deallocate()
        output.deallocate()
        capacity = bytes
        input = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        output = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    }

    /// A batch of `pageBytes` went out as `pageWireBytes` (`compressed` or not), its frame of
    /// `frameBytes` taking `sendNanoseconds` (the limiter's wait and the send).
    func sent(pageBytes: Int, pageWireBytes: Int, compressed: Bool, frameBytes: Int, sendNanoseconds: UInt64) {
        if pageBytes > 0 {
            tally.batches += 1
            if compressed { tally.compressedBatches += 1 }
            tally.pageBytes += UInt64(pageBytes)
            tally.pageWireBytes += UInt64(pageWireBytes)
        }
        chooser.sent(wireBytes: frameBytes, nanoseconds: sendNanoseconds)
    }
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
