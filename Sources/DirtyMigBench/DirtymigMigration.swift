import DirtyMigCore
import Foundation

/// One dirtymig migration of a scenario over loopback, sender and receiver in this process
/// (as `dirtymig migrate` with neither --vm nor --to runs it). Not how users run migrations
/// between hosts (that is three processes: DirtymigCLIMigration); the throttle benchmark uses it,
/// and `migration --in-process` shows it next to the CLI's figures.
struct DirtymigMigrationResult {
    var report: MigrationReport
    /// The destination's guest pages/s over 0.5 s after it resumed (it must be running).
    var destinationGuestPagesPerSecond: [Double]
}

func runDirtymigMigration(memory: UInt64, vcpus: Int, workloads: [VCPUWorkload], downtime: Double,
                          waitForFinishedPasses: Bool, warmupSeconds: Double, tracking: TrackingMode = .ring,
                          verify: Bool = false, requireSuccess: Bool = true, warmBytes: UInt64 = 0,
                          adjust: (inout MigrationOptions) -> Void = { _ in },
                          readyWhen: ((GuestStats) -> Bool)? = nil, readyPollSeconds: Double = 0.01,
                          measuringOthers: ((Double) -> Void)? = nil) throws -> DirtymigMigrationResult {
    let kvm = try KVMSystem()
    let configuration = MachineConfiguration(memorySize: memory, vcpuCount: vcpus, workloads: workloads, tracking: tracking)
    let source = try Machine(configuration, kvm: kvm)
    try source.start()
    defer { source.stop() }
    let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm)
    let arrival = Arrival()
    let receiving = OSThread(name: "bench-receiver") {
        do { arrival.machine = try receiver.receiveOne() } catch { arrival.error = "\(error)" }
    }
    let deadline = Date().addingTimeInterval(120)
    while source.guestStats().bootedVCPUs < vcpus && Date() < deadline { usleep(5_000) }
    if let readyWhen {
        while Date() < deadline && !readyWhen(source.guestStats()) { Thread.sleep(forTimeInterval: readyPollSeconds) }
    }
    if waitForFinishedPasses {
        while Date() < deadline && source.guestStats().vcpus.enumerated().contains(where: { index, vcpu in
            workloads[index].kind != .idle && vcpu.state != .finished
        }) { usleep(10_000) }
    }
    Thread.sleep(forTimeInterval: warmupSeconds)

    var options = MigrationOptions(destination: HostPort(host: "127.0.0.1", port: receiver.port))
    options.downtimeSeconds = downtime
    options.verify = verify
    adjust(&options)
    WarmMemory.touchAndFree(warmBytes)
    let others = OthersCPUShare(children: [])
    let report = MigrationSender(machine: source, options: options).run()
    measuringOthers?(others.othersShare(children: []))
    if report.completed { source.stop() } else { receiver.stop() }
    receiving.join()
    receiver.stop()
    var after: [Double] = []
    if let destination = arrival.machine {
        let before = destination.guestStats().vcpus.map(\.pages)
        Thread.sleep(forTimeInterval: 0.5)
        after = zip(destination.guestStats().vcpus.map(\.pages), before).map { Double($0 &- $1) / 0.5 }
        destination.stop()
    }
    guard report.completed || !requireSuccess else { throw BenchError("dirtymig migration failed: \(report.error ?? arrival.error ?? "?")") }
    return DirtymigMigrationResult(report: report, destinationGuestPagesPerSecond: after)
}

/// The receiving thread's result.
final class Arrival: @unchecked Sendable {
    // @unchecked: written by the receiving thread before it ends, read after join().
    var machine: Machine?
    var error: String?
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// `migration --in-process`: the scenario migrated by runDirtymigMigration, held to the same
/// readiness rule, settle time and warming as the CLI and QEMU runs.
func runDirtymigInProcessMigration(_ scenario: MigrationScenario, conditions: MigrationRunConditions) throws -> MigrationMeasurement {
    let workloads = try scenario.resolvedWorkloads()
    var othersShare = 0.0
    let report = try runDirtymigMigration(memory: scenario.memory, vcpus: scenario.vcpus, workloads: workloads,
                                          downtime: Double(scenario.downtimeMs) / 1000, waitForFinishedPasses: false,
                                          warmupSeconds: conditions.settleSeconds,
                                          warmBytes: conditions.warm ? scenario.warmBytes : 0,
                                          readyWhen: { scenario.isReady(GuestProgress($0), workloads: workloads) },
                                          readyPollSeconds: conditions.readyPollSeconds,
                                          measuringOthers: { othersShare = $0 }).report
    return MigrationMeasurement(totalMs: report.totalSeconds * 1000, downtimeMs: report.downtimeSeconds * 1000,
                                passes: report.iterations, sentBytes: report.transferredBytes,
                                detail: String(format: "setup %.1f ms", (report.setupSeconds ?? 0) * 1000),
                                othersCPUShare: othersShare)
}
