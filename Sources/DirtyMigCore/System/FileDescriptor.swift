import Glibc

/// An owned file descriptor, closed exactly once when the owner is done with it.
public final class FileDescriptor: @unchecked Sendable {
    // @unchecked: the raw value never changes after init; close() is guarded by `closed`.
    public let rawValue: Int32
    private var closed = false

    public init(owning rawValue: Int32) {
        self.rawValue = rawValue
    }

    /// open(2), close-on-exec; `mode` is the permissions of a file O_CREAT creates.
    public static func open(_ path: String, flags: Int32, mode: mode_t = 0) throws(SystemError) -> FileDescriptor {
        let fd = Glibc.open(path, flags | O_CLOEXEC, mode)
        if fd < 0 { throw SystemError("open \(path)") }
        return FileDescriptor(owning: fd)
    }

    public func close() {
        guard !closed else { return }
        closed = true
        Glibc.close(rawValue)
    }

    deinit { close() }
}
