@testable import DirtyMigCore
import XCTest

/// Post-copy's bookkeeping without a VM: who sends which page at the source (a request jumps the
/// background stream, no page goes out twice, a fault moves the stream's position), and what the
/// destination does about each fault.
final class PostCopySchedulingTests: XCTestCase {
    private func bitmap(_ pageCount: Int, _ pages: [Int]) -> DirtyPageBitmap {
        var bitmap = DirtyPageBitmap(pageCount: pageCount)
        for page in pages { bitmap.set(page) }
        return bitmap
    }

    /// Drains the stream in runs of at most `maxPages`, returning every page it claimed in order.
    private func drain(_ queue: PostCopyPushQueue, maxPages: Int) -> [Int] {
        var pages: [Int] = []
        while let run = queue.claimNextRun(maxPages: maxPages) {
            XCTAssertLessThanOrEqual(run.count, maxPages)
            pages += Array(run)
        }
        return pages
    }

    func testTheStreamSendsEveryMissingPageOnceInRuns() {
        let missing = bitmap(300, Array(0..<10) + Array(64..<200) + [299])
        let queue = PostCopyPushQueue(missing: missing)
        let sent = drain(queue, maxPages: 32)
        XCTAssertEqual(sent, Array(0..<10) + Array(64..<200) + [299])
        XCTAssertTrue(queue.isDrained)
        XCTAssertNil(queue.claimNextRun(maxPages: 32))
        XCTAssertEqual(queue.tally, .init(requested: 0, answered: 0, pushed: 147, remaining: 0))
    }

    func testARequestJumpsTheQueueAndIsNeverSentTwice() {
        let queue = PostCopyPushQueue(missing: bitmap(1000, Array(0..<1000)))
        XCTAssertEqual(queue.claimNextRun(maxPages: 10), 0..<10)
        // Page 5 was claimed by the stream (it is on its way): the request is not answered again.
        XCTAssertEqual(queue.claimRequested([700, 5, 701]), [700, 701])
        var all = Array(0..<10) + [700, 701]
        all += drain(queue, maxPages: 64)
        XCTAssertEqual(all.count, 1000, "every page once")
        XCTAssertEqual(Set(all).count, 1000, "no page twice")
        XCTAssertEqual(queue.tally, .init(requested: 3, answered: 2, pushed: 998, remaining: 0))
        XCTAssertEqual(queue.claimRequested([700]), [], "a page sent already is not sent again")
    }

    func testAFaultMovesTheStreamToItsNeighbourhoodAndItWrapsAround() {
        let queue = PostCopyPushQueue(missing: bitmap(512, Array(0..<512)))
        XCTAssertEqual(queue.claimNextRun(maxPages: 8), 0..<8)
        XCTAssertEqual(queue.claimRequested([400]), [400])
        XCTAssertEqual(queue.claimNextRun(maxPages: 8), 401..<409, "pre-paging: the stream goes on after the fault")
        let rest = drain(queue, maxPages: 50)
        XCTAssertEqual(rest.first, 409)
        XCTAssertEqual(Array(rest.prefix(103)), Array(409..<512), "to the end of RAM")
        XCTAssertEqual(Array(rest.suffix(from: 103)), Array(8..<400), "then from the start, skipping nothing")
    }

    func testAResumeSendsExactlyTheLackingPagesAgainAndNoLandedOne() {
        // 128 pages lacking at the switch; the link fails after the stream claimed 0..<48 and a
        // request claimed 100. Of those, the destination got 0..<40 (the rest were in flight).
        let queue = PostCopyPushQueue(missing: bitmap(128, Array(0..<128)))
        var claimed: [Int] = []
        for _ in 0..<3 { claimed += Array(queue.claimNextRun(maxPages: 16)!) }
        XCTAssertEqual(queue.claimRequested([100]), [100])
        claimed.append(100)
        let landed = Set(0..<40)
        // The destination lacks everything that did not land, plus a page outside the switch's
        // set it cannot lack (ignored: never sent).
        let lacking = bitmap(128, (0..<128).filter { !landed.contains($0) })
        XCTAssertEqual(queue.resume(lacking: lacking), 9, "40..<48 and 100 were in flight: they go again")
        XCTAssertEqual(queue.tally.remaining, 88)
        XCTAssertEqual(queue.tally.resent, 9)
        XCTAssertEqual(queue.claimRequested([5, 41]), [41], "a landed page is never sent again, even when asked for")
        let second = drain(queue, maxPages: 16)
        XCTAssertTrue(Set(second).isDisjoint(with: landed), "no landed page twice")
        XCTAssertEqual(Set(second + [41]), Set(40..<128), "every page still lacking, once")
        XCTAssertEqual(second.count + 1, 88)

        // A second failure at once: nothing landed meanwhile, so everything claimed goes again.
        let queue2 = PostCopyPushQueue(missing: bitmap(64, Array(0..<64)))
        _ = queue2.claimNextRun(maxPages: 8)
        XCTAssertEqual(queue2.resume(lacking: bitmap(64, Array(0..<64))), 8)
        XCTAssertEqual(queue2.resume(lacking: bitmap(64, Array(0..<64))), 0, "nothing was claimed since the last resume")
        XCTAssertEqual(drain(queue2, maxPages: 64).sorted(), Array(0..<64), "from where the stream was, wrapping around")
        XCTAssertEqual(queue2.tally.resent, 8)

        // Pages outside the set the destination lacked at the switch are not sent.
        let queue3 = PostCopyPushQueue(missing: bitmap(64, [1, 2]))
        XCTAssertEqual(queue3.resume(lacking: bitmap(64, [2, 3, 63])), 0)
        XCTAssertEqual(drain(queue3, maxPages: 8), [2])
    }

    func testRequestsOutsideRAMAreIgnored() {
        let queue = PostCopyPushQueue(missing: bitmap(64, [1]))
        XCTAssertEqual(queue.claimRequested([UInt64.max, 64, 1]), [1])
    }

    // MARK: the destination's page map

    func testEachLackingPageIsRequestedOnceAndOthersAreZero() {
        let map = PostCopyPageMap(lacking: bitmap(100, [10, 11, 50]))
        XCTAssertEqual(map.fault(page: 10, thread: 1, at: 1_000), .request)
        XCTAssertEqual(map.fault(page: 10, thread: 2, at: 2_000), .wait, "a second thread waits for the same answer")
        XCTAssertEqual(map.fault(page: 20, thread: 1, at: 2_000), .placeZero, "never written at the source")
        XCTAssertTrue(map.landed(page: 10, at: 51_000))
        XCTAssertFalse(map.landed(page: 10, at: 52_000), "a duplicate changes nothing")
        XCTAssertEqual(map.fault(page: 10, thread: 3, at: 60_000), .placeZero, "landed: only a wake is needed")
        XCTAssertTrue(map.landed(page: 11, at: 70_000))
        XCTAssertEqual(map.remaining, 1)
        XCTAssertTrue(map.lacks(50))
        XCTAssertEqual(map.lackingPages().pageList(), [50])

        let figures = map.figures
        XCTAssertEqual(figures.faults, 4)
        XCTAssertEqual(figures.requested, 1)
        XCTAssertEqual(figures.latenciesMicroseconds, [50], "from the first fault to the landing")
        XCTAssertEqual(figures.blockedNanosecondsByThread, [1: 50_000, 2: 49_000],
                       "each waiting thread is charged from its own fault")
        XCTAssertEqual(figures.latencyMicroseconds(percentile: 0.5), 50)
    }

    func testLatencyPercentiles() {
        let figures = PostCopyFaultFigures(faults: 100, requested: 100, latenciesMicroseconds: (1...100).map { UInt32($0) },
                                           blockedNanosecondsByThread: [:])
        XCTAssertEqual(figures.latencyMicroseconds(percentile: 0.5), 50)
        XCTAssertEqual(figures.latencyMicroseconds(percentile: 0.99), 99)
        XCTAssertEqual(figures.latencyMicroseconds(percentile: 1), 100)
        XCTAssertNil(PostCopyFaultFigures(faults: 0, requested: 0, latenciesMicroseconds: [], blockedNanosecondsByThread: [:])
            .latencyMicroseconds(percentile: 0.5))
    }
}
