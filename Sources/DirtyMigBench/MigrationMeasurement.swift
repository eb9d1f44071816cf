import DirtyMigCore
import Foundation

/// What one migration run yields, whoever migrated: the columns of the migration table.
struct MigrationMeasurement {
    /// dirtymig's forecast of the time left against the time that was left, at shares of the
    /// total (ETAError), where the run sampled it.
    var etaErrorAt: [Double: Double] = [:]
    /// The migrator's own total: dirtymig's total_ms, QEMU's total-time (both from the start of
    /// the migration, connection setup included, to the destination running the guest).
    var totalMs: Double
    var downtimeMs: Double
    /// dirtymig's iterations; QEMU's dirty-sync-count.
    var passes: Int
    var sentBytes: UInt64
    /// Between two hosts: what the source's network namespace transmitted over the whole run
    /// (NamespaceTraffic), frames' headers included; nil over loopback.
    var wireBytes: UInt64?
    /// One line of extra detail for the per-run log on standard error.
    var detail: String = ""
    /// Others' share of the machine's CPUs during the migration (OthersCPUShare): near 0 on a
    /// quiet machine.
    var othersCPUShare: Double = 0

    /// MiB sent over the total time, computed here the same way for every migrator (QEMU's own
    /// `mbps` leaves its setup time out, dirtymig's throughput_mib_s does not).
    var mibPerSecond: Double { totalMs > 0 ? Double(sentBytes) / 1_048_576 / (totalMs / 1000) : 0 }
    var mibSent: Double { Double(sentBytes) / 1_048_576 }
    /// What crossed the link per second of the total time: the wire's count between two hosts,
    /// else the migrator's own.
    var linkMiBPerSecond: Double { totalMs > 0 ? Double(wireBytes ?? sentBytes) / 1_048_576 / (totalMs / 1000) : 0 }
}

/// The conditions every run of every migrator gets, so that the only difference is the migrator.
struct MigrationRunConditions {
    /// Seconds with nothing of the benchmark running (no VM, no child process, no thread but the
    /// main one) before each run starts: memory freed by the run before is handed back to the
    /// outer host after about 2 s, so every run starts on equally cold memory.
    var idleSeconds = 5.0
    /// Touch and free the scenario's data size just before each migration starts (WarmMemory).
    var warm = false
    /// After the guest is ready, before the destination is started (both migrators).
    var settleSeconds = 0.2
    /// `dirtymig migrate` reads the guest's pace over 0.5 s before its clock starts; QEMU's run
    /// waits as long in the same place (and reads the guest's pace the same way), so both
    /// migrations start the same time after the warm-up (if any) and the destination's start.
    var paceWindowSeconds = 0.5
    /// How often the guest's counters are read while waiting for it to be ready.
    var readyPollSeconds = 0.1
    /// QEMU: seconds between `query-migrate` polls during the migration; nil: no polling at all,
    /// wait for QEMU's MIGRATION event instead.
    var qmpPollSeconds: Double? = 0.1
    /// Limit for one migration.
    var migrationTimeoutSeconds = 300.0

    /// The one line printed under the table.
    func describe(runs: Int, order: String, others: OthersLoad) -> String {
        var parts = ["\(runs) run\(runs == 1 ? "" : "s") per cell", "order \(order)",
                     "\(format(idleSeconds)) s idle before every run (no VM, child process or benchmark thread running)",
                     warm ? "destination memory warmed (the scenario's data size touched and freed just before each migration, both migrators)"
                          : "destination memory not warmed (cold: freed more than 2 s before)",
                     "migration starts \(format(settleSeconds)) s after the guest is ready + \(format(paceWindowSeconds)) s pace window",
                     qmpPollSeconds.map { "QEMU polled with query-migrate every \(Int($0 * 1000)) ms" } ?? "QEMU not polled (MIGRATION event)",
                     "QEMU with -mem-prealloc faults in all guest RAM of both processes at their start (before the clock), without it on first touch (inside the clock); dirtymig's receiver likewise with --memory (dirtymig-prepared: before the clock) and without it (as pages arrive)",
                     "MiB/s = MiB sent / total time",
                     String(format: "other programs used at most %.0f %% of the CPUs during a migration (%.0f %% during an idle time)",
                            others.busiestMigration * 100, others.busiestIdle * 100)]
        if runs < 5 { parts.append("fewer than 5 runs: a smoke test, not a measurement") }
        return "Conditions: " + parts.joined(separator: "; ") + "."
    }

    private func format(_ seconds: Double) -> String {
        seconds == seconds.rounded() ? "\(Int(seconds))" : String(format: "%.1f", seconds)
    }
}

/// What other users of this shared machine took while the benchmark ran.
struct OthersLoad {
    var busiestMigration = 0.0
    var busiestIdle = 0.0
    var disturbedMigrations = 0
    var migrations = 0
    /// A migration during which others used more than this share of the CPUs is disturbed.
    static let disturbedAbove = 0.1

    mutating func add(idle: Double, migration: Double) {
        busiestIdle = max(busiestIdle, idle)
        busiestMigration = max(busiestMigration, migration)
        migrations += 1
        if migration > OthersLoad.disturbedAbove { disturbedMigrations += 1 }
    }

    /// A warning line when any migration was disturbed.
    var warning: String? {
        guard disturbedMigrations > 0 else { return nil }
        return "Warning: other programs used more than \(Int(OthersLoad.disturbedAbove * 100)) % of the CPUs during \(disturbedMigrations) of \(migrations) migrations (see the per-run lines on standard error): these figures are not a measurement of a quiet machine."
    }
}

/// A private scratch directory (mkdtemp, mode 0700) for sockets, logs and exported images,
/// removed when the value goes away.
final class ScratchDirectory {
    let path: String

    init(_ prefix: String) throws {
        var template = Array((NSTemporaryDirectory() + "\(prefix)-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else {
            throw BenchError("mkdtemp: \(String(cString: strerror(errno)))")
        }
        path = String(cString: made)
    }

    func file(_ name: String) -> String { path + "/" + name }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// A TCP port on loopback nobody listens on now (bound, read, released): the destination's
/// `--listen` / `-incoming` port, chosen the same way for both migrators.
func freeLoopbackPort() throws -> UInt16 {
    try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0)).localPort
}

/// How far a forecast of the time left was off, at given shares of the way (0.5: halfway):
/// the sample nearest each share, (forecast - actual) / actual, actual being the total minus
/// when the sample was taken. No entry where no sample lies within 10 % of the total of it.
enum ETAError {
    static func at(_ shares: [Double], samples: [(elapsed: Double, eta: Double)], totalSeconds: Double) -> [Double: Double] {
        var errors: [Double: Double] = [:]
        guard totalSeconds > 0 else { return errors }
        for share in shares {
            let moment = share * totalSeconds
            guard let nearest = samples.min(by: { abs($0.elapsed - moment) < abs($1.elapsed - moment) }),
                  abs(nearest.elapsed - moment) <= 0.1 * totalSeconds else { continue }
            let actual = totalSeconds - nearest.elapsed
            guard actual > 0 else { continue }
            errors[share] = (nearest.eta - actual) / actual
        }
        return errors
    }
}
