@testable import DirtyMigCore
import XCTest

/// `migrate --bandwidth`: before each batch the sender sleeps until the bytes sent so far fit
/// the rate, in slices of at most 50 ms; and under a low rate its batches shrink to a quarter
/// second's worth. On a stand-in clock that moves only when the limiter sleeps.
final class BandwidthLimiterTests: XCTestCase {
    private final class FakeClock {
        var now: UInt64 = 5_000_000_000
        var sleeps: [UInt64] = []
    }

    private let ms: UInt64 = 1_000_000

    private func limiter(_ rate: UInt64?, _ clock: FakeClock) -> BandwidthLimiter {
        BandwidthLimiter(bytesPerSecond: rate, now: { clock.now }, sleep: { clock.sleeps.append($0); clock.now += $0 })
    }

    func testWithoutARateNothingWaits() {
        let clock = FakeClock()
        limiter(nil, clock).willSend(1 << 30)
        limiter(0, clock).willSend(1 << 30)
        XCTAssertEqual(clock.sleeps, [])
    }

    func testItSleepsUntilTheBytesFitTheRateInSlicesOfFiftyMilliseconds() {
        let clock = FakeClock()
        let start = clock.now
        let paced = limiter(1000, clock)
        paced.willSend(125)   // 125 bytes at 1000 B/s: 125 ms
        XCTAssertEqual(clock.sleeps, [50 * ms, 50 * ms, 25 * ms])
        XCTAssertEqual(clock.now, start + 125 * ms)
        // The count is cumulative: 500 bytes in all are due at 500 ms.
        clock.sleeps = []
        paced.willSend(375)
        XCTAssertEqual(clock.sleeps, [UInt64](repeating: 50 * ms, count: 7) + [25 * ms])
        XCTAssertEqual(clock.now, start + 500 * ms)
    }

    func testASenderThatFellBehindSendsWithoutWaitingUntilItCatchesUp() {
        let clock = FakeClock()
        let start = clock.now
        let paced = limiter(1000, clock)
        clock.now = start + 2_500 * ms   // a slow link: 2.5 s went by with nothing sent
        paced.willSend(1000)             // due at 1 s
        paced.willSend(1500)             // due at 2.5 s: now
        XCTAssertEqual(clock.sleeps, [])
        paced.willSend(250)              // due at 2.75 s
        XCTAssertEqual(clock.sleeps, [UInt64](repeating: 50 * ms, count: 5))
    }

    func testACancelEndsTheWaitWithinOneSlice() {
        let clock = FakeClock()
        let paced = limiter(1000, clock)
        paced.willSend(1000, shouldStop: { clock.sleeps.count >= 3 })
        XCTAssertEqual(clock.sleeps, [50 * ms, 50 * ms, 50 * ms])
        // What was to be sent still counts: 1000 more bytes are due at 2 s, not 1 s.
        clock.sleeps = []
        paced.willSend(1000)
        XCTAssertEqual(clock.sleeps.reduce(0, +), 1_850 * ms)
    }

    /// `migrate --set bandwidth=`: the limiter asks for the rate before every batch and every
    /// slice of a wait.
    private final class ChangingRate: @unchecked Sendable {
        var bytesPerSecond: UInt64?
        init(_ rate: UInt64?) { bytesPerSecond = rate }
    }

    private func limiter(_ rate: ChangingRate, _ clock: FakeClock) -> BandwidthLimiter {
        BandwidthLimiter(rate: { rate.bytesPerSecond }, now: { clock.now }, sleep: { clock.sleeps.append($0); clock.now += $0 })
    }

    func testANewRateCountsFromTheNextBatch() {
        let clock = FakeClock()
        let rate = ChangingRate(1000)
        let paced = limiter(rate, clock)
        paced.willSend(500)   // 500 ms at 1000 B/s
        XCTAssertEqual(clock.sleeps.reduce(0, +), 500 * ms)
        rate.bytesPerSecond = 4000
        clock.sleeps = []
        paced.willSend(1000)  // 250 ms at 4000 B/s, not the 1000 ms the old rate wanted
        XCTAssertEqual(clock.sleeps.reduce(0, +), 250 * ms)
        rate.bytesPerSecond = 500
        clock.sleeps = []
        paced.willSend(100)   // 200 ms at 500 B/s
        XCTAssertEqual(clock.sleeps.reduce(0, +), 200 * ms)
    }

    func testANewRateCountsWithinAWaitAndWhatTheOldOneOwedIsPacedAtTheNewOne() {
        let clock = FakeClock()
        let rate = ChangingRate(1000)
        let paced = limiter(rate, clock)
        // 1000 bytes at 1000 B/s: 1 s. After the first 50 ms slice the cap rises tenfold: the
        // 950 bytes still owed take 95 ms at the new rate.
        paced.willSend(1000, shouldStop: {
            if clock.sleeps.count == 1 { rate.bytesPerSecond = 10_000 }
            return false
        })
        XCTAssertEqual(clock.sleeps, [50 * ms, 50 * ms, 45 * ms])
    }

    func testRemovingTheCapEndsTheWait() {
        let clock = FakeClock()
        let rate = ChangingRate(1000)
        let paced = limiter(rate, clock)
        paced.willSend(1000, shouldStop: {
            if clock.sleeps.count == 2 { rate.bytesPerSecond = nil }
            return false
        })
        XCTAssertEqual(clock.sleeps, [50 * ms, 50 * ms])
        paced.willSend(1 << 30)
        XCTAssertEqual(clock.sleeps, [50 * ms, 50 * ms], "unlimited: nothing waits")
        // A cap set again counts from then: no debt from the unlimited stretch.
        rate.bytesPerSecond = 1000
        paced.willSend(100)
        XCTAssertEqual(clock.sleeps, [50 * ms, 50 * ms, 50 * ms, 50 * ms])
    }

    func testBatchesShrinkToAQuarterSecondUnderALowRate() {
        XCTAssertEqual(PageSender.batchLimit(bytesPerSecond: nil), 2 << 20)
        XCTAssertEqual(PageSender.batchLimit(bytesPerSecond: 100 << 20), 2 << 20)
        XCTAssertEqual(PageSender.batchLimit(bytesPerSecond: 8 << 20), 2 << 20)
        XCTAssertEqual(PageSender.batchLimit(bytesPerSecond: 1 << 20), 256 << 10)
        XCTAssertEqual(PageSender.batchLimit(bytesPerSecond: 300_000), 75_000)
        XCTAssertEqual(PageSender.batchLimit(bytesPerSecond: 4096), 64 << 10, "at least 64 KiB")
    }
}
