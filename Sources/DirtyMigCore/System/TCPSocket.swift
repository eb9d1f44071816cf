import Glibc
import Synchronization

/// `HOST:PORT` as users write it: `127.0.0.1:4444`, `localhost:4444`, `[::1]:4444`, `:4444`
/// (all addresses, for listening). Port 0 means "any free port" when listening.
public struct HostPort: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt16

    public init(host: String, port: UInt16) {
        self.host = host
        self.port = port
    }

    public static func parse(_ text: String) -> HostPort? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        guard let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.contains(" ") else { return nil }
        return HostPort(host: host, port: port)
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// A TCP stream, wrapped once: connect/listen/accept/send/receive, EINTR retried, MSG_NOSIGNAL
/// (a peer that vanished is EPIPE/ECONNRESET, never SIGPIPE), partial transfers looped.
/// `shutdown()` may be called from any thread to wake one blocked in accept/send/receive.
public final class TCPSocket: MigrationTransport {
    public let fd: FileDescriptor
    /// The receive timeout `setTimeouts` set (ns, 0 = none), and a deadline for every receive
    /// until it is cleared (monotonic ns, 0 = none): see `setReceiveDeadline`.
    private let idleReceiveNanoseconds = Atomic<UInt64>(0)
    private let receiveDeadline = Atomic<UInt64>(0)
    /// What SO_RCVTIMEO holds now (ns), so a read under a distant deadline costs no syscall.
    private let currentReceiveTimeout = Atomic<UInt64>(0)
    /// When the last byte arrived (monotonic ns; when the socket was made, until one has): how a
    /// standby tells a slow primary, whose bytes keep coming, from a silent one.
    private let lastReceivedAt = Atomic<UInt64>(MonotonicClock.nanoseconds())

    init(fd: FileDescriptor) { self.fd = fd }

    /// The system's resolver (getaddrinfo): every address `endpoint` names, for listening
    /// (`passive`: an empty host is every address) or connecting.
    static func resolve(_ endpoint: HostPort, passive: Bool) throws(SystemError) -> [SocketAddress] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_family = AF_UNSPEC
        if passive { hints.ai_flags = AI_PASSIVE }
        var list: UnsafeMutablePointer<addrinfo>? = nil
        let host = endpoint.host.isEmpty ? nil : endpoint.host
        let status = getaddrinfo(host, String(endpoint.port), &hints, &list)
        guard status == 0, let first = list else {
            let reason = status == 0 ? "no address" : String(cString: gai_strerror(status))
            // No errno fits a name that does not resolve: the operation carries the resolver's
            // words, and `unresolvedHost` tells callers it was this.
            throw SystemError("\(resolvePrefix)\(endpoint.host.isEmpty ? "*" : endpoint.host)\(resolveSeparator)\(reason)", errno: EHOSTUNREACH)
        }
        defer { freeaddrinfo(first) }
        var result: [SocketAddress] = []
        var node: UnsafeMutablePointer<addrinfo>? = first
        while let entry = node {
            let bytes = [UInt8](UnsafeRawBufferPointer(start: entry.pointee.ai_addr, count: Int(entry.pointee.ai_addrlen)))
            result.append(SocketAddress(family: entry.pointee.ai_family, bytes: bytes))
            node = entry.pointee.ai_next
        }
        // Listening on "all addresses": prefer IPv6 (dual-stack) only if IPv4 is absent.
        return passive ? result.sorted { $0.family == AF_INET && $1.family != AF_INET } : result
    }

    private static func makeSocket(family: Int32) throws(SystemError) -> FileDescriptor {
        let raw = Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if raw < 0 { throw SystemError("socket") }
        return FileDescriptor(owning: raw)
    }

    private func setOption(_ level: Int32, _ name: Int32, _ value: Int32) {
        var value = value
        _ = setsockopt(fd.rawValue, level, name, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Binds and listens. EADDRINUSE: something else has the port.
    /// The backlog is the kernel's maximum: the receiver accepts at once and refuses what it
    /// cannot serve with a reason; a small backlog made a burst of connections time out instead.
    public static func listen(_ endpoint: HostPort, backlog: Int32 = SOMAXCONN) throws(SystemError) -> TCPSocket {
        try listen(endpoint, addresses: try resolve(endpoint, passive: true), backlog: backlog)
    }

    /// Binds and listens on the first of `addresses` (what `endpoint` resolved to, checked by
    /// the caller) that can be bound: the name is not resolved again.
    public static func listen(_ endpoint: HostPort, addresses: [SocketAddress], backlog: Int32 = SOMAXCONN) throws(SystemError) -> TCPSocket {
        var lastError = SystemError("listen \(endpoint)", errno: EADDRNOTAVAIL)
        for resolved in addresses {
            let address = resolved.bytes
            let socket = TCPSocket(fd: try makeSocket(family: resolved.family))
            socket.setOption(SOL_SOCKET, SO_REUSEADDR, 1)
            let bound = address.withUnsafeBytes {
                Glibc.bind(socket.fd.rawValue, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(address.count))
            }
            if bound != 0 { lastError = SystemError("bind \(endpoint)"); continue }
            if Glibc.listen(socket.fd.rawValue, backlog) != 0 { lastError = SystemError("listen \(endpoint)"); continue }
            return socket
        }
        throw lastError
    }

    private static let resolvePrefix = "resolve "
    private static let resolveSeparator = ": "

    /// The host name of an error from name resolution (nil for any other error).
    public static func unresolvedHost(_ error: SystemError) -> String? {
        guard error.operation.hasPrefix(resolvePrefix), let range = error.operation.range(of: resolveSeparator) else { return nil }
        return String(error.operation[error.operation.index(error.operation.startIndex, offsetBy: resolvePrefix.count)..<range.lowerBound])
    }

    /// The resolver's own words for such an error ("Name or service not known").
    public static func resolverReason(_ error: SystemError) -> String {
        guard let range = error.operation.range(of: resolveSeparator) else { return error.operation }
        return String(error.operation[range.upperBound...])
    }

    /// The port actually bound (useful after listening on port 0).
    public var localPort: UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd.rawValue, $0, &length) }
        } == 0
        guard ok else { return 0 }
        return withUnsafeBytes(of: &storage) { raw in
            // sin_port and sin6_port sit at the same offset (2), in network order.
            UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        }
    }

    /// Connects, giving up after `timeout` seconds per address.
    public static func connect(_ endpoint: HostPort, timeout: Double = 5) throws(SystemError) -> TCPSocket {
        try connect(endpoint, addresses: try resolve(endpoint, passive: false), timeout: timeout)
    }

    /// Connects to the first of `addresses` (what `endpoint` resolved to, checked by the caller)
    /// that answers: the name is not resolved again. `attach` sees each socket before it
    /// connects, so another thread can cut the attempt short (`shutdown`); it returns false
    /// when the attempt was cancelled already (ECANCELED).
    public static func connect(_ endpoint: HostPort, addresses: [SocketAddress], timeout: Double = 5,
                               attach: (TCPSocket) -> Bool = { _ in true }) throws(SystemError) -> TCPSocket {
        var lastError = SystemError("connect \(endpoint)", errno: ECONNREFUSED)
        for resolved in addresses {
            let address = resolved.bytes
            let socket = TCPSocket(fd: try makeSocket(family: resolved.family))
            guard attach(socket) else { throw SystemError("connect \(endpoint) (cancelled)", errno: ECANCELED) }
            socket.setTimeouts(send: timeout, receive: timeout)   // connect honours SO_SNDTIMEO
            let result = address.withUnsafeBytes {
                Glibc.connect(socket.fd.rawValue, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(address.count))
            }
            if result == 0 {
                socket.setTimeouts(send: 0, receive: 0)
                socket.tune()
                return socket
            }
            lastError = SystemError("connect \(endpoint)", errno: errno == EINPROGRESS ? ETIMEDOUT : errno)
        }
        throw lastError
    }

    public func accept() throws(SystemError) -> TCPSocket {
        let raw = try retryingOnInterrupt("accept") { Int(Glibc.accept(fd.rawValue, nil, nil)) }
        _ = fcntl(Int32(raw), F_SETFD, FD_CLOEXEC)
        let socket = TCPSocket(fd: FileDescriptor(owning: Int32(raw)))
        socket.tune()
        return socket
    }

    /// No Nagle delay for the small control frames; large buffers for the page stream.
    private func tune() {
        setOption(Int32(IPPROTO_TCP), TCP_NODELAY, 1)
        setOption(SOL_SOCKET, SO_SNDBUF, 4 << 20)
        setOption(SOL_SOCKET, SO_RCVBUF, 4 << 20)
    }

    /// Retransmits a thin stream (a few frames in flight, as a standby's acknowledgements) at a
    /// steady interval for its first six retries, not one that doubles each time: after a link
    /// cut of a few seconds, what this side sent during the cut arrives within a fraction of a
    /// second of the link's return rather than up to the doubled timeout later.
    public func retransmitThinStreamsSteadily() {
        setOption(Int32(IPPROTO_TCP), TCP_THIN_LINEAR_TIMEOUTS, 1)
    }

    /// Keeps at most `bytes` queued that TCP has not sent yet (TCP_NOTSENT_LOWAT): a send waits
    /// for the link instead of filling a send buffer the kernel grows to megabytes. What is
    /// queued still goes out after the process dies, before the FIN.
    public func limitUnsentBytes(_ bytes: Int32) {
        setOption(Int32(IPPROTO_TCP), 25 /* TCP_NOTSENT_LOWAT */, bytes)
    }

    /// Declares the peer gone once the link has carried nothing back for `seconds`, whether this
    /// side is sending or only waiting: TCP_USER_TIMEOUT aborts the connection (ETIMEDOUT) when
    /// data sent stays unacknowledged that long, and keepalive probes, the first after a third
    /// of it, give an idle side something to have acknowledged. With TCP_USER_TIMEOUT set, the
    /// kernel ends a connection whose probes go unanswered at the same deadline, not after
    /// TCP_KEEPCNT probes. Without this, a side that sent nothing on a cut link waited for its
    /// application timeout alone, and a sender's bytes stayed queued until the kernel's own
    /// retransmission limit (15 tries, about 15 minutes) when its send timeout was long.
    public func watchLink(timeoutSeconds seconds: Double) {
        let seconds = max(1, min(seconds, 86_400))
        setOption(Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, Int32(seconds * 1000))
        setOption(SOL_SOCKET, SO_KEEPALIVE, 1)
        let idle = max(1, Int32(seconds / 3))
        setOption(Int32(IPPROTO_TCP), TCP_KEEPIDLE, idle)
        setOption(Int32(IPPROTO_TCP), TCP_KEEPINTVL, max(1, idle / 2))
        setOption(Int32(IPPROTO_TCP), TCP_KEEPCNT, 20)
    }

    /// SO_SNDTIMEO / SO_RCVTIMEO; 0 = block for ever. A timed-out call fails with ETIMEDOUT.
    public func setTimeouts(send: Double, receive: Double) {
        setTimeout(SO_SNDTIMEO, seconds: send)
        setTimeout(SO_RCVTIMEO, seconds: receive)
        idleReceiveNanoseconds.store(UInt64(max(0, min(receive, 86_400)) * 1e9), ordering: .relaxed)
        currentReceiveTimeout.store(idleReceiveNanoseconds.load(ordering: .relaxed), ordering: .relaxed)
    }

    private func setTimeout(_ name: Int32, seconds: Double) {
        let seconds = max(0, min(seconds, 86_400))
        if name == SO_RCVTIMEO { currentReceiveTimeout.store(UInt64(seconds * 1e9), ordering: .relaxed) }
        var value = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
        _ = setsockopt(fd.rawValue, SOL_SOCKET, name, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Every receive from now on must complete by `deadline` (monotonic ns; nil clears it), however
    /// the bytes trickle in: a per-read timeout alone let a peer sending a byte every 25 s hold a
    /// receiver for as long as it liked.
    public func setReceiveDeadline(_ deadline: UInt64?) {
        receiveDeadline.store(deadline ?? 0, ordering: .relaxed)
        if deadline == nil {
            setTimeout(SO_RCVTIMEO, seconds: Double(idleReceiveNanoseconds.load(ordering: .relaxed)) / 1e9)
        }
    }

    /// Before a read under a deadline: the socket's timeout is what is left of it (or the idle
    /// timeout, if that is shorter). Throws once the deadline has passed.
    func armDeadline() throws(SystemError) {
        let deadline = receiveDeadline.load(ordering: .relaxed)
        guard deadline != 0 else { return }
        let now = MonotonicClock.nanoseconds()
        guard now < deadline else { throw SystemError("receive (the peer did not send in time)", errno: ETIMEDOUT) }
        var nanoseconds = deadline - now
        let idle = idleReceiveNanoseconds.load(ordering: .relaxed)
        if idle != 0 { nanoseconds = min(nanoseconds, idle) }
        // Far from the deadline the idle timeout is what applies, and it is set already: the
        // page stream reads under a 60 s frame deadline and should not pay a syscall per read.
        if nanoseconds == idle && currentReceiveTimeout.load(ordering: .relaxed) == idle { return }
        setTimeout(SO_RCVTIMEO, seconds: max(Double(nanoseconds) / 1e9, 0.001))
        currentReceiveTimeout.store(nanoseconds, ordering: .relaxed)
    }

    /// Waits until there is something to read (data, or the peer's end of the stream), under
    /// the same deadline and idle timeout a receive has, without reading it.
    public func waitReadable() throws(SystemError) {
        let start = MonotonicClock.nanoseconds()
        while true {
            var limit = UInt64.max
            let idle = idleReceiveNanoseconds.load(ordering: .relaxed)
            if idle != 0 { limit = start + idle }
            let deadline = receiveDeadline.load(ordering: .relaxed)
            if deadline != 0 { limit = min(limit, deadline) }
            let now = MonotonicClock.nanoseconds()
            if now >= limit { throw SystemError("receive (the peer did not send in time)", errno: ETIMEDOUT) }
            var entry = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
            let milliseconds = limit == .max ? 1000 : Int32(min((limit - now) / 1_000_000 + 1, 1000))
            let ready = poll(&entry, 1, milliseconds)
            if ready > 0 { return }   // readable, closed or failed: the read says which
            if ready < 0 && errno != EINTR { throw SystemError("poll", errno: errno) }
        }
    }

    /// Waits until `events` (POLLIN, POLLOUT) can proceed on the socket (its end or an error
    /// count: the next call says which), or until `deadline` (monotonic ns; nil: for ever)
    /// has passed: false then. For a socket in non-blocking mode, as the TLS handshake uses.
    func waitUntil(_ events: Int16, deadline: UInt64?) -> Bool {
        while true {
            var milliseconds: Int32 = -1
            if let deadline {
                let now = MonotonicClock.nanoseconds()
                guard now < deadline else { return false }
                milliseconds = Int32(min((deadline - now + 999_999) / 1_000_000, 60_000))
            }
            var entry = pollfd(fd: fd.rawValue, events: events, revents: 0)
            let ready = poll(&entry, 1, milliseconds)
            if ready > 0 || (ready < 0 && errno != EINTR) { return true }
        }
    }

    /// The receive deadline `setReceiveDeadline` set (monotonic ns), if any.
    var receiveDeadlineNanoseconds: UInt64? {
        let deadline = receiveDeadline.load(ordering: .relaxed)
        return deadline == 0 ? nil : deadline
    }

    /// Sends a few bytes if the socket can take them at once, never waiting (a refusal written
    /// from the accept loop, which must not block). Whether they all went.
    func sendWithoutWaiting(_ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { Glibc.send(fd.rawValue, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL)) } == bytes.count
    }

    /// Waits up to `nanoseconds` for something to read (data, or the end of the stream); false if
    /// nothing came. Unlike a receive with a timeout, it never leaves a frame half read.
    public func waitReadable(nanoseconds: UInt64) throws(SystemError) -> Bool {
        waitUntil(Int16(POLLIN), deadline: MonotonicClock.nanoseconds() + nanoseconds)
    }

    /// Bytes came in through another reader of this descriptor (OpenSSL's, for TLS).
    func noteReceived() { lastReceivedAt.store(MonotonicClock.nanoseconds(), ordering: .relaxed) }

    /// Monotonic ns when the last byte arrived from the peer (any read, TLS records included).
    public var lastReceivedNanoseconds: UInt64 { lastReceivedAt.load(ordering: .relaxed) }

    /// What the peer's TCP has taken of what this side sent (TCP_INFO), nil where the kernel
    /// does not say. A sender whose `bytesAcknowledged` grows knows the peer's host is there and
    /// its reader takes data (a receiver that stops reading closes its window, and the figure
    /// stops), however long one frame takes on a slow link; `allAcknowledged` says the peer's
    /// host holds everything sent so far, so an answer it owes is up to its reader alone.
    public struct Progress: Sendable, Equatable {
        public var bytesAcknowledged: UInt64
        public var allAcknowledged: Bool
    }

    public var progress: Progress? {
        // glibc's struct tcp_info stops before tcpi_bytes_acked (Linux 4.1): read the kernel's
        // layout (<linux/tcp.h>: tcpi_unacked u32 at 24, tcpi_bytes_acked u64 at 120,
        // tcpi_notsent_bytes u32 at 144), and only what the kernel filled.
        guard let info = tcpInfo(atLeast: 148) else { return nil }
        return info.withUnsafeBytes { bytes in
            Progress(bytesAcknowledged: bytes.loadUnaligned(fromByteOffset: 120, as: UInt64.self),
                     allAcknowledged: bytes.loadUnaligned(fromByteOffset: 24, as: UInt32.self) == 0
                        && bytes.loadUnaligned(fromByteOffset: 144, as: UInt32.self) == 0)
        }
    }

    /// Bytes written to this socket that the peer has not acknowledged yet, about (TCP_INFO:
    /// tcpi_notsent_bytes, a u32 at offset 144, plus tcpi_unacked segments at 24 times
    /// tcpi_snd_mss at 16), nil where the kernel does not say: what the link still has to
    /// carry of what the sender counts as sent. A 4 MiB socket buffer holds a third of a second
    /// at 100 Mbit/s, and three times as much page data when it holds compressed batches.
    public var queuedBytes: UInt64? {
        guard let info = tcpInfo(atLeast: 148) else { return nil }
        return info.withUnsafeBytes { bytes in
            UInt64(bytes.loadUnaligned(fromByteOffset: 144, as: UInt32.self))
                + UInt64(bytes.loadUnaligned(fromByteOffset: 24, as: UInt32.self)) * UInt64(bytes.loadUnaligned(fromByteOffset: 16, as: UInt32.self))
        }
    }

    /// The least round-trip time this connection has seen (TCP_INFO's tcpi_min_rtt, µs, a u32 at
    /// offset 148, Linux 4.6), nil where the kernel does not say: the link's own delay, without
    /// the queues a busy sender fills (its smoothed RTT grows with them).
    public var leastRoundTripSeconds: Double? {
        guard let info = tcpInfo(atLeast: 152) else { return nil }
        return info.withUnsafeBytes { Double($0.loadUnaligned(fromByteOffset: 148, as: UInt32.self)) / 1e6 }
    }

    /// What this side's TCP has received from the peer so far (TCP_INFO's tcpi_bytes_received,
    /// a u64 at offset 128 of the kernel's layout, Linux 4.1), nil where the kernel does not say:
    /// how far an incoming migration has come, without its receiver counting (TLS records
    /// included).
    public var bytesReceived: UInt64? {
        guard let info = tcpInfo(atLeast: 136) else { return nil }
        return info.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 128, as: UInt64.self) }
    }

    /// How long ago (ns) the peer's TCP last acknowledged anything (TCP_INFO's tcpi_last_ack_recv,
    /// a u32 of milliseconds at offset 56 of the kernel's layout), nil where the kernel does not
    /// say. Still readable after the kernel gave up on the connection: what tells, after the
    /// fact, a link that went silent from a peer that reset or closed it. A sender needs it
    /// because the error a silent link ends in depends on which call saw it first (a TLS send
    /// after the abort saw EPIPE, not ETIMEDOUT).
    public var nanosecondsSinceLastAcknowledgement: UInt64? {
        guard let info = tcpInfo(atLeast: 60) else { return nil }
        return UInt64(info.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 56, as: UInt32.self) }) * 1_000_000
    }

    /// The kernel's struct tcp_info as bytes, nil unless it filled at least `count` of them.
    private func tcpInfo(atLeast count: Int) -> [UInt8]? {
        var info = [UInt8](repeating: 0, count: 256)
        var length = socklen_t(info.count)
        guard getsockopt(fd.rawValue, Int32(IPPROTO_TCP), TCP_INFO, &info, &length) == 0, Int(length) >= count else { return nil }
        return info
    }

    /// "HOST:PORT" of the peer, for messages ("?" if the socket has none).
    public var peerDescription: String {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd.rawValue, $0, &length) }
        } == 0
        guard ok else { return "?" }
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        var service = [CChar](repeating: 0, count: Int(NI_MAXSERV))
        let status = withUnsafePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                getnameinfo($0, length, &host, socklen_t(host.count), &service, socklen_t(service.count), NI_NUMERICHOST | NI_NUMERICSERV)
            }
        }
        guard status == 0 else { return "?" }
        return HostPort(host: String(nulTerminated: host), port: UInt16(String(nulTerminated: service)) ?? 0).description
    }

    /// Sends every byte of every buffer (writev; partial writes continue where they stopped).
    public func send(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError) {
        var vectors = buffers.filter { $0.count > 0 }.map {
            iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
        }
        var first = 0
        while first < vectors.count {
            let count = min(vectors.count - first, 1024)
            var header = msghdr()
            let sent = vectors.withUnsafeMutableBufferPointer { pointer -> Int in
                header.msg_iov = pointer.baseAddress! + first
                header.msg_iovlen = count
                return Glibc.sendmsg(fd.rawValue, &header, Int32(MSG_NOSIGNAL))
            }
            if sent < 0 {
                if errno == EINTR { continue }
                throw SystemError("send", errno: errno == EAGAIN ? ETIMEDOUT : errno)
            }
            var remaining = sent
            while remaining > 0 && first < vectors.count {
                if remaining >= vectors[first].iov_len {
                    remaining -= vectors[first].iov_len
                    first += 1
                } else {
                    vectors[first].iov_base += remaining
                    vectors[first].iov_len -= remaining
                    remaining = 0
                }
            }
        }
    }

    /// Receives exactly `count` bytes into `destination`. A peer that closes first is ECONNRESET.
    public func receive(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        var done = 0
        while done < count {
            try armDeadline()
            let got = Glibc.recv(fd.rawValue, destination + done, count - done, 0)
            if got > 0 {
                done += got
                lastReceivedAt.store(MonotonicClock.nanoseconds(), ordering: .relaxed)
                continue
            }
            if got == 0 { throw SystemError("receive (the peer closed the connection)", errno: ECONNRESET) }
            if errno == EINTR { continue }
            if errno == EAGAIN {
                // SO_RCVTIMEO fired: the idle timeout, or what was left of the deadline.
                let deadline = receiveDeadline.load(ordering: .relaxed)
                let late = deadline != 0 && MonotonicClock.nanoseconds() >= deadline
                throw SystemError(late ? "receive (the peer did not send in time)" : "receive", errno: ETIMEDOUT)
            }
            throw SystemError("receive", errno: errno)
        }
    }

    /// The first byte the peer sent, left in the stream (MSG_PEEK), under the receive deadline: what
    /// tells a TLS ClientHello (0x16) from a plaintext frame before either is parsed.
    func peekFirstByte() throws(SystemError) -> UInt8 {
        var byte: UInt8 = 0
        while true {
            try armDeadline()
            let got = Glibc.recv(fd.rawValue, &byte, 1, Int32(MSG_PEEK))
            if got == 1 { return byte }
            if got == 0 { throw SystemError("receive (the peer closed the connection)", errno: ECONNRESET) }
            if errno == EINTR { continue }
            if errno == EAGAIN { throw SystemError("receive (the peer did not send in time)", errno: ETIMEDOUT) }
            throw SystemError("receive", errno: errno)
        }
    }

    /// Wakes any thread blocked on this socket; the descriptor stays open until released.
    public func shutdown() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR)) }

    /// Ends only the sending half: the peer sees the end of the stream after what was sent.
    public func shutdownSending() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_WR)) }

    /// Ends only the receiving half: a thread blocked reading sees the end of the stream, and can
    /// still send why it stops (an abort frame) before it closes.
    public func shutdownReceiving() { _ = Glibc.shutdown(fd.rawValue, Int32(SHUT_RD)) }
}

/// One address a name resolved to, as the socket calls take it (a sockaddr): resolved once, then
/// checked and used as it is, so what was checked is what is listened on or connected to.
public struct SocketAddress: Sendable, Equatable, CustomStringConvertible {
    public let family: Int32
    let bytes: [UInt8]

    init(family: Int32, bytes: [UInt8]) {
        self.family = family
        self.bytes = bytes
    }

    /// 127.0.0.0/8, ::1 or ::ffff:127.x.
    public var isLoopback: Bool {
        if family == AF_INET { return bytes.count >= 8 && bytes[4] == 127 }
        guard family == AF_INET6, bytes.count >= 24 else { return false }
        let address = Array(bytes[8..<24])
        if address == [UInt8](repeating: 0, count: 15) + [1] { return true }
        return address[0..<10].allSatisfy { $0 == 0 } && address[10] == 0xff && address[11] == 0xff && address[12] == 127
    }

    /// The address in numbers ("127.0.0.1", "::1"), for messages.
    public var description: String {
        var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
        let status = bytes.withUnsafeBytes {
            getnameinfo($0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t(bytes.count), &host, socklen_t(host.count),
                        nil, 0, NI_NUMERICHOST)
        }
        return status == 0 ? String(nulTerminated: host) : "?"
    }
}

/// Turns a name into addresses: the system's resolver, or one a test gives (a name that stops
/// resolving, or resolves elsewhere the second time).
public struct NameResolver: Sendable {
    let resolve: @Sendable (HostPort, _ passive: Bool) throws(SystemError) -> [SocketAddress]

    public init(_ resolve: @escaping @Sendable (HostPort, _ passive: Bool) throws(SystemError) -> [SocketAddress]) {
        self.resolve = resolve
    }

    public static let system = NameResolver { endpoint, passive throws(SystemError) in
        try TCPSocket.resolve(endpoint, passive: passive)
    }

    public func addresses(_ endpoint: HostPort, passive: Bool) throws(SystemError) -> [SocketAddress] {
        try resolve(endpoint, passive)
    }
}
