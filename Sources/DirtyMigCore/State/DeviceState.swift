/// One userspace device's saved state, as `MachineState.deviceStates` carries it (Firecracker's
/// `DeviceStates` in `persist.rs`): which device (`id`, unique in a machine), the version of its
/// own encoding, and that encoding, which only the device reads.
public struct DeviceState: Sendable, Equatable {
    /// Longest id a decoded state may have; ids are printable ASCII.
    public static let maxIDBytes = 64
    /// Largest state of one device a decoded machine state may carry.
    public static let maxBytes = 1 << 20

    public var id: String
    public var version: UInt16
    public var bytes: [UInt8]

    public init(id: String, version: UInt16, bytes: [UInt8]) {
        self.id = id
        self.version = version
        self.bytes = bytes
    }

    /// Whether `id` is one a state may carry: 1 to `maxIDBytes` printable ASCII characters.
    static func isValidID(_ id: String) -> Bool {
        let bytes = Array(id.utf8)
        return !bytes.isEmpty && bytes.count <= maxIDBytes && bytes.allSatisfy { (0x21...0x7E).contains($0) }
    }
}

/// A device whose state travels with the VM's: saved, in the machine's device order, while the
/// vCPUs are paused; restored, in the same order, into the destination's device of the same id
/// after the vCPUs and the in-kernel devices (see `Machine.restoreState`).
public protocol StatefulDevice: BusDevice {
    /// Names the device's state; unique among a machine's devices.
    var stateID: String { get }
    /// The version of `saveState`'s encoding.
    var stateVersion: UInt16 { get }
    /// Called with every vCPU out of the guest.
    func saveState() -> [UInt8]
    /// Called once, before any vCPU runs; throws what the device cannot take (another version,
    /// malformed bytes), which refuses the whole state before the VM starts.
    func restoreState(_ bytes: [UInt8], version: UInt16) throws(MachineStateError)
}
