/// Little-endian encoding for the migration wire protocol. The reader never traps: every read is
/// bounds-checked and a short or malformed payload is a `MigrationProtocolError`.
struct WireWriter {
    private(set) var bytes: [UInt8] = []

    mutating func u8(_ value: UInt8) { bytes.append(value) }
    mutating func u32(_ value: UInt32) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ value: UInt64) { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func blob(_ value: [UInt8]) { u32(UInt32(value.count)); bytes.append(contentsOf: value) }
    mutating func string(_ value: String) { blob(Array(value.utf8.prefix(MigrationWire.maxStringBytes))) }
    /// The bytes `body` writes: a frame's payload in one expression.
    static func encoding(_ body: (inout WireWriter) -> Void) -> [UInt8] {
        var writer = WireWriter()
        body(&writer)
        return writer.bytes
    }
    /// Empties the buffer, keeping its capacity, for the next frame.
    mutating func removeAll() { bytes.removeAll(keepingCapacity: true) }
}

struct WireReader {
    private let bytes: [UInt8]
    private var offset = 0
    let what: String

    init(_ bytes: [UInt8], what: String) {
        self.bytes = bytes
        self.what = what
    }

    var remaining: Int { bytes.count - offset }

    private mutating func take(_ count: Int) throws(MigrationProtocolError) -> ArraySlice<UInt8> {
        guard count >= 0, count <= remaining else {
            throw .malformed("\(what) is truncated (needs \(count) more bytes at offset \(offset), has \(remaining))")
        }
        defer { offset += count }
        return bytes[offset..<offset + count]
    }

    mutating func u8() throws(MigrationProtocolError) -> UInt8 { try take(1).first! }
    mutating func u32() throws(MigrationProtocolError) -> UInt32 {
        try take(4).reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }
    mutating func u64() throws(MigrationProtocolError) -> UInt64 {
        try take(8).reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }
    mutating func blob(max: Int) throws(MigrationProtocolError) -> [UInt8] {
        let count = Int(try u32())
        guard count <= max else { throw .malformed("\(what) carries \(count) bytes where at most \(max) are allowed") }
        return Array(try take(count))
    }
    /// A string from the peer (a VM name, a refusal, abort or result message): any bytes up to
    /// 4 KiB, so escaped and bounded here, where it enters, before anything can log it.
    mutating func peerText() throws(MigrationProtocolError) -> String {
        PeerText.escaped(try blob(max: MigrationWire.maxStringBytes))
    }
    func finish() throws(MigrationProtocolError) {
        guard remaining == 0 else { throw .malformed("\(what) has \(remaining) unexpected trailing bytes") }
    }
}
