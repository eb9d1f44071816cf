@testable import DirtyMigCore
import Foundation
import XCTest

/// Hybrid migration on real KVM, sender and receiver in this process over loopback TCP: a guest
/// that writes faster than the (capped) link carries switches to post-copy, runs on at the
/// destination while its pages arrive on demand and in the background, and its own check of its
/// memory finds nothing lost, stale or torn; the switch by hand and after N passes; a destination
/// that cannot serve demand faults refuses at the hello.
final class PostCopyMigrationTests: XCTestCase {
    private func check(_ pattern: AccessPattern, offset: UInt64, size: UInt64, rate: UInt64, seed: UInt64) -> VCPUWorkload {
        VCPUWorkload(kind: .check, pattern: pattern, offset: offset, size: size, rateBytesPerSecond: rate, seed: seed)
    }

    /// vCPU 0 rewrites 48 MiB at random at 200 MiB/s, vCPU 1 walks 16 MiB at 20 MiB/s.
    private func fastWriter(_ tracking: TrackingMode = .ring) -> MachineConfiguration {
        MachineConfiguration(memorySize: 256 * MiB, vcpuCount: 2,
                             workloads: [check(.random, offset: 0, size: 48 * MiB, rate: 200 * MiB, seed: 41),
                                         check(.sequential, offset: 64 * MiB, size: 16 * MiB, rate: 20 * MiB, seed: 42)],
                             tracking: tracking)
    }

    private struct Moved {
        var report: MigrationReport
        var destination: Result<Machine, MigrationError>
    }

    private func migrate(_ source: Machine, kvm: KVMSystem, options configure: (inout MigrationOptions) -> Void,
                         limits: MigrationReceiver.Limits = MigrationReceiver.Limits(),
                         during: (@Sendable (MigrationSender) -> Void)? = nil) throws -> Moved {
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, limits: limits)
        let outcome = LockedBox<Result<Machine, MigrationError>>()
        let thread = OSThread(name: "test-receive") {
            do throws(MigrationError) { outcome.set(.success(try receiver.receiveOne())) } catch { outcome.set(.failure(error)) }
        }
        var options = MigrationOptions(destination: HostPort(host: "127.0.0.1", port: receiver.port))
        options.verify = true
        configure(&options)
        let sender = MigrationSender(machine: source, options: options)
        let helper = during.map { body in OSThread(name: "test-during") { body(sender) } }
        let report = sender.run()
        helper?.join()
        // A refused hello is no outcome for the receiver: it would wait for the next migration.
        if !report.completed { receiver.stop() }
        thread.join()
        receiver.stop()
        return Moved(report: report, destination: outcome.get()!)
    }

    /// Waits until every vCPU made two more passes than at `passes`, failing on a guest failure.
    private func assertGuestChecksOut(_ machine: Machine, after passes: [UInt64], file: StaticString = #filePath, line: UInt = #line) {
        let deadline = MonotonicClock.seconds() + 30
        while machine.guestStats().vcpus.enumerated().contains(where: { $1.passes < passes[$0] + 2 }) && MonotonicClock.seconds() < deadline {
            if let failure = machine.events.firstFailure { return XCTFail("guest failed: \(failure)", file: file, line: line) }
            usleep(20_000)
        }
        let stats = machine.guestStats().vcpus
        XCTAssertTrue(stats.enumerated().allSatisfy { $1.passes >= passes[$0] + 2 }, "the guest ran on: \(stats.map(\.passes))", file: file, line: line)
        XCTAssertEqual(stats.map(\.errors), [0, 0], "the guest found no lost, stale or torn page", file: file, line: line)
    }

    private func describe(_ report: MigrationReport) -> String {
        let post = report.postcopy
        let figures = post?.destination
        return "total \(Int(report.totalSeconds * 1000)) ms, downtime \(Int(report.downtimeSeconds * 1000)) ms, \(report.iterations) passes; post-copy: \(post?.reason ?? "none"), lacking \(post?.lackingPages ?? 0), requested \(post?.requestedPages ?? 0), answered \(post?.answeredPages ?? 0), pushed \(post?.pushedPages ?? 0), \(Int((post?.seconds ?? 0) * 1000)) ms; faults \(figures?.faults ?? 0), latency p50 \(figures?.latencyP50Microseconds ?? 0) µs p99 \(figures?.latencyP99Microseconds ?? 0) µs max \(figures?.latencyMaxMicroseconds ?? 0) µs, blocked \(figures?.vcpuBlockedSeconds.map { Int($0 * 1000) } ?? []) ms"
    }

    func testAGuestThatOutrunsTheLinkMovesUnderPostCopy() throws {
        let kvm = try requireKVM()
        try requireUserfaultfd()
        let source = try Machine(fastWriter(), kvm: kvm)
        try source.start()
        defer { source.stop() }
        source.waitForGuest()
        Thread.sleep(forTimeInterval: 0.5)
        let moved = try migrate(source, kvm: kvm) { options in
            options.bandwidth = 40 << 20
            options.postcopy = PostCopyPolicy()
        }
        let report = moved.report
        print("post-copy: \(describe(report))")
        XCTAssertTrue(report.completed, "migration failed: \(report.error ?? "?")")
        XCTAssertEqual(report.verify, "passed", "the destination's memory at the end matched the source's at the switch")
        let post = try XCTUnwrap(report.postcopy, "a guest dirtying 200 MiB/s against 40 MiB/s switches")
        XCTAssertTrue(post.reason.contains("could not meet --downtime"), post.reason)
        XCTAssertEqual(post.answeredPages + post.pushedPages, post.lackingPages, "every lacking page sent exactly once")
        XCTAssertGreaterThan(post.lackingPages, 0)
        XCTAssertLessThan(report.downtimeSeconds, report.downtimeLimitSeconds, "the switch pauses for the state and the page list only")
        let figures = try XCTUnwrap(post.destination)
        XCTAssertEqual(figures.vcpuBlockedSeconds.count, 2)
        source.stop()
        let destination = try moved.destination.get()
        defer { destination.stop() }
        assertGuestChecksOut(destination, after: destination.guestStats().vcpus.map(\.passes))
    }

    func testTheSwitchByHandAndAfterNPasses() throws {
        let kvm = try requireKVM()
        try requireUserfaultfd()
        for (mode, byHand) in [(TrackingMode.bitmap, true), (.quota, false)] {
            // By hand: a guest that pre-copy alone would move. After a pass: one that pre-copy
            // would not move within --downtime after pass 1 (--postcopy-after switches only then).
            let configuration = MachineConfiguration(
                memorySize: 128 * MiB, vcpuCount: 2,
                workloads: [check(.random, offset: 0, size: 16 * MiB, rate: byHand ? 8 * MiB : 64 * MiB, seed: 51),
                            check(.sequential, offset: 32 * MiB, size: 8 * MiB, rate: 4 * MiB, seed: 52)],
                tracking: mode)
            let source = try Machine(configuration, kvm: kvm)
            try source.start()
            defer { source.stop() }
            source.waitForGuest()
            Thread.sleep(forTimeInterval: 0.3)
            var askByHand: (@Sendable (MigrationSender) -> Void)? = nil
            if byHand {
                askByHand = { sender in
                    Thread.sleep(forTimeInterval: 0.3)
                    let refusal = sender.startPostCopy()
                    XCTAssertNil(refusal)
                }
            }
            let moved = try migrate(source, kvm: kvm, options: { (options: inout MigrationOptions) in
                options.bandwidth = 16 << 20   // pass 1 takes about 1.5 s: time to ask
                options.postcopy = PostCopyPolicy(afterPasses: byHand ? nil : 1)
            }, during: askByHand)
            let report = moved.report
            print("\(mode) \(byHand ? "by hand" : "after 1 pass"): \(describe(report))")
            XCTAssertTrue(report.completed, "migration failed: \(report.error ?? "?")")
            XCTAssertEqual(report.verify, "passed")
            let post = try XCTUnwrap(report.postcopy)
            XCTAssertTrue(post.reason.contains(byHand ? "by hand" : "--postcopy-after"), post.reason)
            XCTAssertEqual(post.afterPasses, 1)
            XCTAssertEqual(post.answeredPages + post.pushedPages, post.lackingPages)
            source.stop()
            let destination = try moved.destination.get()
            defer { destination.stop() }
            assertGuestChecksOut(destination, after: destination.guestStats().vcpus.map(\.passes))
        }
    }

    func testADestinationWithoutUserfaultfdRefusesAtTheHello() throws {
        let kvm = try requireKVM()
        let source = try Machine(fastWriter(), kvm: kvm)
        try source.start()
        defer { source.stop() }
        source.waitForGuest()
        var limits = MigrationReceiver.Limits()
        limits.postcopyUnavailable = { "userfaultfd: Operation not permitted (simulated)" }
        let moved = try migrate(source, kvm: kvm, options: { $0.postcopy = PostCopyPolicy() }, limits: limits)
        XCTAssertFalse(moved.report.completed)
        XCTAssertTrue(moved.report.error?.contains("cannot serve post-copy: userfaultfd: Operation not permitted (simulated)") == true,
                      moved.report.error ?? "")
        XCTAssertNil(moved.report.postcopy)
        let before = source.guestStats().vcpus.map(\.pages)
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertTrue(zip(source.guestStats().vcpus.map(\.pages), before).allSatisfy { $0 > $1 }, "the VM runs on at the source")
        let plain = MigrationSender(machine: source, options: MigrationOptions(destination: HostPort(host: "127.0.0.1", port: 1)))
        XCTAssertEqual(plain.startPostCopy(), "this migration was started without --postcopy")
    }
}

/// A value set once by one thread and read by another.
final class LockedBox<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value?
    func set(_ newValue: Value) { lock.lock(); value = newValue; lock.unlock() }
    func get() -> Value? { lock.lock(); defer { lock.unlock() }; return value }
}
