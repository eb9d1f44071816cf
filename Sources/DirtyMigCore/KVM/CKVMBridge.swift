import CKVM

// The only place that calls ioctl(2) through the C shim.
@inline(__always)
func ckvmIoctl(_ fd: Int32, _ request: UInt, _ argument: UnsafeMutableRawPointer?) -> Int32 {
    ckvm_ioctl(fd, request, argument)
}

@inline(__always)
func ckvmIoctlValue(_ fd: Int32, _ request: UInt, _ value: UInt) -> Int32 {
    ckvm_ioctl_value(fd, request, value)
}

/// A plain C struct from <linux/kvm.h> (no pointers) that an ioctl fills or reads whole, and that
/// saved state carries as its raw bytes; init() zeroes it.
protocol KVMStruct { init() }
extension kvm_regs: KVMStruct {}
extension kvm_sregs: KVMStruct {}
extension kvm_xcrs: KVMStruct {}
extension kvm_debugregs: KVMStruct {}
extension kvm_lapic_state: KVMStruct {}
extension kvm_vcpu_events: KVMStruct {}
extension kvm_irqchip: KVMStruct {}
extension kvm_clock_data: KVMStruct {}
extension kvm_mp_state: KVMStruct {}
