import Glibc

/// An mmap'ed range, unmapped when released.
public final class MappedRegion: @unchecked Sendable {
    // @unchecked: base and length are immutable; the bytes behind them are shared with the kernel
    // (or the guest) by design, and their users synchronise as the kernel ABI requires.
    public let base: UnsafeMutableRawPointer
    public let length: Int

    public init(length: Int, protection: Int32, flags: Int32, fd: Int32, offset: Int) throws(SystemError) {
        guard let pointer = mmap(nil, length, protection, flags, fd, off_t(offset)),
              pointer != MAP_FAILED else {
            throw SystemError("mmap \(length) bytes at offset \(offset)")
        }
        self.base = pointer
        self.length = length
    }

    deinit { munmap(base, length) }
}
