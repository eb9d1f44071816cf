import DirtyMigCore
import Foundation
import XCTest

/// Post-copy between two hosts (network namespaces joined by a 20 Mbit/s link), encrypted on
/// both of its connections: the guest writes faster than the link carries, switches after the
/// first pass, and a 2 s cut during post-copy (shorter than --link-timeout) is ridden out: the
/// vCPUs that touch a page still at the source wait, and everything lands once the link is back.
final class PostCopyLinkTests: TwoHostTestCase {
    override class var directoryPrefix: String { "dmp" }

    private func phase(_ name: String) -> String? {
        guard let client = try? ControlClient(path: socket(name), callTimeout: 2) else { return nil }
        defer { client.close() }
        return (try? client.call("query-migrate"))?["phase"]?.stringValue
    }

    func testACutDuringPostCopyIsRiddenOutAndEveryPageLands() throws {
        if let reason = UserFaultFD.unavailableReason() { throw XCTSkip("skipped: needs userfaultfd (\(reason))") }
        let key = try makePSKFile("key.psk")
        try startDestination(key: key)
        // vCPU 0 rewrites 6 MiB at random at 40 MiB/s (the link carries 2.4 MiB/s): pass 1 takes
        // about 2.5 s, and post-copy about as long. vCPU 1 checks 1 MiB slowly.
        let (_, sourceOut, sourceErrors) = try start(["boot", "--memory", "128M", "--vcpus", "2", "--control", socket("source"),
                                                      "--workload", "0:check,ws=6M,pattern=random,rate=40M",
                                                      "--workload", "1:check,ws=1M,offset=16M,rate=1M"],
                                                     prefix: link.inside(link.left))
        XCTAssertNotNil(CLI.readLine(sourceOut), stderrText(sourceErrors))
        try waitForWrites(socket("source"), pages: 1536)
        let migrate = Process()
        migrate.executableURL = CLI.binary
        migrate.arguments = ["migrate", "--vm", socket("source"), "--to", "\(link.rightAddress):\(port)", "--psk-file", key,
                             "--postcopy", "--postcopy-after", "1", "--link-timeout", "10s", "--verify", "--json"]
        let out = Pipe(), errors = Pipe()
        migrate.standardOutput = out
        migrate.standardError = errors
        try migrate.run()
        processes.append(migrate)

        waitFor("post-copy", timeout: 30) { phase("source") == "post-copy" || !migrate.isRunning }
        XCTAssertTrue(migrate.isRunning, "the migration ended before post-copy: \(stderrText(errors))")
        Thread.sleep(forTimeInterval: 0.3)
        try link.cut()
        Thread.sleep(forTimeInterval: 2)
        try link.restore()
        guard waitUntil(seconds: 60, { !migrate.isRunning }) else {
            return XCTFail("the migration did not end within 60 s of the link's return: \(stderrText(errors))")
        }
        let report = try JSONValue.parse(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines))
        let postcopy = report["postcopy"]
        print("post-copy across a 20 Mbit/s link cut for 2 s: \(report["status"]?.stringValue ?? "?"), total \(Int(report["total_ms"]?.doubleValue ?? 0)) ms, downtime \(String(format: "%.1f", report["downtime_ms"]?.doubleValue ?? -1)) ms; \(postcopy.map { "\($0)" } ?? "no post-copy")")
        XCTAssertEqual(migrate.terminationStatus, 0, stderrText(errors))
        XCTAssertEqual(report["status"]?.stringValue, "completed", "\(report)")
        XCTAssertEqual(report["verify"]?.stringValue, "passed", "\(report)")
        let lacking = postcopy?["lacking_pages"]?.doubleValue ?? 0
        XCTAssertGreaterThan(lacking, 0)
        XCTAssertEqual((postcopy?["answered_pages"]?.doubleValue ?? 0) + (postcopy?["pushed_pages"]?.doubleValue ?? 0), lacking,
                       "every lacking page sent once")
        // The guest runs on at the destination and finds its memory intact.
        func passes() -> [Double] { status("destination")?["vcpu_stats"]?.arrayValue?.map { $0["passes"]?.doubleValue ?? 0 } ?? [] }
        let atTheEnd = passes()
        XCTAssertEqual(atTheEnd.count, 2)
        waitFor("the destination's guest to check all its memory again", timeout: 20) {
            zip(passes(), atTheEnd).allSatisfy { $0 >= $1 + 1 }
        }
        let errorsSeen = status("destination")?["vcpu_stats"]?.arrayValue?.map { $0["guest_errors"]?.doubleValue ?? -1 } ?? []
        XCTAssertEqual(errorsSeen, [0, 0], "no page lost, stale or torn")
    }
}
