/// How a migration slows a guest that dirties memory faster than the link carries it
/// (`migrate --throttle`).
public enum ThrottleMode: String, Sendable, CaseIterable {
    /// By tracking mode: bitmap → cpu, ring → dirty-limit, quota → dirty-quota.
    case auto
    case none
    /// Auto-converge: every vCPU loses a share of its CPU time.
    case cpu
    /// Per-vCPU dirty-rate ceilings (ring mode), only the vCPUs that write are slowed.
    case dirtyLimit = "dirty-limit"
    /// Per-vCPU quotas per 10 ms interval with a common pool (quota mode).
    case dirtyQuota = "dirty-quota"

    /// The throttle this choice means for a VM tracked with `tracking`, or why it can't be had.
    public func resolved(for tracking: TrackingMode?) throws(ThrottleModeError) -> ThrottleMode {
        switch (self, tracking) {
        case (.auto, .bitmap?): return .cpu
        case (.auto, .ring?): return .dirtyLimit
        case (.auto, .quota?): return .dirtyQuota
        case (.auto, nil): return .none
        case (.dirtyLimit, let mode) where mode != .ring: throw ThrottleModeError(mode: self, tracking: tracking)
        case (.dirtyQuota, let mode) where mode != .quota: throw ThrottleModeError(mode: self, tracking: tracking)
        default: return self
        }
    }
}

/// A throttle the VM's tracking mode cannot support.
public struct ThrottleModeError: Error, Equatable, CustomStringConvertible {
    public let mode: ThrottleMode
    public let tracking: TrackingMode?
    public var description: String {
        let needs = mode == .dirtyLimit ? "--track ring" : "--track quota"
        return "--throttle \(mode.rawValue) needs a VM booted with \(needs) (per-vCPU dirty counts\(mode == .dirtyQuota ? " and quota exits" : "")); this VM was booted with --track \(tracking?.rawValue ?? "none"). Use --throttle cpu or auto, or boot with \(needs)"
    }
}

/// The throttle's state at one moment: for `--stats` lines (per pass) and the report (final).
public struct ThrottleLevel: Sendable, Equatable {
    public var mode: ThrottleMode
    public var active: Bool
    /// cpu: the share of CPU time every vCPU is held, in percent.
    public var cpuPercent: Int?
    /// dirty-limit / dirty-quota: each vCPU's ceiling, bytes/s.
    public var ceilingsBytesPerSecond: [Double]?
    /// dirty-limit: each vCPU's last sleep (its penalty per exit), seconds.
    public var lastSleepSeconds: [Double]?
    /// dirty-quota: each vCPU's quota, pages per interval, and pages drawn from the pool so far.
    public var quotaPagesPerInterval: [Double]?
    public var pagesFromPool: [UInt64]?

    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [("kind", .string(mode.rawValue)), ("active", .bool(active))]
        if let cpuPercent { pairs.append(("cpu_percent", .number(cpuPercent))) }
        if let ceilingsBytesPerSecond { pairs.append(("ceiling_mib_s", .array(ceilingsBytesPerSecond.map { .number($0 / 1_048_576) }))) }
        if let lastSleepSeconds { pairs.append(("sleep_per_exit_ms", .array(lastSleepSeconds.map { .number($0 * 1000) }))) }
        if let quotaPagesPerInterval { pairs.append(("quota_pages_per_10ms", .array(quotaPagesPerInterval.map { .number($0) }))) }
        if let pagesFromPool { pairs.append(("pages_from_pool", .array(pagesFromPool.map { .number($0) }))) }
        return .object(pairs)
    }
}

/// What the report says of the throttle.
public struct ThrottleReport: Sendable {
    public var mode: ThrottleMode = .none
    /// Seconds after the migration began, and the pass during (or at the end of) which, the
    /// throttle first applied.
    public var startedSeconds: Double?
    public var startedInPass: Int?
    /// How many times it was tightened after it started.
    public var tightened = 0
    /// Its level at the pause (before it was removed).
    public var final: ThrottleLevel?
    /// How many periods it judged: none, and "not needed" would be a guess.
    public var periodsJudged = 0
    /// Why it started: what the guest dirtied and what went out, per second, over the period
    /// that first found the guest too fast for the link.
    public var startedBecause: (dirtyBytesPerSecond: Double, sentBytesPerSecond: Double)?

    public var json: JSONValue {
        [
            "kind": .string(mode.rawValue),
            "started_s": startedSeconds.map { .number($0) } ?? .null,
            "started_in_pass": startedInPass.map { .number($0) } ?? .null,
            "tightened": .number(tightened),
            "final": final?.json ?? .null,
            "periods_judged": .number(periodsJudged),
            "started_because": startedBecause.map {
                ["dirty_mib_s": .number($0.dirtyBytesPerSecond / 1_048_576), "sent_mib_s": .number($0.sentBytesPerSecond / 1_048_576)]
            } ?? .null,
        ]
    }
}

/// The throttle of one migration: decides, period by period, whether to start or tighten,
/// applies it to the machine, and removes it when the migration ends, whatever the outcome.
///
/// The rules (also in the man page, THROTTLING):
/// - A period (at least 1 s of pre-copy, as QEMU counts them) "runs hot" when the guest dirtied
///   more than half the bytes sent in it (QEMU's throttle-trigger-threshold of 50 %): at that
///   pace pre-copy shrinks what is left by less than half per pass.
/// - Where periods end: cpu judges at the end of passes that did not converge (one or more passes
///   make a period), from the pages the pass left dirty, as QEMU does: bitmap logging only knows
///   what was dirtied when it is collected. dirty-limit and dirty-quota judge every second, within
///   passes too, from the per-vCPU counts the harvester keeps anyway: the first pass of a big VM
///   lasts seconds, and a writer left at full speed through it takes the CPU and the link from
///   everything else (the readers' pace during a 1 GiB migration was 0.5-0.6 of what it was
///   before, for the ~6 s of the first pass, and came back once the throttle started).
/// - cpu (QEMU's auto-converge, to the letter): every second hot period raises the throttle:
///   20 % first, then +10 %, at most 99 %.
/// - dirty-limit and dirty-quota: start after the first hot period, with a dirty budget of a quarter
///   of the measured bandwidth for the whole VM (each pass then leaves at most a quarter of what
///   it sent); every later hot period halves the budget, down to 1 MiB/s.
///   dirty-limit shares the budget max-min fairly over the vCPUs' measured dirty rates (a vCPU
///   that writes less than an equal share keeps what it writes; the rest goes to those that
///   write more), so a vCPU that does not write is never slowed. dirty-quota gives every vCPU an
///   equal share as its quota per 10 ms interval and lets the quota a vCPU leaves unused go to a
///   common pool that over-quota vCPUs draw on first (seed 000).
/// - Removed when the migration ends: the VM goes on at full speed at the destination, or at
///   the source if the migration failed.
final class MigrationThrottle {
    static let hotShare = 0.5
    static let initialBudgetShare = 0.25
    static let minimumBudget = 1_048_576.0
    let mode: ThrottleMode
    private let machine: any ThrottleTarget
    private(set) var report: ThrottleReport
    private var cpuPercent = 0
    private var budget: Double?
    private var ceilings: [Double]?
    // cpu: QEMU's period accounting.
    private var periodSeconds = 0.0
    private var periodSentBytes = 0.0
    private var periodDirtyBytes = 0.0
    private var hotPeriods = 0
    private var removed = false

    private let pooled: Bool

    init(mode: ThrottleMode, machine: any ThrottleTarget, pooled: Bool = true) {
        self.mode = mode
        self.pooled = pooled
        self.machine = machine
        report = ThrottleReport(mode: mode)
    }

    /// Whether periods end within passes (from per-vCPU counts) or only at their ends.
    var judgesWithinPasses: Bool { mode == .dirtyLimit || mode == .dirtyQuota }

    /// What the guest dirtied while `sentBytes` went out over `seconds` (a whole pass, or for
    /// dirty-limit and dirty-quota a second of one): whether to start or tighten.
    /// `vcpuDirtyBytesPerSecond` is what each vCPU dirtied meanwhile (ring and quota modes).
    func observe(pass: Int, sentBytes: UInt64, dirtyBytes: UInt64, seconds: Double, bandwidth: Double,
                 vcpuDirtyBytesPerSecond: [Double]?, sinceStart: Double) {
        // Hot or not is judged over periods of at least 1 s (QEMU's rule): a short pass sends
        // little, and the few pages the guest touches meanwhile would look like a high share.
        periodSeconds += seconds
        periodSentBytes += Double(sentBytes)
        periodDirtyBytes += Double(dirtyBytes)
        guard periodSeconds >= 1 else { return }
        report.periodsJudged += 1
        let hot = periodDirtyBytes > periodSentBytes * Self.hotShare
        let period = (dirtyBytesPerSecond: periodDirtyBytes / periodSeconds, sentBytesPerSecond: periodSentBytes / periodSeconds)
        periodSeconds = 0; periodSentBytes = 0; periodDirtyBytes = 0
        guard hot else { return }
        if report.startedSeconds == nil { report.startedBecause = period }
        switch mode {
        case .cpu:
            hotPeriods += 1
            guard hotPeriods >= 2 else { return }
            hotPeriods = 0
            cpuPercent = cpuPercent == 0 ? 20 : min(cpuPercent + 10, 99)
            noteChange(pass: pass, sinceStart: sinceStart)
            machine.setCPUThrottle(percent: cpuPercent)
        case .dirtyLimit, .dirtyQuota:
            let next = budget.map { max($0 / 2, Self.minimumBudget) } ?? max(bandwidth * Self.initialBudgetShare, Self.minimumBudget)
            if let budget, next >= budget { return }   // at the floor already
            budget = next
            noteChange(pass: pass, sinceStart: sinceStart)
            let count = machine.throttledVCPUCount
            let shares = mode == .dirtyQuota
                ? [Double](repeating: next / Double(count), count: count)
                : Self.maxMinFair(next, demands: vcpuDirtyBytesPerSecond ?? [Double](repeating: next, count: count))
            ceilings = shares
            machine.setDirtyCeilings(pagesPerSecond: shares.map { $0 / 4096 }, pooled: mode == .dirtyQuota && pooled)
        case .none, .auto:
            return
        }
    }

    private func noteChange(pass: Int, sinceStart: Double) {
        if report.startedSeconds == nil {
            report.startedSeconds = sinceStart
            report.startedInPass = pass
        } else {
            report.tightened += 1
        }
    }

    /// Shares `total` so that no vCPU gets more than it asks for while another gets less than
    /// an equal share; whatever nobody asks for is shared equally among those who ask for most.
    static func maxMinFair(_ total: Double, demands: [Double]) -> [Double] {
        var shares = [Double](repeating: 0, count: demands.count)
        var open = Array(demands.indices)
        var left = total
        while !open.isEmpty {
            let equal = left / Double(open.count)
            let satisfied = open.filter { demands[$0] < equal }
            if satisfied.isEmpty {
                for index in open { shares[index] = equal }
                break
            }
            for index in satisfied {
                shares[index] = demands[index]
                left -= demands[index]
            }
            open.removeAll { satisfied.contains($0) }
        }
        // A vCPU that asked for little still gets its equal part of the budget as its ceiling:
        // it is never held unless it starts writing more than that.
        let floor = total / Double(max(demands.count, 1))
        return shares.map { max($0, min(floor, total)) }
    }

    /// The level now (for a pass's stats line).
    var level: ThrottleLevel {
        var level = ThrottleLevel(mode: mode, active: cpuPercent > 0 || ceilings != nil)
        switch mode {
        case .cpu:
            level.cpuPercent = cpuPercent
        case .dirtyLimit:
            level.ceilingsBytesPerSecond = ceilings
            if ceilings != nil, let states = machine.dirtyPacerStates() {
                level.lastSleepSeconds = states.map { Double($0.lastHoldNanoseconds) / 1e9 }
            }
        case .dirtyQuota:
            level.ceilingsBytesPerSecond = ceilings
            if ceilings != nil, let states = machine.dirtyPacerStates() {
                level.quotaPagesPerInterval = states.map { $0.quotaPagesPerInterval ?? 0 }
                level.pagesFromPool = states.map(\.pagesFromPool)
            }
        case .none, .auto:
            break
        }
        return level
    }

    /// Takes the throttle off the guest; records its final level first. Idempotent.
    func remove() {
        guard !removed else { return }
        removed = true
        report.final = level
        if cpuPercent > 0 { machine.setCPUThrottle(percent: 0) }
        if ceilings != nil { machine.setDirtyCeilings(pagesPerSecond: nil, pooled: false) }
        cpuPercent = 0
        ceilings = nil
    }
}

/// What a MigrationThrottle acts on: the VM's vCPU count, auto-converge, and the ring tracker's
/// per-vCPU ceilings. A Machine in use; a recording stand-in in the tests, which check the
/// throttle's decisions without a VM.
protocol ThrottleTarget: AnyObject {
    var throttledVCPUCount: Int { get }
    func setCPUThrottle(percent: Int)
    /// Ceilings in pages/s (nil removes them); nothing without a ring tracker.
    func setDirtyCeilings(pagesPerSecond: [Double]?, pooled: Bool)
    /// The pacer's state of each vCPU; nil without a ring tracker.
    func dirtyPacerStates() -> [PacerVCPUState]?
}

extension Machine: ThrottleTarget {
    var throttledVCPUCount: Int { configuration.vcpuCount }
    func setCPUThrottle(percent: Int) { cpuThrottle.set(percent: percent) }
    func setDirtyCeilings(pagesPerSecond: [Double]?, pooled: Bool) {
        ringTracker?.setThrottle(pagesPerSecond: pagesPerSecond, pooled: pooled)
    }
    func dirtyPacerStates() -> [PacerVCPUState]? { ringTracker?.pacerStates() }
}
