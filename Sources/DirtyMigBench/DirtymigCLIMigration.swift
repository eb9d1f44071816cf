import DirtyMigCore
import Foundation

/// One dirtymig migration run the way a user runs it: three processes of the `dirtymig` binary
/// built with this benchmark, talking over a private directory's control sockets and loopback.
///
///     dirtymig boot --memory M --vcpus N --workload ... --control DIR/src.sock
///     dirtymig receive --listen 127.0.0.1:PORT --control DIR/dst.sock
///     dirtymig migrate --vm DIR/src.sock --to 127.0.0.1:PORT --downtime 300ms --json
///
/// The figures are `migrate`'s own JSON report. The benchmark's process only starts programs,
/// reads their output and polls the source's counters (100 ms apart) until the guest is ready;
/// during the migration it waits in waitpid.
///
/// `credentials` (`--psk-file FILE`) go to both `receive` and `migrate`. `prepareMemory` starts
/// the receiver with `--memory` (the VM's size): it allocates the RAM before it listens, as QEMU's
/// destination does with -mem-prealloc, so the clock starts on resident memory.
///
/// `watch` is for a benchmark that reads more than the report (the post-copy benchmark reads
/// the guest's pace on both ends): it is called at both ends of the pace window, every 100 ms
/// while `migrate` runs, and given the report.
func runDirtymigCLIMigration(_ scenario: MigrationScenario, dirtymig: String, conditions: MigrationRunConditions,
                             credentials: [String] = [], prepareMemory: Bool = false,
                             placement: MigrationPlacement = .loopback, sampleETA: Bool = false,
                             migrateArguments: [String] = [], watch: DirtymigRunWatch? = nil) throws -> MigrationMeasurement {
    // Plaintext beyond loopback is refused without --insecure, on both sides.
    let credentials = credentials.isEmpty && placement.acrossHosts ? ["--insecure"] : credentials
    let scratch = try ScratchDirectory("dirtymig-bench")
    // Kept until the processes below are stopped (this defer runs last): Swift may otherwise
    // release it after its last use and remove the sockets under running programs.
    defer { withExtendedLifetime(scratch) {} }
    let source = scratch.file("src.sock"), destination = scratch.file("dst.sock")
    let workloads = try scenario.resolvedWorkloads()

    let boot = try placement.spawn(source: true, dirtymig, ["boot"] + scenario.bootArguments + ["--control", source],
                                   stdout: .pipe, stderrPath: scratch.file("boot.log"))
    defer { boot.stop() }
    _ = try boot.expectLine(containing: "running", timeout: 60)
    try waitUntilReady(scenario, workloads: workloads, socket: source, conditions: conditions)
    Thread.sleep(forTimeInterval: conditions.settleSeconds)

    let port = try placement.destinationPort()
    let address = "\(placement.destinationHost):\(port)"
    let prepare = prepareMemory ? ["--memory", "\(scenario.memory >> 20)M"] : []
    let receive = try placement.spawn(source: false, dirtymig, ["receive", "--listen", address, "--control", destination] + prepare + credentials,
                                      stdout: .pipe, stderrPath: scratch.file("receive.log"))
    defer { receive.stop() }
    _ = try receive.expectLine(containing: "listening", timeout: 60)

    if conditions.warm { WarmMemory.touchAndFree(scenario.warmBytes) }
    // The 0.5 s QEMU's run spends here reading its guest's pace (dirtymig's VM keeps its own at
    // hand), so that both destinations wait as long before the migration starts.
    watch?.paceWindow(source, false)
    Thread.sleep(forTimeInterval: conditions.paceWindowSeconds)
    watch?.paceWindow(source, true)
    let started = MonotonicClock.seconds()
    let others = OthersCPUShare(children: [boot.pid, receive.pid])
    let migrate = try ChildProcess(dirtymig, ["migrate", "--vm", source, "--to", address,
                                              "--downtime", "\(scenario.downtimeMs)ms", "--json"] + credentials + migrateArguments,
                                   stdout: .file(scratch.file("migrate.json")), stderrPath: scratch.file("migrate.log"))
    // With `sampleETA`, the source's time-left forecast is read every 100 ms (one query-migrate
    // on its control socket: a light load the table's conditions state).
    var etaSamples: [(elapsed: Double, eta: Double)] = []
    let watcher = sampleETA ? try? ControlClient(path: source, callTimeout: 2) : nil
    defer { watcher?.close() }
    let deadline = MonotonicClock.seconds() + conditions.migrationTimeoutSeconds
    while !migrate.waitForExit(timeout: watcher == nil && watch == nil ? conditions.migrationTimeoutSeconds : 0.1) {
        guard MonotonicClock.seconds() < deadline else {
            migrate.stop()
            throw BenchError("dirtymig migrate did not finish within \(Int(conditions.migrationTimeoutSeconds)) s")
        }
        if let progress = try? watcher?.call("query-migrate"), let eta = progress["eta_s"]?.doubleValue,
           let elapsed = progress["elapsed_s"]?.doubleValue {
            etaSamples.append((elapsed, eta))
        }
        watch?.duringMigration(source, destination)
    }
    let wallMs = (MonotonicClock.seconds() - started) * 1000
    let othersShare = others.othersShare(children: [boot.pid, receive.pid])
    let output = (try? String(contentsOfFile: scratch.file("migrate.json"), encoding: .utf8)) ?? ""
    guard let report = try? JSONValue.parse(output.trimmingCharacters(in: .whitespacesAndNewlines)),
          report["status"]?.stringValue == "completed" else {
        throw BenchError("dirtymig migrate \(migrate.exitDescription ?? "?"): \(output.prefix(500)) \(migrate.stderrTail)")
    }
    watch?.report = report

    // The guest must run at the destination; then both ends are let go as a user would.
    _ = try receive.expectLine(containing: "received and running", timeout: 30)
    try checkRunning(socket: destination, vcpus: scenario.vcpus)
    watch?.afterMigration(destination)
    _ = try? ControlClient(path: destination).call("quit", timeout: 5)
    if !boot.waitForExit(timeout: 30) { throw BenchError("dirtymig boot did not exit after its VM migrated: \(boot.stderrTail)") }
    receive.waitForExit(timeout: 30)

    func number(_ key: String) -> Double { report[key]?.doubleValue ?? 0 }
    let totalSeconds = number("total_ms") / 1000
    return MigrationMeasurement(etaErrorAt: ETAError.at([0.5, 0.9], samples: etaSamples, totalSeconds: totalSeconds),
                                totalMs: number("total_ms"), downtimeMs: number("downtime_ms"),
                                passes: Int(number("iterations")), sentBytes: UInt64(number("transferred_bytes")),
                                detail: String(format: "migrate process %.0f ms from spawn to exit, setup %.1f ms%@",
                                               wallMs, number("setup_ms"),
                                               report["channel"]?["encrypted"]?.boolValue == true
                                                   ? String(format: ", TLS handshake %.2f ms (%@)", report["channel"]?["handshake_ms"]?.doubleValue ?? 0,
                                                            report["channel"]?["kernel_tls"]?.boolValue == true ? "kernel TLS" : "userspace TLS") : ""),
                                othersCPUShare: othersShare)
}

/// Polls the VM's `query-status` until the scenario's guest is ready (the same rule QEMU's guest
/// is held to, read through pmemsave there).
private func waitUntilReady(_ scenario: MigrationScenario, workloads: [VCPUWorkload], socket: String,
                            conditions: MigrationRunConditions) throws {
    let client = try ControlClient(path: socket, callTimeout: 10)
    defer { client.close() }
    let deadline = MonotonicClock.seconds() + 120
    while true {
        let status = try client.call("query-status")
        if scenario.isReady(GuestProgress(status: status), workloads: workloads) { return }
        guard MonotonicClock.seconds() < deadline else {
            throw BenchError("the guest was not ready within 120 s: \(status.serialized().prefix(300))")
        }
        Thread.sleep(forTimeInterval: conditions.readyPollSeconds)
    }
}

/// The VM behind `socket` is running (its counters need not move: an idle or finished vCPU
/// halts).
private func checkRunning(socket: String, vcpus: Int) throws {
    let client = try ControlClient(path: socket, callTimeout: 10)
    defer { client.close() }
    let status = try client.call("query-status")
    guard status["state"]?.stringValue == "running", GuestProgress(status: status).passes.count == vcpus else {
        throw BenchError("the destination VM is not running: \(status.serialized().prefix(300))")
    }
}

/// What a benchmark reads of one dirtymig run besides the figures `runDirtymigCLIMigration`
/// returns. Each hook gets the control socket of the side it reads and runs in the benchmark's
/// main thread; its cost (one control call) falls inside or outside the clock as said.
final class DirtymigRunWatch {
    /// At the start (false) and the end (true) of the pace window, before the clock: the source.
    let paceWindow: (_ source: String, _ ended: Bool) -> Void
    /// Every 100 ms while `migrate` runs (inside the clock).
    let duringMigration: (_ source: String, _ destination: String) -> Void
    /// Once the VM runs at the destination, after the clock: the destination.
    let afterMigration: (_ destination: String) -> Void
    /// `migrate --json`'s report, once it completed.
    var report: JSONValue?

    init(paceWindow: @escaping (String, Bool) -> Void, duringMigration: @escaping (String, String) -> Void,
         afterMigration: @escaping (String) -> Void) {
        self.paceWindow = paceWindow
        self.duringMigration = duringMigration
        self.afterMigration = afterMigration
    }
}
