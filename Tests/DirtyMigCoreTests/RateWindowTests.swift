@testable import DirtyMigCore
import XCTest

/// Replication's rates (checkpoints and bytes per second): over the last second while events
/// are dense, over the span back to the event before the newest when they are sparse (a
/// checkpoint that takes seconds to cross a slow link used to read 0 B/s between checkpoints).
final class RateWindowTests: XCTestCase {
    private let second: UInt64 = 1_000_000_000

    func testDenseEventsAreRatedOverTheLastSecond() {
        var window = RateWindow()
        let start: UInt64 = 100 * second
        for index in 0..<200 { window.add(100, at: start + UInt64(index) * second / 40) }   // 40 a second, 5 s
        let now = start + 5 * second
        XCTAssertEqual(window.perSecond(now: now), 4000, accuracy: 100)
        XCTAssertEqual(window.total, 20_000)
    }

    func testSparseEventsAreNeverReadAsNothingBetweenThem() {
        var window = RateWindow()
        let start: UInt64 = 100 * second
        // 9 MB every 3 s: 3 MB/s.
        for index in 0..<5 { window.add(9_000_000, at: start + UInt64(index) * 3 * second) }
        let last = start + 12 * second
        for tenth in 1..<30 {
            let rate = window.perSecond(now: last + UInt64(tenth) * second / 10)
            XCTAssertGreaterThan(rate, 1_400_000, "at +\(Double(tenth) / 10) s")
            XCTAssertLessThanOrEqual(rate, 3_000_000, "at +\(Double(tenth) / 10) s")
        }
    }

    func testNothingForLongerThanTheLongestWindowIsZero() {
        var window = RateWindow()
        window.add(1000, at: 1 * second)
        window.add(1000, at: 2 * second)
        XCTAssertEqual(window.perSecond(now: 2 * second + 11 * second), 0)
        XCTAssertEqual(RateWindow().perSecond(now: 5 * second), 0)
    }

    /// The median pause's parts come from that one checkpoint, so they add up to it; each part's
    /// own median comes from another checkpoint, and they did not (more, or less, than the pause).
    func testTheMedianPausesPartsAddUpToIt() {
        var pauses = RecentSamples(capacity: 8), copies = RecentSamples(capacity: 8), others = RecentSamples(capacity: 8)
        // (copy, other) per checkpoint: long copies and long others never in the same one.
        let samples: [(Double, Double)] = [(0.9, 0.1), (0.1, 0.9), (0.8, 0.1), (0.1, 0.8), (0.5, 0.2), (0.7, 0.1), (0.1, 0.7),
                                           (0.2, 0.2), (0.3, 0.3), (0.6, 0.1)]   // more than the window holds: it wraps
        for (copy, other) in samples {
            pauses.add(copy + other); copies.add(copy); others.add(other)
        }
        let median = try! XCTUnwrap(pauses.positionOfPercentile(50))
        XCTAssertEqual(copies.value(at: median) + others.value(at: median), pauses.percentile(50), accuracy: 1e-12)
        XCTAssertNotEqual(copies.percentile(50) + others.percentile(50), pauses.percentile(50), accuracy: 0.05,
                          "the medians of the parts, which the table used to show, do not add up to it")
    }
}
