// dirtymig-bench: benchmarks that print tables a person can compare.
//
//   dirtymig-bench tracking [--seconds S] [--runs N] [--memory SIZE-MiB]
//       The cost of dirty tracking on this machine: one unpaced writer vCPU sweeping 256 MiB
//       (one 8-byte store per page), its own page-touch rate from the guest's counters, with no
//       tracking, bitmap (synced 10 times a second, as a migration pass or dirtyrate would),
//       ring (harvested every millisecond) and quota (ring + quota accounting, no quota set).
//
//   dirtymig-bench migration [--runs N] [--no-qemu] [--warm]
//       The migration issue's three scenarios (4 GiB never written; 2 GiB with 1 GiB written
//       once; 1 GiB rewriting 256 MiB at 200 MiB/s), dirtymig and, when installed, QEMU 7.2 on
//       the same guest image and config block: total time, downtime, passes, bytes, throughput.
//       With --warm, each scenario also runs with the destination's memory warmed just before
//       (see DestinationMemory: this nested machine hands freed memory back to its host).
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
            FileHandle.standardError.write(Data("run \(run) \(mode.0): \(Int(Double(pages) / elapsed)) pages/s\n".utf8))
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

let arguments = Array(CommandLine.arguments.dropFirst())
let benchmark = arguments.first ?? "tracking"
func option(_ name: String, default value: Double) -> Double {
    guard let index = arguments.firstIndex(of: name), index + 1 < arguments.count,
          let parsed = Double(arguments[index + 1]) else { return value }
    return parsed
}
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
        try runMigrationBenchmark(runs: Int(option("--runs", default: 3)), withQEMU: !arguments.contains("--no-qemu"),
                                  conditions: arguments.contains("--warm") ? DestinationMemory.allCases : [.asGiven])
    default:
        FileHandle.standardError.write(Data("usage: dirtymig-bench tracking [--seconds S] [--runs N] [--memory MiB] | tracking-shapes [--seconds S] [--runs N] | accuracy [--seconds S] | migration [--runs N] [--no-qemu] [--warm] | throttle [--no-qemu] [--sweep] | limit [--no-qemu]\n".utf8))
        exit(2)
    }
} catch {
    FileHandle.standardError.write(Data("dirtymig-bench: \(error)\n".utf8))
    exit(1)
}
