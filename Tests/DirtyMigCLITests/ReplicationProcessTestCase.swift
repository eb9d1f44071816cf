import DirtyMigCore
import Foundation
import XCTest

/// What replication tests share: a VM's or a receiver's status through its control socket,
/// polling for a condition, and the lines a guest emitted (numbered, with its error count).
class ReplicationProcessTestCase: ProcessTestCase {
    func status(_ name: String) -> JSONValue? {
        guard let client = try? ControlClient(path: socket(name), callTimeout: 2) else { return nil }
        defer { client.close() }
        return try? client.call("query-status")
    }

    /// Polls until `condition` holds (or fails the test after `timeout` seconds).
    func waitFor(_ what: String, timeout: Double, file: StaticString = #filePath, line: UInt = #line,
                 _ condition: () throws -> Bool) rethrows {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if try condition() { return }
            usleep(5_000)
        }
        XCTFail("\(what) within \(timeout) s", file: file, line: line)
    }

    func outputLines(_ path: String) throws -> [GuestOutputLine] {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        XCTAssertTrue(text.isEmpty || text.hasSuffix("\n"), "\(path) ends in a torn line")
        return try text.split(separator: "\n").map { try XCTUnwrap(GuestOutputLine(parsing: $0), "not a guest line: \($0)") }
    }
}
