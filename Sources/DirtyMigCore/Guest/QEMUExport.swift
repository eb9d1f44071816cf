import Foundation

/// Runs the same workload guest under QEMU: the image goes in with `-kernel` (QEMU's multiboot
/// loader puts it at 1 MiB and starts the BSP exactly as our VMM does) and the config block with
/// `-device loader` at GuestLayout.configAddress. The guest's stats area can then be read with
/// QMP `pmemsave` (GuestStats(bytes:vcpuCount:) decodes the dump).
public struct QEMUExport: Sendable {
    public var imagePath: String
    public var configPath: String
    public var memorySize: UInt64
    public var vcpuCount: Int
    /// `-qmp unix:PATH,server=on,wait=off` when set.
    public var qmpSocketPath: String?
    /// `-debugcon file:PATH` when set: the guest's console port (0xE9) lands there.
    public var debugconPath: String?
    /// `-mem-prealloc`: QEMU allocates all guest RAM up front, as dirtymig populates working
    /// sets before the guest runs. Without it the first pass over a working set runs at the speed
    /// of host page faults (slow for random patterns), not at the configured rate.
    public var preallocate: Bool
    public var executable: String

    public init(imagePath: String, configPath: String, memorySize: UInt64, vcpuCount: Int,
                qmpSocketPath: String? = nil, debugconPath: String? = nil, preallocate: Bool = true,
                executable: String = "qemu-system-x86_64") {
        self.imagePath = imagePath
        self.configPath = configPath
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.qmpSocketPath = qmpSocketPath
        self.debugconPath = debugconPath
        self.preallocate = preallocate
        self.executable = executable
    }

    /// QEMU's `-m` value: whole MiB where possible (QEMU's unit when there is no suffix).
    public static func memoryArgument(_ bytes: UInt64) -> String {
        bytes % (1 << 20) == 0 ? "\(bytes >> 20)M" : "\(bytes)B"
    }

    /// The arguments after the executable name. No `-cpu host` (QEMU aborts with it on some
    /// hosts) and no firmware options: the default CPU has long mode, and SeaBIOS boots the
    /// multiboot image in 2-5 s. `-no-reboot`: a guest that triple-faults ends QEMU instead of
    /// booting again (and counting its vCPUs twice in the stats area).
    public var arguments: [String] {
        var args = ["-accel", "kvm",
                    "-m", QEMUExport.memoryArgument(memorySize),
                    "-smp", "\(vcpuCount)",
                    "-kernel", imagePath,
                    "-device", "loader,file=\(configPath),addr=0x\(String(GuestLayout.configAddress, radix: 16))",
                    "-display", "none",
                    "-serial", "none",
                    "-monitor", "none",
                    "-no-reboot"]
        if preallocate { args.append("-mem-prealloc") }
        if let path = qmpSocketPath { args += ["-qmp", "unix:\(path),server=on,wait=off"] }
        if let path = debugconPath { args += ["-debugcon", "file:\(path)"] }
        return args
    }

    /// The whole command, quoted for a POSIX shell.
    public var commandLine: String {
        ([executable] + arguments).map(QEMUExport.shellQuoted).joined(separator: " ")
    }

    public static func shellQuoted(_ word: String) -> String {
        let safe = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./=:,+@%")
        if !word.isEmpty && word.allSatisfy({ safe.contains($0) }) { return word }
        return "'" + word.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    /// Writes the flat image and the config block where the command line expects them.
    public func writeFiles(config: GuestConfig, image: GuestImage = .workload) throws {
        try Data(image.bytes).write(to: URL(fileURLWithPath: imagePath))
        try Data(config.encode()).write(to: URL(fileURLWithPath: configPath))
    }

    /// The QMP `pmemsave` arguments that dump the stats area of `vcpuCount` vCPUs into `path`.
    public func statsDumpArguments(to path: String) -> (address: UInt64, size: Int, path: String) {
        (GuestLayout.statsAddress, GuestLayout.statsHeaderSize + GuestLayout.statsRecordSize * vcpuCount, path)
    }

    /// The host's TSC frequency, which is the guest's under KVM unless told otherwise (QEMU does
    /// not change it by default): KVM_GET_TSC_KHZ on a scratch vCPU (HostTSC), else what the
    /// kernel publishes in sysfs. Nil when neither works.
    public static func hostTSCHz() -> UInt64? {
        if let hz = try? HostTSC.frequency(), hz > 0 { return hz }
        if let text = try? String(contentsOfFile: "/sys/devices/system/cpu/cpu0/tsc_freq_khz", encoding: .utf8),
           let khz = UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines)), khz > 0 {
            return khz * 1000
        }
        return nil
    }
}

/// How to run the exported workload guest under QEMU: the same image, the same config block.
/// (The executable name first, then QEMUExport's arguments, then `extra`.)
public enum QEMUCommand {
    public static func arguments(image: String, config: String, memory: UInt64, vcpus: Int,
                                 extra: [String] = []) -> [String] {
        let export = QEMUExport(imagePath: image, configPath: config, memorySize: memory, vcpuCount: vcpus)
        return [export.executable] + export.arguments + extra
    }
}

/// The host's TSC frequency, which the guest paces its workloads with: asked of KVM (a throwaway
/// VM's vCPU), which is what both our guests and QEMU's see.
public enum HostTSC {
    public static func frequency(kvm: KVMSystem? = nil) throws -> UInt64 {
        let kvm = try kvm ?? KVMSystem()
        let vm = try kvm.createVM()
        let vcpu = try vm.createVCPU(id: 0)
        return try vcpu.tscKHz() * 1000
    }
}
