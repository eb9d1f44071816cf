/// How long a pre-copy has left, from what it has measured: the link's rate over the last pass,
/// the guest's dirty rate, the pages left in the pass under way and those dirtied since it began.
/// Each pass sends what the one before left dirty, at the link's rate, while the guest dirties
/// more at its own; pre-copy ends once a pass leaves few enough pages for the pause. With a
/// steady writer this is a geometric series; it is walked pass by pass here, so the
/// stopping point and the pass limit count as the sender applies them.
///
/// No estimate (nil) before a pass has measured the link, or while the guest dirties as fast as
/// the link carries: that migration ends when a throttle slows the guest or the pass limit is
/// reached, and a figure would be a guess.
public struct PreCopyForecast: Sendable, Equatable {
    /// The link's rate over the last completed pass (nil: none completed yet).
    public var bandwidthBytesPerSecond: Double?
    public var dirtyBytesPerSecond: Double
    /// What the pass under way has still to send.
    public var remainingBytes: Double
    /// How long the pass under way has run (what the guest dirtied meanwhile goes in the next).
    public var passElapsedSeconds: Double
    /// Pre-copy stops once a pass leaves at most this much (the downtime target at this rate).
    public var stopBelowBytes: Double
    /// Passes the pass limit still allows after the one under way.
    public var passesLeft: Int

    public init(bandwidthBytesPerSecond: Double?, dirtyBytesPerSecond: Double, remainingBytes: Double,
                passElapsedSeconds: Double, stopBelowBytes: Double, passesLeft: Int) {
        self.bandwidthBytesPerSecond = bandwidthBytesPerSecond
        self.dirtyBytesPerSecond = dirtyBytesPerSecond
        self.remainingBytes = remainingBytes
        self.passElapsedSeconds = passElapsedSeconds
        self.stopBelowBytes = stopBelowBytes
        self.passesLeft = passesLeft
    }

    /// A guest that dirties at more than this share of the link never lets pre-copy converge
    /// in a time worth forecasting (at 95 %, each pass is 95 % of the one before).
    static let convergingShare = 0.95

    /// Seconds until the destination has everything (the last pages sent in the pause included).
    public var secondsLeft: Double? {
        guard let rate = bandwidthBytesPerSecond, rate > 0, remainingBytes.isFinite, dirtyBytesPerSecond.isFinite else { return nil }
        let dirty = max(dirtyBytesPerSecond, 0)
        var seconds = max(remainingBytes, 0) / rate
        // The next pass: what was dirtied since this one began, and while its rest goes out.
        var next = dirty * (max(passElapsedSeconds, 0) + seconds)
        var passes = passesLeft
        while next > stopBelowBytes {
            guard passes > 0, dirty < rate * Self.convergingShare else { return nil }
            seconds += next / rate
            next = dirty * next / rate
            passes -= 1
        }
        return seconds + next / rate
    }
}
