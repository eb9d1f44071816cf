import Foundation

/// One thread that runs jobs in the order they come, so that the sender compresses the next page
/// batch while the one before is on the wire: a compressed batch then costs the longer of its
/// compression and its wire time, not their sum (see CompressionChooser). A dedicated OS thread,
/// not Swift concurrency's pool: a job runs for milliseconds at a time.
///
/// Tickets are sequence numbers: jobs finish in order, so a ticket is done once the last finished
/// job's number has reached it.
final class CompressionWorker: @unchecked Sendable {
    // @unchecked: `condition` guards the queue and the counters.
    typealias Ticket = UInt64

    private let condition = NSCondition()
    private var queue: [@Sendable () -> Void] = []
    private var submitted: Ticket = 0
    private var finished: Ticket = 0
    private var closing = false
    private var thread: OSThread?

    /// Starts the thread (named for top -H and perf). The thread holds the worker until
    /// `close`, which its owner must call (PageBatchCompressor does, as it goes).
    init(name: String = "compress") {
        thread = OSThread(name: name) { [self] in run() }
    }

    /// Queues `job`; its ticket says when it is done (`wait`).
    func submit(_ job: @escaping @Sendable () -> Void) -> Ticket {
        condition.lock(); defer { condition.unlock() }
        precondition(!closing, "a job for a compression worker that is closing")
        queue.append(job)
        submitted += 1
        condition.broadcast()
        return submitted
    }

    /// Waits until the job of `ticket` (and every job before it) has run.
    func wait(_ ticket: Ticket) {
        condition.lock(); defer { condition.unlock() }
        while finished < ticket { condition.wait() }
    }

    /// Waits until every job submitted so far has run.
    func drain() {
        condition.lock(); defer { condition.unlock() }
        while finished < submitted { condition.wait() }
    }

    /// Runs what is queued, then ends the thread. Before the buffers the jobs use are freed.
    func close() {
        condition.lock()
        closing = true
        condition.broadcast()
        condition.unlock()
        thread?.join()
        thread = nil
    }

    private func run() {
        while true {
            condition.lock()
            while queue.isEmpty && !closing { condition.wait() }
            if queue.isEmpty {   // closing, and nothing left
                condition.unlock()
                return
            }
            let job = queue.removeFirst()
            condition.unlock()
            job()
            condition.lock()
            finished += 1
            condition.broadcast()
            condition.unlock()
        }
    }
}
