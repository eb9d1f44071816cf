import DirtyMigCore
import Foundation

/// `dirtymig-bench tracking-shapes`: what each tracking mode costs the guest, for a few workload
/// shapes: the choice of `--track` is the user's biggest, and the cost differs by shape (the
/// ring hands every harvested page back write-protected, so a large random working set faults
/// on every page again and again, where a sequential writer barely notices).
///
/// For each shape and mode: the guest's own pages touched per second (all vCPUs), median and
/// range of `runs` runs of `seconds` s each, after the working set was touched once; bitmap is
/// collected once a second (as `dirtyrate` and a migration pass do), the ring harvested every
/// millisecond.
struct TrackingShape {
    let label: String
    let vcpus: Int
    let workloads: [VCPUWorkload]

    static let all: [TrackingShape] = [
        TrackingShape(label: "1 writer, sequential, 256 MiB", vcpus: 1,
                      workloads: [VCPUWorkload(kind: .write, pattern: .sequential, size: 256 << 20, seed: 1)]),
        TrackingShape(label: "2 writers, random, 400 MiB", vcpus: 2,
                      workloads: [VCPUWorkload(kind: .write, pattern: .random, offset: 0, size: 200 << 20, seed: 1),
                                  VCPUWorkload(kind: .write, pattern: .random, offset: 200 << 20, size: 200 << 20, seed: 2)]),
        TrackingShape(label: "1 writer, hot 10 % of 256 MiB", vcpus: 1,
                      workloads: [VCPUWorkload(kind: .write, pattern: .hot, hotFraction: 0.1, size: 256 << 20, seed: 1)]),
        TrackingShape(label: "1 reader, 256 MiB", vcpus: 1,
                      workloads: [VCPUWorkload(kind: .read, size: 256 << 20, seed: 1)]),
    ]
}

func runTrackingShapes(seconds: Double, runs: Int) throws {
    let kvm = try KVMSystem()
    let modes: [(String, TrackingMode?, Int)] = [("none", nil, 4096), ("bitmap", .bitmap, 4096), ("ring, 1024 entries", .ring, 1024),
                                                 ("ring, 4096 entries", .ring, 4096), ("quota, 4096 entries", .quota, 4096)]
    print("Tracking cost by workload shape: guest pages touched per second (all vCPUs), median (min-max) of \(runs) runs of \(seconds) s")
    print("")
    print("| workload | " + modes.map(\.0).joined(separator: " | ") + " |")
    print("|---|" + modes.map { _ in "---|" }.joined())
    for shape in TrackingShape.all {
        var cells: [String] = []
        var baseline = 0.0
        for (label, tracking, entries) in modes {
            var rates: [Double] = []
            for _ in 0..<runs {
                let configuration = MachineConfiguration(memorySize: 1 << 30, vcpuCount: shape.vcpus, workloads: shape.workloads,
                                                         tracking: tracking, ringEntries: entries)
                let machine = try Machine(configuration, kvm: kvm)
                try machine.start()
                defer { machine.stop() }
                let deadline = MonotonicClock.seconds() + 20
                // Steady state: every vCPU has gone once over its working set.
                while MonotonicClock.seconds() < deadline
                    && machine.guestStats().vcpus.contains(where: { $0.passes < 1 && $0.pages < 65536 }) {
                    usleep(20_000)
                    if tracking == .bitmap { _ = try machine.tracker?.collect() }
                }
                let before = machine.guestStats().vcpus.map(\.pages).reduce(0, +)
                let start = MonotonicClock.seconds()
                var nextCollect = start + 1
                while MonotonicClock.seconds() - start < seconds {
                    usleep(20_000)
                    if tracking == .bitmap, MonotonicClock.seconds() >= nextCollect {
                        _ = try machine.tracker?.collect()
                        nextCollect += 1
                    }
                }
                let pages = machine.guestStats().vcpus.map(\.pages).reduce(0, +) - before
                rates.append(Double(pages) / (MonotonicClock.seconds() - start))
                StandardStream.error.write("\(shape.label), \(label): \(Int(rates.last!)) pages/s\n")
            }
            let middle = median(rates)
            if tracking == nil { baseline = middle }
            let share = baseline > 0 && tracking != nil ? String(format: " = %.3g×", middle / baseline) : ""
            cells.append("\(format(middle)) (\(format(rates.min() ?? 0))-\(format(rates.max() ?? 0)))\(share)")
        }
        print("| \(shape.label) | " + cells.joined(separator: " | ") + " |")
    }
}

/// 181265311 -> "181 M", 148000 -> "148 k".
private func format(_ value: Double) -> String {
    switch value {
    case 1e6...: return String(format: "%.3g M", value / 1e6)
    case 1e3...: return String(format: "%.3g k", value / 1e3)
    default: return String(Int(value))
    }
}
