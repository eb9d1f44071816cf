import Synchronization

/// The sending side of one session (a migration or a replication): its control connection, the
/// session id the receiver learns from the control hello, and further connections of a role
/// opened to the same endpoint with the same security, each greeted with the session's id so
/// the receiver hands it to the same incoming session. Every connection of a session opens
/// here, through `MigrationConnector.connect`. Today's migrations and replications use the
/// control connection alone.
public final class MigrationSession: Sendable {
    public let id: SessionID
    public let endpoint: HostPort
    public let security: ChannelSecurity
    /// The first connection: the hello, and (today) every frame after it.
    public let control: any MigrationConnection
    /// Frames over `control`.
    let channel: MigrationChannel
    private let joined = Mutex<[any MigrationConnection]>([])

    /// How long a sender waits on a destination that stops reading or answering: a stall is a
    /// failure, not a hang.
    static let stallSeconds = 10.0

    private init(id: SessionID, endpoint: HostPort, security: ChannelSecurity, control: any MigrationConnection) {
        self.id = id
        self.endpoint = endpoint
        self.security = security
        self.control = control
        channel = MigrationChannel(transport: control)
    }

    /// Opens the control connection of a fresh session (see `MigrationConnector.connect`:
    /// `attempt` lets another thread cut the connect or its TLS handshake short). Nothing is
    /// said yet: `greet` opens the session at the receiver.
    public static func connect(to endpoint: HostPort, security: ChannelSecurity,
                               attempt: ConnectionAttempt? = nil) throws(MigrationError) -> MigrationSession {
        try connect(to: endpoint, security: security, id: .random(), timeout: 5, attempt: attempt)
    }

    /// A new control connection for session `id`, which began over another (a post-copy that
    /// resumes after its link failed greets the destination as that session again).
    static func connect(to endpoint: HostPort, security: ChannelSecurity, id: SessionID, timeout: Double,
                        attempt: ConnectionAttempt? = nil) throws(MigrationError) -> MigrationSession {
        let control = try MigrationConnector.connect(to: endpoint, security: security, timeout: timeout, attempt: attempt)
        control.setTimeouts(send: stallSeconds, receive: stallSeconds)
        return MigrationSession(id: id, endpoint: endpoint, security: security, control: control)
    }

    /// Opens the session at the receiver: `hello` (as this session's, with its id) out over the
    /// control connection, the answer back; a refusal is thrown with the receiver's reason.
    func greet(_ hello: MigrationHello) throws(MigrationError) -> MigrationHelloReply {
        var hello = hello
        hello.session = id
        return try channel.greet(hello.encode())
    }

    /// As `greet`, but a refusal is returned, not thrown: a replication that resumes acts on
    /// the kind of refusal (`MigrationHelloReply.refusal`).
    func answer(_ hello: MigrationHello) throws(MigrationError) -> MigrationHelloReply {
        var hello = hello
        hello.session = id
        try channel.send(.hello, hello.encode())
        return try channel.receive(.helloReply, MigrationHelloReply.init(decoding:))
    }

    /// A further connection of `role` (never `control`) to the same endpoint with the same
    /// security, joined to this session: the receiver admits it only for a role the session's
    /// hello announced, and no more of a role than announced; a refusal is thrown with its
    /// reason. Closed with the session.
    public func join(_ role: ConnectionRole, timeout: Double = 5,
                     attempt: ConnectionAttempt? = nil) throws(MigrationError) -> any MigrationConnection {
        precondition(role != .control, "a session has one control connection, the one that opened it")
        let connection = try MigrationConnector.connect(to: endpoint, security: security, timeout: timeout, attempt: attempt)
        connection.setTimeouts(send: Self.stallSeconds, receive: Self.stallSeconds)
        do {
            _ = try MigrationChannel(transport: connection).greet(SessionJoin(session: id, role: role).encode())
        } catch {
            connection.shutdown()
            throw error
        }
        joined.withLock { $0.append(connection) }
        return connection
    }

    /// Shuts down every connection of the session, the control connection last.
    public func close() {
        for connection in joined.withLock({ $0 }) { connection.shutdown() }
        control.shutdown()
    }
}

extension MigrationChannel {
    /// The opening of every connection a sender makes: its hello out, the receiver's answer
    /// back; a refusal is thrown with the receiver's reason.
    fileprivate func greet(_ hello: [UInt8]) throws(MigrationError) -> MigrationHelloReply {
        try send(.hello, hello)
        let reply = try receive(.helloReply, MigrationHelloReply.init(decoding:))
        guard reply.accepted else { throw .refused(reply.reason) }
        return reply
    }
}
