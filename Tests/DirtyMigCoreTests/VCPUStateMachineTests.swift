import CKVM
@testable import DirtyMigCore
import Foundation
import XCTest

/// Bytes an exit carries. Never freed: a scripted exit's data points into them, however long
/// the fake keeps it (a test allocates a few bytes).
final class ExitBytes: @unchecked Sendable {
    let buffer: UnsafeMutableRawBufferPointer
    let data: IOData

    init(_ bytes: [UInt8], elementSize: Int = 1) {
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
        buffer.copyBytes(from: bytes)
        data = IOData(bytes: buffer, elementSize: elementSize)
    }

    var bytes: [UInt8] { Array(buffer) }
}

/// Where a test keeps a reply posted from the vCPU thread.
final class ReplyBox: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: VCPUReply?
    func set(_ reply: VCPUReply) { lock.lock(); stored = reply; lock.unlock() }
    var reply: VCPUReply? { lock.lock(); defer { lock.unlock() }; return stored }
}

/// The vCPU thread's state machine, driven by events, on a fake vCPU: who enters the guest when,
/// what each event is answered, that a pause completes the pending exit before it answers, that
/// a parked vCPU is never entered again and counts as paused, that a hold ends at an event.
final class VCPUStateMachineTests: XCTestCase {
    /// The workload guest's park port, on a device of its own: parking is the device's request.
    private final class ParkPort: BusDevice {
        func read(_ access: DeviceAccess, into data: IOData) -> DeviceRequest { .none }
        func write(_ access: DeviceAccess, _ data: IOData) -> DeviceRequest { .parkVCPU }
    }

    private func runner(_ vcpu: FakeVCPU, holds: VCPUHolds = VCPUHolds(vcpuCount: 1),
                        events: MachineEvents = MachineEvents()) -> VCPURunner<FakeVCPU> {
        var bus = DeviceBus()
        try! bus.register(ParkPort(), ports: GuestLayout.parkPort...GuestLayout.parkPort)
        return VCPURunner(vcpu: vcpu, tracker: nil, ring: nil, holds: holds, events: events, bus: bus)
    }

    private func saved(_ response: VCPUResponse, file: StaticString = #filePath, line: UInt = #line) -> VCPUState? {
        guard case .saved(let state) = response else { XCTFail("expected .saved, got \(response)", file: file, line: line); return nil }
        return state
    }

    private func expect(_ response: VCPUResponse, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual("\(response)", expected, file: file, line: line)
    }

    func testAThreadBeginsPausedAndEntersTheGuestOnlyWhenResumed() {
        let vcpu = FakeVCPU()
        let runner = runner(vcpu)
        runner.start()
        defer { runner.stop() }
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertNotNil(saved(runner.saveState(msrIndices: [])))
        XCTAssertEqual(vcpu.entryCount, 0, "held: not entered before the first resume")
        expect(runner.post(.resume).wait(), "resumed")
        XCTAssertTrue(vcpu.waitUntilInGuest())
    }

    func testAPauseKicksTheVCPUOutAndCompletesItsPendingExitBeforeItAnswers() {
        // An OUT to a port nobody handles: KVM completes it only on the next KVM_RUN.
        let vcpu = FakeVCPU(script: [.ioOut(port: 0x80, data: ExitBytes([0x11]).data)])
        let runner = runner(vcpu)
        runner.start()
        defer { runner.stop() }
        runner.post(.resume)
        XCTAssertTrue(vcpu.waitUntilInGuest())
        // The runner entered again after the exit: the pending exit was completed by that entry.
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertEqual(vcpu.events, ["exit", "kicked"])

        // Paused right after an exit (the pause arrives while the runner holds the exit): the
        // pause completes it first, without entering the guest, and only then answers.
        let second = FakeVCPU(script: [.ioOut(port: 0x80, data: ExitBytes([0x11]).data)])
        let other = self.runner(second)
        let pause = ReplyBox()
        second.onExit = { pause.set(other.post(.pause)) }
        other.start()
        defer { other.stop() }
        other.post(.resume)
        let deadline = Date(timeIntervalSinceNow: 5)
        while pause.reply == nil && Date() < deadline { usleep(1_000) }
        expect(pause.reply!.wait(), "paused")
        XCTAssertEqual(second.events, ["exit", "completed"])
        _ = saved(other.saveState(msrIndices: []))
        XCTAssertEqual(second.events.last, "saved")
        XCTAssertEqual(second.entryCount, 1, "completing the exit did not enter the guest")
    }

    func testSavingIsRefusedWhileRunningAndAnsweredWhilePaused() {
        let vcpu = FakeVCPU()
        let runner = runner(vcpu)
        runner.start()
        defer { runner.stop() }
        runner.post(.resume)
        XCTAssertTrue(vcpu.waitUntilInGuest())
        expect(runner.saveState(msrIndices: []), "notPaused")
        XCTAssertFalse(vcpu.events.contains("saved"), "nothing was read from a running vCPU")
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertEqual(saved(runner.saveState(msrIndices: []))?.parked, false)
        XCTAssertEqual(vcpu.events.last, "saved")
        expect(runner.post(.resume).wait(), "resumed")
        expect(runner.saveState(msrIndices: []), "notPaused")
    }

    /// A resume posted while the caller reads the state waits for the read to end: the vCPU
    /// never enters the guest with a vCPU ioctl under way.
    func testAResumeWaitsForASaveUnderWay() {
        let vcpu = FakeVCPU()
        let gate = DispatchSemaphore(value: 0)
        vcpu.saveGate = gate
        let runner = runner(vcpu)
        runner.start()
        defer { runner.stop() }
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = runner.saveState(msrIndices: [])
            done.signal()
        }
        let deadline = Date(timeIntervalSinceNow: 5)
        while !vcpu.events.contains("saving") && Date() < deadline { usleep(1_000) }
        // Posting takes the mailbox's lock, which the save holds: post from a third thread.
        let resumed = ReplyBox()
        Thread.detachNewThread { resumed.set(runner.post(.resume)) }
        Thread.sleep(forTimeInterval: 0.1)
        XCTAssertEqual(vcpu.entryCount, 0, "not entered while its state is read")
        gate.signal()
        done.wait()
        while resumed.reply == nil && Date() < deadline { usleep(1_000) }
        expect(resumed.reply!.wait(), "resumed")
        XCTAssertTrue(vcpu.waitUntilInGuest())
        XCTAssertEqual(vcpu.events, ["saving", "saved"])
    }

    func testAParkedVCPUIsNeverEnteredAgainAndCountsAsPaused() {
        let vcpu = FakeVCPU(script: [.ioOut(port: GuestLayout.parkPort, data: ExitBytes([1, 0, 0, 0], elementSize: 4).data)])
        let runner = runner(vcpu)
        runner.start()
        defer { runner.stop() }
        expect(runner.post(.resume).wait(), "resumed")
        // It parks at the exit: completes the OUT and stays out.
        let deadline = Date(timeIntervalSinceNow: 5)
        while !vcpu.events.contains("completed") && Date() < deadline { usleep(1_000) }
        XCTAssertEqual(vcpu.events, ["exit", "completed"])
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertEqual(saved(runner.saveState(msrIndices: []))?.parked, true)
        expect(runner.post(.resume).wait(), "resumed")
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertEqual(vcpu.entryCount, 1, "a resume leaves a parked vCPU out of the guest")
    }

    func testARestoredParkedVCPUStartsParked() {
        let vcpu = FakeVCPU()
        let runner = runner(vcpu)
        var parked = FakeVCPU.blankState(id: 0)
        parked.parked = true
        try! runner.restore(parked)
        runner.start()
        defer { runner.stop() }
        expect(runner.post(.resume).wait(), "resumed")
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertEqual(saved(runner.saveState(msrIndices: []))?.parked, true)
        XCTAssertEqual(vcpu.entryCount, 0)
    }

    func testAStopEndsTheThreadFromAnyStateAndLaterEventsAreAnsweredStopped() {
        for resume in [false, true] {
            let vcpu = FakeVCPU()
            let runner = runner(vcpu)
            runner.start()
            if resume {
                runner.post(.resume)
                XCTAssertTrue(vcpu.waitUntilInGuest())
            }
            runner.stop()
            expect(runner.post(.pause).wait(), "stopped")
            expect(runner.saveState(msrIndices: []), "stopped")
        }
    }

    func testAFailedVCPUReportsItsFailureAndAnswersStopped() {
        let events = MachineEvents()
        let vcpu = FakeVCPU(script: [.shutdown])
        let runner = runner(vcpu, events: events)
        runner.start()
        defer { runner.stop() }
        runner.post(.resume)
        XCTAssertNotNil(events.waitForFailure(timeout: 5))
        XCTAssertTrue("\(events.firstFailure!)".contains("the guest shut down (triple fault)"))
        expect(runner.post(.pause).wait(), "stopped")
    }

    /// A throttle hold keeps the vCPU out of the guest, sleeping (not polling), and a pause ends
    /// it at once.
    func testAHoldKeepsTheVCPUOutUntilAPauseEndsIt() {
        let holds = VCPUHolds(vcpuCount: 1)
        let vcpu = FakeVCPU()
        let runner = runner(vcpu, holds: holds)
        runner.start()
        defer { runner.stop() }
        holds.hold(0, until: MonotonicClock.nanoseconds() + 30_000_000_000)
        runner.post(.resume)
        Thread.sleep(forTimeInterval: 0.2)
        XCTAssertEqual(vcpu.entryCount, 0, "held")
        let start = MonotonicClock.seconds()
        expect(runner.post(.pause).wait(), "paused")
        XCTAssertLessThan(MonotonicClock.seconds() - start, 1, "the pause ended the hold")
        XCTAssertGreaterThan(holds.heldNanoseconds()[0], 100_000_000)
        XCTAssertEqual(vcpu.entryCount, 0)
        // Released, it runs.
        holds.release(0)
        runner.post(.resume)
        XCTAssertTrue(vcpu.waitUntilInGuest())
        // A short hold ends by itself: kicked, the vCPU waits it out, then enters again.
        let held = holds.heldNanoseconds()[0]
        let entries = vcpu.entryCount
        holds.hold(0, until: MonotonicClock.nanoseconds() + 50_000_000)
        runner.kick()
        let deadline = MonotonicClock.seconds() + 5
        while vcpu.entryCount <= entries && MonotonicClock.seconds() < deadline { usleep(1_000) }
        XCTAssertEqual(vcpu.entryCount, entries + 1, "in the guest again after the hold")
        XCTAssertGreaterThan(holds.heldNanoseconds()[0] - held, 40_000_000)
    }

    /// An unclaimed port read leaves the data as it was and the vCPU runs on; an unclaimed port
    /// write is ignored; an unclaimed MMIO access ends the vCPU with its address.
    func testUnclaimedAccesses() {
        let read = ExitBytes([0xAB, 0xCD], elementSize: 2)
        let events = MachineEvents()
        let vcpu = FakeVCPU(script: [.ioIn(port: 0x71, data: read.data), .ioOut(port: 0x70, data: ExitBytes([1]).data),
                                     .mmioWrite(address: 0xFEC0_0000, data: ExitBytes([1, 2, 3, 4], elementSize: 4).data)])
        let runner = runner(vcpu, events: events)
        runner.start()
        defer { runner.stop() }
        runner.post(.resume)
        XCTAssertNotNil(events.waitForFailure(timeout: 5))
        XCTAssertEqual("\(events.firstFailure!)", "vCPU 0 stopped: the guest accessed unmapped memory at 0xfec00000")
        XCTAssertEqual(read.bytes, [0xAB, 0xCD])
        XCTAssertEqual(vcpu.entryCount, 3)

        let reading = MachineEvents()
        let other = FakeVCPU(script: [.mmioRead(address: 0x1_0000_0000, data: ExitBytes([0]).data)])
        let second = self.runner(other, events: reading)
        second.start()
        defer { second.stop() }
        second.post(.resume)
        XCTAssertNotNil(reading.waitForFailure(timeout: 5))
        XCTAssertEqual("\(reading.firstFailure!)", "vCPU 0 stopped: the guest accessed unmapped memory at 0x100000000")
    }

    /// Posting does not wait: every vCPU is asked, then each is waited for.
    func testPostingDoesNotWaitForTheReply() {
        let vcpus = (0..<4).map { FakeVCPU(id: $0) }
        let holds = VCPUHolds(vcpuCount: 4)
        let runners = vcpus.map { runner($0, holds: holds) }
        for runner in runners { runner.start() }
        defer { for runner in runners { runner.stop() } }
        let resumed = runners.map { $0.post(.resume) }
        for reply in resumed { expect(reply.wait(), "resumed") }
        for vcpu in vcpus { XCTAssertTrue(vcpu.waitUntilInGuest()) }
        let paused = runners.map { $0.post(.pause) }
        for reply in paused { expect(reply.wait(), "paused") }
        let states = runners.compactMap { saved($0.saveState(msrIndices: [])) }
        XCTAssertEqual(states.map(\.id), [0, 1, 2, 3])
    }
}
