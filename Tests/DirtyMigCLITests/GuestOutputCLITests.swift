import DirtyMigCore
import Foundation
import XCTest

/// `--guest-output FILE` and the check workload through the command line: a VM booted with a
/// checking, emitting vCPU, measured (`guest_errors`), migrated to a receiver with its own
/// `--guest-output`, then SIGKILLed there. The two files hold whole lines only, and together
/// one stream numbered 1, 2, 3, ... with nothing lost or repeated.
final class GuestOutputCLITests: XCTestCase {
    /// Control sockets and output files live here (a SIGKILLed VM leaves its socket behind).
    private var directory = ""

    override func setUpWithError() throws {
        directory = try privateTemporaryDirectory("dmo")
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: directory) }

    private func lines(_ path: String) throws -> [GuestOutputLine] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertTrue(text.isEmpty || text.hasSuffix("\n"), "\(path) ends with a whole line")
        let raw = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        let parsed = raw.compactMap { GuestOutputLine(parsing: $0) }
        XCTAssertEqual(parsed.count, raw.count, "every line of \(path) is whole: \(raw.filter { GuestOutputLine(parsing: $0) == nil }.prefix(3))")
        return parsed
    }

    func testGuestOutputFileAcrossAMigrationAndAKill() throws {
        try requireKVMDevice()
        let source = directory + "/src.sock", destination = directory + "/dst.sock"
        let sourceFile = directory + "/src.out", destinationFile = directory + "/dst.out"
        let (boot, bootOutput) = try CLI.start(["boot", "--memory", "128M", "--vcpus", "2", "--control", source,
                                                "--workload", "0:check,ws=16M,emit=10ms", "--workload", "1:read,ws=16M",
                                                "--guest-output", sourceFile])
        defer { if boot.isRunning { boot.terminate() } }
        let ready = try XCTUnwrap(CLI.readLine(bootOutput), "boot printed nothing")
        XCTAssertTrue(ready.contains("running"), ready)

        // guest_errors in query-status, dirtyrate --json and the dirtyrate table.
        Thread.sleep(forTimeInterval: 0.5)
        let client = try ControlClient(path: source)
        let status = try client.call("query-status")
        client.close()
        let vcpus = try XCTUnwrap(status["vcpu_stats"]?.arrayValue)
        XCTAssertEqual(vcpus[0]["workload"]?.stringValue, "check,ws=16MiB,offset=0B,pattern=seq,emit=10ms")
        XCTAssertEqual(vcpus.map { $0["guest_errors"]?.intValue }, [0, 0])
        XCTAssertGreaterThan(status["guest_output_lines"]?.intValue ?? 0, 0)
        XCTAssertEqual(status["guest_output_dropped"]?.intValue, 0, "the file takes lines from the guest's first one")
        let json = try CLI.run(["dirtyrate", "--vm", source, "--json", "--count", "1", "--interval", "200ms"])
        XCTAssertEqual(json.status, 0, json.stderr)
        let rates = try XCTUnwrap(try JSONValue.parse(json.stdout)["vcpus"]?.arrayValue)
        XCTAssertEqual(rates.map { $0["guest_errors"]?.intValue }, [0, 0])
        XCTAssertGreaterThan(rates[0]["dirty_pages_s"]?.doubleValue ?? 0, 100, "a check vCPU writes what it touches")
        let table = try CLI.run(["dirtyrate", "--vm", source, "--count", "1", "--interval", "200ms"])
        XCTAssertEqual(table.status, 0, table.stderr)
        XCTAssertTrue(table.stdout.contains("v0 errors") && !table.stdout.contains("v1 errors"), table.stdout)

        // Migrate it to a receiver that appends to its own file.
        let port: UInt16 = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0)).localPort
        let (receive, receiveOutput) = try CLI.start(["receive", "--listen", "127.0.0.1:\(port)", "--control", destination,
                                                      "--guest-output", destinationFile])
        defer { if receive.isRunning { receive.terminate() } }
        XCTAssertTrue(try XCTUnwrap(CLI.readLine(receiveOutput)).contains("listening"))
        let migrate = try CLI.run(["migrate", "--vm", source, "--to", "127.0.0.1:\(port)", "--verify", "--json"])
        XCTAssertEqual(migrate.status, 0, migrate.stdout + migrate.stderr)
        boot.waitUntilExit()
        XCTAssertTrue(try XCTUnwrap(CLI.readLine(receiveOutput)).contains("received and running"))

        Thread.sleep(forTimeInterval: 0.5)
        kill(receive.processIdentifier, SIGKILL)
        receive.waitUntilExit()

        let before = try lines(sourceFile), after = try lines(destinationFile)
        print("guest output: \(before.count) lines at the source, \(after.count) at the destination; last \(after.last.map(\.text) ?? "-")")
        XCTAssertGreaterThan(before.count, 20)
        XCTAssertGreaterThan(after.count, 20)
        XCTAssertEqual((before + after).map(\.sequence), Array(1...UInt64(before.count + after.count)),
                       "one stream: the destination's first line follows the source's last")
        XCTAssertTrue((before + after).allSatisfy { $0.vcpu == 0 && $0.errors == 0 })
    }

    func testGuestOutputFileThatCannotBeOpenedIsRefused() throws {
        let result = try CLI.run(["boot", "--memory", "64M", "--control", directory + "/x.sock",
                                  "--guest-output", directory + "/no/such/dir/out"])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.stderr.contains("--guest-output"), result.stderr)
    }
}
