import Glibc

/// Why KVM could not do what was asked, phrased so the user knows what to do next.
public enum KVMError: Error, CustomStringConvertible {
    case deviceMissing(path: String)
    case permissionDenied(path: String)
    case deviceUnusable(path: String, SystemError)
    case unsupportedAPIVersion(Int32)
    case missingCapability(String)
    case ioctl(String, SystemError)
    case vcpuFailed(vcpu: Int, reason: String, registers: VCPURegisterDump?)

    public var description: String {
        switch self {
        case .deviceMissing(let path):
            return "\(path) does not exist: this machine has no KVM. Load the kvm module (modprobe kvm_intel or kvm_amd), enable virtualisation in the firmware, or run on a host (or a VM with nested virtualisation) that offers KVM."
        case .permissionDenied(let path):
            return "no permission to open \(path). Add yourself to its group (usually 'kvm': sudo usermod -aG kvm $USER, then log in again) or run as a user who can open it."
        case .deviceUnusable(let path, let error):
            return "cannot use \(path): \(error)"
        case .unsupportedAPIVersion(let version):
            return "KVM API version \(version) is not supported (dirtymig needs version 12)."
        case .missingCapability(let name):
            return "this kernel's KVM lacks \(name), which dirtymig needs here."
        case .ioctl(let name, let error):
            return "\(name) failed: \(error)"
        case .vcpuFailed(let vcpu, let reason, let registers):
            var text = "vCPU \(vcpu) stopped: \(reason)"
            if let registers { text += "\n" + registers.description }
            return text
        }
    }
}

/// Calls a KVM ioctl, retrying on EINTR, and names it in the error.
@discardableResult
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String,
              _ argument: UnsafeMutableRawPointer?) throws(KVMError) -> Int32 {
    while true {
        let result = ckvmIoctl(fd, request, argument)
        if result >= 0 { return result }
        if errno == EINTR { continue }
        throw .ioctl(name(), SystemError(name()))
    }
}

@discardableResult
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String,
              value: UInt) throws(KVMError) -> Int32 {
    while true {
        let result = ckvmIoctlValue(fd, request, value)
        if result >= 0 { return result }
        if errno == EINTR { continue }
        throw .ioctl(name(), SystemError(name()))
    }
}

/// The same for an ioctl whose argument is a variable-sized byte buffer (e.g. struct kvm_xsave).
func kvmIoctl(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String,
              bytes: inout [UInt8]) throws(KVMError) {
    while true {
        let result = bytes.withUnsafeMutableBytes { ckvmIoctl(fd, request, $0.baseAddress) }
        if result >= 0 { return }
        if errno == EINTR { continue }
        throw .ioctl(name(), SystemError(name()))
    }
}

/// An ioctl that fills a struct (KVM_GET_*): KVM writes a zeroed one, which is returned.
func kvmGet<T: KVMStruct>(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String) throws(KVMError) -> T {
    var value = T()
    _ = try withUnsafeMutableBytes(of: &value) { (bytes) throws(KVMError) in try kvmIoctl(fd, request, name(), bytes.baseAddress) }
    return value
}

/// An ioctl that reads a struct (KVM_SET_*), given a pointer to a copy of `value`.
func kvmSet<T: KVMStruct>(_ fd: Int32, _ request: UInt, _ name: @autoclosure () -> String, _ value: T) throws(KVMError) {
    var copy = value
    _ = try withUnsafeMutableBytes(of: &copy) { (bytes) throws(KVMError) in try kvmIoctl(fd, request, name(), bytes.baseAddress) }
}
