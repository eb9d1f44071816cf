import Foundation

/// A VM: hypervisor VM, guest RAM, vCPU threads, the dirty tracker and the devices on its bus,
/// assembled in the order KVM requires and torn down in reverse. What it boots, and which
/// devices its guest talks to, come from its boot source (`BootSource`: the workload guest);
/// the hypervisor under it is KVM, or in tests a fake (`Hypervisor`).
public final class Machine: IncomingVM, @unchecked Sendable {
    // @unchecked: the components are immutable after init and thread-safe themselves; `state` is
    // guarded by `lock`.
    public let configuration: MachineConfiguration
    public let memory: GuestMemory
    public let tracker: DirtyTracker?
    /// The same tracker when it is the ring (ring and quota modes): it also carries the per-vCPU
    /// ceilings and pacing, which the bitmap cannot have.
    public let ringTracker: RingTracker?
    /// The guest's recent pace, sampled while the VM runs.
    public let pace: GuestPaceHistory
    public let events = MachineEvents()
    /// What the guest sends out (its output port: check workloads with emit=), held back under
    /// replication (output commit).
    public let output = GuestOutput()
    /// Whether a migration or a replication is copying this VM's memory elsewhere.
    public let transferClaim = TransferClaim()
    /// Whether this VM's post-copy link is paused (either side of a migration that switched).
    public let postcopyLink = PostCopyLinkState()
    /// The guest's TSC frequency, which paces its workloads.
    public let tscHz: UInt64
    public let boot: Boot
    /// Where every throttle puts its penalties; each vCPU thread waits them out.
    public let holds: VCPUHolds
    /// Auto-converge (`migrate --throttle cpu`).
    public let cpuThrottle: CPUThrottle
    /// What the VM boots and its devices (what a hello announces to a destination).
    let bootSource: any BootSource
    /// The hypervisor and the VM in it (per pass only: saving and restoring the VM's state).
    private let hypervisor: any Hypervisor
    private let vm: any HypervisorVM
    /// One per vCPU, in vCPU order; each a `VCPURunner` specialised for the hypervisor's vCPU.
    private let runners: [any VCPUThread]
    /// Starts every vCPU thread: made where the vCPU type is known, so that each thread runs
    /// the specialised `VCPURunner` (see `Hypervisor`).
    private let startThreads: @Sendable () -> Void
    /// The devices whose state travels with the VM's, in the machine's device order.
    private let statefulDevices: [any StatefulDevice]

    /// How the VM's CPUs and memory begin.
    public enum Boot: Sendable {
        /// The guest boots from its boot source (the workload guest: its image, config block and
        /// working sets).
        case fresh
        /// The destination of a migration: the same KVM setup (tracking, irqchip, memory slots,
        /// vCPUs with CPUID), but guest memory stays empty and the vCPUs in their reset state
        /// until migration fills the memory and `restoreState(_:)` the CPUs.
        case incoming
    }

    private enum State { case created, running, paused, stopped }
    private let lock = NSLock()
    private var state = State.created
    private var restored = false
    /// The MSRs a saved state carries (guarded by `lock`).
    private var msrIndices: [UInt32]?
    public private(set) var startTime: UInt64 = 0

    /// A VM running the workload guest with `configuration.workloads`, on KVM.
    /// `memory`: guest RAM already allocated for this VM (PreparedMemory, for an incoming VM),
    /// of exactly its size; nil allocates it here.
    public convenience init(_ configuration: MachineConfiguration, kvm: KVMSystem? = nil, boot: Boot = .fresh,
                            memory prepared: GuestMemory? = nil) throws(MachineError) {
        let system: KVMSystem
        if let kvm { system = kvm } else {
            do throws(KVMError) { system = try KVMSystem() } catch { throw .kvm(error) }
        }
        try self.init(configuration, hypervisor: system,
                      bootSource: WorkloadGuestBoot(memorySize: configuration.memorySize, workloads: configuration.workloads),
                      boot: boot, memory: prepared)
    }

    /// A VM on `hypervisor` booting `bootSource`, with its devices and `extraDevices` on its bus
    /// (their state saved and restored after the boot source's).
    init<H: Hypervisor>(_ configuration: MachineConfiguration, hypervisor: H, bootSource: any BootSource,
                        extraDevices: [MachineDevice] = [], boot: Boot = .fresh,
                        memory prepared: GuestMemory? = nil) throws(MachineError) {
        precondition(prepared == nil || prepared?.size == configuration.memorySize)
        self.configuration = configuration
        self.boot = boot
        self.bootSource = bootSource
        self.hypervisor = hypervisor
        let vcpus: [H.VM.VCPU]
        let vm: H.VM
        do {
            try configuration.validate(against: hypervisor)
            // Before any allocation: a VM that would not fit is refused with the figures, not
            // OOM-killed later with no message (and another VM with it).
            // (Prepared memory was checked, and is resident, already.)
            if prepared == nil { try configuration.checkMemoryAvailable() }
            vm = try hypervisor.createVM()
            self.vm = vm
            memory = try prepared ?? GuestMemory(size: configuration.memorySize)
            let holds = VCPUHolds(vcpuCount: configuration.vcpuCount)
            self.holds = holds
            let memory = self.memory, vcpuCount = configuration.vcpuCount
            pace = GuestPaceHistory(read: { GuestStats(memory: memory, vcpuCount: vcpuCount).vcpus.map(\.pages) })

            // Tracking capabilities must be enabled before any memory slot or vCPU exists.
            let tracker = try configuration.tracking.map { mode throws(KVMError) in
                try vm.makeTracker(mode, memory: memory, configuration: configuration, holds: holds)
            }
            self.tracker = tracker
            ringTracker = tracker as? RingTracker
            try vm.install(memory: memory)

            let cpuid = try hypervisor.supportedCPUID()
            var made: [H.VM.VCPU] = []
            for id in 0..<configuration.vcpuCount {
                made.append(try vm.createVCPU(id: id, cpuid: cpuid, tracker: tracker))
            }
            vcpus = made
            tscHz = try vcpus[0].tscKHz() * 1000
            if boot == .fresh { try bootSource.load(into: memory, bootVCPU: vcpus[0], tscHz: tscHz) }
        } catch let error as MachineError {
            throw error
        } catch let error as KVMError {
            throw .kvm(error)
        } catch let error as SystemError {
            throw .system(error)
        } catch {
            throw .guestFailed("\(error)")
        }
        let devices = bootSource.devices(DeviceContext(vcpuCount: configuration.vcpuCount, memory: memory,
                                                       events: events, output: output)) + extraDevices
        var bus = DeviceBus()
        do { for device in devices { try device.register(on: &bus) } } catch {
            throw .invalidConfiguration("the machine's devices overlap on its bus: \(error)")
        }
        statefulDevices = devices.compactMap { $0.device as? any StatefulDevice }
        let ids = statefulDevices.map(\.stateID)
        guard Set(ids).count == ids.count, ids.allSatisfy(DeviceState.isValidID) else {
            throw .invalidConfiguration("the machine's device state ids must be unique printable names: \(ids)")
        }
        let events = self.events
        let tracker = self.tracker
        let ringTracker = self.ringTracker
        let holds = self.holds
        let runners = vcpus.map {
            VCPURunner(vcpu: $0, tracker: tracker, ring: ringTracker, holds: holds, events: events, bus: bus)
        }
        self.runners = runners
        startThreads = { for runner in runners { runner.start() } }
        // Kicks capture the runners, not the machine: a strong capture of `self` would make
        // machine -> tracker -> kick -> machine a cycle that keeps the VM's memory alive. The
        // runners hold the tracker, so tracker -> kick -> runners -> tracker is one still:
        // deinit breaks it.
        let kick: @Sendable (Int) -> Void = { vcpu in runners[vcpu].kick() }
        ringTracker?.kick = kick
        cpuThrottle = CPUThrottle(holds: holds, vcpuCount: configuration.vcpuCount, kick: kick)
    }

    /// Starts tracking (so nothing the guest writes is missed) and then the vCPUs. An incoming
    /// VM starts only once its state has been restored.
    public func start() throws(MachineError) {
        lock.lock(); defer { lock.unlock() }
        guard state == .created else { return }
        if boot == .incoming && !restored { throw .state(.notRestored) }
        do { try tracker?.start() } catch { throw .kvm(error) }
        startTime = MonotonicClock.nanoseconds()
        // Every thread is made first, held (a vCPU thread begins paused), and then all are let
        // into the guest: a thread made while earlier vCPUs already ran had to wait for a core
        // to say it had started (64 busy vCPUs on 2 cores: 6-7 s to start a received VM, all of
        // it downtime). Nobody waits for the `.resumed` replies.
        startThreads()
        for runner in runners { runner.post(.resume) }
        pace.start()
        state = .running
    }

    /// Takes every vCPU out of the guest and keeps it out until resume(). When it returns, each
    /// vCPU's last exit is complete, so its state can be saved.
    public func pause() {
        lock.lock(); defer { lock.unlock() }
        guard state == .running else { return }
        // Every vCPU is asked first, then each is waited for: asked and waited for one at a
        // time, 64 busy vCPUs on 2 cores took 1.6 s to pause, each waiting its turn on a core.
        // A parked vCPU answers `.paused` too, and a vCPU whose thread has ended `.stopped`.
        let replies = runners.map { $0.post(.pause) }
        for reply in replies { reply.wait() }
        state = .paused
    }

    public func resume() {
        lock.lock(); defer { lock.unlock() }
        guard state == .paused else { return }
        for runner in runners { runner.post(.resume) }   // not waited for, as in start()
        state = .running
    }

    /// Stops the vCPU threads and the tracker. Memory is released when the Machine is.
    public func stop() {
        pace.stop()
        lock.lock(); defer { lock.unlock() }
        guard state == .running || state == .paused else { state = .stopped; return }
        cpuThrottle.set(percent: 0)
        for runner in runners { runner.stop() }
        tracker?.stop()
        state = .stopped
    }

    /// The CPU and in-kernel device state of a paused VM. Guest memory is not part of it.
    public func saveState() throws(MachineError) -> MachineState {
        lock.lock(); defer { lock.unlock() }
        guard state == .paused else { throw .state(.notPaused) }
        if let failure = events.firstFailure { throw .state(.vmFailed("\(failure)")) }
        let msrIndices: [UInt32]
        do {
            // Fetched once: a replication saves the state hundreds of times a second.
            if self.msrIndices == nil { self.msrIndices = try hypervisor.migratableMSRIndices() }
            msrIndices = self.msrIndices!
        } catch {
            throw .kvm(error)
        }
        var states: [VCPUState] = []
        for (vcpu, runner) in runners.enumerated() {
            switch runner.saveState(msrIndices: msrIndices) {
            case .saved(let vcpuState): states.append(vcpuState)
            case .failed(let error): throw .kvm(error)
            case .notPaused, .paused, .resumed: throw .state(.notPaused)
            case .stopped: throw .state(.vmFailed(events.firstFailure.map { "\($0)" } ?? "vCPU \(vcpu) has stopped"))
            }
        }
        let inKernel: VMDeviceState
        do { inKernel = try vm.saveDeviceState() } catch { throw .kvm(error) }
        return MachineState(memorySize: configuration.memorySize, vcpus: states, devices: inKernel,
                            deviceStates: statefulDevices.map {
                                DeviceState(id: $0.stateID, version: $0.stateVersion, bytes: $0.saveState())
                            })
    }

    /// Puts a saved state into this incoming VM, once, before start(). Its memory is filled
    /// separately (before start()).
    /// Whether `saved` fits this VM (its vCPUs, its RAM), without restoring it: a standby checks
    /// each checkpoint's state this way before it applies and acknowledges the checkpoint.
    public func checkRestorable(_ saved: MachineState) throws(MachineError) {
        guard saved.vcpus.count == runners.count else {
            throw .state(.vcpuCountMismatch(saved: saved.vcpus.count, machine: runners.count))
        }
        guard saved.memorySize == configuration.memorySize else {
            throw .state(.memorySizeMismatch(saved: saved.memorySize, machine: configuration.memorySize))
        }
        guard saved.deviceStates.map(\.id) == statefulDevices.map(\.stateID) else {
            throw .state(.devicesMismatch(saved: saved.deviceStates.map(\.id), machine: statefulDevices.map(\.stateID)))
        }
    }

    public func restoreState(_ saved: MachineState) throws(MachineError) {
        lock.lock(); defer { lock.unlock() }
        guard boot == .incoming else { throw .state(.notIncoming) }
        guard !restored else { throw .state(.alreadyRestored) }
        guard state == .created else { throw .state(.alreadyStarted) }
        try checkRestorable(saved)
        // Whatever happens below, this VM's vCPUs are no longer in a state to restore into.
        restored = true
        do {
            // Before start(): no vCPU thread exists yet, so the caller writes the state itself.
            for (runner, vcpuState) in zip(runners, saved.vcpus) { try runner.restore(vcpuState) }
            try vm.restoreDeviceState(saved.devices)
        } catch {
            throw .kvm(error)
        }
        // Last, in the order saved (checkRestorable matched the ids): see MachineState.
        for (device, deviceState) in zip(statefulDevices, saved.deviceStates) {
            do throws(MachineStateError) { try device.restoreState(deviceState.bytes, version: deviceState.version) } catch {
                throw .state(error)
            }
        }
    }

    /// The vCPU threads' kernel ids, in vCPU order (0 for a vCPU not started).
    public var vcpuThreadIDs: [UInt32] { runners.map(\.threadID) }

    /// Kicks one vCPU out of KVM_RUN (it re-enters at once unless held or paused).
    public func kick(vcpu: Int) { runners[vcpu].kick() }

    /// The guest's own counters, read from its stats area.
    public func guestStats() -> GuestStats {
        GuestStats(memory: memory, vcpuCount: configuration.vcpuCount)
    }

    public var uptimeSeconds: Double {
        startTime == 0 ? 0 : Double(MonotonicClock.nanoseconds() - startTime) / 1e9
    }

    deinit {
        stop()
        // Without this the ring tracker, and with it all of guest memory, outlived the machine:
        // a receiver (or a benchmark) that went through many VMs kept every one's RAM.
        ringTracker?.kick = nil
    }
}
