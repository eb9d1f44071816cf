import DirtyMigCore
import Foundation

/// `dirtymig boot`: build the VM, serve its control socket, run until SIGINT/SIGTERM or `quit`.
enum BootCommand {
    struct Options {
        var memory: UInt64 = 1 << 30
        var vcpus = 2
        var workloads: [VCPUWorkload] = []
        var track = TrackingMode.ring
        var ringEntries = 4096
        var control: String
        var name = ControlSocketPath.defaultName
        var exportImage: String?
        var exportConfig: String?
        var detach = false
    }

    /// Everything that can be checked without touching KVM; failures are usage errors (exit 2).
    static func options(_ arguments: ParsedArguments) throws(UsageError) -> Options {
        var options = Options(control: "")
        if let memory = try arguments.guestMemorySize() { options.memory = memory }
        if let vcpus = try arguments.count("vcpus") {
            guard vcpus <= GuestLayout.maxVCPUs else {
                throw arguments.error("--vcpus \(vcpus): the workload guest supports at most \(GuestLayout.maxVCPUs) vCPUs")
            }
            options.vcpus = vcpus
        }
        if let track = try arguments.choice("track") { options.track = TrackingMode(rawValue: track)! }
        if let entries = try arguments.count("ring-entries") {
            guard options.track.usesDirtyRing else {
                throw arguments.error("--ring-entries applies to --track ring or quota, not bitmap")
            }
            guard entries >= 256, entries <= 65536, entries & (entries - 1) == 0 else {
                throw arguments.error("--ring-entries \(entries): must be a power of two from 256 to 65536 (the kernel's ring sizes)")
            }
            options.ringEntries = entries
        }
        if let name = arguments.string("name") {
            do { try ControlSocketPath.validate(name: name) } catch { throw arguments.error(error.desc) }
            options.name = name
        }
        options.control = arguments.string("control") ?? ControlSocketPath.path(forName: options.name)
        var specs: [WorkloadSpec] = []
        do {
            for text in arguments.strings("workload") { specs.append(try WorkloadSpec.parse(text)) }
            if specs.isEmpty { specs = WorkloadPlan.defaultSpecs(vcpuCount: options.vcpus, memorySize: options.memory) }
            options.workloads = try WorkloadPlan.resolve(specs: specs, vcpuCount: options.vcpus, memorySize: options.memory)
        } catch {
            throw arguments.error("--workload: \(error.message)")
        }
        options.detach = arguments.has("detach")
        options.exportImage = arguments.string("export-image")
        options.exportConfig = arguments.string("export-config")
        if options.exportConfig != nil && options.exportImage == nil {
            throw arguments.error("--export-config needs --export-image")
        }
        return options
    }

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let options = try options(arguments)
        if let image = options.exportImage { return try export(options, image: image) }
        let guestOutput = try GuestOutputFile.requested(by: arguments)
        if options.detach { return try Detach.run(controlPath: options.control, name: options.name, state: "running") }

        let kvm: KVMSystem
        do { kvm = try KVMSystem() } catch { throw RuntimeFailure("\(error)") }
        let configuration = MachineConfiguration(name: options.name, memorySize: options.memory, vcpuCount: options.vcpus,
                                                 workloads: options.workloads, tracking: options.track,
                                                 ringEntries: options.ringEntries)
        do { try configuration.validate(against: kvm) } catch {
            throw UsageError(message: error.description, command: "boot")
        }
        let server = ControlServer(path: options.control, vmName: options.name)
        let stop = StopSignals()   // before any other thread exists
        // The name is claimed now (a clash shows before the VM is built); clients are served
        // once every command is registered (VMHost.serve).
        do { try server.start(serving: false) } catch { throw RuntimeFailure("\(error)") }
        let machine: Machine
        do { machine = try Machine(configuration, kvm: kvm) } catch {
            server.stop()
            throw RuntimeFailure("cannot build the VM: \(error)")
        }
        // Before the guest runs, so that its first line (seq=1) is not dropped.
        machine.output.setSink(guestOutput?.sink)
        do { try machine.start() } catch {
            server.stop()
            throw RuntimeFailure("cannot start the VM: \(error)")
        }
        return VMHost.serve(machine, server: server, stop: stop,
                            ready: "dirtymig: VM '\(options.name)' running (\(ByteSize.format(options.memory)), \(options.vcpus) vCPU\(options.vcpus == 1 ? "" : "s"), --track \(options.track.rawValue)); control socket \(options.control)")
    }

    /// --export-image: the same guest and config for QEMU.
    static func export(_ options: Options, image: String) throws -> Int32 {
        let tscHz: UInt64
        do { tscHz = try HostTSC.frequency() } catch { throw RuntimeFailure("cannot learn the TSC frequency to pace the guest: \(error)") }
        let config = GuestConfig(tscHz: tscHz, memorySize: options.memory, vcpus: options.workloads)
        let configPath = options.exportConfig ?? image + ".config"
        do {
            try Data(GuestImage.workload.bytes).write(to: URL(fileURLWithPath: image))
            try Data(config.encode()).write(to: URL(fileURLWithPath: configPath))
        } catch {
            throw RuntimeFailure("cannot write the exported guest: \(error.localizedDescription)")
        }
        printError("dirtymig: wrote the guest image to \(image) and its config block to \(configPath)")
        emit(QEMUCommand.arguments(image: image, config: configPath, memory: options.memory, vcpus: options.vcpus)
            .joined(separator: " "))
        return 0
    }
}

