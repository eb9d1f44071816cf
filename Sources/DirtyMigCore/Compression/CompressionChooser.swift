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
    /// An exponential average of amounts and the time they took, kept apart: the rate is their
    /// quotient, so a batch that took long weighs as much as its time. (Averaging rates instead
    /// let the first batches, which went into an empty socket buffer at gigabytes a second,
    /// hide a 20 Mbit/s link for dozens of batches: auto compressed 3 of 13 batches there.)
    struct Average {
        private(set) var amount = 0.0
        private(set) var time = 0.0
        private(set) var samples = 0

        mutating func add(_ amount: Double, per time: Double) {
            if samples == 0 {
                self.amount = amount
                self.time = time
            } else {
                self.amount += (amount - self.amount) * CompressionChooser.weight
                self.time += (time - self.time) * CompressionChooser.weight
            }
            samples += 1
        }

        /// Amount per unit of time (nil before the first sample).
        var rate: Double? { samples == 0 ? nil : amount / max(time, 1e-12) }
    }

    /// Bytes of pages per second of compressing.
    private var compression = Average()
    /// Bytes of pages per byte on the wire, of the batches compressed (at least 1).
    private var shrinking = Average()
    /// Wire bytes per second of sending (the limiter's wait, if any, and the send itself).
    private var link = Average()
    /// No probe before this (monotonic ns).
    private var nextProbe: UInt64 = 0

    var compressBytesPerSecond: Double? { compression.rate }
    var ratio: Double? { shrinking.rate.map { max($0, 1) } }
    var linkBytesPerSecond: Double? { link.rate }

    /// The weight of the newest batch in each estimate.
    static let weight = 0.25
    /// At most this share of the time goes to probes while plain is chosen.
    static let probeShare = 1.0 / 64

    /// Compress the next batch? (`now`: monotonic ns.)
    func shouldCompress(now: UInt64) -> Bool {
        guard compressBytesPerSecond != nil, ratio != nil, linkBytesPerSecond != nil else { return true }
        return compressionPays || now >= nextProbe
    }

    /// Whether the measurements say compressing pays (without probes), for reports and tests.
    var compressionPays: Bool {
        guard let compress = compressBytesPerSecond, let ratio, let link = linkBytesPerSecond else { return false }
        return 1 / compress + 1 / (ratio * link) < 1 / link
    }

    /// A batch of `pageBytes` was compressed to `compressedBytes` (nil: it did not get smaller
    /// than the bound it was allowed) in `nanoseconds`, ending at `now`.
    mutating func compressed(pageBytes: Int, compressedBytes: Int?, nanoseconds: UInt64, now: UInt64) {
        compression.add(Double(pageBytes), per: Double(max(nanoseconds, 1)) / 1e9)
        shrinking.add(Double(pageBytes), per: Double(compressedBytes ?? pageBytes))
        if !compressionPays {
            // A probe (or a batch that did not pay): the next probe after enough plain time
            // that probes stay within their share.
            nextProbe = now + UInt64(Double(nanoseconds) / Self.probeShare)
        }
    }

    /// `wireBytes` went out in `nanoseconds` of sending.
    mutating func sent(wireBytes: Int, nanoseconds: UInt64) {
        guard wireBytes > 0 else { return }
        link.add(Double(wireBytes), per: Double(max(nanoseconds, 1)) / 1e9)
    }
}
