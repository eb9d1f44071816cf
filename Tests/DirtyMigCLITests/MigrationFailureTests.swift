import DirtyMigCore
import Foundation
import XCTest

/// The issue's failure cases through the command line, with real processes killed mid-transfer:
/// `boot` (source), `receive` (destination), `migrate` (the user's command).
final class MigrationFailureTests: XCTestCase {
    /// Control sockets live here, not in the shared runtime directory: a test that SIGKILLs a
    /// VM leaves its socket behind.
    private var directory = ""

    override func setUpWithError() throws {
        directory = try privateTemporaryDirectory("dmf")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: directory) }

    private func socket(_ name: String) -> String { directory + "/" + name + ".sock" }

    private func freePort() throws -> UInt16 {
        let probe = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        return probe.localPort
    }

    /// A 256 MiB VM whose writer dirties 64 MiB at 20 MiB/s while a reader reads.
    private func bootSource(_ name: String) throws -> Process {
        let (boot, output) = try CLI.start(["boot", "--memory", "256M", "--vcpus", "2", "--track", "ring", "--control", socket(name),
                                            "--workload", "0:write,ws=64M,pattern=random,rate=20M",
                                            "--workload", "1:read,ws=64M"])
        let ready = try XCTUnwrap(CLI.readLine(output), "boot printed nothing")
        XCTAssertTrue(ready.contains("running"), ready)
        return boot
    }

    private func startReceiver(_ name: String, port: UInt16, once: Bool = false) throws -> (Process, FileHandle) {
        var arguments = ["receive", "--listen", "127.0.0.1:\(port)", "--control", socket(name)]
        if once { arguments.append("--once") }
        let (receive, output) = try CLI.start(arguments)
        let ready = try XCTUnwrap(CLI.readLine(output), "receive printed nothing")
        XCTAssertTrue(ready.contains("listening"), ready)
        return (receive, output)
    }

    private func assertRuns(_ vm: String, file: StaticString = #filePath, line: UInt = #line) throws {
        try assertGuestRuns(socket: socket(vm), vcpus: 2, file: file, line: line)
    }

    func testReceiverKilledMidTransferThenASecondMigrationSucceeds() throws {
        try requireKVMDevice()
        let source = "src\(getpid())", destination = "dst\(getpid())"
        let boot = try bootSource(source)
        defer { if boot.isRunning { boot.terminate() } }
        let port = try freePort()
        let (doomed, _) = try startReceiver(destination, port: port)
        defer { if doomed.isRunning { doomed.terminate() } }

        // The guest's data (its writer's pages so far: tens of MiB) at 5 MiB/s takes seconds:
        // kill the receiver 1.5 s in.
        let migrate = Process()
        migrate.executableURL = CLI.binary
        migrate.arguments = ["migrate", "--vm", socket(source), "--to", "127.0.0.1:\(port)", "--bandwidth", "5M", "--verify", "--json"]
        let out = Pipe()
        migrate.standardOutput = out
        try migrate.run()
        Thread.sleep(forTimeInterval: 1.5)
        kill(doomed.processIdentifier, SIGKILL)
        doomed.waitUntilExit()
        let killedAt = Date()
        migrate.waitUntilExit()
        let failedAfter = Date().timeIntervalSince(killedAt)
        XCTAssertEqual(migrate.terminationStatus, 1)
        XCTAssertLessThan(failedAfter, 5, "migrate must fail within 5 s of losing its receiver")
        let report = try JSONValue.parse(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
        XCTAssertEqual(report["status"], "failed")
        print("receiver killed: migrate failed \(String(format: "%.2f", failedAfter)) s later: \(report["error"]?.stringValue ?? "")")
        XCTAssertTrue(boot.isRunning)
        try assertRuns(source)

        // The same VM to a new receiver, verified.
        let (receiver, _) = try startReceiver(destination, port: port)
        defer { if receiver.isRunning { receiver.terminate() } }
        let second = try CLI.run(["migrate", "--vm", socket(source), "--to", "127.0.0.1:\(port)", "--verify", "--json"])
        XCTAssertEqual(second.status, 0, second.stdout + second.stderr)
        let secondReport = try JSONValue.parse(second.stdout)
        XCTAssertEqual(secondReport["verify"], "passed")
        boot.waitUntilExit()
        XCTAssertEqual(boot.terminationStatus, 0, "the source exits 0 once the destination runs the VM")
        try assertRuns(destination)
    }

    func testSenderKilledMidTransferTheReceiverTakesTheNext() throws {
        try requireKVMDevice()
        let first = "snd\(getpid())", second = "sne\(getpid())", destination = "rcv\(getpid())"
        let port = try freePort()
        let (receiver, receiverOutput) = try startReceiver(destination, port: port)
        defer { if receiver.isRunning { receiver.terminate() } }

        let doomed = try bootSource(first)
        defer { if doomed.isRunning { doomed.terminate() } }
        XCTAssertNotEqual(try migrateKillingTheSource(doomed, socket: socket(first), port: port), 0)

        // The receiver dropped the partial VM and takes the next migration.
        let boot = try bootSource(second)
        defer { if boot.isRunning { boot.terminate() } }
        let result = try CLI.run(["migrate", "--vm", socket(second), "--to", "127.0.0.1:\(port)", "--verify", "--json"])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        let received = try XCTUnwrap(CLI.readLine(receiverOutput, timeout: 10))
        XCTAssertTrue(received.contains("received and running"), received)
        try assertRuns(destination)
    }

    func testPortInUseAndNothingListening() throws {
        try requireKVMDevice()
        let holder = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        let busy = try CLI.run(["receive", "--listen", "127.0.0.1:\(holder.localPort)", "--control", socket("busy")])
        XCTAssertEqual(busy.status, 1)
        XCTAssertTrue(busy.stderr.contains("port is in use"), busy.stderr)

        let source = "lonely\(getpid())"
        let boot = try bootSource(source)
        defer { if boot.isRunning { boot.terminate() } }
        let port = try freePort()
        let result = try CLI.run(["migrate", "--vm", socket(source), "--to", "127.0.0.1:\(port)"])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.stdout.contains("nothing listens"), result.stdout + result.stderr)
        try assertRuns(source)
    }

    /// A receiver that holds another key: the migration fails at the handshake, and its report
    /// prints nothing that was not measured (no downtime of 0.0 ms, no pace of 0 during).
    func testAWrongKeyReportsNoUnmeasuredZeros() throws {
        try requireKVMDevice()
        func key(_ name: String) -> String {
            let file = directory + "/" + name
            let hex = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined()
            _ = FileManager.default.createFile(atPath: file, contents: Data((hex + "\n").utf8), attributes: [.posixPermissions: 0o600])
            return file
        }
        let (mine, theirs) = (key("mine.psk"), key("theirs.psk"))
        let source = "keyed\(getpid())"
        let boot = try bootSource(source)
        defer { if boot.isRunning { boot.terminate() } }
        let port = try freePort()
        let (receiver, output) = try CLI.start(["receive", "--listen", "127.0.0.1:\(port)", "--control", socket("keydst"),
                                                "--psk-file", theirs])
        defer { if receiver.isRunning { receiver.terminate() } }
        let ready = try XCTUnwrap(CLI.readLine(output), "receive printed nothing")
        XCTAssertTrue(ready.contains("listening"), ready)
        Thread.sleep(forTimeInterval: 1)   // a pace history before, as a user's VM has
        let result = try CLI.run(["migrate", "--vm", socket(source), "--to", "127.0.0.1:\(port)", "--psk-file", mine])
        XCTAssertEqual(result.status, 1)
        let report = result.stdout
        XCTAssertTrue(report.contains("pre-shared key"), report + result.stderr)
        XCTAssertFalse(report.contains("downtime 0.0 ms") || report.contains("0.0 ms (limit"), report)
        XCTAssertFalse(report.contains("0 during"), report)
        XCTAssertFalse(report.contains("not needed"), report)
        XCTAssertTrue(report.contains("none: the VM was not paused"), report)
        XCTAssertTrue(report.contains("before, - during"), report)
        try assertRuns(source)
    }
}
