import Synchronization

/// Whether a VM's post-copy link is up or paused, since when and why, and what the pauses cost:
/// what `query-status`, `list`, the progress line and the report show on either side. After the
/// switch a failed link pauses post-copy rather than failing it (the VM's memory is split
/// between the two hosts, so neither side may drop its half); the source resumes it.
public final class PostCopyLinkState: Sendable {
    private struct State {
        var pausedSince: (monotonic: UInt64, unix: Double)?
        var reason = ""
        var recoveries = 0
        var pausedNanoseconds: UInt64 = 0
        /// When each resume completed (monotonic ns), oldest first (at most `keptResumes`).
        var resumedAt: [UInt64] = []
    }
    private let state = Mutex(State())
    static let keptResumes = 64

    public init() {}

    /// The link failed (`reason`): post-copy is paused until `resumed`. A second failure while
    /// paused keeps the first's time and reason.
    public func paused(_ reason: String, at now: UInt64 = MonotonicClock.nanoseconds()) {
        state.withLock { state in
            guard state.pausedSince == nil else { return }
            state.pausedSince = (now, WallClock.unixSeconds())
            state.reason = reason
        }
    }

    /// Says more of the pause under way (the automatic attempts gave up; a by-hand one failed).
    public func explain(_ reason: String) {
        state.withLock { state in if state.pausedSince != nil { state.reason = reason } }
    }

    /// Post-copy runs again over a new link.
    public func resumed(at now: UInt64 = MonotonicClock.nanoseconds()) {
        state.withLock { state in
            guard let since = state.pausedSince else { return }
            state.pausedNanoseconds += now >= since.monotonic ? now - since.monotonic : 0
            state.pausedSince = nil
            state.recoveries += 1
            state.resumedAt.append(now)
            if state.resumedAt.count > Self.keptResumes { state.resumedAt.removeFirst() }
        }
    }

    public var isPaused: Bool { state.withLock { $0.pausedSince != nil } }

    /// How many times post-copy resumed after a pause.
    public var recoveries: Int { state.withLock { $0.recoveries } }

    /// When each resume completed (monotonic ns), oldest first.
    public var resumeTimes: [UInt64] { state.withLock { $0.resumedAt } }

    /// Paused time so far, the pause under way included.
    public func pausedSeconds(at now: UInt64 = MonotonicClock.nanoseconds()) -> Double {
        state.withLock { state in
            let current = state.pausedSince.map { now >= $0.monotonic ? now - $0.monotonic : 0 } ?? 0
            return Double(state.pausedNanoseconds + current) / 1e9
        }
    }

    /// The pause under way, if any: since when (Unix seconds), for how long, and why.
    public var pause: (sinceUnix: Double, seconds: Double, reason: String)? {
        let now = MonotonicClock.nanoseconds()
        return state.withLock { state in
            state.pausedSince.map { ($0.unix, Double(now >= $0.monotonic ? now - $0.monotonic : 0) / 1e9, state.reason) }
        }
    }

    /// `query-status`'s `postcopy` object (null before any pause: nothing to say).
    public var json: JSONValue {
        let pause = self.pause
        let (recoveries, total) = (self.recoveries, pausedSeconds())
        guard pause != nil || recoveries > 0 else { return .null }
        return [
            "state": .string(pause == nil ? "running" : "paused"),
            "paused_since": pause.map { .number($0.sinceUnix) } ?? .null,
            "paused_s": pause.map { .number($0.seconds) } ?? .null,
            "reason": pause.map { .string($0.reason) } ?? .null,
            "recoveries": .number(recoveries), "paused_total_s": .number(total),
        ]
    }

    /// The state a VM shows while its post-copy is paused.
    public static let pausedStateName = "post-copy paused"
}
