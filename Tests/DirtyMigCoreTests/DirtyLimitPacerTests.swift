@testable import DirtyMigCore
import XCTest

/// The dirty-limit pacer (`--track ring`): each charge advances what the vCPU has paid for by
/// pages ÷ ceiling, and a vCPU ahead of the clock is held until then. Times are the `now` the
/// harvester passes in (nanoseconds), so no VM and no real clock are needed.
final class DirtyLimitPacerTests: XCTestCase {
    private let t0: UInt64 = 1_000_000_000
    private let ms: UInt64 = 1_000_000

    func testWithoutACeilingNothingIsHeld() {
        let pacer = DirtyLimitPacer(vcpuCount: 2)
        XCTAssertFalse(pacer.isActive)
        XCTAssertFalse(pacer.isPaced(0))
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 100_000, now: t0))
        XCTAssertEqual(pacer.state(vcpu: 0), PacerVCPUState())
    }

    func testANewCeilingBanksNoAllowance() {
        let pacer = DirtyLimitPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: t0)
        XCTAssertTrue(pacer.isActive)
        XCTAssertTrue(pacer.isPaced(0))
        // One page at 1000 pages/s costs 1 ms, and nothing was paid for before the limit was set.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: t0), t0 + 1 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 1)
        XCTAssertEqual(pacer.state(vcpu: 0).lastHoldNanoseconds, 1 * ms)
    }

    func testThePenaltyIsWhatThePagesCostAtTheCeilingLessTheTimeGoneBy() {
        let pacer = DirtyLimitPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: t0)
        // 10 pages = 10 ms of allowance, 2 ms after the limit: held 8 ms more.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 10, now: t0 + 2 * ms), t0 + 10 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).lastHoldNanoseconds, 8 * ms)
        // The debt is kept: 5 more pages at 4 ms are paid for until 15 ms.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 5, now: t0 + 4 * ms), t0 + 15 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).lastHoldNanoseconds, 11 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 2)
    }

    func testAVCPUWritingAtItsCeilingIsNeverHeld() {
        let pacer = DirtyLimitPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: t0)
        for k in 1...2000 {
            XCTAssertNil(pacer.charge(vcpu: 0, pages: 1, now: t0 + UInt64(k) * ms), "charge \(k)")
        }
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 0)
        // Twice the ceiling is held at the first charge.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 2, now: t0 + 2001 * ms), t0 + 2002 * ms)
    }

    func testAfterAQuietSpellFiveMillisecondsAtTheCeilingMayGoAtOnce() {
        let pacer = DirtyLimitPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: t0)
        let later = t0 + 1_000 * ms
        // The bank is burstNanoseconds (5 ms) of the ceiling: 5 pages, not the second's 1000.
        XCTAssertEqual(DirtyLimitPacer.burstNanoseconds, 5 * ms)
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 5, now: later))
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: later), later + 1 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 1)
    }

    func testTheTighterCeilingSetsThePenalty() {
        let pacer = DirtyLimitPacer(vcpuCount: 2)
        pacer.setUserLimit(1000, vcpu: 0, now: t0)
        pacer.setThrottle([250, 4000], pooled: false, now: t0)
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: t0), t0 + 4 * ms)   // 1 page at 250/s
        XCTAssertEqual(pacer.charge(vcpu: 1, pages: 1, now: t0), t0 + 250_000)  // 1 page at 4000/s
        let state = pacer.state(vcpu: 0)
        XCTAssertEqual(state.userLimit, 1000)
        XCTAssertEqual(state.throttleLimit, 250)
        XCTAssertEqual(state.effectiveLimit, 250)

        // The throttle removed: vCPU 1 runs free, vCPU 0 is back at its own limit, from now.
        let later = t0 + 1_000 * ms
        pacer.setThrottle(nil, pooled: false, now: later)
        XCTAssertFalse(pacer.isPaced(1))
        XCTAssertNil(pacer.charge(vcpu: 1, pages: 100_000, now: later))
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: later), later + 1 * ms)
        XCTAssertNil(pacer.state(vcpu: 0).throttleLimit)
    }

    func testSettingACeilingAgainForgivesTheDebt() {
        let pacer = DirtyLimitPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: t0)
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 100, now: t0), t0 + 100 * ms)
        pacer.setUserLimit(1000, vcpu: 0, now: t0 + 10 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).lastHoldNanoseconds, 0)
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 1, "the count of penalties is kept")
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: t0 + 10 * ms), t0 + 11 * ms)

        pacer.setUserLimit(nil, vcpu: 0, now: t0 + 20 * ms)
        XCTAssertFalse(pacer.isActive)
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 1000, now: t0 + 20 * ms))
    }

    func testALimitOnOneVCPULeavesTheOthersAlone() {
        let pacer = DirtyLimitPacer(vcpuCount: 3)
        pacer.setUserLimit(1000, vcpu: 1, now: t0)
        XCTAssertTrue(pacer.isActive)
        XCTAssertFalse(pacer.isPaced(0))
        XCTAssertTrue(pacer.isPaced(1))
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 1000, now: t0))
        XCTAssertNil(pacer.charge(vcpu: 2, pages: 1000, now: t0))
        XCTAssertEqual(pacer.charge(vcpu: 1, pages: 1000, now: t0), t0 + 1_000 * ms)
    }
}
