/// Where a VM's devices sit: two address spaces, I/O ports and MMIO (guest-physical addresses no
/// memory slot holds), each a set of non-overlapping ranges with the device registered on each
/// (Firecracker's `Bus`, kvmtool's `kvm__register_pio` / `kvm__register_mmio`). A vCPU's I/O exit
/// is handed to the device whose range holds its address; what happens to an access nobody
/// claims is the vCPU's decision (see `VCPURunner`).
///
/// A value: the machine registers its devices, then gives each vCPU thread its copy, which it
/// only reads, so a lookup takes no lock.
public struct DeviceBus: Sendable {
    public enum Space: String, Sendable, Equatable {
        case port, mmio
    }

    /// What became of one access.
    public enum Dispatch: Sendable, Equatable {
        /// A device took it, and asks this of the vCPU.
        case handled(DeviceRequest)
        /// No device's range holds the address.
        case unclaimed
    }

    private var ports = AddressSpace()
    private var mmio = AddressSpace()

    public init() {}

    /// Registers `device` on the ports `range`; refuses a range that overlaps one registered
    /// already. A device may be registered on several ranges.
    public mutating func register(_ device: any BusDevice, ports range: ClosedRange<UInt16>) throws(DeviceBusError) {
        try ports.insert(device, UInt64(range.lowerBound)...UInt64(range.upperBound), space: .port)
    }

    /// Registers `device` on the guest-physical addresses `range` (MMIO).
    public mutating func register(_ device: any BusDevice, mmio range: ClosedRange<UInt64>) throws(DeviceBusError) {
        try mmio.insert(device, range, space: .mmio)
    }

    /// The device whose range holds `address` in `space`, and that range.
    public func device(_ space: Space, at address: UInt64) -> (device: any BusDevice, range: ClosedRange<UInt64>)? {
        (space == .port ? ports : mmio).lookup(address)
    }

    /// Hands a write to the device that claims `address`.
    public func write(_ space: Space, at address: UInt64, _ data: IOData, vcpu: Int) -> Dispatch {
        guard let (device, range) = device(space, at: address) else { return .unclaimed }
        return .handled(device.write(DeviceAccess(vcpu: vcpu, address: address, offset: address - range.lowerBound), data))
    }

    /// Hands a read to the device that claims `address`; unclaimed, `data` is left as it is.
    public func read(_ space: Space, at address: UInt64, into data: IOData, vcpu: Int) -> Dispatch {
        guard let (device, range) = device(space, at: address) else { return .unclaimed }
        return .handled(device.read(DeviceAccess(vcpu: vcpu, address: address, offset: address - range.lowerBound), into: data))
    }
}

/// Registration refused.
public enum DeviceBusError: Error, Equatable, CustomStringConvertible {
    /// `requested` overlaps `registered`, a range a device holds already.
    case overlap(space: DeviceBus.Space, requested: ClosedRange<UInt64>, registered: ClosedRange<UInt64>)

    public var description: String {
        switch self {
        case .overlap(let space, let requested, let registered):
            func show(_ range: ClosedRange<UInt64>) -> String {
                "0x\(String(range.lowerBound, radix: 16))-0x\(String(range.upperBound, radix: 16))"
            }
            let what = space == .port ? "ports" : "MMIO addresses"
            return "cannot register a device on \(what) \(show(requested)): they overlap \(show(registered)), which a device holds already"
        }
    }
}

/// One address space: ranges sorted by their first address, none overlapping.
private struct AddressSpace: Sendable {
    private struct Entry: @unchecked Sendable {
        // @unchecked: `device` is a Sendable protocol's existential; the entry is immutable.
        let range: ClosedRange<UInt64>
        let device: any BusDevice
    }

    private var entries: [Entry] = []

    /// The index of the first entry whose range starts after `address`.
    private func firstStarting(after address: UInt64) -> Int {
        var low = 0, high = entries.count
        while low < high {
            let middle = (low + high) / 2
            if entries[middle].range.lowerBound <= address { low = middle + 1 } else { high = middle }
        }
        return low
    }

    mutating func insert(_ device: any BusDevice, _ range: ClosedRange<UInt64>, space: DeviceBus.Space) throws(DeviceBusError) {
        let index = firstStarting(after: range.lowerBound)
        // Only the neighbours can overlap: the one before ends before the next one starts.
        if index > 0, entries[index - 1].range.overlaps(range) {
            throw .overlap(space: space, requested: range, registered: entries[index - 1].range)
        }
        if index < entries.count, entries[index].range.overlaps(range) {
            throw .overlap(space: space, requested: range, registered: entries[index].range)
        }
        entries.insert(Entry(range: range, device: device), at: index)
    }

    func lookup(_ address: UInt64) -> (device: any BusDevice, range: ClosedRange<UInt64>)? {
        let index = firstStarting(after: address)
        guard index > 0, entries[index - 1].range.contains(address) else { return nil }
        return (entries[index - 1].device, entries[index - 1].range)
    }
}
