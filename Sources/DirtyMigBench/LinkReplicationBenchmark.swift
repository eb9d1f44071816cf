import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// `dirtymig-bench link --replication`: continuous replication between two hosts, the primary
/// (`dirtymig boot`, then `migrate --continuous`) in one network namespace and its standby
/// (`dirtymig receive --standby`) in the other, over the veth pair shaped with tbf to each rate.
/// The figures are the primary's own (`query-replication` on its control socket, what
/// `migrate --replication --json` prints), read at the start and the end of a window, after a
/// warm-up. Guests alternate, with the same idle time before every run, as the migration
/// benchmarks' migrators do.
struct LinkReplicationOptions {
    var runs = 5
    var ratesMbit = [1000, 100]
    var guests = LinkReplicationGuest.defaults
    var idleSeconds = 5.0
    /// From protection to the first reading: the checkpoints right after the initial copy carry
    /// what the guest wrote during it.
    var warmupSeconds = 2.0
    /// The window the rates are measured over.
    var seconds = 10.0
}

/// A guest the replication table runs, as the `dirtymig boot` options a user types. Both emit a
/// line every 10 ms (a check workload's `emit=`), so output delay is measured on both.
struct LinkReplicationGuest: Hashable {
    let key: String
    let label: String
    let workload: String

    var bootArguments: [String] { ["--memory", "512M", "--vcpus", "1", "--workload", "0:" + workload] }

    /// Idle but for its output: checking 4 MiB at 64 KiB/s dirties about 16 pages a second.
    static let idle = LinkReplicationGuest(key: "idle", label: "idle but for its output (a line every 10 ms; 64 KiB/s checked)",
                                           workload: "check,ws=4M,rate=64K,emit=10ms")
    /// 6 MiB/s of dirtied pages is 50 Mbit/s of checkpoints: about half of the 100 Mbit/s link.
    static let writer = LinkReplicationGuest(key: "writer", label: "writer: 6 MiB/s over 64 MiB (half of 100 Mbit/s), a line every 10 ms",
                                             workload: "check,ws=64M,rate=6M,emit=10ms")
    /// 24 MiB/s over 16 MiB dirties twice what 100 Mbit/s carries: there each checkpoint waits
    /// for the one before to cross, so epochs stretch until a checkpoint holds the whole working
    /// set (16 MiB, about 1.4 s at 100 Mbit/s).
    static let fastWriter = LinkReplicationGuest(key: "fast-writer", label: "fast writer: 24 MiB/s over 16 MiB (twice 100 Mbit/s), a line every 10 ms",
                                                 workload: "check,ws=16M,rate=24M,emit=10ms")
    /// What runs without --scenario; `fast-writer` runs when asked for.
    static let defaults = [idle, writer]
    static let known = [idle, writer, fastWriter]
}

/// One replication run's figures: the primary's, over the window.
struct LinkReplicationMeasurement {
    var checkpointsPerSecond: Double
    var effectiveIntervalMs: Double?
    var pauseMedianMs: Double?
    var pauseP99Ms: Double?
    var outputDelayMedianMs: Double?
    var outputDelayP99Ms: Double?
    var mibPerSecond: Double
    /// Protected at the end of the window, and not protected again meanwhile (no lost standby).
    var stayedProtected: Bool
    var othersCPUShare: Double

    /// The window's figures from two `query-replication` replies `seconds` apart. Pause, output
    /// delay and the effective interval are dirtymig's over its last 4096 checkpoints: everything
    /// since protection began, at these rates and lengths.
    init(first: JSONValue, last: JSONValue, seconds: Double, othersCPUShare: Double) {
        func number(_ value: JSONValue?) -> Double? { value?.doubleValue }
        let checkpoints = (number(last["checkpoints"]) ?? 0) - (number(first["checkpoints"]) ?? 0)
        let bytes = (number(last["bytes_sent"]) ?? 0) - (number(first["bytes_sent"]) ?? 0)
        checkpointsPerSecond = seconds > 0 ? checkpoints / seconds : 0
        mibPerSecond = seconds > 0 ? bytes / 1_048_576 / seconds : 0
        effectiveIntervalMs = number(last["effective_interval_ms"])
        pauseMedianMs = number(last["pause_ms"]?["median"])
        pauseP99Ms = number(last["pause_ms"]?["p99"])
        outputDelayMedianMs = number(last["output_delay_ms"]?["median"])
        outputDelayP99Ms = number(last["output_delay_ms"]?["p99"])
        stayedProtected = last["status"]?.stringValue == "protected" && number(last["reprotections"]) == number(first["reprotections"])
        self.othersCPUShare = othersCPUShare
    }
}

func runLinkReplicationBenchmark(_ options: LinkReplicationOptions) throws {
    let dirtymig = try dirtymigBesideBenchmark()
    var others = OthersLoad()
    emitLine("Continuous replication between two network namespaces over a veth pair shaped with tbf (both directions), --checkpoint-interval 25ms (the default); median (min-max) of \(options.runs) run\(options.runs == 1 ? "" : "s")")
    emitLine("")
    emitLine(LinkReplicationTable.header)
    for rate in options.ratesMbit {
        let link: TwoHostLink
        do { link = try TwoHostLink(rateMbit: rate) } catch { throw BenchError("cannot make two hosts: \(error)") }
        defer { link.remove() }
        let placement = MigrationPlacement(link: link)
        let results = try alternate(options.guests, runs: options.runs, idleSeconds: options.idleSeconds, others: &others,
                                    othersShare: \LinkReplicationMeasurement.othersCPUShare) { guest, run, busy in
            let measured = try runLinkReplication(guest, dirtymig: dirtymig, placement: placement, options: options)
            log(String(format: "%d Mbit/s %@ run %d/%d: %.1f checkpoints/s, effective interval %@ ms, pause median %@ p99 %@ ms, output delay median %@ p99 %@ ms, %.2f MiB/s, %@; others used %.0f %% of the CPUs during the window, the machine was %.0f %% busy during the idle time before",
                       rate, guest.key, run, options.runs, measured.checkpointsPerSecond, LinkReplicationTable.optional(measured.effectiveIntervalMs),
                       LinkReplicationTable.optional(measured.pauseMedianMs, "%.2f"), LinkReplicationTable.optional(measured.pauseP99Ms, "%.2f"),
                       LinkReplicationTable.optional(measured.outputDelayMedianMs), LinkReplicationTable.optional(measured.outputDelayP99Ms),
                       measured.mibPerSecond,
                       measured.stayedProtected ? "protected throughout" : "NOT protected throughout",
                       measured.othersCPUShare * 100, busy * 100))
            return measured
        }
        for (index, guest) in options.guests.enumerated() {
            emitLine(LinkReplicationTable.row(link: index == 0 ? LinkReplicationTable.linkLabel(rate) : "", guest: guest.label,
                                              results[guest] ?? []))
        }
    }
    emitLine("")
    var conditions = ["\(options.runs) run\(options.runs == 1 ? "" : "s") per cell",
                      "guests alternated, the order reversed every other round",
                      "\(LinkReplicationTable.seconds(options.idleSeconds)) s idle before every run (no VM, child process or benchmark thread running)",
                      "each guest 512 MiB, 1 vCPU, `dirtymig boot` as a user runs it, with --guest-output to a file",
                      "standby: `receive --standby --failover manual --insecure` (it never takes over while measured), primary: `migrate --continuous --insecure`",
                      "figures from the primary's query-replication: checkpoints/s and MiB/s are acknowledged checkpoints and bytes sent over a \(LinkReplicationTable.seconds(options.seconds)) s window starting \(LinkReplicationTable.seconds(options.warmupSeconds)) s after protection; pause, output delay (how long a guest line was held until its checkpoint was acknowledged) and the effective interval (the median epoch) are dirtymig's own over every checkpoint since protection",
                      String(format: "other programs used at most %.0f %% of the CPUs during a window (%.0f %% during an idle time)",
                             others.busiestMigration * 100, others.busiestIdle * 100)]
    if options.runs < 5 { conditions.append("fewer than 5 runs: a smoke test, not a measurement") }
    emitLine("Conditions: " + conditions.joined(separator: "; ") + ".")
    if let warning = others.warning { emitLine(warning.replacingOccurrences(of: "migrations", with: "replication windows")) }
}

/// One run: standby started in the destination's namespace, primary booted in the source's,
/// `migrate --continuous` until protected, warm-up, the window between two readings, then the
/// replication stopped and both processes ended, as a user would.
private func runLinkReplication(_ guest: LinkReplicationGuest, dirtymig: String, placement: MigrationPlacement,
                                options: LinkReplicationOptions) throws -> LinkReplicationMeasurement {
    let scratch = try ScratchDirectory("dirtymig-bench")
    defer { withExtendedLifetime(scratch) {} }
    let primarySocket = scratch.file("primary.sock"), standbySocket = scratch.file("standby.sock")
    let address = "\(placement.destinationHost):\(try placement.destinationPort())"
    let credentials = placement.acrossHosts ? ["--insecure"] : []

    let standby = try placement.spawn(source: false, dirtymig, ["receive", "--listen", address, "--standby", "--failover", "manual",
                                                                "--control", standbySocket] + credentials,
                                      stdout: .pipe, stderrPath: scratch.file("standby.log"))
    defer { standby.stop() }
    _ = try standby.expectLine(containing: "listening", timeout: 60)
    let boot = try placement.spawn(source: true, dirtymig, ["boot"] + guest.bootArguments
                                       + ["--control", primarySocket, "--guest-output", scratch.file("output.txt")],
                                   stdout: .pipe, stderrPath: scratch.file("boot.log"))
    defer { boot.stop() }
    _ = try boot.expectLine(containing: "running", timeout: 60)

    let replicate = try ChildProcess(dirtymig, ["migrate", "--vm", primarySocket, "--continuous", "--to", address, "--json"] + credentials,
                                     stdout: .file(scratch.file("replicate.json")), stderrPath: scratch.file("replicate.log"))
    guard replicate.waitForExit(timeout: 300), replicate.exitStatus == 0 else {
        replicate.stop()
        throw BenchError("migrate --continuous \(replicate.exitDescription ?? "did not return within 300 s"): \(replicate.stderrTail)")
    }
    let reportText = (try? String(contentsOfFile: scratch.file("replicate.json"), encoding: .utf8)) ?? ""
    let report = try? JSONValue.parse(reportText.trimmingCharacters(in: .whitespacesAndNewlines))
    guard report?["status"]?.stringValue == "protected" else { throw BenchError("migrate --continuous reported: \(reportText.prefix(300))") }

    let client = try ControlClient(path: primarySocket, callTimeout: 10)
    defer { client.close() }
    Thread.sleep(forTimeInterval: options.warmupSeconds)
    let first = try client.call("query-replication")
    let others = OthersCPUShare(children: [boot.pid, standby.pid])
    let start = MonotonicClock.seconds()
    Thread.sleep(forTimeInterval: options.seconds)
    let last = try client.call("query-replication")
    let elapsed = MonotonicClock.seconds() - start
    let othersShare = others.othersShare(children: [boot.pid, standby.pid])

    _ = try? client.call("replicate-stop", arguments: ["reason": "benchmark run ended"], timeout: 30)
    _ = try? client.call("quit", timeout: 5)
    if !boot.waitForExit(timeout: 30) { throw BenchError("dirtymig boot did not exit on quit: \(boot.stderrTail)") }
    return LinkReplicationMeasurement(first: first, last: last, seconds: elapsed, othersCPUShare: othersShare)
}

/// The replication table's lines.
enum LinkReplicationTable {
    static let header = """
        | link | guest | checkpoints/s | effective interval ms | pause median ms | pause p99 ms | output delay median ms | output delay p99 ms | MiB/s to the standby | protected throughout |
        |---|---|---|---|---|---|---|---|---|---|
        """

    static func row(link: String, guest: String, _ runs: [LinkReplicationMeasurement]) -> String {
        let cells = [link, guest, cell(runs.map(\.checkpointsPerSecond)), optionalCell(runs.map(\.effectiveIntervalMs)),
                     optionalCell(runs.map(\.pauseMedianMs), "%.2f"), optionalCell(runs.map(\.pauseP99Ms), "%.2f"),
                     optionalCell(runs.map(\.outputDelayMedianMs)), optionalCell(runs.map(\.outputDelayP99Ms)),
                     cell(runs.map(\.mibPerSecond), "%.2f"),
                     "\(runs.filter(\.stayedProtected).count) of \(runs.count)"]
        return "| " + cells.joined(separator: " | ") + " |"
    }

    /// median (min-max) of the runs that measured the figure; "-" if none did, and how many did
    /// when some did not (dirtymig reports null for a figure it has no samples of).
    static func optionalCell(_ values: [Double?], _ format: String = "%.1f") -> String {
        let measured = values.compactMap { $0 }
        guard !measured.isEmpty else { return "-" }
        return cell(measured, format) + (measured.count < values.count ? " (\(measured.count) of \(values.count) runs)" : "")
    }

    static func optional(_ value: Double?, _ format: String = "%.1f") -> String {
        value.map { String(format: format, $0) } ?? "-"
    }

    static func linkLabel(_ rateMbit: Int) -> String {
        rateMbit >= 1000 && rateMbit % 1000 == 0 ? "\(rateMbit / 1000) Gbit/s" : "\(rateMbit) Mbit/s"
    }

    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? "\(Int(value))" : String(format: "%.1f", value)
    }
}
