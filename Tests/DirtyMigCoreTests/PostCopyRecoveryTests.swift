@testable import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// A post-copy whose link really breaks (every connection closed by the test's relay, new ones
/// refused while it is down) pauses on both sides and resumes when the link is back: by itself
/// within its recovery window, by hand after it. Real KVM guests, sender and receiver in this
/// process; the guest checks its own memory at the destination (no page lost, stale or torn),
/// and --verify compares the destination's memory with the source's.
final class PostCopyRecoveryTests: XCTestCase {
    /// vCPU 0 rewrites 96 MiB at random at 60 MiB/s; vCPU 1 walks 8 MiB slowly. Pass 1 at 48 MiB/s
    /// leaves most of vCPU 0's working set lacking at the switch, which its faults and a 2 MiB/s
    /// stream then fetch over a few seconds: time for the cuts.
    private func writer() -> MachineConfiguration {
        MachineConfiguration(memorySize: 256 * MiB, vcpuCount: 2,
                             workloads: [VCPUWorkload(kind: .check, pattern: .random, offset: 0, size: 96 * MiB,
                                                      rateBytesPerSecond: 60 * MiB, seed: 61),
                                         VCPUWorkload(kind: .check, pattern: .sequential, offset: 128 * MiB, size: 8 * MiB,
                                                      rateBytesPerSecond: 4 * MiB, seed: 62)],
                             tracking: .ring)
    }

    /// A running post-copy migration through a relay that serves every connection.
    private final class Run: @unchecked Sendable {
        let source: Machine
        let receiver: MigrationReceiver
        let relay: FaultRelay
        let sender: MigrationSender
        let destination = LockedBox<Machine>()
        let outcome = LockedBox<Result<Machine, MigrationError>>()
        let report = LockedBox<MigrationReport>()
        let log = Lines()
        private var threads: [OSThread] = []

        init(kvm: KVMSystem, configuration: MachineConfiguration, configure: (inout MigrationOptions) -> Void) throws {
            source = try Machine(configuration, kvm: kvm)
            try source.start()
            source.waitForGuest()
            Thread.sleep(forTimeInterval: 0.5)
            let destination = self.destination, log = self.log
            receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, log: { log.append($0) },
                                                    onRunning: { destination.set($0) })
            relay = try FaultRelay(to: receiver.port, servesMany: true)
            var options = MigrationOptions(destination: relay.endpoint)
            options.verify = true
            options.bandwidth = 48 << 20
            options.postcopy = PostCopyPolicy(afterPasses: 1)
            options.linkTimeoutSeconds = 5
            configure(&options)
            sender = MigrationSender(machine: source, options: options)
            let (receiver, outcome, sender, report) = (receiver, outcome, sender, report)
            threads.append(OSThread(name: "test-receive") {
                do throws(MigrationError) { outcome.set(.success(try receiver.receiveOne())) } catch { outcome.set(.failure(error)) }
            })
            threads.append(OSThread(name: "test-send") { report.set(sender.run()) })
        }

        var phase: String { sender.progress.phase }

        /// Waits for the migration's end; returns its report.
        func finish(timeout: Double = 120) throws -> MigrationReport {
            let deadline = MonotonicClock.seconds() + timeout
            while report.get() == nil && MonotonicClock.seconds() < deadline { usleep(20_000) }
            let done = try XCTUnwrap(report.get(), "the migration did not end within \(timeout) s (phase \(phase))")
            for thread in threads { thread.join() }
            receiver.stop()
            relay.stop()
            return done
        }
    }

    private func waitUntil(_ what: String, timeout: Double = 30, _ condition: () -> Bool) -> Bool {
        let deadline = MonotonicClock.seconds() + timeout
        while !condition() {
            if MonotonicClock.seconds() > deadline { XCTFail("timed out waiting for \(what)"); return false }
            usleep(2_000)
        }
        return true
    }

    /// The link goes down (every connection closed, new ones refused): both sides pause.
    private func cut(_ run: Run) -> Bool {
        run.relay.setDown(true)
        run.relay.cut()
        return waitUntil("both sides to pause") {
            run.phase == PostCopyLinkState.pausedStateName && run.source.postcopyLink.isPaused
                && run.destination.get()?.postcopyLink.isPaused == true
        }
    }

    /// The link comes back at once: how long the source took to resume post-copy over it.
    private func restore(_ run: Run, recoveries: Int) -> Double? {
        let back = MonotonicClock.nanoseconds()
        run.relay.setDown(false)
        guard waitUntil("post-copy to resume", { run.source.postcopyLink.recoveries >= recoveries }) else { return nil }
        _ = waitUntil("the destination to resume") { run.destination.get()?.postcopyLink.isPaused == false }
        return Double((run.source.postcopyLink.resumeTimes.last ?? back) - back) / 1e9
    }

    /// Checks the end: completed, verified, each lacking page sent once plus those sent again,
    /// and the guest runs on at the destination without finding a bad page.
    private func assertCompleted(_ run: Run, _ report: MigrationReport, recoveries: Int) throws {
        XCTAssertTrue(report.completed, "migration failed: \(report.error ?? "?")")
        XCTAssertEqual(report.verify, "passed", "the destination's memory matched the source's at the switch")
        let post = try XCTUnwrap(report.postcopy)
        XCTAssertEqual(post.recoveries, recoveries)
        XCTAssertGreaterThan(post.pausedSeconds, 0)
        XCTAssertEqual(post.answeredPages + post.pushedPages, post.lackingPages + post.resentPages,
                       "every lacking page sent once, and again only if it was in flight at a cut")
        XCTAssertLessThanOrEqual(post.resentPages, post.lackingPages * recoveries, "each resume sends each page again at most once")
        run.source.stop()
        let destination = try XCTUnwrap(try run.outcome.get()?.get())
        defer { destination.stop() }
        let passes = destination.guestStats().vcpus.map(\.passes)
        XCTAssertTrue(waitUntil("the destination's guest to check its memory twice more", timeout: 60) {
            destination.guestStats().vcpus.enumerated().allSatisfy { $1.passes >= passes[$0] + 2 } || destination.events.firstFailure != nil
        })
        XCTAssertNil(destination.events.firstFailure)
        XCTAssertEqual(destination.guestStats().vcpus.map(\.errors), [0, 0], "no page lost, stale or torn")
    }

    func testThreeCutsDuringPostCopyAreSurvivedWithoutAHuman() throws {
        let kvm = try requireKVM()
        try requireUserfaultfd()
        let run = try Run(kvm: kvm, configuration: writer()) { _ in }
        defer { run.source.stop() }
        guard waitUntil("post-copy", timeout: 60, { run.phase == "post-copy" || run.report.get() != nil }) else { return }
        // Slow the background stream, so that the cuts fall inside post-copy.
        run.sender.changeLimits(bandwidth: .some(2 << 20))
        var latencies: [Double] = []
        for cut in 1...3 {
            Thread.sleep(forTimeInterval: 0.25)
            XCTAssertEqual(run.phase, "post-copy", "cut \(cut) falls inside post-copy")
            guard self.cut(run) else { break }
            XCTAssertTrue(run.source.postcopyLink.json["state"]?.stringValue == "paused")
            if cut == 1 {
                // While paused: a resume hello naming another session is refused, over a
                // connection straight to the receiver.
                let refusal = try resumeHello(port: run.receiver.port, session: .random(), memorySize: run.source.configuration.memorySize)
                XCTAssertFalse(refusal.accepted)
                XCTAssertTrue(refusal.reason.contains("only the session that switched may resume it"), refusal.reason)
            }
            Thread.sleep(forTimeInterval: 1)   // the link stays down a second
            guard let latency = restore(run, recoveries: cut) else { break }
            latencies.append(latency)
        }
        run.sender.changeLimits(bandwidth: .some(nil))
        let report = try run.finish()
        let post = report.postcopy
        print("three cuts during post-copy: resumed \(latencies.map { String(format: "%.0f ms", $0 * 1000) }.joined(separator: ", ")) after the link came back; \(post?.recoveries ?? 0) recoveries, paused \(String(format: "%.2f", post?.pausedSeconds ?? 0)) s in all, \(post?.lackingPages ?? 0) pages lacking at the switch, \(post?.resentPages ?? 0) sent again; total \(String(format: "%.1f", report.totalSeconds)) s")
        XCTAssertEqual(latencies.count, 3)
        try assertCompleted(run, report, recoveries: 3)
        XCTAssertTrue(run.log.all.contains { $0.contains("post-copy paused") }, run.log.all.joined(separator: "\n"))
    }

    func testAfterTheWindowTheSourceKeepsItsPagesUntilResumedByHand() throws {
        let kvm = try requireKVM()
        try requireUserfaultfd()
        let run = try Run(kvm: kvm, configuration: writer()) { $0.postcopyRecoverSeconds = 0.5 }
        defer { run.source.stop() }
        guard waitUntil("post-copy", timeout: 60, { run.phase == "post-copy" || run.report.get() != nil }) else { return }
        run.sender.changeLimits(bandwidth: .some(2 << 20))
        XCTAssertEqual(run.sender.resumePostCopy(), "post-copy is not paused: its link is up")
        Thread.sleep(forTimeInterval: 0.2)
        guard cut(run) else { return }
        XCTAssertTrue(waitUntil("the automatic window to close") { run.sender.postcopyReconnect.windowClosed })
        // The link is back, but nothing tries it any more: the source stays paused, holding its pages.
        run.relay.setDown(false)
        let attempts = run.sender.postcopyReconnect.attempts
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertEqual(run.sender.postcopyReconnect.attempts, attempts, "no attempt after the window")
        XCTAssertEqual(run.phase, PostCopyLinkState.pausedStateName)
        XCTAssertTrue(run.source.postcopyLink.pause?.reason.contains("--postcopy-recover-for") == true,
                      run.source.postcopyLink.pause?.reason ?? "not paused")
        XCTAssertEqual(run.source.postcopyLink.recoveries, 0)
        // By hand, at another address: straight to the receiver.
        XCTAssertNil(run.sender.resumePostCopy(to: HostPort(host: "127.0.0.1", port: run.receiver.port)))
        XCTAssertTrue(waitUntil("the by-hand resume") { run.source.postcopyLink.recoveries == 1 })
        run.sender.changeLimits(bandwidth: .some(nil))
        let report = try run.finish()
        try assertCompleted(run, report, recoveries: 1)
    }

    /// A resume hello (flag resume, session `session`) over a bare connection, and the reply.
    private func resumeHello(port: UInt16, session: SessionID, memorySize: UInt64) throws -> MigrationHelloReply {
        let tsc = ((try? HostTSC.frequency(kvm: KVMSystem())) ?? 2_000_000_000) / 1000
        let config = GuestConfig(tscHz: tsc * 1000, memorySize: memorySize, vcpus: [VCPUWorkload(kind: .idle, seed: 0)])
        var hello = MigrationHello(name: "t", memorySize: memorySize, vcpuCount: 1, tracking: .bitmap, ringEntries: 4096,
                                   tscKHz: tsc, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: config.encode())
        hello.postcopy = true
        hello.resume = true
        hello.session = session
        hello.joins = SessionJoins(pages: 0, faults: 1)
        let socket = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))
        defer { socket.shutdown() }
        socket.setTimeouts(send: 5, receive: 5)
        let channel = MigrationChannel(transport: socket)
        try channel.send(.hello, hello.encode())
        return try channel.receive(.helloReply, MigrationHelloReply.init(decoding:))
    }

    func testAResumeHelloIsRefusedWhereNoPostCopyIsHeld() throws {
        let kvm = try requireKVM()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm)
        defer { receiver.stop() }
        let serving = OSThread(name: "test-receive") { _ = try? receiver.receiveOne() }
        defer { receiver.stop(); serving.join() }
        let reply = try resumeHello(port: receiver.port, session: .random(), memorySize: 64 << 20)
        XCTAssertFalse(reply.accepted)
        XCTAssertTrue(reply.reason.contains("no post-copy is paused here to resume"), reply.reason)
        XCTAssertNil(receiver.activePeer, "a refused resume takes no slot")
    }
}
