/// `--compress auto`: whether the next page batch goes out compressed, from what the batches so
/// far measured on this host and this link. With `c` this host's compression rate (bytes of
/// pages per second of compressing), `r` the ratio and `l` the link's rate (wire bytes per second
/// of sending), a batch of `b` bytes takes `b / l` plain. Compressed, it takes the longer of
/// `b / c` and `b / (r × l)`: the next batch is compressed on its own thread while this one is on
/// the wire (CompressionWorker). So compressing pays when this host compresses faster than the
/// link carries and the pages shrink, by a margin (`margin`) that keeps noise near the crossover
/// from choosing the slower way; then `auto` is never slower than plain by its own measurements.
///
/// (The rule was once the sum `b / c + b / (r × l)`, compressing on the sending thread: at
/// 1 Gbit/s, where zstd here runs at about twice the link, it sent almost every batch plain.)
///
/// Each estimate follows its recent batches (an exponential average), so a guest whose memory
/// changes from text to random, or a link that slows down, moves the decision within a few
/// batches. While plain is chosen, the compression rate and ratio would go stale: now and then a
/// sample of a plain batch (`sampleBytes`) is compressed on the worker as the batch goes out
/// plain, to measure, with at most `probeShare` of the elapsed time spent on samples. A sample
/// delays no batch; it costs only the worker's CPU. The first batch is such a sample too, so a
/// fast link never waits for a whole batch to be compressed to learn that it should not be.
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

    /// Bytes of pages per second of compressing (whole batches and samples).
    private var compression = Average()
    /// Bytes of pages per byte on the wire, of the batches and samples compressed (at least 1).
    private var shrinking = Average()
    /// Wire bytes per second of sending (the limiter's wait, if any, and the send itself).
    private var link = Average()
    /// No sample before this (monotonic ns).
    private var nextSample: UInt64 = 0

    var compressBytesPerSecond: Double? { compression.rate }
    var ratio: Double? { shrinking.rate.map { max($0, 1) } }
    var linkBytesPerSecond: Double? { link.rate }

    /// The weight of the newest batch in each estimate.
    static let weight = 0.25
    /// At most this share of the time goes to samples while plain is chosen.
    static let probeShare = 1.0 / 64
    /// What a sample compresses: the first 256 KiB of a batch's data pages (an eighth of a full
    /// batch), enough for zstd's rate and ratio, about 1 ms of compressing here.
    static let sampleBytes = 256 << 10
    /// The first batches each carry a sample, whatever the time: the very first compression
    /// runs cold (its buffers and zstd's tables not yet touched) and measured slow, and with it
    /// alone the next sample came 64 times its duration later, seven batches at 1 Gbit/s.
    static let warmUpSamples = 4
    /// Compress only when the measurements say it is at least this much faster.
    static let margin = 1.1

    /// What to do with the next batch.
    enum Plan: Equatable {
        case plain
        /// Plain, and compress a sample of it to measure.
        case plainWithSample
        case compressed
    }

    /// The next batch's plan (`now`: monotonic ns).
    func plan(now: UInt64) -> Plan {
        if compressionPays { return .compressed }
        if compression.samples < Self.warmUpSamples || now >= nextSample { return .plainWithSample }
        return .plain
    }

    /// Whether the measurements say compressing pays, for reports and tests.
    var compressionPays: Bool {
        guard let compress = compressBytesPerSecond, let ratio, let link = linkBytesPerSecond else { return false }
        return max(1 / compress, 1 / (ratio * link)) * Self.margin < 1 / link
    }

    /// `pageBytes` (a whole batch, or a sample) were compressed to `compressedBytes` (nil: not
    /// smaller than the bound allowed) in `nanoseconds`, measured at `now`.
    mutating func compressed(pageBytes: Int, compressedBytes: Int?, nanoseconds: UInt64, now: UInt64) {
        compression.add(Double(pageBytes), per: Double(max(nanoseconds, 1)) / 1e9)
        shrinking.add(Double(pageBytes), per: Double(compressedBytes ?? pageBytes))
        if !compressionPays {
            // The next sample after enough time that samples stay within their share.
            nextSample = now + UInt64(Double(nanoseconds) / Self.probeShare)
        }
    }

    /// `wireBytes` went out in `nanoseconds` of sending.
    mutating func sent(wireBytes: Int, nanoseconds: UInt64) {
        guard wireBytes > 0 else { return }
        link.add(Double(wireBytes), per: Double(max(nanoseconds, 1)) / 1e9)
    }
}
