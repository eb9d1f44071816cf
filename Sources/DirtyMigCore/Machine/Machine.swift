import Foundation

/// A VM running the workload guest: KVM VM, guest RAM, vCPU threads and the dirty tracker,
/// assembled in the order KVM requires and torn down in reverse.
public final class Machine: @unchecked Sendable {
    // @unchecked: the components are immutable after init and thread-safe themselves; `state` is
    // guarded by `lock`.
    public let configuration: MachineConfiguration
    public let kvm: KVMSystem
    public let vm: KVMVirtualMachine
    public let memory: GuestMemory
    public let vcpus: [KVMVCPU]
    public let tracker: DirtyTracker?
    public let events = MachineEvents()
    /// The guest's TSC frequency, which paces its workloads.
    public let tscHz: UInt64
    public let guestConfig: GuestConfig
    private let runners: [VCPURunner]

    private enum State { case created, running, paused, stopped }
    private let lock = NSLock()
    private var state = State.created
    public private(set) var startTime: UInt64 = 0

    public init(_ configuration: MachineConfiguration, kvm: KVMSystem? = nil) throws(MachineError) {
        self.configuration = configuration
        do {
            let kvm = try kvm ?? KVMSystem()
            try configuration.validate(against: kvm)
            self.kvm = kvm
            vm = try kvm.createVM()
            memory = try GuestMemory(size: configuration.memorySize)

            // Tracking capabilities must be enabled before any memory slot or vCPU exists.
            var ringTracker: RingTracker? = nil
            switch configuration.tracking {
            case .bitmap?:
                tracker = try BitmapTracker(vm: vm, memory: memory)
            case .ring?, .quota?:
                let ring = try RingTracker(vm: vm, memory: memory, entries: configuration.ringEntries,
                                           mode: configuration.tracking!, pollInterval: configuration.harvestInterval)
                ringTracker = ring
                tracker = ring
            case nil:
                tracker = nil
            }

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

            let image = GuestImage.workload
            memory.write(image.bytes, at: image.loadAddress)
            guestConfig = GuestConfig(tscHz: tscHz, memorySize: configuration.memorySize,
                                      vcpus: configuration.workloads)
            memory.write(guestConfig.encode(), at: GuestLayout.configAddress)
            try MultibootEntry.configure(vcpus[0], entry: image.entryAddress)
            for workload in configuration.workloads where workload.kind != .idle && workload.size > 0 {
                let start = GuestLayout.workloadBase + workload.offset
                try memory.populate(start..<start + workload.size)
            }
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
        runners = vcpus.map { VCPURunner(vcpu: $0, tracker: tracker, events: events) }
        if let ring = tracker as? RingTracker {
            // Weak: the tracker outlives nothing; a strong capture would make
            // tracker -> kick -> runners -> tracker a cycle that keeps the VM's memory alive.
            ring.kick = { [weak self] vcpu in self?.kick(vcpu: vcpu) }
        }
    }

    /// Starts tracking (so nothing the guest writes is missed) and then the vCPUs.
    public func start() throws(MachineError) {
        lock.lock(); defer { lock.unlock() }
        guard state == .created else { return }
        do { try tracker?.start() } catch { throw .kvm(error) }
        startTime = MonotonicClock.nanoseconds()
        for runner in runners { runner.start() }
        state = .running
    }

    /// Takes every vCPU out of the guest and keeps it out until resume().
    public func pause() {
        lock.lock(); defer { lock.unlock() }
        guard state == .running else { return }
        for runner in runners { runner.pause() }
        state = .paused
    }

    public func resume() {
        lock.lock(); defer { lock.unlock() }
        guard state == .paused else { return }
        for runner in runners { runner.resume() }
        state = .running
    }

    /// Stops the vCPU threads and the tracker. Memory is released when the Machine is.
    public func stop() {
        lock.lock(); defer { lock.unlock() }
        guard state == .running || state == .paused else { state = .stopped; return }
        for runner in runners { runner.stop() }
        tracker?.stop()
        state = .stopped
    }

    /// Kicks one vCPU out of KVM_RUN (it re-enters at once unless held or paused).
    public func kick(vcpu: Int) { runners[vcpu].kick() }

    /// The guest's own counters, read from its stats area.
    public func guestStats() -> GuestStats {
        GuestStats(statsArea: UnsafeRawPointer(memory.hostPointer(ramOffset: GuestLayout.statsAddress)),
                   vcpuCount: configuration.vcpuCount)
    }

    public var uptimeSeconds: Double {
        startTime == 0 ? 0 : Double(MonotonicClock.nanoseconds() - startTime) / 1e9
    }

    deinit { stop() }
}
