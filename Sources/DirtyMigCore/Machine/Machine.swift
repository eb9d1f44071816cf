import Foundation

/// A VM running the workload guest: KVM VM, guest RAM, vCPU threads and the dirty tracker,
/// assembled in the order KVM requires and torn down in reverse.
public final class Machine: IncomingVM, @unchecked Sendable {
    // @unchecked: the components are immutable after init and thread-safe themselves; `state` is
    // guarded by `lock`.
    public let configuration: MachineConfiguration
    public let kvm: KVMSystem
    public let vm: KVMVirtualMachine
    public let memory: GuestMemory
    public let vcpus: [KVMVCPU]
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
    /// The guest's TSC frequency, which paces its workloads.
    public let tscHz: UInt64
    public let guestConfig: GuestConfig
    public let boot: Boot
    /// Where every throttle puts its penalties; each vCPU thread waits them out.
    public let holds: VCPUHolds
    /// Auto-converge (`migrate --throttle cpu`).
    public let cpuThrottle: CPUThrottle
    private let runners: [VCPURunner<KVMVCPU>]
    /// The devices the vCPUs' port I/O and MMIO exits go to: the workload guest's ports.
    private let devices: DeviceBus

    /// How the VM's CPUs and memory begin.
    public enum Boot: Sendable {
        /// The workload guest boots from its image, with its config block and working sets.
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

    /// `memory`: guest RAM already allocated for this VM (PreparedMemory, for an incoming VM),
    /// of exactly its size; nil allocates it here.
    public init(_ configuration: MachineConfiguration, kvm: KVMSystem? = nil, boot: Boot = .fresh,
                memory prepared: GuestMemory? = nil) throws(MachineError) {
        precondition(prepared == nil || prepared?.size == configuration.memorySize)
        self.configuration = configuration
        self.boot = boot
        do {
            let kvm = try kvm ?? KVMSystem()
            try configuration.validate(against: kvm)
            // Before any allocation: a VM that would not fit is refused with the figures, not
            // OOM-killed later with no message (and another VM with it).
            // (Prepared memory was checked, and is resident, already.)
            if prepared == nil { try configuration.checkMemoryAvailable() }
            self.kvm = kvm
            vm = try kvm.createVM()
            memory = try prepared ?? GuestMemory(size: configuration.memorySize)
            holds = VCPUHolds(vcpuCount: configuration.vcpuCount)
            let memory = self.memory, vcpuCount = configuration.vcpuCount
            pace = GuestPaceHistory(read: { GuestStats(memory: memory, vcpuCount: vcpuCount).vcpus.map(\.pages) })

            // Tracking capabilities must be enabled before any memory slot or vCPU exists.
            var ringTracker: RingTracker? = nil
            switch configuration.tracking {
            case .bitmap?:
                tracker = try BitmapTracker(vm: vm, memory: memory)
            case .ring?, .quota?:
                let ring = try RingTracker(vm: vm, memory: memory, entries: configuration.ringEntries,
                                           mode: configuration.tracking!, holds: holds,
                                           pollInterval: configuration.harvestInterval)
                ringTracker = ring
                tracker = ring
            case nil:
                tracker = nil
            }
            self.ringTracker = ringTracker

            try vm.setTSSAddress(0xFFFB_D000)
            try vm.createIRQChip()
            try vm.setMemorySlots(of: memory, logDirtyPages: false)

            let cpuid = try kvm.supportedCPUID()
            var vcpus: [KVMVCPU] = []
            for id in 0..<configuration.vcpuCount {
                let vcpu = try vm.createVCPU(id: id)
                try vcpu.setCPUID(cpuid.forVCPU(apicID: UInt32(id)))
                try ringTracker?.attach(vcpu)
                vcpus.append(vcpu)
            }
            self.vcpus = vcpus
            tscHz = try vcpus[0].tscKHz() * 1000

            guestConfig = GuestConfig(tscHz: tscHz, memorySize: configuration.memorySize,
                                      vcpus: configuration.workloads)
            if boot == .fresh {
                let image = GuestImage.workload
                memory.write(image.bytes, at: image.loadAddress)
                memory.write(guestConfig.encode(), at: GuestLayout.configAddress)
                try MultibootEntry.configure(vcpus[0], entry: image.entryAddress)
                for workload in configuration.workloads where workload.kind != .idle && workload.size > 0 {
                    let start = GuestLayout.workloadBase + workload.offset
                    try memory.populate(start..<start + workload.size)
                }
            }
            var devices = DeviceBus()
            try WorkloadGuestPorts(vcpuCount: configuration.vcpuCount, memory: memory,
                                   reports: MachineGuestReports(events: events, output: output)).register(on: &devices)
            self.devices = devices
        } catch let error as MachineError {
            throw error
        } catch let error as KVMError {
            throw .kvm(error)
        } catch let error as SystemError {
            throw .system(error)
        } catch {
            throw .guestFailed("\(error)")
        }
        let events = self.events
        let tracker = self.tracker
        let ringTracker = self.ringTracker
        let holds = self.holds
        let devices = self.devices
        let runners = vcpus.map {
            VCPURunner(vcpu: $0, tracker: tracker, ring: ringTracker, holds: holds, events: events, bus: devices)
        }
        self.runners = runners
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
        for runner in runners { runner.start() }
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
            if self.msrIndices == nil { self.msrIndices = try kvm.migratableMSRIndices() }
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
        do {
            return MachineState(memorySize: configuration.memorySize, vcpus: states, devices: try vm.saveDeviceState())
        } catch {
            throw .kvm(error)
        }
    }

    /// Puts a saved state into this incoming VM, once, before start(). Its memory is filled
    /// separately (before start()).
    /// Whether `saved` fits this VM (its vCPUs, its RAM), without restoring it: a standby checks
    /// each checkpoint's state this way before it applies and acknowledges the checkpoint.
    public func checkRestorable(_ saved: MachineState) throws(MachineError) {
        guard saved.vcpus.count == vcpus.count else {
            throw .state(.vcpuCountMismatch(saved: saved.vcpus.count, machine: vcpus.count))
        }
        guard saved.memorySize == configuration.memorySize else {
            throw .state(.memorySizeMismatch(saved: saved.memorySize, machine: configuration.memorySize))
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
            for (runner, vcpuState) in zip(runners, saved.vcpus) {
                try runner.vcpu.restoreState(vcpuState)
                runner.restoreParked(vcpuState.parked)
            }
            try vm.restoreDeviceState(saved.devices)
        } catch {
            throw .kvm(error)
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
