/// A paused Machine's CPU and in-kernel device state (Firecracker's `MicrovmState` without
/// memory, which migration moves separately): what `Machine.saveState()` returns and an
/// incoming Machine's `restoreState(_:)` takes.
public struct MachineState: Sendable, Equatable {
    public static let version: UInt16 = 1
    /// Most vCPUs a decoded state may hold.
    public static let maxVCPUs = 1024
    /// Largest encoded vCPU state accepted (its XSAVE area plus at most 1024 MSRs, with room).
    static let maxVCPUStateBytes = VCPUState.maxXSAVEBytes + 64 << 10
    static let maxDeviceStateBytes = 64 << 10

    /// Guest RAM in bytes: the destination must have the same.
    public var memorySize: UInt64
    /// One per vCPU, in vCPU order.
    public var vcpus: [VCPUState]
    public var devices: VMDeviceState

    public init(memorySize: UInt64, vcpus: [VCPUState], devices: VMDeviceState) {
        self.memorySize = memorySize
        self.vcpus = vcpus
        self.devices = devices
    }

    /// Version 1: memory size u64, u32 vCPU count, each vCPU's encoding as a length-prefixed
    /// field, then the device state's encoding as one.
    public func encode() -> [UInt8] {
        var encoder = StateEncoder(magic: .machine, version: Self.version)
        encoder.u64(memorySize)
        encoder.u32(UInt32(vcpus.count))
        for vcpu in vcpus { encoder.field(vcpu.encode()) }
        encoder.field(devices.encode())
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
        }
    }
}
