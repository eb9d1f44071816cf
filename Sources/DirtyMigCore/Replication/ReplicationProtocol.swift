import Glibc

/// The frames of continuous replication, after the initial copy (see MigrationWire for the
/// whole order). A checkpoint is one epoch of the primary: the pages its guest dirtied, as a
/// dense list of page numbers with their bytes (`checkpointPages`, as many frames as needed),
/// then the vCPU and device state with a digest of the whole epoch (`checkpointEnd`). The standby
/// stages an epoch and applies it only when the end arrived and the digest matched, so its copy
/// is always exactly some checkpoint of the primary, never a torn one. With `--compress`, a
/// frame's pages that shrink travel zstd-compressed (`checkpointCompressedPages`).
public enum CheckpointWire {
    /// Pages per checkpointPages frame: 2 MiB of data, like a migration batch.
    public static let maxPagesPerFrame = 512
}

/// The header of a checkpointPages frame: `count` page numbers (u32 each) follow, then their
/// bytes, page after page.
///
/// The standby decodes in steps, each bounded before the next read: the frame must hold the
/// header (`checkFrame`), the header's count must be 1 to `maxPagesPerFrame` and match the
/// frame's length (`checkedCount`), and every page number must lie inside RAM
/// (`CheckpointPageList.decode`).
struct CheckpointPagesHeader: Equatable {
    static let size = 12
    var epoch: UInt64
    var count: UInt32

    /// The payload length of a frame of `count` pages.
    static func payloadLength(pages count: Int) -> Int { size + count * (4 + 4096) }

    /// Appends the header to `writer` (the primary builds a frame's head in one buffer).
    func encode(into writer: inout WireWriter) {
        writer.u64(epoch); writer.u32(count)
    }

    func encode() -> [UInt8] { WireWriter.encoding(encode(into:)) }

    init(epoch: UInt64, count: UInt32) {
        self.epoch = epoch
        self.count = count
    }

    /// A checkpointPages frame too short to hold the header.
    static func checkFrame(payloadLength: Int) throws(MigrationProtocolError) {
        guard payloadLength >= size else { throw .malformed("a checkpoint pages frame of \(payloadLength) bytes") }
    }

    init(decoding bytes: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(bytes, what: "checkpoint pages header")
        epoch = try reader.u64()
        count = try reader.u32()
        try reader.finish()
    }

    /// A checkpointCompressedPages frame (the same header and page numbers, then one zstd frame
    /// of the pages' bytes): the pages announced, if 1 to `maxPagesPerFrame`, and the zstd
    /// frame's length, which must be at least a byte and less than the pages' bytes (pages that
    /// do not shrink travel in a checkpointPages frame).
    func checkedCompressed(payloadLength: Int) throws(MigrationProtocolError) -> (count: Int, compressedLength: Int) {
        let count = Int(count)
        let compressed = payloadLength - Self.size - 4 * count
        guard count >= 1, count <= CheckpointWire.maxPagesPerFrame, compressed > 0, compressed < count * 4096 else {
            throw .malformed("a compressed checkpoint pages frame announcing \(count) pages in \(payloadLength) bytes")
        }
        return (count, compressed)
    }

    /// The pages announced, if they are 1 to `maxPagesPerFrame` and exactly fill a frame of
    /// `payloadLength` bytes.
    func checkedCount(payloadLength: Int) throws(MigrationProtocolError) -> Int {
        let count = Int(count)
        guard count >= 1, count <= CheckpointWire.maxPagesPerFrame, payloadLength == Self.payloadLength(pages: count) else {
            throw .malformed("a checkpoint pages frame announcing \(count) pages in \(payloadLength) bytes")
        }
        return count
    }
}

/// The page numbers of a checkpointPages frame: u32 each, little-endian, after its header.
enum CheckpointPageList {
    /// Calls `body` with the wire bytes of `pages[range]`: on a little-endian host (x86) the
    /// array's own bytes, not a copy.
    static func withEncoded<R>(_ pages: [UInt32], _ range: Range<Int>, _ body: (UnsafeRawBufferPointer) -> R) -> R {
        #if _endian(little)
        return pages.withUnsafeBytes { numbers in
            body(UnsafeRawBufferPointer(rebasing: numbers[(range.lowerBound * 4)..<(range.upperBound * 4)]))
        }
        #else
        return WireWriter.encoding { writer in for page in pages[range] { writer.u32(page) } }.withUnsafeBytes(body)
        #endif
    }

    static func encode(_ pages: [UInt32]) -> [UInt8] {
        withEncoded(pages, pages.indices) { Array($0) }
    }

    /// Appends the `count` page numbers in `bytes` to `pages`, each checked against a RAM of
    /// `pageCount` pages (those before a page outside RAM are appended).
    static func decode(_ bytes: [UInt8], count: Int, pageCount: Int,
                       appendingTo pages: inout [UInt32]) throws(MigrationProtocolError) {
        var reader = WireReader(bytes, what: "checkpoint page list")
        for _ in 0..<count {
            let page = try reader.u32()
            guard Int(page) < pageCount else {
                throw .malformed("checkpoint page \(page) lies outside RAM (\(pageCount) pages)")
            }
            pages.append(page)
        }
    }
}

/// The end of a checkpoint: how many pages it carried, its state, and its digest.
public struct CheckpointEnd: Sendable, Equatable {
    public var epoch: UInt64
    public var pageCount: UInt32
    /// The epoch's dirty information was lost (a ring overrun) and it carries every page that
    /// holds data instead.
    public var resync: Bool
    public var digest: UInt64
    public var state: [UInt8]

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u64(epoch); writer.u32(pageCount); writer.u32(resync ? 1 : 0); writer.u64(digest)
        writer.blob(state)
        return writer.bytes
    }

    init(epoch: UInt64, pageCount: UInt32, resync: Bool, digest: UInt64, state: [UInt8]) {
        self.epoch = epoch
        self.pageCount = pageCount
        self.resync = resync
        self.digest = digest
        self.state = state
    }

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "checkpoint end")
        epoch = try reader.u64()
        pageCount = try reader.u32()
        let flags = try reader.u32()
        guard flags <= 1 else { throw .malformed("checkpoint end flags 0x\(String(flags, radix: 16))") }
        resync = flags == 1
        digest = try reader.u64()
        state = try reader.blob(max: MigrationWire.maxStateBytes)
        try reader.finish()
    }
}

/// One u64: the epoch a checkpointAck acknowledges, or the last epoch sent, in a heartbeat.
struct EpochFrame: Equatable {
    var epoch: UInt64

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u64(epoch)
        return writer.bytes
    }

    init(epoch: UInt64) { self.epoch = epoch }

    init(decoding payload: [UInt8], what: String) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: what)
        epoch = try reader.u64()
        try reader.finish()
    }
}

/// The digest of one checkpoint: each page's hash mixed with its number (as --verify's memory
/// digest), summed, then the state's hash and the epoch. The order of pages does not matter.
struct CheckpointDigest {
    private(set) var value: UInt64 = 0

    mutating func add(page: UInt32, bytes: UnsafeRawPointer) {
        value &+= MemoryDigest.contribution(page: Int(page), hash: PageSampler.hashPage(bytes))
    }

    func finished(epoch: UInt64, state: [UInt8]) -> UInt64 {
        MemoryDigest.mix(value ^ MemoryDigest.hash(state) ^ epoch &* 0xD6E8_FEB8_6659_FD93)
    }
}
