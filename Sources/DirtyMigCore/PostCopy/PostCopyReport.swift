/// The post-copy phase of a migration, as the report, `--json` and `--stats` give it. Figures
/// the destination measures (faults, latency, blocked time) come with its final word; without
/// that word they are null, not zero.
public struct PostCopyReport: Sendable, Equatable {
    /// Why the migration switched (PostCopyDecision's words).
    public var reason: String
    /// The pre-copy passes before the switch.
    public var afterPasses: Int
    /// From the start of the migration.
    public var switchedAtSeconds: Double
    /// Pages the destination lacked at the switch (never received, or dirtied since).
    public var lackingPages: Int
    /// Before the pause: the destination dropping its stale copies of the pages dirtied so far
    /// (`postcopyPrepare`, a round trip while the guest still ran here).
    public var prepareSeconds: Double = 0
    /// Pages the destination asked for, those answered on the faults connection (the rest were
    /// on their way already), and those pushed by the background stream.
    public var requestedPages = 0
    public var answeredPages = 0
    public var pushedPages = 0
    /// Pages sent again after a link failure, because the destination still lacked them (they
    /// were in flight); counted in answered and pushed too.
    public var resentPages = 0
    /// How many times the link failed and post-copy resumed, and how long it stayed paused.
    public var recoveries = 0
    public var pausedSeconds: Double = 0
    public var bytes: UInt64 = 0
    /// From the destination's "running" to its final word.
    public var seconds: Double = 0
    /// The destination's figures, once it gave its word.
    public var destination: PostCopyDestinationFigures?

    public init(reason: String, afterPasses: Int, switchedAtSeconds: Double, lackingPages: Int) {
        self.reason = reason
        self.afterPasses = afterPasses
        self.switchedAtSeconds = switchedAtSeconds
        self.lackingPages = lackingPages
    }

    public var json: JSONValue {
        [
            "reason": .string(reason), "after_passes": .number(afterPasses),
            "switched_at_ms": .number(switchedAtSeconds * 1000), "prepare_ms": .number(prepareSeconds * 1000),
            "lacking_pages": .number(lackingPages),
            "requested_pages": .number(requestedPages), "answered_pages": .number(answeredPages),
            "pushed_pages": .number(pushedPages), "resent_pages": .number(resentPages),
            "recoveries": .number(recoveries), "paused_ms": .number(pausedSeconds * 1000),
            "bytes": .number(bytes), "ms": .number(seconds * 1000),
            "faults": destination.map { .number($0.faults) } ?? .null,
            "fault_latency_us": destination.map {
                ["p50": .number($0.latencyP50Microseconds), "p99": .number($0.latencyP99Microseconds),
                 "max": .number($0.latencyMaxMicroseconds)]
            } ?? .null,
            "vcpu_blocked_ms": destination.map { .array($0.vcpuBlockedSeconds.map { .number($0 * 1000) }) } ?? .null,
        ]
    }
}

/// What the demand faults cost the destination's guest.
public struct PostCopyDestinationFigures: Sendable, Equatable {
    public var faults: UInt64
    public var latencyP50Microseconds: UInt32
    public var latencyP99Microseconds: UInt32
    public var latencyMaxMicroseconds: UInt32
    public var vcpuBlockedSeconds: [Double]

    init(_ result: PostCopyResult) {
        faults = result.faults
        latencyP50Microseconds = result.latencyP50Microseconds
        latencyP99Microseconds = result.latencyP99Microseconds
        latencyMaxMicroseconds = result.latencyMaxMicroseconds
        vcpuBlockedSeconds = result.vcpuBlockedNanoseconds.map { Double($0) / 1e9 }
    }
}
