import CTLS
import Glibc
import Synchronization

/// A TLS 1.3 connection over a connected `TCPSocket`, made by `MigrationConnector`: the handshake
/// runs in `init` (under the socket's receive deadline), then frames go through OpenSSL's record
/// layer (or the kernel's, with kTLS). Receive deadlines, timeouts and shutdown act on the socket
/// beneath, as for a plaintext connection.
///
/// An OpenSSL connection must not be used by two threads at once: sends and receives are
/// serialized (a thread blocked receiving holds up a send until it returns). `shutdown` and
/// `shutdownReceiving` act on the socket only, so they may come from any thread.
final class TLSConnection: MigrationConnection, @unchecked Sendable {
    // @unchecked: `ssl` and `staging` are used only under `io`.
    let socket: TCPSocket
    private let ssl: OpaquePointer
    private let context: TLSContext
    private let io = Mutex<Void>(())
    let channel: ChannelDescription
    private let server: Bool
    private let security: ChannelSecurity
    /// Whether any application data has arrived: an alert before it is the peer refusing the
    /// handshake (in TLS 1.3 a client's handshake completes before the server has checked the
    /// client's certificate), and is named like one.
    private var receivedData = false

    /// Small buffers (frame headers, range tables, single pages) are gathered into one record
    /// rather than one record each.
    private static let stagingBytes = 64 << 10
    private static let directBytes = 16 << 10
    private let staging: UnsafeMutableRawPointer

    /// `server`: this side accepted the connection. `peerName`: the name the peer's certificate
    /// must carry (certificates only). `deadline` (monotonic ns; nil: none): when the whole
    /// handshake must be done, however the peer's bytes trickle in.
    init(socket: TCPSocket, context: TLSContext, server: Bool, peerName: String?,
         security: ChannelSecurity, deadline: UInt64?) throws(ChannelError) {
        self.socket = socket
        self.context = context
        self.server = server
        self.security = security
        guard let ssl = ctls_new(context.context, socket.fd.rawValue, peerName) else {
            throw .handshake("OpenSSL could not start a connection: \(TLSContext.takeError())")
        }
        self.ssl = ssl
        if server { SSL_set_accept_state(ssl) } else { SSL_set_connect_state(ssl) }
        let started = MonotonicClock.nanoseconds()
        do { try Self.handshake(ssl, socket: socket, server: server, peerName: peerName, security: security, deadline: deadline) } catch {
            ctls_free(ssl)
            throw error
        }
        ctls_tune(ssl)
        var description = ChannelDescription()
        description.encrypted = true
        description.protocolName = String(cString: ctls_protocol(ssl))
        description.cipher = String(cString: ctls_cipher(ssl))
        // Both are the peer's words (its PSK identity, its certificate's subject), logged on accept.
        let identity = PeerText.escaped(String(cString: ctls_used_identity(ssl)))
        if !identity.isEmpty {
            description.peerIdentity = "PSK identity \(identity)"
        } else {
            var subject = [CChar](repeating: 0, count: 512)
            ctls_peer_subject(ssl, &subject, subject.count)
            description.peerIdentity = "certificate \(PeerText.escaped(String(nulTerminated: subject)))"
        }
        description.kernelSend = ctls_kernel_send(ssl) == 1
        description.kernelReceive = ctls_kernel_receive(ssl) == 1
        description.handshakeSeconds = Double(MonotonicClock.nanoseconds() - started) / 1e9
        channel = description
        staging = UnsafeMutableRawPointer.allocate(byteCount: TLSConnection.stagingBytes, alignment: 64)
    }

    deinit {
        ctls_free(ssl)
        staging.deallocate()
    }

    func send(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError) {
        try io.withLock { _ throws(SystemError) in
            var pipe = ctls_sigpipe_state()
            ctls_sigpipe_begin(&pipe)
            defer { ctls_sigpipe_end(&pipe) }
            var filled = 0
            for buffer in buffers where buffer.count > 0 {
                if buffer.count < Self.directBytes && filled + buffer.count <= Self.stagingBytes {
                    (staging + filled).copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
                    filled += buffer.count
                    continue
                }
                if filled > 0 {
                    try write(UnsafeRawPointer(staging), count: filled)
                    filled = 0
                }
                if buffer.count < Self.directBytes {
                    staging.copyMemory(from: buffer.baseAddress!, byteCount: buffer.count)
                    filled = buffer.count
                } else {
                    try write(buffer.baseAddress!, count: buffer.count)
                }
            }
            if filled > 0 { try write(UnsafeRawPointer(staging), count: filled) }
            // The records wait in OpenSSL's write buffer (ctls_tune) until this.
            var savedErrno: Int32 = 0
            try check(ctls_flush(ssl, &savedErrno), errno: savedErrno)
        }
    }

    private func write(_ bytes: UnsafeRawPointer, count: Int) throws(SystemError) {
        var savedErrno: Int32 = 0
        try check(ctls_write(ssl, bytes, count, &savedErrno), errno: savedErrno)
    }

    /// A write's or a flush's outcome.
    private func check(_ code: Int32, errno savedErrno: Int32) throws(SystemError) {
        guard code == SSL_ERROR_NONE else {
            // A peer that hung up on us may have said why first, in an alert still to be read:
            // "bad record mac" is a receiver that found the stream altered on the way.
            if savedErrno == EPIPE || savedErrno == ECONNRESET, let alert = peerAlert() {
                throw SystemError("send (\(alert))", errno: savedErrno)
            }
            throw failure(code, errno: savedErrno, operation: "send")
        }
    }

    /// The alert the peer sent before closing, if one is waiting (the peer is gone: the read
    /// cannot block).
    private func peerAlert() -> String? {
        ctls_clear_errors()
        var byte: UInt8 = 0
        var got = 0
        var savedErrno: Int32 = 0
        _ = ctls_read(ssl, &byte, 1, &got, &savedErrno)
        var words = [CChar](repeating: 0, count: 256)
        let error = ctls_take_error(&words, words.count)
        let alert = ctls_received_alert(error)
        guard alert >= 0 else { return nil }
        return alertMessage(alert, String(nulTerminated: words))
    }

    /// What an alert from the peer means, in words. A send sees it after the peer hung up; a
    /// receive (records go out in batches, so the peer's alert can come first) sees it directly.
    private func alertMessage(_ alert: Int32, _ words: String) -> String {
        let peer = server ? "the source" : "the destination"
        if alert == SSL_AD_BAD_RECORD_MAC {
            return "\(peer) found a TLS record altered, cut or reordered in transit (\(words)): the connection is being tampered with or corrupted on the way"
        }
        if !receivedData { return Self.alertMeaning(alert, words, peer: peer, security: security) }
        return "\(peer) ended the encrypted channel: \(words)"
    }

    /// Set for a connection one thread reads while another writes (see receive).
    private let concurrent = Atomic<Bool>(false)

    func allowConcurrentSendAndReceive() { concurrent.store(true, ordering: .releasing) }

    func receive(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        guard concurrent.load(ordering: .acquiring) else { return try receiveHoldingTheConnection(into: destination, count: count) }
        // Waits for data outside the lock, so that a send from another thread is not held up
        // while nothing arrives (a replication's acknowledgements come seldom); reads a record
        // at a time under it. Dearer per byte (a poll per record): for small, sparse frames only.
        var done = 0
        while done < count {
            if io.withLock({ _ in SSL_has_pending(ssl) }) == 0 { try socket.waitReadable() }
            try io.withLock { _ throws(SystemError) in
                var pipe = ctls_sigpipe_state()
                ctls_sigpipe_begin(&pipe)
                defer { ctls_sigpipe_end(&pipe) }
                done += try readSome(into: destination + done, count: count - done)
            }
        }
    }

    private func receiveHoldingTheConnection(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        try io.withLock { _ throws(SystemError) in
            // OpenSSL may write while reading (an alert): SIGPIPE is kept away for the whole read.
            var pipe = ctls_sigpipe_state()
            ctls_sigpipe_begin(&pipe)
            defer { ctls_sigpipe_end(&pipe) }
            var done = 0
            while done < count { done += try readSome(into: destination + done, count: count - done) }
        }
    }

    /// One SSL_read, under `io`: the bytes it gave (none after an interrupted read).
    private func readSome(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> Int {
        try socket.armDeadline()
        var got = 0
        var savedErrno: Int32 = 0
        let code = ctls_read(ssl, destination, count, &got, &savedErrno)
        if code == SSL_ERROR_NONE {
            receivedData = true
            socket.noteReceived()
            return got
        }
        if (code == SSL_ERROR_WANT_READ || code == SSL_ERROR_SYSCALL) && savedErrno == EINTR { return 0 }
        throw failure(code, errno: savedErrno, operation: "receive")
    }

    /// A failed read or write, as the SystemError a plaintext socket would give, with the TLS
    /// reason in words: an altered or dropped record is EBADMSG.
    private func failure(_ code: Int32, errno savedErrno: Int32, operation: String) -> SystemError {
        var words = [CChar](repeating: 0, count: 256)
        let error = ctls_take_error(&words, words.count)
        switch code {
        case SSL_ERROR_ZERO_RETURN:
            return SystemError("\(operation) (the peer closed the connection)", errno: ECONNRESET)
        case SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE:
            // SO_RCVTIMEO / SO_SNDTIMEO fired (EAGAIN on a blocking socket).
            return SystemError("\(operation)\(operation == "receive" ? " (the peer did not send in time)" : "")", errno: ETIMEDOUT)
        case SSL_ERROR_SYSCALL where savedErrno != 0 && error == 0:
            return SystemError(operation, errno: savedErrno)
        default:
            break
        }
        let reason = ctls_error_reason(error)
        if error == 0 || reason == SSL_R_UNEXPECTED_EOF_WHILE_READING {
            return SystemError("\(operation) (the peer closed the connection)", errno: ECONNRESET)
        }
        if reason == SSL_R_DECRYPTION_FAILED_OR_BAD_RECORD_MAC {
            return SystemError("\(operation) (a TLS record failed its integrity check: the encrypted stream was altered, cut or reordered in transit)", errno: EBADMSG)
        }
        let alert = ctls_received_alert(error)
        if alert >= 0 {
            return SystemError("\(operation) (\(alertMessage(alert, String(nulTerminated: words))))", errno: EPROTO)
        }
        return SystemError("\(operation) (TLS: \(String(nulTerminated: words)))", errno: EPROTO)
    }

    func waitForData(nanoseconds: UInt64) throws(SystemError) -> Bool {
        // Bytes OpenSSL has already read (a record, or more with read-ahead) are data the socket
        // will never signal again. A send in progress holds the connection (for a whole frame,
        // seconds on a slow link, ten on a dead one): then only the socket is asked, so that a
        // caller timing the peer's silence is never held up by our own sending; what OpenSSL
        // holds is seen on a later call.
        if let pending = io.withLockIfAvailable({ _ in SSL_has_pending(ssl) }), pending > 0 { return true }
        return try socket.waitReadable(nanoseconds: nanoseconds)
    }

    var tcp: TCPSocket { socket }

    func setReceiveDeadline(_ deadline: UInt64?) { socket.setReceiveDeadline(deadline) }
    func setTimeouts(send: Double, receive: Double) { socket.setTimeouts(send: send, receive: receive) }
    func shutdown() { socket.shutdown() }
    func shutdownReceiving() { socket.shutdownReceiving() }
    var peerDescription: String { socket.peerDescription }

    static let lateHandshake = "did not complete the TLS handshake in time"

    /// Runs the handshake with the socket non-blocking, waiting in poll for what is left of
    /// `deadline`. OpenSSL reads and writes the socket itself during a handshake, so the receive
    /// deadline Swift's reads arm never applied to it: each of its reads waited the socket's
    /// whole idle timeout (30 s at a receiver), and a peer sending a ClientHello a byte every
    /// 4 s held a receiver's handshake slot for minutes. A client looks at the first byte of
    /// the answer before OpenSSL reads it (ctls_hold_reads): a dirtymig receiver that refuses
    /// before TLS (busy, or without credentials) answers with a hello reply in clear, whose
    /// reason is shown rather than OpenSSL's "wrong version number".
    private static func handshake(_ ssl: OpaquePointer, socket: TCPSocket, server: Bool, peerName: String?,
                                  security: ChannelSecurity, deadline: UInt64?) throws(ChannelError) {
        let peer = server ? "the source" : "the destination"
        let fd = socket.fd.rawValue
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        defer { _ = fcntl(fd, F_SETFL, flags) }
        var holding = !server && ctls_hold_reads(ssl) == 1
        defer { if holding { ctls_release_reads(ssl) } }
        while true {
            var savedErrno: Int32 = 0
            let code = ctls_handshake(ssl, &savedErrno)
            if code == SSL_ERROR_NONE { return }
            guard code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE else {
                throw .handshake(handshakeFailure(ssl, code: code, errno: savedErrno, server: server,
                                                  peerName: peerName, security: security))
            }
            let events = Int16(code == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT)
            guard socket.waitUntil(events, deadline: deadline) else { throw .handshake("\(peer) \(lateHandshake)") }
            guard holding && events == Int16(POLLIN) else { continue }
            var first: UInt8 = 0
            // TLS records are of types 20 to 24; a hello reply's first byte is 2.
            if recv(fd, &first, 1, Int32(MSG_PEEK)) == 1 && first == UInt8(MigrationFrameType.helloReply.rawValue) {
                _ = fcntl(fd, F_SETFL, flags)   // the refusal is read as any frame: blocking, under the deadline
                throw .handshake(clearRefusal(socket))
            }
            ctls_release_reads(ssl)
            holding = false
        }
    }

    /// The reason of a dirtymig refusal in clear where the destination's first TLS record
    /// belongs, read whole under the socket's receive deadline.
    private static func clearRefusal(_ socket: TCPSocket) -> String {
        let channel = MigrationChannel(transport: socket)
        guard let reply = try? channel.receive(.helloReply, MigrationHelloReply.init(decoding:)), !reply.accepted else {
            return "the destination answered in plaintext, and not with a refusal dirtymig understands: it is not a dirtymig receiver, or another version of it; check --to"
        }
        return reply.reason
    }

    /// Why a handshake failed, named for a person: which credentials disagree and what to do.
    /// `server`: we are the receiver, the peer is the source; otherwise the reverse.
    private static func handshakeFailure(_ ssl: OpaquePointer, code: Int32, errno savedErrno: Int32, server: Bool,
                                         peerName: String?, security: ChannelSecurity) -> String {
        let peer = server ? "the source" : "the destination"
        let mine = security.optionsText
        var words = [CChar](repeating: 0, count: 256)
        let error = ctls_take_error(&words, words.count)
        let text = String(nulTerminated: words)
        let reason = ctls_error_reason(error)
        let unknownIdentity = String(cString: ctls_unknown_identity(ssl))
        if server, case .psk(let key) = security.credentials, !unknownIdentity.isEmpty {
            return "\(peer) offered pre-shared key identity '\(unknownIdentity)', not ours ('\(key.identity)'): the two hosts' --psk-file keys differ; copy one key file to both"
        }
        if code == SSL_ERROR_SYSCALL && error == 0 && savedErrno != 0 {
            return "the connection failed during the TLS handshake: \(String(cString: strerror(savedErrno)))"
        }
        if error == 0 || reason == SSL_R_UNEXPECTED_EOF_WHILE_READING {
            return "\(peer) closed the connection during the TLS handshake: it holds other credentials (it says which), or none"
        }
        if !server && (reason == SSL_R_WRONG_VERSION_NUMBER || reason == SSL_R_PACKET_LENGTH_TOO_LONG || reason == SSL_R_HTTP_REQUEST) {
            return "\(peer) answered in plaintext: it listens without credentials (no --psk-file or --tls-dir), or is not dirtymig; start 'dirtymig receive' there with the same \(mine)"
        }
        if reason == SSL_R_BINDER_DOES_NOT_VERIFY {
            return "\(peer)'s pre-shared key has our identity but is another key (its binder does not verify): the two hosts' --psk-file keys differ; copy one key file to both"
        }
        if reason == SSL_R_CERTIFICATE_VERIFY_FAILED {
            let result = ctls_verify_result(ssl)
            var subject = [CChar](repeating: 0, count: 512)
            ctls_peer_subject(ssl, &subject, subject.count)
            let whose = subject[0] == 0 ? "\(peer)'s certificate" : "\(peer)'s certificate (\(String(nulTerminated: subject)))"
            if result == X509_V_ERR_HOSTNAME_MISMATCH || result == X509_V_ERR_IP_ADDRESS_MISMATCH {
                return server
                    ? "\(whose) is not for the name --tls-peer '\(peerName ?? "")' names"
                    : "\(whose) is not for '\(peerName ?? "")': give --tls-peer with the name it was issued for, or give \(peer) a certificate for '\(peerName ?? "")'"
            }
            return "\(whose) is not trusted: \(String(cString: ctls_verify_string(result))); it must be signed by the CA in \(mine)/ca.pem"
        }
        let alert = ctls_received_alert(error)
        if alert >= 0 { return alertMeaning(alert, text, peer: peer, security: security) }
        if server, case .psk = security.credentials, reason == SSL_R_NO_SHARED_CIPHER || reason == SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM {
            return "\(peer) offered no pre-shared key (does it use --tls-dir?): this receiver uses \(mine)"
        }
        return "the TLS handshake with \(peer) failed: \(text)"
    }

    /// What an alert from the peer during (or right after) the handshake means, for a person.
    private static func alertMeaning(_ alert: Int32, _ text: String, peer: String, security: ChannelSecurity) -> String {
            switch security.credentials {
            case .psk:
                return "\(peer) refused our pre-shared key (\(text)): it holds another key, or uses certificates; give both hosts the same --psk-file"
            case .certificates:
                switch alert {
                case SSL_AD_UNKNOWN_CA:
                    return "\(peer) does not trust our certificate (\(text)): it was not signed by the CA in \(peer)'s ca.pem"
                case SSL_AD_BAD_CERTIFICATE, SSL_AD_CERTIFICATE_UNKNOWN, SSL_AD_CERTIFICATE_EXPIRED, SSL_AD_CERTIFICATE_REVOKED:
                    return "\(peer) refused our certificate (\(text)): it is expired, or not for the name \(peer) expects (its --tls-peer)"
                default:
                    return "\(peer) refused the TLS handshake (\(text)): it holds other credentials (it says which)"
                }
            case .none:
                return "\(peer) refused the TLS handshake (\(text))"
            }
    }
}
