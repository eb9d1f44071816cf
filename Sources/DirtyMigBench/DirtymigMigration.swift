import DirtyMigCore
import Foundation

/// One dirtymig migration of a scenario over loopback, sender and receiver in this process
/// (as `dirtymig migrate` with neither --vm nor --to runs it).
struct DirtymigMigrationResult {
    var report: MigrationReport
    /// The destination's guest pages/s over 0.5 s after it resumed (it must be running).
    var destinationGuestPagesPerSecond: [Double]
}

func runDirtymigMigration(memory: UInt64, vcpus: Int, workloads: [VCPUWorkload], downtime: Double,
                          waitForFinishedPasses: Bool, warmupSeconds: Double, tracking: TrackingMode = .ring,
                          verify: Bool = false, requireSuccess: Bool = true, warmBytes: UInt64 = 0,
                          adjust: (inout MigrationOptions) -> Void = { _ in }) throws -> DirtymigMigrationResult {
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
    DestinationMemory.warm(warmBytes)
    let report = MigrationSender(machine: source, options: options).run()
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

/// `dirtymig-bench migration`: the migration issue's three scenarios, dirtymig next to QEMU 7.2
/// on the same guest image and config block (when qemu-system-x86_64 is installed).
func runMigrationBenchmark(runs: Int, withQEMU: Bool, conditions: [DestinationMemory] = [.asGiven]) throws {
    // Scenario, RAM, workloads, wait for the writer to finish, warm-up s, bytes the guest wrote.
    let scenarios: [(String, UInt64, [VCPUWorkload], Bool, Double, UInt64)] = [
        ("4 GiB, guest wrote nothing", 4 << 30, [VCPUWorkload(kind: .idle, seed: 0)], false, 0.2, 0),
        ("2 GiB, 1 GiB written once, idle", 2 << 30, [VCPUWorkload(kind: .write, offset: 0, size: 1 << 30, passes: 1, seed: 1)], true, 0.2, 1 << 30),
        ("1 GiB, rewriting 256 MiB at 200 MiB/s", 1 << 30, [VCPUWorkload(kind: .write, offset: 0, size: 256 << 20, rateBytesPerSecond: 200 << 20, seed: 1)], false, 1.0, 256 << 20),
    ]
    let qemu = withQEMU && qemuExecutable() != nil
    print("Live migration over loopback, --downtime 300ms, no bandwidth cap; median (min-max) of \(runs) runs")
    print("")
    print("| scenario | migrator | total ms | downtime ms | passes | MiB sent | MiB/s |")
    print("|---|---|---|---|---|---|---|")
    func cell(_ values: [Double], _ format: String = "%.1f") -> String {
        "\(String(format: format, median(values))) (\(String(format: format, values.min() ?? 0))-\(String(format: format, values.max() ?? 0)))"
    }
    for (label, memory, workloads, wait, warmup, written) in scenarios {
        for condition in conditions {
            // The image, page tables and stacks hold data too: warm a little more than the guest wrote.
            let warm = condition == .warmed && written > 0 ? written + (64 << 20) : 0
            var ours: [MigrationReport] = []
            var theirs: [QEMUMigrationResult] = []
            for _ in 0..<runs {
                ours.append(try runDirtymigMigration(memory: memory, vcpus: workloads.count, workloads: workloads, downtime: 0.3,
                                                     waitForFinishedPasses: wait, warmupSeconds: warmup, warmBytes: warm).report)
                if qemu {
                    let result = try runQEMUMigration(memory: memory, workloads: workloads,
                                                      waitForFinishedPasses: wait, warmupSeconds: warmup, warmBytes: warm)
                    guard result.completed else { throw BenchError(result.error ?? "QEMU's migration failed") }
                    theirs.append(result)
                }
            }
            let name = conditions.count > 1 ? "\(label), memory \(condition.rawValue)" : label
            print("| \(name) | dirtymig | \(cell(ours.map { $0.totalSeconds * 1000 })) | \(cell(ours.map { $0.downtimeSeconds * 1000 })) | \(cell(ours.map { Double($0.iterations) }, "%.0f")) | \(cell(ours.map { Double($0.transferredBytes) / 1_048_576 })) | \(cell(ours.map(\.throughputMiBPerSecond), "%.0f")) |")
            if qemu {
                print("| | QEMU 7.2 | \(cell(theirs.map(\.totalMs))) | \(cell(theirs.map(\.downtimeMs))) | \(cell(theirs.map { Double($0.passes) }, "%.0f")) | \(cell(theirs.map { Double($0.transferredBytes) / 1_048_576 })) | \(cell(theirs.map(\.throughputMiBs), "%.0f")) |")
            }
        }
    }
    if withQEMU && !qemu { print("\n(QEMU rows skipped: qemu-system-x86_64 is not installed)") }
}
