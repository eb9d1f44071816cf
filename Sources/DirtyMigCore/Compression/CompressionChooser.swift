/// `--compress auto`: whether the next page batch goes out compressed, from what the batches so
/// far measured on this host and this link. Compressing pays when the time it costs is less than
/// the wire time it saves. With `c` this host's compression rate (bytes of pages per second of
/// compressing), `r` the ratio and `l` the link's rate (wire bytes per second of sending), a
/// batch of `b` bytes takes `b / l` plain and at most `b / c + b / (r × l)` compressed
/// (compressing, then sending; the socket buffer usually overlaps the two, so this is the
/// pessimistic sum). Compress when the second is shorter, so that `auto` is never slower than
/// plain by its own measurements.
///
/// Each estimate follows its recent batches (an exponential average), so a guest whose memory
/// changes from text to random, or a link that slows down, moves the decision within a few
/// batches. While plain is chosen, the compression rate and ratio would go stale: a batch is
/// still compressed now and then as a probe, with at most `probeShare` of the elapsed time
/// spent on probes, so a fast link pays at most that much for staying informed.
struct CompressionChooser {
    /// Bytes of pages per second of compressing.
    private(set) var compressBytesPerSecond: Double?
    /// Bytes of pages per byte on the wire, of the batches compressed (at least 1).
    private(set) var ratio: Double?
    /// Wire bytes per second of sending (the limiter's wait, if any, and the send itself).
    private(set) var linkBytesPerSecond: Double?
    /// No probe before this (monotonic ns).
    private var nextProbe: UInt64 = 0

    /// The weight of the newest batch in each estimate.
    static let weight = 0.25
    /// At most this share of the time goes to probes while plain is chosen.
    static let probeShare = 1.0 / 64

    /// Compress the next batch? (`now`: monotonic ns.)
    func shouldCompress(now: UInt64) -> Bool {
        guard let compress = compressBytesPerSecond, let ratio, let link = linkBytesPerSecond else { return true }
        if 1 / compress + 1 / (ratio * link) < 1 / link { return true }
        return now >= nextProbe
    }

    /// Whether the measurements say compressing pays (without probes), for reports and tests.
    var compressionPays: Bool {
        guard let compress = compressBytesPerSecond, let ratio, let link = linkBytesPerSecond else { return false }
        return 1 / compress + 1 / (ratio * link) < 1 / link
    }

    /// A batch of `pageBytes` was compressed to `compressedBytes` (nil: it did not get smaller
    /// than the bound it was allowed) in `nanoseconds`, ending at `now`.
    mutating func compressed(pageBytes: Int, compressedBytes: Int?, nanoseconds: UInt64, now: UInt64) {
        let rate = Double(pageBytes) / max(Double(nanoseconds), 1) * 1e9
        compressBytesPerSecond = Self.average(compressBytesPerSecond, rate)
        let batchRatio = compressedBytes.map { Double(pageBytes) / Double(max($0, 1)) } ?? 1
        ratio = Self.average(ratio, max(1, batchRatio))
        if !compressionPays {
            // A probe (or a batch that did not pay): the next probe after enough plain time
            // that probes stay within their share.
            nextProbe = now + UInt64(Double(nanoseconds) / Self.probeShare)
        }
    }

    /// `wireBytes` went out in `nanoseconds` of sending.
    mutating func sent(wireBytes: Int, nanoseconds: UInt64) {
        guard wireBytes > 0 else { return }
        linkBytesPerSecond = Self.average(linkBytesPerSecond, Double(wireBytes) / max(Double(nanoseconds), 1) * 1e9)
    }

    private static func average(_ old: Double?, _ new: Double) -> Double {
        guard let old else { return new }
        return old + (new - old) * weight
    }
}
