import Glibc

/// Caps the bytes put on the wire per second (`migrate --bandwidth`): before each batch, sleep
/// until the bytes already sent fit the rate. The rate is read before every batch and every
/// slice of a wait, so a cap changed while a migration runs (`migrate --set bandwidth=`) holds
/// from the next batch on.
final class BandwidthLimiter {
    private let rate: () -> UInt64?
    private let now: () -> UInt64
    private let sleep: (UInt64) -> Void
    /// The rate `start` and `sent` count at: the bytes since `start` are due at this rate.
    private var pacedRate: UInt64?
    private var start: UInt64
    private var sent: UInt64 = 0

    /// A fixed rate (nil: unlimited). `now` and `sleep` (nanoseconds): the monotonic clock, or a test's.
    convenience init(bytesPerSecond: UInt64?, now: @escaping () -> UInt64 = MonotonicClock.nanoseconds,
                     sleep: @escaping (UInt64) -> Void = { MonotonicClock.sleep(nanoseconds: $0) }) {
        self.init(rate: { bytesPerSecond }, now: now, sleep: sleep)
    }

    /// A rate that may change: `rate` is asked before every batch and every slice of a wait.
    init(rate: @escaping () -> UInt64?, now: @escaping () -> UInt64 = MonotonicClock.nanoseconds,
         sleep: @escaping (UInt64) -> Void = { MonotonicClock.sleep(nanoseconds: $0) }) {
        self.rate = rate
        self.now = now
        self.sleep = sleep
        pacedRate = rate()
        start = now()
    }

    /// The rate in force now.
    var bytesPerSecond: UInt64? { rate() }

    /// Sleeps until `bytes` more fit the rate, in slices of at most 50 ms so that a cancel
    /// (`shouldStop`) or a new rate is noticed within one slice, not after a whole batch's wait.
    func willSend(_ bytes: Int, shouldStop: () -> Bool = { false }) {
        if rate() != pacedRate { repace(at: now()) }   // before these bytes count, at the rate in force
        sent += UInt64(bytes)
        while !shouldStop() {
            if rate() != pacedRate { repace(at: now()) }
            guard let rate = pacedRate, rate > 0 else { return }
            let now = self.now()
            let due = start + UInt64(Double(sent) / Double(rate) * 1e9)
            guard due > now else { return }
            sleep(min(due - now, 50_000_000))
        }
    }

    /// The rate changed: from `now` on the new one counts. What the old rate still owed (bytes
    /// counted but not yet due) is carried over, to be paced at the new rate; a sender that
    /// fell behind under the old rate gets no credit for it under the new one (a burst at the
    /// new cap's expense would break the cap just set).
    private func repace(at now: UInt64) {
        var owed: UInt64 = 0
        if let old = pacedRate, old > 0 {
            let due = start + UInt64(Double(sent) / Double(old) * 1e9)
            if due > now { owed = UInt64(Double(due - now) / 1e9 * Double(old)) }
        }
        pacedRate = rate()
        start = now
        sent = owed
    }
}

/// What one pass put on the wire.
struct PageSendTally {
    var bytes: UInt64 = 0
    var normalPages: UInt64 = 0
    var zeroPages: UInt64 = 0
    var nanoseconds: UInt64 = 0

    mutating func add(_ other: PageSendTally) {
        bytes += other.bytes; normalPages += other.normalPages; zeroPages += other.zeroPages
    }
}

/// Sends pages straight from guest memory: the frame header and range table (PageBatchTable)
/// are built here, in one reused buffer; the page bytes go to the socket from the guest's own
/// mapping (sendmsg with one iovec per run), never copied. All-zero pages travel as a range
/// flag with no bytes. With a compressor (`--compress`), a batch it chooses to compress goes out
/// as a compressedPages frame: the same table, then the zstd frame of its data pages.
struct PageSender {
    let channel: MigrationChannel
    let memory: GuestMemory
    let limiter: BandwidthLimiter
    var compressor: PageBatchCompressor? = nil
    /// Data per batch: big enough that headers are noise, small enough to pace smoothly.
    static let batchDataBytes = 2 << 20

    /// Under a low --bandwidth, a quarter second's worth (at least 64 KiB): a 2 MiB batch at
    /// 4 KiB/s would leave the receiver without a frame for 512 s, far past its idle timeout.
    var batchLimit: Int { PageSender.batchLimit(bytesPerSecond: limiter.bytesPerSecond) }

    static func batchLimit(bytesPerSecond rate: UInt64?) -> Int {
        guard let rate else { return PageSender.batchDataBytes }
        return Int(min(UInt64(PageSender.batchDataBytes), max(64 << 10, rate / 4)))
    }

    @inline(__always)
    static func isZero(_ page: UnsafeRawPointer) -> Bool {
        var index = 0
        while index < 512 {
            var any: UInt64 = 0
            for lane in 0..<8 { any |= page.load(fromByteOffset: (index + lane) * 8, as: UInt64.self) }
            if any != 0 { return false }
            index += 8
        }
        return true
    }

    /// `onBatch` gets the bytes and pages of each batch put on the wire (for live progress, and
    /// so that a pass cut mid-way still counts the pages it sent).
    func send(_ pages: DirtyPageBitmap, shouldStop: () -> Bool = { false },
              onBatch: (PageSendTally) -> Void = { _ in }) throws(MigrationError) -> PageSendTally {
        try send(runs: pages.runs(), shouldStop: shouldStop, onBatch: onBatch)
    }

    /// The pages of `runs` (ascending, disjoint), in batches: a pass's dirty bitmap, or the runs
    /// post-copy claims one by one.
    func send(runs: [Range<Int>], shouldStop: () -> Bool = { false },
              onBatch: (PageSendTally) -> Void = { _ in }) throws(MigrationError) -> PageSendTally {
        var tally = PageSendTally()
        let started = MonotonicClock.nanoseconds()
        var table = PageBatchTable()
        // The frame header and the range table, in one buffer reused from batch to batch.
        var head = WireWriter()
        var dataBytes = 0

        // With a compressor, a batch's compression starts on the compressor's thread when its
        // table is complete, and the batch goes out after the next one's has started: the link
        // carries one batch while the next is compressed. Without one, each goes out at once.
        var pending: (table: PageBatchTable, dataBytes: Int, ticket: PageBatchCompressor.Ticket?)?
        defer { compressor?.drain() }   // thrown out mid-way: no job outlives this call

        func transmit(_ table: PageBatchTable, dataBytes: Int, ticket: PageBatchCompressor.Ticket?) throws(MigrationError) {
            let compressed = ticket.flatMap { compressor?.collect($0) }
            let pageWireBytes = compressed?.count ?? dataBytes
            head.removeAll()
            let payloadLength = table.encodedSize + pageWireBytes
            MigrationFrameHeader(compressed == nil ? .pages : .compressedPages, payloadLength: payloadLength).encode(into: &head)
            table.encode(into: &head)
            let frameBytes = head.bytes.count + pageWireBytes
            let sendStarted = MonotonicClock.nanoseconds()
            limiter.willSend(frameBytes, shouldStop: shouldStop)
            if shouldStop() { throw .cancelled(MigrationSender.cancelledReason) }
            let base = UnsafeRawPointer(memory.base)
            let result = head.bytes.withUnsafeBytes { headBuffer in
                var buffers = [headBuffer]
                if let compressed {
                    buffers.append(compressed)
                } else {
                    for range in table.ranges where range.kind == .data {
                        buffers.append(UnsafeRawBufferPointer(start: base + Int(range.firstPage) * 4096,
                                                              count: Int(range.count) * 4096))
                    }
                }
                return Result { () throws(SystemError) in try channel.transport.send(buffers) }
            }
            do { try result.get() } catch { throw .connection(error) }
            compressor?.sent(pageBytes: dataBytes, pageWireBytes: pageWireBytes, compressed: compressed != nil,
                             frameBytes: frameBytes, sendNanoseconds: MonotonicClock.nanoseconds() - sendStarted)
            tally.bytes += UInt64(frameBytes)
            var batch = PageSendTally(bytes: UInt64(frameBytes))
            for range in table.ranges {
                if range.kind == .zero { batch.zeroPages += UInt64(range.count) } else { batch.normalPages += UInt64(range.count) }
            }
            onBatch(batch)
        }

        func flush() throws(MigrationError) {
            guard !table.ranges.isEmpty else { return }
            if let compressor {
                let ticket = compressor.submit(table, dataBytes: dataBytes, from: memory)
                if let pending { try transmit(pending.table, dataBytes: pending.dataBytes, ticket: pending.ticket) }
                pending = (table, dataBytes, ticket)
            } else {
                try transmit(table, dataBytes: dataBytes, ticket: nil)
            }
            table.ranges.removeAll(keepingCapacity: true)
            dataBytes = 0
        }

        // Asked again after every batch: the rate may change mid-pass, and a batch sized for a
        // fast rate would starve the receiver under a slow one.
        var batchLimit = self.batchLimit
        for run in runs {
            var page = run.lowerBound
            while page < run.upperBound {
                if shouldStop() { throw .cancelled(MigrationSender.cancelledReason) }
                let zero = PageSender.isZero(UnsafeRawPointer(memory.base) + page * 4096)
                let kind: PageRange.Kind = zero ? .zero : .data
                if zero { tally.zeroPages += 1 } else { tally.normalPages += 1; dataBytes += 4096 }
                if let last = table.ranges.last, last.kind == kind, Int(last.firstPage) + Int(last.count) == page {
                    table.ranges[table.ranges.count - 1].count += 1
                } else {
                    table.ranges.append(PageRange(firstPage: UInt64(page), count: 1, kind: kind))
                }
                page += 1
                if dataBytes >= batchLimit || table.ranges.count >= MigrationWire.maxRangesPerBatch {
                    try flush()
                    batchLimit = self.batchLimit
                }
            }
        }
        try flush()
        if let last = pending { try transmit(last.table, dataBytes: last.dataBytes, ticket: last.ticket) }
        tally.nanoseconds = MonotonicClock.nanoseconds() - started
        return tally
    }
}

/// Receives page batches straight into guest memory. Zero ranges cost nothing for pages that
/// never received data (they are still holes, hence zero); pages that hold older data are zeroed.
/// A class: the receiver's state machine carries it from state to state, and a value there
/// would copy its bitmaps and digest on every batch.
final class PageReceiver {
    let memory: GuestMemory
    private(set) var hasData: DirtyPageBitmap
    private(set) var pagesReceived: UInt64 = 0
    /// Zero pages the source had allocated (its guest had touched them, or dirtymig populated
    /// them at boot). Left as holes here, the guest's first touch of each would fault after the
    /// move, tens of microseconds a page on nested KVM: see `populateAfterResume`.
    private(set) var allocatedAtSource: DirtyPageBitmap

    /// Allocates pass 1's pages ahead of this thread (see PagePrefaulter), while pass 1 lasts.
    private var prefaulter: PagePrefaulter?
    private let allocatesAhead: Bool
    /// Writes the chunks this thread receives into guest memory, on its own thread (see PageWriter).
    private let writer: PageWriter

    /// Pages received per read: 256 KiB, so that they are still in cache when hashed and
    /// written to the memory file.
    static let chunkPages = PageWriter.chunkPages

    /// Decompresses compressedPages frames; nil unless the hello announced a codec, so such a
    /// frame from a sender that announced none is refused. (A standby's checkpoints use it too.)
    let decompressor: PageBatchDecompressor?

    deinit { writer.close() }

    /// `olderData`: pages that already hold data here (a standby's copy that a resync brings up
    /// to date): a zero range over them zeroes them, and nothing is allocated ahead (the copy's
    /// pages are allocated already).
    init(memory: GuestMemory, verifying: Bool, codec: PageCodec = .none,
         olderData: DirtyPageBitmap? = nil) throws(MigrationError) {
        self.memory = memory
        allocatesAhead = olderData == nil
        switch codec {
        case .none: decompressor = nil
        case .zstd:
            guard let decompressor = PageBatchDecompressor() else { throw .machine("cannot make a zstd decompression context (out of memory)") }
            self.decompressor = decompressor
        }
        writer = PageWriter(memory: memory, digest: verifying ? LandedPagesDigest(pageCount: memory.pageCount) : nil)
        hasData = olderData ?? DirtyPageBitmap(pageCount: memory.pageCount)
        allocatedAtSource = DirtyPageBitmap(pageCount: memory.pageCount)
    }

    /// With --verify: this side's digest, kept as pages land (call `settle` first).
    var digest: LandedPagesDigest? { writer.withDigest { $0 } }

    /// Waits until every page received so far is in guest memory; throws if writing one failed.
    /// Before anything else reads or writes guest memory (see PageWriter).
    func settle() throws(MigrationError) { try writer.settle() }

    /// A passPlan frame: the pages the coming pass carries, a bitmap of all RAM. Only the first
    /// plan starts a prefaulter (later passes rewrite pages that are allocated already).
    func receivePlan(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) {
        try MigrationError.wrap { () throws(MigrationProtocolError) in
            try PassPlan.checkFrame(payloadLength: payloadLength, pageCount: memory.pageCount)
        }
        let payload = try channel.receivePayload(payloadLength)
        let planWords = try MigrationError.wrap { () throws(MigrationProtocolError) in
            try PassPlan(decoding: payload, pageCount: memory.pageCount).words
        }
        let plan = DirtyPageBitmap(pageCount: memory.pageCount, words: planWords)
        guard allocatesAhead, prefaulter == nil, pagesReceived == 0, !memory.allocatedAhead else { return }
        prefaulter = PagePrefaulter(memory: memory, plan: plan)
    }

    /// The pass is complete (or the migration ends): the prefaulter has nothing left to win.
    func passEnded() { prefaulter?.stop() }

    /// After the VM resumes here: allocate, on a background thread, the zero pages that were
    /// allocated at the source, so the guest does not pay a first-touch fault on each of them
    /// (measured: a reader over 256 MiB ran at 48,000 pages/s here until it had touched every
    /// page, against 180 million at the source). Not during downtime: it would only lengthen it.
    func populateAfterResume() {
        let runs = allocatedAtSource.runs()
        guard !runs.isEmpty, !memory.allocatedAhead else { return }
        let memory = self.memory
        _ = OSThread(name: "populate-zeros") {
            for run in runs {
                var page = run.lowerBound
                while page < run.upperBound {
                    let end = min(run.upperBound, page + 512)
                    try? memory.populate(UInt64(page) * 4096..<UInt64(end) * 4096)
                    page = end
                }
            }
        }
    }

    /// Reads one pages frame's payload (its header already read) into memory, validating the
    /// range table against RAM and the payload length before any page byte is read.
    func receive(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) {
        let table = try receiveTable(from: channel, payloadLength: payloadLength)
        try MigrationError.wrap { () throws(MigrationProtocolError) in try table.checkPlain(payloadLength: payloadLength) }
        try land(table) { target, count throws(MigrationError) in
            do throws(SystemError) { try channel.transport.receive(into: target, count: count) } catch { throw .connection(error) }
        }
    }

    /// Reads one compressedPages frame's payload: the table (validated as a pages frame's), the
    /// zstd frame's length checked against it, the zstd frame read, decompressed to exactly the
    /// bytes the table announces (never more: see PageBatchDecompressor), and landed.
    func receiveCompressed(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) {
        guard let decompressor else {
            throw .protocolError(.unexpected("a compressed page batch from a source that announced no compression"))
        }
        let table = try receiveTable(from: channel, payloadLength: payloadLength)
        let compressedLength = try MigrationError.wrap { () throws(MigrationProtocolError) in
            try table.compressedLength(payloadLength: payloadLength)
        }
        let buffer = decompressor.compressedBuffer(compressedLength)
        do { try channel.transport.receive(into: buffer, count: compressedLength) } catch { throw .connection(error) }
        let dataBytes = table.dataBytes
        let pages = try MigrationError.wrap { () throws(MigrationProtocolError) in
            try decompressor.decompress(compressedLength, dataBytes: dataBytes)
        }
        var offset = 0
        try land(table) { target, count throws(MigrationError) in
            memcpy(target, pages + offset, count)
            offset += count
        }
    }

    private func receiveTable(from channel: MigrationChannel, payloadLength: Int) throws(MigrationError) -> PageBatchTable {
        try PageBatchTable.receive(from: channel, payloadLength: payloadLength, pageCount: memory.pageCount)
    }

    /// Puts the batch `table` describes into guest memory: `fill` writes the next bytes of its
    /// `.data` ranges (from the connection, or from a decompressed batch) to where they go.
    private func land(_ table: PageBatchTable,
                      fill: (UnsafeMutableRawPointer, Int) throws(MigrationError) -> Void) throws(MigrationError) {
        for range in table.ranges {
            let first = Int(range.firstPage), end = first + Int(range.count)
            switch range.kind {
            case .data:
                var page = first
                while page < end {
                    let chunkEnd = min(end, page + Self.chunkPages)
                    if memory.allocatedAhead || prefaulter?.hasPopulated(page..<chunkEnd) == true {
                        // Resident and mapped here already (prepared memory, receive --memory, or
                        // pages the prefaulter has reached): the bytes go from the connection
                        // straight into guest memory, one copy, no fault, no second thread. (No
                        // page comes twice in a pass, and passes end settled, so this cannot
                        // overtake a queued write of the same page.)
                        let target = memory.base + page * 4096
                        try fill(target, (chunkEnd - page) * 4096)
                        writer.withDigest { $0?.landed(page..<chunkEnd, from: target) }
                        page = chunkEnd
                        continue
                    }
                    // Connection (or decompressed batch) -> a chunk -> (the writer's thread) the
                    // memory file, while this thread reads the next chunk.
                    let chunk = try writer.buffer()
                    do { try fill(chunk, (chunkEnd - page) * 4096) } catch {
                        writer.giveBack()
                        throw error
                    }
                    writer.submit(firstPage: page, pageCount: chunkEnd - page, prefaulter: prefaulter)
                    page = chunkEnd
                }
                hasData.set(first..<end)
            case .zero:
                if (first..<end).contains(where: { hasData.contains($0) }) {
                    try writer.settle()   // the data these pages got earlier is written first
                    writer.withDigest { digest in
                        for page in first..<end where hasData.contains(page) {
                            memset(memory.base + page * 4096, 0, 4096)
                            digest?.zeroed(page)
                        }
                    }
                }
                allocatedAtSource.set(first..<end)
            }
            pagesReceived += UInt64(range.count)
        }
    }
}

extension PageBatchTable {
    /// The range table at the head of a pages or compressedPages frame (its header read), each
    /// step bounded before the next read; the ranges checked against a RAM of `pageCount` pages.
    static func receive(from channel: MigrationChannel, payloadLength: Int, pageCount: Int) throws(MigrationError) -> PageBatchTable {
        try MigrationError.wrap { () throws(MigrationProtocolError) in try checkFrame(payloadLength: payloadLength) }
        let countBytes = try channel.receivePayload(countBytes)
        let count = try MigrationError.wrap { () throws(MigrationProtocolError) in
            try rangeCount(decoding: countBytes, payloadLength: payloadLength)
        }
        let entries = try channel.receivePayload(entryBytes * count)
        return try MigrationError.wrap { () throws(MigrationProtocolError) in
            try PageBatchTable(decoding: entries, count: count, pageCount: UInt64(pageCount))
        }
    }
}
