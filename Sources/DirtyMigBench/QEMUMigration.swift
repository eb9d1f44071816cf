import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// QEMU 7.2 migrating the same guest image and config block over loopback, driven through QMP:
/// the peer dirtymig's migration benchmarks compare against.
///
/// The throttle and limit benchmarks run QEMU without -mem-prealloc: it would allocate all guest
/// RAM before the clock starts (the destination's page faults, which dirtymig's receiver pays
/// inside its clock) and fill the source's "never written" RAM with real zero pages. The
/// migration benchmark runs QEMU both ways (see Migrator).
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

    /// Fills the figures from a `query-migrate` reply whose status is "completed".
    mutating func take(_ status: JSONValue) {
        let ram = status["ram"]
        completed = true
        totalMs = status["total-time"]?.doubleValue ?? 0
        downtimeMs = status["downtime"]?.doubleValue ?? 0
        setupMs = status["setup-time"]?.doubleValue ?? 0
        passes = Int(ram?["dirty-sync-count"]?.doubleValue ?? 0)
        transferredBytes = UInt64(ram?["transferred"]?.doubleValue ?? 0)
        throughputMiBs = (ram?["mbps"]?.doubleValue ?? 0) * 1e6 / 8 / 1_048_576
    }
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
    let scratch: ScratchDirectory
    let workloads: [VCPUWorkload]
    let executable: String
    private(set) var arguments: [String]
    private let statsDump: (address: UInt64, size: Int, path: String)
    private var processes: [ChildProcess] = []

    /// Writes the image and config block itself (the throttle and limit benchmarks).
    init(memory: UInt64, workloads: [VCPUWorkload], dirtyRingSize: Int? = nil) throws {
        guard let qemu = qemuExecutable() else { throw BenchError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)") }
        scratch = try ScratchDirectory("dirtymig-qemu")
        self.workloads = workloads
        executable = qemu
        let export = QEMUExport(imagePath: scratch.file("guest.bin"), configPath: scratch.file("guest.cfg"), memorySize: memory,
                                vcpuCount: workloads.count, preallocate: false, executable: qemu)
        try export.writeFiles(config: GuestConfig(tscHz: try HostTSC.frequency(), memorySize: memory, vcpus: workloads))
        arguments = export.arguments
        statsDump = export.statsDumpArguments(to: scratch.file("stats.bin"))
        if let ring = dirtyRingSize, let accel = arguments.firstIndex(of: "-accel") {
            arguments[accel + 1] = "kvm,dirty-ring-size=\(ring)"
        }
    }

    /// As a user would: `dirtymig boot --export-image FILE --export-config FILE2` with the
    /// scenario's boot options writes the image and config block and prints the QEMU command
    /// line, which is what the processes run (without its -mem-prealloc unless `preallocate`).
    init(exportedBy dirtymig: String, scenario: MigrationScenario, preallocate: Bool) throws {
        guard let qemu = qemuExecutable() else { throw BenchError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)") }
        scratch = try ScratchDirectory("dirtymig-qemu")
        workloads = try scenario.resolvedWorkloads()
        executable = qemu
        let exporter = try ChildProcess(dirtymig, ["boot", "--export-image", scratch.file("guest.bin"),
                                                   "--export-config", scratch.file("guest.cfg")] + scenario.bootArguments,
                                        stdout: .file(scratch.file("command.txt")), stderrPath: scratch.file("export.log"))
        guard exporter.waitForExit(timeout: 60), exporter.exitStatus == 0 else {
            throw BenchError("dirtymig boot --export-image failed: \(exporter.stderrTail)")
        }
        // One line, words joined by single spaces (the scratch paths have none).
        let line = try String(contentsOfFile: scratch.file("command.txt"), encoding: .utf8)
        var words = line.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ").map(String.init)
        guard words.first.map({ $0.hasSuffix("qemu-system-x86_64") }) == true else {
            throw BenchError("dirtymig boot --export-image printed no QEMU command line: \(line.prefix(200))")
        }
        words.removeFirst()
        if !preallocate { words.removeAll { $0 == "-mem-prealloc" }}
        arguments = words
        statsDump = QEMUExport(imagePath: "", configPath: "", memorySize: scenario.memory, vcpuCount: scenario.vcpus)
            .statsDumpArguments(to: scratch.file("stats.bin"))
    }

    /// Starts QEMU with the guest's options, QMP on `scratch/NAME.sock`, and `extra`; returns
    /// once QMP answers (with -mem-prealloc that is after all its RAM is allocated).
    /// `prefix`: what starts it inside a network namespace (MigrationPlacement), if any.
    func launch(_ name: String, _ extra: [String] = [], prefix: [String] = []) throws -> QMPClient {
        let socket = scratch.file("\(name).sock")
        unlink(socket)
        let qemuArguments = arguments + ["-qmp", "unix:\(socket),server=on,wait=off"] + extra
        let process = try ChildProcess(executable, qemuArguments, prefix: prefix,
                                       stdout: .file(scratch.file("\(name).out")), stderrPath: scratch.file("\(name).log"))
        processes.append(process)
        do { return try QMPClient(path: socket, timeout: 120) } catch {
            throw BenchError("QEMU (\(name)) gave no QMP socket: \(error); \(process.stderrTail)")
        }
    }

    /// The QEMU processes running now.
    var pids: [pid_t] { processes.map(\.pid) }

    func stats(_ qmp: QMPClient) throws -> GuestStats {
        try qmp.execute("pmemsave", ["val": .number(statsDump.address), "size": .number(statsDump.size),
                                     "filename": .string(statsDump.path)])
        return GuestStats(bytes: [UInt8](try Data(contentsOf: URL(fileURLWithPath: statsDump.path))), vcpuCount: workloads.count)
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

    /// Ends every QEMU started so far (SIGTERM, which QEMU takes as a clean quit) and reaps it.
    func stopAll() {
        for process in processes { process.stop() }
        processes.removeAll()
    }

    deinit { stopAll() }
}

/// Waits for the migration QEMU runs behind `qmp` to end: by polling `query-migrate` every
/// `pollSeconds` (calling `betweenPolls` after each poll that finds it still running), or, with
/// `pollSeconds` nil, by waiting for its MIGRATION event (the `events` capability must be on)
/// without sending QEMU anything. Returns the final `query-migrate` reply ("completed" with its
/// times filled in, "failed" or "cancelled"), or nil after `timeout` seconds.
func awaitQEMUMigration(_ qmp: QMPClient, pollSeconds: Double?, timeout: Double,
                        betweenPolls: () -> Void = {}) throws -> JSONValue? {
    let deadline = MonotonicClock.seconds() + timeout
    if pollSeconds == nil {
        let ended = try qmp.waitForEvent("MIGRATION", timeout: timeout) { event in
            ["completed", "failed", "cancelled"].contains(event["data"]?["status"]?.stringValue ?? "")
        }
        guard ended != nil else { return nil }
    }
    while MonotonicClock.seconds() < deadline {
        let status = try qmp.execute("query-migrate")
        switch status["status"]?.stringValue {
        case "completed":
            // QEMU 7.2 reports "completed" before it fills in the times: wait for them.
            guard (status["total-time"]?.doubleValue ?? 0) > 0 else { Thread.sleep(forTimeInterval: 0.01); continue }
            return status
        case "failed", "cancelled":
            return status
        default:
            betweenPolls()
            Thread.sleep(forTimeInterval: pollSeconds ?? 0.01)
        }
    }
    return nil
}

/// The throttle benchmark's QEMU run: one process pair with the guest written by this process,
/// polled every 0.2 s with the guest's counters read between polls (for "during").
func runQEMUMigration(memory: UInt64, workloads: [VCPUWorkload], settings: QEMUMigrationSettings = QEMUMigrationSettings(),
                      waitForFinishedPasses: Bool, warmupSeconds: Double) throws -> QEMUMigrationResult {
    let guest = try QEMUGuest(memory: memory, workloads: workloads, dirtyRingSize: settings.dirtyRingSize)
    let port = try freeLoopbackPort()
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
    try qmp.execute("migrate", ["uri": .string("tcp:127.0.0.1:\(port)")])
    var lastPages = startPages
    var lastTime = start
    // The source's guest counters while it still runs (the last read before the end gives "during").
    let final = try awaitQEMUMigration(qmp, pollSeconds: 0.2, timeout: settings.timeoutSeconds) {
        if let pages = try? stats().vcpus.map(\.pages) { lastPages = pages; lastTime = MonotonicClock.seconds() }
    }
    result.guestPagesPerSecondDuring = zip(lastPages, startPages).map { Double($0 &- $1) / max(lastTime - start, 1e-3) }
    guard let final else {
        _ = try? qmp.execute("migrate_cancel")
        result.error = "did not finish within \(Int(settings.timeoutSeconds)) s"
        return result
    }
    guard final["status"]?.stringValue == "completed" else {
        result.error = "QEMU's migration failed: \(final.serialized())"
        return result
    }
    result.take(final)
    return result
}
