import Foundation

/// Where a vCPU thread is: the state it alone moves between (Firecracker's `VcpuRunState`), each
/// with its function below, and publishes in its mailbox for the others to read.
enum VCPUThreadState: Sendable, Equatable {
    /// Entering the guest, handling exits, waiting out throttle holds; every loop looks at the
    /// mailbox before KVM_RUN.
    case running
    /// Out of the guest with its last exit completed, waiting for events; where a thread begins
    /// (held until the first `.resume`, see `Machine.start`).
    case paused
    /// The guest asked (park port) to be left out of the CPU for good: its workload finished in
    /// ring 3, where it cannot halt. Like paused, with the last exit completed, but a resume
    /// leaves it here: it is never entered again. Saved with its state (`VCPUState.parked`).
    case parked
    /// The thread ends (stopped, or its vCPU failed); its mailbox answers `.stopped`.
    case exited
}

/// What an exit asks of the vCPU state machine.
enum VCPUExitOutcome: Equatable {
    /// Enter the guest again.
    case proceed
    /// The guest parked this vCPU: never enter it again.
    case park
    /// The guest halted (no in-kernel irqchip): stay out until an event comes.
    case halt
}

/// The thread that owns one vCPU, a state machine driven by typed events (`VCPUEvent`) that get
/// typed replies (`VCPUResponse`), as Firecracker's `vstate/vcpu.rs`. Other threads only post
/// events to its mailbox and kick it: a pause or a stop posted to a vCPU inside KVM_RUN kicks it
/// (immediate_exit + signal) so KVM_RUN returns promptly, and the loop finds the event before it
/// enters the guest again. Posting never waits for the reply; `VCPUReply.wait()` does.
final class VCPURunner<VCPU: HypervisorVCPU>: @unchecked Sendable {
    // @unchecked: other threads touch only `mailbox` (thread-safe), the kick (immediate_exit
    // store + signal), `saveState` (under the mailbox's lock, see there) and `thread` (written by
    // start() before any of them is called). Everything else is the vCPU thread's own.
    let vcpu: VCPU
    private let tracker: DirtyTracker?
    /// The same tracker when it is the ring (ring and quota modes): it paces this vCPU.
    private let ring: RingTracker?
    private let holds: VCPUHolds
    private let events: MachineEvents
    private let output: GuestOutput
    private let memory: GuestMemory
    private let mailbox = VCPUMailbox(state: .paused)
    private var thread: OSThread?
    private var consoleLine = ConsoleLine()
    /// The reply to the `.stop` that ends the thread: answered once the thread is done.
    private var stopReply: VCPUReply?

    init(vcpu: VCPU, tracker: DirtyTracker?, ring: RingTracker?, holds: VCPUHolds, events: MachineEvents, output: GuestOutput,
         memory: GuestMemory) {
        self.vcpu = vcpu
        self.tracker = tracker
        self.ring = ring
        self.holds = holds
        self.events = events
        self.output = output
        self.memory = memory
    }

    /// Before start(): a restored vCPU the guest had parked begins parked, and is never entered.
    func restoreParked(_ parked: Bool) {
        mailbox.publish(parked ? .parked : .paused)
    }

    /// Starts the vCPU's thread, paused (or parked): it enters the guest at the first `.resume`.
    func start() {
        KickSignal.install()
        let state = mailbox.withPublishedState { $0 }
        thread = OSThread(name: "vcpu-\(vcpu.id)") { [self] in run(from: state) }
    }

    /// Queues `event` and returns without waiting for its reply; kicks the vCPU out of KVM_RUN
    /// when the event must reach it there (see `VCPUEvent.interruptsGuest`).
    @discardableResult
    func post(_ event: VCPUEvent) -> VCPUReply {
        let reply = mailbox.post(event)
        if event.interruptsGuest { kick() }
        return reply
    }

    /// Makes KVM_RUN return now (or the next one return at once).
    func kick() {
        vcpu.requestImmediateExit(true)
        if let thread { KickSignal.send(to: thread.handle) }
    }

    /// Stops the thread and waits for it to end.
    func stop() {
        guard let thread else { return }
        post(.stop).wait()
        thread.join()
    }

    /// The vCPU's state (`parked` included), read on the calling thread while this one is paused
    /// or parked: `.saved`, `.failed`, `.notPaused` if it runs, `.stopped` if it has ended.
    ///
    /// Not an event served by the vCPU thread, as Firecracker's `SaveState` is: replication saves
    /// the state hundreds of times a second, and waking each paused vCPU thread to read its own
    /// state lengthened the pause. Measured with Machine's pause, save and resume in a loop on
    /// this shared 2-core host, two runs each, saving 2 vCPUs took a median of 133 and 101 µs on
    /// their threads against 97 and 113 on the caller, but 1.0 and 0.9 ms against 0.15 and 0.25
    /// at the 99th percentile; 8 vCPUs 4.2 and 3.6 ms against 1.0 and 0.5 at the 99th. So the
    /// caller reads it, holding the mailbox's lock, having seen `.paused` or `.parked` published:
    /// the thread publishes `.running` under that lock before it enters the guest, so no vCPU
    /// ioctl but the kick runs beside KVM_RUN, whoever posts what meanwhile.
    func saveState(msrIndices: [UInt32]) -> VCPUResponse {
        mailbox.withPublishedState { state -> VCPUResponse in
            switch state {
            case .running: return .notPaused
            case .exited: return .stopped
            case .paused, .parked:
                do throws(KVMError) {
                    var saved = try vcpu.saveState(msrIndices: msrIndices)
                    saved.parked = state == .parked
                    return .saved(saved)
                } catch {
                    return .failed(error)
                }
            }
        }
    }

    // MARK: The thread: one function per state

    private func run(from initial: VCPUThreadState) {
        var state = initial
        do {
            while state != .exited {
                switch state {
                case .running: state = try running()
                case .paused, .parked: state = outOfGuest(state)
                case .exited: break
                }
            }
        } catch {
            events.vcpuFailed(vcpu.id, error)
        }
        mailbox.close(answering: stopReply)
    }

    /// Paused or parked: waits for an event and answers it (its state may be read meanwhile, see
    /// `saveState`).
    private func outOfGuest(_ state: VCPUThreadState) -> VCPUThreadState {
        let (event, reply) = mailbox.next()
        switch event {
        case .pause:
            mailbox.answer(reply, .paused, publishing: state)
            return state
        case .resume:
            let next: VCPUThreadState = state == .parked ? .parked : .running
            mailbox.answer(reply, .resumed, publishing: next)
            return next
        case .stop:
            stopReply = reply
            return .exited
        }
    }

    /// In the guest until an event or the guest moves it on. `exitPending`: KVM_RUN returned an
    /// exit that KVM completes only on the next KVM_RUN (see `completePendingExit`); leaving for
    /// paused or parked completes it first, so state saved there neither replays nor loses it.
    private func running() throws(KVMError) -> VCPUThreadState {
        var exitPending = false
        while true {
            if let (event, reply) = mailbox.take() {
                switch event {
                case .pause:
                    let next: VCPUThreadState = try completePendingExit(&exitPending) ? .parked : .paused
                    mailbox.answer(reply, .paused, publishing: next)
                    return next
                case .resume:
                    mailbox.answer(reply, .resumed, publishing: .running)
                case .stop:
                    stopReply = reply
                    return .exited
                }
                continue
            }
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
            let outcome = try handle(exit)
            if paced { ring?.vcpuSliceEnded(vcpu.id) }
            switch outcome {
            case .proceed:
                break
            case .park:
                _ = try completePendingExit(&exitPending)
                mailbox.publish(.parked)
                return .parked
            case .halt:
                // Only without an in-kernel irqchip; our guest halts for good when it idles. Out
                // of the guest until an event comes (a pause or a stop; Machine sends nothing
                // else to a running vCPU).
                mailbox.waitForMail()
            }
        }
    }

    /// A vCPU under a dirty-rate ceiling runs in slices of at most this long, after which its own
    /// thread charges what it dirtied. An unpaced vCPU dirties ~90 pages in 200 µs here, which
    /// bounds how far one slice can overshoot its allowance (5 MiB/s is 1,280 pages a second).
    static var pacedSliceNanoseconds: UInt64 { 200_000 }
    /// How long after its last hold a paced vCPU keeps running in slices.
    static var slicingAfterHoldNanoseconds: UInt64 { 100_000_000 }
    private var sliceTimer: ThreadTimer?
    /// The tracker's reset epoch when this vCPU last entered KVM_RUN (see vcpuExitedRingFull).
    private var epochAtEntry: UInt64 = 0
    /// When this vCPU last came out of a throttle hold.
    private var lastHoldEnded: UInt64 = 0

    /// The timer repeats: a signal that lands just before KVM_RUN (the thread was preempted
    /// between arming and entering) is lost, and the next one ends the slice instead. It is
    /// disarmed while the vCPU is held.
    private func armSliceTimer() {
        if sliceTimer == nil { sliceTimer = ThreadTimer(signal: KickSignal.number) }
        sliceTimer?.arm(every: Self.pacedSliceNanoseconds)
    }

    /// A throttle's penalty (dirty limit, quota exit, auto-converge timeslice): stay out of the
    /// guest until `deadline`, unless an event (a pause or a stop) comes first.
    private func waitOutHold(until deadline: UInt64) {
        let start = MonotonicClock.nanoseconds()
        guard deadline > start else { return }
        sliceTimer?.disarm()
        mailbox.waitForMail(untilNanoseconds: deadline)
        lastHoldEnded = MonotonicClock.nanoseconds()
        holds.accountHeld(vcpu.id, nanoseconds: lastHoldEnded - start)
    }

    /// Lets KVM finish the instruction behind the last exit (e.g. move RIP past an OUT we
    /// handled) without entering the guest, so that state saved now neither replays nor loses it.
    /// Returns whether an exit handled on the way asked to park the vCPU.
    private func completePendingExit(_ exitPending: inout Bool) throws(KVMError) -> Bool {
        var parks = false
        var rounds = 0
        while exitPending {
            epochAtEntry = tracker?.resetEpoch ?? 0
            guard let exit = try vcpu.completePendingExit() else { exitPending = false; break }
            // Completing it took userspace again (a string I/O instruction's next chunk).
            rounds += 1
            if rounds > 4096 { throw fatal("the last exit did not complete in \(rounds) rounds") }
            exitPending = exit != .interrupted
            if try handle(exit) == .park { parks = true }   // a halt needs no wait: it leaves anyway
        }
        return parks
    }

    private func handle(_ exit: VCPUExit) throws(KVMError) -> VCPUExitOutcome {
        switch exit {
        case .interrupted:
            return .proceed
        case .dirtyRingFull:
            try tracker?.vcpuExitedRingFull(vcpu.id, resetEpochAtEntry: epochAtEntry)
            return .proceed
        case .io(let port, let isOut, let size, let count, let dataOffset):
            return handlePortIO(port: port, isOut: isOut, size: size, count: count, dataOffset: dataOffset)
        case .hlt:
            return .halt
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

    private func handlePortIO(port: UInt16, isOut: Bool, size: UInt8, count: UInt32, dataOffset: UInt64) -> VCPUExitOutcome {
        guard isOut else { return .proceed }   // reads from unknown ports see whatever KVM left there
        let data = UnsafeRawPointer(vcpu.ioData(at: dataOffset))
        switch port {
        case GuestLayout.consolePort:
            for index in 0..<Int(count) * Int(size) {
                if let line = consoleLine.take(data.load(fromByteOffset: index, as: UInt8.self)) {
                    events.consoleLine(vcpu.id, line)
                }
            }
        case GuestLayout.parkPort:
            return .park
        case GuestLayout.errorPort where size == 4:
            let code = data.loadUnaligned(as: UInt32.self)
            events.guestReportedError(vcpu.id, code)
        case GuestLayout.outputPort where size == 4:
            emitOutput(announced: data.loadUnaligned(as: UInt32.self))
        default:
            break
        }
        return .proceed
    }
}
