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

/// What an exit (or the device it reached) asks of the vCPU state machine.
enum VCPUExitOutcome: Equatable {
    /// Enter the guest again.
    case proceed
    /// The guest parked this vCPU: never enter it again.
    case park
    /// The guest halted (no in-kernel irqchip): stay out until an event comes.
    case halt
}

/// A vCPU thread as `Machine` drives it, whatever the hypervisor's vCPU type: the calls it makes
/// per event and per pass (the thread itself is started where the type is known, see
/// `Machine.startThreads`).
protocol VCPUThread: AnyObject, Sendable {
    @discardableResult
    func post(_ event: VCPUEvent) -> VCPUReply
    func kick()
    func stop()
    func saveState(msrIndices: [UInt32]) -> VCPUResponse
    /// Before the thread starts: writes a saved state into the vCPU (parked included).
    func restore(_ state: VCPUState) throws(KVMError)
    /// The thread's kernel id (0 before it starts).
    var threadID: UInt32 { get }
}

/// The thread that owns one vCPU, a state machine driven by typed events (`VCPUEvent`) that get
/// typed replies (`VCPUResponse`), as Firecracker's `vstate/vcpu.rs`. Other threads only post
/// events to its mailbox and kick it: a pause or a stop posted to a vCPU inside KVM_RUN kicks it
/// (immediate_exit + signal) so KVM_RUN returns promptly, and the loop finds the event before it
/// enters the guest again. Posting never waits for the reply; `VCPUReply.wait()` does.
///
/// Its port I/O and MMIO exits go to the devices on its `DeviceBus`; a device acts on the vCPU
/// only through the request it returns (`DeviceRequest.parkVCPU` moves it to `.parked`). An
/// access nobody claims: a port read leaves the exit's data as KVM left it, a port write is
/// ignored, and an MMIO access ends the vCPU ("the guest accessed unmapped memory at 0x…").
final class VCPURunner<VCPU: HypervisorVCPU>: VCPUThread, @unchecked Sendable {
    // @unchecked: other threads touch only `mailbox` (thread-safe), the kick (immediate_exit
    // store + signal), `saveState` (under the mailbox's lock, see there) and `thread` (written by
    // start() before any of them is called). Everything else is the vCPU thread's own.
    let vcpu: VCPU
    private let tracker: DirtyTracker?
    /// The same tracker when it is the ring (ring and quota modes): it paces this vCPU.
    private let ring: RingTracker?
    private let holds: VCPUHolds
    private let events: MachineEvents
    /// The devices its port I/O and MMIO exits go to (this thread's own copy).
    private let bus: DeviceBus
    private let mailbox = VCPUMailbox(state: .paused)
    private var thread: OSThread?
    /// The reply to the `.stop` that ends the thread: answered once the thread is done.
    private var stopReply: VCPUReply?

    init(vcpu: VCPU, tracker: DirtyTracker?, ring: RingTracker?, holds: VCPUHolds, events: MachineEvents, bus: DeviceBus) {
        self.vcpu = vcpu
        self.tracker = tracker
        self.ring = ring
        self.holds = holds
        self.events = events
        self.bus = bus
    }

    /// Before start(): no vCPU thread exists yet, so the caller writes the state itself. A
    /// restored vCPU the guest had parked begins parked, and is never entered.
    func restore(_ state: VCPUState) throws(KVMError) {
        try vcpu.restoreState(state)
        mailbox.publish(state.parked ? .parked : .paused)
    }

    /// The vCPU thread's kernel id (0 before start()).
    var threadID: UInt32 { thread?.threadID ?? 0 }

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
            exitPending = !exit.isInterrupted
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
            exitPending = !exit.isInterrupted
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
        case .ioOut(let port, let data):
            // Unclaimed: ignored, as on a PC.
            return outcome(bus.write(.port, at: UInt64(port), data, vcpu: vcpu.id))
        case .ioIn(let port, let data):
            // Unclaimed: the guest reads whatever KVM left in the exit's data.
            return outcome(bus.read(.port, at: UInt64(port), into: data, vcpu: vcpu.id))
        case .mmioWrite(let address, let data):
            return try claimed(bus.write(.mmio, at: address, data, vcpu: vcpu.id), address)
        case .mmioRead(let address, let data):
            return try claimed(bus.read(.mmio, at: address, into: data, vcpu: vcpu.id), address)
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
        case .other(let reason):
            throw fatal("unexpected exit reason \(reason)")
        }
    }

    /// A device's request, as the state machine takes it: parking moves the vCPU to `.parked`.
    private func outcome(_ dispatch: DeviceBus.Dispatch) -> VCPUExitOutcome {
        dispatch == .handled(.parkVCPU) ? .park : .proceed
    }

    /// An MMIO access nobody claims ends the vCPU: no memory and no device is there.
    private func claimed(_ dispatch: DeviceBus.Dispatch, _ address: UInt64) throws(KVMError) -> VCPUExitOutcome {
        guard dispatch != .unclaimed else {
            throw fatal("the guest accessed unmapped memory at 0x\(String(address, radix: 16))")
        }
        return outcome(dispatch)
    }

    private func fatal(_ reason: String) -> KVMError {
        .vcpuFailed(vcpu: vcpu.id, reason: reason, registers: vcpu.registerDump())
    }
}
