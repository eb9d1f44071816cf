import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// The exported image and config block boot under QEMU (its multiboot loader, its in-kernel
/// LAPIC starting the APs), both vCPUs run their workloads, and QEMU's own calc-dirty-rate in
/// dirty-bitmap mode sees the configured rate. Runs where qemu-system-x86_64 is installed
/// (`.ci/run` installs it); skipped, with the reason printed, elsewhere.
final class GuestUnderQEMUTests: XCTestCase {
    private func qemuPath() -> String? {
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
            let candidate = "\(directory)/qemu-system-x86_64"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    func testExportedGuestRunsUnderQEMUAndItsDirtyRateMatches() throws {
        guard let qemu = qemuPath() else {
            let reason = "skipped: qemu-system-x86_64 is not installed (Debian package qemu-system-x86)"
            FileHandle.standardError.write(Data((reason + "\n").utf8))
            throw XCTSkip(reason)
        }
        let kvm = try requireKVM()
        let directory = "/tmp/dmqemu-\(getpid())"
        mkdir(directory, 0o700)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let memory = 256 * MiB
        let config = GuestConfig(tscHz: try HostTSC.frequency(kvm: kvm), memorySize: memory,
                                 vcpus: [writer(64 * MiB, rate: 20 * MiB), reader(32 * MiB, offset: 64 * MiB)])
        try Data(GuestImage.workload.bytes).write(to: URL(fileURLWithPath: directory + "/guest.bin"))
        try Data(config.encode()).write(to: URL(fileURLWithPath: directory + "/guest.cfg"))

        let process = Process()
        process.executableURL = URL(fileURLWithPath: qemu)
        process.arguments = Array(QEMUCommand.arguments(image: directory + "/guest.bin", config: directory + "/guest.cfg",
                                                        memory: memory, vcpus: 2,
                                                        extra: ["-qmp", "unix:\(directory)/qmp.sock,server=on,wait=off",
                                                                "-debugcon", "file:\(directory)/console.txt"]).dropFirst())
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { process.terminate(); process.waitUntilExit() }
        let qmp = try QMPClient(path: directory + "/qmp.sock")

        func stats() throws -> GuestStats {
            let dump = directory + "/stats.bin"
            _ = try qmp.execute("pmemsave", ["val": .number(GuestLayout.statsAddress), "size": 192, "filename": .string(dump)])
            return GuestStats(bytes: [UInt8](try Data(contentsOf: URL(fileURLWithPath: dump))), vcpuCount: 2)
        }
        // SeaBIOS takes a few seconds before the kernel runs.
        let deadline = Date().addingTimeInterval(30)
        while try stats().bootedVCPUs < 2 && Date() < deadline { Thread.sleep(forTimeInterval: 0.2) }
        let first = try stats()
        XCTAssertEqual(first.bootedVCPUs, 2, "both vCPUs reached their workload under QEMU")
        Thread.sleep(forTimeInterval: 1)
        let second = try stats()
        XCTAssertGreaterThan(second.vcpus[0].pages, first.vcpus[0].pages, "the writer's counter advances")
        XCTAssertGreaterThan(second.vcpus[1].pages, first.vcpus[1].pages, "the reader's counter advances")

        _ = try qmp.execute("calc-dirty-rate", ["calc-time": 1, "mode": "dirty-bitmap"])
        var rate: Double? = nil
        for _ in 0..<50 {
            Thread.sleep(forTimeInterval: 0.2)
            let result = try qmp.execute("query-dirty-rate")
            if result["status"]?.stringValue == "measured" { rate = result["dirty-rate"]?.doubleValue; break }
        }
        let measured = try XCTUnwrap(rate, "calc-dirty-rate never finished")
        let console = (try? String(contentsOfFile: directory + "/console.txt", encoding: .utf8)) ?? ""
        print("QEMU calc-dirty-rate (dirty-bitmap): \(measured) MiB/s for a configured 20 MiB/s; guest console: \(console.trimmingCharacters(in: .whitespacesAndNewlines))")
        XCTAssertEqual(measured, 20, accuracy: 2, "QEMU's own measurement within ±10% of the configured rate")
    }
}
