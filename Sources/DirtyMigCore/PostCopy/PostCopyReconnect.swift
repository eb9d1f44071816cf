import Foundation

/// When a source whose post-copy link failed tries the destination again, and where.
///
/// Automatically: at once, then after back-off delays from `firstDelaySeconds` doubling to
/// `maxDelaySeconds`, for `--postcopy-recover-for` from the failure. The cap is what bounds the
/// time from the link's return to the resume: an attempt starts at most `maxDelaySeconds` after
/// the last one began, and one whose packets vanish gives up after `attemptSeconds`, so the
/// first attempt after the link is back starts within about half a second of it.
///
/// By hand (`migrate --resume`, the `migrate-resume` command): the next attempt starts at once,
/// at a new address if one is given, and the automatic window opens again from there. Once the
/// window has closed nothing is tried until asked by hand: the source keeps its pages (the only
/// copy of what the destination lacks) for as long as it runs.
final class PostCopyReconnect: @unchecked Sendable {
    // @unchecked: `condition` guards `state`.
    static let firstDelaySeconds = 0.05
    static let maxDelaySeconds = 0.5
    /// One attempt's connect and TLS handshake, on a link that may drop every packet.
    static let attemptSeconds = 0.5
    /// An attempt that connected but whose TLS handshake ran out of time had a slow link, not a
    /// dead one: the next gets twice as long, up to this.
    static let longestAttemptSeconds = 5.0

    private let condition = NSCondition()
    private struct State {
        var endpoint: HostPort
        /// A by-hand request not yet taken by the reconnect loop.
        var asked = false
        /// When the automatic attempts stop (monotonic ns).
        var windowEnds: UInt64 = 0
        var delaySeconds = PostCopyReconnect.firstDelaySeconds
        var attemptSeconds = PostCopyReconnect.attemptSeconds
        var nextAttempt: UInt64 = 0
        var attempts = 0
        var lastError: String?
        /// Whether the window's close was reported (`waitForAttempt`'s `windowClosed`).
        var closeReported = false
    }
    private var state: State
    let recoverSeconds: Double

    init(endpoint: HostPort, recoverSeconds: Double) {
        state = State(endpoint: endpoint)
        self.recoverSeconds = recoverSeconds
    }

    /// The link failed at `now`: the automatic window opens, the first attempt is due at once.
    func linkFailed(at now: UInt64 = MonotonicClock.nanoseconds()) {
        condition.lock(); defer { condition.unlock() }
        state.windowEnds = now + UInt64(recoverSeconds * 1e9)
        state.delaySeconds = Self.firstDelaySeconds
        state.attemptSeconds = Self.attemptSeconds
        state.nextAttempt = now
        state.lastError = nil
        state.closeReported = false
    }

    /// A by-hand request: try now (at `endpoint`, from here on, if given).
    func askNow(endpoint: HostPort?) {
        condition.lock()
        if let endpoint { state.endpoint = endpoint }
        state.asked = true
        condition.broadcast()
        condition.unlock()
    }

    /// Where the next attempt goes.
    var endpoint: HostPort {
        condition.lock(); defer { condition.unlock() }
        return state.endpoint
    }

    /// Whether the automatic window has closed (only a by-hand request resumes now).
    var windowClosed: Bool {
        condition.lock(); defer { condition.unlock() }
        return !state.asked && MonotonicClock.nanoseconds() >= state.windowEnds
    }

    /// Attempts made since the migration began.
    var attempts: Int {
        condition.lock(); defer { condition.unlock() }
        return state.attempts
    }

    /// Waits until the next attempt is due (or asked for by hand; once the window has closed,
    /// only that), then returns where it goes and how long it may take to connect.
    /// `windowClosed` is called once when the window closes with no attempt having succeeded
    /// (with the last attempt's error), before the wait for a by-hand request.
    func waitForAttempt(windowClosed: (String?) -> Void) -> (endpoint: HostPort, timeoutSeconds: Double) {
        condition.lock(); defer { condition.unlock() }
        while true {
            if state.asked {
                // By hand: now, and the automatic window opens again from here.
                state.asked = false
                let now = MonotonicClock.nanoseconds()
                state.windowEnds = max(state.windowEnds, now + UInt64(recoverSeconds * 1e9))
                state.delaySeconds = Self.firstDelaySeconds
                state.closeReported = false
                break
            }
            let now = MonotonicClock.nanoseconds()
            if now >= state.windowEnds {
                if !state.closeReported {
                    state.closeReported = true
                    let lastError = state.lastError
                    condition.unlock()
                    windowClosed(lastError)
                    condition.lock()
                    continue
                }
                condition.wait()
                continue
            }
            if now >= state.nextAttempt { break }
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(min(state.nextAttempt, state.windowEnds) - now) / 1e9))
        }
        let now = MonotonicClock.nanoseconds()
        state.attempts += 1
        // The next one starts `delay` after this one began (a failed attempt that took longer
        // is followed at once), the delay doubling up to the cap.
        state.nextAttempt = now + UInt64(state.delaySeconds * 1e9)
        state.delaySeconds = min(state.delaySeconds * 2, Self.maxDelaySeconds)
        return (state.endpoint, state.attemptSeconds)
    }

    /// The attempt failed with `error`; `slowHandshake`: it connected but its TLS handshake ran
    /// out of time.
    func attemptFailed(_ error: String, slowHandshake: Bool) {
        condition.lock(); defer { condition.unlock() }
        state.lastError = error
        if slowHandshake { state.attemptSeconds = min(state.attemptSeconds * 2, Self.longestAttemptSeconds) }
    }
}
