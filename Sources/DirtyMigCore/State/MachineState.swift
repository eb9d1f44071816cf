/// A paused Machine's CPU, in-kernel device and userspace device state (Firecracker's
/// `MicrovmState` without memory, which migration moves separately): what `Machine.saveState()`
/// returns and an incoming Machine's `restoreState(_:)` takes.
///
/// Restored in this order (Firecracker's `persist.rs`): the vCPUs, in vCPU order; the in-kernel
/// devices (clock, then irqchips: `VMDeviceState`); then the userspace devices, in the order the
/// machine has them, which is the order they were saved in (`deviceStates`).
public struct MachineState: Sendable, Equatable {
    /// 2: the userspace devices' states.
    public static let version: UInt16 = 2
    /// Most vCPUs a decoded state may hold.
    public static let maxVCPUs = 1024
    /// Largest encoded vCPU state accepted (its XSAVE area plus at most 1024 MSRs, with room).
    static let maxVCPUStateBytes = VCPUState.maxXSAVEBytes + 64 << 10
    static let maxDeviceStateBytes = 64 << 10
    /// Most userspace device states a decoded state may hold.
    public static let maxDeviceStates = 64

    /// Guest RAM in bytes: the destination must have the same.
    public var memorySize: UInt64
    /// One per vCPU, in vCPU order.
    public var vcpus: [VCPUState]
    /// The in-kernel devices.
    public var devices: VMDeviceState
    /// The userspace devices that have state, in the machine's device order (ids unique).
    public var deviceStates: [DeviceState]

    public init(memorySize: UInt64, vcpus: [VCPUState], devices: VMDeviceState, deviceStates: [DeviceState] = []) {
        self.memorySize = memorySize
        self.vcpus = vcpus
        self.devices = devices
        self.deviceStates = deviceStates
    }

    /// Version 2: memory size u64, u32 vCPU count, each vCPU's encoding as a length-prefixed
    /// field, the in-kernel device state's encoding as one, then u32 userspace device count and
    /// per device: its id (a field), its state's version (u16) and its state (a field).
    public func encode() -> [UInt8] {
        var encoder = StateEncoder(magic: .machine, version: Self.version)
        encoder.u64(memorySize)
        encoder.u32(UInt32(vcpus.count))
        for vcpu in vcpus { encoder.field(vcpu.encode()) }
        encoder.field(devices.encode())
        encoder.u32(UInt32(deviceStates.count))
        for device in deviceStates {
            encoder.field(Array(device.id.utf8))
            encoder.u16(device.version)
            encoder.field(device.bytes)
        }
        return encoder.bytes
    }

    public init(decoding bytes: [UInt8]) throws(StateDecodingError) {
        var decoder = try StateDecoder(bytes, kind: .machine, version: Self.version)
        memorySize = try decoder.u64("memory size")
        let count = try decoder.count("vCPUs", limit: Self.maxVCPUs)
        var vcpus: [VCPUState] = []
        for index in 0..<count {
            let vcpu = try VCPUState(decoding: decoder.field("vCPU \(index)", limit: Self.maxVCPUStateBytes))
            guard vcpu.id == UInt32(index) else {
                throw .invalidValue(StateMagic.machine.name, field: "vCPU \(index)", "holds vCPU \(vcpu.id)")
            }
            vcpus.append(vcpu)
        }
        self.vcpus = vcpus
        devices = try VMDeviceState(decoding: decoder.field("device state", limit: Self.maxDeviceStateBytes))
        let deviceCount = try decoder.count("userspace devices", limit: Self.maxDeviceStates)
        var deviceStates: [DeviceState] = []
        for index in 0..<deviceCount {
            let idBytes = try decoder.field("device \(index) id", limit: DeviceState.maxIDBytes)
            let id = String(decoding: idBytes, as: UTF8.self)
            guard DeviceState.isValidID(id), Array(id.utf8) == idBytes else {
                throw .invalidValue(StateMagic.machine.name, field: "device \(index) id", "not 1 to \(DeviceState.maxIDBytes) printable ASCII characters")
            }
            guard !deviceStates.contains(where: { $0.id == id }) else {
                throw .invalidValue(StateMagic.machine.name, field: "device \(index) id", "'\(id)' appears twice")
            }
            let version = try decoder.u16("device '\(id)' version")
            let bytes = try decoder.field("device '\(id)' state", limit: DeviceState.maxBytes)
            deviceStates.append(DeviceState(id: id, version: version, bytes: bytes))
        }
        self.deviceStates = deviceStates
        try decoder.finish()
    }
}

/// Why a Machine could not save or restore its state.
public enum MachineStateError: Error, Equatable, CustomStringConvertible {
    case notPaused
    case vmFailed(String)
    case notIncoming
    case alreadyRestored
    case alreadyStarted
    case notRestored
    case vcpuCountMismatch(saved: Int, machine: Int)
    case memorySizeMismatch(saved: UInt64, machine: UInt64)
    /// The saved state's userspace devices are not this VM's (their ids, in order).
    case devicesMismatch(saved: [String], machine: [String])
    /// A device could not take its saved state.
    case deviceRefused(id: String, reason: String)

    public var description: String {
        switch self {
        case .notPaused:
            return "the VM's state can only be saved while it is paused"
        case .vmFailed(let reason):
            return "the VM failed, its state is not worth saving: \(reason)"
        case .notIncoming:
            return "state can only be restored into a VM created for an incoming migration (boot: .incoming)"
        case .alreadyRestored:
            return "this VM's state has already been restored; a state is restored once, into a new VM"
        case .alreadyStarted:
            return "this VM has already run; state can only be restored into a VM that has not started"
        case .notRestored:
            return "an incoming VM starts only after its state has been restored"
        case .vcpuCountMismatch(let saved, let machine):
            return "the saved state has \(saved) vCPUs, this VM \(machine)"
        case .memorySizeMismatch(let saved, let machine):
            return "the saved state is of a VM with \(saved >> 20) MiB of RAM, this VM has \(machine >> 20) MiB"
        case .devicesMismatch(let saved, let machine):
            return "the saved state has the devices [\(saved.joined(separator: ", "))], this VM [\(machine.joined(separator: ", "))]"
        case .deviceRefused(let id, let reason):
            return "device '\(id)' cannot take its saved state: \(reason)"
        }
    }
}
