import Glibc

/// A directory held by descriptor, opened without following a symbolic link at its last
/// component: what is checked (fstat) and changed (fchmod) is the inode opened, never whatever
/// the path names a moment later. A path-based lstat-then-chmod follows a link another user
/// plants in between; this cannot.
public final class OpenedDirectory {
    private let fd: FileDescriptor

    /// mkdir(2): true if this call created the directory, false if anything (a directory, a
    /// file, a symbolic link) was at the path already (EEXIST).
    public static func make(_ path: String, mode: mode_t) throws(SystemError) -> Bool {
        if mkdir(path, mode) == 0 { return true }
        if errno == EEXIST { return false }
        throw SystemError("mkdir \(path)")
    }

    /// open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW). A symbolic link fails with ELOOP or
    /// ENOTDIR (Linux checks O_DIRECTORY first), anything else that is not a directory with
    /// ENOTDIR, and nothing there with ENOENT.
    public init(path: String) throws(SystemError) {
        fd = try FileDescriptor.open(path, flags: O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
    }

    /// fstat(2) of the directory opened.
    public func status() throws(SystemError) -> stat {
        var info = stat()
        if fstat(fd.rawValue, &info) != 0 { throw SystemError("fstat") }
        return info
    }

    /// fchmod(2) of the directory opened.
    public func setMode(_ mode: mode_t) throws(SystemError) {
        if fchmod(fd.rawValue, mode) != 0 { throw SystemError("fchmod") }
    }
}
