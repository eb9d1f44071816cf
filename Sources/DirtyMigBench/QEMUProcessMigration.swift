import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// One QEMU 7.2 migration run the way a user runs it: two qemu-system-x86_64 processes started
/// with the command line `dirtymig boot --export-image` printed for the scenario, driven
/// through QMP, in the same order and at the same moments as dirtymig's three processes:
///
///     source started -> guest ready (counters polled every 100 ms) -> settle ->
///     destination started and waiting -> [warm] -> 0.5 s reading the guest's pace -> migrate
///
/// (dirtymig's run waits the same 0.5 s there; its VM keeps the guest's recent pace at hand.)
/// max-bandwidth 100 GiB/s (QEMU's default is 32 MiB/s), downtime-limit as the scenario says.
/// During the migration `query-migrate` alone is polled, every `qmpPollSeconds` (or not at all:
/// the MIGRATION event ends the wait); the figures are QEMU's own.
///
/// With `psk`, both sides get a tls-creds-psk object over its directory and the migration
/// parameter tls-creds; the destination starts with `-incoming defer` and is given its URI by
/// `migrate-incoming` once tls-creds is set, as QEMU's documentation says for TLS.
///
/// With `multifd`, both sides get the multifd capability and its parameters (QEMUMultifd) before
/// either end starts, the destination likewise on `-incoming defer`: QEMU's multifd needs the
/// capability on both ends, the destination's set before it listens.
func runQEMUProcessMigration(_ scenario: MigrationScenario, guest: QEMUGuest,
                             conditions: MigrationRunConditions, psk: BenchPSK? = nil, multifd: QEMUMultifd? = nil,
                             placement: MigrationPlacement = .loopback) throws -> MigrationMeasurement {
    defer { guest.stopAll() }
    let credentials = { (endpoint: String) -> [String] in
        guard let psk else { return [] }
        return ["-object", "tls-creds-psk,id=tls0,endpoint=\(endpoint),dir=\(psk.directory)\(endpoint == "client" ? ",username=\(psk.identity)" : "")"]
    }
    let source = try startQEMUSource(scenario, guest: guest, conditions: conditions, credentials("client"), placement: placement)

    let port = try placement.destinationPort()
    let uri = "tcp:\(placement.destinationHost):\(port)"
    let deferred = psk != nil || multifd != nil
    let destination = try guest.launch("dst", credentials("server") + ["-incoming", deferred ? "defer" : uri],
                                       prefix: placement.destinationPrefix)
    if deferred {
        if psk != nil { try destination.execute("migrate-set-parameters", ["tls-creds": "tls0"]) }
        try multifd?.apply(to: destination)
        try destination.execute("migrate-incoming", ["uri": .string(uri)])
    }
    let waiting = try destination.execute("query-status")["status"]?.stringValue
    guard waiting == "inmigrate" else { throw BenchError("QEMU's destination is '\(waiting ?? "?")', not waiting for a migration") }

    try source.execute("migrate-set-parameters", ["max-bandwidth": .number(100 << 30),
                                                  "downtime-limit": .number(scenario.downtimeMs)])
    if psk != nil { try source.execute("migrate-set-parameters", ["tls-creds": "tls0"]) }
    try multifd?.apply(to: source)
    if conditions.qmpPollSeconds == nil {
        try source.execute("migrate-set-capabilities", ["capabilities": .array([["capability": "events", "state": true]])])
    }
    if conditions.warm { WarmMemory.touchAndFree(scenario.warmBytes) }
    _ = try guest.stats(source)
    Thread.sleep(forTimeInterval: conditions.paceWindowSeconds)
    _ = try guest.stats(source)
    let others = OthersCPUShare(children: guest.pids)
    try source.execute("migrate", ["uri": .string(uri)])
    let ended = try awaitQEMUMigration(source, pollSeconds: conditions.qmpPollSeconds, timeout: conditions.migrationTimeoutSeconds)
    let othersShare = others.othersShare(children: guest.pids)
    guard let final = ended else {
        _ = try? source.execute("migrate_cancel")
        throw BenchError("QEMU's migration did not finish within \(Int(conditions.migrationTimeoutSeconds)) s")
    }
    guard final["status"]?.stringValue == "completed" else { throw BenchError("QEMU's migration failed: \(final.serialized())") }
    var result = QEMUMigrationResult()
    result.take(final)

    try awaitQEMUDestinationRunning(destination)
    return MigrationMeasurement(totalMs: result.totalMs, downtimeMs: result.downtimeMs, passes: result.passes,
                                sentBytes: result.transferredBytes,
                                detail: String(format: "setup %.1f ms, QEMU's own mbps %.0f MiB/s", result.setupMs, result.throughputMiBs),
                                othersCPUShare: othersShare)
}

/// QEMU's source started with the guest's options (and `extra`), once its guest is ready (its
/// counters polled as dirtymig's are) and the settle time has passed: the same moment a dirtymig
/// run starts its destination.
func startQEMUSource(_ scenario: MigrationScenario, guest: QEMUGuest, conditions: MigrationRunConditions,
                     _ extra: [String] = [], placement: MigrationPlacement = .loopback) throws -> QMPClient {
    let source = try guest.launch("src", extra, prefix: placement.sourcePrefix)
    let deadline = MonotonicClock.seconds() + 120
    while !scenario.isReady(GuestProgress(try guest.stats(source)), workloads: guest.workloads) {
        guard MonotonicClock.seconds() < deadline else { throw BenchError("QEMU's guest was not ready within 120 s") }
        Thread.sleep(forTimeInterval: conditions.readyPollSeconds)
    }
    Thread.sleep(forTimeInterval: conditions.settleSeconds)
    return source
}

/// The source says "completed" once it has sent everything; the destination may still be
/// loading the last of it for a moment. Throws if it does not run within 10 s.
func awaitQEMUDestinationRunning(_ destination: QMPClient) throws {
    var running = try destination.execute("query-status")["status"]?.stringValue
    let runDeadline = MonotonicClock.seconds() + 10
    while running != "running" && MonotonicClock.seconds() < runDeadline {
        Thread.sleep(forTimeInterval: 0.05)
        running = try destination.execute("query-status")["status"]?.stringValue
    }
    guard running == "running" else { throw BenchError("QEMU's destination is '\(running ?? "?")' after the migration, not running") }
}
