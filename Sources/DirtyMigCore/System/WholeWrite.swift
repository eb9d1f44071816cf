import Glibc

/// A write(2) of a whole buffer that stopped short: how much went out, and why the rest did not.
public struct ShortWrite: Error {
    public let written: Int
    public let error: SystemError
}

/// write(2) of every byte of a buffer, the one way this program writes logs, standard streams
/// and output files. Partial writes are continued, EINTR is retried and EAGAIN (a non-blocking
/// descriptor handed to us, such as a shared terminal) is waited out with poll. Any other
/// failure (ENOSPC, EPIPE, EIO) is returned, never trapped on: Foundation's FileHandle.write
/// traps on every one of them, and a full disk under a log must not end a VM's process.
public enum WholeWrite {
    public static func write(_ descriptor: Int32, _ bytes: UnsafeRawBufferPointer) throws(ShortWrite) {
        guard let base = bytes.baseAddress else { return }
        var offset = 0
        while offset < bytes.count {
            let count = Glibc.write(descriptor, base + offset, bytes.count - offset)
            if count > 0 { offset += count; continue }
            let error = count == 0 ? EIO : errno   // no progress and no errno: report it rather than spin
            switch error {
            case EINTR:
                continue
            case EAGAIN:
                var poller = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
                if poll(&poller, 1, -1) < 0 && errno != EINTR {
                    throw ShortWrite(written: offset, error: SystemError("poll before write", errno: errno))
                }
            default:
                throw ShortWrite(written: offset, error: SystemError("write", errno: error))
            }
        }
    }

    public static func write(_ descriptor: Int32, _ bytes: [UInt8]) throws(ShortWrite) {
        let result = bytes.withUnsafeBytes { buffer in Result { () throws(ShortWrite) in try write(descriptor, buffer) } }
        try result.get()
    }
}
