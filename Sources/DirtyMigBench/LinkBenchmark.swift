import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// `dirtymig-bench link`: pre-copy between two hosts, each migrator's source in one network
/// namespace and its destination in the other, joined by a veth pair shaped with tbf to each
/// rate asked for (--rates, Mbit/s). Everything else is the migration benchmark's: the same
/// processes launched the way users launch them, the same idle time before every run, the order
/// alternated, median (min-max) of N runs. Neither side prepares the destination's RAM (no
/// `receive --memory`, no -mem-prealloc): on a link slower than memory, allocation is not what
/// limits either. "MiB on the wire" is what the source's namespace transmitted over the run,
/// headers included (NamespaceTraffic), the same count for every row; "of link" is that over the
/// total time, against the shaped rate. For the compressed rows it is the compressed bytes: their
/// total time is what to compare with plain's.
///
/// QEMU also runs with multifd (`qemu-multifd`: multifd-compression none; `qemu-zstd`:
/// multifd-compression zstd), both sides alike, QEMUMultifd.benchmarkChannels channels each:
/// what QEMU has next to `--compress zstd`.
struct LinkBenchmarkOptions {
    var runs = 5
    var ratesMbit = [100, 1000, 10_000]
    var scenarioKeys = ["written", "rewriting", "text"]
    var withQEMU = true
    /// The rows to run (`--only`, in this order); nil: all of `LinkBenchmarkOptions.migrators`.
    var only: [Migrator]?
    var conditions = MigrationRunConditions()

    /// Every row the link benchmark has, in the order they run.
    static let migrators: [Migrator] = [.dirtymig, .dirtymigPSK, .dirtymigZstd, .dirtymigAuto, .qemu, .qemuPSK, .qemuMultifd, .qemuMultifdZstd]

    /// The rows of this run: `only`, or all; QEMU's left out without QEMU (`qemuInstalled` false
    /// or --no-qemu).
    func migrators(qemuInstalled: Bool) -> [Migrator] {
        (only ?? Self.migrators).filter { !$0.isQEMU || (withQEMU && qemuInstalled) }
    }
}

extension QEMUMultifd {
    /// QEMU's default channel count, and this machine's cores: two threads per side compress and
    /// send, where dirtymig's `--compress zstd` has one compressing beside the one sending. More
    /// channels than cores would only share the same two cores.
    static let benchmarkChannels = 2
}

/// The link benchmark's guests, sized so that the slowest link moves one in tens of seconds.
enum LinkScenario {
    /// 512 MiB with 256 MiB written once, then idle: a link-bound copy of data.
    static let written = MigrationScenario(key: "written", label: "512 MiB, 256 MiB written once, idle", memory: 512 << 20, vcpus: 1,
                                           workloadSpecs: ["write,ws=256M,offset=0,passes=1"], writerPassesBeforeMigrating: 1,
                                           warmBytes: (256 << 20) + (64 << 20))

    /// 512 MiB with one vCPU rewriting 64 MiB at a quarter of the link's rate: it converges
    /// without a throttle on every link, after a few passes.
    static func rewriting(rateMbit: Int) -> MigrationScenario {
        let rate = max(1, rateMbit * 1_000_000 / 8 / 4 / 1_048_576)
        return MigrationScenario(key: "rewriting", label: "512 MiB, rewriting 64 MiB at \(rate) MiB/s (a quarter of the link)",
                                 memory: 512 << 20, vcpus: 1, workloadSpecs: ["write,ws=64M,offset=0,rate=\(rate)M"],
                                 writerPassesBeforeMigrating: 1, warmBytes: (64 << 20) + (64 << 20))
    }

    /// As `written`, but the pages hold text-like words (content=text: zstd -1 shrinks them
    /// about 3x): what compression is for.
    static let text = MigrationScenario(key: "text", label: "512 MiB, 256 MiB of text written once, idle", memory: 512 << 20, vcpus: 1,
                                        workloadSpecs: ["write,ws=256M,offset=0,passes=1,content=text"], writerPassesBeforeMigrating: 1,
                                        warmBytes: (256 << 20) + (64 << 20))

    static let keys = ["written", "rewriting", "text"]

    static func scenario(_ key: String, rateMbit: Int) -> MigrationScenario {
        switch key {
        case "written": return written
        case "text": return text
        default: return rewriting(rateMbit: rateMbit)
        }
    }
}

func runLinkBenchmark(_ options: LinkBenchmarkOptions) throws {
    let dirtymig = try dirtymigBesideBenchmark()
    let migrators = options.migrators(qemuInstalled: qemuExecutable() != nil)
    guard !migrators.isEmpty else { throw BenchError("no row left to run: --only named QEMU's rows only, and QEMU is not installed or --no-qemu was given") }
    let qemu = migrators.contains(where: \.isQEMU)
    let order = migrators.map(\.shortLabel).joined(separator: ", ") + ", then reversed, alternating"
    let conditions = options.conditions
    var others = OthersLoad()
    let psk = try BenchPSK()

    emitLine("Live migration between two network namespaces over a veth pair shaped with tbf (both directions), --downtime 300ms, no bandwidth cap; median (min-max) of \(options.runs) run\(options.runs == 1 ? "" : "s")")
    emitLine("")
    emitLine("| link | scenario | migrator | total ms | downtime ms | passes | MiB sent | MiB on the wire | MiB/s | of link | ETA error at 50 % | at 90 % |")
    emitLine("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rate in options.ratesMbit {
        let link: TwoHostLink
        do { link = try TwoHostLink(rateMbit: rate) } catch { throw BenchError("cannot make two hosts: \(error)") }
        defer { link.remove() }
        let placement = MigrationPlacement(link: link)
        let linkMiBs = Double(rate) * 1_000_000 / 8 / 1_048_576
        for (scenarioIndex, key) in options.scenarioKeys.enumerated() {
            let scenario = LinkScenario.scenario(key, rateMbit: rate)
            let guest = qemu ? try QEMUGuest(exportedBy: dirtymig, scenario: scenario, preallocate: false) : nil
            func migrate(_ migrator: Migrator) throws -> MigrationMeasurement {
                switch migrator {
                case .dirtymig:
                    return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions, placement: placement, sampleETA: true)
                case .dirtymigPSK:
                    return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions,
                                                       credentials: ["--psk-file", psk.file], placement: placement, sampleETA: true)
                case .dirtymigZstd, .dirtymigAuto:
                    return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions, placement: placement, sampleETA: true,
                                                       migrateArguments: ["--compress", migrator == .dirtymigZstd ? "zstd" : "auto"])
                case .qemu:
                    return try runQEMUProcessMigration(scenario, guest: guest!, conditions: conditions, placement: placement)
                case .qemuPSK:
                    return try runQEMUProcessMigration(scenario, guest: guest!, conditions: conditions, psk: psk, placement: placement)
                case .qemuMultifd, .qemuMultifdZstd:
                    return try runQEMUProcessMigration(scenario, guest: guest!, conditions: conditions,
                                                       multifd: migrator.multifd(channels: QEMUMultifd.benchmarkChannels), placement: placement)
                default:
                    throw BenchError("\(migrator.label) does not run in the link benchmark")
                }
            }
            let results = try runAlternating(migrators, runs: options.runs, conditions: conditions, others: &others,
                                             label: "\(rate) Mbit/s \(scenario.key)", linkMiBs: linkMiBs) { migrator in
                let before = try NamespaceTraffic.transmittedBytes(prefix: placement.sourcePrefix)
                var measured = try migrate(migrator)
                let wire = try NamespaceTraffic.transmittedBytes(prefix: placement.sourcePrefix) - before
                measured.wireBytes = wire
                measured.detail += String(format: "; %.1f MiB on the wire", Double(wire) / 1_048_576)
                return measured
            }
            for (index, migrator) in migrators.enumerated() {
                let runs = results[migrator] ?? []
                let share = runs.map { $0.linkMiBPerSecond / linkMiBs * 100 }
                let linkCell = index == 0 && scenarioIndex == 0 ? LinkReplicationTable.linkLabel(rate) : ""
                emitLine("| \(linkCell) | \(index == 0 ? scenario.label : "") | \(migrator.label) | \(cell(runs.map(\.totalMs))) | \(cell(runs.map(\.downtimeMs))) | \(cell(runs.map { Double($0.passes) }, "%.0f")) | \(cell(runs.map(\.mibSent))) | \(cell(runs.map { Double($0.wireBytes ?? 0) / 1_048_576 })) | \(cell(runs.map(\.mibPerSecond))) | \(cell(share, "%.0f")) % | \(etaCell(runs, 0.5)) | \(etaCell(runs, 0.9)) |")
            }
        }
    }
    emitLine("")
    emitLine(conditions.describe(runs: options.runs, order: order, others: others))
    if migrators.contains(where: { $0.multifd(channels: 1) != nil }) {
        emitLine("QEMU multifd: the multifd capability and multifd-channels \(QEMUMultifd.benchmarkChannels) set alike on both QEMU processes (the destination on -incoming defer, then migrate-incoming); multifd-compression zstd with multifd-zstd-level 1 (QEMU's default, set and read back on both), the level of dirtymig's --compress zstd; dirtymig compresses on one thread beside its sending one, QEMU on each channel's thread. \"MiB sent\" is QEMU's transferred, which QEMU 7.2 counts for a multifd page before compressing it: \"MiB on the wire\" says what crossed.")
    }
    if let warning = others.warning { emitLine(warning) }
    if options.withQEMU && qemuExecutable() == nil && (options.only ?? LinkBenchmarkOptions.migrators).contains(where: \.isQEMU) {
        emitLine("(QEMU rows skipped: qemu-system-x86_64 is not installed; apt-get install qemu-system-x86)")
    }
}

/// The forecast's error at a share of the way, in per cent (median, range); "-" where nothing
/// was forecast (QEMU, or a migration too short to sample).
private func etaCell(_ runs: [MigrationMeasurement], _ share: Double) -> String {
    let errors = runs.compactMap { $0.etaErrorAt[share] }.map { $0 * 100 }
    guard !errors.isEmpty else { return "-" }
    return "\(cell(errors, "%+.0f")) %" + (errors.count < runs.count ? " (\(errors.count) of \(runs.count) runs)" : "")
}
