import DirtyMigCore
import Foundation
import XCTest

/// The issue's convergence check: a 1 GiB, 2-vCPU VM whose vCPU 0 writes 512 MiB at random as
/// fast as it can and whose vCPU 1 reads 256 MiB, migrated with --bandwidth 100M --downtime 300ms.
/// Without a throttle it cannot converge and fails at --timeout with the source running; with
/// cpu, dirty-limit or dirty-quota it completes, verified, within the downtime, and under the
/// dirty limit and the dirty quota the reader keeps at least 80 % of its pace. The cpu case
/// (QEMU's auto-converge, step by step to 99 %) takes about 100 s: it is the baseline.
final class ThrottleMigrationTests: XCTestCase {
    /// Default 4,096-entry rings: an unpaced writer fills one in about 9 ms here, so in a process
    /// that also sends and receives 100 MiB/s on 2 cores it meets ring-full exits, which must
    /// cost it nothing but time.
    private func configuration(_ tracking: TrackingMode, writerRate: UInt64 = 0) -> MachineConfiguration {
        MachineConfiguration(memorySize: 1 * GiB, vcpuCount: 2,
                             workloads: [writer(512 * MiB, rate: writerRate, pattern: .random), reader(256 * MiB, offset: 512 * MiB)],
                             tracking: tracking, ringEntries: 4096)
    }

    private func options(_ arrival: Arrival, throttle: ThrottleMode, timeout: Double) -> MigrationOptions {
        var options = MigrationOptions(destination: arrival.endpoint)
        options.bandwidth = 100 * MiB
        options.downtimeSeconds = 0.3
        options.timeoutSeconds = timeout
        options.verify = true
        options.throttle = throttle
        return options
    }

    private func boot(_ tracking: TrackingMode, kvm: KVMSystem, writerRate: UInt64 = 0) throws -> Machine {
        let machine = try Machine(configuration(tracking, writerRate: writerRate), kvm: kvm)
        try machine.start()
        machine.waitForGuest()
        Thread.sleep(forTimeInterval: 1)   // the writer's first pass populates its working set
        return machine
    }

    private func describe(_ report: MigrationReport) -> String {
        let ratios = zip(report.guestPagesPerSecondDuring, report.guestPagesPerSecondBefore).map { String(format: "%.2f", $0 / max($1, 1)) }
        return "\(report.throttle.mode.rawValue): \(report.completed ? "completed" : "failed (\(report.error ?? "?"))") in \(Int(report.totalSeconds * 1000)) ms, downtime \(Int(report.downtimeSeconds * 1000)) ms, \(report.iterations) passes, \(report.ringOverruns) ring overruns, throttle from \(report.throttle.startedSeconds.map { String(format: "%.1f s", $0) } ?? "-"), final \(report.throttle.final?.json.serialized() ?? "-"); during/before per vCPU \(ratios); verify \(Int(report.verifySeconds * 1000)) ms (estimated \(Int(report.verifyEstimateSeconds * 1000))); last passes \(report.passes.suffix(2).map { "\($0.bytesSent >> 10) KiB, expected \(Int($0.expectedDowntimeSeconds * 1000)) ms" })"
    }

    /// Migrates `source` to a new receiver, verified; prints the report. `whileTheDestinationRuns`
    /// sees the destination VM before it is stopped.
    private func migrate(_ source: Machine, kvm: KVMSystem, throttle: ThrottleMode, timeout: Double,
                         whileTheDestinationRuns: (Machine) -> Void = { _ in }) throws -> MigrationReport {
        let arrival = try Arrival(kvm)
        let report = MigrationSender(machine: source, options: options(arrival, throttle: throttle, timeout: timeout)).run()
        if report.completed { source.stop() }
        if let destination = try? arrival.wait().get() {
            whileTheDestinationRuns(destination)
            destination.stop()
        }
        print(describe(report))
        XCTAssertTrue(report.completed, report.error ?? "")
        XCTAssertEqual(report.verify, "passed")
        return report
    }

    /// The reading vCPU's pages/s in `count` consecutive 0.5 s windows.
    private func readerWindows(_ machine: Machine, count: Int) -> [Double] {
        (0..<count).map { _ in
            let first = machine.guestStats().vcpus[1].pages
            let start = MonotonicClock.nanoseconds()
            Thread.sleep(forTimeInterval: 0.5)
            let elapsed = Double(MonotonicClock.nanoseconds() - start) / 1e9
            return Double(machine.guestStats().vcpus[1].pages &- first) / elapsed
        }
    }

    /// Whether the throttle leaves the reader alone is judged three ways:
    /// - its counters: it held the writer, and the reader hardly ever;
    /// - the reader's thread had the CPU it asked for: of the time it was runnable during the
    ///   migration, at least 80 % on a CPU (`/proc/self/task/TID/schedstat`: time on a CPU, time
    ///   waiting for one). The sender, the receiver and the harvester share the 2 cores with it;
    ///   a CPU throttle would take its time away in holds, which this does not count but the
    ///   first check does;
    /// - its pace in guest pages/s during the migration, against its pace on both sides of it
    ///   (2 s on the source before, 2 s on the destination after: the same guest, its writer
    ///   unthrottled again), at least half of it. On this PVM host the reader's pace moves by
    ///   itself in spells of seconds between about 20 and 40 million pages/s, with nothing of ours
    ///   changing, and the migration's 10 s and the 4 s around it can fall in different spells:
    ///   the ratio came out 0.81-1.26 in six runs in a row here and 0.67 in one fresh-clone CI
    ///   run. So one run cannot resolve the issue's 80 %: that figure is the benchmark's
    ///   (`dirtymig-bench throttle`, medians of runs). Half catches a reader that is stopped or
    ///   starved. A throttle that holds every vCPU shows in the first check rather than here:
    ///   under auto-converge the reader kept 0.40-0.62 of its pace in four runs.
    private func checkCompletes(_ throttle: ThrottleMode, tracking: TrackingMode, readerMustKeepPace: Bool) throws {
        let kvm = try requireKVM()
        let otherMachines = ThreadSchedule.threads(named: "vcpu-1")
        let source = try boot(tracking, kvm: kvm)
        defer { source.stop() }
        let newThreads = ThreadSchedule.threads(named: "vcpu-1").subtracting(otherMachines)
        XCTAssertEqual(newThreads.count, 1, "the source's reading vCPU thread")
        let readerThread = try XCTUnwrap(newThreads.first)
        let before = readerWindows(source, count: 4)
        let sampler = ThreadSchedule.Sampler(thread: readerThread)
        var after: [Double] = []
        let report = try migrate(source, kvm: kvm, throttle: throttle, timeout: 150) { destination in
            Thread.sleep(forTimeInterval: 0.5)   // the destination's first touches of the reader's pages
            after = readerWindows(destination, count: 4)
        }
        let readerSchedule = sampler.stop()
        XCTAssertLessThanOrEqual(report.downtimeSeconds, 0.3)
        XCTAssertEqual(report.throttle.mode, throttle)
        XCTAssertNotNil(report.throttle.startedSeconds, "the guest outruns the link: the throttle must start")
        if throttle != .cpu {
            // Judged every second from the per-vCPU counts: the writer outruns the link from the
            // start, so the throttle starts within the first pass (5 s here), not after it.
            XCTAssertEqual(report.throttle.startedInPass, 1)
            // The reader dirties only its stats record, so its ceiling can still hold it now and
            // then (one fresh-clone run: once, against the writer's thousands).
            let holds = source.throttleStatus()
            print("throttle holds: writer \(holds[0].exits), reader \(holds[1].exits)")
            XCTAssertGreaterThan(holds[0].exits, 0, "the writer was held")
            XCTAssertLessThanOrEqual(holds[1].exits * 100, holds[0].exits, "the reader is held at most once per hundred holds of the writer")
        }
        XCTAssertTrue(report.passes.contains { $0.throttle?.active == true }, "the stats lines carry the throttle")
        let windows = (before + after).sorted()
        let yardstick = (windows[windows.count / 2 - 1] + windows[windows.count / 2]) / 2
        let reader = report.guestPagesPerSecondDuring[1] / yardstick
        let millions = { (values: [Double]) in values.map { String(format: "%.0f", $0 / 1e6) }.joined(separator: " ") }
        print("reader M pages/s: before \(millions(before)); during \(millions([report.guestPagesPerSecondDuring[1]])); after \(millions(after)); during / median of before and after \(String(format: "%.2f", reader)); its thread on a CPU \(String(format: "%.2f", readerSchedule.onCPUSeconds)) s, waiting for one \(String(format: "%.2f", readerSchedule.waitingSeconds)) s")
        if readerMustKeepPace {
            XCTAssertGreaterThanOrEqual(readerSchedule.onCPUShare, 0.8, "the reading vCPU's thread has a CPU when it wants one")
            XCTAssertGreaterThanOrEqual(reader, 0.5, "the reading vCPU keeps its pace")
        }
    }

    func testDirtyLimitConverges() throws { try checkCompletes(.dirtyLimit, tracking: .ring, readerMustKeepPace: true) }
    func testDirtyQuotaConverges() throws { try checkCompletes(.dirtyQuota, tracking: .quota, readerMustKeepPace: true) }
    func testCPUThrottleConverges() throws { try checkCompletes(.cpu, tracking: .bitmap, readerMustKeepPace: false) }

    func testNoThrottleFailsAtTheTimeoutAndTheSourceRunsOn() throws {
        let kvm = try requireKVM()
        let source = try boot(.ring, kvm: kvm)
        defer { source.stop() }
        let arrival = try Arrival(kvm)
        let report = MigrationSender(machine: source, options: options(arrival, throttle: .none, timeout: 20)).run()
        _ = arrival.wait()
        print(describe(report))
        XCTAssertFalse(report.completed)
        XCTAssertTrue(report.error?.contains("--timeout") == true, report.error ?? "")
        XCTAssertLessThan(report.totalSeconds, 25)
        XCTAssertNil(report.throttle.startedSeconds)
        let before = source.guestStats().vcpus.map(\.pages)
        Thread.sleep(forTimeInterval: 0.5)
        let after = source.guestStats().vcpus.map(\.pages)
        XCTAssertNil(source.events.firstFailure)
        XCTAssertGreaterThan(after[0], before[0] + 10_000, "the source's writer runs on at full speed")
        XCTAssertGreaterThan(after[1], before[1], "the source's reader runs on")
    }

    /// A migration that fails after its throttle started leaves no throttle behind. The writer is
    /// paced at 200 MiB/s here (still twice the link) so that its full speed afterwards is a
    /// clear figure.
    func testTheThrottleIsRemovedWhenTheMigrationFails() throws {
        let kvm = try requireKVM()
        let source = try boot(.ring, kvm: kvm, writerRate: 200 * MiB)
        defer { source.stop() }
        let arrival = try Arrival(kvm)
        var options = options(arrival, throttle: .dirtyLimit, timeout: 60)
        options.maxIterations = 2
        let report = MigrationSender(machine: source, options: options).run()
        _ = arrival.wait()
        print(describe(report))
        XCTAssertFalse(report.completed)
        XCTAssertNotNil(report.throttle.startedSeconds)
        XCTAssertEqual(report.throttle.final?.active, true)
        let status = source.throttleStatus()
        XCTAssertEqual(status.map(\.migrationLimitBytesPerSecond), [nil, nil], "no ceiling left")
        let start = try source.counterSnapshot()
        Thread.sleep(forTimeInterval: 0.5)
        let end = try source.counterSnapshot()
        let writer = DirtyRateReport.between(start, end, mode: .ring).vcpus[0].dirtyPagesPerSecond ?? 0
        let counters = try XCTUnwrap(source.tracker?.counters())
        print("after: writer \(writer) pages/s; ring-full exits \(counters.ringFullExits ?? []), overruns \(counters.ringOverruns ?? []), holds until \(source.throttleStatus().map { ($0.heldFraction, $0.exits, $0.lastHoldSeconds) }), guest \(source.guestStats().vcpus.map { ($0.pages, $0.state) }), passes \(report.passes.map { ($0.pagesDirtied, $0.trackingLost) })")
        XCTAssertGreaterThan(writer * 4096, 180 * Double(MiB), "the writer is back at its pace (\(writer) pages/s)")
    }

    /// Seed 000's skewed case: one hot writer and three light ones; the hot vCPU gets what the
    /// light ones leave through the common pool, and the migration completes.
    func testDirtyQuotaWithThePoolCompletesASkewedWorkload() throws {
        let kvm = try requireKVM()
        let source = try Machine(MachineConfiguration(
            memorySize: 512 * MiB, vcpuCount: 4,
            workloads: [writer(256 * MiB, rate: 0, pattern: .random),
                        writer(16 * MiB, rate: 2 * MiB, offset: 256 * MiB), writer(16 * MiB, rate: 2 * MiB, offset: 272 * MiB),
                        writer(16 * MiB, rate: 2 * MiB, offset: 288 * MiB)],
            tracking: .quota), kvm: kvm)
        try source.start()
        defer { source.stop() }
        source.waitForGuest()
        Thread.sleep(forTimeInterval: 1)
        let report = try migrate(source, kvm: kvm, throttle: .dirtyQuota, timeout: 90)
        let pool = try XCTUnwrap(report.throttle.final?.pagesFromPool)
        XCTAssertGreaterThan(pool[0], 0, "the hot vCPU drew on the pool")
    }
}
