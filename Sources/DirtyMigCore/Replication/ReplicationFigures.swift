/// The last `capacity` values of a figure (pause per checkpoint, dirty pages per checkpoint,
/// output delay), for medians and tails over a recent window rather than a whole run.
struct RecentSamples {
    let capacity: Int
    private var values: [Double] = []
    private var next = 0

    init(capacity: Int = 4096) { self.capacity = capacity }

    mutating func add(_ value: Double) {
        if values.count < capacity { values.append(value) } else { values[next] = value }
        next = (next + 1) % capacity
    }

    var isEmpty: Bool { values.isEmpty }
    var count: Int { values.count }
    var maximum: Double { values.max() ?? 0 }

    /// The nearest-rank percentile (0...100) of the window; 0 when empty.
    func percentile(_ p: Double) -> Double {
        positionOfPercentile(p).map { values[$0] } ?? 0
    }

    /// Where in the window the nearest-rank percentile lies: windows filled in lockstep (a
    /// pause and its parts) give, at the same position, the rest of that sample.
    func positionOfPercentile(_ p: Double) -> Int? {
        guard !values.isEmpty else { return nil }
        let order = values.indices.sorted { values[$0] < values[$1] }
        let rank = Int((p / 100 * Double(order.count)).rounded(.up)) - 1
        return order[min(max(rank, 0), order.count - 1)]
    }

    /// The value at a position `positionOfPercentile` gave (of this window or one filled in lockstep).
    func value(at position: Int) -> Double { position < values.count ? values[position] : 0 }
}

/// Events with a time and a running total (acknowledged checkpoints, bytes sent), for rates
/// over the last second, or, when events are sparser than that (a checkpoint that takes seconds
/// to cross a slow link), over the span back to the event before the newest (at most
/// `longestWindowNanoseconds`): a one-second window then read 0 between checkpoints.
struct RateWindow {
    private var points: [(time: UInt64, amount: Double)] = []
    private(set) var total: Double = 0

    static let windowNanoseconds: UInt64 = 1_000_000_000
    static let longestWindowNanoseconds: UInt64 = 10_000_000_000

    mutating func add(_ amount: Double, at time: UInt64) {
        total += amount
        points.append((time, amount))
        // Keep what the longest window can need, and always the two newest events.
        let stale = points.dropLast(2).prefix { time - $0.time > Self.longestWindowNanoseconds }.count
        if stale > 0 { points.removeFirst(stale) }
    }

    /// Per second up to `now`, over the window described above.
    func perSecond(now: UInt64) -> Double {
        var window = Self.windowNanoseconds
        if points.count >= 2 {
            let previous = points[points.count - 2].time
            if now > previous { window = min(max(window, now - previous), Self.longestWindowNanoseconds) }
        }
        let start = now > window ? now - window : 0
        let amount = points.reduce(0.0) { $1.time > start && $1.time <= now ? $0 + $1.amount : $0 }
        return amount / (Double(window) / 1e9)
    }
}

/// Where a replication stands, and what it has cost so far.
public struct ReplicationFigures: Sendable {
    public enum Status: String, Sendable {
        /// Connected, copying the VM for the first time: not protected yet.
        case starting
        /// The standby holds a recent checkpoint and takes over if this host dies.
        case protected
        /// The standby was lost (or never reached): the VM runs on here, unprotected.
        case unprotected
        /// Stopped on request; the standby discarded its copy (`endConfirmed` says it did).
        case stopped
        /// The standby took over (it heard nothing from here, and resumed the VM): the VM runs
        /// there; this copy is stale and its output is stopped.
        case superseded
    }

    public var status: Status = .starting
    public var standby: String
    public var track: TrackingMode?
    public var error: String?
    public var intervalSeconds: Double
    /// The epochs' median length: `intervalSeconds`, or longer where an epoch waited for the
    /// acknowledgement of the checkpoint before it (a link slower than the guest dirties memory);
    /// nil before two checkpoints.
    public var effectiveIntervalMedianMs: Double?
    public var checkpointPages: Int?
    /// Until the handshake was done; nil: it never was.
    public var setupSeconds: Double?
    /// The initial copy, once it was done (nil before: its bytes are not a figure yet either).
    public var initialSeconds: Double?
    public var initialBytes: UInt64 = 0
    public var checkpointsSent: UInt64 = 0
    public var checkpointsAcknowledged: UInt64 = 0
    public var lastAcknowledgedEpoch: UInt64?
    /// After a stop: whether the standby confirmed it discarded its copy (nil: no stop yet).
    public var endConfirmed: Bool?
    /// The checkpoint the standby resumed the VM from, once it took over.
    public var supersededAtEpoch: UInt64?
    /// `--reprotect-for`; while unprotected and seeking the standby again, how long it goes on
    /// (nil otherwise); how many times the VM was protected again.
    public var reprotectForSeconds = 0.0
    public var reprotectSecondsLeft: Double?
    public var reprotections: UInt64 = 0
    /// Of those, how many sent only the pages changed since the checkpoint the standby held.
    public var reprotectDeltas: UInt64 = 0
    /// The last re-protection: what it sent and how long it took.
    public var lastReprotect: ReprotectFigures?
    /// Rates over the last second, measured only while protected (0 there otherwise, null in the JSON).
    public var checkpointsPerSecond = 0.0
    public var bytesPerSecond = 0.0
    /// How many checkpoints the pause and dirty-page figures are from, and how many released
    /// lines the output delays: with none, those figures were not measured (null in the JSON).
    public var pauseSamples = 0
    public var outputDelaySamples = 0
    public var bytesSent: UInt64 = 0
    public var pauseMedianMs = 0.0, pauseP99Ms = 0.0, pauseMaxMs = 0.0
    /// Each part's own median (stop_vcpus, collect, copy, state, resume): medians of parts do
    /// not add up to the median pause, so the table shows `medianPauseParts`.
    public var pausePartsMedianMs: [(String, Double)] = []
    /// The parts of the checkpoint whose pause was the median (resume follows the pause: it is
    /// what waking the vCPU threads costs the primary's thread after they are let in).
    public var medianPauseParts: [(String, Double)] = []
    public var dirtyPagesMedian = 0.0, dirtyPagesMax = 0.0
    /// Of a checkpoint's pages, those copied while the vCPUs were paused (the rest were staged
    /// while the epoch ran).
    public var pagesCopiedPausedMedian = 0.0
    public var outputDelayMedianMs = 0.0, outputDelayP99Ms = 0.0
    public var outputLinesReleased: UInt64 = 0
    public var outputLinesHeld = 0
    public var ringOverruns: UInt64 = 0
    public var resyncs: UInt64 = 0
    public var uptimeSeconds = 0.0
    /// The channel to the standby: encrypted or not, cipher, who the standby proved to be.
    public var channel: ChannelDescription?
    /// What compression did to the initial copy and the checkpoints (`--compress`).
    public var compression = CompressionReport(mode: .none)

    public var lagCheckpoints: UInt64 { checkpointsSent - min(checkpointsSent, checkpointsAcknowledged) }

    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("status", .string(status.rawValue)),
            ("standby", .string(standby)),
            ("track", track.map { .string($0.rawValue) } ?? .null),
            ("checkpoint_interval_ms", .number(intervalSeconds * 1000)),
            ("effective_interval_ms", effectiveIntervalMedianMs.map { .number($0) } ?? .null),
            ("checkpoint_pages", checkpointPages.map { .number($0) } ?? .null),
            ("setup_ms", setupSeconds.map { .number($0 * 1000) } ?? .null),
            ("initial_copy_ms", initialSeconds.map { .number($0 * 1000) } ?? .null),
            ("initial_copy_bytes", initialSeconds == nil ? .null : .number(initialBytes)),
            ("checkpoints", .number(checkpointsAcknowledged)),
            ("checkpoints_sent", .number(checkpointsSent)),
            ("last_epoch", lastAcknowledgedEpoch.map { .number($0) } ?? .null),
            ("checkpoints_per_s", status == .protected ? .number(checkpointsPerSecond) : .null),
            ("pause_ms", pauseSamples == 0 ? ["median": .null, "p99": .null, "max": .null]
                : ["median": .number(pauseMedianMs), "p99": .number(pauseP99Ms), "max": .number(pauseMaxMs)]),
            ("pause_parts_ms", .object(pauseSamples == 0 ? [] : pausePartsMedianMs.map { ($0.0, .number($0.1)) })),
            ("median_pause_parts_ms", .object(pauseSamples == 0 ? [] : medianPauseParts.map { ($0.0, .number($0.1)) })),
            ("dirty_pages", pauseSamples == 0 ? ["median": .null, "max": .null, "copied_paused_median": .null]
                : ["median": .number(dirtyPagesMedian), "max": .number(dirtyPagesMax),
                   "copied_paused_median": .number(pagesCopiedPausedMedian)]),
            ("bytes_per_s", status == .protected ? .number(bytesPerSecond) : .null),
            ("bytes_sent", .number(bytesSent)),
            ("output_delay_ms", outputDelaySamples == 0 ? ["median": .null, "p99": .null]
                : ["median": .number(outputDelayMedianMs), "p99": .number(outputDelayP99Ms)]),
            ("output_lines_released", .number(outputLinesReleased)),
            ("output_lines_held", .number(outputLinesHeld)),
            ("lag_checkpoints", .number(lagCheckpoints)),
            ("ring_overruns", .number(ringOverruns)),
            ("compression", compression.json),
            ("resyncs", .number(resyncs)),
            ("uptime_s", .number(uptimeSeconds)),
        ]
        pairs.append(("end_confirmed", endConfirmed.map { .bool($0) } ?? .null))
        pairs.append(("standby_took_over_at_epoch", supersededAtEpoch.map { .number($0) } ?? .null))
        pairs.append(("reprotect_for_s", .number(reprotectForSeconds)))
        pairs.append(("reprotect_s_left", reprotectSecondsLeft.map { .number($0) } ?? .null))
        pairs.append(("reprotections", .number(reprotections)))
        pairs.append(("reprotect_deltas", .number(reprotectDeltas)))
        pairs.append(("last_reprotect", lastReprotect?.json ?? .null))
        pairs.append(("channel", channel?.json ?? .null))
        pairs.append(("error", error.map { .string($0) } ?? .null))
        return .object(pairs)
    }
}

/// One re-protection: a delta (only the pages changed since the checkpoint the standby still
/// held) or the whole VM (and why), what crossed the link until the standby held a first
/// checkpoint again, and how long that took from the dial.
public struct ReprotectFigures: Sendable, Equatable {
    public var delta: Bool
    public var fullBecause: String?
    public var heldEpoch: UInt64?
    public var pages: UInt64
    public var bytes: UInt64
    public var seconds: Double

    public var json: JSONValue {
        [
            "kind": .string(delta ? "delta" : "full"),
            "full_because": fullBecause.map { .string($0) } ?? .null,
            "standby_held_epoch": heldEpoch.map { .number($0) } ?? .null,
            "pages": .number(pages),
            "bytes": .number(bytes),
            "ms": .number(seconds * 1000),
        ]
    }

    /// For the log line.
    var summary: String {
        let what = delta ? "only what changed since checkpoint \(heldEpoch ?? 0) was sent" : "the whole VM was sent (\(fullBecause ?? "no checkpoint held"))"
        return String(format: "%@: %llu pages, %@ in %.0f ms", what, pages, ByteSize.format(bytes), seconds * 1000)
    }
}

/// The steps of a checkpoint's pause, in order.
enum PausePart: Int, CaseIterable {
    case stopVCPUs, collect, copy, state, resume

    var name: String {
        switch self {
        case .stopVCPUs: return "stop_vcpus"
        case .collect: return "collect"
        case .copy: return "copy"
        case .state: return "state"
        case .resume: return "resume"
        }
    }
}
