@testable import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// Continuous replication on real KVM, primary and standby in this process over loopback TCP,
/// with a relay between them that stalls, cuts or tears the link on cue.
final class ReplicationTests: XCTestCase {
    private func primary(_ kvm: KVMSystem, tracking: TrackingMode = .ring,
                         workloads: [VCPUWorkload] = [writer(32 * MiB, rate: 20 * MiB, pattern: .random),
                                                      reader(32 * MiB, offset: 32 * MiB)]) throws -> Machine {
        let machine = try Machine(MachineConfiguration(memorySize: 128 * MiB, vcpuCount: workloads.count,
                                                       workloads: workloads, tracking: tracking), kvm: kvm)
        try machine.start()
        machine.waitForGuest()
        return machine
    }

    /// A standby receiving on its own thread; `outcome` is what its receiveOne returned.
    final class Standby: @unchecked Sendable {
        let receiver: MigrationReceiver
        private let lock = NSLock()
        private var outcomes: [Result<Machine, MigrationError>] = []
        private let arrived = DispatchSemaphore(value: 0)

        init(_ kvm: KVMSystem, options: StandbyOptions) throws {
            receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, standby: options)
            _ = OSThread(name: "test-standby") { [self] in
                while true {
                    let outcome: Result<Machine, MigrationError>
                    do throws(MigrationError) { outcome = .success(try receiver.receiveOne()) } catch {
                        if case .receiverStopped = error { return }
                        outcome = .failure(error)
                    }
                    lock.lock(); outcomes.append(outcome); lock.unlock()
                    arrived.signal()
                    if case .success = outcome { return }
                }
            }
        }

        /// The next outcome within `timeout` seconds.
        func next(timeout: Double) -> Result<Machine, MigrationError>? {
            guard arrived.wait(timeout: .now() + timeout) == .success else { return nil }
            lock.lock(); defer { lock.unlock() }
            return outcomes.removeFirst()
        }

        deinit { receiver.stop() }
    }

    private func replicate(_ machine: Machine, to endpoint: HostPort, interval: Double = 0.025,
                           pages: Int? = nil) throws -> Replicator {
        var options = ReplicationOptions(standby: endpoint)
        options.intervalSeconds = interval
        options.checkpointPages = pages
        // These tests end with the standby gone: no seeking it again after the test.
        options.reprotectForSeconds = 0
        XCTAssertNil(machine.transferClaim.claim("replication"))
        let replicator = Replicator(machine: machine, options: options)
        let figures = replicator.start()
        XCTAssertEqual(figures.status, .protected, "replication did not start: \(figures.error ?? "?")")
        return replicator
    }

    /// A standby (auto failover after 0.3 s) behind a relay, protecting `source`.
    private func protectThroughRelay(_ source: Machine, _ kvm: KVMSystem) throws -> (Standby, FaultRelay, Replicator) {
        let standby = try Standby(kvm, options: StandbyOptions(failover: .auto, failoverAfterSeconds: 0.3))
        let relay = try FaultRelay(to: standby.receiver.port)
        return (standby, relay, try replicate(source, to: relay.endpoint))
    }

    private func assertRunning(_ machine: Machine, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let before = machine.guestStats().vcpus.map(\.pages)
        Thread.sleep(forTimeInterval: 0.4)
        let after = machine.guestStats().vcpus.map(\.pages)
        XCTAssertNil(machine.events.firstFailure, file: file, line: line)
        XCTAssertGreaterThan(after[0], before[0], "\(what): the writer must keep running", file: file, line: line)
    }

    private func waitForStatus(_ replicator: Replicator, _ status: ReplicationFigures.Status, timeout: Double) -> Bool {
        let deadline = MonotonicClock.seconds() + timeout
        while MonotonicClock.seconds() < deadline {
            if replicator.figures.status == status { return true }
            usleep(10_000)
        }
        return false
    }

    func testCheckpointsFlowAndTheStandbyTakesOverWhenACheckpointIsTorn() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let (standby, relay, replicator) = try protectThroughRelay(source, kvm)
        Thread.sleep(forTimeInterval: 1.0)
        let figures = replicator.figures
        print("replication: \(figures.checkpointsAcknowledged) checkpoints, \(Int(figures.checkpointsPerSecond))/s, pause median \(figures.pauseMedianMs) ms p99 \(figures.pauseP99Ms) ms, dirty pages median \(figures.dirtyPagesMedian)")
        XCTAssertGreaterThan(figures.checkpointsAcknowledged, 10, "about 40 checkpoints a second")
        XCTAssertGreaterThan(figures.dirtyPagesMedian, 0, "the writer dirties pages in every epoch")
        XCTAssertEqual(standby.receiver.standbySession?.json["phase"]?.stringValue, "protecting")

        // Half a checkpoint reaches the standby, then the link is cut: it must resume the VM from
        // the checkpoint before, and the primary runs on, unprotected.
        relay.tearNext(frameType: MigrationFrameType.checkpointPages.rawValue, then: .cut)
        let cutAt = MonotonicClock.seconds()
        guard case .success(let taken)? = standby.next(timeout: 5) else { return XCTFail("the standby did not take over") }
        defer { taken.stop() }
        print("standby took over \(Int((MonotonicClock.seconds() - cutAt) * 1000)) ms after the cut")
        assertRunning(taken, "the standby's VM")
        XCTAssertTrue(waitForStatus(replicator, .unprotected, timeout: 5), "the primary must notice")
        assertRunning(source, "the primary's VM")
        XCTAssertNotNil(replicator.figures.error)
    }

    /// A checkpoint whose pages and digest are fine but whose state could never be resumed here
    /// (saved for another RAM size) must be refused before it is applied or acknowledged: the
    /// standby keeps the checkpoint before it, tells the primary, and takes over only on request.
    func testACheckpointWhoseStateCannotBeResumedIsRefusedBeforeItIsApplied() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let standby = try Standby(kvm, options: StandbyOptions(failover: .auto, failoverAfterSeconds: 5))
        let socket = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: standby.receiver.port), timeout: 5)
        defer { socket.shutdown() }
        socket.setTimeouts(send: 5, receive: 5)
        let channel = MigrationChannel(transport: socket)
        var hello = MigrationHello(announcing: source)
        hello.replicate = true
        try channel.send(.hello, hello.encode())
        XCTAssertTrue(try channel.receive(.helloReply, MigrationHelloReply.init(decoding:)).accepted)

        /// One checkpoint of a few pages with `state`, as the primary's own code sends it.
        func sendCheckpoint(epoch: UInt64, state: MachineState) throws {
            let staged = StagedCheckpoint()
            staged.begin()
            source.pause()
            staged.stage([0, 1, 2, 3], from: source.memory, paused: true)
            source.resume()
            staged.setState(state.encode())
            staged.setEpoch(epoch)
            XCTAssertNotNil(try staged.send(over: channel))
        }
        source.pause()
        let saved = Result { try source.saveState() }
        source.resume()
        let good = try saved.get()
        try sendCheckpoint(epoch: 1, state: good)
        let ack = try channel.receive(.checkpointAck) { payload throws(MigrationProtocolError) in try EpochFrame(decoding: payload, what: "ack") }
        XCTAssertEqual(ack.epoch, 1)

        var foreign = good
        foreign.memorySize *= 2
        try sendCheckpoint(epoch: 2, state: foreign)
        let (type, payload) = try channel.receive([.checkpointAck, .abort])
        XCTAssertEqual(type, .abort, "a checkpoint whose state does not fit this VM was acknowledged")
        let reason = MigrationChannel.abortReason(payload)
        XCTAssertTrue(reason.contains("keeps checkpoint 1"), reason)
        let session = try XCTUnwrap(standby.receiver.standbySession)
        XCTAssertEqual(session.json["committed_epoch"]?.doubleValue, 1)
        // The primary lives (it sent something we refused): no takeover unless asked.
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertEqual(session.json["phase"]?.stringValue, "primary lost, awaiting failover")
    }

    /// Pages are copied into the staging buffer while the epoch runs, and the guest may write
    /// them again before the pause: the checkpoint must still be exactly the guest's memory at
    /// the pause. Two check workloads verify their own memory: one rewrites a 2 MiB working set
    /// about twice per epoch (its pages are staged again and again), one sweeps 32 MiB (most pages are
    /// staged early and not written again). After a failover both run on the standby's copy
    /// and find nothing stale, torn or lost.
    func testPagesStagedWhileTheEpochRunsStillMakeAnExactCheckpoint() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm, workloads: [
            VCPUWorkload(kind: .check, pattern: .random, offset: 0, size: 2 * MiB, rateBytesPerSecond: 160 * MiB, seed: 7),
            VCPUWorkload(kind: .check, pattern: .sequential, offset: 16 * MiB, size: 32 * MiB, rateBytesPerSecond: 80 * MiB, seed: 9)])
        defer { source.stop() }
        let (standby, relay, replicator) = try protectThroughRelay(source, kvm)
        Thread.sleep(forTimeInterval: 1.5)
        let figures = replicator.figures
        print("replication: \(figures.checkpointsAcknowledged) checkpoints, pause median \(figures.pauseMedianMs) ms, dirty pages median \(figures.dirtyPagesMedian), copied in the pause median \(figures.pagesCopiedPausedMedian)")
        XCTAssertGreaterThan(figures.dirtyPagesMedian, 500)
        XCTAssertLessThan(figures.pagesCopiedPausedMedian, figures.dirtyPagesMedian, "pages must be staged while the epoch runs")

        relay.cut()
        guard case .success(let taken)? = standby.next(timeout: 5) else { return XCTFail("the standby did not take over") }
        defer { taken.stop() }
        let passes = taken.guestStats().vcpus.map(\.passes)
        let deadline = MonotonicClock.seconds() + 20
        while MonotonicClock.seconds() < deadline, zip(taken.guestStats().vcpus.map(\.passes), passes).contains(where: { $0 < $1 + 3 }) {
            usleep(20_000)
        }
        let after = taken.guestStats().vcpus
        print("after the failover: passes \(passes) -> \(after.map(\.passes)), errors \(after.map(\.errors))")
        for (vcpu, stats) in after.enumerated() {
            XCTAssertGreaterThanOrEqual(stats.passes, passes[vcpu] + 3, "vCPU \(vcpu) must run on the standby")
            XCTAssertEqual(stats.errors, 0, "vCPU \(vcpu) found pages of its memory stale, torn or lost")
        }
        XCTAssertEqual(source.guestStats().vcpus.map(\.errors), [0, 0])
    }

    func testAStalledLinkMakesAnAutoStandbyTakeOverAndThePrimaryUnprotected() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let standby = try Standby(kvm, options: StandbyOptions(failover: .auto, failoverAfterSeconds: 0.2))
        let relay = try FaultRelay(to: standby.receiver.port)
        let replicator = try replicate(source, to: relay.endpoint)
        Thread.sleep(forTimeInterval: 0.5)
        relay.stall()
        let stalledAt = MonotonicClock.seconds()
        guard case .success(let taken)? = standby.next(timeout: 5) else { return XCTFail("the standby did not take over") }
        defer { taken.stop() }
        let waited = MonotonicClock.seconds() - stalledAt
        print("stall: the standby took over after \(Int(waited * 1000)) ms (--failover-after 200 ms)")
        // Unanswered, the primary took few checkpoints after the one in flight (the relay's
        // buffers would have taken a dozen 25 ms epochs by now): epochs wait for answers.
        XCTAssertLessThanOrEqual(replicator.figures.lagCheckpoints, Replicator.maxUnanswered, "checkpoints queued behind unanswered ones")
        XCTAssertGreaterThanOrEqual(waited, 0.15, "not before --failover-after")
        assertRunning(taken, "the standby's VM")
        XCTAssertTrue(waitForStatus(replicator, .unprotected, timeout: 5))
        assertRunning(source, "the primary's VM")
        relay.cut()
    }

    func testAManualStandbyWaitsForFailover() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let standby = try Standby(kvm, options: StandbyOptions(failover: .manual, failoverAfterSeconds: 0.2))
        let relay = try FaultRelay(to: standby.receiver.port)
        _ = try replicate(source, to: relay.endpoint)
        Thread.sleep(forTimeInterval: 0.3)
        relay.stall()
        XCTAssertNil(standby.next(timeout: 1.0), "a manual standby must not take over by itself")
        let session = try XCTUnwrap(standby.receiver.standbySession)
        XCTAssertEqual(session.json["phase"]?.stringValue, "primary lost, awaiting failover")
        // Silent past --failover-after: no --force needed.
        XCTAssertNoThrow(try session.requestFailover(force: false))
        guard case .success(let taken)? = standby.next(timeout: 5) else { return XCTFail("failover did not resume the VM") }
        defer { taken.stop() }
        assertRunning(taken, "the standby's VM after failover")
        relay.cut()
    }

    func testAStoppedReplicationIsDiscardedAndTheStandbyCanBeUsedAgain() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        // A stop, not a loss, is under test: a primary stalled by a busy machine must not look lost.
        let standby = try Standby(kvm, options: StandbyOptions(failoverAfterSeconds: 5))
        let endpoint = HostPort(host: "127.0.0.1", port: standby.receiver.port)
        let first = try replicate(source, to: endpoint)
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertEqual(first.stop().status, .stopped)
        guard case .failure(let error)? = standby.next(timeout: 5) else { return XCTFail("the standby must discard its copy") }
        XCTAssertTrue("\(error)".contains("stopped replicating"), "\(error)")
        // The VM never stopped; a new replication (to the same standby) protects it again.
        assertRunning(source, "the primary's VM")
        let second = try replicate(source, to: endpoint)
        let deadline = MonotonicClock.seconds() + 5
        while second.figures.checkpointsAcknowledged <= 3 && MonotonicClock.seconds() < deadline { usleep(20_000) }
        XCTAssertGreaterThan(second.figures.checkpointsAcknowledged, 3, "checkpoints must flow again")
        second.stop()
    }

    func testTheDirtyTriggerEndsEpochsEarly() throws {
        let kvm = try requireKVM()
        let source = try primary(kvm)
        defer { source.stop() }
        let standby = try Standby(kvm, options: StandbyOptions(failoverAfterSeconds: 5))
        // One-second epochs: the 20 MiB/s writer dirties ~5,000 pages in one; the trigger ends
        // each at 300.
        let replicator = try replicate(source, to: HostPort(host: "127.0.0.1", port: standby.receiver.port),
                                       interval: 1, pages: 300)
        Thread.sleep(forTimeInterval: 1.5)
        let figures = replicator.figures
        print("trigger: \(figures.checkpointsAcknowledged) checkpoints, dirty pages median \(figures.dirtyPagesMedian), max \(figures.dirtyPagesMax)")
        XCTAssertGreaterThan(figures.checkpointsAcknowledged, 5)
        XCTAssertLessThan(figures.dirtyPagesMedian, 1500)
        replicator.stop()
    }

    func testTheRingHandsOverDirtyPagesAsADenseList() throws {
        let kvm = try requireKVM()
        for tracking in [TrackingMode.ring, .bitmap] {
            let machine = try primary(kvm, tracking: tracking)
            defer { machine.stop() }
            let tracker = try XCTUnwrap(machine.tracker)
            _ = try tracker.collectList()
            Thread.sleep(forTimeInterval: 0.2)
            let list = try tracker.collectList()
            XCTAssertGreaterThan(list.pages.count, 100, "\(tracking)")
            XCTAssertEqual(Set(list.pages).count, list.pages.count, "\(tracking): each page once")
            let writerFirst = UInt32(GuestLayout.workloadBase / 4096), writerEnd = writerFirst + UInt32(32 * MiB / 4096)
            // Beyond the writer's set only its stats page and the reader's: nothing else writes.
            XCTAssertGreaterThan(list.pages.filter { $0 >= writerFirst && $0 < writerEnd }.count, list.pages.count - 8, "\(tracking)")
            // A collection hands pages over once: the bitmap form does not see them again.
            let next = try tracker.collect()
            XCTAssertLessThan(next.pages.count, list.pages.count * 2, "\(tracking)")
        }
    }
}
