import DirtyMigCore
import Foundation

/// `dirtymig dirtyrate`: per-interval dirty rates of a running VM, as table rows or JSON lines.
enum DirtyRateCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let interval = try arguments.duration("interval") ?? 1.0
        guard interval >= 0.05, interval <= 3600 else {
            throw arguments.error("--interval must be between 50ms and 60m")
        }
        let count = try arguments.count("count")
        let requestedMode = try arguments.choice("mode").flatMap(DirtyRateMode.init(rawValue:))
        let json = arguments.has("json")

        let client = try ControlClient(path: ControlSocketPath.resolve(vm: arguments.string("vm")))
        defer { client.close() }
        let status = try client.call("query-status")
        let tracking = status["track"]?.stringValue.flatMap(TrackingMode.init(rawValue:))
        let mode = requestedMode ?? DirtyRateMode.best(for: tracking)
        guard mode.isServed(by: tracking) else {
            throw RuntimeFailure("--mode \(mode.rawValue) needs a VM booted with \(mode.requiredTracking); '\(client.vmName)' was booted with --track \(tracking?.rawValue ?? "none")")
        }
        let vcpuCount = Int(status["vcpus"]?.intValue ?? 0)
        // Check workloads get a column with their mismatch count (it only ever grows).
        let checking = Set((status["vcpu_stats"]?.arrayValue ?? []).enumerated().compactMap { index, vcpu in
            vcpu["workload"]?.stringValue?.hasPrefix("check") == true ? index : nil
        })
        let table = RateTable(vcpus: vcpuCount, perVCPU: mode == .ring, checking: checking)
        if !json {
            emit("dirty rate of '\(client.vmName)', --mode \(mode.rawValue) (\(Self.describe(mode))), every \(HumanNumber.milliseconds(interval * 1000))")
            emit(table.header)
        }

        var previous: DirtyCounterSnapshot? = nil
        if mode != .sample { previous = try snapshot(client) }
        var produced = 0
        while count.map({ produced < $0 }) ?? true {
            let report: DirtyRateReport
            if mode == .sample {
                let reply = try client.call("query-dirty-rate", arguments: ["mode": "sample", "interval": .double(interval)])
                report = try decodeSampleReport(reply)
            } else {
                Thread.sleep(forTimeInterval: interval)
                let next = try snapshot(client)
                report = DirtyRateReport.between(previous!, next, mode: mode)
                previous = next
            }
            emit(json ? report.json.serialized() : table.row(report))
            produced += 1
        }
        return 0
    }

    private static func snapshot(_ client: ControlClient) throws -> DirtyCounterSnapshot {
        let reply = try client.call("query-dirty-counters")
        guard let snapshot = DirtyCounterSnapshot(json: reply) else {
            throw RuntimeFailure("the VM sent dirty counters this dirtymig cannot read")
        }
        return snapshot
    }

    private static func decodeSampleReport(_ reply: JSONValue) throws -> DirtyRateReport {
        guard let report = DirtyRateReport(json: reply) else {
            throw RuntimeFailure("the VM sent a dirty-rate report this dirtymig cannot read")
        }
        return report
    }
}

extension DirtyRateCommand {
    /// What a mode counts, in the words the table's caption uses.
    static func describe(_ mode: DirtyRateMode) -> String {
        switch mode {
        case .ring: return "every page written, per vCPU, from the dirty ring"
        case .bitmap: return "every page written, from the dirty bitmap"
        case .sample: return "pages found changed in a sample, estimated"
        }
    }
}

/// The terminal form: one row per interval.
struct RateTable {
    let vcpus: Int
    let perVCPU: Bool
    /// vCPUs that run a check workload: their guest_errors get a column.
    var checking: Set<Int> = []

    var header: String {
        var text = pad("TIME", 9) + pad("TOTAL MiB/s", 12, right: true)
        for id in 0..<vcpus {
            if perVCPU { text += pad("v\(id) MiB/s", 11, right: true) }
            text += pad("v\(id) guest pg/s", 15, right: true)
            if checking.contains(id) { text += pad("v\(id) errors", 11, right: true) }
        }
        return text
    }

    func row(_ report: DirtyRateReport) -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "HH:mm:ss"
        var text = pad(formatter.string(from: Date(timeIntervalSince1970: report.unixTime)), 9)
            + pad(String(format: "%.2f", report.totalMiBPerSecond), 12, right: true)
        for rate in report.vcpus {
            if perVCPU { text += pad(rate.dirtyMiBPerSecond.map { String(format: "%.2f", $0) } ?? "-", 11, right: true) }
            text += pad(String(format: "%.0f", rate.guestPagesPerSecond), 15, right: true)
            if checking.contains(rate.id) { text += pad(rate.guestErrors.map { String($0) } ?? "-", 11, right: true) }
        }
        return text
    }

    private func pad(_ text: String, _ width: Int, right: Bool = false) -> String {
        let space = String(repeating: " ", count: max(1, width - text.count))
        return right ? space + text : text + space
    }
}
