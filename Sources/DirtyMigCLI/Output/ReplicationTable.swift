import DirtyMigCore
import Foundation

/// A replication's figures as a two-column table, for people (`--json` is for scripts).
enum ReplicationTable {
    static func render(_ figures: JSONValue) -> String {
        var lines: [String] = []
        func row(_ key: String, _ value: String) { lines.append(key.padding(toLength: 24, withPad: " ", startingAt: 0) + value) }
        func value(_ key: String, _ format: String = "%.1f") -> String {
            figures[key]?.doubleValue.map { String(format: format, $0) } ?? "-"
        }
        func spread(_ key: String, _ parts: [String], _ format: String = "%.2f") -> String {
            parts.map { part in "\(part) " + (figures[key]?[part]?.doubleValue.map { String(format: format, $0) } ?? "-") }
                .joined(separator: ", ")
        }
        var status = figures["status"]?.stringValue ?? "-"
        if let left = figures["reprotect_s_left"]?.doubleValue { status += String(format: " (reconnecting, %.0f s left)", left.rounded(.up)) }
        row("status", status)
        if let again = figures["reprotections"]?.doubleValue, again > 0 {
            let deltas = Int(figures["reprotect_deltas"]?.doubleValue ?? 0)
            row("protected again", "\(Int(again)) time\(again == 1 ? "" : "s") after the standby was lost (\(deltas) sending only what changed)")
        }
        if let last = figures["last_reprotect"], !last.isNull {
            var text = last["kind"]?.stringValue == "delta"
                ? "what changed since checkpoint \(Int(last["standby_held_epoch"]?.doubleValue ?? 0))"
                : "the whole VM (\(last["full_because"]?.stringValue ?? "-"))"
            text += String(format: ": %@ pages, %.1f MiB in %.0f ms", HumanNumber.grouped(last["pages"]?.doubleValue ?? 0),
                           (last["bytes"]?.doubleValue ?? 0) / 1_048_576, last["ms"]?.doubleValue ?? 0)
            row("last re-protection", text)
        }
        guard figures["status"]?.stringValue != "none" else { return lines.joined(separator: "\n") + "  (this VM is not replicating)" }
        if let error = figures["error"]?.stringValue { row("error", error) }
        row("standby", figures["standby"]?.stringValue ?? "-")
        if let channel = figures["channel"], !channel.isNull { row("channel", ReportTable.channelText(channel)) }
        if let compression = ReportTable.compressionText(figures["compression"]) { row("compression", compression) }
        row("track", figures["track"]?.stringValue ?? "-")
        var trigger = value("checkpoint_interval_ms") + " ms"
        if let pages = figures["checkpoint_pages"]?.doubleValue { trigger += ", or \(HumanNumber.grouped(pages)) dirty pages" }
        if let effective = figures["effective_interval_ms"]?.doubleValue {
            trigger += String(format: " (median epoch %.1f ms)", effective)
        }
        row("checkpoint every", trigger)
        // A figure that was not measured (null in the JSON) is said so or left out, never printed as 0.
        guard let initial = figures["initial_copy_ms"]?.doubleValue else {
            row("setup", figures["setup_ms"]?.doubleValue.map { String(format: "%.1f ms", $0) } ?? "not done: no handshake")
            row("initial copy", figures["status"]?.stringValue == "starting" ? "in progress (no checkpoint yet)"
                : "not done: no checkpoint was taken, nothing to measure")
            return lines.joined(separator: "\n")
        }
        row("initial copy", String(format: "%.1f ms, %.1f MiB (setup %@ ms)", initial,
                                   (figures["initial_copy_bytes"]?.doubleValue ?? 0) / 1_048_576, value("setup_ms")))
        row("checkpoints", "\(HumanNumber.grouped(figures["checkpoints"]?.doubleValue ?? 0)) acknowledged, "
            + (figures["checkpoints_per_s"]?.doubleValue.map { String(format: "%.1f per s", $0) } ?? "rate not measured (not protected)")
            + ", lag \(value("lag_checkpoints", "%.0f"))")
        if figures["pause_ms"]?["median"]?.doubleValue != nil {
            row("pause per checkpoint", spread("pause_ms", ["median", "p99", "max"]) + " ms")
            // The parts of the median checkpoint itself, which add up to its pause (the medians
            // of the parts did not: each came from another checkpoint); resume comes after it.
            if let parts = figures["median_pause_parts_ms"]?.objectValue, !parts.isEmpty {
                let within = parts.filter { $0.0 != "resume" }
                let resume = parts.first { $0.0 == "resume" }?.1.doubleValue
                row("  the median pause", within.map { String(format: "%@ %.3f", $0.0.replacingOccurrences(of: "_", with: " "), $0.1.doubleValue ?? 0) }
                    .joined(separator: " + ") + " ms" + (resume.map { String(format: "; then resume %.3f ms", $0) } ?? ""))
            }
            row("dirty pages/checkpoint ", spread("dirty_pages", ["median", "max"], "%.0f")
                + (figures["dirty_pages"]?["copied_paused_median"]?.doubleValue.map { String(format: " (median %.0f copied in the pause)", $0) } ?? ""))
        } else {
            row("pause per checkpoint", "not measured (no checkpoint in the window)")
        }
        if let rate = figures["bytes_per_s"]?.doubleValue { row("bandwidth", String(format: "%.1f MiB/s", rate / 1_048_576)) }
        let delays = figures["output_delay_ms"]?["median"]?.doubleValue != nil ? spread("output_delay_ms", ["median", "p99"]) + " ms" : "not measured"
        row("output delay", delays + " (\(value("output_lines_released", "%.0f")) lines released, \(value("output_lines_held", "%.0f")) held)")
        row("ring overruns", "\(value("ring_overruns", "%.0f")) (\(value("resyncs", "%.0f")) resyncs)")
        return lines.joined(separator: "\n")
    }
}
