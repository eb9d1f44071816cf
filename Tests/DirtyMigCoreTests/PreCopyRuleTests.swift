@testable import DirtyMigCore
import XCTest

/// Within --downtime, one more live pass is made only when it is cheap and would at least halve
/// the pause (the rule's arithmetic; MigrationTests and the benchmark run it on real guests).
final class PreCopyRuleTests: XCTestCase {
    private let bandwidth = 2e9   // bytes/s

    private func expected(_ pages: Double) -> Double { pages * 4096 / bandwidth + 0.002 }

    func testARewritingGuestGetsAFewMorePassesUntilThePauseIsSmall() {
        // 95 MiB dirty after pass 1 (48 ms to send), the guest dirtying 200 MiB/s.
        var pages = 95.0 * 256
        let rate = 200.0 * 256
        var extraPasses = 0
        while MigrationSender.anotherPassHalvesThePause(dirtyPages: pages, dirtyPagesPerSecond: rate, bandwidth: bandwidth,
                                                        expected: expected(pages), passesLeft: true) {
            extraPasses += 1
            pages = min(pages, rate * pages * 4096 / bandwidth)
            XCTAssertLessThan(extraPasses, 4, "each pass must shrink the set geometrically")
            if extraPasses >= 4 { break }
        }
        print("extra passes \(extraPasses), pause then \(expected(pages) * 1000) ms")
        XCTAssertGreaterThanOrEqual(extraPasses, 1)
        XCTAssertLessThan(expected(pages), 0.005, "a few ms of pause, not 50")
    }

    func testNoPassWhenItWouldNotHalveThePauseOrNoneIsLeft() {
        // A guest dirtying as fast as the link: the next pass would carry as much again.
        let pages = 50_000.0
        let linkRate = bandwidth / 4096
        XCTAssertFalse(MigrationSender.anotherPassHalvesThePause(
            dirtyPages: pages, dirtyPagesPerSecond: linkRate, bandwidth: bandwidth, expected: expected(pages), passesLeft: true))
        // A worthwhile pass, but --max-iterations is reached.
        XCTAssertFalse(MigrationSender.anotherPassHalvesThePause(
            dirtyPages: pages, dirtyPagesPerSecond: 1000, bandwidth: bandwidth, expected: expected(pages), passesLeft: false))
        // Fixed costs dominate: sending the pages is quick, the pause would not halve.
        XCTAssertFalse(MigrationSender.anotherPassHalvesThePause(
            dirtyPages: 3000, dirtyPagesPerSecond: 0, bandwidth: bandwidth, expected: 3000 * 4096 / bandwidth + 0.2, passesLeft: true))
    }
}
