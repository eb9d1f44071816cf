import DirtyMigCore
import Foundation

/// One of the migration issue's scenarios, written once as the `dirtymig boot` options a user
/// would type. dirtymig boots exactly these; QEMU runs the image and config block that
/// `dirtymig boot --export-image` writes for the same options; the in-process row resolves the
/// same `--workload` text with the CLI's own parser. So all three run one guest doing one thing.
struct MigrationScenario {
    /// `--scenario` value.
    let key: String
    /// Table label.
    let label: String
    let memory: UInt64
    let vcpus: Int
    /// `--workload` values.
    let workloadSpecs: [String]
    /// What the guest must have done before the migration starts: booted all vCPUs, and each
    /// writer completed this many passes over its working set (0: just booted).
    let writerPassesBeforeMigrating: UInt64
    /// How much memory `--warm` touches and frees before each migration: what the guest wrote,
    /// plus 64 MiB for the image, page tables and stacks, which hold data too.
    let warmBytes: UInt64
    /// `dirtymig migrate --downtime` / QEMU's downtime-limit.
    let downtimeMs = 300

    var bootArguments: [String] {
        ["--memory", "\(memory >> 20)M", "--vcpus", "\(vcpus)"] + workloadSpecs.flatMap { ["--workload", $0] }
    }

    /// The workloads `dirtymig boot` makes of `workloadSpecs` (for the in-process row).
    func resolvedWorkloads() throws -> [VCPUWorkload] {
        let specs = try workloadSpecs.map { text throws(QuantityError) in try WorkloadSpec.parse(text) }
        return try WorkloadPlan.resolve(specs: specs, vcpuCount: vcpus, memorySize: memory)
    }

    /// Whether a guest whose counters read `progress` may be migrated. The same rule for both
    /// VMMs; only how the counters are read differs (control socket or QMP pmemsave).
    func isReady(_ progress: GuestProgress, workloads: [VCPUWorkload]) -> Bool {
        guard progress.bootedVCPUs >= vcpus, progress.passes.count == vcpus else { return false }
        return zip(workloads, progress.passes).allSatisfy { workload, passes in
            workload.kind == .idle || passes >= writerPassesBeforeMigrating
        }
    }

    static let all = [
        MigrationScenario(key: "idle", label: "4 GiB, guest wrote nothing", memory: 4 << 30, vcpus: 1,
                          workloadSpecs: ["idle"], writerPassesBeforeMigrating: 0, warmBytes: 0),
        MigrationScenario(key: "written", label: "2 GiB, 1 GiB written once, idle", memory: 2 << 30, vcpus: 1,
                          workloadSpecs: ["write,ws=1G,offset=0,passes=1"], writerPassesBeforeMigrating: 1,
                          warmBytes: (1 << 30) + (64 << 20)),
        // One whole pass first: the migration then meets the steady state (256 MiB being
        // rewritten), not the first touches of the working set.
        MigrationScenario(key: "rewriting", label: "1 GiB, rewriting 256 MiB at 200 MiB/s", memory: 1 << 30, vcpus: 1,
                          workloadSpecs: ["write,ws=256M,offset=0,rate=200M"], writerPassesBeforeMigrating: 1,
                          warmBytes: (256 << 20) + (64 << 20)),
    ]
}

/// A guest's own counters, however they were read.
struct GuestProgress {
    var bootedVCPUs: Int
    /// Completed passes over its working set, per vCPU.
    var passes: [UInt64]
    /// Pages touched, per vCPU.
    var pages: [UInt64]

    init(_ stats: GuestStats) {
        bootedVCPUs = stats.bootedVCPUs
        passes = stats.vcpus.map(\.passes)
        pages = stats.vcpus.map(\.pages)
    }

    /// From a dirtymig VM's `query-status` reply.
    init(status: JSONValue) {
        bootedVCPUs = Int(status["guest_booted_vcpus"]?.doubleValue ?? 0)
        let vcpus = status["vcpu_stats"]?.arrayValue ?? []
        passes = vcpus.map { UInt64($0["passes"]?.doubleValue ?? 0) }
        pages = vcpus.map { UInt64($0["pages"]?.doubleValue ?? 0) }
    }
}
