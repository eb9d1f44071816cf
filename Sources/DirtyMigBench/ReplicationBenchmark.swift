import DirtyMigCore
import Foundation

/// `dirtymig-bench replication`: what continuous replication costs on this machine, ring (the
/// dense list of seed 004) next to bitmap. The primary runs in this process (its Replicator's
/// own figures); the standby is a `dirtymig receive --standby` process, as users run it, in
/// manual failover mode (so it never takes over while measured), on loopback.
enum ReplicationBenchPart: String, CaseIterable { case pause, rate, pace, failover }

func runReplicationBenchmark(seconds: Double, runs: Int, parts: Set<ReplicationBenchPart>) throws {
    let dirtymig = try dirtymigBesideBenchmark()
    let kvm = try KVMSystem()
    if parts.contains(.pause) { try measurePauses(dirtymig: dirtymig, kvm: kvm, seconds: seconds) }
    if parts.contains(.rate) { try measureCheckpointRates(dirtymig: dirtymig, kvm: kvm, seconds: seconds) }
    if parts.contains(.pace) { try measureGuestPace(dirtymig: dirtymig, kvm: kvm, seconds: seconds, runs: max(runs, 1)) }
    if parts.contains(.failover) { try measureFailovers(dirtymig: dirtymig, runs: max(runs, 1)) }
}

private func measurePauses(dirtymig: String, kvm: KVMSystem, seconds: Double) throws {

    // 1. Pause per checkpoint against the dirty set and the VM's size. A paced sequential
    //    writer over 256 MiB dirties rate x interval per epoch: 16 MiB/s x 25 ms = 100 pages,
    //    160 MiB/s x 25 ms = 1,024, 160 MiB/s x 250 ms = 10,240.
    print("Pause per checkpoint (vCPUs paused: collect the dirty list, copy the pages, save the state)")
    print("pages copied 'early+pause': those dirtied so far are copied while the epoch runs, the pause copies the rest (the default);")
    print("'pause only': every page is copied in the pause")
    let pauseTable = TextTable(["dirty set", "VM", "track", "pages copied", "pause median", "p99", "of which copy", "dirty pages median",
                                "copied paused median", "checkpoints/s", "resyncs"])
    let sets: [(label: String, rate: UInt64, interval: Double)] = [
        ("100", 16 << 20, 0.025), ("1,000", 160 << 20, 0.025), ("10,000", 160 << 20, 0.25),
    ]
    for set in sets {
        for memory: UInt64 in [1 << 30, 4 << 30] {
            for (track, early) in [(TrackingMode.ring, true), (.ring, false), (.bitmap, true)] {
                let workloads = [VCPUWorkload(kind: .write, size: 256 << 20, rateBytesPerSecond: set.rate, seed: 1), .idle]
                let figures = try measureReplication(dirtymig: dirtymig, kvm: kvm, memory: memory, track: track,
                                                     workloads: workloads, interval: set.interval,
                                                     seconds: max(seconds, set.interval * 24), stagesWhileRunning: early)
                pauseTable.row([set.label, "\(memory >> 30) GiB", track.rawValue, early ? "early+pause" : "pause only",
                                ms(figures.pauseMedianMs), ms(figures.pauseP99Ms),
                                ms(figures.pausePartsMedianMs.first { $0.0 == "copy" }?.1 ?? 0),
                                String(format: "%.0f", figures.dirtyPagesMedian), String(format: "%.0f", figures.pagesCopiedPausedMedian),
                                String(format: "%.1f", figures.checkpointsPerSecond), "\(figures.resyncs)"])
            }
        }
    }
}

private func measureCheckpointRates(dirtymig: String, kvm: KVMSystem, seconds: Double) throws {
    // 2. The highest sustained checkpoint rate: epochs of 0.1 ms (the shortest allowed).
    print("\nHighest sustained checkpoint rate (--checkpoint-interval 0.1ms, 1 GiB, 2 vCPUs)")
    let rateTable = TextTable(["guest", "track", "checkpoints/s", "pause median", "p99", "dirty pages median"])
    for (label, workloads) in [("idle", [VCPUWorkload.idle, .idle]),
                               ("25 MiB/s writer", [VCPUWorkload(kind: .write, size: 64 << 20, rateBytesPerSecond: 25 << 20, seed: 1), .idle])] {
        for track in [TrackingMode.ring, .bitmap] {
            let figures = try measureReplication(dirtymig: dirtymig, kvm: kvm, memory: 1 << 30, track: track,
                                                 workloads: workloads, interval: 0.0001, seconds: seconds)
            rateTable.row([label, track.rawValue, String(format: "%.0f", figures.checkpointsPerSecond), ms(figures.pauseMedianMs),
                           ms(figures.pauseP99Ms), String(format: "%.0f", figures.dirtyPagesMedian)])
        }
    }
}

private func measureGuestPace(dirtymig: String, kvm: KVMSystem, seconds: Double, runs: Int) throws {
    // 3. The guest's pace under replication at 40 checkpoints a second. One run's ratio swings
    //    widely on this machine (0.5-1.9 for the reader while other work ran), so each variant
    //    runs `runs` times, the variants alternating and their order reversed every other run.
    print("\nGuest pace during replication / before (25 ms epochs, 1 GiB; vCPU 0 writes 256 MiB at 50 MiB/s, vCPU 1 reads 256 MiB), median (range) of \(runs) runs")
    print("per CPU-s: the reader's guest pages per second of its vCPU thread's own CPU time, during / before (its work when it runs, apart from its share of the cores)")
    let variants: [(track: TrackingMode, early: Bool)] = [(.ring, true), (.ring, false), (.bitmap, true), (.bitmap, false)]
    var writer = [[Double]](repeating: [], count: variants.count), reader = writer, perCPU = writer, pauses = writer
    for run in 0..<runs {
        let order = run % 2 == 0 ? Array(variants.indices) : variants.indices.reversed()
        for index in order {
            let workloads = [VCPUWorkload(kind: .write, size: 256 << 20, rateBytesPerSecond: 50 << 20, seed: 1),
                             VCPUWorkload(kind: .read, offset: 256 << 20, size: 256 << 20, seed: 2)]
            var pace: [Double] = [], efficiency: [Double] = []
            let figures = try measureReplication(dirtymig: dirtymig, kvm: kvm, memory: 1 << 30, track: variants[index].track,
                                                 workloads: workloads, interval: 0.025, seconds: seconds,
                                                 stagesWhileRunning: variants[index].early, pace: &pace, efficiency: &efficiency)
            writer[index].append(pace[0])
            reader[index].append(pace[1])
            perCPU[index].append(efficiency[1])
            pauses[index].append(figures.pauseMedianMs)
        }
    }
    func spread(_ values: [Double]) -> String {
        let sorted = values.sorted()
        return String(format: "%.2f (%.2f-%.2f)", sorted[sorted.count / 2], sorted.first!, sorted.last!)
    }
    let paceTable = TextTable(["track", "pages copied", "writer during/before", "reader during/before", "reader per CPU-s", "pause median"])
    for (index, variant) in variants.enumerated() {
        paceTable.row([variant.track.rawValue, variant.early ? "early+pause" : "pause only", spread(writer[index]),
                       spread(reader[index]), spread(perCPU[index]), ms(pauses[index].sorted()[pauses[index].count / 2])])
    }
}

private func measureFailovers(dirtymig: String, runs failoverRuns: Int) throws {
    // 4. Failover: SIGKILL to the primary's process, to the guest running on the standby.
    print("\nFailover (dirtymig boot + migrate --continuous, SIGKILL to the primary; receive --standby --failover-after 500ms)")
    var times: [Double] = []
    for _ in 0..<failoverRuns { times.append(try measureFailover(dirtymig: dirtymig)) }
    let sorted = times.sorted()
    print(String(format: "kill to guest running on the standby: median %.0f ms (%.0f-%.0f), %d runs; --failover-after 500 ms",
                 sorted[sorted.count / 2], sorted.first!, sorted.last!, times.count))
}

/// Boots a primary here, replicates it to a fresh standby process, lets it run `seconds` after
/// a second of warm-up, and returns the replicator's figures over that time. `pace` gets each
/// vCPU's guest pages/s during replication divided by before it.
private func measureReplication(dirtymig: String, kvm: KVMSystem, memory: UInt64, track: TrackingMode,
                                workloads: [VCPUWorkload], interval: Double, seconds: Double,
                                stagesWhileRunning: Bool = true) throws -> ReplicationFigures {
    var pace: [Double] = [], efficiency: [Double] = []
    return try measureReplication(dirtymig: dirtymig, kvm: kvm, memory: memory, track: track, workloads: workloads,
                                  interval: interval, seconds: seconds, stagesWhileRunning: stagesWhileRunning,
                                  pace: &pace, efficiency: &efficiency)
}

private func measureReplication(dirtymig: String, kvm: KVMSystem, memory: UInt64, track: TrackingMode,
                                workloads: [VCPUWorkload], interval: Double, seconds: Double,
                                stagesWhileRunning: Bool = true, pace: inout [Double],
                                efficiency: inout [Double]) throws -> ReplicationFigures {
    let scratch = try ScratchDirectory("dirtymig-bench")
    defer { withExtendedLifetime(scratch) {} }
    let port = try freeLoopbackPort()
    let standby = try ChildProcess(dirtymig, ["receive", "--listen", "127.0.0.1:\(port)", "--standby", "--failover", "manual",
                                              "--failover-after", "5s", "--control", scratch.file("standby.sock")],
                                   stdout: .pipe, stderrPath: scratch.file("standby.log"))
    defer { standby.stop() }
    _ = try standby.expectLine(containing: "listening", timeout: 60)
    let machine = try Machine(MachineConfiguration(memorySize: memory, vcpuCount: workloads.count, workloads: workloads,
                                                   tracking: track), kvm: kvm)
    try machine.start()
    defer { machine.stop() }
    Thread.sleep(forTimeInterval: 1.0)
    let before = guestPace(machine, over: 2.0)
    var options = ReplicationOptions(standby: HostPort(host: "127.0.0.1", port: port))
    options.intervalSeconds = interval
    options.stagesWhileRunning = stagesWhileRunning
    guard machine.transferClaim.claim("benchmark") == nil else { throw BenchError("claimed") }
    let replicator = Replicator(machine: machine, options: options)
    let started = replicator.start()
    guard started.status == .protected else { throw BenchError("replication did not start: \(started.error ?? "?")") }
    Thread.sleep(forTimeInterval: 1.0)
    replicator.resetWindows()
    let during = guestPace(machine, over: seconds)
    let figures = replicator.figures
    replicator.stop()
    guard figures.status == .protected else { throw BenchError("the standby was lost: \(figures.error ?? "?")") }
    pace = zip(during.wall, before.wall).map { $1 > 0 ? $0 / $1 : 0 }
    efficiency = zip(during.perCPUSecond, before.perCPUSecond).map { $1 > 0 ? $0 / $1 : 0 }
    return figures
}

/// Each vCPU's guest pages per second of wall time, and per second of its thread's CPU time
/// (how much work it gets done when it runs, whoever else wants the cores).
private func guestPace(_ machine: Machine, over seconds: Double) -> (wall: [Double], perCPUSecond: [Double]) {
    let first = machine.guestStats().vcpus.map(\.pages)
    let cpuFirst = vcpuThreadCPUSeconds(count: first.count)
    let start = MonotonicClock.seconds()
    Thread.sleep(forTimeInterval: seconds)
    let elapsed = MonotonicClock.seconds() - start
    let pages = zip(machine.guestStats().vcpus.map(\.pages), first).map { Double($0 &- $1) }
    let cpu = zip(vcpuThreadCPUSeconds(count: first.count), cpuFirst).map { $0 - $1 }
    return (pages.map { $0 / elapsed }, zip(pages, cpu).map { $1 > 0 ? $0 / $1 : 0 })
}

/// CPU seconds (user + system) of this process's threads named vcpu-0, vcpu-1 ...
private func vcpuThreadCPUSeconds(count: Int) -> [Double] {
    var seconds = [Double](repeating: 0, count: count)
    let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
    for task in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? [] {
        guard let name = try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8),
              name.hasPrefix("vcpu-"), let vcpu = Int(name.dropFirst(5).trimmingCharacters(in: .whitespacesAndNewlines)),
              vcpu < count, let jiffies = ProcStat.cpuJiffies("/proc/self/task/\(task)/stat") else { continue }
        seconds[vcpu] += Double(jiffies) / ticks
    }
    return seconds
}

/// One failover from the command line: boot, standby, migrate --continuous, SIGKILL the boot
/// process, then poll the standby's socket (every 2 ms) until it serves a running VM whose
/// writer's counter moves. Returns the milliseconds from the kill.
private func measureFailover(dirtymig: String) throws -> Double {
    let scratch = try ScratchDirectory("dirtymig-bench")
    defer { withExtendedLifetime(scratch) {} }
    let port = try freeLoopbackPort()
    let primarySocket = scratch.file("primary.sock"), standbySocket = scratch.file("standby.sock")
    let standby = try ChildProcess(dirtymig, ["receive", "--listen", "127.0.0.1:\(port)", "--standby", "--control", standbySocket],
                                   stdout: .pipe, stderrPath: scratch.file("standby.log"))
    defer { standby.stop() }
    _ = try standby.expectLine(containing: "listening", timeout: 60)
    let boot = try ChildProcess(dirtymig, ["boot", "--memory", "256M", "--workload", "0:write,ws=64M,rate=20M", "--control", primarySocket],
                                stdout: .pipe, stderrPath: scratch.file("boot.log"))
    defer { boot.stop() }
    _ = try boot.expectLine(containing: "running", timeout: 60)
    let migrate = try ChildProcess(dirtymig, ["migrate", "--vm", primarySocket, "--continuous", "--to", "127.0.0.1:\(port)", "--json"],
                                   stdout: .file(scratch.file("replicate.json")), stderrPath: scratch.file("migrate.log"))
    guard migrate.waitForExit(timeout: 60), migrate.exitStatus == 0 else {
        throw BenchError("migrate --continuous failed: \(migrate.stderrTail)")
    }
    Thread.sleep(forTimeInterval: 1.0)
    let killed = MonotonicClock.seconds()
    kill(boot.pid, SIGKILL)
    var first: UInt64?
    while MonotonicClock.seconds() - killed < 10 {
        if let client = try? ControlClient(path: standbySocket, callTimeout: 2),
           let status = try? client.call("query-status"), let pages = status["vcpu_stats"]?[0]?["pages"]?.doubleValue {
            client.close()
            if let first, UInt64(pages) > first { return (MonotonicClock.seconds() - killed) * 1000 }
            if first == nil { first = UInt64(pages) }
        }
        usleep(2_000)
    }
    throw BenchError("the standby did not take over within 10 s: \(standby.stderrTail)")
}

private func ms(_ value: Double) -> String { String(format: "%.3f ms", value) }

/// Rows printed as they come, each column as wide as its heading (or 12).
final class TextTable {
    private let widths: [Int]

    init(_ headings: [String]) {
        widths = headings.map { max($0.count, 12) + 2 }
        print(zip(headings, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined())
    }

    func row(_ cells: [String]) {
        print(zip(cells, widths).map { $0.padding(toLength: $1, withPad: " ", startingAt: 0) }.joined())
    }
}
