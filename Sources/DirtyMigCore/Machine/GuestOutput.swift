import Synchronization

/// The guest's output stream: the lines check vCPUs emit (GuestOutputLine, one per OUT to
/// GuestLayout.outputPort), released in order to a sink (`--guest-output FILE`).
///
/// Today every line is released as it is emitted. Output commit (continuous replication) will
/// hold lines until the checkpoint that produced them is acknowledged, so that nobody outside
/// sees output the standby could not reproduce; every release goes through `deliver`.
public final class GuestOutput: Sendable {
    private struct State {
        var sink: (@Sendable (String) -> Void)?
        var emitted: UInt64 = 0
        var dropped: UInt64 = 0
        var refused: UInt64 = 0
    }

    private let state = Mutex(State())

    public init() {}

    /// Where released lines go from now on (nil: nowhere; they are dropped and counted). The
    /// sink is called with this object's lock held, in release order, so it must not call back
    /// into it; it should be quick (one write(2) of one line).
    public func setSink(_ sink: (@Sendable (String) -> Void)?) {
        state.withLock { $0.sink = sink }
    }

    /// A line from `vcpu`'s thread, while that vCPU waits in its exit on the output port.
    public func emit(vcpu: Int, line: String) {
        state.withLock { state in
            state.emitted += 1
            deliver([line], in: &state)
        }
    }

    /// An announcement on the output port that was not the announcing vCPU's own record (a
    /// wrong vCPU id in the port's dword or in the record): ignored, and counted.
    func refuse() {
        state.withLock { $0.refused += 1 }
    }

    /// Lines emitted so far; of them, dropped because no sink was set; and announcements refused.
    public var counts: (emitted: UInt64, dropped: UInt64, refused: UInt64) {
        state.withLock { ($0.emitted, $0.dropped, $0.refused) }
    }

    /// Releases lines to the sink, in order. Called under the lock: a line one vCPU emitted
    /// never overtakes one another vCPU emitted before it.
    private func deliver(_ lines: [String], in state: inout State) {
        guard let sink = state.sink else {
            state.dropped += UInt64(lines.count)
            return
        }
        for line in lines { sink(line) }
    }
}
