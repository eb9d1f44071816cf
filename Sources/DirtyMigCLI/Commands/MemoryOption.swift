import DirtyMigCore

extension ParsedArguments {
    /// `--memory SIZE` (boot: the VM's RAM; receive: the RAM to prepare): a size the workload
    /// guest can have. Whether the host has it now is checked when it is allocated.
    func guestMemorySize() throws(UsageError) -> UInt64? {
        guard let memory = try size("memory") else { return nil }
        guard memory >= GuestLayout.minimumMemory else {
            throw error("--memory \(ByteSize.format(memory)) is below the guest's minimum of \(ByteSize.format(GuestLayout.minimumMemory))")
        }
        guard memory <= GuestLayout.maxAddressableBytes else {
            throw error("--memory \(ByteSize.format(memory)) is more than the guest can map (\(ByteSize.format(GuestLayout.maxAddressableBytes)))")
        }
        guard memory % (2 << 20) == 0 else { throw error("--memory must be a multiple of 2 MiB") }
        return memory
    }
}
