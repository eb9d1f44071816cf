/// What `migrate` is asked to do.
public struct MigrationOptions: Sendable {
    public var destination: HostPort
    /// Cap on bytes put on the wire per second; nil = unlimited.
    public var bandwidth: UInt64?
    /// Stop pre-copy once the expected downtime (dirty bytes ÷ measured bandwidth, plus verification)
    /// is below 85 % of this.
    public var downtimeSeconds: Double = 0.3
    public var maxIterations: Int = 30
    public var timeoutSeconds: Double?
    /// How long the link may carry nothing back before the migration fails (`--link-timeout`),
    /// on both sides: a shorter cut is ridden out, a longer one ends the migration with the VM
    /// running on here and the destination's copy discarded.
    public var linkTimeoutSeconds = Double(MigrationHello.defaultLinkTimeoutMilliseconds) / 1000
    public var verify = false
    /// How to slow a guest that dirties faster than the link carries (resolved against the
    /// VM's tracking mode when the migration starts).
    public var throttle: ThrottleMode = .auto
    /// How page batches travel (`--compress`).
    public var compression: PageCompression = .none
    /// dirty-quota: let vCPUs draw on the quota others leave unused (off only to measure what
    /// the pool is worth: the benchmark's equal split).
    public var quotaPool = true
    /// How the connection is protected (`--psk-file`, `--tls-dir`, `--insecure`); plaintext,
    /// loopback only, by default.
    public var security = ChannelSecurity.plain
    /// `--postcopy`: the migration may switch to post-copy (see PostCopyDecision); nil:
    /// pre-copy only, as without the option.
    public var postcopy: PostCopyPolicy?
    /// `--postcopy-recover-for`: how long a source whose post-copy link failed tries the
    /// destination again by itself; after it, only a by-hand resume (`migrate --resume`) does,
    /// and the source keeps its pages meanwhile.
    public var postcopyRecoverSeconds = MigrationOptions.defaultPostcopyRecoverSeconds
    public static let defaultPostcopyRecoverSeconds = 600.0

    public init(destination: HostPort) { self.destination = destination }

    // The ranges every number must be in, wherever it comes from (the command line or the
    // control socket): one place decides, so both refuse the same values with the same words.
    // Out of range, a value used to trap converting to an integer and take the VM down with it.
    public static let bandwidthRange: ClosedRange<Double> = 4096...Double(1 << 40)
    public static let downtimeRange: ClosedRange<Double> = 0.001...600
    public static let maxIterationsRange: ClosedRange<Double> = 1...1_000_000
    public static let timeoutRange: ClosedRange<Double> = 0.001...(30 * 86_400)
    public static let linkTimeoutRange: ClosedRange<Double> = 1...3600
    public static let postcopyRecoverRange: ClosedRange<Double> = 0...(30 * 86_400)

    /// Why a value is out of range, in words that name the option both ways it can be given.
    public enum Invalid: Error, Equatable, CustomStringConvertible {
        case bandwidth, downtime, maxIterations, timeout, linkTimeout, postcopyRecover

        public var description: String {
            switch self {
            case .bandwidth: return "bandwidth must be from 4096 bytes/s (--bandwidth 4K) to 1 TiB/s"
            case .downtime: return "downtime must be from 1 ms to 600 s (--downtime 1ms to 10m, downtime_ms 1 to 600000)"
            case .maxIterations: return "max_iterations must be a whole number from 1 to 1000000"
            case .timeout: return "timeout must be from 1 ms to 30 days (--timeout 1ms to 43200m, timeout_s up to 2592000)"
            case .linkTimeout: return "link timeout must be from 1 s to 1 hour (--link-timeout 1s to 60m, link_timeout_s 1 to 3600)"
            case .postcopyRecover: return "post-copy recovery must be from 0 s to 30 days (--postcopy-recover-for 0s to 43200m, postcopy_recover_s 0 to 2592000)"
            }
        }
    }

    /// A bandwidth cap in bytes/s, checked: a whole number in `bandwidthRange`.
    public static func checkedBandwidth(_ bandwidth: Double) throws(Invalid) -> UInt64 {
        guard bandwidthRange.contains(bandwidth), bandwidth == bandwidth.rounded(.down) else { throw .bandwidth }
        return UInt64(bandwidth)
    }

    /// A downtime limit in seconds, checked against `downtimeRange`.
    public static func checkedDowntime(_ seconds: Double) throws(Invalid) -> Double {
        guard downtimeRange.contains(seconds) else { throw .downtime }
        return seconds
    }

    /// Checks and sets each value given (nil: leave as it is). NaN and infinities are out of range.
    public mutating func set(bandwidth: Double? = nil, downtimeSeconds: Double? = nil, maxIterations: Double? = nil,
                             timeoutSeconds: Double? = nil, linkTimeoutSeconds: Double? = nil,
                             postcopyRecoverSeconds: Double? = nil) throws(Invalid) {
        if let bandwidth { self.bandwidth = try Self.checkedBandwidth(bandwidth) }
        if let downtimeSeconds { self.downtimeSeconds = try Self.checkedDowntime(downtimeSeconds) }
        if let maxIterations {
            guard Self.maxIterationsRange.contains(maxIterations), maxIterations == maxIterations.rounded(.down) else {
                throw .maxIterations
            }
            self.maxIterations = Int(maxIterations)
        }
        if let timeoutSeconds {
            guard Self.timeoutRange.contains(timeoutSeconds) else { throw .timeout }
            self.timeoutSeconds = timeoutSeconds
        }
        if let linkTimeoutSeconds {
            guard Self.linkTimeoutRange.contains(linkTimeoutSeconds) else { throw .linkTimeout }
            self.linkTimeoutSeconds = linkTimeoutSeconds
        }
        if let postcopyRecoverSeconds {
            guard Self.postcopyRecoverRange.contains(postcopyRecoverSeconds) else { throw .postcopyRecover }
            self.postcopyRecoverSeconds = postcopyRecoverSeconds
        }
    }
}

/// One pre-copy pass, as `--stats` writes it.
public struct MigrationPass: Sendable {
    public var iteration: Int
    public var timeSeconds: Double
    public var bytesSent: UInt64
    public var pagesSent: UInt64
    /// Pages dirtied while this pass was being sent (what the next pass must send).
    public var pagesDirtied: UInt64
    public var dirtyPagesPerSecond: Double
    public var bandwidthBytesPerSecond: Double
    public var expectedDowntimeSeconds: Double
    /// The tracker lost dirty information during the pass (a ring overrun): everything was resent.
    public var trackingLost: Bool
    /// The throttle as it stood at the end of the pass.
    public var throttle: ThrottleLevel? = nil

    public var json: JSONValue {
        [
            "iteration": .number(iteration), "time_s": .number(timeSeconds), "bytes_sent": .number(bytesSent),
            "pages_sent": .number(pagesSent), "pages_dirtied": .number(pagesDirtied),
            "dirty_pages_s": .number(dirtyPagesPerSecond), "bandwidth_mib_s": .number(bandwidthBytesPerSecond / 1_048_576),
            "expected_downtime_ms": .number(expectedDowntimeSeconds * 1000), "tracking_lost": .bool(trackingLost),
            "throttle": throttle?.json ?? .null,
        ]
    }
}

/// Live progress: what `query-migrate` (and so `migrate --status`, `list` and the progress
/// line) shows. A figure not measured yet is nil (null in the JSON), never 0: the expected
/// downtime is known only once a pass has ended and its dirty pages were counted.
public struct MigrationProgress: Sendable {
    /// starting, connecting, pre-copy, stop-and-copy (or, with --postcopy, switching to
    /// post-copy, post-copy and post-copy paused), completed, failed.
    public var phase: String = "starting"
    public var destination = ""
    public var iteration = 0
    public var sentBytes: UInt64 = 0
    /// The page data those bytes carried, before compression (data pages x 4 KiB, the
    /// batches' headers and zero pages left out): with `sentBytes`, the ratio `--compress`
    /// achieves so far.
    public var sentPageBytes: UInt64 = 0
    /// Of `sentBytes`, what the link has not carried yet: still in the socket's queue, or
    /// unacknowledged (0 when unknown). The forecast adds the time it takes to drain.
    public var queuedWireBytes: UInt64 = 0
    public var remainingPages: UInt64 = 0
    /// The pages the pass under way carries (with `remainingPages`, how far it is).
    public var passPages: UInt64 = 0
    /// Over about the last 100 ms (MigrationTimeline), from its first sample on.
    public var throughputBytesPerSecond: Double?
    public var dirtyPagesPerSecond: Double?
    public var expectedDowntimeSeconds: Double?
    /// The throttle as it stood at its last judgement (nil: no pass judged yet).
    public var throttle: ThrottleLevel?
    /// The limits in force now (they may change while the migration runs: `migrate-set`).
    public var limits: MigrationLimits.Values?
    /// How many times the limits were changed.
    public var limitChanges = 0
    /// Since the migration began, as of this reading.
    public var elapsedSeconds: Double = 0
    /// When the pass under way began (seconds since the migration began).
    public var passStartedSeconds: Double = 0
    /// `sentBytes` when the pass under way (or post-copy's stream) began.
    public var passStartSentBytes: UInt64 = 0
    /// The link's rate over the last completed pass (nil until pass 1 has ended).
    public var lastPassBandwidthBytesPerSecond: Double?
    /// Pre-copy stops once a pass leaves at most this many seconds' worth at the link's rate
    /// (the downtime target less the pause's fixed costs, as its last decision counted them).
    public var stopBelowSeconds: Double = 0
    /// Passes the pass limit still allows after the one under way.
    public var passesLeft = 0
    /// While post-copy is paused: its link's state (`PostCopyLinkState.json`); after a pause,
    /// how many there were and how long they lasted. Null before any.
    public var postcopyLink: JSONValue = .null

    public init() {}

    /// How long the migration has left, from the end of its first pass on (nil before, or
    /// while the guest dirties as fast as the link carries: see PreCopyForecast).
    /// In pass 1, once it has run a second, the link's rate is what it carried over the last
    /// second, and the forecast needs the dirty rate measured already (ring and quota tracking
    /// count it as it goes; the bitmap only when the pass ends): a link-bound first pass is most
    /// of a migration's time, and a forecast only after it would come too late to help.
    public var forecast: PreCopyForecast {
        let passElapsed = elapsedSeconds - passStartedSeconds
        var bandwidth = lastPassBandwidthBytesPerSecond
        if bandwidth == nil && passElapsed >= 1 && dirtyPagesPerSecond != nil { bandwidth = pageRate }
        return PreCopyForecast(bandwidthBytesPerSecond: bandwidth,
                               dirtyBytesPerSecond: (dirtyPagesPerSecond ?? 0) * 4096,
                               remainingBytes: Double(remainingPages) * 4096,
                               passElapsedSeconds: passElapsed,
                               stopBelowBytes: max(stopBelowSeconds, 0) * (bandwidth ?? 0), passesLeft: passesLeft)
    }

    /// Wire bytes the link carried per second over the pass under way (handed to the socket,
    /// less what it still holds), once the pass has run a second; nil before. The last second's
    /// throughput moves in whole batches: 5 or 6 batches of 2 MiB a second at 100 Mbit/s read
    /// 10 or 12 MiB/s, and the forecast was 15 % long.
    public var passWireBytesPerSecond: Double? {
        let passElapsed = elapsedSeconds - passStartedSeconds
        guard passElapsed >= 1 else { return nil }
        let carried = Double(sentBytes &- passStartSentBytes) - Double(queuedWireBytes)
        return carried > 0 ? carried / passElapsed : nil
    }

    /// The pass's wire rate, or in its first second the last second's.
    private var wireRate: Double? { passWireBytesPerSecond ?? throughputBytesPerSecond }

    /// Page bytes moved per second: the wire rate times the compression ratio so far (1 without
    /// --compress). What is left is counted in pages, so this, not the wire's rate, divides it.
    var pageRate: Double? {
        wireRate.map { $0 * max(1, Double(sentPageBytes) / Double(max(sentBytes, 1))) }
    }

    /// Seconds left, while the migration copies memory (nil otherwise, or when unknown).
    public var etaSeconds: Double? {
        // What the socket still holds goes out at the link's rate after what the forecast
        // counts: measured at 100 Mbit/s with zstd, a forecast without it said -92 % at 90 % of
        // the way (the queue held the last second's compressed pages), plain -18 %.
        let draining = wireRate.map { $0 > 0 ? Double(queuedWireBytes) / $0 : 0 } ?? 0
        if phase == "post-copy" {   // no more passes: what is left, at the rate it goes out
            guard let throughput = pageRate, throughput > 0 else { return nil }
            return Double(remainingPages) * 4096 / throughput + draining
        }
        guard phase == "pre-copy" || phase == "stop-and-copy" else { return nil }
        return forecast.secondsLeft.map { $0 + draining }
    }

    /// Whether a migration in `phase` (as `query-migrate` says it; "none" when there is none)
    /// is under way: not ended, nor absent.
    public static func isUnderWay(phase: String?) -> Bool {
        guard let phase else { return false }
        return !["none", "completed", "failed"].contains(phase)
    }

    /// The share of the pass under way that was sent, in percent (nil before a pass began).
    public var passPercent: Double? {
        guard passPages > 0, phase == "pre-copy" || phase == "stop-and-copy" else { return nil }
        return Double(passPages - min(remainingPages, passPages)) / Double(passPages) * 100
    }

    public var json: JSONValue {
        [
            "phase": .string(phase), "destination": .string(destination), "iteration": .number(iteration),
            "sent_bytes": .number(sentBytes), "queued_bytes": .number(queuedWireBytes), "remaining_pages": .number(remainingPages),
            "remaining_bytes": .number(remainingPages * 4096), "pass_pages": .number(passPages),
            "pass_percent": passPercent.map { .number($0) } ?? .null,
            "postcopy_link": postcopyLink,
            "throughput_mib_s": throughputBytesPerSecond.map { .number($0 / 1_048_576) } ?? .null,
            "dirty_pages_s": dirtyPagesPerSecond.map { .number($0) } ?? .null,
            "expected_downtime_ms": expectedDowntimeSeconds.map { .number($0 * 1000) } ?? .null,
            "throttle": throttle?.json ?? .null,
            "bandwidth_limit": limits.map { $0.bandwidth.map { .number($0) } ?? .null } ?? .null,
            "downtime_limit_ms": limits.map { .number($0.downtimeSeconds * 1000) } ?? .null,
            "limit_changes": .number(limitChanges),
            "elapsed_s": .number(elapsedSeconds),
            "eta_s": etaSeconds.map { .number($0) } ?? .null,
        ]
    }
}

/// The end of a migration, as `migrate` reports it.
public struct MigrationReport: Sendable {
    public var completed = false
    public var error: String?
    public var totalSeconds: Double = 0
    /// Until the handshake was done (nil: it never was, and no pass began).
    public var setupSeconds: Double?
    /// Meaningful only when `downtimeMeasured`: the destination said the VM runs there (or
    /// that it could not) after a pause.
    public var downtimeSeconds: Double = 0
    public var downtimeMeasured = false
    /// The pre-copy passes completed (`passCutShort` is the one a failure cut mid-way, if any).
    public var iterations = 0
    public var passCutShort: Int?
    public var transferredBytes: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var normalPages: UInt64 = 0
    public var dirtyPagesPerSecond: Double = 0
    public var verify = "off"
    /// All hashing for --verify: the destination's as pages landed, and both sides' at the pause.
    public var verifySeconds: Double = 0
    /// The part of it in the downtime: the source hashing all of RAM at the pause point.
    public var verifyPauseSeconds: Double = 0
    /// What the pre-copy rule expected verification to add to the downtime.
    public var verifyEstimateSeconds: Double = 0
    public var track: TrackingMode?
    public var ringOverruns: UInt64 = 0
    public var destination: String = ""
    public var guestPagesPerSecondBefore: [Double] = []
    public var guestPagesPerSecondDuring: [Double] = []
    /// Whether the guest's pace before the migration could be measured (it needs a history of
    /// at least a few hundred ms); "during" is measured only once pre-copy began.
    public var guestPaceBeforeMeasured = true
    public var passes: [MigrationPass] = []
    public var throttle = ThrottleReport()
    /// `--downtime`: the limit the pre-copy rule aimed under.
    public var downtimeLimitSeconds: Double = 0
    /// Where the downtime went (nil until the VM was paused).
    public var downtimeParts: DowntimeParts?
    /// Samples about every 100 ms, for `--plot` and scripts.
    public var timeline: [MigrationSample] = []
    /// What the connection was: encrypted or not, cipher, the peer's identity (nil if none was made).
    public var channel: ChannelDescription?
    /// What compression did (`--compress`).
    public var compression = CompressionReport(mode: .none)
    /// The limits changed while the migration ran (`migrate --set`), when, and from what to
    /// what; and how many changes more were made than kept.
    public var limitChanges: [MigrationLimits.Change] = []
    public var limitChangesDropped = 0
    /// The post-copy phase, when the migration switched to it.
    public var postcopy: PostCopyReport?

    public init() {}

    /// How far the downtime went past `--downtime`, if it did.
    public var downtimeExceededSeconds: Double? {
        downtimeMeasured && downtimeSeconds > downtimeLimitSeconds ? downtimeSeconds - downtimeLimitSeconds : nil
    }

    public var throughputMiBPerSecond: Double {
        totalSeconds > 0 ? Double(transferredBytes) / 1_048_576 / totalSeconds : 0
    }

    /// Whether pre-copy began (the handshake was done): before it, no pass, rate or ring
    /// figure was measured.
    public var preCopyBegan: Bool { setupSeconds != nil }

    /// A figure that was not measured is null, not 0 (a zero reads as data).
    public var json: JSONValue {
        let vcpus: [JSONValue] = guestPagesPerSecondBefore.indices.map { index in
            [
                "id": .number(index),
                "guest_pages_s_before": guestPaceBeforeMeasured ? .number(guestPagesPerSecondBefore[index]) : .null,
                "guest_pages_s_during": preCopyBegan && index < guestPagesPerSecondDuring.count
                    ? .number(guestPagesPerSecondDuring[index]) : .null,
            ]
        }
        return [
            "status": .string(completed ? "completed" : "failed"),
            "error": error.map { .string($0) } ?? .null,
            "destination": .string(destination),
            "channel": channel?.json ?? .null,
            "compression": compression.json,
            "total_ms": .number(totalSeconds * 1000), "setup_ms": setupSeconds.map { .number($0 * 1000) } ?? .null,
            "downtime_ms": downtimeMeasured ? .number(downtimeSeconds * 1000) : .null,
            "iterations": preCopyBegan ? .number(iterations) : .null,
            "pass_cut_short": passCutShort.map { .number($0) } ?? .null,
            "transferred_bytes": .number(transferredBytes),
            "zero_pages": preCopyBegan ? .number(zeroPages) : .null,
            "normal_pages": preCopyBegan ? .number(normalPages) : .null,
            "throughput_mib_s": transferredBytes > 0 && totalSeconds > 0 ? .number(throughputMiBPerSecond) : .null,
            "dirty_pages_s": passes.isEmpty ? .null : .number(dirtyPagesPerSecond), "verify": .string(verify),
            "verify_ms": .number(verifySeconds * 1000), "verify_pause_ms": .number(verifyPauseSeconds * 1000),
            "verify_estimate_ms": .number(verifyEstimateSeconds * 1000),
            "track": track.map { .string($0.rawValue) } ?? .null,
            "ring_overruns": preCopyBegan ? .number(ringOverruns) : .null,
            "vcpus": .array(vcpus),
            "throttle": throttle.json,
            "downtime_limit_ms": .number(downtimeLimitSeconds * 1000),
            "downtime_exceeded_ms": downtimeExceededSeconds.map { .number($0 * 1000) } ?? .null,
            "downtime_parts": downtimeParts?.json ?? .null,
            "passes": .array(passes.map(\.json)),
            "timeline": .array(timeline.map(\.json)),
            "limit_changes": .array(limitChanges.map(\.json)),
            "limit_changes_dropped": .number(limitChangesDropped),
            "postcopy": postcopy?.json ?? .null,
        ]
    }
}

/// Where a migration's downtime went, from pausing the source's vCPUs to the destination's word
/// that the VM runs there. The parts add up to the downtime.
public struct DowntimeParts: Sendable, Equatable {
    /// Taking every vCPU out of the guest (kick, wait for its exit to complete).
    public var pauseSeconds: Double = 0
    /// Collecting the last dirty pages, sending them, and the destination's acknowledgement.
    public var lastPagesSeconds: Double = 0
    /// Saving every vCPU's and the devices' state, and sending it.
    public var stateSeconds: Double = 0
    /// --verify: hashing all of RAM at the source.
    public var verifySeconds: Double = 0
    /// At the destination: comparing digests, restoring the state, starting the vCPUs.
    public var destinationSeconds: Double = 0
    /// The rest: the final round trip and scheduling.
    public var otherSeconds: Double = 0

    public init() {}

    public var json: JSONValue {
        [
            "pause_ms": .number(pauseSeconds * 1000), "last_pages_ms": .number(lastPagesSeconds * 1000),
            "state_ms": .number(stateSeconds * 1000), "verify_ms": .number(verifySeconds * 1000),
            "destination_ms": .number(destinationSeconds * 1000), "other_ms": .number(otherSeconds * 1000),
        ]
    }
}

/// One point of a migration's timeline.
public struct MigrationSample: Sendable, Equatable {
    public var seconds: Double
    public var phase: String
    public var pass: Int
    public var sentBytes: UInt64
    public var remainingBytes: UInt64
    public var throughputMiBPerSecond: Double
    public var dirtyPagesPerSecond: Double?
    public var expectedDowntimeSeconds: Double?
    /// Auto-converge's setting: the share of time every vCPU is held (0: off).
    public var cpuThrottlePercent: Int
    /// Each vCPU's share of the time since the sample before that it spent held by a throttle
    /// (auto-converge, a dirty limit or a dirty quota), percent.
    public var heldPercent: [Double]
    public var paused: Bool

    /// How hard the throttle holds the guest: auto-converge's setting, or the share of time the
    /// most held vCPU was held, whichever is more.
    public var throttlePercent: Double { max(Double(cpuThrottlePercent), heldPercent.max() ?? 0) }

    public var json: JSONValue {
        [
            "t_s": .number(seconds), "phase": .string(phase), "pass": .number(pass), "sent_bytes": .number(sentBytes),
            "remaining_bytes": .number(remainingBytes), "throughput_mib_s": .number(throughputMiBPerSecond),
            "dirty_pages_s": dirtyPagesPerSecond.map { .number($0) } ?? .null,
            "expected_downtime_ms": expectedDowntimeSeconds.map { .number($0 * 1000) } ?? .null,
            "throttle_percent": .number(throttlePercent), "cpu_throttle_percent": .number(cpuThrottlePercent),
            "held_percent": .array(heldPercent.map { .number($0) }), "paused": .bool(paused),
        ]
    }
}
