@testable import DirtyMigCore
import Foundation
import XCTest

/// The receiver's side of a session, without a receiver or /dev/kvm: what it admits (only the
/// roles its hello announced, no more of each than announced, nothing once ended), how a
/// joined connection is handed over by role, and that ending it closes every connection that
/// joined, taken or not.
final class IncomingSessionTests: XCTestCase {
    /// A connected loopback pair: (this end, the peer's end).
    private func pair() throws -> (TCPSocket, TCPSocket) {
        let listener = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        defer { listener.shutdown() }
        let client = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: listener.localPort))
        let server = try listener.accept()
        client.setTimeouts(send: 5, receive: 5)
        server.setTimeouts(send: 5, receive: 5)
        return (server, client)
    }

    func testAdmissionIsBoundedByWhatTheHelloAnnounced() {
        let session = IncomingSession(id: SessionID(high: 1, low: 2), announced: SessionJoins(pages: 2, faults: 1))
        XCTAssertNil(session.admit(.faults))
        XCTAssertEqual(session.admit(.faults),
                       "session 00000000000000010000000000000002 already has the 1 faults connection its hello announced")
        XCTAssertNil(session.admit(.pages))
        XCTAssertNil(session.admit(.pages))
        XCTAssertEqual(session.admit(.pages),
                       "session 00000000000000010000000000000002 already has the 2 pages connections its hello announced")
        XCTAssertEqual(session.admit(.control),
                       "session 00000000000000010000000000000002 did not announce a control connection (its hello announced 2 pages and 1 faults)")

        let alone = IncomingSession(id: SessionID(high: 0, low: 3), announced: .none)
        XCTAssertEqual(alone.admit(.faults),
                       "session 00000000000000000000000000000003 did not announce a faults connection (its hello announced no other connection)")
        alone.end("completed")
        XCTAssertEqual(alone.admit(.faults),
                       "session 00000000000000000000000000000003 has ended (completed): no connection joins it any more")
    }

    func testAJoinedConnectionIsTakenByItsRoleAndATakeWaitsForIt() throws {
        let session = IncomingSession(id: .random(), announced: SessionJoins(pages: 1, faults: 1))
        let (faults, faultsPeer) = try pair()
        let (pages, pagesPeer) = try pair()
        XCTAssertNil(session.admit(.faults))
        XCTAssertNil(session.admit(.pages))
        session.deliver(pages, role: .pages)
        // Nothing of another role is handed over: the faults take waits, for its deadline.
        var started = MonotonicClock.seconds()
        XCTAssertNil(session.take(.faults, timeout: 0.2))
        XCTAssertGreaterThanOrEqual(MonotonicClock.seconds() - started, 0.19)
        // A take that waits gets the connection as it is delivered.
        let delivery = OSThread(name: "test-deliver") {
            usleep(200_000)
            session.deliver(faults, role: .faults)
        }
        started = MonotonicClock.seconds()
        let taken = try XCTUnwrap(session.take(.faults, timeout: 5))
        print("a take waiting for a faults connection got it \(Int((MonotonicClock.seconds() - started) * 1000)) ms later")
        delivery.join()
        XCTAssertTrue(taken === faults)
        XCTAssertTrue(try XCTUnwrap(session.take(.pages, timeout: 0)) === pages)
        XCTAssertNil(session.take(.pages, timeout: 0), "each connection is handed over once")
        XCTAssertEqual(session.joinedCount, 2)
        try faultsPeer.send(Array("fault".utf8))
        XCTAssertEqual(try taken.receive(count: 5), Array("fault".utf8))
        withExtendedLifetime(pagesPeer) {}
    }

    func testEndingTheSessionClosesEveryJoinedConnection() throws {
        let session = IncomingSession(id: .random(), announced: SessionJoins(pages: 2, faults: 1))
        let (faults, faultsPeer) = try pair()
        let (pages, pagesPeer) = try pair()
        let (late, latePeer) = try pair()
        XCTAssertNil(session.admit(.faults))
        XCTAssertNil(session.admit(.pages))
        XCTAssertNil(session.admit(.pages))
        session.deliver(faults, role: .faults)
        session.deliver(pages, role: .pages)
        XCTAssertNotNil(session.take(.faults, timeout: 0))   // taken or not, both close with the session
        // A take waiting when the session ends returns at once, empty-handed.
        let waiting = OSThread(name: "test-take") { XCTAssertNil(session.take(.faults, timeout: 30)) }
        usleep(100_000)
        let ended = MonotonicClock.seconds()
        session.end("failed: the source went away")
        waiting.join()
        XCTAssertLessThan(MonotonicClock.seconds() - ended, 5)
        XCTAssertTrue(session.isEnded)
        XCTAssertThrowsError(try faultsPeer.receive(count: 1), "the taken faults connection was closed")
        XCTAssertThrowsError(try pagesPeer.receive(count: 1), "the waiting pages connection was closed")
        XCTAssertNil(session.take(.pages, timeout: 0))
        // One admitted just before the end and delivered after it is closed at once.
        session.deliver(late, role: .pages)
        XCTAssertThrowsError(try latePeer.receive(count: 1), "a connection delivered to an ended session was closed")
        XCTAssertEqual(session.joinedCount, 0)
    }
}
