import DirtyMigCore
import Foundation

/// The convergence issue's benchmark: the same guest and bandwidth cap, migrated with each
/// throttle, by dirtymig and by QEMU 7.2; the skewed workload with and without the pool; a sweep
/// of dirty rate against bandwidth; and `limit` accuracy next to QEMU's set-vcpu-dirty-limit.

/// 1 GiB, 2 vCPUs: vCPU 0 writes 512 MiB at random as fast as it can, vCPU 1 reads 256 MiB.
let throttleScenario = [
    VCPUWorkload(kind: .write, pattern: .random, offset: 0, size: 512 << 20, rateBytesPerSecond: 0, seed: 1),
    VCPUWorkload(kind: .read, offset: 512 << 20, size: 256 << 20, seed: 2),
]

private func ratios(_ during: [Double], _ before: [Double]) -> String {
    zip(during, before).map { String(format: "%.2f", $0 / max($1, 1)) }.joined(separator: " / ")
}

private func row(_ cells: [String]) { print("| " + cells.joined(separator: " | ") + " |") }

func runThrottleBenchmark(withQEMU: Bool, sweep: Bool) throws {
    let bandwidth: UInt64 = 100 << 20
    print("Throttles: 1 GiB, 2 vCPUs (vCPU 0 writes 512 MiB at random unpaced, vCPU 1 reads 256 MiB), --bandwidth 100M --downtime 300ms --verify (dirtymig)")
    print("")
    row(["VMM", "throttle", "track", "result", "total ms", "downtime ms", "passes", "throttle from s", "guest during/before v0 / v1"])
    row(Array(repeating: "---", count: 9))
    let cases: [(ThrottleMode, TrackingMode, Double)] = [(.none, .ring, 20), (.cpu, .bitmap, 180), (.dirtyLimit, .ring, 120), (.dirtyQuota, .quota, 120)]
    for (throttle, track, timeout) in cases {
        let result = try runDirtymigMigration(memory: 1 << 30, vcpus: 2, workloads: throttleScenario, downtime: 0.3,
                                              waitForFinishedPasses: false, warmupSeconds: 1, tracking: track, verify: true,
                                              requireSuccess: false) { options in
            options.bandwidth = bandwidth
            options.throttle = throttle
            options.timeoutSeconds = timeout
        }
        let report = result.report
        row(["dirtymig", throttle.rawValue, track.rawValue, report.completed ? "completed, verified" : "failed: \(report.error ?? "?")",
             String(format: "%.0f", report.totalSeconds * 1000), report.completed ? String(format: "%.0f", report.downtimeSeconds * 1000) : "-",
             "\(report.completed ? report.iterations : report.passes.count)",
             report.throttle.startedSeconds.map { String(format: "%.1f", $0) } ?? "-",
             ratios(report.guestPagesPerSecondDuring, report.guestPagesPerSecondBefore)])
    }
    if withQEMU {
        let variants: [(String, QEMUMigrationSettings)] = [
            ("none", QEMUMigrationSettings(bandwidth: bandwidth, timeoutSeconds: 20)),
            ("auto-converge", QEMUMigrationSettings(bandwidth: bandwidth, autoConverge: true, timeoutSeconds: 180)),
            // 7.2 has no dirty-limit migration capability: the limit is set by hand before
            // migrating, at a quarter of the link as dirtymig's dirty-limit starts with.
            ("set-vcpu-dirty-limit 25 MB/s on v0", QEMUMigrationSettings(bandwidth: bandwidth, dirtyRingSize: 4096,
                                                                          dirtyLimits: [(0, 25)], timeoutSeconds: 60)),
        ]
        for (label, settings) in variants {
            let result = try runQEMUMigration(memory: 1 << 30, workloads: throttleScenario, settings: settings,
                                              waitForFinishedPasses: false, warmupSeconds: 1)
            row(["QEMU 7.2", label, settings.dirtyRingSize == nil ? "bitmap" : "ring", result.completed ? "completed" : "failed: \(result.error ?? "?")",
                 result.completed ? String(format: "%.0f", result.totalMs) : "-", result.completed ? String(format: "%.0f", result.downtimeMs) : "-",
                 result.completed ? "\(result.passes)" : "-", "-", ratios(result.guestPagesPerSecondDuring, result.guestPagesPerSecondBefore)])
        }
    }

    print("")
    print("Skewed: 512 MiB, 4 vCPUs (vCPU 0 writes 256 MiB at random unpaced, vCPUs 1-3 write 16 MiB each at 2 MiB/s), dirty-quota, --bandwidth 100M")
    print("")
    row(["quota split", "result", "total ms", "downtime ms", "passes", "pages v0 drew from the pool", "guest during/before v0 / v1 / v2 / v3"])
    row(Array(repeating: "---", count: 7))
    var skewed = [VCPUWorkload(kind: .write, pattern: .random, offset: 0, size: 256 << 20, rateBytesPerSecond: 0, seed: 1)]
    for light in 0..<3 {
        let offset = UInt64(256 + 16 * light) << 20
        skewed.append(VCPUWorkload(kind: .write, pattern: .sequential, offset: offset, size: 16 << 20,
                                   rateBytesPerSecond: 2 << 20, seed: UInt64(light + 2)))
    }
    for pool in [true, false] {
        let report = try runDirtymigMigration(memory: 512 << 20, vcpus: 4, workloads: skewed, downtime: 0.3, waitForFinishedPasses: false,
                                              warmupSeconds: 1, tracking: .quota, verify: true, requireSuccess: false) { options in
            options.bandwidth = bandwidth
            options.throttle = .dirtyQuota
            options.quotaPool = pool
            options.timeoutSeconds = 120
        }.report
        row([pool ? "equal shares + common pool" : "equal shares, no pool", report.completed ? "completed" : "failed: \(report.error ?? "?")",
             String(format: "%.0f", report.totalSeconds * 1000), String(format: "%.0f", report.downtimeSeconds * 1000), "\(report.iterations)",
             "\(report.throttle.final?.pagesFromPool?.first ?? 0)", ratios(report.guestPagesPerSecondDuring, report.guestPagesPerSecondBefore)])
    }

    if sweep {
        print("")
        print("Sweep (after seed 000's table): 1 GiB, 2 vCPUs each writing 256 MiB sequentially at half the dirty rate; total seconds")
        print("")
        row(["dirty rate MiB/s", "bandwidth MiB/s", "none", "cpu (bitmap)", "dirty-limit (ring)", "dirty-quota (quota)"])
        row(Array(repeating: "---", count: 6))
        for (rate, link) in [(50, 100), (200, 100), (800, 100), (800, 400)] as [(UInt64, UInt64)] {
            let workloads = (0..<2).map { VCPUWorkload(kind: .write, pattern: .sequential, offset: UInt64($0) * (256 << 20), size: 256 << 20,
                                                       rateBytesPerSecond: rate << 19, seed: UInt64($0 + 1)) }
            var cells = ["\(rate)", "\(link)"]
            for (throttle, track) in [(ThrottleMode.none, TrackingMode.ring), (.cpu, .bitmap), (.dirtyLimit, .ring), (.dirtyQuota, .quota)] {
                let report = try runDirtymigMigration(memory: 1 << 30, vcpus: 2, workloads: workloads, downtime: 0.3, waitForFinishedPasses: false,
                                                      warmupSeconds: 1, tracking: track, requireSuccess: false) { options in
                    options.bandwidth = link << 20
                    options.throttle = throttle
                    options.timeoutSeconds = 60
                }.report
                cells.append(report.completed ? String(format: "%.1f", report.totalSeconds) : "unconverged (60 s)")
            }
            row(cells)
        }
    }
}

/// `limit` accuracy: the writer of the throttle scenario limited at 20 and 5 MiB/s; per second
/// for 8 s, the measured dirty rate of vCPU 0; time until every later sample is within 10 %,
/// the median error after that, and the reader's pace against before.
func runLimitAccuracy(withQEMU: Bool) throws {
    let kvm = try KVMSystem()
    print("limit accuracy: 1 GiB, 2 vCPUs (vCPU 0 writes 512 MiB sequentially unpaced, vCPU 1 reads 256 MiB); limit on vCPU 0, 1 s samples for 8 s")
    print("")
    row(["VMM", "mechanism", "limit MiB/s", "samples MiB/s", "settled after s", "median error after", "guest keeps running", "reader during/before"])
    row(Array(repeating: "---", count: 8))
    let workloads = [VCPUWorkload(kind: .write, pattern: .sequential, offset: 0, size: 512 << 20, rateBytesPerSecond: 0, seed: 1),
                     VCPUWorkload(kind: .read, offset: 512 << 20, size: 256 << 20, seed: 2)]
    for track in [TrackingMode.ring, .quota] {
        for limit in [20.0, 5.0] {
            let machine = try Machine(MachineConfiguration(memorySize: 1 << 30, vcpuCount: 2, workloads: workloads, tracking: track), kvm: kvm)
            try machine.start()
            defer { machine.stop() }
            Thread.sleep(forTimeInterval: 1.5)
            let before = try MachineControl.measure(machine, mode: .ring, interval: 1)
            try machine.setDirtyLimit(bytesPerSecond: limit * 1_048_576, vcpus: [0])
            var samples: [Double] = [], readers: [Double] = [], guest: [Double] = []
            for _ in 0..<8 {
                let report = try MachineControl.measure(machine, mode: .ring, interval: 1)
                samples.append(report.vcpus[0].dirtyMiBPerSecond ?? 0)
                readers.append(report.vcpus[1].guestPagesPerSecond)
                guest.append(report.vcpus[0].guestPagesPerSecond)
            }
            printLimitRow("dirtymig", track == .ring ? "dirty limit (ring)" : "dirty quota (quota)", limit, samples,
                          running: guest.allSatisfy { $0 > 0 }, reader: median(readers) / max(before.vcpus[1].guestPagesPerSecond, 1))
        }
    }
    if withQEMU {
        for limit in [20, 5] {
            let result = try runQEMULimit(workloads: workloads, mbPerSecond: limit)
            printLimitRow("QEMU 7.2", "set-vcpu-dirty-limit (ring)", Double(limit) * 1e6 / 1_048_576, result.samples,
                          running: result.running, reader: result.reader)
        }
    }
}

private func printLimitRow(_ vmm: String, _ mechanism: String, _ limit: Double, _ samples: [Double], running: Bool, reader: Double) {
    var settled: Int? = nil
    for start in samples.indices where samples[start...].allSatisfy({ abs($0 - limit) <= limit * 0.1 }) { settled = start + 1; break }
    let error = settled.map { String(format: "%.1f %%", median(samples[($0 - 1)...].map { abs($0 - limit) / limit * 100 })) } ?? "-"
    row([vmm, mechanism, String(format: "%.1f", limit), samples.map { String(format: "%.1f", $0) }.joined(separator: " "),
         settled.map { "\($0)" } ?? "never", error, running ? "yes" : "no (frozen)", String(format: "%.2f", reader)])
}
