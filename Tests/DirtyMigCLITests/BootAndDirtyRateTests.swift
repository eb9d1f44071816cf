import DirtyMigCore
import Foundation
import XCTest

/// The check, through the command line: boot a 1 GiB, 2-vCPU VM with a 100 MiB/s
/// sequential writer and a reader, then `dirtyrate --json --count 5`.
final class BootAndDirtyRateTests: XCTestCase {
    func testRingRatesThroughTheCommandLine() throws {
        try requireKVMDevice()
        let name = "clitest\(getpid())"
        let (boot, output) = try CLI.start(["boot", "--memory", "1G", "--vcpus", "2", "--track", "ring", "--name", name,
                                            "--workload", "0:write,ws=512M,pattern=seq,rate=100M",
                                            "--workload", "1:read,ws=256M"])
        defer { if boot.isRunning { boot.terminate() } }
        let ready = try XCTUnwrap(CLI.readLine(output), "boot printed nothing")
        XCTAssertTrue(ready.contains("control socket"), ready)
        let socket = ControlSocketPath.path(forName: name)
        XCTAssertTrue(ready.contains(socket), ready)

        let result = try CLI.run(["dirtyrate", "--vm", name, "--json", "--count", "5"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let lines = result.stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(lines.count, 5)
        for (index, line) in lines.enumerated() {
            let report = try JSONValue.parse(line)
            XCTAssertEqual(report["mode"], "ring")
            let vcpus = try XCTUnwrap(report["vcpus"]?.arrayValue)
            let writer = try XCTUnwrap(vcpus[0]["dirty_mib_s"]?.doubleValue)
            let reader = try XCTUnwrap(vcpus[1]["dirty_mib_s"]?.doubleValue)
            let guest = try XCTUnwrap(vcpus[0]["guest_pages_s"]?.doubleValue) * 4096 / Double(1 << 20)
            print("interval \(index + 1): vCPU 0 \(writer) MiB/s (guest wrote \(guest)), vCPU 1 \(reader) MiB/s")
            if index > 0 {   // "after the first interval"; the guest's own pace is a benchmark figure
                XCTAssertEqual(writer, guest, accuracy: guest * 0.05, line)
                XCTAssertLessThanOrEqual(guest, 105, line)
            }
            XCTAssertLessThan(reader, 1, line)
        }

        // The same VM measured by page sampling, and refused in a mode it cannot serve.
        let sample = try CLI.run(["dirtyrate", "--vm", name, "--mode", "sample", "--json", "--count", "1"])
        XCTAssertEqual(sample.status, 0, sample.stderr)
        // The table says which mode measured it, above its header.
        let table = try CLI.run(["dirtyrate", "--vm", name, "--mode", "sample", "--count", "1"])
        XCTAssertEqual(table.status, 0, table.stderr)
        let caption = table.stdout.split(separator: "\n").first.map(String.init) ?? ""
        XCTAssertTrue(caption.contains("--mode sample") && caption.contains("estimated"), table.stdout)
        let bitmap = try CLI.run(["dirtyrate", "--vm", name, "--mode", "bitmap", "--count", "1"])
        XCTAssertEqual(bitmap.status, 1)
        XCTAssertTrue(bitmap.stderr.contains("--track bitmap"), bitmap.stderr)

        // `quit` stops the VM cleanly: exit 0, socket removed.
        let client = try ControlClient(path: socket)
        XCTAssertEqual(try client.call("quit")["stopping"], true)
        boot.waitUntilExit()
        XCTAssertEqual(boot.terminationStatus, 0)
        XCTAssertNotEqual(access(socket, F_OK), 0, "the socket is removed on exit")
    }

    func testSIGTERMStopsCleanly() throws {
        try requireKVMDevice()
        let name = "sigterm\(getpid())"
        let (boot, output) = try CLI.start(["boot", "--memory", "128M", "--vcpus", "1", "--name", name])
        XCTAssertNotNil(CLI.readLine(output))
        boot.terminate()
        boot.waitUntilExit()
        XCTAssertEqual(boot.terminationStatus, 0)
        XCTAssertNotEqual(access(ControlSocketPath.path(forName: name), F_OK), 0)
    }
}
