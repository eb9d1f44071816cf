/// How every connection opens: the head of its first frame (a `hello`) says which session it
/// belongs to and what it is for, so that a migration can run over more than one connection
/// (QEMU's multifd and post-copy preempt channels, Cloud Hypervisor's connections, each open
/// with their kind and the migration's id). The first connection of a session is its control
/// connection: its hello names a fresh session id and announces the VM and the connections
/// that will join; each further connection's hello names the session it joins and its role,
/// and carries nothing more. Typed at both ends, each decoding bounded before it reads on.

/// What a connection carries.
public enum ConnectionRole: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// The first connection of a session: the hello, and (today) everything after it.
    case control = 0
    /// A further stream of pages.
    case pages = 1
    /// Page requests and their answers, which must never wait behind a stream of pages.
    case faults = 2

    public var description: String {
        switch self {
        case .control: return "control"
        case .pages: return "pages"
        case .faults: return "faults"
        }
    }
}

/// 128 random bits that name one migration or replication: the receiver learns them from the
/// control connection's hello, and a connection that names them joins that session. Drawn from
/// the system's random source (getrandom), so one session's id tells nothing of another's.
public struct SessionID: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// A fresh id.
    public static func random() -> SessionID {
        var generator = SystemRandomNumberGenerator()
        return SessionID(high: generator.next(), low: generator.next())
    }

    /// 32 hex digits.
    public var description: String {
        func hex(_ value: UInt64) -> String {
            let digits = String(value, radix: 16)
            return String(repeating: "0", count: 16 - digits.count) + digits
        }
        return hex(high) + hex(low)
    }

    static let encodedSize = 16

    func encode(into writer: inout WireWriter) { writer.u64(high); writer.u64(low) }

    init(reading reader: inout WireReader) throws(MigrationProtocolError) {
        high = try reader.u64()
        low = try reader.u64()
    }
}

/// The connections a control connection's hello announces will join its session, by role: the
/// receiver admits those and no more (a per-session bound, checked before anything is kept for
/// a joining connection). Today's migrations and replications announce none.
public struct SessionJoins: Sendable, Equatable {
    public var pages: Int
    public var faults: Int

    /// At most this many further page streams.
    public static let maxPages = 16
    /// At most one connection for page requests.
    public static let maxFaults = 1
    public static let none = SessionJoins(pages: 0, faults: 0)

    public init(pages: Int, faults: Int) {
        self.pages = pages
        self.faults = faults
    }

    /// How many connections of `role` may join.
    public func count(of role: ConnectionRole) -> Int {
        switch role {
        case .control: return 0   // a session has exactly one, the one that opened it
        case .pages: return pages
        case .faults: return faults
        }
    }

    /// "1 faults", "2 pages and 1 faults", or "no other connection".
    public var summary: String {
        let parts = ConnectionRole.allCases.compactMap { count(of: $0) > 0 ? "\(count(of: $0)) \($0)" : nil }
        return parts.isEmpty ? "no other connection" : parts.joined(separator: " and ")
    }

    func encode(into writer: inout WireWriter) { writer.u32(UInt32(pages)); writer.u32(UInt32(faults)) }

    init(reading reader: inout WireReader) throws(MigrationProtocolError) {
        let pages = try reader.u32(), faults = try reader.u32()
        guard pages <= Self.maxPages, faults <= Self.maxFaults else {
            throw .malformed("a hello announcing \(pages) pages and \(faults) faults connections (at most \(Self.maxPages) and \(Self.maxFaults))")
        }
        self.init(pages: Int(pages), faults: Int(faults))
    }
}

/// The head of every connection's hello: u32 magic, u32 version, u32 role, the 16-byte session
/// id. Magic first, then version: a foreign stream and another dirtymig release get different
/// answers, and a release of any version can read a refusal of its version (the hello reply
/// has not changed its head).
struct ConnectionOpening: Equatable {
    var version: UInt32 = MigrationWire.version
    var role: ConnectionRole
    var session: SessionID

    init(role: ConnectionRole, session: SessionID) {
        self.role = role
        self.session = session
    }

    func encode(into writer: inout WireWriter) {
        writer.u32(MigrationWire.magic); writer.u32(version); writer.u32(role.rawValue)
        session.encode(into: &writer)
    }

    init(reading reader: inout WireReader, payloadLength: Int) throws(MigrationProtocolError) {
        guard payloadLength >= 8 else { throw .notDirtymig("a \(payloadLength)-byte hello") }
        let magic = try reader.u32()
        guard magic == MigrationWire.magic else { throw .notDirtymig("magic 0x\(String(magic, radix: 16))") }
        version = try reader.u32()
        guard version == MigrationWire.version else { throw .versionMismatch(peer: version, ours: MigrationWire.version) }
        let rawRole = try reader.u32()
        guard let role = ConnectionRole(rawValue: rawRole) else { throw .malformed("connection role \(rawRole)") }
        self.role = role
        session = try SessionID(reading: &reader)
    }
}

/// The hello of a connection that joins a session: its role (never `control`) and the id of
/// the session, nothing more. The receiver admits it only to a session that is open and
/// announced a connection of that role it has not yet had.
public struct SessionJoin: Sendable, Equatable {
    public var version: UInt32 = MigrationWire.version
    public var session: SessionID
    public var role: ConnectionRole

    public init(session: SessionID, role: ConnectionRole) {
        self.session = session
        self.role = role
    }

    public func encode() -> [UInt8] {
        var opening = ConnectionOpening(role: role, session: session)
        opening.version = version
        return WireWriter.encoding(opening.encode(into:))
    }
}

/// The first frame of any connection, decoded: the control hello that opens a session, or the
/// hello of a connection that joins one.
enum ConnectionHello: Equatable {
    case control(MigrationHello)
    case join(SessionJoin)

    init(decoding payload: [UInt8]) throws(MigrationProtocolError) {
        var reader = WireReader(payload, what: "hello")
        let opening = try ConnectionOpening(reading: &reader, payloadLength: payload.count)
        guard opening.role != .control else {
            self = .control(try MigrationHello(opening: opening, announcement: &reader))
            return
        }
        try reader.finish()
        self = .join(SessionJoin(session: opening.session, role: opening.role))
    }
}
