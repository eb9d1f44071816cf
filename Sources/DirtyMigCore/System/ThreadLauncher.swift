import CKVM
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
    /// The kernel's id of the thread (what /proc, perf and userfaultfd's fault messages name).
    public private(set) var threadID: UInt32 = 0

    public init(name: String, body: @escaping @Sendable () -> Void) {
        // Foundation's Thread.name names no Linux thread: without prctl every thread is
        // "dirtymig" in top -H, perf and /proc/PID/task/*/comm. Linux keeps 15 bytes of a name.
        let shortName = String(decoding: Array(name.utf8.prefix(15)), as: UTF8.self)
        let thread = Thread { [self] in
            self.handle = pthread_self()
            self.threadID = UInt32(ckvm_gettid())
            _ = ckvm_set_thread_name(shortName)
            self.started.signal()
            body()
            self.finished.signal()
        }
        thread.stackSize = 1 << 20
        thread.start()
        started.wait()
    }

    public func join() {
        finished.wait()
        finished.signal()
    }
}
