import Synchronization

/// What the guest sends to the outside world (its output port), and when it may leave.
///
/// Normally a line leaves (reaches the sink) as soon as the guest emits it. Under replication it
/// is held (output commit, as in Remus): a line emitted during epoch N leaves only once the
/// standby has acknowledged checkpoint N, the first state of the VM that includes having emitted
/// it. If the primary dies, the standby resumes from the last acknowledged checkpoint, so
/// nothing the outside saw is ever taken back, and what the primary held dies with it and is
/// produced again by the standby's guest.
///
/// A vCPU emits a line from its own thread while it is out of KVM_RUN; `endEpoch` runs while
/// every vCPU is paused, so each line falls on one side of an epoch boundary exactly.
public final class GuestOutput: Sendable {
    private struct Held {
        var epoch: UInt64
        var line: String
        var emitted: UInt64
    }

    private struct State {
        var sink: (@Sendable (String) -> Void)?
        var holding = false
        /// Another copy of this VM runs elsewhere (its standby took over): nothing leaves here.
        var fenced = false
        /// Why, in words (`query-status` gives it).
        var fenceReason: String?
        /// The epoch that lines emitted now belong to.
        var epoch: UInt64 = 0
        var held: [Held] = []
        /// Lines emitted with no sink set (nobody was listening).
        var dropped: UInt64 = 0
        var released: UInt64 = 0
        /// Announcements on the output port that were not the announcing vCPU's own record.
        var refused: UInt64 = 0
        /// Emit-to-release delays of held lines, in nanoseconds, since last taken.
        var delays: [UInt64] = []
    }

    /// Beyond this many held lines the oldest are dropped (and counted): a standby that stops
    /// acknowledging is declared lost long before (see Replicator), so this only bounds memory.
    static let maxHeld = 1 << 16

    private let state = Mutex(State())

    public init() {}

    /// Where released lines go, in order (nil: nowhere; they are counted as dropped).
    public func setSink(_ sink: (@Sendable (String) -> Void)?) {
        state.withLock { $0.sink = sink }
    }

    /// Called on the vCPU's thread for each line the guest emits.
    public func emit(vcpu: Int, line: String) {
        let now = MonotonicClock.nanoseconds()
        // The sink runs under the lock: lines leave in the order they were emitted, also when a
        // release of held lines races a vCPU emitting after `stopHolding`.
        state.withLock { state in
            if state.fenced { state.dropped += 1; return }
            if state.holding {
                if state.held.count >= Self.maxHeld { state.held.removeFirst(); state.dropped += 1 }
                state.held.append(Held(epoch: state.epoch, line: line, emitted: now))
                return
            }
            guard let sink = state.sink else { state.dropped += 1; return }
            state.released += 1
            sink(line)
        }
    }

    /// An announcement on the output port that was not the announcing vCPU's own record (a
    /// wrong vCPU id in the port's dword or in the record): ignored, and counted.
    func refuse() {
        state.withLock { $0.refused += 1 }
    }

    /// From now on lines are held until `release(through:)`. Returns the epoch they fall in.
    @discardableResult
    public func startHolding() -> UInt64 {
        state.withLock { state in
            state.holding = true
            return state.epoch
        }
    }

    /// Closes the current epoch (call it with every vCPU paused, as the checkpoint is taken) and
    /// returns its number: the lines emitted in it leave when its checkpoint is acknowledged.
    public func endEpoch() -> UInt64 {
        state.withLock { state in
            defer { state.epoch += 1 }
            return state.epoch
        }
    }

    /// The standby has checkpoint `epoch`: every line emitted up to its end may leave.
    public func release(through epoch: UInt64) {
        let now = MonotonicClock.nanoseconds()
        state.withLock { state in
            let count = state.held.prefix { $0.epoch <= epoch }.count
            guard count > 0, !state.fenced else { return }
            let leaving = state.held.prefix(count)
            state.held.removeFirst(count)
            state.delays.append(contentsOf: leaving.map { now - $0.emitted })
            if state.delays.count > 1 << 16 { state.delays.removeFirst(state.delays.count - (1 << 16)) }
            guard let sink = state.sink else { state.dropped += UInt64(count); return }
            state.released += UInt64(count)
            for held in leaving { sink(held.line) }
        }
    }

    /// Replication ended (stopped, or the standby was lost): what is held leaves now, and later
    /// lines leave at once. With no standby there is nobody to wait for.
    public func stopHolding() {
        let epoch = state.withLock { state -> UInt64 in
            state.holding = false
            return state.epoch
        }
        release(through: epoch)
    }

    /// The standby took over this VM and runs it now: this copy is stale, and its outside world
    /// must see one VM only. What is held is dropped (the standby's guest produces it again
    /// from its checkpoint) and nothing this copy emits leaves any more.
    public func fence(because reason: String) {
        state.withLock { state in
            state.fenced = true
            state.fenceReason = reason
            state.holding = false
            state.dropped += UInt64(state.held.count)
            state.held.removeAll()
        }
    }

    public var isFenced: Bool { state.withLock { $0.fenced } }
    /// Why the output was fenced, once it was.
    public var fenceReason: String? { state.withLock { $0.fenceReason } }

    /// Emit-to-release delays (ns) of held lines since the last call.
    public func takeDelays() -> [UInt64] {
        state.withLock { state in
            defer { state.delays.removeAll() }
            return state.delays
        }
    }

    public var heldCount: Int { state.withLock { $0.held.count } }
    public var releasedCount: UInt64 { state.withLock { $0.released } }
    public var droppedCount: UInt64 { state.withLock { $0.dropped } }
    public var refusedCount: UInt64 { state.withLock { $0.refused } }
}
