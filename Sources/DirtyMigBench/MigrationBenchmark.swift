import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import Glibc

/// `dirtymig-bench migration`: dirtymig next to QEMU 7.2, each run as users run it (dirtymig as
/// three processes, QEMU as two driven through QMP), on the same guest, under the same
/// conditions (MigrationRunConditions), in alternating order.
struct MigrationBenchmarkOptions {
    var runs = 5
    var scenarios = MigrationScenario.all
    var withQEMU = true
    /// Add the in-process row (sender and receiver in the benchmark's process).
    var inProcess = false
    /// Run only this migrator (for investigating one side; not a comparison).
    var only: Migrator?
    var prealloc = PreallocChoice.both
    /// Add each migrator's encrypted run (dirtymig with --psk-file, QEMU with tls-creds-psk).
    var encrypted = false
    var conditions = MigrationRunConditions()
}

/// Who migrates, and how it is started.
///
/// Each migrator runs twice per round, because the line `dirtymig boot --export-image` prints
/// has -mem-prealloc and the choice moves a cost across the clock: with it, QEMU faults in all
/// guest RAM of both processes when they start, before `migrate`, so its destination receives
/// into memory that is already there; without it, the destination faults pages in as they
/// arrive, inside the clock. dirtymig's receiver does the same with `receive --memory SIZE`
/// (dirtymig-prepared) and without it. Users who run the printed line get the first; the table
/// shows both kinds, each next to its like.
///
/// The encrypted migrators use TLS 1.3 with one pre-shared key (`BenchPSK`): dirtymig with
/// `--psk-file` on `receive` and `migrate`, QEMU with a `tls-creds-psk` object on both sides and
/// the migration parameter tls-creds (its destination started with `-incoming defer`, as QEMU's
/// documentation says for TLS).
enum Migrator: CaseIterable {
    case dirtymig, dirtymigPrepared, qemuPrealloc, qemu, dirtymigInProcess, dirtymigPSK, dirtymigPreparedPSK, qemuPreallocPSK, qemuPSK,
         dirtymigZstd, dirtymigAuto, qemuMultifd, qemuMultifdZstd

    var label: String {
        switch self {
        case .dirtymig: return "dirtymig"
        case .dirtymigPrepared: return "dirtymig, receive --memory (RAM prepared at start, as -mem-prealloc)"
        case .qemuPrealloc: return "QEMU 7.2, exported line as printed (-mem-prealloc)"
        case .qemu: return "QEMU 7.2, without -mem-prealloc"
        case .dirtymigInProcess: return "dirtymig in-process (not how users run it)"
        case .dirtymigPSK: return "dirtymig, TLS 1.3 PSK (--psk-file)"
        case .dirtymigPreparedPSK: return "dirtymig, receive --memory, TLS 1.3 PSK (--psk-file)"
        case .qemuPreallocPSK: return "QEMU 7.2, TLS PSK (tls-creds-psk), -mem-prealloc"
        case .qemuPSK: return "QEMU 7.2, TLS PSK (tls-creds-psk), without -mem-prealloc"
        case .dirtymigZstd: return "dirtymig, --compress zstd"
        case .dirtymigAuto: return "dirtymig, --compress auto"
        case .qemuMultifd: return "QEMU 7.2, multifd (no compression)"
        case .qemuMultifdZstd: return "QEMU 7.2, multifd-compression zstd"
        }
    }

    /// The same migrator over TLS (nil: none).
    var encrypted: Migrator? {
        switch self {
        case .dirtymig: return .dirtymigPSK
        case .dirtymigPrepared: return .dirtymigPreparedPSK
        case .qemuPrealloc: return .qemuPreallocPSK
        case .qemu: return .qemuPSK
        default: return nil
        }
    }

    /// For --only, the order line and the per-run log.
    var shortLabel: String {
        switch self {
        case .dirtymig: return "dirtymig"
        case .dirtymigPrepared: return "dirtymig-prepared"
        case .qemuPrealloc: return "qemu-prealloc"
        case .qemu: return "qemu"
        case .dirtymigInProcess: return "in-process"
        case .dirtymigPSK: return "dirtymig-psk"
        case .dirtymigPreparedPSK: return "dirtymig-prepared-psk"
        case .qemuPreallocPSK: return "qemu-prealloc-psk"
        case .qemuPSK: return "qemu-psk"
        case .dirtymigZstd: return "dirtymig-zstd"
        case .dirtymigAuto: return "dirtymig-auto"
        case .qemuMultifd: return "qemu-multifd"
        case .qemuMultifdZstd: return "qemu-zstd"
        }
    }

    var isQEMU: Bool { [.qemu, .qemuPrealloc, .qemuPSK, .qemuPreallocPSK, .qemuMultifd, .qemuMultifdZstd].contains(self) }

    /// QEMU's multifd setting for the multifd rows (nil for every other migrator): both sides
    /// alike, `channels` connections each, zstd at level 1 (QEMU's default, and dirtymig's level).
    func multifd(channels: Int) -> QEMUMultifd? {
        switch self {
        case .qemuMultifd: return QEMUMultifd(compression: "none", channels: channels)
        case .qemuMultifdZstd: return QEMUMultifd(compression: "zstd", channels: channels, zstdLevel: 1)
        default: return nil
        }
    }
}

/// Which rows to run (`--prealloc both|yes|no`): with the destination's RAM allocated before
/// the clock (QEMU -mem-prealloc, dirtymig receive --memory), without, or both.
enum PreallocChoice: String {
    case both, yes, no
}

/// The `dirtymig` binary built with this benchmark: next to it in the same build directory.
func dirtymigBesideBenchmark() throws -> String {
    let own = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    let candidate = ((own as NSString).deletingLastPathComponent as NSString).appendingPathComponent("dirtymig")
    guard access(candidate, X_OK) == 0 else {
        throw BenchError("no dirtymig binary next to this benchmark (\(candidate)): build both products (swift build -c release)")
    }
    return candidate
}

func runMigrationBenchmark(_ options: MigrationBenchmarkOptions) throws {
    let dirtymig = try dirtymigBesideBenchmark()
    let qemu = options.withQEMU && qemuExecutable() != nil
    var migrators: [Migrator] = []
    if options.prealloc != .yes { migrators.append(.dirtymig) }
    if options.prealloc != .no { migrators.append(.dirtymigPrepared) }
    if qemu && options.prealloc != .no { migrators.append(.qemuPrealloc) }
    if qemu && options.prealloc != .yes { migrators.append(.qemu) }
    if options.encrypted { migrators += migrators.compactMap(\.encrypted) }
    if options.inProcess { migrators.append(.dirtymigInProcess) }
    if let only = options.only {
        guard !only.isQEMU || qemuExecutable() != nil else { throw BenchError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)") }
        migrators = [only]
    }
    let order = migrators.map(\.shortLabel).joined(separator: ", ") + ", then reversed, alternating"
    let conditions = options.conditions
    // Other users of this shared machine: what they took during the idle times and migrations,
    // stated under the table (a quiet machine shows a few per cent at most).
    var others = OthersLoad()
    let psk = try BenchPSK()

    emitLine("Live migration over loopback, --downtime 300ms, no bandwidth cap; median (min-max) of \(options.runs) run\(options.runs == 1 ? "" : "s")")
    emitLine("")
    emitLine("| scenario | migrator | total ms | downtime ms | passes | MiB sent | MiB/s |")
    emitLine("|---|---|---|---|---|---|---|")
    for scenario in options.scenarios {
        // Exported once per scenario, before any run's idle time (it opens /dev/kvm briefly).
        let qemuGuest = migrators.contains(where: { $0.isQEMU && $0 != .qemuPrealloc && $0 != .qemuPreallocPSK })
            ? try QEMUGuest(exportedBy: dirtymig, scenario: scenario, preallocate: false) : nil
        let qemuPreallocGuest = migrators.contains(.qemuPrealloc) || migrators.contains(.qemuPreallocPSK)
            ? try QEMUGuest(exportedBy: dirtymig, scenario: scenario, preallocate: true) : nil
        let results = try runAlternating(migrators, runs: options.runs, conditions: conditions, others: &others,
                                         label: scenario.key) { migrator in
            switch migrator {
            case .dirtymig: return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions)
            case .dirtymigPrepared:
                return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions, prepareMemory: true)
            case .qemu: return try runQEMUProcessMigration(scenario, guest: qemuGuest!, conditions: conditions)
            case .qemuPrealloc: return try runQEMUProcessMigration(scenario, guest: qemuPreallocGuest!, conditions: conditions)
            case .dirtymigInProcess: return try runDirtymigInProcessMigration(scenario, conditions: conditions)
            case .dirtymigPSK:
                return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions, credentials: ["--psk-file", psk.file])
            case .dirtymigPreparedPSK:
                return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions,
                                                   credentials: ["--psk-file", psk.file], prepareMemory: true)
            case .qemuPSK: return try runQEMUProcessMigration(scenario, guest: qemuGuest!, conditions: conditions, psk: psk)
            case .qemuPreallocPSK:
                return try runQEMUProcessMigration(scenario, guest: qemuPreallocGuest!, conditions: conditions, psk: psk)
            case .dirtymigZstd, .dirtymigAuto:
                return try runDirtymigCLIMigration(scenario, dirtymig: dirtymig, conditions: conditions,
                                                   migrateArguments: ["--compress", migrator == .dirtymigZstd ? "zstd" : "auto"])
            case .qemuMultifd, .qemuMultifdZstd:
                return try runQEMUProcessMigration(scenario, guest: qemuGuest!, conditions: conditions,
                                                   multifd: migrator.multifd(channels: QEMUMultifd.benchmarkChannels))
            }
        }
        for (index, migrator) in migrators.enumerated() {
            let runs = results[migrator] ?? []
            emitLine("| \(index == 0 ? scenario.label : "") | \(migrator.label) | \(cell(runs.map(\.totalMs))) | \(cell(runs.map(\.downtimeMs))) | \(cell(runs.map { Double($0.passes) }, "%.0f")) | \(cell(runs.map(\.mibSent))) | \(cell(runs.map(\.mibPerSecond), "%.0f")) |")
        }
    }
    emitLine("")
    emitLine(conditions.describe(runs: options.runs, order: order, others: others))
    if let warning = others.warning { emitLine(warning) }
    if options.withQEMU && !qemu { emitLine("(QEMU rows skipped: qemu-system-x86_64 is not installed; apt-get install qemu-system-x86)") }
}

/// One pre-shared key for every encrypted run, in a private directory: `keys.psk` holds
/// "dirtymig:HEX" (mode 0600), the format QEMU's tls-creds-psk reads from its `dir` and the one
/// `dirtymig --psk-file` reads (the identity before the colon), so both use the same key.
final class BenchPSK {
    let scratch: ScratchDirectory
    let identity = "dirtymig"
    var directory: String { scratch.path }
    var file: String { scratch.file("keys.psk") }

    init() throws {
        scratch = try ScratchDirectory("dirtymig-bench-psk")
        var generator = SystemRandomNumberGenerator()
        let bytes = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let line = identity + ":" + bytes.map { String(format: "%02x", $0) }.joined() + "\n"
        guard FileManager.default.createFile(atPath: file, contents: Data(line.utf8), attributes: [.posixPermissions: 0o600]) else {
            throw BenchError("cannot write \(file)")
        }
    }
}

/// Runs every migrator `runs` times, each after the idle time, the order reversed every other
/// round (A B, B A, A B, ...): a migrator is as often first as second, so what one run leaves
/// behind (it should be nothing, after the idle time) falls on both alike. Each run is logged as
/// it ends (`label` first; with `linkMiBs`, its share of the link too: what crossed it per second).
func runAlternating(_ migrators: [Migrator], runs: Int, conditions: MigrationRunConditions, others: inout OthersLoad,
                    label: String, linkMiBs: Double? = nil,
                    _ measure: (Migrator) throws -> MigrationMeasurement) throws -> [Migrator: [MigrationMeasurement]] {
    try alternate(migrators, runs: runs, idleSeconds: conditions.idleSeconds, others: &others,
                  othersShare: \.othersCPUShare) { migrator, run, busy in
        let measurement = try measure(migrator)
        let share = linkMiBs.map { String(format: " (%.0f %% of the link)", measurement.linkMiBPerSecond / $0 * 100) } ?? ""
        log(String(format: "%@ run %d/%d %@: total %.1f ms, downtime %.1f ms, %d passes, %.1f MiB, %.1f MiB/s%@; %@; others used %.0f %% of the CPUs during the migration, the machine was %.0f %% busy during the idle time before",
                   label, run, runs, migrator.shortLabel, measurement.totalMs, measurement.downtimeMs, measurement.passes,
                   measurement.mibSent, measurement.mibPerSecond, share, measurement.detail, measurement.othersCPUShare * 100, busy * 100))
        return measurement
    }
}

/// The order every comparison runs in: each side `runs` times, each run after the idle time
/// (QuietMachine), the order reversed every other round. `measure` gets the side, the run's
/// number (from 1) and how busy the machine was during the idle time before it (for its log).
func alternate<Side: Hashable, Measured>(_ sides: [Side], runs: Int, idleSeconds: Double, others: inout OthersLoad,
                                         othersShare: (Measured) -> Double,
                                         _ measure: (Side, Int, Double) throws -> Measured) throws -> [Side: [Measured]] {
    var results: [Side: [Measured]] = [:]
    for round in 0..<runs {
        for side in round % 2 == 0 ? sides : sides.reversed() {
            let busy = try QuietMachine.idle(idleSeconds)
            let measured = try measure(side, round + 1, busy)
            results[side, default: []].append(measured)
            others.add(idle: busy, migration: othersShare(measured))
        }
    }
    return results
}

/// "median (min-max)".
func cell(_ values: [Double], _ format: String = "%.1f") -> String {
    "\(String(format: format, median(values))) (\(String(format: format, values.min() ?? 0))-\(String(format: format, values.max() ?? 0)))"
}

/// A line of the table, written at once (print's buffer would hold it until the end when standard
/// output is a file, and a long series is watched as it goes).
func emitLine(_ line: String) {
    StandardStream.output.writeLine(line)
}

func log(_ line: String) {
    StandardStream.error.writeLine(line)
}
