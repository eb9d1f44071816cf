/// Which boot source a VM has. A migration's hello names it, with what that boot source
/// announces (`BootSource.announcement`), so that the destination builds the same one; the
/// generic code carries both without looking inside.
public enum BootSourceKind: UInt32, Sendable, CaseIterable {
    /// dirtymig's own workload guest (`WorkloadGuestBoot`).
    case workloadGuest = 1
}

/// What a VM boots, and the devices its guest talks to: the seam between `Machine` (hypervisor,
/// memory, vCPU threads, tracking, pause/save/restore) and one kind of guest. The workload guest
/// (`WorkloadGuestBoot`) is the one today; a Linux guest with its devices would be another.
protocol BootSource: Sendable {
    var kind: BootSourceKind { get }
    /// CPUID features the guest needs (a destination that lacks one refuses the migration).
    var requiredFeatures: CPUFeatureSet { get }
    /// Writes the guest into a fresh VM's memory and sets up its boot vCPU. Not called for an
    /// incoming VM: its memory and its CPUs' state arrive by migration.
    func load<VCPU: HypervisorVCPU>(into memory: GuestMemory, bootVCPU: VCPU, tscHz: UInt64) throws(MachineError)
    /// The devices the guest talks to, made for one machine, in the order their state is saved
    /// and restored (see `MachineState.deviceStates`).
    func devices(_ machine: DeviceContext) -> [MachineDevice]
    /// What a hello carries so that the destination builds the same boot source (see
    /// `BootSources.decode`).
    func announcement(tscHz: UInt64) -> [UInt8]
    /// Fills in what a machine's configuration says of its guest (the workload guest: each
    /// vCPU's workload), for a destination that built the boot source from a hello.
    func describe(_ configuration: inout MachineConfiguration)
}

/// What a boot source's devices may use of the machine they belong to.
struct DeviceContext {
    let vcpuCount: Int
    let memory: GuestMemory
    let events: MachineEvents
    let output: GuestOutput
}

/// A device as a machine is built with it: the device and the bus ranges it is registered on.
/// A device whose state travels with the VM's also conforms to `StatefulDevice`.
public struct MachineDevice: Sendable {
    public let device: any BusDevice
    public let ports: [ClosedRange<UInt16>]
    public let mmio: [ClosedRange<UInt64>]

    public init(_ device: any BusDevice, ports: [ClosedRange<UInt16>] = [], mmio: [ClosedRange<UInt64>] = []) {
        self.device = device
        self.ports = ports
        self.mmio = mmio
    }

    func register(on bus: inout DeviceBus) throws(DeviceBusError) {
        for range in ports { try bus.register(device, ports: range) }
        for range in mmio { try bus.register(device, mmio: range) }
    }
}

/// The boot sources a destination can build from a hello.
enum BootSources {
    /// The boot source `kind` announced with `announcement`, checked against the VM the hello
    /// announces (its RAM and vCPUs) before anything is allocated.
    static func decode(_ kind: BootSourceKind, _ announcement: [UInt8], memorySize: UInt64,
                       vcpuCount: Int) throws(MigrationError) -> any BootSource {
        switch kind {
        case .workloadGuest:
            return try WorkloadGuestBoot(announcement: announcement, memorySize: memorySize, vcpuCount: vcpuCount)
        }
    }
}
