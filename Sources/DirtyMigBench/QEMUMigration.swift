import DirtyMigCore
import Foundation

/// QEMU 7.2 migrating the same guest image and config block over loopback, driven through QMP:
/// the peer dirtymig's migration benchmark compares against.
///
/// Neither side uses -mem-prealloc: QEMU would then allocate all guest RAM before the clock
/// starts (a free ride on the destination's page faults, the very cost scenario 2 measures) and
/// fill the source's "never written" RAM with real zero pages. So, as in the machine notes'
/// reference figures, QEMU's RAM is allocated when first touched, on both sides.
struct QEMUMigrationResult {
    var totalMs: Double
    var downtimeMs: Double
    var setupMs: Double
    var passes: Int
    var transferredBytes: UInt64
    var throughputMiBs: Double
}

func qemuExecutable() -> String? {
    for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
        let candidate = "\(directory)/qemu-system-x86_64"
        if access(candidate, X_OK) == 0 { return candidate }
    }
    return nil
}

func runQEMUMigration(memory: UInt64, workloads: [VCPUWorkload], downtime: Double, waitForFinishedPasses: Bool,
                      warmupSeconds: Double) throws -> QEMUMigrationResult {
    guard let qemu = qemuExecutable() else { throw BenchError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)") }
    let directory = NSTemporaryDirectory() + "dirtymig-qemu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    mkdir(directory, 0o700)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let vcpus = workloads.count
    let export = QEMUExport(imagePath: directory + "/guest.bin", configPath: directory + "/guest.cfg", memorySize: memory,
                            vcpuCount: vcpus, preallocate: false, executable: qemu)
    try export.writeFiles(config: GuestConfig(tscHz: try HostTSC.frequency(), memorySize: memory, vcpus: workloads))
    let port: UInt16 = try {
        let probe = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        return probe.localPort
    }()

    func launch(_ extra: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: qemu)
        process.arguments = export.arguments + extra
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }
    let destination = try launch(["-qmp", "unix:\(directory)/dst.sock,server=on,wait=off", "-incoming", "tcp:127.0.0.1:\(port)"])
    defer { destination.terminate(); destination.waitUntilExit() }
    let source = try launch(["-qmp", "unix:\(directory)/src.sock,server=on,wait=off"])
    defer { source.terminate(); source.waitUntilExit() }
    let qmp = try QMPClient(path: directory + "/src.sock")
    _ = try QMPClient(path: directory + "/dst.sock")   // listening for the incoming migration

    func stats() throws -> GuestStats {
        let dump = directory + "/stats.bin"
        let (address, size, path) = export.statsDumpArguments(to: dump)
        try qmp.execute("pmemsave", ["val": .number(address), "size": .number(size), "filename": .string(path)])
        return GuestStats(bytes: [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))), vcpuCount: vcpus)
    }
    // SeaBIOS takes a few seconds; then wait for the workload (and its passes, if asked).
    let deadline = Date().addingTimeInterval(120)
    while try stats().bootedVCPUs < vcpus && Date() < deadline { Thread.sleep(forTimeInterval: 0.1) }
    if waitForFinishedPasses {
        while try stats().vcpus.enumerated().contains(where: { workloads[$0.offset].kind != .idle && $0.element.state != .finished }),
              Date() < deadline { Thread.sleep(forTimeInterval: 0.1) }
    }
    Thread.sleep(forTimeInterval: warmupSeconds)

    try qmp.execute("migrate-set-parameters", ["max-bandwidth": .number(UInt64(100) << 30),
                                               "downtime-limit": .number(UInt64(downtime * 1000))])
    try qmp.execute("migrate", ["uri": .string("tcp:127.0.0.1:\(port)")])
    while Date() < deadline {
        let status = try qmp.execute("query-migrate")
        switch status["status"]?.stringValue {
        case "completed":
            let ram = status["ram"]
            return QEMUMigrationResult(
                totalMs: status["total-time"]?.doubleValue ?? 0, downtimeMs: status["downtime"]?.doubleValue ?? 0,
                setupMs: status["setup-time"]?.doubleValue ?? 0, passes: Int(ram?["dirty-sync-count"]?.doubleValue ?? 0),
                transferredBytes: UInt64(ram?["transferred"]?.doubleValue ?? 0),
                throughputMiBs: (ram?["mbps"]?.doubleValue ?? 0) * 1e6 / 8 / 1_048_576)
        case "failed", "cancelled":
            throw BenchError("QEMU's migration failed: \(status.serialized())")
        default:
            Thread.sleep(forTimeInterval: 0.01)
        }
    }
    throw BenchError("QEMU's migration did not finish within 120 s")
}
