@testable import DirtyMigCore
import XCTest

/// How the primary tells a standby that is slow from one that is gone, with times passed in.
final class StandbyLivenessTests: XCTestCase {
    private let second: UInt64 = 1_000_000_000
    private func progress(_ acknowledged: UInt64, all: Bool) -> TCPSocket.Progress {
        TCPSocket.Progress(bytesAcknowledged: acknowledged, allAcknowledged: all)
    }

    func testACheckpointCrawlingOverASlowLinkKeepsTheStandbyAlive() {
        var liveness = StandbyLiveness(lossNanoseconds: second, now: 0)
        // Ten seconds of one checkpoint: the standby's TCP takes a little more every 100 ms.
        for tick in 1...100 {
            let now = UInt64(tick) * second / 10
            XCTAssertNil(liveness.observe(progress(UInt64(tick) * 25_000, all: false), awaitingAnswer: true, at: now), "at \(tick)")
        }
    }

    func testNothingHeardAndNothingTakenIsSilence() {
        var liveness = StandbyLiveness(lossNanoseconds: second, now: 0)
        XCTAssertNil(liveness.observe(progress(1000, all: false), awaitingAnswer: true, at: 0))
        XCTAssertNil(liveness.observe(progress(1000, all: false), awaitingAnswer: true, at: second))
        XCTAssertEqual(liveness.observe(progress(1000, all: false), awaitingAnswer: true, at: second + second / 10),
                       .silent(milliseconds: 1100))
    }

    /// The standby's host took the whole checkpoint and its reader never answers; the heartbeats
    /// sent meanwhile (each briefly unacknowledged, then taken) do not make it look alive.
    func testAStandbyHoldingTheCheckpointWithoutAnsweringIsLostDespiteHeartbeats() {
        var liveness = StandbyLiveness(lossNanoseconds: second, now: 0)
        XCTAssertNil(liveness.observe(progress(5000, all: true), awaitingAnswer: true, at: 0))
        var verdict: StandbyLiveness.Verdict?
        for tick in 1...15 where verdict == nil {
            let now = UInt64(tick) * second / 10
            verdict = liveness.observe(progress(5000 + UInt64(tick) * 16, all: tick % 2 == 0), awaitingAnswer: true, at: now)
        }
        XCTAssertEqual(verdict, .notAnswering(milliseconds: 1100))
    }

    func testAnAnswerOrNothingOwedEndsTheWait() {
        var liveness = StandbyLiveness(lossNanoseconds: second, now: 0)
        XCTAssertNil(liveness.observe(progress(5000, all: true), awaitingAnswer: true, at: 0))
        liveness.heard(at: second / 2)
        XCTAssertNil(liveness.observe(progress(5000, all: true), awaitingAnswer: true, at: second + second / 10),
                     "an answer came half-way: the wait counts from it")
        XCTAssertNil(liveness.observe(progress(5016, all: true), awaitingAnswer: false, at: second + second / 5))
        // Nothing owed and the standby's TCP takes our heartbeats: alive however long.
        for tick in 1...30 {
            XCTAssertNil(liveness.observe(progress(5016 + UInt64(tick) * 16, all: true), awaitingAnswer: false,
                                          at: second + UInt64(tick) * second / 10))
        }
    }
}
