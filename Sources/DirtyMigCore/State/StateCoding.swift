import CKVM

/// The binary form every saved state shares: a 4-byte magic naming the kind of state, a u16
/// version, a u16 of flags (0), then the kind's fields in a fixed order, little-endian. Every
/// variable-sized field carries its length (u32) before its bytes, so a decoder checks each
/// length against what is left before it allocates anything: malformed input costs at most its
/// own size and ends in a `StateDecodingError`, never a crash.
///
/// KVM's own structs (kvm_regs, kvm_sregs, kvm_lapic_state...) travel as their raw bytes: their
/// layout is the kernel's stable ABI, and x86 is little-endian.
struct StateEncoder {
    private(set) var bytes: [UInt8] = []

    init(magic: StateMagic, version: UInt16) {
        u32(magic.rawValue)
        u16(version)
        u16(0)
    }

    mutating func u8(_ value: UInt8) { bytes.append(value) }
    mutating func u16(_ value: UInt16) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
    mutating func u32(_ value: UInt32) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
    mutating func u64(_ value: UInt64) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }

    /// A length-prefixed byte field.
    mutating func field(_ value: [UInt8]) {
        u32(UInt32(value.count))
        bytes += value
    }

    /// A KVM struct as a length-prefixed field of its raw bytes.
    mutating func field<T: KVMStruct>(raw value: T) {
        withUnsafeBytes(of: value) { field(Array($0)) }
    }

    /// An optional KVM struct: length 0 when absent.
    mutating func field<T: KVMStruct>(optional value: T?) {
        if let value { field(raw: value) } else { u32(0) }
    }
}

struct StateDecoder {
    private let bytes: [UInt8]
    private var offset = 0
    let kind: StateMagic

    /// Checks the magic and the version; then the fields follow.
    init(_ bytes: [UInt8], kind: StateMagic, version: UInt16) throws(StateDecodingError) {
        self.bytes = bytes
        self.kind = kind
        let magic = try u32("magic")
        guard magic == kind.rawValue else { throw .notThisKind(kind.name, foundMagic: magic) }
        let found = try u16("version")
        guard found == version else { throw .unsupportedVersion(kind.name, found: found, supported: version) }
        _ = try u16("flags")
    }

    private mutating func take(_ count: Int, _ field: String) throws(StateDecodingError) -> ArraySlice<UInt8> {
        guard count >= 0, count <= bytes.count - offset else {
            throw .truncated(kind.name, field: field, needed: count, available: bytes.count - offset)
        }
        defer { offset += count }
        return bytes[offset..<offset + count]
    }

    private mutating func integer<T: FixedWidthInteger>(_ field: String, _: T.Type) throws(StateDecodingError) -> T {
        let slice = try take(MemoryLayout<T>.size, field)
        return slice.reversed().reduce(T(0)) { ($0 << 8) | T($1) }
    }

    mutating func u8(_ field: String) throws(StateDecodingError) -> UInt8 { try integer(field, UInt8.self) }
    mutating func u16(_ field: String) throws(StateDecodingError) -> UInt16 { try integer(field, UInt16.self) }
    mutating func u32(_ field: String) throws(StateDecodingError) -> UInt32 { try integer(field, UInt32.self) }
    mutating func u64(_ field: String) throws(StateDecodingError) -> UInt64 { try integer(field, UInt64.self) }

    mutating func bool(_ field: String) throws(StateDecodingError) -> Bool {
        switch try u8(field) {
        case 0: return false
        case 1: return true
        case let value: throw .invalidValue(kind.name, field: field, "\(value) is not a boolean (0 or 1)")
        }
    }

    /// A count that precedes `limit` or fewer items.
    mutating func count(_ field: String, limit: Int) throws(StateDecodingError) -> Int {
        let value = try u32(field)
        guard value <= limit else { throw .tooMany(kind.name, field: field, count: Int(value), limit: limit) }
        return Int(value)
    }

    /// A length-prefixed byte field of at most `limit` bytes (and never more than is left).
    mutating func field(_ field: String, limit: Int) throws(StateDecodingError) -> [UInt8] {
        let length = try u32(field + " length")
        guard length <= limit else {
            throw .badLength(kind.name, field: field, length: Int(length), expected: "at most \(limit)")
        }
        return Array(try take(Int(length), field))
    }

    /// A KVM struct: its field must be exactly its size.
    mutating func raw<T: KVMStruct>(_ field: String, as type: T.Type) throws(StateDecodingError) -> T {
        guard let value = try optionalRaw(field, as: type) else {
            throw .badLength(kind.name, field: field, length: 0, expected: "\(MemoryLayout<T>.size)")
        }
        return value
    }

    /// A KVM struct that may be absent (length 0).
    mutating func optionalRaw<T: KVMStruct>(_ field: String, as _: T.Type) throws(StateDecodingError) -> T? {
        let bytes = try self.field(field, limit: MemoryLayout<T>.size)
        if bytes.isEmpty { return nil }
        guard bytes.count == MemoryLayout<T>.size else {
            throw .badLength(kind.name, field: field, length: bytes.count, expected: "0 or \(MemoryLayout<T>.size)")
        }
        var value = T()
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
        return value
    }

    /// Nothing may follow the last field.
    func finish() throws(StateDecodingError) {
        if offset != bytes.count { throw .trailingBytes(kind.name, count: bytes.count - offset) }
    }
}

/// Which state a blob holds (its first four bytes, little-endian).
enum StateMagic: UInt32 {
    case vcpu = 0x4356_4D44      // "DMVC"
    case devices = 0x5644_4D44   // "DMDV"
    case machine = 0x534D_4D44   // "DMMS"

    var name: String {
        switch self {
        case .vcpu: return "vCPU state"
        case .devices: return "VM device state"
        case .machine: return "machine state"
        }
    }
}

/// Why bytes could not be decoded into a saved state.
public enum StateDecodingError: Error, Equatable, CustomStringConvertible {
    case notThisKind(String, foundMagic: UInt32)
    case unsupportedVersion(String, found: UInt16, supported: UInt16)
    case truncated(String, field: String, needed: Int, available: Int)
    case badLength(String, field: String, length: Int, expected: String)
    case tooMany(String, field: String, count: Int, limit: Int)
    case invalidValue(String, field: String, String)
    case trailingBytes(String, count: Int)

    public var description: String {
        switch self {
        case .notThisKind(let kind, let magic):
            return "not a \(kind) (magic 0x\(String(magic, radix: 16)))"
        case .unsupportedVersion(let kind, let found, let supported):
            return "\(kind) version \(found) is not supported: this dirtymig reads version \(supported)"
        case .truncated(let kind, let field, let needed, let available):
            return "\(kind) is truncated: \(field) needs \(needed) bytes, \(available) left"
        case .badLength(let kind, let field, let length, let expected):
            return "\(kind): \(field) is \(length) bytes, expected \(expected)"
        case .tooMany(let kind, let field, let count, let limit):
            return "\(kind): \(count) \(field), at most \(limit) allowed"
        case .invalidValue(let kind, let field, let reason):
            return "\(kind): \(field): \(reason)"
        case .trailingBytes(let kind, let count):
            return "\(kind) has \(count) unexpected bytes after its last field"
        }
    }
}
