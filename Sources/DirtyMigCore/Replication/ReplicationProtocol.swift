import Glibc

/// The frames of continuous replication, after the initial copy (see MigrationWire for the
/// whole order). A checkpoint is one epoch of the primary: the pages its guest dirtied, as a
/// dense list of page numbers with their bytes (`checkpointPages`, as many frames as needed),
/// then the vCPU and device state with a digest of the whole epoch (`checkpointEnd`). The standby
/// stages an epoch and applies it only when the end arrived and the digest matched, so its copy
/// is always exactly some checkpoint of the primary, never a torn one.
public enum CheckpointWire {
    /// Pages per checkpointPages frame: 2 MiB of data, like a migration batch.
    public static let maxPagesPerFrame = 512
}

/// The header of a checkpointPages frame: `count` page numbers (u32 each) follow, then their
/// bytes, page after page.
struct CheckpointPagesHeader: Equatable {
    static let size = 12
    var epoch: UInt64
    var count: UInt32

    func encode() -> [UInt8] {
        var writer = WireWriter()
        writer.u64(epoch); writer.u32(count)
        return writer.bytes
    }

    init(epoch: UInt64, count: UInt32) {
        self.epoch = epoch
        self.count = count
    }

    init(decoding bytes: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(bytes, what: "checkpoint pages header")
        epoch = try reader.u64()
        count = try reader.u32()
        try reader.finish()
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
