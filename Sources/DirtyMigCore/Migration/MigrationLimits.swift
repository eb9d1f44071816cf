import Synchronization

/// The limits of a migration that may change while it runs, as `virsh migrate-setspeed`,
/// `migrate-setmaxdowntime` and QMP's `migrate-set-parameters` change QEMU's: the bandwidth cap
/// and the downtime limit. The control thread changes them (`migrate-set`); the sending thread
/// reads them at each decision: the bandwidth limiter before every batch, the pre-copy rule
/// and the throttle after every pass. Every change is kept, with when, for the report.
public final class MigrationLimits: Sendable {
    public struct Values: Sendable, Equatable {
        /// Bytes per second; nil: unlimited.
        public var bandwidth: UInt64?
        public var downtimeSeconds: Double

        public init(bandwidth: UInt64?, downtimeSeconds: Double) {
            self.bandwidth = bandwidth
            self.downtimeSeconds = downtimeSeconds
        }

        public var json: JSONValue {
            ["bandwidth": bandwidth.map { .number($0) } ?? .null, "downtime_ms": .number(downtimeSeconds * 1000)]
        }
    }

    /// One change: when (seconds after the migration began, and the pass under way), and the
    /// limits before and after.
    public struct Change: Sendable, Equatable {
        public var seconds: Double
        public var pass: Int
        public var before: Values
        public var after: Values

        public var json: JSONValue {
            ["t_s": .number(seconds), "pass": .number(pass), "before": before.json, "after": after.json]
        }
    }

    /// The changes kept: a script that changes the limits every millisecond for a day must not
    /// grow the report without bound; the first ones and the last ones tell the story.
    static let maxChanges = 256

    private struct State {
        var values: Values
        var changes: [Change] = []
        var changesDropped = 0
    }

    private let state: Mutex<State>

    public init(_ values: Values) { state = Mutex(State(values: values)) }

    public var current: Values { state.withLock { $0.values } }
    public var bandwidth: UInt64? { current.bandwidth }
    public var downtimeSeconds: Double { current.downtimeSeconds }

    /// The changes so far, oldest first, and how many more were made than kept.
    public var changes: (kept: [Change], dropped: Int) { state.withLock { ($0.changes, $0.changesDropped) } }

    /// Changes what is given (`bandwidth`: nil leaves it, `.some(nil)` removes the cap) and
    /// returns the limits now in force. The values must have been checked
    /// (`MigrationOptions.checkedBandwidth`, `checkedDowntime`).
    @discardableResult
    public func change(bandwidth: UInt64?? = nil, downtimeSeconds: Double? = nil, atSeconds seconds: Double, pass: Int) -> Values {
        state.withLock { state in
            let before = state.values
            if let bandwidth { state.values.bandwidth = bandwidth }
            if let downtimeSeconds { state.values.downtimeSeconds = downtimeSeconds }
            if state.changes.count >= Self.maxChanges {
                // Keep the first half (how it began) and the latest (how it stands).
                state.changes.remove(at: Self.maxChanges / 2)
                state.changesDropped += 1
            }
            state.changes.append(Change(seconds: seconds, pass: pass, before: before, after: state.values))
            return state.values
        }
    }
}
