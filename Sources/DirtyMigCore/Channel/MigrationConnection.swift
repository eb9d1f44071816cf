import Glibc
import Synchronization

/// A connected migration channel: the transport the frames run over, plus what the sender and
/// the receiver use of the socket beneath it, and what the channel turned out to be (for the
/// report). A plaintext `TCPSocket`, or a `TLSConnection` over one.
public protocol MigrationConnection: MigrationTransport {
    /// SO_SNDTIMEO / SO_RCVTIMEO of the socket beneath; 0 = block for ever.
    func setTimeouts(send: Double, receive: Double)
    /// Ends only the receiving half (a thread blocked reading sees the end of the stream).
    func shutdownReceiving()
    /// "HOST:PORT" of the peer.
    var peerDescription: String { get }
    /// Encrypted or not, protocol, cipher, who the peer proved to be.
    var channel: ChannelDescription { get }
    /// One thread will receive while another sends (replication: acknowledgements come in while
    /// checkpoints go out): a receive must not hold the connection while it waits for data.
    func allowConcurrentSendAndReceive()
    /// Waits up to `nanoseconds` for something to read; false if nothing came. A frame is then
    /// read whole, never cut by a timeout in its middle.
    func waitForData(nanoseconds: UInt64) throws(SystemError) -> Bool
    /// The TCP connection beneath: when its last byte arrived, what its peer acknowledged.
    var tcp: TCPSocket { get }
}

extension MigrationConnection {
    /// A plain socket sends and receives from two threads at once as it is.
    public func allowConcurrentSendAndReceive() {}
}

extension TCPSocket: MigrationConnection {
    public var channel: ChannelDescription { .plaintext }
    public var tcp: TCPSocket { self }
    public func waitForData(nanoseconds: UInt64) throws(SystemError) -> Bool { try waitReadable(nanoseconds: nanoseconds) }
}

/// The one place connections are opened and accepted with a `ChannelSecurity`: the sender's
/// connect step and the receiver's accepted sockets (migration and replication alike) go through
/// here, so plaintext and TLS peers are told apart, and refused, the same way everywhere.
public enum MigrationConnector {
    /// Connects to `endpoint` and, with credentials, completes the TLS handshake within
    /// `timeout` seconds of connecting, however the destination's bytes trickle in. The name is
    /// resolved once: plaintext to anything but loopback without `insecure` is refused before
    /// connecting, and the socket connects to exactly the addresses checked. `attempt` lets
    /// another thread cut the connect or the handshake short (a sender's cancel).
    public static func connect(to endpoint: HostPort, security: ChannelSecurity, timeout: Double = 5,
                               resolver: NameResolver = .system,
                               attempt: ConnectionAttempt? = nil) throws(MigrationError) -> any MigrationConnection {
        let addresses: [SocketAddress]
        do { addresses = try security.checkConnecting(to: endpoint, resolver: resolver) } catch { throw .channel(error) }
        defer { attempt?.finish() }
        do {
            return try open(endpoint, addresses: addresses, security: security, timeout: timeout, attempt: attempt)
        } catch {
            if attempt?.isCancelled == true { throw .cancelled("the connection to \(endpoint) was cancelled while it was being set up") }
            throw error
        }
    }

    private static func open(_ endpoint: HostPort, addresses: [SocketAddress], security: ChannelSecurity, timeout: Double,
                             attempt: ConnectionAttempt?) throws(MigrationError) -> any MigrationConnection {
        let socket: TCPSocket
        do {
            socket = try TCPSocket.connect(endpoint, addresses: addresses, timeout: timeout,
                                           attach: { attempt?.attach($0) ?? true })
        } catch { throw .connection(error) }
        if case .none = security.credentials { return socket }
        let context: TLSContext
        do { context = try security.contexts.context(for: security, server: false) } catch { throw .channel(error) }
        var peerName: String?
        if case .certificates = security.credentials { peerName = security.peerName ?? endpoint.host }
        let deadline = MonotonicClock.nanoseconds() + UInt64(max(timeout, 0.001) * 1e9)
        socket.setTimeouts(send: timeout, receive: timeout)
        socket.setReceiveDeadline(deadline)
        defer {
            socket.setReceiveDeadline(nil)
            socket.setTimeouts(send: 0, receive: 0)
        }
        do {
            return try TLSConnection(socket: socket, context: context, server: false, peerName: peerName, security: security,
                                     deadline: deadline)
        } catch {
            socket.shutdown()
            throw .channel(error)
        }
    }

    /// What the receiver does with an accepted socket before it reads the hello, under the
    /// socket's receive deadline (the handshake deadline) that the caller has set: with
    /// credentials, the TLS handshake (the peer proves it holds them before anything is
    /// allocated for it); without, nothing but telling a TLS client it came to a plaintext
    /// receiver. A plaintext dirtymig at a TLS receiver, or a TLS one at a plaintext receiver, gets
    /// a refusal it can show (a hello reply in clear), and the error says which it was.
    public static func accept(_ socket: TCPSocket, security: ChannelSecurity) throws(MigrationError) -> any MigrationConnection {
        let first: UInt8
        do { first = try socket.peekFirstByte() } catch { throw .connection(error) }
        let tlsRecord = first == 0x16   // a TLS handshake record: a ClientHello
        guard case .none = security.credentials else {
            guard tlsRecord else {
                let reason = "this destination accepts only encrypted migrations (it was started with credentials): give 'dirtymig migrate' the same --psk-file (or a --tls-dir its CA signed) as 'dirtymig receive' has"
                let dirtymig = first == UInt8(MigrationFrameType.hello.rawValue)
                if dirtymig { refuseInClear(socket, readingHello: true, reason: reason) }
                throw .channel(.handshake(dirtymig
                    ? "a plaintext migration, refused: this receiver accepts only TLS (\(security.optionsText)); the source must give the same credentials"
                    : "not a TLS client (its first byte is 0x\(String(first, radix: 16))), refused"))
            }
            let context: TLSContext
            do { context = try security.contexts.context(for: security, server: true) } catch { throw .channel(error) }
            do {
                return try TLSConnection(socket: socket, context: context, server: true, peerName: security.peerName, security: security,
                                         deadline: socket.receiveDeadlineNanoseconds)
            } catch { throw .channel(error) }
        }
        if tlsRecord {
            // Read its ClientHello record first: closing on unread bytes would reset the
            // connection before the peer reads why.
            if let header = try? socket.receive(count: 5) {
                let length = Int(header[3]) << 8 | Int(header[4])
                _ = try? socket.receive(count: min(length, 1 << 14 + 256))
            }
            refuseInClear(socket, readingHello: false, reason: "the destination answered in plaintext: it has no credentials (it listens in plaintext, on loopback or with --insecure); start 'dirtymig receive' there with the same --psk-file or --tls-dir as the source, or migrate without them")
            throw .channel(.handshake("a TLS client, refused: this receiver has no credentials; give 'dirtymig receive' the same --psk-file or --tls-dir as the source"))
        }
        return socket
    }

    /// Refuses a connection the receiver has no room for (`maxPendingHandshakes` wait already)
    /// from the accept loop, which must neither block nor spend a thread on it: a hello reply in
    /// clear, sent only if the socket takes it at once, which a plaintext dirtymig reads as its
    /// reply and a TLS one reads where the server's first record belongs (see TLSConnection).
    /// Without it a TLS sender saw only the connection closing mid-handshake, and said the
    /// destination held other credentials.
    static func refuseBusy(_ socket: TCPSocket, waiting: Int) {
        let reason = "the destination is busy: \(waiting) connections are waiting to complete their handshake; try again in a few seconds"
        _ = socket.sendWithoutWaiting(MigrationWire.frame(.helloReply, MigrationHelloReply.refuse(reason).encode()))
    }

    /// Answers a plaintext peer with a refusal in clear, which a dirtymig of any version shows;
    /// `readingHello`: read its hello first (closing on unread bytes would reset the connection
    /// before the peer reads why).
    private static func refuseInClear(_ socket: TCPSocket, readingHello: Bool, reason: String) {
        let channel = MigrationChannel(transport: socket)
        if readingHello { _ = try? MigrationReceiver.readHello(channel) }
        try? channel.send(.helloReply, MigrationHelloReply.refuse(reason).encode())
    }
}

/// A connection being opened, which another thread may cut short: a sender's cancel reaches its
/// connect and its TLS handshake through this (a destination that trickles its handshake held
/// a cancelled `migrate` until its deadline, or for good). Once the connection is set up,
/// `cancel` leaves it alone: its owner cuts it then.
public final class ConnectionAttempt: Sendable {
    private struct State {
        var socket: TCPSocket?
        var cancelled = false
        var finished = false
    }
    private let state = Mutex(State())

    public init() {}

    /// Shuts down the socket being connected or in its handshake, and any later one.
    public func cancel() {
        let socket = state.withLock { state -> TCPSocket? in
            guard !state.finished else { return nil }
            state.cancelled = true
            return state.socket
        }
        socket?.shutdown()
    }

    public var isCancelled: Bool { state.withLock { $0.cancelled } }

    /// Takes the socket about to connect; false if the attempt was cancelled already.
    func attach(_ socket: TCPSocket) -> Bool {
        state.withLock { state in
            state.socket = socket
            return !state.cancelled
        }
    }

    /// The connection is set up (or failed): `cancel` no longer touches it.
    func finish() {
        state.withLock { state in
            state.finished = true
            state.socket = nil
        }
    }
}
