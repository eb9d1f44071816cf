import DirtyMigCore
import Foundation
import XCTest

/// `receive --memory SIZE`: the receiver allocates a VM's RAM before it listens (as QEMU's
/// destination does with -mem-prealloc), a VM of that size lands in it, a VM of another size gets
/// fresh memory, and a migration that fails after landing there leaves the receiver to prepare
/// new memory for the next one.
final class PreparedMemoryCLITests: ProcessTestCase {
    override class var directoryPrefix: String { "dpm" }

    /// A VM of `memory` whose writer dirties 48 MiB at `rate` while a reader reads.
    private func bootSource(_ name: String, memory: String = "256M", rate: String = "20M") throws -> Process {
        let (boot, output, _) = try start(["boot", "--memory", memory, "--vcpus", "2", "--control", socket(name),
                                           "--workload", "0:write,ws=48M,pattern=random,rate=\(rate)",
                                           "--workload", "1:read,ws=48M,offset=64M"])
        let ready = try XCTUnwrap(CLI.readLine(output), "boot printed nothing")
        XCTAssertTrue(ready.contains("running"), ready)
        return boot
    }

    private func startReceiver(_ name: String, port: UInt16, memory: String) throws -> (Process, FileHandle, Pipe) {
        let (receive, output, errors) = try start(["receive", "--listen", "127.0.0.1:\(port)", "--memory", memory, "--control", socket(name)])
        let ready = try XCTUnwrap(CLI.readLine(output, timeout: 60), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening") && ready.contains("of guest memory prepared"), ready)
        return (receive, output, errors)
    }

    /// Resident memory of a process, from /proc/PID/status (VmRSS, kB).
    private func residentBytes(_ pid: Int32) throws -> UInt64 {
        let status = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
        let line = try XCTUnwrap(status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") })
        let kilobytes = try XCTUnwrap(UInt64(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
        return kilobytes * 1024
    }

    private func migrate(_ source: String, port: UInt16) throws -> JSONValue {
        let result = try CLI.run(["migrate", "--vm", socket(source), "--to", "127.0.0.1:\(port)", "--verify", "--json"])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        let report = try JSONValue.parse(result.stdout)
        XCTAssertEqual(report["verify"], "passed")
        return report
    }

    func testAVMOfThePreparedSizeLandsInIt() throws {
        let source = "src\(getpid())", destination = "dst\(getpid())"
        let port = try freePort()
        let (receive, output, errors) = try startReceiver(destination, port: port, memory: "256M")
        // The RAM is resident before any sender connects: that is the point of the option.
        let resident = try residentBytes(receive.processIdentifier)
        XCTAssertGreaterThanOrEqual(resident, 256 << 20, "receive --memory 256M holds \(resident >> 20) MiB")
        let status = try ControlClient(path: socket(destination)).call("query-status", timeout: 5)
        XCTAssertEqual(status["prepared_memory"]?.doubleValue, Double(256 << 20), "\(status)")
        XCTAssertEqual(status["prepared_memory_state"], "ready", "\(status)")
        let boot = try bootSource(source)
        _ = try migrate(source, port: port)
        let received = try XCTUnwrap(CLI.readLine(output, timeout: 10))
        XCTAssertTrue(received.contains("received and running"), received)
        try assertGuestRuns(socket: socket(destination), vcpus: 2)
        boot.waitUntilExit()
        let log = stderrText(errors)
        XCTAssertFalse(log.contains("fresh memory"), log)
        XCTAssertLessThan(try residentBytes(receive.processIdentifier), UInt64(256 + 128) << 20, "one VM's RAM, not two")
    }

    func testAVMOfAnotherSizeGetsFreshMemory() throws {
        let source = "src\(getpid())", destination = "dst\(getpid())"
        let port = try freePort()
        let (_, output, errors) = try startReceiver(destination, port: port, memory: "192M")
        _ = try bootSource(source)
        _ = try migrate(source, port: port)
        XCTAssertTrue(try XCTUnwrap(CLI.readLine(output, timeout: 10)).contains("received and running"))
        try assertGuestRuns(socket: socket(destination), vcpus: 2)
        let log = stderrText(errors)
        XCTAssertTrue(log.contains("has 256 MiB of RAM, not the 192 MiB prepared with --memory: it gets fresh memory"), log)
    }

    /// The source dies mid-transfer: the partial VM (in the prepared memory) is dropped, the
    /// receiver prepares memory again, and the next VM of that size lands in the new memory.
    func testAFailedMigrationLeavesMemoryPreparedForTheNext() throws {
        let first = "snd\(getpid())", second = "sne\(getpid())", destination = "rcv\(getpid())"
        let port = try freePort()
        let (_, output, errors) = try startReceiver(destination, port: port, memory: "256M")
        let doomed = try bootSource(first)
        Thread.sleep(forTimeInterval: 1)   // tens of MiB written: seconds at 5 MiB/s
        XCTAssertNotEqual(try migrateKillingTheSource(doomed, socket: socket(first), port: port), 0)

        var log = ""
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline && !log.contains("prepared 256 MiB of guest memory again") {
            Thread.sleep(forTimeInterval: 0.1)
            log += stderrText(errors)
        }
        XCTAssertTrue(log.contains("its partial VM was discarded"), log)
        XCTAssertTrue(log.contains("prepared 256 MiB of guest memory again"), log)
        let status = try ControlClient(path: socket(destination)).call("query-status", timeout: 5)
        XCTAssertEqual(status["prepared_memory_state"], "ready", "\(status)")

        _ = try bootSource(second)
        _ = try self.migrate(second, port: port)
        XCTAssertTrue(try XCTUnwrap(CLI.readLine(output, timeout: 10)).contains("received and running"))
        try assertGuestRuns(socket: socket(destination), vcpus: 2)
        log += stderrText(errors)
        XCTAssertFalse(log.contains("fresh memory"), log)
    }

    func testSizesItCannotPrepareAreRefused() throws {
        let port = try freePort()
        let small = try CLI.run(["receive", "--listen", "127.0.0.1:\(port)", "--memory", "3M", "--control", socket("small")])
        XCTAssertEqual(small.status, 2, small.stderr)
        XCTAssertTrue(small.stderr.contains("below the guest's minimum"), small.stderr)
        let odd = try CLI.run(["receive", "--listen", "127.0.0.1:\(port)", "--memory", "65M", "--control", socket("odd")])
        XCTAssertEqual(odd.status, 2, odd.stderr)
        XCTAssertTrue(odd.stderr.contains("multiple of 2 MiB"), odd.stderr)
        // More than this host has: refused with the figures, before anything is allocated.
        let hostBytes = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let huge = ((hostBytes >> 21) + 2048) * 2   // MiB: 4 GiB more than the host, a multiple of 2 MiB
        let tooMuch = try CLI.run(["receive", "--listen", "127.0.0.1:\(port)", "--memory", "\(huge)M", "--control", socket("huge")])
        XCTAssertNotEqual(tooMuch.status, 0, tooMuch.stderr)
        XCTAssertTrue(tooMuch.stderr.contains("more than"), tooMuch.stderr)
    }
}
