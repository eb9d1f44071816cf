import DirtyMigCore
import Foundation
import XCTest

/// A running migration watched and steered from another shell, as a user does it: `migrate
/// --status`, `migrate --set`, and `list` while `dirtymig migrate` runs in the background. VMs
/// and receivers run detached in a private XDG_RUNTIME_DIR, so `list` finds them.
final class MigrationSteeringTests: ProcessTestCase {
    override class var directoryPrefix: String { "dms" }
    private var environment: [String: String] = [:]
    private var detached: [String] = []

    override func setUpWithError() throws {
        try super.setUpWithError()
        environment = ProcessInfo.processInfo.environment
        environment["XDG_RUNTIME_DIR"] = directory
    }

    override func tearDown() {
        for name in detached { _ = try? CLI.run(["stop", "--vm", name], environment: environment) }
        super.tearDown()
    }

    private func run(_ arguments: [String]) throws -> CLI.Result { try CLI.run(arguments, environment: environment) }

    private func vmSocket(_ name: String) -> String { directory + "/dirtymig/\(name).sock" }

    private func detach(_ name: String, _ arguments: [String]) throws {
        let result = try run(arguments + ["--name", name, "--detach"])
        XCTAssertEqual(result.status, 0, "\(arguments): \(result.stderr)")
        detached.append(name)
    }

    /// `dirtymig migrate` in the background; its report goes to a file (a pipe nobody reads
    /// would fill with a long report and block it).
    private func startMigration(_ arguments: [String]) throws -> (process: Process, report: String) {
        let report = directory + "/report-\(processes.count).json"
        XCTAssertTrue(FileManager.default.createFile(atPath: report, contents: nil))
        let process = Process()
        process.executableURL = CLI.binary
        process.arguments = ["migrate"] + arguments + ["--json"]
        process.environment = environment
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: report))
        process.standardError = FileHandle.nullDevice
        try process.run()
        processes.append(process)
        return (process, report)
    }

    private func finished(_ migration: (process: Process, report: String), within seconds: Double) throws -> JSONValue {
        XCTAssertTrue(waitUntil(seconds: seconds) { !migration.process.isRunning }, "migrate did not end within \(seconds) s")
        XCTAssertEqual(migration.process.terminationStatus, 0)
        let text = try String(contentsOfFile: migration.report, encoding: .utf8)
        return try JSONValue.parse(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    private func progress(_ name: String) -> JSONValue? {
        guard let client = try? ControlClient(path: vmSocket(name), callTimeout: 2) else { return nil }
        defer { client.close() }
        return try? client.call("query-migrate")
    }

    func testStatusSetAndListWhileAThrottledMigrationRuns() throws {
        // 64 MiB written once, then idle: pass 1 carries it; at 4 MiB/s that lasts 16 s.
        try detach("src", ["boot", "--memory", "256M", "--vcpus", "2", "--workload", "0:write,ws=64M,passes=1", "--workload", "1:idle"])
        try waitForWrites(vmSocket("src"), pages: 16_000)
        let port = try freePort()
        try detach("dst", ["receive", "--listen", "127.0.0.1:\(port)"])

        // Nothing migrates yet: said plainly, exit 1.
        let idle = try run(["migrate", "--vm", "src", "--status"])
        XCTAssertEqual(idle.status, 1)
        XCTAssertTrue(idle.stderr.contains("no migration of 'src' is under way"), idle.stderr)
        XCTAssertEqual(idle.stdout, "")
        let idleJSON = try run(["migrate", "--vm", "src", "--status", "--json"])
        XCTAssertEqual(idleJSON.status, 1)
        XCTAssertEqual(try JSONValue.parse(idleJSON.stdout.trimmingCharacters(in: .whitespacesAndNewlines))["phase"], "none")
        let idleSet = try run(["migrate", "--vm", "src", "--set", "bandwidth=8M"])
        XCTAssertEqual(idleSet.status, 1)
        XCTAssertTrue(idleSet.stderr.contains("no migration of this VM is under way"), idleSet.stderr)

        let migration = try startMigration(["--vm", "src", "--to", "127.0.0.1:\(port)", "--bandwidth", "4M"])
        XCTAssertTrue(waitUntil(seconds: 10) { (progress("src")?["sent_bytes"]?.doubleValue ?? 0) >= 2 * 1_048_576 },
                      "the migration did not get going")

        let status = try run(["migrate", "--vm", "src", "--status"])
        XCTAssertEqual(status.status, 0, status.stderr)
        for words in ["migration of 'src' to 127.0.0.1:\(port): pre-copy, pass 1", "limit 4.0 MiB/s",
                      "expected downtime   not measured yet (known once pass 1 ends) (limit 300 ms)", "elapsed"] {
            XCTAssertTrue(status.stdout.contains(words), "'\(words)' in:\n\(status.stdout)")
        }
        let json = try JSONValue.parse(try run(["migrate", "--vm", "src", "--status", "--json"]).stdout
            .trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertEqual(json["phase"], "pre-copy")
        XCTAssertEqual(json["iteration"]?.doubleValue, 1)
        XCTAssertEqual(json["expected_downtime_ms"], .null, "not measured in pass 1: null, not 0")
        XCTAssertEqual(json["bandwidth_limit"]?.doubleValue, 4 * 1_048_576)
        XCTAssertGreaterThan(json["pass_percent"]?.doubleValue ?? 0, 0)

        // A receiver has nothing migrating from it.
        let receiver = try run(["migrate", "--vm", "dst", "--status"])
        XCTAssertEqual(receiver.status, 1)
        XCTAssertTrue(receiver.stderr.contains("'dst' is a receiver"), receiver.stderr)

        // list: the source migrates, with how far.
        let rows = try run(["list", "--json"]).stdout.split(separator: "\n").map { try JSONValue.parse(String($0)) }
        let row = try XCTUnwrap(rows.first { $0["name"] == "src" }, "\(rows)")
        XCTAssertEqual(row["state"], "migrating")
        XCTAssertEqual(row["migration"]?["iteration"]?.doubleValue, 1)
        let table = try run(["list"]).stdout
        let line = try XCTUnwrap(table.split(separator: "\n").first { $0.hasPrefix("src") }, table)
        XCTAssertTrue(line.contains("migrating (pass 1 at "), String(line))
        // ... and the receiver receives it, with how much has come (over 2 MiB by now).
        let receiving = try XCTUnwrap(rows.first { $0["name"] == "dst" }, "\(rows)")
        XCTAssertEqual(receiving["state"], "receiving")
        XCTAssertGreaterThan(receiving["received_bytes"]?.doubleValue ?? 0, 2 * 1_048_576, "\(receiving)")
        let receiverLine = try XCTUnwrap(table.split(separator: "\n").first { $0.hasPrefix("dst") }, table)
        XCTAssertTrue(receiverLine.contains("receiving (from 127.0.0.1:") && receiverLine.contains(" MiB received)"), String(receiverLine))

        // The rate before and after raising the cap fourfold, in this one run: a ratio, not a time.
        func rate(over seconds: Double) throws -> Double {
            let (before, start) = (try XCTUnwrap(progress("src")?["sent_bytes"]?.doubleValue), Date())
            Thread.sleep(forTimeInterval: seconds)
            let (after, end) = (try XCTUnwrap(progress("src")?["sent_bytes"]?.doubleValue), Date())
            return (after - before) / end.timeIntervalSince(start)
        }
        let slow = try rate(over: 2.0)
        let set = try run(["migrate", "--vm", "src", "--set", "bandwidth=16M"])
        XCTAssertEqual(set.status, 0, set.stderr)
        XCTAssertTrue(set.stdout.contains("bandwidth 16.0 MiB/s, downtime limit 300 ms"), set.stdout)
        Thread.sleep(forTimeInterval: 0.2)
        let fast = try rate(over: 1.5)
        print("--set bandwidth: \(String(format: "%.1f", slow / 1_048_576)) MiB/s before, \(String(format: "%.1f", fast / 1_048_576)) MiB/s after (ratio \(String(format: "%.2f", fast / slow)), 4 asked)")
        XCTAssertEqual(progress("src")?["phase"], "pre-copy", "the measurement must fall within pass 1")
        XCTAssertGreaterThan(fast / slow, 2.8)
        XCTAssertLessThan(fast / slow, 5.5)

        // Off the cap: it completes, and the report says what changed, and when.
        let free = try run(["migrate", "--vm", "src", "--set", "bandwidth=unlimited", "--json"])
        XCTAssertEqual(free.status, 0, free.stderr)
        XCTAssertEqual(try JSONValue.parse(free.stdout.trimmingCharacters(in: .whitespacesAndNewlines))["bandwidth"], .null)
        let report = try finished(migration, within: 30)
        XCTAssertEqual(report["status"], "completed")
        let changes = try XCTUnwrap(report["limit_changes"]?.arrayValue)
        XCTAssertEqual(changes.count, 2)
        XCTAssertEqual(changes.first?["before"]?["bandwidth"]?.doubleValue, 4 * 1_048_576)
        XCTAssertEqual(changes.first?["after"]?["bandwidth"]?.doubleValue, 16 * 1_048_576)
        XCTAssertEqual(changes.first?["pass"]?.doubleValue, 1)
        XCTAssertEqual(changes.last?["after"]?["bandwidth"], .null)
        XCTAssertLessThan(changes.first?["t_s"]?.doubleValue ?? 99, changes.last?["t_s"]?.doubleValue ?? 0)
        detached.removeAll { $0 == "src" }   // it runs at the destination now
    }

    /// A downtime limit no pass can meet keeps pre-copy going; raised while it runs, the next
    /// decision meets it and the migration completes.
    func testARaisedDowntimeLimitLetsAMigrationThatCouldNotConvergeComplete() throws {
        try detach("busy", ["boot", "--memory", "256M", "--vcpus", "2", "--workload", "0:write,ws=16M,rate=8M", "--workload", "1:idle"])
        try waitForWrites(vmSocket("busy"), pages: 4096)
        let port = try freePort()
        try detach("dst", ["receive", "--listen", "127.0.0.1:\(port)"])
        // 1 ms: switching two vCPUs over alone is counted at 1 ms, so no pass can meet it.
        let migration = try startMigration(["--vm", "busy", "--to", "127.0.0.1:\(port)", "--bandwidth", "32M",
                                            "--downtime", "1ms", "--throttle", "none", "--max-iterations", "1000000"])
        XCTAssertTrue(waitUntil(seconds: 15) { (progress("busy")?["iteration"]?.doubleValue ?? 0) >= 5 },
                      "pre-copy did not go on past pass 5")
        let looping = try XCTUnwrap(progress("busy"))
        XCTAssertEqual(looping["phase"], "pre-copy")
        XCTAssertGreaterThan(looping["expected_downtime_ms"]?.doubleValue ?? 0, 0.85, "the rule cannot be met: \(looping.serialized())")
        XCTAssertEqual(looping["downtime_limit_ms"]?.doubleValue, 1)
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertTrue(migration.process.isRunning, "it cannot converge under 1 ms")

        let set = try run(["migrate", "--vm", "busy", "--set", "downtime=1s"])
        XCTAssertEqual(set.status, 0, set.stderr)
        XCTAssertTrue(set.stdout.contains("downtime limit 1 s"), set.stdout)
        let report = try finished(migration, within: 15)
        XCTAssertEqual(report["status"], "completed", report["error"]?.stringValue ?? "")
        XCTAssertEqual(report["downtime_limit_ms"]?.doubleValue, 1000, "the limit in force at the pause")
        XCTAssertEqual(report["limit_changes"]?[0]?["after"]?["downtime_ms"]?.doubleValue, 1000)
        XCTAssertEqual(report["limit_changes"]?[0]?["before"]?["downtime_ms"]?.doubleValue, 1)
        XCTAssertLessThan(report["downtime_ms"]?.doubleValue ?? 9999, 1000)
        detached.removeAll { $0 == "busy" }
    }
}
