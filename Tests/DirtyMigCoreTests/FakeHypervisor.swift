import CKVM
@testable import DirtyMigCore
import Foundation
import XCTest

// A hypervisor without /dev/kvm, behind the seam `Machine` is built over (`Hypervisor`,
// `HypervisorVM`, `HypervisorVCPU`, `DirtyTracker`): Machine, the migration sender and receiver
// and the replicator run on it unchanged. Its vCPUs stay "in the guest" until kicked, as KVM_RUN
// does, and touch no memory: which pages are dirty, and what they hold, is the test's to decide
// (`FakeTracker.onCollect`).

/// A vCPU for the state machine, without /dev/kvm: `runOnce` hands out scripted exits, then
/// stays "in the guest" (blocks) until kicked, as KVM_RUN does; immediate_exit set before entry
/// returns at once. It logs what the runner did to it, in order. Its registers are what was set
/// (the boot source's entry) or restored; each entry into the guest moves RIP on by one, so a
/// saved state shows where the vCPU got to.
final class FakeVCPU: HypervisorVCPU, @unchecked Sendable {
    // @unchecked: everything is guarded by `condition`.
    let id: Int
    private let condition = NSCondition()
    private var immediateExit = false
    private var script: [VCPUExit]
    private var pending = false
    private var inGuest = false
    private var entries = 0
    private var log: [String] = []
    private var regs = kvm_regs()
    private var sregs = kvm_sregs()
    private var mpState: UInt32 = 0
    /// Called (on the vCPU thread, outside the lock) as a scripted exit is returned.
    var onExit: (@Sendable () -> Void)?
    /// When set, saveState waits for it (outside the lock).
    var saveGate: DispatchSemaphore?
    static let tscKHz: UInt64 = 2_000_000

    init(id: Int = 0, script: [VCPUExit] = []) {
        self.id = id
        self.script = script
    }

    /// A state with nothing in it but the vCPU's id.
    static func blankState(id: Int) -> VCPUState {
        VCPUState(id: UInt32(id), parked: false, mpState: 0, regs: kvm_regs(), sregs: kvm_sregs(),
                  xsave: [UInt8](repeating: 0, count: 4096),
                  xcrs: nil, debugRegisters: nil, lapic: kvm_lapic_state(), msrs: [], events: kvm_vcpu_events(),
                  tscKHz: UInt32(tscKHz))
    }

    func runOnce() throws(KVMError) -> VCPUExit {
        condition.lock(); defer { condition.unlock() }
        entries += 1
        pending = false   // entering completes the last exit
        if immediateExit {
            immediateExit = false
            log.append("interrupted")
            return .interrupted
        }
        regs.rip &+= 1
        if !script.isEmpty {
            let exit = script.removeFirst()
            pending = true
            log.append("exit")
            if let onExit {
                condition.unlock()
                onExit()
                condition.lock()
            }
            return exit
        }
        inGuest = true
        condition.broadcast()
        while !immediateExit { condition.wait() }
        inGuest = false
        immediateExit = false
        log.append("kicked")
        return .interrupted
    }

    func completePendingExit() throws(KVMError) -> VCPUExit? {
        condition.lock(); defer { condition.unlock() }
        immediateExit = false   // as KVM's: set for the completing KVM_RUN, cleared after
        if pending { log.append("completed") }
        pending = false
        return nil
    }

    func requestImmediateExit(_ value: Bool) {
        condition.lock()
        immediateExit = value
        condition.broadcast()
        condition.unlock()
    }

    func saveState(msrIndices: [UInt32]) throws(KVMError) -> VCPUState {
        if let saveGate {
            condition.lock(); log.append("saving"); condition.unlock()
            saveGate.wait()
        }
        condition.lock(); defer { condition.unlock() }
        log.append(pending ? "saved with the exit pending" : "saved")
        var state = Self.blankState(id: id)
        state.regs = regs
        state.sregs = sregs
        state.mpState = mpState
        state.msrs = msrIndices.map { MSREntry(index: $0, value: UInt64($0) << 8) }
        return state
    }

    func restoreState(_ state: VCPUState) throws(KVMError) -> [UInt32] {
        condition.lock(); defer { condition.unlock() }
        log.append("restored")
        regs = state.regs
        sregs = state.sregs
        mpState = state.mpState
        return []
    }

    func tscKHz() throws(KVMError) -> UInt64 { Self.tscKHz }
    func getSpecialRegisters() throws(KVMError) -> kvm_sregs { condition.lock(); defer { condition.unlock() }; return sregs }
    func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) { condition.lock(); self.sregs = sregs; condition.unlock() }
    func setRegisters(_ regs: kvm_regs) throws(KVMError) { condition.lock(); self.regs = regs; condition.unlock() }
    func registerDump() -> VCPURegisterDump? { nil }

    var entryCount: Int { condition.lock(); defer { condition.unlock() }; return entries }
    var events: [String] { condition.lock(); defer { condition.unlock() }; return log }
    var registers: (regs: kvm_regs, sregs: kvm_sregs) { condition.lock(); defer { condition.unlock() }; return (regs, sregs) }

    /// Waits until the runner is inside `runOnce`, blocked "in the guest".
    func waitUntilInGuest(timeout: Double = 5) -> Bool {
        let deadline = Date(timeIntervalSinceNow: timeout)
        condition.lock(); defer { condition.unlock() }
        while !inGuest { if !condition.wait(until: deadline) { return inGuest } }
        return true
    }
}

/// Dirty tracking whose dirty pages the test decides: `markDirty`, or `onCollect`, which is asked
/// at every collection (its index counts from 0) for the pages the guest "wrote" since the one
/// before (it may write them into guest memory first). Every collection is kept, in order.
final class FakeTracker: DirtyTracker, @unchecked Sendable {
    // @unchecked: the mutable state is guarded by `lock`; `onCollect` is set before use.
    let mode: TrackingMode
    private let pageCount: Int
    private let lock = NSLock()
    private var pending: DirtyPageBitmap
    private var total: UInt64 = 0
    private var made: [[Int]] = []
    private(set) var started = false
    var onCollect: (@Sendable (Int) -> [Int])?

    init(mode: TrackingMode, pageCount: Int) {
        self.mode = mode
        self.pageCount = pageCount
        pending = DirtyPageBitmap(pageCount: pageCount)
    }

    func markDirty(_ pages: [Int]) {
        lock.lock(); defer { lock.unlock() }
        for page in pages { pending.set(page) }
        total += UInt64(pages.count)
    }

    /// The pages each collection handed over, in collection order.
    var collections: [[Int]] { lock.lock(); defer { lock.unlock() }; return made }

    private func take() -> DirtyPageBitmap {
        let index = lock.withLock { made.count }
        if let written = onCollect?(index) { markDirty(written) }
        lock.lock(); defer { lock.unlock() }
        let pages = pending
        pending.removeAll()
        made.append(pages.pageList().map(Int.init).sorted())
        return pages
    }

    func start() throws(KVMError) { lock.withLock { started = true } }
    func stop() { lock.withLock { started = false } }
    func sync() throws(KVMError) {}
    func counters() -> DirtyCounters {
        lock.lock(); defer { lock.unlock() }
        return DirtyCounters(timeNanoseconds: MonotonicClock.nanoseconds(), totalPages: total, vcpuPages: nil,
                             ringFullExits: nil, ringOverruns: nil, quotaExits: nil)
    }
    func collect() throws(KVMError) -> DirtyCollection { DirtyCollection(pages: take(), losses: []) }
    func collectList() throws(KVMError) -> DirtyList { DirtyList(pages: take().pageList(), losses: []) }
    var hasDirtyTrigger: Bool { false }
    func setDirtyTrigger(pages: Int?, _ fire: (@Sendable () -> Void)?) {}
    func vcpuExitedRingFull(_ vcpu: Int, resetEpochAtEntry: UInt64) throws(KVMError) {}
    var resetEpoch: UInt64 { 0 }
}

/// One fake VM: what the machine installed, its vCPUs and its tracker, and an in-kernel device
/// state (a clock) that save and restore carry.
final class FakeVM: HypervisorVM, @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    /// The exits vCPU 0 takes first (the guest's port I/O), before it stays in the guest.
    private let script: [VCPUExit]
    private var made: [FakeVCPU] = []
    private(set) var tracker: FakeTracker?
    private(set) var installedMemory: GuestMemory?
    /// The kvmclock value saved (and, restored, found) with the irqchip-less device state.
    var clock: UInt64 = 0

    var vcpus: [FakeVCPU] { lock.withLock { made } }

    init(script: [VCPUExit]) { self.script = script }

    func makeTracker(_ mode: TrackingMode, memory: GuestMemory, configuration: MachineConfiguration,
                     holds: VCPUHolds) throws(KVMError) -> any DirtyTracker {
        let tracker = FakeTracker(mode: mode, pageCount: memory.pageCount)
        lock.withLock { self.tracker = tracker }
        return tracker
    }

    func install(memory: GuestMemory) throws(KVMError) { lock.withLock { installedMemory = memory } }

    func createVCPU(id: Int, cpuid: CPUIDTable, tracker: (any DirtyTracker)?) throws(KVMError) -> FakeVCPU {
        let vcpu = FakeVCPU(id: id, script: id == 0 ? script : [])
        lock.withLock { made.append(vcpu) }
        return vcpu
    }

    func saveDeviceState() throws(KVMError) -> VMDeviceState {
        var data = kvm_clock_data()
        data.clock = lock.withLock { clock }
        return VMDeviceState(irqChips: [], clock: data)
    }

    func restoreDeviceState(_ state: VMDeviceState) throws(KVMError) {
        lock.withLock { clock = state.clock?.clock ?? 0 }
    }
}

/// The system: generous limits, the workload guest's CPU features, a TSC that ticks at the fake
/// vCPUs' rate; every VM it made, in order.
final class FakeHypervisor: Hypervisor, @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var made: [FakeVM] = []
    /// The exits vCPU 0 of each VM made from now on takes first.
    private let script: [VCPUExit]

    init(vcpu0Exits script: [VCPUExit] = []) { self.script = script }

    var vms: [FakeVM] { lock.withLock { made } }
    var maxVCPUs: Int { 64 }
    var maxDirtyRingEntries: Int { 0 }
    var cpuFeatures: CPUFeatureSet { .workloadGuest }
    var canScaleTSC: Bool { false }
    var tscKHz: UInt64? { FakeVCPU.tscKHz }
    func supportedCPUID() throws(KVMError) -> CPUIDTable { CPUIDTable(raw: ckvm_cpuid()) }
    func migratableMSRIndices() throws(KVMError) -> [UInt32] { [MSREntry.tsc, 0x10] }
    func createVM() throws(KVMError) -> FakeVM {
        let vm = FakeVM(script: script)
        lock.withLock { made.append(vm) }
        return vm
    }
}

extension Machine {
    /// A machine running the workload guest (idle vCPUs) on `hypervisor`, bitmap-tracked.
    static func onFake(_ hypervisor: FakeHypervisor, memorySize: UInt64 = 64 << 20, vcpus: Int = 2,
                       extraDevices: [MachineDevice] = [], boot: Boot = .fresh) throws -> Machine {
        let workloads = (0..<vcpus).map { VCPUWorkload(kind: .idle, seed: UInt64($0)) }
        let configuration = MachineConfiguration(name: "fake", memorySize: memorySize, vcpuCount: vcpus,
                                                 workloads: workloads, tracking: .bitmap)
        return try Machine(configuration, hypervisor: hypervisor,
                           bootSource: WorkloadGuestBoot(memorySize: memorySize, workloads: workloads),
                           extraDevices: extraDevices, boot: boot)
    }
}
