/// A device on the `DeviceBus`: what a guest's port I/O or MMIO access in a range the device was
/// registered on does (kvmtool's `kvm__register_pio` ops, Firecracker's `BusDevice`). Called on
/// the thread of the vCPU that made the access, while that vCPU waits in its exit; several vCPUs
/// may call one device at once.
public protocol BusDevice: AnyObject, Sendable {
    /// The guest reads (IN, INS, an MMIO read): fill `data`. What the device leaves unwritten is
    /// what the guest reads (for KVM, whatever the exit's data area held).
    func read(_ access: DeviceAccess, into data: IOData) -> DeviceRequest
    /// The guest writes `data` (OUT, OUTS, an MMIO write).
    func write(_ access: DeviceAccess, _ data: IOData) -> DeviceRequest
}

/// Where one access landed: which vCPU made it, at which port or guest-physical address, and how
/// far into the range the device was registered on.
public struct DeviceAccess: Sendable, Equatable {
    public var vcpu: Int
    /// The port, or the guest-physical address.
    public var address: UInt64
    /// `address` minus the first address of the device's range.
    public var offset: UInt64

    public init(vcpu: Int, address: UInt64, offset: UInt64) {
        self.vcpu = vcpu
        self.address = address
        self.offset = offset
    }
}

/// What a device asks of the vCPU whose access it handled: the one way a device affects the
/// vCPU's state machine.
public enum DeviceRequest: Sendable, Equatable {
    /// Nothing: the vCPU goes on.
    case none
    /// Never run this vCPU again (the workload guest's park port: its work is done, and in ring 3
    /// it cannot halt).
    case parkVCPU
}
