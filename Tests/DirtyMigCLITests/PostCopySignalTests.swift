import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// What SIGTERM does to each side during post-copy, as the man page says: once the switch is
/// out, a signal to the source no longer cancels anything (the guest may be running at the
/// destination and needs the pages only the source has): the source sends every page, then
/// stops its VM and exits 0; a signal to the destination lets post-copy finish, then stops the
/// VM there like any running VM.
final class PostCopySignalTests: ReplicationProcessTestCase {
    override class var directoryPrefix: String { "dmq" }

    private func boot(_ name: String) throws -> Process {
        // vCPU 0 rewrites 24 MiB at random at 100 MiB/s, five times what the 20 MiB/s cap carries:
        // pass 1 takes about 1.2 s, post-copy about as long.
        let (process, output, errors) = try start(["boot", "--memory", "256M", "--vcpus", "2", "--control", socket(name),
                                                   "--workload", "0:check,ws=24M,pattern=random,rate=100M",
                                                   "--workload", "1:check,ws=1M,offset=64M,rate=1M"])
        let ready = try XCTUnwrap(CLI.readLine(output), "boot printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("running"), ready)
        return process
    }

    private func receive(_ name: String, port: UInt16) throws -> (Process, Pipe) {
        let (process, output, errors) = try start(["receive", "--listen", "127.0.0.1:\(port)", "--control", socket(name)])
        let ready = try XCTUnwrap(CLI.readLine(output), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening"), ready)
        return (process, errors)
    }

    private func phase(_ name: String) -> String? {
        guard let client = try? ControlClient(path: socket(name), callTimeout: 2) else { return nil }
        defer { client.close() }
        return (try? client.call("query-migrate"))?["phase"]?.stringValue
    }

    /// Boots, receives and starts `migrate --postcopy --postcopy-after 1 --verify`; returns once
    /// the source is in post-copy.
    private func startPostCopy(_ source: String, _ destination: String) throws -> (source: Process, receiver: Process, receiverErrors: Pipe,
                                                                                   migrate: Process, report: FileHandle) {
        if let reason = UserFaultFD.unavailableReason() { throw XCTSkip("skipped: needs userfaultfd (\(reason))") }
        let vm = try boot(source)
        let port = try freePort()
        let (receiver, receiverErrors) = try receive(destination, port: port)
        try waitForWrites(socket(source), pages: 6144)
        let (migrate, report, _) = try start(["migrate", "--vm", socket(source), "--to", "127.0.0.1:\(port)", "--json",
                                              "--bandwidth", "20M", "--postcopy", "--postcopy-after", "1", "--verify"])
        waitFor("post-copy", timeout: 30) { phase(source) == "post-copy" || !migrate.isRunning }
        XCTAssertTrue(migrate.isRunning, "the migration ended before post-copy")
        return (vm, receiver, receiverErrors, migrate, report)
    }

    private func finished(_ migrate: Process, _ report: FileHandle) throws -> JSONValue {
        XCTAssertTrue(waitUntil(seconds: 60) { !migrate.isRunning }, "migrate did not end")
        return try JSONValue.parse(String(decoding: report.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines))
    }

    func testSIGTERMToTheSourceDuringPostCopySendsEveryPageThenExits() throws {
        let run = try startPostCopy("tsrc", "tdst")
        kill(run.source.processIdentifier, SIGTERM)
        let json = try finished(run.migrate, run.report)
        XCTAssertEqual(json["status"]?.stringValue, "completed", "\(json)")
        XCTAssertEqual(json["verify"]?.stringValue, "passed", "\(json)")
        XCTAssertTrue(waitUntil(seconds: 10) { !run.source.isRunning }, "the source exits once post-copy is done")
        XCTAssertEqual(run.source.terminationStatus, 0)
        XCTAssertTrue(run.receiver.isRunning)
        try assertGuestRuns(socket: socket("tdst"), vcpus: 2)
        let errors = status("tdst")?["vcpu_stats"]?.arrayValue?.map { $0["guest_errors"]?.doubleValue ?? -1 } ?? []
        XCTAssertEqual(errors, [0, 0], "no page lost, stale or torn")
    }

    func testSIGTERMToTheDestinationDuringPostCopyLetsItFinishThenStopsTheVM() throws {
        let run = try startPostCopy("rsrc", "rdst")
        kill(run.receiver.processIdentifier, SIGTERM)
        let json = try finished(run.migrate, run.report)
        XCTAssertEqual(json["status"]?.stringValue, "completed", "\(json)")
        XCTAssertEqual(json["verify"]?.stringValue, "passed", "\(json)")
        XCTAssertTrue(waitUntil(seconds: 10) { !run.receiver.isRunning }, "the destination stops its VM as asked: \(stderrText(run.receiverErrors))")
        XCTAssertEqual(run.receiver.terminationStatus, 0, stderrText(run.receiverErrors))
        XCTAssertTrue(waitUntil(seconds: 10) { !run.source.isRunning }, "the source stops its copy after a completed migration")
    }

    /// While post-copy is paused (the link through the test's relay is down), SIGTERM to the
    /// source does not discard its pages: it says so, keeps serving its control socket and stays
    /// paused; once the link is back post-copy resumes and completes, then the source exits 0.
    func testSIGTERMToTheSourceWhilePostCopyIsPausedWaitsForItsEnd() throws {
        if let reason = UserFaultFD.unavailableReason() { throw XCTSkip("skipped: needs userfaultfd (\(reason))") }
        let vm = try boot("psrc")
        let port = try freePort()
        _ = try receive("pdst", port: port)
        let relay = try FaultRelay(to: port, servesMany: true)
        defer { relay.stop() }
        try waitForWrites(socket("psrc"), pages: 6144)
        let (migrate, report, _) = try start(["migrate", "--vm", socket("psrc"), "--to", "127.0.0.1:\(relay.port)", "--json",
                                              "--bandwidth", "20M", "--postcopy", "--postcopy-after", "1", "--verify"])
        waitFor("post-copy", timeout: 30) { phase("psrc") == "post-copy" || !migrate.isRunning }
        relay.setDown(true)
        relay.cut()
        let paused = PostCopyLinkState.pausedStateName
        waitFor("both sides to pause", timeout: 20) {
            status("psrc")?["state"]?.stringValue == paused && status("pdst")?["state"]?.stringValue == paused
        }
        kill(vm.processIdentifier, SIGTERM)
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertTrue(vm.isRunning, "the source keeps the only copy of the pages the destination lacks")
        XCTAssertEqual(status("psrc")?["state"]?.stringValue, paused, "and still answers on its control socket")
        relay.setDown(false)
        let json = try finished(migrate, report)
        XCTAssertEqual(json["status"]?.stringValue, "completed", "\(json)")
        XCTAssertEqual(json["verify"]?.stringValue, "passed", "\(json)")
        XCTAssertEqual(json["postcopy"]?["recoveries"]?.doubleValue, 1)
        XCTAssertTrue(waitUntil(seconds: 10) { !vm.isRunning }, "the source exits once post-copy is done")
        XCTAssertEqual(vm.terminationStatus, 0)
        try assertGuestRuns(socket: socket("pdst"), vcpus: 2)
    }
}
