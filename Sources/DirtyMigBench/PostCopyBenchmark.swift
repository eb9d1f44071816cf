import DirtyMigCore
import Foundation

/// `dirtymig-bench postcopy`: dirtymig's post-copy next to QEMU 7.2's postcopy-ram on the same
/// exported guest, each run as users run it (dirtymig as three processes, QEMU as two driven
/// through QMP), over loopback with the same bandwidth cap on both, both switching after the
/// first pre-copy pass, neither destination preparing its RAM; the order alternated, median
/// (min-max) of N runs.
struct PostCopyBenchmarkOptions {
    var runs = 5
    var scenarios = PostCopyScenario.all
    var sides = PostCopySide.allCases
    /// Bytes per second, on both sides: dirtymig's --bandwidth, QEMU's max-bandwidth and
    /// max-postcopy-bandwidth.
    var bandwidth: UInt64 = 100 << 20
    /// As the user gave it (passed to `dirtymig migrate --bandwidth` as typed).
    var bandwidthText = "100M"
    var conditions = MigrationRunConditions()
}

enum PostCopySide: String, CaseIterable {
    case dirtymig, qemu

    var label: String {
        switch self {
        case .dirtymig: return "dirtymig (--postcopy --postcopy-after 1)"
        case .qemu: return "QEMU 7.2 (postcopy-ram, migrate-start-postcopy after pass 1)"
        }
    }
}

/// One post-copy scenario: the guest (as `dirtymig boot` options) and which vCPU reads, whose
/// pace during post-copy is the cost the table reports.
struct PostCopyScenario {
    let guest: MigrationScenario
    let readerVCPU: Int?

    /// Every writer is a `check` workload: each pass verifies what the last one wrote, so a page
    /// lost or stale after the switch shows as a guest error (read on both VMMs from the guest's
    /// statistics area).
    static let all = [
        // Pre-copy cannot converge: 400 MiB/s of writes against a 100 MiB/s link.
        PostCopyScenario(guest: MigrationScenario(
            key: "writer", label: "1 GiB, v0 writing 512 MiB at random at 400 MiB/s, v1 reading 256 MiB", memory: 1 << 30, vcpus: 2,
            workloadSpecs: ["0:check,ws=512M,offset=0,pattern=random,rate=400M", "1:read,ws=256M,offset=512M"],
            writerPassesBeforeMigrating: 1, warmBytes: (768 << 20) + (64 << 20)), readerVCPU: 1),
        // The reader walks the writer's working set at half the link's rate: after the switch
        // what it reads is still at the source (the writer's random pass rewrites every page
        // while pass 1 lasts), so its pace shows what demand faults and pre-paging cost a vCPU
        // that could be served in time. Unpaced, it reads 80 million pages/s before the
        // migration, a pace no link keeps, and "kept" would read 0.000 for both.
        PostCopyScenario(guest: MigrationScenario(
            key: "reader", label: "1 GiB, v0 writing 256 MiB at random at 100 MiB/s, v1 reading the same 256 MiB at 50 MiB/s", memory: 1 << 30, vcpus: 2,
            workloadSpecs: ["0:check,ws=256M,offset=0,pattern=random,rate=100M", "1:read,ws=256M,offset=0,rate=50M"],
            writerPassesBeforeMigrating: 1, warmBytes: (256 << 20) + (64 << 20)), readerVCPU: 1),
        // Nothing to fetch: pre-copy meets --downtime after pass 1, so neither may switch.
        PostCopyScenario(guest: MigrationScenario(
            key: "idle", label: "1 GiB, 2 vCPUs idle", memory: 1 << 30, vcpus: 2, workloadSpecs: ["idle"],
            writerPassesBeforeMigrating: 0, warmBytes: 64 << 20), readerVCPU: nil),
    ]
}

/// One post-copy run's figures, whoever migrated. Optional where a side has no such figure.
struct PostCopyMeasurement {
    var switched: Bool
    var totalMs: Double
    var downtimeMs: Double
    /// Everything sent up to and with the switch (pre-copy passes, state, the list of lacking
    /// pages), and everything after it.
    var bytesBeforeSwitch: UInt64
    var bytesAfterSwitch: UInt64
    var pageRequests: Double?
    var faultLatencyP50Us: Double?
    var faultLatencyP99Us: Double?
    /// Summed over the vCPUs.
    var vcpuBlockedMs: Double?
    /// The reader vCPU's own pages/s over the pace window before the migration, and at the
    /// destination from the first read after the switch to the last before the end.
    var readerBefore: Double?
    var readerDuring: Double?
    /// The guest's own check errors at the destination after the migration (every vCPU).
    var guestErrors: UInt64
    var detail: String
    var othersCPUShare: Double

    var readerKept: Double? {
        guard let readerBefore, let readerDuring, readerBefore > 0 else { return nil }
        return readerDuring / readerBefore
    }
}

/// A run either measured or failed with the reason (a side that cannot post-copy here keeps its
/// row, marked failed, and the other side still runs).
enum PostCopyOutcome {
    case measured(PostCopyMeasurement)
    case failed(String)

    var measurement: PostCopyMeasurement? {
        if case .measured(let value) = self { return value }
        return nil
    }
}

/// The reader vCPU's pages at moments, read from the guest's own counters.
struct ReaderPace {
    private(set) var samples: [(seconds: Double, pages: UInt64)] = []

    mutating func add(_ pages: UInt64) { samples.append((MonotonicClock.seconds(), pages)) }

    /// Pages/s from the first sample to the last; nil with fewer than two samples 0.15 s apart.
    var pagesPerSecond: Double? {
        guard let first = samples.first, let last = samples.last, last.seconds - first.seconds >= 0.15 else { return nil }
        return Double(last.pages &- first.pages) / (last.seconds - first.seconds)
    }
}

func runPostCopyBenchmark(_ options: PostCopyBenchmarkOptions) throws {
    let dirtymig = try dirtymigBesideBenchmark()
    var sides = options.sides
    let qemuMissing = sides.contains(.qemu) && qemuExecutable() == nil
    if qemuMissing { sides.removeAll { $0 == .qemu } }
    let conditions = options.conditions
    var others = OthersLoad()
    let bandwidth = ByteSize.format(options.bandwidth) + "/s"

    emitLine("Post-copy over loopback, bandwidth \(bandwidth) on both (dirtymig --bandwidth \(options.bandwidthText); QEMU max-bandwidth and max-postcopy-bandwidth), --downtime 300ms; both switch after the first pre-copy pass (dirtymig: --postcopy --postcopy-after 1; QEMU: migrate-start-postcopy once query-migrate's dirty-sync-count reaches 2, polled every 10 ms); median (min-max) of \(options.runs) run\(options.runs == 1 ? "" : "s")")
    emitLine("")
    emitLine("| scenario | migrator | switched | total ms | downtime ms | MB before switch | MB after switch | page requests | fault latency p50 / p99 µs | vCPU blocked ms (sum) | reader pace kept |")
    emitLine("|---|---|---|---|---|---|---|---|---|---|---|")
    var errorsSeen: [String] = []
    for scenario in options.scenarios {
        let guest = sides.contains(.qemu) ? try QEMUGuest(exportedBy: dirtymig, scenario: scenario.guest, preallocate: false) : nil
        let results = try alternate(sides, runs: options.runs, idleSeconds: conditions.idleSeconds, others: &others,
                                    othersShare: { $0.measurement?.othersCPUShare ?? 0 }) { side, run, busy in
            let outcome: PostCopyOutcome
            do {
                switch side {
                case .dirtymig:
                    outcome = .measured(try runDirtymigPostCopy(scenario, dirtymig: dirtymig, options: options))
                case .qemu:
                    outcome = .measured(try runQEMUPostCopyMigration(scenario, guest: guest!, conditions: conditions,
                                                                     bandwidth: options.bandwidth))
                }
            } catch {
                outcome = .failed("\(error)")
            }
            switch outcome {
            case .measured(let m):
                log(String(format: "%@ run %d/%d %@: %@, total %.1f ms, downtime %.1f ms, %.1f MB before the switch, %.1f MB after, requests %@, latency p50/p99 %@, blocked %@ ms, reader %@ -> %@ pages/s, guest errors %llu; %@; others used %.0f %% of the CPUs during the migration, the machine was %.0f %% busy during the idle time before",
                           scenario.guest.key, run, options.runs, side.rawValue, m.switched ? "switched" : "no switch",
                           m.totalMs, m.downtimeMs, Double(m.bytesBeforeSwitch) / 1e6, Double(m.bytesAfterSwitch) / 1e6,
                           m.pageRequests.map { String(format: "%.0f", $0) } ?? "-",
                           m.faultLatencyP50Us.map { String(format: "%.0f/%.0f µs", $0, m.faultLatencyP99Us ?? 0) } ?? "-",
                           m.vcpuBlockedMs.map { String(format: "%.1f", $0) } ?? "-",
                           m.readerBefore.map { String(format: "%.0f", $0) } ?? "-", m.readerDuring.map { String(format: "%.0f", $0) } ?? "-",
                           m.guestErrors, m.detail, m.othersCPUShare * 100, busy * 100))
                if m.guestErrors > 0 { errorsSeen.append("\(scenario.guest.key) run \(run) \(side.rawValue): \(m.guestErrors)") }
            case .failed(let reason):
                log("\(scenario.guest.key) run \(run)/\(options.runs) \(side.rawValue): failed: \(reason)")
            }
            return outcome
        }
        for (index, side) in sides.enumerated() {
            emitLine("| \(index == 0 ? scenario.guest.label : "") | \(side.label) | " + postCopyCells(results[side] ?? []) + " |")
        }
    }
    emitLine("")
    emitLine(describePostCopyConditions(options, others: others))
    if let warning = others.warning { emitLine(warning) }
    if !errorsSeen.isEmpty { emitLine("Guest check errors at the destination (pages lost or stale): " + errorsSeen.joined(separator: "; ")) }
    if qemuMissing { emitLine("(QEMU rows skipped: qemu-system-x86_64 is not installed; apt-get install qemu-system-x86)") }
}

/// A row's cells after the migrator: medians and ranges over the measured runs; a side whose
/// every run failed says why; failures among measured runs are counted.
private func postCopyCells(_ outcomes: [PostCopyOutcome]) -> String {
    let runs = outcomes.compactMap(\.measurement)
    let failures = outcomes.compactMap { outcome -> String? in if case .failed(let reason) = outcome { return reason } else { return nil } }
    guard !runs.isEmpty else {
        return "failed: \(failures.first.map { String($0.prefix(300)) } ?? "no run")" + String(repeating: " | -", count: 9)
    }
    func optional(_ values: [Double?], _ format: String = "%.1f") -> String {
        let present = values.compactMap { $0 }
        guard !present.isEmpty else { return "-" }
        return cell(present, format) + (present.count < values.count ? " (\(present.count) of \(values.count))" : "")
    }
    let switched = "\(runs.filter(\.switched).count) of \(runs.count)" + (failures.isEmpty ? "" : "; \(failures.count) failed: \(failures[0].prefix(200))")
    let latency = runs.contains { $0.faultLatencyP50Us != nil }
        ? optional(runs.map(\.faultLatencyP50Us), "%.0f") + " / " + optional(runs.map(\.faultLatencyP99Us), "%.0f") : "-"
    return [switched, cell(runs.map(\.totalMs)), cell(runs.map(\.downtimeMs)),
            cell(runs.map { Double($0.bytesBeforeSwitch) / 1e6 }, "%.0f"), cell(runs.map { Double($0.bytesAfterSwitch) / 1e6 }, "%.0f"),
            optional(runs.map(\.pageRequests), "%.0f"), latency, optional(runs.map(\.vcpuBlockedMs)),
            optional(runs.map(\.readerKept), runs.compactMap(\.readerKept).contains { $0 < 0.1 } ? "%.4f" : "%.2f")].joined(separator: " | ")
}

private func describePostCopyConditions(_ options: PostCopyBenchmarkOptions, others: OthersLoad) -> String {
    let c = options.conditions
    var parts = ["\(options.runs) run\(options.runs == 1 ? "" : "s") per cell",
                 "order \(options.sides.map(\.rawValue).joined(separator: ", ")), then reversed, alternating",
                 String(format: "%.0f s idle before every run", c.idleSeconds),
                 "each side as its users run it: dirtymig as `boot`, `receive` (no --memory) and `migrate --postcopy --postcopy-after 1 --bandwidth \(options.bandwidthText) --downtime 300ms --json`; QEMU as two qemu-system-x86_64 processes from the line `dirtymig boot --export-image` prints (without -mem-prealloc), postcopy-ram on both and postcopy-blocktime on the destination (started with -incoming defer, then migrate-incoming)",
                 "downtime: dirtymig from the pause to the destination's word that the guest runs; QEMU's own (7.2: from the stop to the switch package sent)",
                 "MB = 10^6 bytes; before the switch includes the switch itself (dirtymig: transferred_bytes - postcopy.bytes; QEMU: precopy-bytes + downtime-bytes), after is post-copy's (dirtymig: postcopy.bytes; QEMU: postcopy-bytes)",
                 "page requests: dirtymig postcopy.requested_pages, QEMU postcopy-requests",
                 "fault latency: dirtymig's, measured at the destination from fault to resolution (QEMU 7.2 reports none: -)",
                 "vCPU blocked: dirtymig vcpu_blocked_ms summed, QEMU the destination's postcopy-vcpu-blocktime summed",
                 "reader pace kept: the reader vCPU's own pages/s at the destination during post-copy (its counters read every 100 ms: dirtymig query-status, QEMU pmemsave) over its pages/s in the \(String(format: "%.1f", c.paceWindowSeconds)) s before the migration",
                 String(format: "other programs used at most %.0f %% of the CPUs during a migration (%.0f %% during an idle time)",
                        others.busiestMigration * 100, others.busiestIdle * 100)]
    if options.runs < 5 { parts.append("fewer than 5 runs: a smoke test, not a measurement") }
    return "Conditions: " + parts.joined(separator: "; ") + "."
}

/// dirtymig's run: `runDirtymigCLIMigration` with `--postcopy --postcopy-after 1` and the cap,
/// reading the reader's pace on the source over the pace window and on the destination every
/// 100 ms while `migrate` runs, and the guest's errors once it is done.
private func runDirtymigPostCopy(_ scenario: PostCopyScenario, dirtymig: String,
                                 options: PostCopyBenchmarkOptions) throws -> PostCopyMeasurement {
    var before = ReaderPace(), during = ReaderPace()
    var errors: UInt64 = 0
    func status(_ socket: String) -> JSONValue? {
        guard let client = try? ControlClient(path: socket, callTimeout: 2) else { return nil }
        defer { client.close() }
        return try? client.call("query-status")
    }
    func readerPages(_ status: JSONValue?) -> UInt64? {
        guard let reader = scenario.readerVCPU, status?["state"]?.stringValue == "running" else { return nil }
        let pages = GuestProgress(status: status!).pages
        return reader < pages.count ? pages[reader] : nil
    }
    let watch = DirtymigRunWatch(
        paceWindow: { source, _ in if let pages = readerPages(status(source)) { before.add(pages) } },
        duringMigration: { _, destination in if let pages = readerPages(status(destination)) { during.add(pages) } },
        afterMigration: { destination in
            errors = (status(destination)?["vcpu_stats"]?.arrayValue ?? []).reduce(0) { $0 + UInt64($1["guest_errors"]?.doubleValue ?? 0) }
        })
    let measured = try runDirtymigCLIMigration(scenario.guest, dirtymig: dirtymig, conditions: options.conditions,
                                               migrateArguments: ["--postcopy", "--postcopy-after", "1", "--bandwidth", options.bandwidthText],
                                               watch: watch)
    let report = watch.report ?? .null
    // Null when the migration did not switch (JSONValue takes a nil literal as its null, so
    // this is spelled out rather than flatMapped).
    var postcopy: JSONValue? = report["postcopy"]
    if postcopy?.isNull == true { postcopy = nil }
    func number(_ key: String) -> Double? { postcopy?[key]?.doubleValue }
    let after = UInt64(number("bytes") ?? 0)
    let latency = postcopy?["fault_latency_us"]
    let blocked = postcopy?["vcpu_blocked_ms"]?.arrayValue?.compactMap(\.doubleValue)
    return PostCopyMeasurement(
        switched: postcopy != nil, totalMs: measured.totalMs, downtimeMs: measured.downtimeMs,
        bytesBeforeSwitch: measured.sentBytes - min(after, measured.sentBytes), bytesAfterSwitch: after,
        pageRequests: postcopy == nil ? nil : number("requested_pages"),
        faultLatencyP50Us: latency?["p50"]?.doubleValue, faultLatencyP99Us: latency?["p99"]?.doubleValue,
        vcpuBlockedMs: blocked.map { $0.reduce(0, +) },
        readerBefore: before.pagesPerSecond, readerDuring: postcopy == nil ? nil : during.pagesPerSecond,
        guestErrors: errors,
        detail: measured.detail + (postcopy.map { String(format: ", switched at %.0f ms after %.0f passes (%@), %.0f lacking pages, %.0f answered, %.0f pushed, %.0f faults, max latency %.0f µs",
                                                              $0["switched_at_ms"]?.doubleValue ?? 0, $0["after_passes"]?.doubleValue ?? 0,
                                                              $0["reason"]?.stringValue ?? "-", $0["lacking_pages"]?.doubleValue ?? 0,
                                                              $0["answered_pages"]?.doubleValue ?? 0, $0["pushed_pages"]?.doubleValue ?? 0,
                                                              $0["faults"]?.doubleValue ?? 0, $0["fault_latency_us"]?["max"]?.doubleValue ?? 0) } ?? ""),
        othersCPUShare: measured.othersCPUShare)
}
