// dirtymig-bench: benchmarks that print tables a person can compare.
//
//   dirtymig-bench tracking [--seconds S] [--runs N] [--memory SIZE-MiB]
//       The cost of dirty tracking on this machine: one unpaced writer vCPU sweeping 256 MiB
//       (one 8-byte store per page), its own page-touch rate from the guest's counters, with no
//       tracking, bitmap (synced 10 times a second, as a migration pass or dirtyrate would),
//       ring (harvested every millisecond) and quota (ring + quota accounting, no quota set).
//
//   dirtymig-bench migration [--runs N] [--quick] [--idle S] [--warm] [--scenario idle|written|rewriting]
//                            [--no-qemu] [--in-process] [--only dirtymig|dirtymig-prepared|qemu-prealloc|qemu|in-process]
//                            [--qmp-poll MS] [--prealloc both|yes|no] [--encrypted]
//       dirtymig's live migration next to QEMU 7.2's on the same guest, each run the way users
//       run it, under the same conditions. Scenarios: 4 GiB never written (idle); 2 GiB with 1 GiB
//       written once, then idle (written); 1 GiB with one vCPU rewriting 256 MiB at 200 MiB/s
//       (rewriting); each written once as `dirtymig boot` options. All: --downtime 300ms, no
//       bandwidth cap, over loopback.
//       dirtymig: three processes of the `dirtymig` binary next to this one, sockets in a
//       private temporary directory: `boot ... --control DIR/src.sock` (until its "running"
//       line), `receive --listen 127.0.0.1:PORT --control DIR/dst.sock` (until "listening"),
//       then `migrate --vm DIR/src.sock --to 127.0.0.1:PORT --downtime 300ms --json`, whose JSON
//       report gives the figures. QEMU: two qemu-system-x86_64 processes started with the
//       command line `dirtymig boot --export-image FILE --export-config FILE2` prints for the
//       same options, each run twice per round: as printed, with -mem-prealloc (QEMU faults in
//       all guest RAM of both processes at start, before its clock), and without it (pages are
//       faulted in as they arrive, inside the clock, as dirtymig's receiver does by default).
//       The choice moves QEMU's figure a lot (written scenario, 30 Nov: 1.1-1.3 s with, 2.6-3.1 s
//       without), so the table shows both, and dirtymig both ways too: plain `receive`, and
//       `receive --memory SIZE` (dirtymig-prepared), which allocates the VM's RAM before it
//       listens, as -mem-prealloc does. --prealloc yes|no keeps one kind on both sides
//       (--qemu-prealloc is the old name). Migrated through
//       QMP with max-bandwidth 100 GiB/s and downtime-limit 300 ms; during the migration only
//       `query-migrate` is sent, every MS ms (--qmp-poll, default 100, at least 100; 0: never,
//       QEMU's MIGRATION event ends the wait); the figures are QEMU's own.
//       Every run, either migrator, goes the same way: the benchmark checks that it runs no
//       thread but its main one and no child process; waits S idle seconds (--idle, default 5:
//       memory freed more than ~2 s ago is back with the outer host, so each run starts on
//       equally cold memory); starts the source; reads the guest's counters every 100 ms
//       (query-status; QMP pmemsave) until it has booted and, in written and rewriting, its
//       writer has done one whole pass; waits 0.2 s; starts the destination and waits until it
//       listens; with --warm touches and frees the scenario's data size (WarmMemory); waits
//       0.5 s (QEMU: reading the guest's pace; dirtymig's VM keeps it at hand); migrates.
//       Order: dirtymig, dirtymig-prepared, QEMU as printed, QEMU without prealloc, then the same reversed, and so
//       on (each migrator as often early as late in a round). N runs per cell (--runs, default
//       5; fewer only with --quick, for smoke tests). The table gives the median (min-max) of
//       total ms, downtime ms, passes, MiB sent and MiB/s (MiB sent / total time for all), then
//       one line with the conditions. Each run's figures go to standard
//       error with how much of the CPUs other programs took during its migration and its idle
//       time (this machine is shared: a build that takes one core made QEMU's written-scenario
//       migration about twice as slow); a warning follows the table when others took more than
//       10 % during any migration.
//       --encrypted adds, next to each migrator, the same migration over TLS 1.3 with one
//       pre-shared key (a private directory's keys.psk, "dirtymig:HEX", mode 0600): dirtymig with
//       `--psk-file` on receive and migrate; QEMU with `-object tls-creds-psk` on both sides,
//       the migration parameter tls-creds, and its destination on `-incoming defer` then
//       `migrate-incoming` (QEMU's way for TLS). --only takes dirtymig-psk, dirtymig-prepared-psk,
//       qemu-psk and qemu-prealloc-psk too, and the link benchmark's rows dirtymig-zstd,
//       dirtymig-auto, qemu-multifd and qemu-zstd (over loopback).
//       --in-process adds a row "dirtymig in-process (not how users run it)": sender and
//       receiver in the benchmark's own process (as `dirtymig migrate` with neither --vm nor
//       --to), same conditions, for comparison with the figures that benchmark used to print.
//       --only runs one migrator alone (to investigate one side; its table compares nothing).
//
//   dirtymig-bench link [--runs N] [--idle S] [--rates MBIT,...] [--scenario written|rewriting|text] [--no-qemu]
//                       [--only ROW,...]
//       Pre-copy between two hosts (as root): two network namespaces joined by a veth pair
//       shaped with tbf at each rate (default 100, 1000 and 10000 Mbit/s), the source's
//       processes in one and the destination's in the other. dirtymig (plaintext with
//       --insecure, and TLS 1.3 PSK) next to QEMU 7.2 (plaintext, and tls-creds-psk), neither
//       preparing the destination's RAM; otherwise as the migration benchmark: the same idle
//       time, order alternated, median (min-max) of N runs (default 5); dirtymig also with
//       --compress zstd and --compress auto, QEMU also with multifd (2 channels a side) without
//       compression and with multifd-compression zstd (level 1, as dirtymig's). Scenarios:
//       512 MiB with 256 MiB written once (written), the same of text-like pages (text), and
//       one vCPU rewriting 64 MiB at a quarter of the link's rate (rewriting). "MiB on the
//       wire" is what the source's namespace transmitted over the run (headers included; QEMU
//       7.2's own count, "MiB sent", is of multifd pages before compression); "of link" is that
//       over the total time against the shaped rate. --only runs these rows, in this order
//       (comma-separated): dirtymig,
//       dirtymig-psk, dirtymig-zstd, dirtymig-auto, qemu, qemu-psk, qemu-multifd, qemu-zstd.
//
//   dirtymig-bench link --replication [--runs N] [--idle S] [--rates MBIT,...] [--scenario idle|writer|fast-writer]
//                                     [--seconds S]
//       Continuous replication between two hosts (as root): the primary (`dirtymig boot`, then
//       `migrate --continuous`) in one namespace, its standby (`receive --standby --failover
//       manual`) in the other, over the link shaped at each rate (default 1000 and 100
//       Mbit/s), checkpoints every 25 ms (the default). Guests of 512 MiB, each emitting a line
//       every 10 ms: idle but for that output (idle), and a writer dirtying 6 MiB/s, half of a
//       100 Mbit/s link (writer), alternated with the same idle time before every run; with
//       --scenario fast-writer, one dirtying 24 MiB/s over 16 MiB, twice what 100 Mbit/s
//       carries (its epochs stretch: the effective interval). From the
//       primary's query-replication over S seconds (--seconds, default 10) starting 2 s after
//       protection: checkpoints per second, the effective interval, the pause (median, p99),
//       the output delay (median, p99: how long a guest line waits for its checkpoint's
//       acknowledgement), MiB/s to the standby; median (min-max) of N runs.
//
//   dirtymig-bench link --failover [--runs N] [--idle S] [--rates MBIT] [--seconds S] [--failover-after D] [--cut S]
//                                  [--working-set SIZE] [--only alive|return]
//       Whether a standby across a slow link tells a living primary from a dead one, and how
//       soon it acts (as root): primary and standby as in --replication, over one link (default
//       20 Mbit/s), a 128 MiB guest dirtying 50 MiB/s over 8 MiB (--working-set; twenty times the link) and
//       writing a line every 10 ms. Each of N runs (default 20): an automatic standby watched
//       for S seconds (default 10) while its primary lives (takeovers, and whether the primary
//       stayed protected); then the primary's death, as a host (the link cut, then SIGKILL) in
//       odd runs and as a process (SIGKILL) in even ones, timed to the guest's first line on
//       the standby; then, with a manual standby, a cut of --cut seconds (default 3: the
//       primary gives up on its standby) timed from the link's return to `protected` again.
//       --only alive or --only return runs one kind of trial.
//
//   dirtymig-bench postcopy [--runs N] [--idle S] [--scenario writer|reader|idle] [--only dirtymig|qemu]
//                           [--bandwidth RATE] [--no-qemu]
//       dirtymig's post-copy (`migrate --postcopy --postcopy-after 1`) next to QEMU 7.2's
//       postcopy-ram (migrate-start-postcopy once pass 1 is done) on the same exported guest,
//       over loopback, the same cap on both (default 100M: dirtymig --bandwidth, QEMU
//       max-bandwidth and max-postcopy-bandwidth), --downtime 300ms, neither destination
//       preparing its RAM; each side as its users run it (the migration benchmark's processes),
//       the same idle time before every run, order alternated, median (min-max) of N runs
//       (default 5). Scenarios, 1 GiB and 2 vCPUs each: a writer pre-copy cannot keep up with
//       (v0 checking 512 MiB at random at 400 MiB/s, v1 reading 256 MiB); a reader walking the
//       working set at 50 MiB/s while a 100 MiB/s random writer rewrites it; idle. Columns: whether it switched, total and
//       downtime ms, MB before and after the switch, page requests, fault latency p50/p99
//       (dirtymig's; QEMU 7.2 has none), the vCPUs' summed blocked time (QEMU:
//       postcopy-blocktime's per-vCPU figures), and the share of its pace the reader vCPU kept
//       during post-copy (its own counters on the destination every 100 ms). A side that fails
//       keeps its row, marked failed with the reason. --only runs one side.
//
//   dirtymig-bench replication [--seconds S] [--runs N] [--only pause,rate,pace,failover]
//       Continuous replication, ring (dense dirty lists) next to bitmap: the pause per
//       checkpoint for dirty sets of 100, 1,000 and 10,000 pages in a 1 GiB and a 4 GiB VM; the
//       highest sustained checkpoint rate, idle and with a 25 MiB/s writer; the guest's pace at
//       40 checkpoints/s (writer and reader; N runs per variant, alternating); failover time from
//       SIGKILL to the guest running on the standby (N runs, command line processes). The primary runs in this process (its own
//       figures), the standby is a `dirtymig receive --standby` process; S seconds measured per
//       row after a second of warm-up. --only runs some of the four tables.
//
//   dirtymig-bench tracking-shapes [--seconds S] [--runs N]
//       What each tracking mode (bitmap collected every second, ring of 1024 and 4096 entries,
//       quota) costs the guest for a few workload shapes: guest pages touched per second.
//
//   dirtymig-bench accuracy [--seconds S]
//       The issue's measurement check: 1 GiB, 2 vCPUs, vCPU 0 writing 512 MiB sequentially at
//       10, 100 and 400 MiB/s, vCPU 1 reading 256 MiB. For each tracking mode and rate: the rate
//       configured, what the guest wrote (its own counter), what dirtymig measured, and the
//       reading vCPU's measured rate. Medians of 1 s intervals after a 1 s warm-up.
//
//   dirtymig-bench throttle [--no-qemu] [--sweep]
//       The convergence issue's comparison: 1 GiB, 2 vCPUs (an unpaced random writer over
//       512 MiB, a reader over 256 MiB), --bandwidth 100M --downtime 300ms, migrated with
//       --throttle none, cpu, dirty-limit and dirty-quota, and by QEMU 7.2 with no throttle,
//       auto-converge and set-vcpu-dirty-limit set by hand: result, total time, downtime,
//       passes, when the throttle started, each vCPU's guest pace during/before. Then a skewed
//       4-vCPU workload with dirty-quota with and without the common pool, and with --sweep a
//       table of dirty rate against bandwidth (total seconds per throttle).
//
//   dirtymig-bench limit [--no-qemu]
//       `limit` accuracy: vCPU 0 writing unpaced, limited to 20 and 5 MiB/s, in ring and quota
//       mode, next to QEMU's set-vcpu-dirty-limit on the same guest: 1 s samples for 8 s, when
//       they settle within 10 %, the error after, whether the guest keeps running, the reader.
import DirtyMigCore
import Foundation

struct TrackingCostRow {
    var label: String
    var guestPagesPerSecond: [Double] = []
    var dirtyPagesPerSecond: [Double] = []
}

func median(_ values: [Double]) -> Double {
    guard !values.isEmpty else { return 0 }
    let sorted = values.sorted()
    return sorted.count % 2 == 1 ? sorted[sorted.count / 2] : (sorted[sorted.count / 2 - 1] + sorted[sorted.count / 2]) / 2
}

func runTrackingCost(seconds: Double, runs: Int, memoryMiB: UInt64) throws {
    let kvm = try KVMSystem()
    let modes: [(String, TrackingMode?)] = [("none", nil), ("bitmap", .bitmap), ("ring", .ring), ("quota", .quota)]
    var rows = modes.map { TrackingCostRow(label: $0.0) }
    let workload = VCPUWorkload(kind: .write, pattern: .sequential, offset: 0, size: 256 << 20,
                                rateBytesPerSecond: 0, seed: 1)
    for run in 1...runs {
        for (index, mode) in modes.enumerated() {
            let configuration = MachineConfiguration(memorySize: memoryMiB << 20, vcpuCount: 1,
                                                     workloads: [workload], tracking: mode.1)
            let machine = try Machine(configuration, kvm: kvm)
            try machine.start()
            defer { machine.stop() }
            let bootDeadline = MonotonicClock.seconds() + 10
            while machine.guestStats().bootedVCPUs < 1 && MonotonicClock.seconds() < bootDeadline {
                usleep(5_000)
            }
            // One full pass first, so every mode measures steady-state rewrites, not first touches.
            while machine.guestStats().vcpus[0].passes < 1 && MonotonicClock.seconds() < bootDeadline + 10 {
                usleep(5_000)
                if mode.1 == .bitmap { try machine.tracker?.sync() }
            }
            try machine.tracker?.sync()
            let startPages = machine.guestStats().vcpus[0].pages
            let startDirty = machine.tracker?.counters().totalPages ?? 0
            let start = MonotonicClock.seconds()
            while MonotonicClock.seconds() - start < seconds {
                usleep(100_000)
                if mode.1 == .bitmap { try machine.tracker?.sync() }
            }
            try machine.tracker?.sync()
            let elapsed = MonotonicClock.seconds() - start
            let pages = machine.guestStats().vcpus[0].pages - startPages
            let dirty = (machine.tracker?.counters().totalPages ?? 0) - startDirty
            rows[index].guestPagesPerSecond.append(Double(pages) / elapsed)
            rows[index].dirtyPagesPerSecond.append(Double(dirty) / elapsed)
            StandardStream.error.write("run \(run) \(mode.0): \(Int(Double(pages) / elapsed)) pages/s\n")
        }
    }
    let baseline = median(rows[0].guestPagesPerSecond)
    print("Tracking cost: one unpaced writer vCPU, 256 MiB sequential, \(runs) runs of \(seconds) s, median (min-max)")
    print("")
    print("| tracking | guest pages/s | vs none | dirty pages/s counted |")
    print("|---|---|---|---|")
    for row in rows {
        let m = median(row.guestPagesPerSecond)
        let range = "\(Int(row.guestPagesPerSecond.min() ?? 0))-\(Int(row.guestPagesPerSecond.max() ?? 0))"
        let ratio = baseline > 0 ? String(format: m / baseline < 0.1 ? "%.4f" : "%.2f", m / baseline) : "-"
        let dirty = row.label == "none" ? "-" : "\(Int(median(row.dirtyPagesPerSecond)))"
        print("| \(row.label) | \(Int(m)) (\(range)) | \(ratio) | \(dirty) |")
    }
}

func runAccuracy(intervals: Int) throws {
    let kvm = try KVMSystem()
    print("Dirty-rate accuracy: 1 GiB, 2 vCPUs, vCPU 0 writes 512 MiB sequentially, vCPU 1 reads 256 MiB; medians of \(intervals) intervals of 1 s")
    print("")
    print("| mode | configured MiB/s | guest wrote MiB/s | measured vCPU 0 MiB/s | measured vs guest | measured vs configured | reader MiB/s |")
    print("|---|---|---|---|---|---|---|")
    let cases: [(TrackingMode, DirtyRateMode)] = [(.ring, .ring), (.quota, .ring), (.bitmap, .bitmap), (.ring, .sample)]
    for (track, mode) in cases {
        for rate in [10, 100, 400] as [UInt64] {
            let workloads = [VCPUWorkload(kind: .write, pattern: .sequential, offset: 0, size: 512 << 20, rateBytesPerSecond: rate << 20, seed: 1),
                             VCPUWorkload(kind: .read, offset: 512 << 20, size: 256 << 20, seed: 2)]
            let machine = try Machine(MachineConfiguration(memorySize: 1 << 30, vcpuCount: 2, workloads: workloads, tracking: track), kvm: kvm)
            try machine.start()
            defer { machine.stop() }
            Thread.sleep(forTimeInterval: 1.5)
            var guest: [Double] = [], measured: [Double] = [], reader: [Double] = []
            for _ in 0..<intervals {
                let report = try MachineControl.measure(machine, mode: mode, interval: 1.0)
                guest.append(report.vcpus[0].guestPagesPerSecond * 4096 / 1_048_576)
                measured.append(mode == .ring ? report.vcpus[0].dirtyMiBPerSecond ?? 0 : report.totalMiBPerSecond)
                reader.append(report.vcpus[1].dirtyMiBPerSecond ?? .nan)
            }
            let g = median(guest), m = median(measured)
            let label = mode == .sample ? "sample (\(track.rawValue) VM)" : track.rawValue + (mode == .bitmap ? " (VM-wide)" : "")
            let readerText = reader.allSatisfy(\.isNaN) ? "-" : String(format: "%.2f", median(reader))
            print("| \(label) | \(rate) | \(String(format: "%.1f", g)) | \(String(format: "%.1f", m)) | \(String(format: "%+.1f%%", (m / g - 1) * 100)) | \(String(format: "%+.1f%%", (m / Double(rate) - 1) * 100)) | \(readerText) |")
        }
    }
}

StandardStream.ignoreBrokenPipes()   // a table piped into a reader that quit costs the rest of it, not a signal
let arguments = Array(CommandLine.arguments.dropFirst())
let benchmark = arguments.first ?? "tracking"
let usage = "usage: dirtymig-bench tracking [--seconds S] [--runs N] [--memory MiB] | tracking-shapes [--seconds S] [--runs N] | accuracy [--seconds S] | migration [--runs N] [--quick] [--idle S] [--warm] [--scenario idle|written|rewriting] [--no-qemu] [--in-process] [--only dirtymig|dirtymig-prepared|qemu-prealloc|qemu|in-process|dirtymig-psk|dirtymig-prepared-psk|qemu-psk|qemu-prealloc-psk|dirtymig-zstd|dirtymig-auto|qemu-multifd|qemu-zstd] [--qmp-poll MS] [--prealloc both|yes|no] [--encrypted] | replication [--seconds S] [--runs N] [--only pause,rate,pace,failover] | throttle [--no-qemu] [--sweep] | limit [--no-qemu] | link [--runs N] [--idle S] [--rates MBIT,...] [--scenario written|rewriting|text] [--no-qemu] [--only ROW,...] | link --replication [--runs N] [--idle S] [--rates MBIT,...] [--scenario idle|writer|fast-writer] [--seconds S] | link --failover [--runs N] [--idle S] [--rates MBIT] [--seconds S] [--failover-after D] [--cut S] [--working-set SIZE] [--only alive|return] | postcopy [--runs N] [--idle S] [--scenario writer|reader|idle] [--only dirtymig|qemu] [--bandwidth RATE] [--no-qemu] | --help\n"

func usageError(_ message: String) -> Never {
    StandardStream.error.write("dirtymig-bench: \(message)\n\(usage)")
    exit(2)
}

/// What each benchmark accepts: options that take a value, and flags. Anything else is refused
/// before a run starts: a mistyped `--encrypted` would otherwise cost half an hour of the wrong
/// measurement.
let acceptedOptions: [String: (values: Set<String>, flags: Set<String>)] = [
    "tracking": (["--seconds", "--runs", "--memory"], []),
    "tracking-shapes": (["--seconds", "--runs"], []),
    "accuracy": (["--seconds"], []),
    "migration": (["--runs", "--idle", "--scenario", "--only", "--qmp-poll", "--prealloc", "--qemu-prealloc"],
                  ["--quick", "--warm", "--no-qemu", "--in-process", "--encrypted"]),
    "replication": (["--seconds", "--runs", "--only"], []),
    "throttle": ([], ["--no-qemu", "--sweep"]),
    "limit": ([], ["--no-qemu"]),
    "link": (["--runs", "--idle", "--rates", "--scenario", "--only", "--seconds", "--failover-after", "--cut", "--working-set"],
             ["--no-qemu", "--replication", "--failover"]),
    "postcopy": (["--runs", "--idle", "--scenario", "--only", "--bandwidth"], ["--no-qemu"]),
]

/// Refuses an unknown benchmark, an option it does not take, or an option without its value.
func checkArguments() {
    if ["--help", "-h", "help"].contains(benchmark) || arguments.dropFirst().contains(where: { $0 == "--help" || $0 == "-h" }) {
        print(usage, terminator: "")
        exit(0)
    }
    guard let accepted = acceptedOptions[benchmark] else { usageError("no benchmark named '\(benchmark)'") }
    var index = 1
    while index < arguments.count {
        let argument = arguments[index]
        if accepted.values.contains(argument) {
            guard index + 1 < arguments.count else { usageError("\(argument) needs a value") }
            index += 2
        } else if accepted.flags.contains(argument) {
            index += 1
        } else {
            let takes = (accepted.values.sorted() + accepted.flags.sorted()).joined(separator: " ")
            usageError("\(benchmark) does not take '\(argument)'" + (takes.isEmpty ? " (it takes no options)" : "; it takes \(takes)"))
        }
    }
}

func option(_ name: String, default value: Double) -> Double {
    guard let index = arguments.firstIndex(of: name) else { return value }
    guard index + 1 < arguments.count, let parsed = Double(arguments[index + 1]), parsed.isFinite, parsed >= 0 else {
        usageError("\(name) needs a non-negative number")
    }
    return parsed
}

func stringOption(_ name: String) -> String? {
    guard let index = arguments.firstIndex(of: name) else { return nil }
    guard index + 1 < arguments.count else { usageError("\(name) needs a value") }
    return arguments[index + 1]
}

/// `migration`'s options, checked: a measurement needs at least 5 runs per cell.
func migrationOptions() -> MigrationBenchmarkOptions {
    var options = MigrationBenchmarkOptions()
    let quick = arguments.contains("--quick")
    options.runs = Int(option("--runs", default: quick ? 1 : 5))
    guard options.runs >= 1 else { usageError("--runs must be at least 1") }
    guard options.runs >= 5 || quick else {
        usageError("--runs \(options.runs): a measurement takes at least 5 runs per cell (add --quick for a smoke test)")
    }
    if let key = stringOption("--scenario") {
        guard let scenario = MigrationScenario.all.first(where: { $0.key == key }) else {
            usageError("--scenario \(key): expected \(MigrationScenario.all.map(\.key).joined(separator: ", "))")
        }
        options.scenarios = [scenario]
    }
    options.withQEMU = !arguments.contains("--no-qemu")
    options.inProcess = arguments.contains("--in-process")
    options.encrypted = arguments.contains("--encrypted")
    if let only = stringOption("--only") {
        guard let migrator = Migrator.allCases.first(where: { $0.shortLabel.lowercased() == only.lowercased() }) else {
            usageError("--only \(only): expected \(Migrator.allCases.map(\.shortLabel).joined(separator: ", "))")
        }
        options.only = migrator
    }
    options.conditions.idleSeconds = option("--idle", default: 5)
    options.conditions.warm = arguments.contains("--warm")
    if let choice = stringOption("--prealloc") ?? stringOption("--qemu-prealloc") {
        guard let parsed = PreallocChoice(rawValue: choice) else { usageError("--prealloc \(choice): expected both, yes or no") }
        options.prealloc = parsed
    }
    let poll = option("--qmp-poll", default: 100)
    guard poll == 0 || poll >= 100 else { usageError("--qmp-poll \(poll): at least 100 ms, or 0 for no polling (QEMU's MIGRATION event)") }
    options.conditions.qmpPollSeconds = poll == 0 ? nil : poll / 1000
    return options
}

/// `link`'s pre-copy options, checked (`--replication`: `linkReplicationOptions`).
func linkOptions() -> LinkBenchmarkOptions {
    var options = LinkBenchmarkOptions()
    options.runs = linkRuns()
    options.conditions.idleSeconds = option("--idle", default: 5)
    options.withQEMU = !arguments.contains("--no-qemu")
    options.ratesMbit = linkRates() ?? options.ratesMbit
    if arguments.contains("--seconds") { usageError("--seconds is for link --replication (pre-copy runs until the migration ends)") }
    if let scenario = stringOption("--scenario") {
        guard LinkScenario.keys.contains(scenario) else { usageError("--scenario \(scenario): expected \(LinkScenario.keys.joined(separator: ", "))") }
        options.scenarioKeys = [scenario]
    }
    if let only = stringOption("--only") {
        let names = LinkBenchmarkOptions.migrators.map(\.shortLabel)
        let rows = only.split(separator: ",", omittingEmptySubsequences: false).map { name in
            LinkBenchmarkOptions.migrators.first { $0.shortLabel == name.lowercased() }
        }
        guard !rows.isEmpty, rows.allSatisfy({ $0 != nil }) else { usageError("--only \(only): expected rows among \(names.joined(separator: ", ")), comma-separated") }
        guard Set(rows.map { $0!.shortLabel }).count == rows.count else { usageError("--only \(only): a row named twice") }
        options.only = rows.compactMap { $0 }
        if !options.withQEMU && options.only!.allSatisfy(\.isQEMU) { usageError("--no-qemu and --only \(only) leave nothing to run") }
    }
    return options
}

/// `link --replication`'s options, checked.
func linkReplicationOptions() -> LinkReplicationOptions {
    var options = LinkReplicationOptions()
    options.runs = linkRuns()
    options.idleSeconds = option("--idle", default: 5)
    options.ratesMbit = linkRates() ?? options.ratesMbit
    for precopyOnly in ["--only", "--no-qemu"] where arguments.contains(precopyOnly) {
        usageError("\(precopyOnly) is for link's pre-copy table; --replication runs dirtymig alone")
    }
    if let key = stringOption("--scenario") {
        guard let guest = LinkReplicationGuest.known.first(where: { $0.key == key }) else {
            usageError("--scenario \(key): with --replication, expected \(LinkReplicationGuest.known.map(\.key).joined(separator: ", "))")
        }
        options.guests = [guest]
    }
    options.seconds = option("--seconds", default: options.seconds)
    guard options.seconds >= 1 else { usageError("--seconds \(options.seconds): at least 1 (the window checkpoints are counted over)") }
    return options
}

/// `link --failover`'s options, checked.
func linkFailoverOptions() -> LinkFailoverOptions {
    var options = LinkFailoverOptions()
    options.runs = Int(option("--runs", default: Double(options.runs)))
    guard options.runs >= 1 else { usageError("--runs must be at least 1") }
    options.idleSeconds = option("--idle", default: options.idleSeconds)
    switch stringOption("--only") {
    case nil: break
    case "alive": options.linkReturn = false
    case "return": options.aliveAndDeath = false
    case let other?: usageError("--only \(other): with --failover, expected alive (the primary alive, then its death) or return (a cut, then the link back)")
    }
    for other in ["--no-qemu", "--scenario", "--replication"] where arguments.contains(other) {
        usageError("\(other) is not for link --failover (it runs one guest, dirtymig alone)")
    }
    if let rates = linkRates() {
        guard rates.count == 1 else { usageError("--rates: link --failover runs at one rate") }
        options.rateMbit = rates[0]
    }
    options.seconds = option("--seconds", default: options.seconds)
    guard options.seconds >= 1 else { usageError("--seconds \(options.seconds): at least 1 (how long the primary lives)") }
    if let after = stringOption("--failover-after") {
        guard let seconds = try? DurationValue.parse(after), seconds >= 0.05, seconds <= 60 else {
            usageError("--failover-after \(after): a duration from 50ms to 60s, such as 500ms")
        }
        options.failoverAfter = after
        options.cutSeconds = max(options.cutSeconds, 2 * seconds + 1)
    }
    options.cutSeconds = option("--cut", default: options.cutSeconds)
    if let size = stringOption("--working-set") {
        guard let bytes = try? ByteSize.parse(size), bytes >= 1 << 20, bytes <= 64 << 20 else {
            usageError("--working-set \(size): a size from 1M to 64M (the guest has 128 MiB)")
        }
        options.workingSet = size
    }
    return options
}

private func linkRuns() -> Int {
    let runs = Int(option("--runs", default: 5))
    guard runs >= 1 else { usageError("--runs must be at least 1") }
    return runs
}

/// `--rates`, checked; nil when not given.
private func linkRates() -> [Int]? {
    guard let rates = stringOption("--rates") else { return nil }
    let parsed = rates.split(separator: ",", omittingEmptySubsequences: false).map { Int($0) }
    guard !parsed.isEmpty, parsed.allSatisfy({ $0.map { (1...100_000).contains($0) } ?? false }) else {
        usageError("--rates \(rates): comma-separated Mbit/s, each from 1 to 100000")
    }
    return parsed.compactMap { $0 }
}

/// `postcopy`'s options, checked. One run is allowed (a smoke test; the conditions line says so).
func postCopyOptions() -> PostCopyBenchmarkOptions {
    var options = PostCopyBenchmarkOptions()
    options.runs = Int(option("--runs", default: 5))
    guard options.runs >= 1 else { usageError("--runs must be at least 1") }
    options.conditions.idleSeconds = option("--idle", default: 5)
    if let key = stringOption("--scenario") {
        guard let scenario = PostCopyScenario.all.first(where: { $0.guest.key == key }) else {
            usageError("--scenario \(key): expected \(PostCopyScenario.all.map(\.guest.key).joined(separator: ", "))")
        }
        options.scenarios = [scenario]
    }
    if let only = stringOption("--only") {
        guard let side = PostCopySide(rawValue: only.lowercased()) else {
            usageError("--only \(only): expected \(PostCopySide.allCases.map(\.rawValue).joined(separator: " or "))")
        }
        options.sides = [side]
    }
    if arguments.contains("--no-qemu") {
        guard options.sides != [.qemu] else { usageError("--no-qemu and --only qemu leave nothing to run") }
        options.sides = [.dirtymig]
    }
    if let text = stringOption("--bandwidth") {
        do throws(QuantityError) { options.bandwidth = try ByteRate.parse(text) } catch { usageError("--bandwidth \(text): \(error)") }
        guard options.bandwidth >= 1 << 20 else { usageError("--bandwidth \(text): at least 1M (1 MiB/s): post-copy over a slower link takes minutes per GiB") }
        options.bandwidthText = text
    }
    return options
}

checkArguments()
LiveChildren.endWithTheBenchmark()
do {
    switch benchmark {
    case "tracking":
        try runTrackingCost(seconds: option("--seconds", default: 3), runs: Int(option("--runs", default: 3)),
                            memoryMiB: UInt64(option("--memory", default: 512)))
    case "tracking-shapes":
        try runTrackingShapes(seconds: option("--seconds", default: 3), runs: Int(option("--runs", default: 3)))
    case "accuracy":
        try runAccuracy(intervals: Int(option("--seconds", default: 3)))
    case "throttle":
        try runThrottleBenchmark(withQEMU: !arguments.contains("--no-qemu"), sweep: arguments.contains("--sweep"))
    case "limit":
        try runLimitAccuracy(withQEMU: !arguments.contains("--no-qemu"))
    case "migration":
        try runMigrationBenchmark(migrationOptions())
    case "link":
        if arguments.contains("--failover") {
            try runLinkFailoverBenchmark(linkFailoverOptions())
        } else if arguments.contains("--replication") {
            try runLinkReplicationBenchmark(linkReplicationOptions())
        } else {
            try runLinkBenchmark(linkOptions())
        }
    case "postcopy":
        try runPostCopyBenchmark(postCopyOptions())
    case "replication":
        let parts = stringOption("--only").map { $0.split(separator: ",").map(String.init) } ?? ReplicationBenchPart.allCases.map(\.rawValue)
        guard parts.allSatisfy({ ReplicationBenchPart(rawValue: $0) != nil }) else {
            StandardStream.error.write("dirtymig-bench replication: --only takes pause, rate, pace, failover (comma-separated)\n")
            exit(2)
        }
        try runReplicationBenchmark(seconds: option("--seconds", default: 3), runs: Int(option("--runs", default: 5)),
                                    parts: Set(parts.compactMap(ReplicationBenchPart.init(rawValue:))))
    default:
        StandardStream.error.write(usage)
        exit(2)
    }
} catch {
    StandardStream.error.write("dirtymig-bench: \(error)\n")
    exit(1)
}
