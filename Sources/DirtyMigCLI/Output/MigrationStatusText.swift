import DirtyMigCore
import Foundation

/// The migration under way (`query-migrate`) as a person reads it, for `migrate --status`, and
/// the reply of `migrate --set`. A figure not measured yet says so; it is never shown as 0.
enum MigrationStatusText {
    static func render(_ progress: JSONValue, vm: String) -> String {
        var lines: [String] = []
        func row(_ key: String, _ value: String) { lines.append(key.padding(toLength: 20, withPad: " ", startingAt: 0) + value) }
        let phase = progress["phase"]?.stringValue ?? "?"
        let pass = Int(progress["iteration"]?.doubleValue ?? 0)
        let destination = progress["destination"]?.stringValue.map { " to \($0)" } ?? ""
        lines.append("migration of '\(vm)'\(destination): \(phase)" + (pass > 0 ? ", pass \(pass)" : ""))
        row("sent", mebibytes(progress["sent_bytes"]?.doubleValue ?? 0))
        if let link = progress["postcopy_link"], !link.isNull {
            if link["state"]?.stringValue == "paused" {
                row("post-copy paused", String(format: "for %.1f s: ", link["paused_s"]?.doubleValue ?? 0) + (link["reason"]?.stringValue ?? "-"))
            }
            row("link failures", String(format: "%.0f resumed, %.1f s paused in all", link["recoveries"]?.doubleValue ?? 0,
                                        link["paused_total_s"]?.doubleValue ?? 0))
        }
        if pass > 0 {
            var left = mebibytes(progress["remaining_bytes"]?.doubleValue ?? 0) + " left in this pass"
            if let percent = progress["pass_percent"]?.doubleValue, let pages = progress["pass_pages"]?.doubleValue {
                left += String(format: " (%.0f %% of its %@ sent)", percent, mebibytes(pages * 4096))
            }
            row("remaining", left)
        }
        let limit = progress["bandwidth_limit"]?.doubleValue.map { "limit " + rate($0) } ?? "no limit"
        row("rate", (progress["throughput_mib_s"]?.doubleValue.map { rate($0 * 1_048_576) + " over the last second" }
            ?? "not measured yet") + " (\(limit))")
        row("dirty rate", progress["dirty_pages_s"]?.doubleValue.map { HumanNumber.rate($0, unit: "pages/s") }
            ?? "not measured yet (known once a pass ends)")
        let downtimeLimit = progress["downtime_limit_ms"]?.doubleValue.map { " (limit \(HumanNumber.milliseconds($0)))" } ?? ""
        row("expected downtime", (progress["expected_downtime_ms"]?.doubleValue.map { String(format: "%.1f ms", $0) }
            ?? "not measured yet (known once pass 1 ends)") + downtimeLimit)
        row("throttle", throttle(progress["throttle"]))
        row("elapsed", String(format: "%.1f s", progress["elapsed_s"]?.doubleValue ?? 0))
        row("time left", progress["eta_s"]?.doubleValue.map { String(format: "about %.1f s (at the rates measured)", $0) }
            ?? (pass > 1 || progress["expected_downtime_ms"]?.doubleValue != nil
                ? "no estimate: the guest dirties about as fast as the link carries"
                : "not estimated yet (known once pass 1 ends)"))
        if let changes = progress["limit_changes"]?.doubleValue, changes > 0 {
            row("limits changed", "\(Int(changes)) time\(changes == 1 ? "" : "s") (the report says when)")
        }
        return lines.joined(separator: "\n")
    }

    /// What `--set` leaves in force.
    static func limitsSet(_ reply: JSONValue, vm: String) -> String {
        let bandwidth = reply["bandwidth"]?.doubleValue.map { rate($0) } ?? "unlimited"
        let downtime = reply["downtime_ms"]?.doubleValue.map { HumanNumber.milliseconds($0) } ?? "?"
        let when = String(format: "pass %d, %.1f s in", Int(reply["iteration"]?.doubleValue ?? 0), reply["t_s"]?.doubleValue ?? 0)
        return "migration of '\(vm)': bandwidth \(bandwidth), downtime limit \(downtime) from its next decision on (\(reply["phase"]?.stringValue ?? "?"), \(when))"
    }

    /// One line of the throttle's level: its kind and whether it holds the guest, with what.
    static func throttle(_ level: JSONValue?) -> String {
        guard let level, !level.isNull, let kind = level["kind"]?.stringValue else { return "not judged yet (after the first pass or second)" }
        guard kind != "none" else { return "none (--throttle none)" }
        guard level["active"]?.boolValue == true else { return "\(kind), not needed so far" }
        if let percent = level["cpu_percent"]?.doubleValue { return String(format: "%@: every vCPU held %.0f %% of the time", kind, percent) }
        if let ceilings = level["ceiling_mib_s"]?.arrayValue {
            let text = ceilings.enumerated().map { index, value in
                "vCPU \(index) " + (value.doubleValue.map { String(format: "%.1f MiB/s", $0) } ?? "none")
            }.joined(separator: ", ")
            return "\(kind): dirty-rate ceilings \(text)"
        }
        return "\(kind), active"
    }

    static func mebibytes(_ bytes: Double) -> String { String(format: "%.1f MiB", bytes / 1_048_576) }
    static func rate(_ bytesPerSecond: Double) -> String { String(format: "%.1f MiB/s", bytesPerSecond / 1_048_576) }
}
