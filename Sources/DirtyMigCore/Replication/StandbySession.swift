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
        /// The primary came back on a new connection (a replication that resumes): the old one
        /// is dropped, and the pages changed since the committed checkpoint are coming.
        case resyncing = "resyncing"
        case takingOver = "taking over"
    }

    private struct State {
        var phase = Phase.initialCopy
        var committedEpoch: UInt64?
        var checkpoints: UInt64 = 0
        /// Why the standby takes over on request (nil: not requested).
        var failoverRequest: String?
        var lostReason: String?
        /// The connection the replication follows now: a resume drops it.
        var following: (any MigrationConnection)?
        /// A resume accepted and not yet taken by the replication's thread.
        var resume: StandbyResume?
        /// The replication's thread has ended: nothing more is accepted.
        var ended = false
        /// A checkpoint was refused here: the last good one is kept for an operator's `failover`.
        var heldForOperator = false
        var resumes: UInt64 = 0
        /// When the last byte came from the primary (monotonic ns), on the connection followed.
        var lastByte: @Sendable () -> UInt64
    }

    public let primary: String
    /// The replication this standby follows (the primary's session id, the same in every hello
    /// of one replication, reconnections included).
    public let replication: SessionID
    /// The VM's RAM and vCPUs, as its first hello announced them: a resume must announce the same.
    let memorySize: UInt64
    let vcpuCount: Int
    let options: StandbyOptions
    private let state: Mutex<State>
    private let failoverSignal = DispatchSemaphore(value: 0)

    /// `lastByte`: when the last byte came from the primary (monotonic ns): `last_heard_ms`
    /// counts from it, through the initial copy too.
    init(primary: String, replication: SessionID = .random(), memorySize: UInt64 = 0, vcpuCount: Int = 0,
         options: StandbyOptions, lastByte: @escaping @Sendable () -> UInt64) {
        self.primary = primary
        self.replication = replication
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.options = options
        state = Mutex(State(lastByte: lastByte))
    }

    private func lastByte() -> UInt64 { state.withLock { $0.lastByte }() }

    /// The replication follows `connection` now (the first one, or a resume's).
    func follow(_ connection: any MigrationConnection) {
        state.withLock { state in
            state.following = connection
            state.lastByte = { connection.tcp.lastReceivedNanoseconds }
        }
    }

    /// A primary greets this standby again as the replication it follows (a new connection,
    /// after the old one fell silent or the primary judged it lost): accepted only while a
    /// committed checkpoint is held and nothing decided to take over (protecting, or waiting for
    /// `failover`). Accepted, the old connection is shut (the replication's thread, blocked on
    /// it or waiting for `failover`, wakes and takes the resume, never taking over), and the
    /// epoch held is returned for the hello reply. Excludes a takeover as `commit` excludes a
    /// failover request: whichever comes first under the lock wins.
    func acceptResume(_ resume: StandbyResume) -> Result<UInt64, ResumeRefusal> {
        let outcome = state.withLock { state -> Result<UInt64, ResumeRefusal> in
            if state.ended { return .failure(.nothingHeld("the replication it followed has ended here")) }
            switch state.phase {
            case .initialCopy:
                return .failure(.nothingHeld("its initial copy is under way: it holds no checkpoint yet"))
            case .resyncing:
                // A resync the primary gave up on (it greets us anew): its connection is dead
                // weight, and the copy is torn. Dropped; the primary starts afresh.
                state.following?.shutdown()
                return .failure(.nothingHeld("a resync of it was under way, so its copy is torn and is being discarded"))
            case .takingOver:
                return .failure(.tookOver(epoch: state.committedEpoch ?? 0))
            case .protecting, .awaitingFailover:
                if state.heldForOperator {
                    return .failure(.keptForOperator(epoch: state.committedEpoch ?? 0))
                }
                guard state.failoverRequest == nil else { return .failure(.tookOver(epoch: state.committedEpoch ?? 0)) }
                guard let epoch = state.committedEpoch else { return .failure(.nothingHeld("it holds no checkpoint")) }
                state.phase = .resyncing
                state.lostReason = nil
                state.resume = resume
                state.resumes += 1
                state.following?.shutdown()
                return .success(epoch)
            }
        }
        if case .success = outcome { failoverSignal.signal() }
        return outcome
    }

    /// The resume accepted (by `acceptResume`), once: the replication's thread takes it over.
    func takeResume() -> StandbyResume? {
        state.withLock { state in
            defer { state.resume = nil }
            return state.resume
        }
    }

    /// The replication's thread ends: a resume accepted but not taken is closed.
    func end() {
        state.withLock { state in
            state.ended = true
            state.resume?.connection.shutdown()
            state.resume = nil
        }
    }

    /// Why a resume was refused.
    enum ResumeRefusal: Error {
        /// No checkpoint of the replication is held here (the reason says why).
        case nothingHeld(String)
        /// This standby took over (or is taking over) from checkpoint `epoch`.
        case tookOver(epoch: UInt64)
        /// It refused a checkpoint and keeps checkpoint `epoch` for an operator's `failover`.
        case keptForOperator(epoch: UInt64)
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
            state.lostReason = nil
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
        /// The primary came back and is sending what changed: the copy is torn until the
        /// resync's first checkpoint, and the primary lives.
        case resyncing
        /// The primary was heard from this many milliseconds ago, within --failover-after: it
        /// runs the VM, and a takeover now would run a second copy.
        case primaryAlive(heardMillisecondsAgo: Double)

        public var description: String {
            switch self {
            case .noCheckpoint:
                return "this standby holds no checkpoint yet (the initial copy is under way): there is nothing to resume"
            case .resyncing:
                return "the primary came back and this standby is taking the pages that changed meanwhile: its copy is incomplete until the resync's first checkpoint, and the primary runs the VM; stop the primary first ('dirtymig stop' on its host) if it must not"
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
            if state.phase == .resyncing { return .failure(.resyncing) }
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

    enum Wait { case failover, stopping, resumed }

    /// Manual mode, primary gone: waits until `failover`, until `stopping()`, or until the
    /// primary comes back (a resume was accepted: the primary lives, nothing is taken over).
    /// `heldForOperator`: this side refused a checkpoint and keeps the last good one for an
    /// operator: a resume is refused then (a resync would replace the copy kept on purpose).
    func awaitFailover(reason: String, heldForOperator: Bool = false, stopping: () -> Bool) -> Wait {
        let resumed = state.withLock { state -> Bool in
            guard state.phase != .resyncing else { return true }
            state.phase = .awaitingFailover
            state.lostReason = reason
            state.heldForOperator = heldForOperator
            return false
        }
        if resumed { return .resumed }
        while true {
            let (requested, resumed) = state.withLock { ($0.failoverRequest != nil, $0.phase == .resyncing) }
            if requested { return .failover }
            if resumed { return .resumed }
            if stopping() { return .stopping }
            _ = failoverSignal.wait(timeout: .now() + 0.2)
        }
    }

    /// Decides the takeover, unless a resume came first (false: the primary lives; take the
    /// resume instead).
    func takingOver() -> Bool {
        state.withLock { state in
            guard state.phase != .resyncing else { return false }
            state.phase = .takingOver
            return true
        }
    }

    public var json: JSONValue {
        let now = MonotonicClock.nanoseconds(), heard = lastByte()
        return state.withLock { state in
            [
                "primary": .string(primary),
                "phase": .string(state.phase.rawValue),
                "failover": .string(options.failover.rawValue),
                "failover_after_ms": .number(options.failoverAfterSeconds * 1000),
                "checkpoints": .number(state.checkpoints),
                "resumes": .number(state.resumes),
                "committed_epoch": state.committedEpoch.map { .number($0) } ?? .null,
                "last_heard_ms": .number(Double(now > heard ? now - heard : 0) / 1e6),
                "primary_lost": state.lostReason.map { .string($0) } ?? .null,
            ]
        }
    }
}
