/// The workload guest as a boot source: its image at 1 MiB, its config block (`GuestConfig`) at
/// `GuestLayout.configAddress`, entered as a Multiboot kernel on vCPU 0, its working sets
/// populated ahead; its four I/O ports as one device (`WorkloadGuestPorts`). Its announcement in
/// a hello is its config block, which gives each vCPU's workload.
struct WorkloadGuestBoot: BootSource {
    let memorySize: UInt64
    /// One per vCPU.
    let workloads: [VCPUWorkload]

    var kind: BootSourceKind { .workloadGuest }
    var requiredFeatures: CPUFeatureSet { .workloadGuest }

    init(memorySize: UInt64, workloads: [VCPUWorkload]) {
        self.memorySize = memorySize
        self.workloads = workloads
    }

    /// The config block a hello carries, checked against the announced VM: it agrees with it and
    /// keeps the working sets inside RAM.
    init(announcement: [UInt8], memorySize: UInt64, vcpuCount: Int) throws(MigrationError) {
        let config: GuestConfig
        do { config = try GuestConfig(decoding: announcement) } catch {
            throw .protocolError(.malformed("guest config block: \(error)"))
        }
        guard config.memorySize == memorySize, config.vcpus.count == vcpuCount else {
            throw .refused("the guest config block (\(config.vcpus.count) vCPUs, \(config.memorySize) bytes) disagrees with the announced VM (\(vcpuCount) vCPUs, \(memorySize) bytes)")
        }
        let workloadArea = memorySize > GuestLayout.workloadBase ? memorySize - GuestLayout.workloadBase : 0
        for (index, workload) in config.vcpus.enumerated() where workload.kind != .idle {
            guard workload.size <= workloadArea, workload.offset <= workloadArea - workload.size else {
                throw .refused("vCPU \(index)'s working set (\(workload.size) bytes at offset \(workload.offset)) lies outside the VM's \(memorySize) bytes of RAM")
            }
        }
        self.init(memorySize: memorySize, workloads: config.vcpus)
    }

    func config(tscHz: UInt64) -> GuestConfig {
        GuestConfig(tscHz: tscHz, memorySize: memorySize, vcpus: workloads)
    }

    func load<VCPU: HypervisorVCPU>(into memory: GuestMemory, bootVCPU: VCPU, tscHz: UInt64) throws(MachineError) {
        let image = GuestImage.workload
        memory.write(image.bytes, at: image.loadAddress)
        memory.write(config(tscHz: tscHz).encode(), at: GuestLayout.configAddress)
        do { try MultibootEntry.configure(bootVCPU, entry: image.entryAddress) } catch { throw .kvm(error) }
        for workload in workloads where workload.kind != .idle && workload.size > 0 {
            let start = GuestLayout.workloadBase + workload.offset
            do { try memory.populate(start..<start + workload.size) } catch { throw .system(error) }
        }
    }

    /// The four ports, one device. It has no state to carry: a console line under assembly when the VM pauses for good
    /// is dropped with the source, as it always was.
    func devices(_ machine: DeviceContext) -> [MachineDevice] {
        [WorkloadGuestPorts(vcpuCount: machine.vcpuCount, memory: machine.memory,
                            reports: MachineGuestReports(events: machine.events, output: machine.output)).machineDevice]
    }

    func announcement(tscHz: UInt64) -> [UInt8] { config(tscHz: tscHz).encode() }

    func describe(_ configuration: inout MachineConfiguration) { configuration.workloads = workloads }
}
