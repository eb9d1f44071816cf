import Synchronization

/// The destination's side of post-copy: which of the pages it lacked at the switch have landed,
/// which it has asked for, and what each demand fault cost.
///
/// A fault on a page the destination lacks becomes one request (later faults on the same page
/// wait for the same answer); a fault on a page outside that set is a page the source never wrote,
/// which is zero here; a fault on a page that landed meanwhile only needs its thread woken.
/// Latency is measured here, from the first fault on a page to its landing; each thread that
/// waited on the page is charged from its own fault to the landing (a vCPU's blocked time).
public final class PostCopyPageMap: Sendable {
    /// What the fault thread does about one fault.
    public enum FaultAction: Sendable, Equatable {
        /// Ask the source for the page.
        case request
        /// Already asked: the answer will wake this thread too.
        case wait
        /// Not lacking: a page the source never wrote (place a zero page), or one that landed
        /// after the fault was raised (the zero page is refused as present; wake the thread).
        case placeZero
    }

    private struct Waiting {
        /// The first fault on the page (the request's time).
        var since: UInt64
        /// Each waiting thread and when it began to wait.
        var threads: [UInt32: UInt64]
    }

    private struct State {
        var lacking: DirtyPageBitmap
        var remaining: Int
        var waiting: [Int: Waiting] = [:]
        var faults = 0
        var requested = 0
        var latenciesMicroseconds: [UInt32] = []
        var blockedNanoseconds: [UInt32: UInt64] = [:]
    }
    private let state: Mutex<State>
    public let pageCount: Int
    /// The pages the destination lacked at the switch.
    public let total: Int

    public init(lacking: DirtyPageBitmap) {
        pageCount = lacking.pageCount
        total = lacking.count
        state = Mutex(State(lacking: lacking, remaining: lacking.count))
    }

    /// The set the map was built from, as the source sent it (the destination's own copy).
    public var remaining: Int { state.withLock { $0.remaining } }
    public var isComplete: Bool { remaining == 0 }

    /// Whether `page` still lacks its contents.
    public func lacks(_ page: Int) -> Bool { state.withLock { $0.lacking.contains(page) } }

    /// The pages still lacking (after a link failure: what the source must send again).
    public func lackingPages() -> DirtyPageBitmap { state.withLock { $0.lacking } }

    /// The pages asked for that have not landed (after a link failure: what the vCPUs wait on,
    /// to be asked for again over the new link), in page order.
    public func awaitedPages() -> [UInt64] { state.withLock { $0.waiting.keys.sorted().map { UInt64($0) } } }

    /// A thread faulted on `page` at `now` (monotonic nanoseconds).
    public func fault(page: Int, thread: UInt32, at now: UInt64) -> FaultAction {
        state.withLock { state in
            state.faults += 1
            guard page >= 0 && page < pageCount else { return .placeZero }
            if state.waiting[page] != nil {
                if state.waiting[page]!.threads[thread] == nil { state.waiting[page]!.threads[thread] = now }
                return .wait
            }
            guard state.lacking.contains(page) else {
                // Landed already, or never lacking: either way the page is final here. A page
                // that never lacked and is a hole was never written at the source.
                return .placeZero
            }
            state.waiting[page] = Waiting(since: now, threads: [thread: now])
            state.requested += 1
            return .request
        }
    }

    /// `page` has its contents (placed at `now`). Returns false when it had landed before (the
    /// caller placed nothing new: the kernel said the page was present).
    @discardableResult
    public func landed(page: Int, at now: UInt64) -> Bool {
        state.withLock { state in
            guard page >= 0 && page < pageCount, state.lacking.contains(page) else { return false }
            state.lacking.clear(page)
            state.remaining -= 1
            if let waiting = state.waiting.removeValue(forKey: page) {
                let waited = now >= waiting.since ? now - waiting.since : 0
                state.latenciesMicroseconds.append(UInt32(min(waited / 1000, UInt64(UInt32.max))))
                for (thread, since) in waiting.threads {
                    state.blockedNanoseconds[thread, default: 0] += now >= since ? now - since : 0
                }
            }
            return true
        }
    }

    /// The figures so far.
    public var figures: PostCopyFaultFigures {
        state.withLock { state in
            PostCopyFaultFigures(faults: state.faults, requested: state.requested,
                                 latenciesMicroseconds: state.latenciesMicroseconds,
                                 blockedNanosecondsByThread: state.blockedNanoseconds)
        }
    }
}

/// What demand faults cost the destination's guest.
public struct PostCopyFaultFigures: Sendable, Equatable {
    /// Faults the fault thread read (several threads faulting on one page count once each).
    public var faults: Int
    /// Pages asked of the source.
    public var requested: Int
    /// Per requested page: fault to landing, microseconds.
    public var latenciesMicroseconds: [UInt32]
    /// Per faulting thread: the time it waited for pages.
    public var blockedNanosecondsByThread: [UInt32: UInt64]

    /// The latency below which `fraction` of the requested pages landed (nil without requests).
    public func latencyMicroseconds(percentile fraction: Double) -> UInt32? {
        guard !latenciesMicroseconds.isEmpty else { return nil }
        let sorted = latenciesMicroseconds.sorted()
        let index = min(sorted.count - 1, Int((Double(sorted.count) * fraction).rounded(.up)) - 1)
        return sorted[max(0, index)]
    }
}
