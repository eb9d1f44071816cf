import Glibc
import Synchronization

/// A Unix-domain stream socket: socket/bind/listen/accept/connect/read/write wrapped once.
///
/// - Every call retries on EINTR (vCPU kick signals exist in this process).
/// - Writes use `MSG_NOSIGNAL`, so a peer that hung up is an `EPIPE` error, never a SIGPIPE.
/// - Writes loop until every byte is out (partial writes).
/// - Reading is line-oriented with a bound: a line longer than the limit is discarded up to its
///   newline and reported as `.tooLong`, so a peer can never make us buffer without bound.
/// - `shutdown()` may be called from any thread to wake a thread blocked in `accept` or `readLine`;
///   only the owning thread calls `close()`, so a descriptor number is never reused under a reader.
public final class UnixSocket: Sendable {
    /// `sockaddr_un.sun_path` holds 108 bytes on Linux; we always keep a terminating NUL.
    public static let maxPathBytes = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    public let fd: FileDescriptor
    private let reader = Mutex(LineBuffer())
    private let writeLock = Mutex(())

    init(fd: FileDescriptor) { self.fd = fd }

    // MARK: Setting up

    /// The bytes a path takes in `sun_path`, and whether it fits.
    public static func pathFits(_ path: String) -> Bool { path.utf8.count <= maxPathBytes }

    private static func address(_ path: String) throws(SystemError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count <= maxPathBytes else {
            throw SystemError("socket path \(path) is \(bytes.count) bytes; Unix sockets allow 1 to \(maxPathBytes)",
                              errno: bytes.isEmpty ? ENOENT : ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    private static func withAddress<T>(_ address: inout sockaddr_un, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
    }

    private static func makeSocket() throws(SystemError) -> FileDescriptor {
        let raw = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if raw < 0 { throw SystemError("socket(AF_UNIX)") }
        return FileDescriptor(owning: raw)
    }

    /// Binds a new socket file at `path`, sets its mode, and listens. The file must not exist.
    /// The backlog is the kernel's maximum (SOMAXCONN): with 16, a burst of 200 non-blocking
    /// clients connecting at once saw EAGAIN.
    public static func listen(path: String, mode: mode_t = 0o600, backlog: Int32 = SOMAXCONN) throws(SystemError) -> UnixSocket {
        var address = try address(path)
        let fd = try makeSocket()
        if withAddress(&address, { Glibc.bind(fd.rawValue, $0, $1) }) != 0 { throw SystemError("bind \(path)") }
        // The socket file is created with the umask's mode; the directory around it is private,
        // so nobody else can reach it before this chmod.
        if chmod(path, mode) != 0 {
            let error = SystemError("chmod \(path)")
            unlink(path)
            throw error
        }
        if Glibc.listen(fd.rawValue, backlog) != 0 {
            let error = SystemError("listen \(path)")
            unlink(path)
            throw error
        }
        return UnixSocket(fd: fd)
    }

    /// Connects to the socket at `path`. ENOENT: no such file; ECONNREFUSED: nobody listens (stale
    /// file, or not a socket); EACCES: no permission.
    public static func connect(path: String) throws(SystemError) -> UnixSocket {
        var address = try address(path)
        let fd = try makeSocket()
        if withAddress(&address, { Glibc.connect(fd.rawValue, $0, $1) }) == 0 { return UnixSocket(fd: fd) }
        guard errno == EINTR else { throw SystemError("connect \(path)") }
        // An interrupted connect carries on in the background: wait for it, then read its result.
        var poller = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
        while poll(&poller, 1, -1) < 0 {
            if errno != EINTR { throw SystemError("connect \(path) (poll)") }
        }
        var error: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        if getsockopt(fd.rawValue, SOL_SOCKET, SO_ERROR, &error, &length) != 0 { throw SystemError("connect \(path) (SO_ERROR)") }
        if error != 0 { throw SystemError("connect \(path)", errno: error) }
        return UnixSocket(fd: fd)
    }

    /// Waits for the next client. Throws once the listener is shut down (EINVAL) or on another error;
    /// EMFILE/ENFILE are thrown too, so the caller can back off.
    public func accept() throws(SystemError) -> UnixSocket {
        while true {
            let raw = Glibc.accept(fd.rawValue, nil, nil)
            if raw >= 0 {
                // No other thread of ours forks or execs meanwhile, so setting CLOEXEC now is enough.
                _ = fcntl(raw, F_SETFD, FD_CLOEXEC)
                return UnixSocket(fd: FileDescriptor(owning: raw))
            }
            if errno == EINTR || errno == ECONNABORTED { continue }
            throw SystemError("accept")
        }
    }

    /// Bounds how long one write may block (a peer that stops reading must not wedge us).
    public func setSendTimeout(seconds: Double) {
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        _ = setsockopt(fd.rawValue, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Wakes threads blocked on this socket: `.read` ends reads (they see end of stream) but lets
    /// pending writes complete; `.write` sends end of stream to the peer; `.both` does both and
    /// fails later writes. Safe from any thread.
    public enum ShutdownDirection: Sendable { case read, write, both }

    public func shutdown(_ direction: ShutdownDirection = .both) {
        let how: Int32
        switch direction {
        case .read: how = Int32(SHUT_RD)
        case .write: how = Int32(SHUT_WR)
        case .both: how = Int32(SHUT_RDWR)
        }
        _ = Glibc.shutdown(fd.rawValue, how)
    }

    /// Closes the descriptor; only the thread that owns the socket calls this.
    public func close() { fd.close() }

    // MARK: Lines

    public enum LineResult: Sendable, Equatable {
        /// One line without its `\n` (a last line the peer ended without `\n` counts too).
        case line([UInt8])
        /// A line over the limit; it has been discarded up to and including its newline.
        case tooLong
        /// The peer closed its side (or the socket was shut down).
        case end
    }

    /// Reads the next line. `limit` bounds a line's length in bytes (without the newline);
    /// `deadline` is a `MonotonicClock.nanoseconds()` instant, after which this throws ETIMEDOUT.
    /// Bytes already received stay buffered across a timeout.
    public func readLine(limit: Int, deadline: UInt64? = nil) throws(SystemError) -> LineResult {
        try reader.withLock { (buffer: inout LineBuffer) throws(SystemError) -> LineResult in
            while true {
                if let result = buffer.nextLine(limit: limit) { return result }
                try waitReadable(deadline: deadline)
                try buffer.fill(from: fd.rawValue)
            }
        }
    }

    private func waitReadable(deadline: UInt64?) throws(SystemError) {
        guard let deadline else { return }
        while true {
            let now = MonotonicClock.nanoseconds()
            if now >= deadline { throw SystemError("read timed out", errno: ETIMEDOUT) }
            let milliseconds = Int32(clamping: (deadline - now + 999_999) / 1_000_000)
            var poller = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, milliseconds)
            if ready > 0 { return }
            if ready < 0 && errno != EINTR { throw SystemError("poll") }
        }
    }

    /// Writes every byte (looping over partial writes), or throws (EPIPE when the peer is gone,
    /// EAGAIN when a send timeout expired).
    public func write(_ bytes: [UInt8]) throws(SystemError) {
        let failure: Int32? = writeLock.withLock { _ in
            bytes.withUnsafeBytes { raw -> Int32? in
                var offset = 0
                while offset < raw.count {
                    let count = send(fd.rawValue, raw.baseAddress! + offset, raw.count - offset, Int32(MSG_NOSIGNAL))
                    if count < 0 {
                        if errno == EINTR { continue }
                        return errno
                    }
                    offset += count
                }
                return nil
            }
        }
        if let failure { throw SystemError("send", errno: failure) }
    }

    /// Writes `text` and a newline in one go.
    public func writeLine(_ text: String) throws(SystemError) {
        var bytes = Array(text.utf8)
        bytes.append(0x0A)
        try write(bytes)
    }
}

/// The bytes received but not yet handed out as lines.
struct LineBuffer: Sendable {
    private var bytes: [UInt8] = []
    private var start = 0           // first byte not yet handed out
    private var scanned = 0         // bytes before this index hold no newline (from `start`)
    private var discarding = false  // inside an over-long line: drop bytes until its newline
    private var atEnd = false

    /// A complete line, `.tooLong`, `.end`, or nil when more bytes are needed.
    mutating func nextLine(limit: Int) -> UnixSocket.LineResult? {
        if let newline = bytes[scanned...].firstIndex(of: 0x0A) {
            let line = Array(bytes[start..<newline])
            start = newline + 1
            scanned = start
            compact()
            if discarding || line.count > limit {
                discarding = false
                return .tooLong
            }
            return .line(line)
        }
        scanned = bytes.count
        if bytes.count - start > limit {
            discarding = true
            bytes.removeAll(keepingCapacity: true)
            start = 0
            scanned = 0
        }
        if atEnd {
            if discarding {
                discarding = false
                return .tooLong
            }
            if bytes.count > start {
                let line = Array(bytes[start...])
                bytes.removeAll()
                start = 0
                scanned = 0
                return .line(line)
            }
            return .end
        }
        return nil
    }

    /// One read(2) into the buffer; a zero-byte read marks the end of the stream.
    mutating func fill(from fd: Int32) throws(SystemError) {
        let chunk = 64 * 1024
        while true {
            let count = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: chunk) { storage -> Int in
                let count = Glibc.read(fd, storage.baseAddress, chunk)
                if count > 0 { bytes.append(contentsOf: storage[..<count]) }
                return count
            }
            if count > 0 { return }
            if count == 0 { atEnd = true; return }
            if errno == EINTR { continue }
            // A reset connection is just the peer going away.
            if errno == ECONNRESET { atEnd = true; return }
            throw SystemError("read")
        }
    }

    private mutating func compact() {
        if start == bytes.count {
            bytes.removeAll(keepingCapacity: bytes.capacity <= 1 << 20)
            start = 0
            scanned = 0
        } else if start > 64 * 1024 && start * 2 > bytes.count {
            bytes.removeSubrange(0..<start)
            scanned -= start
            start = 0
        }
    }
}
