import Glibc

/// Unix stream sockets, wrapped once: bind/listen/accept/connect, and line-oriented I/O.
public final class UnixSocket: @unchecked Sendable {
    // @unchecked: the descriptor is immutable; a socket is read by one thread and written under
    // `writeLock`, so replies from concurrent handlers never interleave.
    public let fd: FileDescriptor
    private var buffer: [UInt8] = []
    private let writeLock = PThreadLock()

    init(fd: FileDescriptor) { self.fd = fd }

    private static func address(_ path: String) throws(SystemError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { throw SystemError("socket path too long (\(bytes.count) bytes, at most \(capacity - 1)): \(path)", errno: ENAMETOOLONG) }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    private static func make() throws(SystemError) -> FileDescriptor {
        let raw = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if raw < 0 { throw SystemError("socket") }
        return FileDescriptor(owning: raw)
    }

    public static func listen(path: String, mode: mode_t = 0o600) throws(SystemError) -> UnixSocket {
        var address = try address(path)
        let fd = try make()
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd.rawValue, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if result != 0 { throw SystemError("bind \(path)") }
        chmod(path, mode)
        if Glibc.listen(fd.rawValue, 16) != 0 { throw SystemError("listen \(path)") }
        return UnixSocket(fd: fd)
    }

    public static func connect(path: String) throws(SystemError) -> UnixSocket {
        var address = try address(path)
        let fd = try make()
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd.rawValue, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if result != 0 { throw SystemError("connect \(path)") }
        return UnixSocket(fd: fd)
    }

    /// Waits for a client; nil once the listener has been shut down.
    public func accept() -> UnixSocket? {
        while true {
            let raw = Glibc.accept(fd.rawValue, nil, nil)
            if raw >= 0 {
                _ = fcntl(raw, F_SETFD, FD_CLOEXEC)
                return UnixSocket(fd: FileDescriptor(owning: raw))
            }
            if errno == EINTR { continue }
            return nil
        }
    }

    /// Wakes any thread blocked in accept or read on this socket.
    public func shutdownBoth() { Glibc.shutdown(fd.rawValue, Int32(SHUT_RDWR)) }

    public enum LineResult { case line([UInt8]), tooLong, closed }

    /// Reads one line (without the newline). A line longer than `limit` is discarded up to its
    /// newline and reported as `.tooLong`, so a client cannot make us buffer without bound.
    public func readLine(limit: Int = 1 << 20) -> LineResult {
        var discarding = false
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                if discarding || line.count > limit { return .tooLong }
                return .line(line)
            }
            if buffer.count > limit { discarding = true; buffer.removeAll(keepingCapacity: true) }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let count = chunk.withUnsafeMutableBytes { read(fd.rawValue, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            if count <= 0 { return .closed }
            buffer.append(contentsOf: chunk[..<count])
        }
    }

    /// Writes the whole line and a newline; false if the peer is gone.
    @discardableResult
    public func writeLine(_ text: String) -> Bool {
        let bytes = Array((text + "\n").utf8)
        return writeLock.withLock {
            var offset = 0
            while offset < bytes.count {
                let count = bytes[offset...].withUnsafeBytes { send(fd.rawValue, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if count < 0 && errno == EINTR { continue }
                if count <= 0 { return false }
                offset += count
            }
            return true
        }
    }

    /// Bounds how long a read may block (0 = forever).
    public func setReadTimeout(seconds: Double) {
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        setsockopt(fd.rawValue, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }
}

/// A plain lock around a closure (pthread mutex), for the few places that need one.
final class PThreadLock: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    deinit { pthread_mutex_destroy(&mutex) }
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return try body()
    }
}
