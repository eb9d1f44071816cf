import DirtyMigCore
import Foundation

/// QEMU 7.2 migrating the same guest image and config block over loopback, driven through QMP:
/// the peer dirtymig's migration benchmarks compare against.
///
/// Neither side uses -mem-prealloc: QEMU would then allocate all guest RAM before the clock
/// starts (a free ride on the destination's page faults, the very cost scenario 2 measures) and
/// fill the source's "never written" RAM with real zero pages. So, as in the machine notes'
/// reference figures, QEMU's RAM is allocated when first touched, on both sides.
struct QEMUMigrationResult {
    var completed = false
    var error: String?
    var totalMs: Double = 0
    var downtimeMs: Double = 0
    var setupMs: Double = 0
    var passes = 0
    var transferredBytes: UInt64 = 0
    var throughputMiBs: Double = 0
    /// The guest's own pages/s per vCPU over 1 s before `migrate`, and from `migrate` to the end.
    var guestPagesPerSecondBefore: [Double] = []
    var guestPagesPerSecondDuring: [Double] = []
}

/// How QEMU is asked to migrate.
struct QEMUMigrationSettings {
    var downtime = 0.3
    /// max-bandwidth in bytes/s (QEMU's default is 32 MiB/s; "unlimited" is a large number).
    var bandwidth: UInt64 = 100 << 30
    var autoConverge = false
    /// Start QEMU with a dirty ring of this many entries (needed by set-vcpu-dirty-limit).
    var dirtyRingSize: Int?
    /// set-vcpu-dirty-limit (MB/s) on each listed vCPU before `migrate` (QEMU 7.2 has no
    /// dirty-limit migration capability, so this is the way to use its dirty limit).
    var dirtyLimits: [(vcpu: Int, mbPerSecond: Int)] = []
    var timeoutSeconds = 120.0
}

func qemuExecutable() -> String? {
    for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
        let candidate = "\(directory)/qemu-system-x86_64"
        if access(candidate, X_OK) == 0 { return candidate }
    }
    return nil
}

/// The exported guest run by QEMU processes in a scratch directory: launches them with the
/// guest's options, reads the guest's counters through QMP `pmemsave`.
final class QEMUGuest {
    let directory: String
    let export: QEMUExport
    let workloads: [VCPUWorkload]
    private var arguments: [String]
    private var processes: [Process] = []

    init(memory: UInt64, workloads: [VCPUWorkload], dirtyRingSize: Int? = nil) throws {
        guard let qemu = qemuExecutable() else { throw BenchError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)") }
        directory = NSTemporaryDirectory() + "dirtymig-qemu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(directory, 0o700)
        self.workloads = workloads
        export = QEMUExport(imagePath: directory + "/guest.bin", configPath: directory + "/guest.cfg", memorySize: memory,
                            vcpuCount: workloads.count, preallocate: false, executable: qemu)
        try export.writeFiles(config: GuestConfig(tscHz: try HostTSC.frequency(), memorySize: memory, vcpus: workloads))
        arguments = export.arguments
        if let ring = dirtyRingSize, let accel = arguments.firstIndex(of: "-accel") {
            arguments[accel + 1] = "kvm,dirty-ring-size=\(ring)"
        }
    }

    /// Starts QEMU with the guest's options, QMP on `directory/NAME.sock`, and `extra`.
    func launch(_ name: String, _ extra: [String] = []) throws -> QMPClient {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: export.executable)
        process.arguments = arguments + ["-qmp", "unix:\(directory)/\(name).sock,server=on,wait=off"] + extra
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        processes.append(process)
        return try QMPClient(path: "\(directory)/\(name).sock")
    }

    func stats(_ qmp: QMPClient) throws -> GuestStats {
        let (address, size, path) = export.statsDumpArguments(to: directory + "/stats.bin")
        try qmp.execute("pmemsave", ["val": .number(address), "size": .number(size), "filename": .string(path)])
        return GuestStats(bytes: [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))), vcpuCount: workloads.count)
    }

    /// Waits for SeaBIOS and the workload (and its passes, if asked), then `warmupSeconds`.
    func waitForWorkload(_ qmp: QMPClient, finishedPasses: Bool, warmupSeconds: Double) throws {
        let deadline = Date().addingTimeInterval(120)
        while try stats(qmp).bootedVCPUs < workloads.count && Date() < deadline { Thread.sleep(forTimeInterval: 0.1) }
        if finishedPasses {
            while try stats(qmp).vcpus.enumerated().contains(where: { workloads[$0.offset].kind != .idle && $0.element.state != .finished }),
                  Date() < deadline { Thread.sleep(forTimeInterval: 0.1) }
        }
        Thread.sleep(forTimeInterval: warmupSeconds)
    }

    deinit {
        for process in processes { process.terminate(); process.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

func runQEMUMigration(memory: UInt64, workloads: [VCPUWorkload], settings: QEMUMigrationSettings = QEMUMigrationSettings(),
                      waitForFinishedPasses: Bool, warmupSeconds: Double, warmBytes: UInt64 = 0) throws -> QEMUMigrationResult {
    let guest = try QEMUGuest(memory: memory, workloads: workloads, dirtyRingSize: settings.dirtyRingSize)
    let port: UInt16 = try {
        let probe = try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0))
        return probe.localPort
    }()
    _ = try guest.launch("dst", ["-incoming", "tcp:127.0.0.1:\(port)"])
    let qmp = try guest.launch("src")
    func stats() throws -> GuestStats { try guest.stats(qmp) }
    try guest.waitForWorkload(qmp, finishedPasses: waitForFinishedPasses, warmupSeconds: warmupSeconds)

    var result = QEMUMigrationResult()
    let paceStart = try stats().vcpus.map(\.pages)
    let paceTime = MonotonicClock.seconds()
    Thread.sleep(forTimeInterval: 1)
    let startPages = try stats().vcpus.map(\.pages)
    let start = MonotonicClock.seconds()
    result.guestPagesPerSecondBefore = zip(startPages, paceStart).map { Double($0 &- $1) / (start - paceTime) }

    if settings.autoConverge {
        try qmp.execute("migrate-set-capabilities", ["capabilities": .array([["capability": "auto-converge", "state": true]])])
    }
    for limit in settings.dirtyLimits {
        try qmp.execute("set-vcpu-dirty-limit", ["cpu-index": .number(limit.vcpu), "dirty-rate": .number(limit.mbPerSecond)])
    }
    try qmp.execute("migrate-set-parameters", ["max-bandwidth": .number(settings.bandwidth),
                                               "downtime-limit": .number(UInt64(settings.downtime * 1000))])
    DestinationMemory.warm(warmBytes)
    try qmp.execute("migrate", ["uri": .string("tcp:127.0.0.1:\(port)")])
    var lastPages = startPages
    var lastTime = start
    while MonotonicClock.seconds() - start < settings.timeoutSeconds {
        let status = try qmp.execute("query-migrate")
        switch status["status"]?.stringValue {
        case "completed":
            // QEMU 7.2 reports "completed" before it fills in the times: wait for them.
            guard (status["total-time"]?.doubleValue ?? 0) > 0 else { Thread.sleep(forTimeInterval: 0.01); continue }
            let ram = status["ram"]
            result.completed = true
            result.totalMs = status["total-time"]?.doubleValue ?? 0
            result.downtimeMs = status["downtime"]?.doubleValue ?? 0
            result.setupMs = status["setup-time"]?.doubleValue ?? 0
            result.passes = Int(ram?["dirty-sync-count"]?.doubleValue ?? 0)
            result.transferredBytes = UInt64(ram?["transferred"]?.doubleValue ?? 0)
            result.throughputMiBs = (ram?["mbps"]?.doubleValue ?? 0) * 1e6 / 8 / 1_048_576
            result.guestPagesPerSecondDuring = zip(lastPages, startPages).map { Double($0 &- $1) / max(lastTime - start, 1e-3) }
            return result
        case "failed", "cancelled":
            result.error = "QEMU's migration failed: \(status.serialized())"
            return result
        default:
            // The source's guest counters while it still runs (the last read before the end
            // gives "during").
            if let pages = try? stats().vcpus.map(\.pages) { lastPages = pages; lastTime = MonotonicClock.seconds() }
            Thread.sleep(forTimeInterval: 0.2)
        }
    }
    _ = try? qmp.execute("migrate_cancel")
    result.error = "did not finish within \(Int(settings.timeoutSeconds)) s"
    result.guestPagesPerSecondDuring = zip(lastPages, startPages).map { Double($0 &- $1) / max(lastTime - start, 1e-3) }
    return result
}
