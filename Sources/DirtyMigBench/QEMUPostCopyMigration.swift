import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// One QEMU 7.2 post-copy run the way a user (or libvirt) runs it: two qemu-system-x86_64
/// processes from the line `dirtymig boot --export-image` printed (without -mem-prealloc, as
/// dirtymig's `receive` runs without --memory), driven through QMP, at the same moments as
/// dirtymig's run (MigrationRunConditions):
///
///     source started -> guest ready -> settle -> destination started with -incoming defer,
///     postcopy-ram and postcopy-blocktime set, migrate-incoming -> [warm] -> pace window ->
///     migrate -> migrate-start-postcopy once pass 1 is done -> completed
///
/// postcopy-ram is set on both sides (QEMU needs it on both), postcopy-blocktime on the
/// destination (where the blocked time is measured; setting it on the source is harmless, and
/// done too so that both sides carry the same capability list). The cap is max-bandwidth for
/// pre-copy and max-postcopy-bandwidth after the switch.
///
/// "After the first pass": QEMU syncs its dirty bitmap once at the start (dirty-sync-count 1)
/// and next when pass 1 has left less than its threshold, i.e. at its end (count 2); the run
/// polls query-migrate every 10 ms until then and asks for the switch, which QEMU makes at its
/// migration thread's next iteration. After that, query-migrate every 100 ms, and while the
/// source says postcopy-active the destination's guest counters (pmemsave) for the reader's pace.
func runQEMUPostCopyMigration(_ scenario: PostCopyScenario, guest: QEMUGuest, conditions: MigrationRunConditions,
                              bandwidth: UInt64) throws -> PostCopyMeasurement {
    defer { guest.stopAll() }
    let capabilities: JSONValue = ["capabilities": .array([["capability": "postcopy-ram", "state": true],
                                                           ["capability": "postcopy-blocktime", "state": true]])]
    let source = try startQEMUSource(scenario.guest, guest: guest, conditions: conditions)
    let port = try freeLoopbackPort()
    let uri = "tcp:127.0.0.1:\(port)"
    let destination = try guest.launch("dst", ["-incoming", "defer"])
    try destination.execute("migrate-set-capabilities", capabilities)
    try destination.execute("migrate-incoming", ["uri": .string(uri)])
    let waiting = try destination.execute("query-status")["status"]?.stringValue
    guard waiting == "inmigrate" else { throw BenchError("QEMU's destination is '\(waiting ?? "?")', not waiting for a migration") }
    try source.execute("migrate-set-capabilities", capabilities)
    try source.execute("migrate-set-parameters", ["max-bandwidth": .number(bandwidth), "max-postcopy-bandwidth": .number(bandwidth),
                                                  "downtime-limit": .number(scenario.guest.downtimeMs)])
    if conditions.warm { WarmMemory.touchAndFree(scenario.guest.warmBytes) }

    var before = ReaderPace(), during = ReaderPace()
    func readerPages(_ qmp: QMPClient) throws -> UInt64? {
        guard let reader = scenario.readerVCPU else { return nil }
        return try guest.stats(qmp).vcpus[reader].pages
    }
    if let pages = try readerPages(source) { before.add(pages) }
    Thread.sleep(forTimeInterval: conditions.paceWindowSeconds)
    if let pages = try readerPages(source) { before.add(pages) }

    let others = OthersCPUShare(children: guest.pids)
    try source.execute("migrate", ["uri": .string(uri)])
    let deadline = MonotonicClock.seconds() + conditions.migrationTimeoutSeconds
    var asked = false, sawPostCopy = false
    var refusal: String?
    var final: JSONValue?
    while final == nil {
        guard MonotonicClock.seconds() < deadline else {
            _ = try? source.execute("migrate_cancel")
            throw BenchError("QEMU's migration did not finish within \(Int(conditions.migrationTimeoutSeconds)) s")
        }
        let status = try source.execute("query-migrate")
        switch status["status"]?.stringValue {
        case "completed":
            // QEMU 7.2 reports "completed" before it fills in the times: wait for them.
            if (status["total-time"]?.doubleValue ?? 0) > 0 { final = status; continue }
        case "failed", "cancelled":
            throw BenchError("QEMU's migration \(status["status"]?.stringValue ?? "?"): \(status.serialized().prefix(400))")
        case "postcopy-active":
            sawPostCopy = true
            if let pages = try readerPages(destination) { during.add(pages) }
        default:
            if !asked && (status["ram"]?["dirty-sync-count"]?.doubleValue ?? 0) >= 2 {
                asked = true
                // Refused when the migration has just completed (nothing left to switch for).
                do { try source.execute("migrate-start-postcopy") } catch { refusal = "\(error)" }
            }
        }
        Thread.sleep(forTimeInterval: asked ? 0.1 : 0.01)
    }
    let othersShare = others.othersShare(children: guest.pids)
    guard let final else { throw BenchError("QEMU's migration gave no final status") }
    try awaitQEMUDestinationRunning(destination)

    // The blocked time is the destination's (query-migrate there, with postcopy-blocktime on).
    let incoming = try destination.execute("query-migrate")
    let perVCPU = incoming["postcopy-vcpu-blocktime"]?.arrayValue?.compactMap(\.doubleValue)
    let errors = try guest.stats(destination).vcpus.reduce(UInt64(0)) { $0 + $1.errors }
    let ram = final["ram"]
    func bytes(_ key: String) -> UInt64 { UInt64(ram?[key]?.doubleValue ?? 0) }
    let after = bytes("postcopy-bytes")
    let switched = sawPostCopy || after > 0
    return PostCopyMeasurement(
        switched: switched, totalMs: final["total-time"]?.doubleValue ?? 0, downtimeMs: final["downtime"]?.doubleValue ?? 0,
        bytesBeforeSwitch: bytes("precopy-bytes") + bytes("downtime-bytes"), bytesAfterSwitch: after,
        pageRequests: switched ? ram?["postcopy-requests"]?.doubleValue : nil,
        faultLatencyP50Us: nil, faultLatencyP99Us: nil,
        vcpuBlockedMs: switched ? perVCPU.map { $0.reduce(0, +) } : nil,
        readerBefore: before.pagesPerSecond, readerDuring: switched ? during.pagesPerSecond : nil,
        guestErrors: errors,
        detail: String(format: "%.0f dirty syncs, %.0f MB transferred in all, setup %.0f ms, destination's postcopy-blocktime (all vCPUs blocked at once) %@ ms, per vCPU %@%@",
                       ram?["dirty-sync-count"]?.doubleValue ?? 0, Double(bytes("transferred")) / 1e6, final["setup-time"]?.doubleValue ?? 0,
                       incoming["postcopy-blocktime"]?.doubleValue.map { String(format: "%.0f", $0) } ?? "-",
                       perVCPU.map { $0.map { String(format: "%.0f", $0) }.joined(separator: "/") } ?? "-",
                       refusal.map { "; migrate-start-postcopy refused: \($0)" } ?? ""),
        othersCPUShare: othersShare)
}
