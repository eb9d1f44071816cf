import Glibc

/// A failed system call: which operation, and errno. Every syscall wrapper in System/ throws this;
/// the layers above turn it into errors that say what to do.
public struct SystemError: Error, CustomStringConvertible, Equatable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32 = Glibc.errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String {
        "\(operation): \(String(cString: strerror(errno))) (errno \(errno))"
    }
}

/// Retries a syscall interrupted by a signal (EINTR) and throws on any other failure.
@discardableResult
func retryingOnInterrupt(_ operation: @autoclosure () -> String, _ body: () -> Int) throws(SystemError) -> Int {
    while true {
        let result = body()
        if result >= 0 { return result }
        if errno == EINTR { continue }
        throw SystemError(operation())
    }
}
