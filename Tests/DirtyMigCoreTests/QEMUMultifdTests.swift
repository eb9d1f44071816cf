import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// The multifd setting `dirtymig-bench link` gives both QEMU processes (QEMUMultifd): QEMU 7.2
/// takes it on both ends, a migration with it completes, and its pages go over the multifd
/// channels. Runs where qemu-system-x86_64 and /dev/kvm are there; skipped, with the reason
/// printed, elsewhere.
final class QEMUMultifdTests: XCTestCase {
    func testBothQEMUsTakeMultifdZstdAndMigrateWithIt() throws {
        guard let qemu = ["/usr/bin", "/usr/local/bin"].map({ $0 + "/qemu-system-x86_64" }).first(where: { access($0, X_OK) == 0 }) else {
            let reason = "skipped: qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
            FileHandle.standardError.write(Data((reason + "\n").utf8))
            throw XCTSkip(reason)
        }
        _ = try requireKVM()
        let directory = "/tmp/dmmultifd-\(getpid())"
        mkdir(directory, 0o700)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // A firmware-only VM: multifd moves its RAM as it would a guest's.
        func start(_ name: String, _ extra: [String]) throws -> (Process, QMPClient) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: qemu)
            process.arguments = ["-machine", "q35,accel=kvm", "-m", "64", "-display", "none", "-nodefaults",
                                 "-qmp", "unix:\(directory)/\(name).sock,server=on,wait=off"] + extra
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            return (process, try QMPClient(path: "\(directory)/\(name).sock"))
        }
        let (sourceProcess, source) = try start("src", [])
        defer { sourceProcess.terminate(); sourceProcess.waitUntilExit() }
        let (destinationProcess, destination) = try start("dst", ["-incoming", "defer"])
        defer { destinationProcess.terminate(); destinationProcess.waitUntilExit() }

        let setting = QEMUMultifd(compression: "zstd", channels: 2, zstdLevel: 1)
        XCTAssertEqual(setting.commands.map(\.command), ["migrate-set-capabilities", "migrate-set-parameters"],
                       "the capability first: QEMU takes multifd parameters either way, but migrates multifd only with it")
        try setting.apply(to: destination)
        try setting.apply(to: source)
        let port = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0)).localPort
        try destination.execute("migrate-incoming", ["uri": .string("tcp:127.0.0.1:\(port)")])
        try source.execute("migrate", ["uri": .string("tcp:127.0.0.1:\(port)")])
        var status: JSONValue = .null
        let deadline = Date().addingTimeInterval(30)
        repeat {
            Thread.sleep(forTimeInterval: 0.05)
            status = try source.execute("query-migrate")
        } while !["completed", "failed", "cancelled"].contains(status["status"]?.stringValue ?? "") && Date() < deadline
        XCTAssertEqual(status["status"]?.stringValue, "completed", status.serialized())
        XCTAssertGreaterThan(status["ram"]?["multifd-bytes"]?.doubleValue ?? 0, 0, "the pages went over the multifd channels: \(status.serialized())")
        var running: String?
        for _ in 0..<100 where running != "running" {
            running = try destination.execute("query-status")["status"]?.stringValue
            if running != "running" { Thread.sleep(forTimeInterval: 0.05) }
        }
        XCTAssertEqual(running, "running", "the destination runs the VM")
    }

    /// `dirtymig-bench link` counts what the source's namespace transmitted: every interface but
    /// loopback, the ninth number after the colon.
    func testTransmittedBytesSkipLoopbackAndSumTheRest() {
        let text = """
            Inter-|   Receive                                                |  Transmit
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
                lo: 7632 165    0    0    0     0          0         0 7632 165    0    0    0     0       0          0
            dmt-1-0-a: 1200 20    0    0    0     0          0         0 268435456 4100    0    0    0     0       0          0
              eth1:100 2 0 0 0 0 0 0 44 1 0 0 0 0 0 0
            """
        XCTAssertEqual(NetDevCounters.transmittedBytes(procNetDev: text), 268_435_456 + 44)
        XCTAssertNil(NetDevCounters.transmittedBytes(procNetDev: "    lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n"), "loopback alone is no link")
        XCTAssertNil(NetDevCounters.transmittedBytes(procNetDev: "  veth0: 1 2 3\n"), "a truncated line counts nothing")
    }
}
