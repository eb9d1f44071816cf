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
