@testable import DirtyMigCore
import XCTest

/// The migration throttle's decisions (`migrate --throttle`), on a stand-in for the VM that
/// records what the throttle asks of it: which mode a choice resolves to, when the throttle
/// starts, what it sets, how it tightens, and that it takes everything off when removed.
/// ThrottleMigrationTests runs the same throttles on real guests.
final class MigrationThrottleTests: XCTestCase {
    private final class RecordingTarget: ThrottleTarget {
        let throttledVCPUCount: Int
        var cpuPercents: [Int] = []
        var ceilings: [(pagesPerSecond: [Double]?, pooled: Bool)] = []
        var states: [PacerVCPUState]?

        init(vcpus: Int) { throttledVCPUCount = vcpus }
        func setCPUThrottle(percent: Int) { cpuPercents.append(percent) }
        func setDirtyCeilings(pagesPerSecond: [Double]?, pooled: Bool) { ceilings.append((pagesPerSecond, pooled)) }
        func dirtyPacerStates() -> [PacerVCPUState]? { states }
    }

    private let mib = 1_048_576.0

    /// One period of `seconds`: `dirty` of every 100 bytes sent were dirtied meanwhile.
    private func observe(_ throttle: MigrationThrottle, pass: Int = 1, dirty: UInt64, seconds: Double = 1,
                         bandwidth: Double = 100 * 1_048_576, vcpuRates: [Double]? = nil, at sinceStart: Double = 0) {
        throttle.observe(pass: pass, sentBytes: 100, dirtyBytes: dirty, seconds: seconds, bandwidth: bandwidth,
                         vcpuDirtyBytesPerSecond: vcpuRates, sinceStart: sinceStart)
    }

    func testAutoPicksTheThrottleTheTrackingModeCanSupport() throws {
        XCTAssertEqual(try ThrottleMode.auto.resolved(for: .bitmap), .cpu)
        XCTAssertEqual(try ThrottleMode.auto.resolved(for: .ring), .dirtyLimit)
        XCTAssertEqual(try ThrottleMode.auto.resolved(for: .quota), .dirtyQuota)
        XCTAssertEqual(try ThrottleMode.auto.resolved(for: nil), ThrottleMode.none)
        XCTAssertEqual(try ThrottleMode.cpu.resolved(for: .ring), .cpu)
        XCTAssertEqual(try ThrottleMode.cpu.resolved(for: nil), .cpu)
        XCTAssertEqual(try ThrottleMode.none.resolved(for: .quota), ThrottleMode.none)
        XCTAssertEqual(try ThrottleMode.dirtyLimit.resolved(for: .ring), .dirtyLimit)
        XCTAssertEqual(try ThrottleMode.dirtyQuota.resolved(for: .quota), .dirtyQuota)
    }

    func testDirtyLimitAndDirtyQuotaAreRefusedWithoutTheirTracking() {
        XCTAssertThrowsError(try ThrottleMode.dirtyLimit.resolved(for: .quota)) { error in
            XCTAssertEqual(error as? ThrottleModeError, ThrottleModeError(mode: .dirtyLimit, tracking: .quota))
            XCTAssertTrue("\(error)".contains("needs a VM booted with --track ring"), "\(error)")
        }
        XCTAssertThrowsError(try ThrottleMode.dirtyLimit.resolved(for: .bitmap))
        XCTAssertThrowsError(try ThrottleMode.dirtyQuota.resolved(for: .ring)) { error in
            XCTAssertTrue("\(error)".contains("--track quota (per-vCPU dirty counts and quota exits); this VM was booted with --track ring"), "\(error)")
        }
        XCTAssertThrowsError(try ThrottleMode.dirtyQuota.resolved(for: nil)) { error in
            XCTAssertTrue("\(error)".contains("booted with --track none"), "\(error)")
        }
    }

    func testCPUStartsAtTwentyPercentOnTheSecondHotPeriodAndAddsTenEverySecondOneAfter() {
        let target = RecordingTarget(vcpus: 2)
        let throttle = MigrationThrottle(mode: .cpu, machine: target)
        XCTAssertFalse(throttle.judgesWithinPasses)
        observe(throttle, pass: 1, dirty: 60, at: 1)
        XCTAssertEqual(target.cpuPercents, [], "one hot period is not enough")
        XCTAssertFalse(throttle.level.active)
        observe(throttle, pass: 2, dirty: 60, at: 2.5)
        XCTAssertEqual(target.cpuPercents, [20])
        XCTAssertEqual(throttle.report.startedSeconds, 2.5)
        XCTAssertEqual(throttle.report.startedInPass, 2)
        // Why: the period that started it, per second (60 bytes dirtied while 100 went out, in 1 s).
        XCTAssertEqual(throttle.report.startedBecause?.dirtyBytesPerSecond, 60)
        XCTAssertEqual(throttle.report.startedBecause?.sentBytesPerSecond, 100)
        XCTAssertEqual(throttle.level, ThrottleLevel(mode: .cpu, active: true, cpuPercent: 20))
        observe(throttle, pass: 3, dirty: 60)
        observe(throttle, pass: 4, dirty: 60)
        XCTAssertEqual(target.cpuPercents, [20, 30])
        XCTAssertEqual(throttle.report.tightened, 1)
        XCTAssertEqual(throttle.report.startedInPass, 2)
        XCTAssertEqual(target.ceilings.count, 0)
    }

    func testCPUStopsAtNinetyNinePercent() {
        let target = RecordingTarget(vcpus: 1)
        let throttle = MigrationThrottle(mode: .cpu, machine: target)
        for _ in 0..<20 { observe(throttle, dirty: 100) }
        XCTAssertEqual(target.cpuPercents, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99])
    }

    func testAPeriodIsHotOnlyWhenMoreThanHalfOfWhatWasSentWasDirtied() {
        let target = RecordingTarget(vcpus: 1)
        let throttle = MigrationThrottle(mode: .cpu, machine: target)
        for _ in 0..<4 { observe(throttle, dirty: 50) }   // exactly half: not hot
        XCTAssertEqual(target.cpuPercents, [])
        // A cold period between two hot ones does not reset the count (as QEMU counts them).
        observe(throttle, dirty: 51)
        observe(throttle, dirty: 10)
        observe(throttle, dirty: 51)
        XCTAssertEqual(target.cpuPercents, [20])
    }

    func testPeriodsShorterThanASecondAreAddedUpBeforeTheyAreJudged() {
        let target = RecordingTarget(vcpus: 1)
        let throttle = MigrationThrottle(mode: .cpu, machine: target)
        // 0.6 s all dirty, then 0.6 s clean: one 1.2 s period, 100 of 200 dirtied: not hot.
        for _ in 0..<4 {
            observe(throttle, dirty: 100, seconds: 0.6)
            observe(throttle, dirty: 0, seconds: 0.6)
        }
        XCTAssertEqual(target.cpuPercents, [])
        // Four hot half seconds are two hot periods.
        for pass in 1...3 { observe(throttle, pass: pass, dirty: 100, seconds: 0.5) }
        XCTAssertEqual(target.cpuPercents, [])
        observe(throttle, pass: 4, dirty: 100, seconds: 0.5)
        XCTAssertEqual(target.cpuPercents, [20])
        XCTAssertEqual(throttle.report.startedInPass, 4)
    }

    func testDirtyLimitStartsOnTheFirstHotPeriodWithAQuarterOfTheBandwidthSharedMaxMinFairly() {
        let target = RecordingTarget(vcpus: 4)
        let throttle = MigrationThrottle(mode: .dirtyLimit, machine: target)
        XCTAssertTrue(throttle.judgesWithinPasses)
        observe(throttle, pass: 1, dirty: 60, bandwidth: 100 * mib, vcpuRates: [1 * mib, 2 * mib, 20 * mib, 40 * mib], at: 1.5)
        // Budget 25 MiB/s. The two light writers keep what they write (1 and 2 MiB/s), the two
        // heavy ones share the 22 left (11 each); the light ones' ceilings are then raised to an
        // equal part of the budget (6.25), so they are never held unless they write more.
        let bytes = [6.25 * mib, 6.25 * mib, 11 * mib, 11 * mib]
        XCTAssertEqual(target.ceilings.count, 1)
        XCTAssertEqual(target.ceilings[0].pagesPerSecond, [1600, 1600, 2816, 2816])
        XCTAssertEqual(target.ceilings[0].pooled, false)
        XCTAssertEqual(throttle.report.startedSeconds, 1.5)
        XCTAssertEqual(throttle.report.startedInPass, 1)
        XCTAssertEqual(throttle.level.ceilingsBytesPerSecond, bytes)
        XCTAssertTrue(throttle.level.active)
        XCTAssertEqual(target.cpuPercents, [])

        // Every later hot period halves the budget: 12.5 MiB/s, four equal writers.
        observe(throttle, pass: 1, dirty: 60, bandwidth: 100 * mib, vcpuRates: [40 * mib, 40 * mib, 40 * mib, 40 * mib])
        XCTAssertEqual(target.ceilings.last?.pagesPerSecond, [800, 800, 800, 800])
        XCTAssertEqual(throttle.report.tightened, 1)
        // A cold period changes nothing.
        observe(throttle, pass: 2, dirty: 50)
        XCTAssertEqual(target.ceilings.count, 2)
    }

    func testTheBudgetGoesNoLowerThanOneMebibytePerSecond() {
        let target = RecordingTarget(vcpus: 2)
        let throttle = MigrationThrottle(mode: .dirtyLimit, machine: target)
        // A quarter of 2 MiB/s is below the floor: 1 MiB/s, half each (no per-vCPU rates: equal).
        observe(throttle, dirty: 60, bandwidth: 2 * mib)
        XCTAssertEqual(target.ceilings.map(\.pagesPerSecond), [[128, 128]])
        observe(throttle, dirty: 60, bandwidth: 2 * mib)
        observe(throttle, dirty: 60, bandwidth: 2 * mib)
        XCTAssertEqual(target.ceilings.count, 1, "at the floor: not tightened again")
        XCTAssertEqual(throttle.report.tightened, 0)
    }

    func testDirtyQuotaGivesEveryVCPUAnEqualShareWithThePool() {
        let target = RecordingTarget(vcpus: 2)
        let throttle = MigrationThrottle(mode: .dirtyQuota, machine: target)
        // Budget 20 MiB/s: 10 MiB/s each, however unequally they write.
        observe(throttle, dirty: 60, bandwidth: 80 * mib, vcpuRates: [0, 50 * mib])
        XCTAssertEqual(target.ceilings.count, 1)
        XCTAssertEqual(target.ceilings[0].pagesPerSecond, [2560, 2560])
        XCTAssertEqual(target.ceilings[0].pooled, true)

        let unpooled = RecordingTarget(vcpus: 2)
        observe(MigrationThrottle(mode: .dirtyQuota, machine: unpooled, pooled: false), dirty: 60, bandwidth: 80 * mib)
        XCTAssertEqual(unpooled.ceilings[0].pooled, false)
    }

    func testTheLevelReportsWhatThePacersSay() {
        let limit = RecordingTarget(vcpus: 2)
        limit.states = [PacerVCPUState(lastHoldNanoseconds: 2_000_000), PacerVCPUState()]
        let limitThrottle = MigrationThrottle(mode: .dirtyLimit, machine: limit)
        XCTAssertNil(limitThrottle.level.lastSleepSeconds, "nothing to report before it starts")
        observe(limitThrottle, dirty: 60, bandwidth: 8 * mib)
        XCTAssertEqual(limitThrottle.level.lastSleepSeconds, [0.002, 0])
        XCTAssertNil(limitThrottle.level.quotaPagesPerInterval)

        let quota = RecordingTarget(vcpus: 2)
        quota.states = [PacerVCPUState(quotaPagesPerInterval: 25.6, pagesFromPool: 7), PacerVCPUState()]
        let quotaThrottle = MigrationThrottle(mode: .dirtyQuota, machine: quota)
        observe(quotaThrottle, dirty: 60, bandwidth: 8 * mib)
        XCTAssertEqual(quotaThrottle.level.quotaPagesPerInterval, [25.6, 0])
        XCTAssertEqual(quotaThrottle.level.pagesFromPool, [7, 0])
        XCTAssertNil(quotaThrottle.level.lastSleepSeconds)
    }

    func testRemovingTakesTheThrottleOffOnceAndKeepsItsFinalLevel() {
        let target = RecordingTarget(vcpus: 2)
        let throttle = MigrationThrottle(mode: .dirtyLimit, machine: target)
        observe(throttle, dirty: 60, bandwidth: 8 * mib)
        let before = throttle.level
        throttle.remove()
        XCTAssertEqual(throttle.report.final, before)
        XCTAssertEqual(throttle.report.final?.active, true)
        XCTAssertEqual(target.ceilings.count, 2)
        XCTAssertNil(target.ceilings[1].pagesPerSecond)
        XCTAssertFalse(throttle.level.active)
        throttle.remove()
        XCTAssertEqual(target.ceilings.count, 2, "idempotent")

        let cpu = RecordingTarget(vcpus: 1)
        let cpuThrottle = MigrationThrottle(mode: .cpu, machine: cpu)
        observe(cpuThrottle, dirty: 60)
        observe(cpuThrottle, dirty: 60)
        cpuThrottle.remove()
        XCTAssertEqual(cpu.cpuPercents, [20, 0])
        XCTAssertEqual(cpuThrottle.report.final?.cpuPercent, 20)

        let idle = RecordingTarget(vcpus: 1)
        let never = MigrationThrottle(mode: .cpu, machine: idle)
        never.remove()
        XCTAssertEqual(idle.cpuPercents, [], "a throttle that never started has nothing to take off")
        XCTAssertEqual(never.report.final?.active, false)
    }

    func testNoneNeverActs() {
        let target = RecordingTarget(vcpus: 1)
        let throttle = MigrationThrottle(mode: .none, machine: target)
        for _ in 0..<6 { observe(throttle, dirty: 100) }
        throttle.remove()
        XCTAssertEqual(target.cpuPercents, [])
        XCTAssertEqual(target.ceilings.count, 0)
        XCTAssertNil(throttle.report.startedSeconds)
    }

    func testMaxMinFairShares() {
        XCTAssertEqual(MigrationThrottle.maxMinFair(100, demands: [10, 20, 500]).map { ($0 * 1000).rounded() / 1000 },
                       [33.333, 33.333, 70])
        XCTAssertEqual(MigrationThrottle.maxMinFair(90, demands: [100, 100, 100]), [30, 30, 30])
        XCTAssertEqual(MigrationThrottle.maxMinFair(10, demands: [0, 0]), [5, 5])
        XCTAssertEqual(MigrationThrottle.maxMinFair(10, demands: []), [])
    }
}
