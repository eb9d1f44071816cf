import Foundation
import Synchronization

/// The thread that owns one vCPU: it loops in KVM_RUN and handles the exits that reach
/// userspace. Other threads talk to it only through `kick`, `pause`, `resume` and `stop`:
/// each sets a request, then kicks (immediate_exit + signal) so KVM_RUN returns promptly.
final class VCPURunner: @unchecked Sendable {
    // @unchecked: requests are atomics; `condition` guards `paused`; the vCPU itself is used only
    // from this runner's thread, except for the kick (immediate_exit store + signal).
    let vcpu: KVMVCPU
    private let tracker: DirtyTracker?
    /// The same tracker when it is the ring (ring and quota modes): it paces this vCPU.
    private let ring: RingTracker?
    private let holds: VCPUHolds
    private let events: MachineEvents
    private let output: GuestOutput
    private let memory: GuestMemory
    private var thread: OSThread?

    private let stopRequested = Atomic<Bool>(false)
    private let pauseRequested = Atomic<Bool>(false)
    private let condition = NSCondition()
    private var paused = false
    /// The guest asked (park port) to be left out of the CPU for good: its workload finished
    /// in ring 3, where it cannot halt. Guarded by `condition`.
    private var parked = false
    /// Parked, and its last exit completed: out of the guest for good. Guarded by `condition`.
    private var parkedOut = false
    /// KVM_RUN returned an exit that KVM completes only on the next KVM_RUN (see
    /// `KVMVCPU.completePendingExit`). Touched only by the runner's thread.
    private var exitPending = false
    private var consoleLine = ConsoleLine()

    init(vcpu: KVMVCPU, tracker: DirtyTracker?, ring: RingTracker?, holds: VCPUHolds, events: MachineEvents, output: GuestOutput,
         memory: GuestMemory) {
        self.vcpu = vcpu
        self.tracker = tracker
        self.ring = ring
        self.holds = holds
        self.events = events
        self.output = output
        self.memory = memory
    }

    /// Starts the vCPU's thread. `held`: it waits, paused, for `resume()` before it first enters
    /// the guest (see `Machine.start`).
    func start(held: Bool = false) {
        KickSignal.install()
        if held { pauseRequested.store(true, ordering: .releasing) }
        thread = OSThread(name: "vcpu-\(vcpu.id)") { [self] in runLoop() }
    }

    /// Makes KVM_RUN return now (or the next one return at once).
    func kick() {
        vcpu.requestImmediateExit()
        if let thread { KickSignal.send(to: thread.handle) }
    }

    func stop() {
        stopRequested.store(true, ordering: .releasing)
        condition.lock(); condition.broadcast(); condition.unlock()
        kick()
        thread?.join()
    }

    /// Returns once the vCPU is out of KVM_RUN with its last exit completed, so that its state
    /// can be read (or its thread has ended).
    func pause() {
        requestPause()
        waitUntilPaused()
    }

    /// Asks the vCPU out of the guest without waiting (see `Machine.pause`).
    func requestPause() {
        pauseRequested.store(true, ordering: .releasing)
        kick()
        condition.lock()
        condition.broadcast()   // a vCPU waiting out a throttle hold stops waiting
        condition.unlock()
    }

    func waitUntilPaused() {
        condition.lock()
        while !paused && !finished && !parkedOut { condition.wait() }
        condition.unlock()
    }

    /// Whether the guest parked this vCPU (part of its saved state).
    var isParked: Bool {
        condition.lock(); defer { condition.unlock() }
        return parked
    }

    /// Before start(): a restored vCPU the guest had parked is never entered again.
    func restoreParked(_ value: Bool) {
        condition.lock(); parked = value; condition.unlock()
    }

    func resume() {
        pauseRequested.store(false, ordering: .releasing)
        condition.lock(); condition.broadcast(); condition.unlock()
    }

    private var finished = false

    private func runLoop() {
        defer {
            condition.lock(); finished = true; condition.broadcast(); condition.unlock()
        }
        do {
            while !stopRequested.load(ordering: .acquiring) {
                if pauseRequested.load(ordering: .acquiring) { try parkWhilePaused(); continue }
                if isParked { try waitWhileParked(); continue }
                if let deadline = holds.deadline(vcpu.id, now: MonotonicClock.nanoseconds()) {
                    waitOutHold(until: deadline)
                    continue
                }
                // Slices only for a paced vCPU that was held lately, i.e. one that writes up to its
                // ceiling: a vCPU under a ceiling it does not reach (a reader) runs undisturbed.
                let paced = holds.isPaced(vcpu.id)
                    && MonotonicClock.nanoseconds() &- lastHoldEnded < Self.slicingAfterHoldNanoseconds
                if paced { armSliceTimer() } else if sliceTimer != nil { sliceTimer = nil }
                epochAtEntry = tracker?.resetEpoch ?? 0
                let exit = try vcpu.runOnce()
                exitPending = exit != .interrupted
                try handle(exit)
                if paced { ring?.vcpuSliceEnded(vcpu.id) }
            }
        } catch {
            events.vcpuFailed(vcpu.id, error)
        }
    }

    /// A vCPU under a dirty-rate ceiling runs in slices of at most this long, after which its own
    /// thread charges what it dirtied. An unpaced vCPU dirties ~90 pages in 200 µs here, which
    /// bounds how far one slice can overshoot its allowance (5 MiB/s is 1,280 pages a second).
    static let pacedSliceNanoseconds: UInt64 = 200_000
    /// How long after its last hold a paced vCPU keeps running in slices.
    static let slicingAfterHoldNanoseconds: UInt64 = 100_000_000
    private var sliceTimer: ThreadTimer?
    /// The tracker's reset epoch when this vCPU last entered KVM_RUN (see vcpuExitedRingFull).
    private var epochAtEntry: UInt64 = 0
    /// When this vCPU last came out of a throttle hold (touched only by the runner's thread).
    private var lastHoldEnded: UInt64 = 0

    /// The timer repeats: a signal that lands just before KVM_RUN (the thread was preempted
    /// between arming and entering) is lost, and the next one ends the slice instead. It is
    /// disarmed while the vCPU is held.
    private func armSliceTimer() {
        if sliceTimer == nil { sliceTimer = ThreadTimer(signal: KickSignal.number) }
        sliceTimer?.arm(every: Self.pacedSliceNanoseconds)
    }

    /// A throttle's penalty (dirty limit, quota exit, auto-converge timeslice): stay out of the
    /// guest until `deadline`, unless a pause or stop comes first.
    private func waitOutHold(until deadline: UInt64) {
        let start = MonotonicClock.nanoseconds()
        guard deadline > start else { return }
        sliceTimer?.disarm()
        condition.lock()
        let wallDeadline = Date(timeIntervalSinceNow: Double(deadline - start) / 1e9)
        while !stopRequested.load(ordering: .acquiring) && !pauseRequested.load(ordering: .acquiring)
            && MonotonicClock.nanoseconds() < deadline {
            if !condition.wait(until: wallDeadline) { break }
        }
        condition.unlock()
        lastHoldEnded = MonotonicClock.nanoseconds()
        holds.accountHeld(vcpu.id, nanoseconds: lastHoldEnded - start)
    }

    private func waitWhileParked() throws {
        try completePendingExit()
        condition.lock()
        parkedOut = true
        condition.broadcast()   // a pause() waiting for this vCPU may return: it is out of the guest
        while !stopRequested.load(ordering: .acquiring) { condition.wait() }
        condition.unlock()
    }

    private func parkWhilePaused() throws {
        try completePendingExit()
        condition.lock()
        paused = true
        condition.broadcast()
        while pauseRequested.load(ordering: .acquiring) && !stopRequested.load(ordering: .acquiring) {
            condition.wait()
        }
        paused = false
        condition.unlock()
    }

    /// Lets KVM finish the instruction behind the last exit (e.g. move RIP past an OUT we
    /// handled) without entering the guest, so that state saved now neither replays nor loses it.
    private func completePendingExit() throws {
        var rounds = 0
        while exitPending {
            epochAtEntry = tracker?.resetEpoch ?? 0
            guard let exit = try vcpu.completePendingExit() else { exitPending = false; break }
            // Completing it took userspace again (a string I/O instruction's next chunk).
            rounds += 1
            if rounds > 4096 { throw fatal("the last exit did not complete in \(rounds) rounds") }
            exitPending = exit != .interrupted
            try handle(exit)
        }
    }

    private func handle(_ exit: VCPUExit) throws {
        switch exit {
        case .interrupted:
            return
        case .dirtyRingFull:
            try tracker?.vcpuExitedRingFull(vcpu.id, resetEpochAtEntry: epochAtEntry)
        case .io(let port, let isOut, let size, let count, let dataOffset):
            handlePortIO(port: port, isOut: isOut, size: size, count: count, dataOffset: dataOffset)
        case .hlt:
            // Only without an in-kernel irqchip; our guest halts for good when it idles.
            condition.lock()
            while !stopRequested.load(ordering: .acquiring) && !pauseRequested.load(ordering: .acquiring) {
                condition.wait()
            }
            condition.unlock()
        case .shutdown:
            throw fatal("the guest shut down (triple fault)")
        case .failEntry(let reason):
            throw fatal("KVM could not enter the guest (hardware entry failure reason 0x\(String(reason, radix: 16)))")
        case .internalError(let suberror):
            throw fatal("KVM internal error (suberror \(suberror))")
        case .systemEvent(let type):
            throw fatal("the guest requested a system event (type \(type): shutdown or reset)")
        case .mmio(let address):
            throw fatal("the guest accessed unmapped memory at 0x\(String(address, radix: 16))")
        case .other(let reason):
            throw fatal("unexpected exit reason \(reason)")
        }
    }

    private func fatal(_ reason: String) -> KVMError {
        .vcpuFailed(vcpu: vcpu.id, reason: reason, registers: vcpu.registerDump())
    }

    /// A check vCPU wrote its output record and announced it: read the record now, while the
    /// vCPU waits in this exit (it cannot write the next one before the OUT completes), and
    /// hand its line on. Only a vCPU's own record, named by its own id, is taken.
    private func emitOutput(announced id: UInt32) {
        guard id == UInt32(vcpu.id) else { output.refuse(); return }
        let record = UnsafeRawPointer(memory.hostPointer(ramOffset: GuestLayout.outputRecordAddress(vcpu: vcpu.id)))
        let line = GuestOutputLine(record: record)
        guard line.vcpu == vcpu.id else { output.refuse(); return }
        output.emit(vcpu: vcpu.id, line: line.text)
    }

    private func handlePortIO(port: UInt16, isOut: Bool, size: UInt8, count: UInt32, dataOffset: UInt64) {
        guard isOut else { return }   // reads from unknown ports see whatever KVM left there
        let data = UnsafeRawPointer(vcpu.ioData(at: dataOffset))
        switch port {
        case GuestLayout.consolePort:
            for index in 0..<Int(count) * Int(size) {
                if let line = consoleLine.take(data.load(fromByteOffset: index, as: UInt8.self)) {
                    events.consoleLine(vcpu.id, line)
                }
            }
        case GuestLayout.parkPort:
            condition.lock(); parked = true; condition.unlock()
        case GuestLayout.errorPort where size == 4:
            let code = data.loadUnaligned(as: UInt32.self)
            events.guestReportedError(vcpu.id, code)
        case GuestLayout.outputPort where size == 4:
            emitOutput(announced: data.loadUnaligned(as: UInt32.self))
        default:
            return
        }
    }
}
