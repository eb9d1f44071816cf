@testable import DirtyMigCore
import Synchronization
import XCTest

/// `dirtymig failover` on a standby: refused while the primary is heard from (a byte within
/// --failover-after, while protecting), unless forced; granted once it is silent or lost; and a
/// checkpoint that arrives after the request is not applied, so the VM resumes from the one the
/// request named. On a stand-in clock for the primary's last byte.
final class StandbyFailoverTests: XCTestCase {
    /// When the primary's last byte came (monotonic ns), as the connection would say.
    private final class LastByte: Sendable { let nanoseconds = Atomic<UInt64>(0) }
    private let lastByte = LastByte()

    private func session(failoverAfter: Double = 0.5) -> StandbySession {
        StandbySession(primary: "10.0.0.1:4444", options: StandbyOptions(failover: .auto, failoverAfterSeconds: failoverAfter),
                       lastByte: { [lastByte] in lastByte.nanoseconds.load(ordering: .relaxed) })
    }

    private func heard(millisecondsAgo: Double) {
        lastByte.nanoseconds.store(MonotonicClock.nanoseconds() - UInt64(millisecondsAgo * 1e6), ordering: .relaxed)
    }

    private func commit(_ session: StandbySession, _ epoch: UInt64) throws -> Bool {
        try session.commit(epoch, applying: { () throws(MigrationError) in })
    }

    func testNothingToResumeBeforeTheFirstCheckpoint() {
        let standby = session()
        heard(millisecondsAgo: 5000)
        XCTAssertThrowsError(try standby.requestFailover(force: true)) { error in
            XCTAssertEqual(error as? StandbySession.FailoverRefusal, .noCheckpoint)
        }
    }

    func testAPrimaryHeardFromIsNotTakenOverUnlessForced() throws {
        let standby = session()
        XCTAssertTrue(try commit(standby, 7))
        heard(millisecondsAgo: 12)
        XCTAssertThrowsError(try standby.requestFailover(force: false)) { error in
            guard case .primaryAlive(let milliseconds)? = error as? StandbySession.FailoverRefusal else {
                return XCTFail("\(error)")
            }
            XCTAssertEqual(milliseconds, 12, accuracy: 100)
            let text = "\(error)"
            for words in ["the primary was heard from", "ms ago", "a second copy", "stop the primary first", "--force"] {
                XCTAssertTrue(text.contains(words), text)
            }
        }
        XCTAssertFalse(standby.failoverRequested, "a refusal changes nothing")
        XCTAssertTrue(try commit(standby, 8), "checkpoints go on")

        let forced = try standby.requestFailover(force: true)
        XCTAssertEqual(forced.epoch, 8)
        XCTAssertNotNil(forced.primaryHeardMillisecondsAgo, "the reply says the primary was alive")
        XCTAssertTrue(standby.failoverRequest?.contains("--force") == true, standby.failoverRequest ?? "nil")
        // A checkpoint that comes after the request is not applied: the VM resumes from epoch 8.
        var applied = false
        XCTAssertFalse(try standby.commit(9, applying: { () throws(MigrationError) in applied = true }))
        XCTAssertFalse(applied)
        XCTAssertEqual(standby.json["committed_epoch"]?.doubleValue, 8)
    }

    func testASilentPrimaryIsTakenOverWithoutForce() throws {
        let standby = session(failoverAfter: 0.2)
        XCTAssertTrue(try commit(standby, 3))
        heard(millisecondsAgo: 250)   // past --failover-after: the receiving thread is about to call it lost
        let granted = try standby.requestFailover(force: false)
        XCTAssertEqual(granted.epoch, 3)
        XCTAssertNil(granted.primaryHeardMillisecondsAgo)
    }

    func testAPrimaryAlreadyLostIsTakenOverWithoutForce() throws {
        let standby = session()
        XCTAssertTrue(try commit(standby, 5))
        heard(millisecondsAgo: 1)   // its last byte just came, then its connection closed
        let waiting = Thread { _ = standby.awaitFailover(reason: "connection reset by peer", stopping: { false }) }
        waiting.start()
        while standby.json["phase"]?.stringValue != StandbySession.Phase.awaitingFailover.rawValue { usleep(1000) }
        XCTAssertEqual(try standby.requestFailover(force: false).epoch, 5)
    }
}
