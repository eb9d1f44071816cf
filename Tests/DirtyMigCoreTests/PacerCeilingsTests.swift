@testable import DirtyMigCore
import XCTest

/// Where a user's `dirtymig limit` and the migration throttle's ceiling meet, the tighter one is
/// in force (PacerCeilings, and PacerVCPUState as `limit --show` reports it). No VM needed.
final class PacerCeilingsTests: XCTestCase {
    func testTheTighterOfUserAndThrottleIsInForce() {
        var ceilings = PacerCeilings(vcpuCount: 4)
        XCTAssertFalse(ceilings.isActive)
        ceilings.user[1] = 1000
        ceilings.throttle[2] = 250
        ceilings.user[3] = 1000
        ceilings.throttle[3] = 250
        XCTAssertTrue(ceilings.isActive)
        XCTAssertNil(ceilings.effective(0))
        XCTAssertEqual(ceilings.effective(1), 1000)
        XCTAssertEqual(ceilings.effective(2), 250)
        XCTAssertEqual(ceilings.effective(3), 250)
        ceilings.user[3] = 100
        XCTAssertEqual(ceilings.effective(3), 100)
    }

    func testOnlyAThrottleCeilingStillMakesThePacerActive() {
        var ceilings = PacerCeilings(vcpuCount: 2)
        ceilings.throttle[1] = 5
        XCTAssertTrue(ceilings.isActive)
        ceilings.throttle[1] = nil
        XCTAssertFalse(ceilings.isActive)
    }

    func testTheReportedStateSaysTheSameCeiling() {
        XCTAssertNil(PacerVCPUState().effectiveLimit)
        XCTAssertEqual(PacerVCPUState(userLimit: 1000).effectiveLimit, 1000)
        XCTAssertEqual(PacerVCPUState(throttleLimit: 250).effectiveLimit, 250)
        XCTAssertEqual(PacerVCPUState(userLimit: 1000, throttleLimit: 250).effectiveLimit, 250)
        XCTAssertEqual(PacerVCPUState(userLimit: 100, throttleLimit: 250).effectiveLimit, 100)
    }
}
