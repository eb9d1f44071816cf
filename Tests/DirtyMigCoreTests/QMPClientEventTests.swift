import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// QMPClient keeps the events that arrive while a command waits for its reply, so that
/// `waitForEvent` still finds a MIGRATION event QEMU sent between `migrate` and its reply (the
/// migration benchmark waits for that event instead of polling). A scripted QMP peer on a Unix
/// socket stands in for QEMU; waits are bounded only so a bug fails instead of hanging.
final class QMPClientEventTests: XCTestCase {
    func testEventSentBeforeAReplyIsKeptForWaitForEvent() throws {
        var template = Array("/tmp/dmq-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw XCTSkip("cannot create a temporary directory under /tmp") }
        let directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let listener = try UnixSocket.listen(path: directory + "/qmp.sock")

        let peer = OSThread(name: "fake-qmp") {
            guard let connection = try? listener.accept() else { return }
            defer { connection.close() }
            func answer(_ lines: [String]) throws {
                _ = try connection.readLine(limit: 1 << 16, deadline: MonotonicClock.nanoseconds() + 10_000_000_000)
                for line in lines { try connection.writeLine(line) }
            }
            do {
                try connection.writeLine(#"{"QMP": {"version": {}, "capabilities": []}}"#)
                try answer([#"{"return": {}}"#])   // qmp_capabilities
                // migrate: the migration ends before QEMU's reply is read.
                try answer([#"{"event": "MIGRATION", "data": {"status": "setup"}}"#,
                            #"{"event": "MIGRATION", "data": {"status": "completed"}}"#,
                            #"{"return": {}}"#])
                // query-status, then one more event after the reply.
                try answer([#"{"return": {"status": "postmigrate"}}"#,
                            #"{"event": "STOP", "data": {}}"#])
                // Stay connected (silent) while the client's last wait times out.
                _ = try connection.readLine(limit: 1 << 16, deadline: MonotonicClock.nanoseconds() + 2_000_000_000)
            } catch {}
        }

        let client = try QMPClient(path: directory + "/qmp.sock", timeout: 10)
        try client.execute("migrate", ["uri": "tcp:127.0.0.1:1"])
        XCTAssertEqual(try client.execute("query-status")["status"]?.stringValue, "postmigrate")
        let completed = try client.waitForEvent("MIGRATION", timeout: 10) { $0["data"]?["status"]?.stringValue == "completed" }
        XCTAssertEqual(completed?["data"]?["status"]?.stringValue, "completed", "the event that came before migrate's reply was kept")
        XCTAssertNotNil(try client.waitForEvent("STOP", timeout: 10), "an event after the last reply is read from the socket")
        XCTAssertNil(try client.waitForEvent("MIGRATION", timeout: 0.2), "nothing more: the wait ends at its timeout")
        listener.shutdown(.both)
        listener.close()
        peer.join()
    }
}
