/// The pre-copy rule's reading of one pass that ended (`MigrationSender.assess`): the rate pages
/// move at, what the pause would cost if it came now, and the target it must meet. The sender
/// decides from it whether to stop, switch to post-copy, throttle, or copy once more; the
/// progress (`query-migrate`'s forecast) is published from it.
struct PassAssessment {
    var pass: MigrationPass
    /// Pages the guest dirtied during the pass: what the next pass (or the pause) must carry.
    var dirtyPages: UInt64
    /// The tracker lost dirty information: the pass proves nothing about convergence.
    var lost: Bool
    /// Page bytes moved per second (the link's rate times the compression ratio).
    var pageRate: Double
    /// The pause if it came now: the dirty pages at `pageRate`, plus `fixedSeconds`.
    var expectedSeconds: Double
    /// What the pause costs whatever is dirty: --verify's hash, switching the vCPUs, two round trips.
    var fixedSeconds: Double
    /// 85 % of --downtime, as in force at the decision.
    var targetSeconds: Double
    var verifyEstimateSeconds: Double

    /// The expected pause meets the target (and the pass measured it).
    var meetsTarget: Bool { expectedSeconds <= targetSeconds && !lost }

    /// The forecast's stopping point: pre-copy stops once a pass leaves at most this many
    /// seconds' worth of pages at `pageRate`.
    var stopBelowSeconds: Double { targetSeconds - fixedSeconds }
}
