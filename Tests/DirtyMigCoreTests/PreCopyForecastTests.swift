import DirtyMigCore
import XCTest

/// The time-left forecast of a pre-copy (eta_s), without KVM: what the sender measured goes in,
/// seconds come out, walked pass by pass as the sender would run them.
final class PreCopyForecastTests: XCTestCase {
    private let mib = 1_048_576.0

    private func forecast(bandwidth: Double? = 100 * 1_048_576, dirty: Double, remaining: Double, elapsed: Double = 0,
                          stopBelow: Double = 0, passesLeft: Int = 1000) -> PreCopyForecast {
        PreCopyForecast(bandwidthBytesPerSecond: bandwidth, dirtyBytesPerSecond: dirty, remainingBytes: remaining,
                        passElapsedSeconds: elapsed, stopBelowBytes: stopBelow, passesLeft: passesLeft)
    }

    func testNothingIsForecastBeforeAPassHasMeasuredTheLink() {
        XCTAssertNil(forecast(bandwidth: nil, dirty: 0, remaining: 100 * mib).secondsLeft)
        XCTAssertNil(forecast(bandwidth: 0, dirty: 0, remaining: 100 * mib).secondsLeft)
        var progress = MigrationProgress()
        progress.phase = "pre-copy"; progress.iteration = 1; progress.remainingPages = 1000
        XCTAssertEqual(progress.json["eta_s"], .null, "pass 1 has not measured the link yet")
        // In pass 1, after a second, with the dirty rate counted as it goes (ring, quota): the
        // link's rate over the last second stands in for a completed pass's.
        progress.throughputBytesPerSecond = 4096 * 1000
        progress.elapsedSeconds = 0.5
        XCTAssertEqual(progress.json["eta_s"], .null, "half a second into pass 1")
        progress.elapsedSeconds = 2
        XCTAssertEqual(progress.json["eta_s"], .null, "the dirty rate is not known yet (bitmap)")
        progress.dirtyPagesPerSecond = 0
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 1, accuracy: 1e-9, "1000 pages at 1000 pages/s, nothing dirtied")
        progress.throughputBytesPerSecond = nil
        progress.dirtyPagesPerSecond = nil
        progress.lastPassBandwidthBytesPerSecond = 4096 * 1000
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 1, accuracy: 1e-9, "1000 pages at 1000 pages/s, nothing dirtied")
        progress.phase = "completed"
        XCTAssertEqual(progress.json["eta_s"], .null, "an ended migration has no time left")
    }

    /// Under --compress the pages left move at the link's rate times the ratio: 3 page bytes
    /// per wire byte make a pass-1 forecast (and a post-copy one) three times shorter. The rate
    /// is the pass's average of what the link carried, not the last second's batches, and what
    /// the socket still holds drains at it after that.
    func testCompressedPagesAreForecastAtThePageRateNotTheWireRate() {
        var progress = MigrationProgress()
        progress.phase = "pre-copy"; progress.iteration = 1; progress.remainingPages = 3000
        progress.elapsedSeconds = 2; progress.passStartedSeconds = 1; progress.dirtyPagesPerSecond = 0
        progress.throughputBytesPerSecond = 4096 * 1200   // the last second's batches: not what counts
        progress.sentBytes = 4096 * 1000; progress.sentPageBytes = 3 * 4096 * 1000   // 1000 wire pages in the pass's second
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 1, accuracy: 1e-9, "3000 pages at 1000 wire pages/s x 3")
        progress.phase = "post-copy"
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 1, accuracy: 1e-9)
        progress.sentPageBytes = 1 << 19   // zero pages and headers: never a ratio below 1
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 3, accuracy: 1e-9)
        // 500 of the pass's 1500 pages are still in the socket: the link carried 1000 in the
        // second, and drains those 500 in half a second more.
        progress.sentBytes = 4096 * 1500; progress.queuedWireBytes = 4096 * 500
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 3.5, accuracy: 1e-9)
        progress.phase = "pre-copy"
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 3.5, accuracy: 1e-9)
        // In post-copy's first second, the last second's throughput stands in (pre-copy's first
        // pass forecasts nothing before its first second).
        progress.passStartedSeconds = 1.5
        XCTAssertEqual(progress.json["eta_s"], .null)
        progress.phase = "post-copy"
        XCTAssertEqual(progress.json["eta_s"]?.doubleValue ?? -1, 3000.0 / 1200 + 500.0 / 1200, accuracy: 1e-9)
    }

    /// An idle guest: what is left of the pass, at the link's rate.
    func testAnIdleGuestLeavesTheRestOfThePassAtTheLinksRate() throws {
        XCTAssertEqual(try XCTUnwrap(forecast(dirty: 0, remaining: 250 * mib).secondsLeft), 2.5, accuracy: 1e-9)
    }

    /// A steady writer at a fifth of the link: the passes form a geometric series whose sum is
    /// the rest of this pass plus what the writer dirtied, sent at the rate the link gains on it.
    func testASteadyWriterFollowsTheGeometricSeries() throws {
        let rate = 100 * mib, dirty = 20 * mib, remaining = 300 * mib, elapsed = 2.0
        let rest = remaining / rate
        let closedForm = rest + dirty * (elapsed + rest) / (rate - dirty)
        let walked = try XCTUnwrap(forecast(dirty: dirty, remaining: remaining, elapsed: elapsed, stopBelow: 1).secondsLeft)
        XCTAssertEqual(walked, closedForm, accuracy: closedForm * 0.001)
    }

    /// Pre-copy stops once a pass leaves at most the downtime target's worth: fewer passes, less time.
    func testTheStoppingPointShortensTheForecast() throws {
        let full = try XCTUnwrap(forecast(dirty: 50 * mib, remaining: 100 * mib, stopBelow: 1).secondsLeft)
        let early = try XCTUnwrap(forecast(dirty: 50 * mib, remaining: 100 * mib, stopBelow: 30 * mib).secondsLeft)
        XCTAssertLessThan(early, full)
        // 1 s for this pass; 50 MiB dirtied meanwhile; one more pass (0.5 s) leaves 25 MiB, under
        // the 30 MiB target, sent in the pause (0.25 s).
        XCTAssertEqual(early, 1.75, accuracy: 1e-9)
    }

    /// A guest that dirties nearly as fast as the link carries, or a pass limit that runs out
    /// first: no figure, rather than a guess.
    func testNoForecastWhereThePreCopyCannotConverge() {
        XCTAssertNil(forecast(dirty: 96 * mib, remaining: 100 * mib, stopBelow: 1).secondsLeft)
        XCTAssertNil(forecast(dirty: 150 * mib, remaining: 100 * mib, stopBelow: 1).secondsLeft)
        XCTAssertNil(forecast(dirty: 50 * mib, remaining: 100 * mib, stopBelow: 1, passesLeft: 2).secondsLeft)
        XCTAssertNotNil(forecast(dirty: 50 * mib, remaining: 100 * mib, stopBelow: 30 * mib, passesLeft: 1).secondsLeft)
    }
}
