import Foundation

/// `migrate --postcopy`: when the migration may switch to post-copy.
public struct PostCopyPolicy: Sendable, Equatable {
    /// `--postcopy-after N`: switch after N pre-copy passes whatever the pre-copy rule says
    /// (unless pre-copy met --downtime first). nil: switch when pre-copy will not meet --downtime.
    public var afterPasses: Int?

    public init(afterPasses: Int? = nil) { self.afterPasses = afterPasses }

    /// What `--postcopy-after` accepts.
    public static let afterPassesRange: ClosedRange<Int> = 1...1_000
}

/// Whether to switch to post-copy at the end of a pre-copy pass, and why, in words for the
/// report. Pre-copy that meets --downtime ends as it always has (stop and copy is the cheaper
/// end: nothing is left to fetch); otherwise the switch comes when asked by hand, after
/// `--postcopy-after` passes, or when the passes cannot shrink the pause enough: each pass leaves
/// `dirty rate ÷ bandwidth` of the one before, so at a rate near the bandwidth they never will,
/// and below it they need log(expected ÷ target) ÷ log(bandwidth ÷ rate) more passes.
public enum PostCopyDecision {
    /// At or above this share of the bandwidth, a pass leaves as much as it sent.
    static let hopelessShare = 0.9

    public static func reason(policy: PostCopyPolicy, pass: Int, expectedSeconds: Double, targetSeconds: Double,
                              dirtyBytesPerSecond: Double, bandwidthBytesPerSecond: Double, passesLeft: Int,
                              askedByHand: Bool) -> String? {
        if askedByHand { return "asked for by hand (migrate --start-postcopy)" }
        if expectedSeconds <= targetSeconds { return nil }
        if let after = policy.afterPasses {
            return pass >= after ? "after \(after) pre-copy pass\(after == 1 ? "" : "es") (--postcopy-after)" : nil
        }
        let rate = String(format: "%.1f", dirtyBytesPerSecond / 1_048_576)
        let bandwidth = String(format: "%.1f", bandwidthBytesPerSecond / 1_048_576)
        if dirtyBytesPerSecond >= bandwidthBytesPerSecond * hopelessShare {
            return "the guest dirtied \(rate) MiB/s against \(bandwidth) MiB/s of bandwidth: pre-copy could not meet --downtime"
        }
        let shrink = bandwidthBytesPerSecond / max(dirtyBytesPerSecond, 1)
        let needed = log(expectedSeconds / max(targetSeconds, 1e-9)) / log(shrink)
        if needed > Double(passesLeft) {
            return "pre-copy needed \(Int(needed.rounded(.up))) more passes at \(rate) MiB/s dirtied against \(bandwidth) MiB/s, more than --max-iterations leaves"
        }
        return nil
    }
}
