import Foundation
import Synchronization

/// What another thread asks of a vCPU thread (Firecracker's `VcpuEvent`). Each event gets one
/// `VCPUResponse`. Saving the state is asked directly (`VCPURunner.saveState`), not posted: see
/// there why.
enum VCPUEvent: Sendable, Equatable {
    /// Leave the guest with the last exit completed and stay out: `.paused`.
    case pause
    /// Enter the guest again (a parked vCPU stays out): `.resumed`.
    case resume
    /// End the thread: `.stopped`, once it has ended.
    case stop

    /// Whether the event must reach a thread that may be inside KVM_RUN, so posting it kicks the
    /// vCPU. A resume is only ever sent to a vCPU that is out of the guest (Machine sends it
    /// under its lock, paused): a kick would only cost it a signal, and leave immediate_exit set
    /// for its next KVM_RUN.
    var interruptsGuest: Bool { self != .resume }
}

/// What the vCPU thread answers (Firecracker's `VcpuResponse`).
enum VCPUResponse: Sendable {
    /// Out of the guest, its last exit completed (or parked, which counts as paused).
    case paused
    case resumed
    /// The vCPU's state, `parked` included. Indirect, as `failed`: a reply is allocated for
    /// every event and its response copied in and out, and VCPUState inline (its LAPIC page
    /// alone is 1 KiB) made pausing 8 and 32 vCPUs about 2 µs per vCPU slower than before
    /// (median, Machine's pause/save/resume loop on this 2-core host); indirect, as fast.
    indirect case saved(VCPUState)
    /// Reading the state failed.
    indirect case failed(KVMError)
    /// A save asked of a vCPU that runs: its state is only read while it is out of the guest.
    case notPaused
    /// The thread has ended (stopped, or its vCPU failed): every later event gets this too.
    case stopped
}

/// The answer to one posted event, to wait for when the poster wants it. Posting and waiting are
/// separate so that one thread can ask every vCPU first and then wait for each (see
/// `Machine.pause`).
final class VCPUReply: @unchecked Sendable {
    // @unchecked: `response` is guarded by the mailbox's condition.
    fileprivate var response: VCPUResponse?
    private let mailbox: VCPUMailbox

    fileprivate init(mailbox: VCPUMailbox) { self.mailbox = mailbox }

    /// Blocks until the vCPU thread has answered.
    @discardableResult
    func wait() -> VCPUResponse { mailbox.wait(for: self) }
}

/// One vCPU thread's mailbox: events in, in the order posted, each with the reply it will get;
/// and the thread's state as the thread last published it. One condition serves both directions
/// (the vCPU thread waits for events there, posters for replies). The vCPU thread looks at
/// `hasMail` before every KVM_RUN: one atomic load, no lock.
///
/// The published state is the thread's promise: it changes only under the lock, and the thread
/// publishes `.running` before it enters the guest again. So while another thread holds the lock
/// and reads `.paused` or `.parked`, the vCPU is out of KVM_RUN and stays out (`whileOutOfGuest`).
final class VCPUMailbox: @unchecked Sendable {
    // @unchecked: `queue`, `closed` and `published` are guarded by `condition`; `count` is an atomic.
    private let condition = NSCondition()
    private var queue: [(event: VCPUEvent, reply: VCPUReply)] = []
    private var published: VCPUThreadState
    /// Events posted and not yet taken: read without the lock on the vCPU thread's fast path.
    private let count = Atomic<Int>(0)

    init(state: VCPUThreadState) { published = state }

    /// Queues `event` and returns without waiting for the reply, which comes when the vCPU thread
    /// takes the event (at once, `.stopped`, when the thread has ended). It takes the lock, which
    /// a save under way holds for one vCPU's ioctls; Machine, which posts, never saves meanwhile.
    func post(_ event: VCPUEvent) -> VCPUReply {
        let reply = VCPUReply(mailbox: self)
        condition.lock()
        if published == .exited {
            reply.response = .stopped
        } else {
            queue.append((event, reply))
            count.add(1, ordering: .releasing)
            condition.broadcast()
        }
        condition.unlock()
        return reply
    }

    fileprivate func wait(for reply: VCPUReply) -> VCPUResponse {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let response = reply.response { return response }
            condition.wait()
        }
    }

    /// Runs `body` with the state the thread last published, holding the lock: if that is
    /// `.paused` or `.parked`, the thread cannot enter the guest before `body` returns.
    func withPublishedState<T>(_ body: (VCPUThreadState) -> T) -> T {
        condition.lock()
        defer { condition.unlock() }
        return body(published)
    }

    // MARK: The vCPU thread's side

    /// Whether an event waits (one atomic load).
    var hasMail: Bool { count.load(ordering: .acquiring) > 0 }

    /// The oldest event, if any.
    func take() -> (event: VCPUEvent, reply: VCPUReply)? {
        guard hasMail else { return nil }
        condition.lock()
        defer { condition.unlock() }
        return takeLocked()
    }

    /// Blocks until an event comes, and takes it.
    func next() -> (event: VCPUEvent, reply: VCPUReply) {
        condition.lock()
        defer { condition.unlock() }
        while true {
            if let letter = takeLocked() { return letter }
            condition.wait()
        }
    }

    /// Blocks until an event waits (without taking it), or until `deadline` (monotonic ns) when
    /// one is given. A timed wait, never a poll: a held vCPU thread sleeps through its hold.
    func waitForMail(untilNanoseconds deadline: UInt64? = nil) {
        condition.lock()
        defer { condition.unlock() }
        guard let deadline else {
            while queue.isEmpty { condition.wait() }
            return
        }
        let now = MonotonicClock.nanoseconds()
        guard deadline > now else { return }
        let wallDeadline = Date(timeIntervalSinceNow: Double(deadline - now) / 1e9)
        while queue.isEmpty && MonotonicClock.nanoseconds() < deadline {
            if !condition.wait(until: wallDeadline) { break }
        }
    }

    /// Answers `reply` and publishes the state the thread moves to, in one step.
    func answer(_ reply: VCPUReply, _ response: VCPUResponse, publishing state: VCPUThreadState) {
        condition.lock()
        published = state
        reply.response = response
        condition.broadcast()
        condition.unlock()
    }

    /// Publishes a move no event asked for (the guest parked the vCPU).
    func publish(_ state: VCPUThreadState) {
        condition.lock()
        published = state
        condition.unlock()
    }

    /// The thread has ended: the stop that ended it (if one did), what waits, and whatever is
    /// posted from now on, is answered `.stopped`.
    func close(answering stop: VCPUReply?) {
        condition.lock()
        published = .exited
        stop?.response = .stopped
        for letter in queue { letter.reply.response = .stopped }
        count.subtract(queue.count, ordering: .releasing)
        queue.removeAll()
        condition.broadcast()
        condition.unlock()
    }

    private func takeLocked() -> (event: VCPUEvent, reply: VCPUReply)? {
        guard !queue.isEmpty else { return nil }
        count.subtract(1, ordering: .releasing)
        return queue.removeFirst()
    }
}
