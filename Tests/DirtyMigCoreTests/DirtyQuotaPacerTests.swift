@testable import DirtyMigCore
import XCTest

/// The dirty-quota pacer (`--track quota`): a quota of ceiling × 10 ms per interval, quota exits
/// held until the interval whose quota covers the debt, and the common pool of what vCPUs left
/// unused. Times are the `now` the harvester passes in, so no VM and no real clock are needed.
final class DirtyQuotaPacerTests: XCTestCase {
    private let ms: UInt64 = 1_000_000

    /// The start of interval `n` (10 ms intervals).
    private func interval(_ n: UInt64) -> UInt64 { n * DirtyQuotaPacer.defaultIntervalNanoseconds }

    func testTheQuotaIsTheCeilingOverOneInterval() {
        XCTAssertEqual(DirtyQuotaPacer.defaultIntervalNanoseconds, 10 * ms)
        let pacer = DirtyQuotaPacer(vcpuCount: 2)
        XCTAssertNil(pacer.quota(0))
        pacer.setUserLimit(1000, vcpu: 0, now: 0)
        pacer.setUserLimit(2560, vcpu: 1, now: 0)   // 10 MiB/s
        XCTAssertEqual(pacer.quota(0), 10)
        XCTAssertEqual(pacer.quota(1)!, 25.6, accuracy: 1e-9)
        XCTAssertEqual(pacer.state(vcpu: 0).quotaPagesPerInterval, 10)

        let fine = DirtyQuotaPacer(vcpuCount: 1, intervalNanoseconds: 1 * ms)
        fine.setUserLimit(1000, vcpu: 0, now: 0)
        XCTAssertEqual(fine.quota(0), 1)
    }

    func testWithinItsQuotaAVCPURunsOnAndOneOverIsHeldToTheNextInterval() {
        let pacer = DirtyQuotaPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: 0)
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 4, now: interval(100) + 1 * ms))
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 6, now: interval(100) + 2 * ms))   // 10: the quota exactly
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: interval(100) + 3 * ms), interval(101))
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 1)
        XCTAssertEqual(pacer.state(vcpu: 0).lastHoldNanoseconds, 7 * ms)
    }

    func testTheDebtIsPaidOffOneQuotaPerInterval() {
        let pacer = DirtyQuotaPacer(vcpuCount: 1)
        pacer.setUserLimit(1000, vcpu: 0, now: 0)
        // 35 pages against a quota of 10: it runs again in the interval where 5 are left.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 35, now: interval(100) + 1 * ms), interval(103))
        // Charged again one interval on (a harvest of pages it wrote before the kick): 25 + 1 left.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 1, now: interval(101)), interval(103))
        // At interval 103 what is left (26 - 20 = 6) and one more page fit the quota.
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 1, now: interval(103)))
        XCTAssertEqual(pacer.state(vcpu: 0).exits, 2)
    }

    func testANewThrottleStartsWithoutDebt() {
        let pacer = DirtyQuotaPacer(vcpuCount: 1)
        pacer.setThrottle([1000], pooled: false, now: 0)
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 35, now: interval(100)), interval(103))
        pacer.setThrottle([1000], pooled: false, now: interval(100))
        XCTAssertEqual(pacer.state(vcpu: 0).lastHoldNanoseconds, 0)
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 10, now: interval(100) + 1 * ms))
    }

    func testOverQuotaVCPUsDrawOnWhatOthersLeftUnused() {
        let pacer = DirtyQuotaPacer(vcpuCount: 2)
        pacer.setThrottle([1000, 1000], pooled: true, now: 0)
        XCTAssertNil(pacer.charge(vcpu: 0, pages: 2, now: interval(100)))
        XCTAssertNil(pacer.charge(vcpu: 1, pages: 10, now: interval(100)))
        // Interval 101: the pool holds the 8 pages vCPU 0 left unused in interval 100.
        XCTAssertNil(pacer.charge(vcpu: 1, pages: 15, now: interval(101)), "5 over its quota, drawn from the pool")
        XCTAssertEqual(pacer.state(vcpu: 1).pagesFromPool, 5)
        // 4 more: the 3 left in the pool are not enough; 11 against 10 waits for interval 102.
        XCTAssertEqual(pacer.charge(vcpu: 1, pages: 4, now: interval(101) + 1 * ms), interval(102))
        XCTAssertEqual(pacer.state(vcpu: 1).pagesFromPool, 8)
        XCTAssertEqual(pacer.state(vcpu: 1).exits, 1)
        XCTAssertEqual(pacer.state(vcpu: 1).lastHoldNanoseconds, 9 * ms)
        XCTAssertEqual(pacer.state(vcpu: 0).pagesFromPool, 0)
    }

    func testThePoolHoldsAtMostOneIntervalOfAllQuotas() {
        let pacer = DirtyQuotaPacer(vcpuCount: 2)
        pacer.setThrottle([1000, 1000], pooled: true, now: 0)
        // 100 idle intervals left 2,000 pages unused, but the pool keeps 2 × 10 of them.
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 40, now: interval(100)), interval(102))
        XCTAssertEqual(pacer.state(vcpu: 0).pagesFromPool, 20)
    }

    func testWithoutThePoolAnOverQuotaVCPUIsHeld() {
        let pacer = DirtyQuotaPacer(vcpuCount: 2)
        pacer.setThrottle([1000, 1000], pooled: false, now: 0)
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 11, now: interval(100)), interval(101))
        XCTAssertEqual(pacer.state(vcpu: 0).pagesFromPool, 0)
    }

    func testAVCPUWithAUserLimitNeverDrawsOnThePool() {
        let pacer = DirtyQuotaPacer(vcpuCount: 2)
        pacer.setThrottle([1000, 1000], pooled: true, now: 0)
        pacer.setUserLimit(2000, vcpu: 0, now: 0)
        XCTAssertEqual(pacer.quota(0), 10, "the throttle's ceiling is the tighter")
        XCTAssertEqual(pacer.charge(vcpu: 0, pages: 11, now: interval(100)), interval(101))
        XCTAssertEqual(pacer.state(vcpu: 0).pagesFromPool, 0)
        XCTAssertNil(pacer.charge(vcpu: 1, pages: 11, now: interval(100)))
        XCTAssertEqual(pacer.state(vcpu: 1).pagesFromPool, 1)
    }

    func testRemovingTheThrottleUnpacesEveryVCPU() {
        let pacer = DirtyQuotaPacer(vcpuCount: 2)
        pacer.setThrottle([1000, 1000], pooled: true, now: 0)
        XCTAssertTrue(pacer.isActive)
        XCTAssertTrue(pacer.isPaced(1))
        pacer.setThrottle(nil, pooled: true, now: interval(100))
        XCTAssertFalse(pacer.isActive)
        XCTAssertFalse(pacer.isPaced(1))
        XCTAssertNil(pacer.charge(vcpu: 1, pages: 1000, now: interval(100)))
        XCTAssertNil(pacer.state(vcpu: 1).quotaPagesPerInterval)
    }
}
