import Foundation
import Synchronization

/// How a standby takes over (`receive --standby`).
public struct StandbyOptions: Sendable {
    public enum Failover: String, Sendable, CaseIterable {
        /// Resume the VM as soon as the primary is gone.
        case auto
        /// Wait for the `failover` command (an operator, or a third party, decides).
        case manual
    }

    public var failover: Failover = .auto
    /// No byte from the primary for this long (once protecting) means it is gone.
    public var failoverAfterSeconds: Double = 0.5

    public static let failoverAfterRange: ClosedRange<Double> = 0.05...60

    public init(failover: Failover = .auto, failoverAfterSeconds: Double = 0.5) {
        self.failover = failover
        self.failoverAfterSeconds = failoverAfterSeconds
    }

    /// How often the primary must send something: a fifth of --failover-after, so that a
    /// heartbeat or two lost to scheduling does not look like a dead primary.
    var heartbeatMilliseconds: UInt32 { UInt32(max(5, failoverAfterSeconds * 1000 / 5)) }
}

/// One replication as the standby sees it: where it stands (for `query-status`), and the
/// operator's `failover`.
public final class StandbySession: Sendable {
    public enum Phase: String, Sendable {
        case initialCopy = "initial copy"
        case protecting = "protecting"
        case awaitingFailover = "primary lost, awaiting failover"
        case takingOver = "taking over"
    }

    private struct State {
        var phase = Phase.initialCopy
        var committedEpoch: UInt64?
        var checkpoints: UInt64 = 0
        /// Why the standby takes over on request (nil: not requested).
        var failoverRequest: String?
        var lostReason: String?
    }

    public let primary: String
    let options: StandbyOptions
    private let state = Mutex(State())
    private let failoverSignal = DispatchSemaphore(value: 0)
    /// When the last byte came from the primary (monotonic ns): `last_heard_ms` counts from it,
    /// through the initial copy too.
    private let lastByte: @Sendable () -> UInt64

    init(primary: String, options: StandbyOptions, lastByte: @escaping @Sendable () -> UInt64) {
        self.primary = primary
        self.options = options
        self.lastByte = lastByte
    }

    /// Applies checkpoint `epoch` (`apply`) and makes it the committed one, unless a failover
    /// was requested first: the two exclude each other, so the checkpoint `failover` names is
    /// the one the VM resumes from. Returns false, with nothing applied, after a request.
    func commit(_ epoch: UInt64, applying apply: () throws(MigrationError) -> Void) throws(MigrationError) -> Bool {
        try state.withLock { (state: inout State) throws(MigrationError) -> Bool in
            guard state.failoverRequest == nil else { return false }
            try apply()
            state.phase = .protecting
            state.committedEpoch = epoch
            state.checkpoints += 1
            return true
        }
    }

    var failoverRequested: Bool { state.withLock { $0.failoverRequest != nil } }
    /// Why the standby takes over on request, once it was requested.
    var failoverRequest: String? { state.withLock { $0.failoverRequest } }

    /// Why `failover` did not take effect.
    public enum FailoverRefusal: Error, Equatable, CustomStringConvertible {
        /// The initial copy is under way: there is nothing to resume.
        case noCheckpoint
        /// The primary was heard from this many milliseconds ago, within --failover-after: it
        /// runs the VM, and a takeover now would run a second copy.
        case primaryAlive(heardMillisecondsAgo: Double)

        public var description: String {
            switch self {
            case .noCheckpoint:
                return "this standby holds no checkpoint yet (the initial copy is under way): there is nothing to resume"
            case .primaryAlive(let milliseconds):
                return String(format: "the primary was heard from %.0f ms ago: it runs the VM, and a failover now would run a second copy of it; stop the primary first ('dirtymig stop' on its host), or pass --force to take over anyway (the primary is then told, and its output stops)", milliseconds)
            }
        }
    }

    /// What a `failover` that took effect resumes: the committed checkpoint, and how long ago
    /// the primary was heard from when it was forced past a live primary (nil: it was not).
    public struct FailoverGranted: Sendable {
        public var epoch: UInt64
        public var primaryHeardMillisecondsAgo: Double?
    }

    /// The `failover` command: take over from the last committed checkpoint now. Refused while
    /// the primary is heard from (a byte within --failover-after, while protecting) unless
    /// `force`: an operator who thinks the primary is gone, while it is not, would otherwise
    /// start a second copy of the VM unawares. A forced takeover tells the primary, which
    /// stops its copy's output (Replicator's `superseded`).
    public func requestFailover(force: Bool) throws(FailoverRefusal) -> FailoverGranted {
        let now = MonotonicClock.nanoseconds(), heard = lastByte()
        let silenceMilliseconds = Double(now > heard ? now - heard : 0) / 1e6
        let outcome = state.withLock { state -> Result<FailoverGranted, FailoverRefusal> in
            guard let epoch = state.committedEpoch else { return .failure(.noCheckpoint) }
            let alive = state.phase == .protecting && silenceMilliseconds < options.failoverAfterSeconds * 1000
            if alive && !force { return .failure(.primaryAlive(heardMillisecondsAgo: silenceMilliseconds)) }
            if state.failoverRequest == nil {
                state.failoverRequest = alive
                    ? String(format: "'dirtymig failover --force' while the primary was heard from %.0f ms before", silenceMilliseconds)
                    : "'dirtymig failover'"
            }
            return .success(FailoverGranted(epoch: epoch, primaryHeardMillisecondsAgo: alive ? silenceMilliseconds : nil))
        }
        let granted = try outcome.get()
        failoverSignal.signal()
        return granted
    }

    /// Wakes a standby waiting for `failover` because the receiver is stopping.
    func wake() { failoverSignal.signal() }

    /// Manual mode, primary gone: waits until `failover` (true) or until `stopping()` (false).
    func awaitFailover(reason: String, stopping: () -> Bool) -> Bool {
        state.withLock { $0.phase = .awaitingFailover; $0.lostReason = reason }
        while true {
            if failoverRequested { return true }
            if stopping() { return false }
            _ = failoverSignal.wait(timeout: .now() + 0.2)
        }
    }

    func takingOver() { state.withLock { $0.phase = .takingOver } }

    public var json: JSONValue {
        let now = MonotonicClock.nanoseconds(), heard = lastByte()
        return state.withLock { state in
            [
                "primary": .string(primary),
                "phase": .string(state.phase.rawValue),
                "failover": .string(options.failover.rawValue),
                "failover_after_ms": .number(options.failoverAfterSeconds * 1000),
                "checkpoints": .number(state.checkpoints),
                "committed_epoch": state.committedEpoch.map { .number($0) } ?? .null,
                "last_heard_ms": .number(Double(now > heard ? now - heard : 0) / 1e6),
                "primary_lost": state.lostReason.map { .string($0) } ?? .null,
            ]
        }
    }
}
