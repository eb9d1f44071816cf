/// The frames of a pre-copy pass that describe pages: a pages frame's range table (also the head
/// of a compressedPages frame) and the pass plan. Each is typed at both ends, its encoding and its decoding (with every bound the
/// receiver checks) side by side. The page bytes themselves never pass through these types: the
/// sender hands pointers into guest memory to sendmsg, the receiver reads straight into guest
/// memory.

/// The head of a pages frame: a u32 range count, then per range a u64 first page, a u32 page
/// count and a u32 kind (little-endian). The bytes of the `.data` ranges follow the table, range
/// after range; `.zero` ranges carry none.
///
/// The receiver decodes in steps, each bounded before the next read: the frame must hold the
/// count (`checkFrame`), the count must be at most `maxRangesPerBatch` with its table inside the
/// frame (`rangeCount`), and the table's ranges must lie inside RAM and announce exactly the
/// frame's data bytes (`init(decoding:count:payloadLength:pageCount:)`).
struct PageBatchTable: Equatable {
    static let countBytes = 4
    static let entryBytes = 16

    var ranges: [PageRange]

    init(ranges: [PageRange] = []) { self.ranges = ranges }

    /// The table's size on the wire.
    var encodedSize: Int { Self.encodedSize(ranges: ranges.count) }

    static func encodedSize(ranges count: Int) -> Int { countBytes + entryBytes * count }

    /// The bytes of page data that follow the table.
    var dataBytes: Int { ranges.reduce(0) { $0 + ($1.kind == .data ? Int($1.count) * 4096 : 0) } }

    /// Appends the table to `writer` (the sender reuses one buffer from batch to batch).
    func encode(into writer: inout WireWriter) {
        writer.u32(UInt32(ranges.count))
        for range in ranges {
            writer.u64(range.firstPage); writer.u32(range.count); writer.u32(range.kind.rawValue)
        }
    }

    func encode() -> [UInt8] { WireWriter.encoding(encode(into:)) }

    /// A pages frame too short to hold the range count.
    static func checkFrame(payloadLength: Int) throws(MigrationProtocolError) {
        guard payloadLength >= countBytes else { throw .malformed("a pages frame of \(payloadLength) bytes") }
    }

    /// The range count (`countBytes` bytes), bounded, and with its table inside the frame.
    static func rangeCount(decoding bytes: [UInt8], payloadLength: Int) throws(MigrationProtocolError) -> Int {
        var reader = WireReader(bytes, what: "page batch")
        let count = Int(try reader.u32())
        guard count <= MigrationWire.maxRangesPerBatch, encodedSize(ranges: count) <= payloadLength else {
            throw .malformed("a page batch of \(count) ranges in \(payloadLength) bytes")
        }
        return count
    }

    /// The `count` entries of the table (`entryBytes` each), checked against a RAM of `pageCount`
    /// pages and against the frame's length: the frame must be the table and the data it
    /// announces, no more, no less.
    init(decoding entries: [UInt8], count: Int, payloadLength: Int, pageCount: UInt64) throws(MigrationProtocolError) {
        try self.init(decoding: entries, count: count, pageCount: pageCount)
        try checkPlain(payloadLength: payloadLength)
    }

    /// A pages frame must be the table and the data it announces, no more, no less.
    func checkPlain(payloadLength: Int) throws(MigrationProtocolError) {
        guard encodedSize + dataBytes == payloadLength else {
            throw .malformed("a page batch announcing \(dataBytes) data bytes in a \(payloadLength)-byte frame")
        }
    }

    /// The `count` entries of the table, checked against a RAM of `pageCount` pages only (a
    /// compressed batch's frame is checked against them by `compressedLength`).
    init(decoding entries: [UInt8], count: Int, pageCount: UInt64) throws(MigrationProtocolError) {
        var reader = WireReader(entries, what: "page range table")
        var ranges: [PageRange] = []
        ranges.reserveCapacity(count)
        for _ in 0..<count {
            let first = try reader.u64(), pages = try reader.u32(), rawKind = try reader.u32()
            guard let kind = PageRange.Kind(rawValue: rawKind) else { throw .malformed("page range kind \(rawKind)") }
            // Both values come from the wire: compare without adding them (a first page of
            // 2^64-1 made `first + count` trap here and took the receiver down).
            guard pages > 0, first < pageCount, UInt64(pages) <= pageCount - first else {
                throw .malformed("\(pages) pages from page \(first) lie outside RAM (\(pageCount) pages)")
            }
            ranges.append(PageRange(firstPage: first, count: pages, kind: kind))
        }
        self.ranges = ranges
    }

    /// A compressedPages frame: the table, then one zstd frame of the `.data` ranges' bytes,
    /// range after range. Returns the zstd frame's length, checked before it is read: the
    /// data it announces must be 1 byte to `maxCompressedBatchDataBytes` (what the receiver
    /// decompresses into at most), and the compressed bytes fewer than that (a batch that does
    /// not get smaller travels as it is).
    func compressedLength(payloadLength: Int) throws(MigrationProtocolError) -> Int {
        let dataBytes = self.dataBytes
        guard dataBytes > 0, dataBytes <= MigrationWire.maxCompressedBatchDataBytes else {
            throw .malformed("a compressed page batch announcing \(dataBytes) data bytes (1 to \(MigrationWire.maxCompressedBatchDataBytes))")
        }
        let compressed = payloadLength - encodedSize
        guard compressed > 0, compressed < dataBytes else {
            throw .malformed("a compressed page batch of \(compressed) bytes for \(dataBytes) data bytes")
        }
        return compressed
    }

    /// The whole table at once (`bytes` may run on into the data), all steps in order.
    init(decoding bytes: [UInt8], payloadLength: Int, pageCount: UInt64) throws(MigrationProtocolError) {
        try Self.checkFrame(payloadLength: payloadLength)
        let count = try Self.rangeCount(decoding: Array(bytes.prefix(Self.countBytes)), payloadLength: payloadLength)
        let end = min(bytes.count, Self.encodedSize(ranges: count))
        try self.init(decoding: Array(bytes[min(bytes.count, Self.countBytes)..<end]), count: count,
                      payloadLength: payloadLength, pageCount: pageCount)
    }
}

/// A passPlan frame: the pages pass `pass` will carry, as a bitmap of all RAM (u32 pass, then
/// one u64 per 64 pages), so that the receiver can allocate them ahead while they arrive.
struct PassPlan: Equatable {
    var pass: UInt32
    var words: [UInt64]

    /// The payload length of the plan of a RAM of `pageCount` pages.
    static func payloadLength(pageCount: Int) -> Int { 4 + 8 * ((pageCount + 63) / 64) }

    func encode() -> [UInt8] {
        WireWriter.encoding { writer in
            writer.u32(pass)
            for word in words { writer.u64(word) }
        }
    }

    /// A plan's length must be exactly that of a RAM of `pageCount` pages: checked from the
    /// frame header, before the payload is read.
    static func checkFrame(payloadLength: Int, pageCount: Int) throws(MigrationProtocolError) {
        guard payloadLength == Self.payloadLength(pageCount: pageCount) else {
            throw .malformed("a pass plan of \(payloadLength) bytes for \(pageCount) pages of RAM")
        }
    }

    init(pass: UInt32, words: [UInt64]) {
        self.pass = pass
        self.words = words
    }

    init(decoding payload: [UInt8], pageCount: Int) throws(MigrationProtocolError) {
        try Self.checkFrame(payloadLength: payload.count, pageCount: pageCount)
        var reader = WireReader(payload, what: "pass plan")
        pass = try reader.u32()
        let count = (pageCount + 63) / 64
        var words: [UInt64] = []
        words.reserveCapacity(count)
        for _ in 0..<count { words.append(try reader.u64()) }
        self.words = words
        try reader.finish()
    }
}
