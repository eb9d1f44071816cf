import Glibc

/// Everything needed to build a VM running the workload guest.
public struct MachineConfiguration: Sendable {
    public var name: String
    public var memorySize: UInt64
    public var vcpuCount: Int
    /// One per vCPU (see WorkloadPlan.resolve).
    public var workloads: [VCPUWorkload]
    /// nil: no dirty tracking at all (the baseline the benchmark compares against).
    public var tracking: TrackingMode?
    public var ringEntries: Int
    /// How often the ring harvester polls; zero disables it (ring-full exits only; for tests).
    public var harvestInterval: Duration

    public init(name: String = "vm", memorySize: UInt64, vcpuCount: Int, workloads: [VCPUWorkload],
                tracking: TrackingMode? = .ring, ringEntries: Int = 4096,
                harvestInterval: Duration = .milliseconds(1)) {
        self.name = name
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.workloads = workloads
        self.tracking = tracking
        self.ringEntries = ringEntries
        self.harvestInterval = harvestInterval
    }

    /// What the VM's process will hold in memory: every page its guest can touch (the system
    /// area below the workload base, and the union of the working sets, which boot populates
    /// and a migration fills) plus dirtymig's own.
    public var residentBytes: UInt64 {
        // Saturating: a configuration from the wire may hold any offsets.
        let ranges = workloads.filter { $0.kind != .idle && $0.size > 0 }
            .map { ($0.offset, $0.offset.addingReportingOverflow($0.size).overflow ? UInt64.max : $0.offset + $0.size) }
            .sorted { $0.0 < $1.0 }
        var covered: UInt64 = 0
        var end: UInt64 = 0
        for (start, stop) in ranges {
            if stop <= end { continue }
            covered += stop - max(start, end)
            end = stop
        }
        let guestPages = min(memorySize, GuestLayout.workloadBase.addingReportingOverflow(covered).overflow
                             ? UInt64.max : GuestLayout.workloadBase + covered)
        return guestPages + MemoryBudget.processOverhead
    }

    /// Throws unless this host can give the VM its memory now (available memory and the
    /// memory cgroup's limit, not total RAM).
    public func checkMemoryAvailable() throws(MachineError) {
        try MemoryBudget.check(needed: residentBytes, for: "VM '\(name)' (\(ByteSize.format(memorySize)) of RAM)")
    }

    /// A guest RAM size this host and the workload guest can have (boot's and receive's --memory).
    public static func validate(memorySize: UInt64) throws(MachineError) {
        if memorySize < GuestLayout.minimumMemory || memorySize % (2 << 20) != 0 {
            throw .invalidConfiguration("memory must be a multiple of 2 MiB and at least \(GuestLayout.minimumMemory >> 20) MiB")
        }
        let hostBytes = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        if memorySize > hostBytes {
            throw .invalidConfiguration("--memory \(memorySize >> 20) MiB is more than this host has (\(hostBytes >> 20) MiB)")
        }
        if memorySize > GuestLayout.maxAddressableBytes {
            throw .invalidConfiguration("the workload guest maps at most \(GuestLayout.maxAddressableBytes >> 30) GiB of RAM")
        }
    }

    /// Refuses requests this host cannot satisfy, before anything is allocated.
    public func validate(against kvm: KVMSystem) throws(MachineError) {
        try validate(against: kvm as any Hypervisor)
    }

    func validate(against hypervisor: any Hypervisor) throws(MachineError) {
        try Self.validate(memorySize: memorySize)
        let maxVCPUs = hypervisor.maxVCPUs
        if vcpuCount < 1 || vcpuCount > min(maxVCPUs, GuestLayout.maxVCPUs) {
            throw .invalidConfiguration("--vcpus \(vcpuCount): this host allows 1 to \(min(maxVCPUs, GuestLayout.maxVCPUs)) vCPUs (KVM allows \(maxVCPUs), the guest \(GuestLayout.maxVCPUs))")
        }
        if workloads.count != vcpuCount {
            throw .invalidConfiguration("\(workloads.count) workloads for \(vcpuCount) vCPUs")
        }
        if let tracking, tracking.usesDirtyRing {
            let maximum = hypervisor.maxDirtyRingEntries
            if maximum == 0 {
                throw .invalidConfiguration("this kernel has no dirty ring; use --track bitmap")
            }
            if ringEntries < 256 || ringEntries > maximum || ringEntries & (ringEntries - 1) != 0 {
                throw .invalidConfiguration("--ring-entries \(ringEntries): must be a power of two from 256 to \(maximum)")
            }
        }
    }
}

public enum MachineError: Error, CustomStringConvertible {
    /// An impossible request (exit status 2).
    case invalidConfiguration(String)
    /// The machine cannot give the memory now (see MemoryBudget).
    case insufficientMemory(what: String, needed: UInt64, available: UInt64, source: String)
    case guestFailed(String)
    case kvm(KVMError)
    case system(SystemError)
    case state(MachineStateError)

    public var description: String {
        switch self {
        case .invalidConfiguration(let text): return text
        case .insufficientMemory(let what, let needed, let available, let source):
            return "not enough memory for \(what): it needs \(ByteSize.format(needed)) (its working sets and dirtymig's own) and this host can give \(ByteSize.format(available)) now (\(source)); stop another VM, or use a smaller --memory or working set"
        case .guestFailed(let text): return text
        case .kvm(let error): return error.description
        case .system(let error): return error.description
        case .state(let error): return error.description
        }
    }
}
