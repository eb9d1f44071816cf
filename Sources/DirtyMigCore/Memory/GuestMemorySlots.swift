extension KVMVirtualMachine {
    /// Installs (or re-installs with new flags) every memory slot of `memory`. Re-installing a
    /// slot with KVM_MEM_LOG_DIRTY_PAGES is how dirty logging is turned on and off.
    public func setMemorySlots(of memory: GuestMemory, logDirtyPages: Bool) throws(KVMError) {
        for region in memory.regions {
            try setMemoryRegion(slot: region.slot, guestPhysicalAddress: region.guestPhysicalAddress,
                                size: region.size, hostAddress: memory.hostAddress(region: region),
                                logDirtyPages: logDirtyPages)
        }
    }
}
