import Foundation
import Glibc

/// Starts a dedicated OS thread (never Swift concurrency's cooperative pool: what runs here blocks
/// in ioctls or sleeps) and lets the starter wait for it to finish.
public final class OSThread: @unchecked Sendable {
    // @unchecked: `handle` is written once by the thread before `started` is signalled and only
    // read after that; `finished` is a semaphore.
    private let finished = DispatchSemaphore(value: 0)
    private let started = DispatchSemaphore(value: 0)
    public private(set) var handle: pthread_t = pthread_t()

    public init(name: String, body: @escaping @Sendable () -> Void) {
        let thread = Thread { [self] in
            self.handle = pthread_self()
            self.started.signal()
            body()
            self.finished.signal()
        }
        thread.name = name
        thread.stackSize = 1 << 20
        thread.start()
        started.wait()
    }

    public func join() {
        finished.wait()
        finished.signal()
    }
}
