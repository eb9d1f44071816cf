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
        var failoverRequested = false
        var lostReason: String?
    }

    public let primary: String
    let options: StandbyOptions
    private let state = Mutex(State())
    private let failoverSignal = DispatchSemaphore(value: 0)
    /// Cuts the connection to the primary (an operator's failover while it still sends).
    private let cut: @Sendable () -> Void
    /// When the last byte came from the primary (monotonic ns): `last_heard_ms` counts from it,
    /// through the initial copy too.
    private let lastByte: @Sendable () -> UInt64

    init(primary: String, options: StandbyOptions, cut: @escaping @Sendable () -> Void,
         lastByte: @escaping @Sendable () -> UInt64) {
        self.primary = primary
        self.options = options
        self.cut = cut
        self.lastByte = lastByte
    }

    func committed(_ epoch: UInt64) {
        state.withLock { state in
            state.phase = .protecting
            state.committedEpoch = epoch
            state.checkpoints += 1
        }
    }

    var failoverRequested: Bool { state.withLock { $0.failoverRequested } }

    /// The `failover` command: take over from the last committed checkpoint now. Returns that
    /// checkpoint's epoch, or nil if there is none yet (nothing to take over).
    public func requestFailover() -> UInt64? {
        let epoch = state.withLock { state -> UInt64? in
            guard state.committedEpoch != nil else { return nil }
            state.failoverRequested = true
            return state.committedEpoch
        }
        guard epoch != nil else { return nil }
        cut()
        failoverSignal.signal()
        return epoch
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
