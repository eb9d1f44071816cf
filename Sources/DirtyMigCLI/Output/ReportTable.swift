import DirtyMigCore
import Foundation

/// The migration report as a two-column table, for people (`--json` is for scripts).
enum ReportTable {
    /// "TLSv1.3 TLS_AES_128_GCM_SHA256, userspace TLS, peer PSK identity ... (handshake 1.2 ms)", or plaintext.
    static func channelText(_ channel: JSONValue) -> String {
        guard channel["encrypted"]?.boolValue == true else { return "plaintext (not encrypted, not authenticated)" }
        let offload = channel["kernel_tls"]?.boolValue == true ? "kernel TLS" : "userspace TLS"
        return "\(channel["protocol"]?.stringValue ?? "TLS") \(channel["cipher"]?.stringValue ?? "?"), \(offload), peer \(channel["peer_identity"]?.stringValue ?? "?")"
            + String(format: " (handshake %.1f ms)", channel["handshake_ms"]?.doubleValue ?? 0)
    }

    /// "zstd: 33 of 33 batches, 64.0 MiB of pages in 19.2 MiB (ratio 3.34), 241 ms compressing", or nil
    /// when compression was off.
    static func compressionText(_ compression: JSONValue?) -> String? {
        guard let compression, let mode = compression["mode"]?.stringValue, mode != "none" else { return nil }
        func mib(_ key: String) -> String { String(format: "%.1f MiB", (compression[key]?.doubleValue ?? 0) / 1_048_576) }
        return "\(mode): \(Int(compression["compressed_batches"]?.doubleValue ?? 0)) of \(Int(compression["batches"]?.doubleValue ?? 0)) batches, "
            + "\(mib("page_bytes")) of pages in \(mib("page_wire_bytes"))"
            + String(format: " (ratio %.2f), %.0f ms compressing", compression["ratio"]?.doubleValue ?? 1, compression["compress_ms"]?.doubleValue ?? 0)
    }

    /// The post-copy phase, when the migration switched: why and when, where its pages went,
    /// and what the destination's guest waited (null figures are said to be missing, not 0).
    static func postcopyRows(_ postcopy: JSONValue?) -> [(String, String)] {
        guard let postcopy, !postcopy.isNull else { return [] }
        func number(_ key: String) -> Double { postcopy[key]?.doubleValue ?? 0 }
        var rows = [("post-copy", String(format: "after pass %.0f at %.0f ms: ", number("after_passes"), number("switched_at_ms"))
                     + (postcopy["reason"]?.stringValue ?? "-"))]
        rows.append(("  pages", "\(HumanNumber.grouped(number("lacking_pages"))) lacking: \(HumanNumber.grouped(number("answered_pages"))) on demand (\(HumanNumber.grouped(number("requested_pages"))) asked), \(HumanNumber.grouped(number("pushed_pages"))) pushed; "
                     + String(format: "%.1f MiB in %.0f ms", number("bytes") / 1_048_576, number("ms"))))
        if number("recoveries") > 0 {
            rows.append(("  link", String(format: "failed and resumed %.0f time%@, paused %.0f ms in all; %@ pages sent again (in flight at a failure)",
                                          number("recoveries"), number("recoveries") == 1 ? "" : "s", number("paused_ms"),
                                          HumanNumber.grouped(number("resent_pages")))))
        }
        if let latency = postcopy["fault_latency_us"], !latency.isNull {
            let blocked = (postcopy["vcpu_blocked_ms"]?.arrayValue ?? []).map { String(format: "%.1f", $0.doubleValue ?? 0) }
            rows.append(("  faults", "\(HumanNumber.grouped(number("faults"))), "
                         + String(format: "latency p50 %.0f µs, p99 %.0f µs, max %.0f µs", latency["p50"]?.doubleValue ?? 0,
                                  latency["p99"]?.doubleValue ?? 0, latency["max"]?.doubleValue ?? 0)
                         + "; vCPUs blocked " + blocked.joined(separator: ", ") + " ms"))
        } else {
            rows.append(("  faults", "not measured: the destination gave no final word"))
        }
        return rows
    }

    static func render(_ report: JSONValue) -> String {
        var lines: [String] = []
        func row(_ key: String, _ value: String) { lines.append(key.padding(toLength: 22, withPad: " ", startingAt: 0) + value) }
        func number(_ key: String, _ format: String = "%.1f") -> String {
            report[key]?.doubleValue.map { String(format: format, $0) } ?? "-"
        }
        row("status", report["status"]?.stringValue ?? "-")
        if let error = report["error"]?.stringValue { row("error", error) }
        row("destination", report["destination"]?.stringValue ?? "-")
        if let channel = report["channel"], !channel.isNull { row("channel", channelText(channel)) }
        if let compression = compressionText(report["compression"]) { row("compression", compression) }
        row("track", report["track"]?.stringValue ?? "-")
        row("total", number("total_ms") + " ms")
        // A figure that was not measured (null in the JSON) is said so, never printed as 0.
        let notMeasured = "not measured"
        row("setup", report["setup_ms"]?.doubleValue.map { String(format: "%.1f ms", $0) } ?? "not done: no handshake")
        var downtime = report["downtime_ms"]?.doubleValue.map { String(format: "%.1f ms", $0) }
            ?? (report["downtime_parts"]?.isNull == false ? "not measured: paused, then failed" : "none: the VM was not paused")
        if let limit = report["downtime_limit_ms"]?.doubleValue, limit > 0 {
            downtime += " (limit \(HumanNumber.milliseconds(limit)))"
        }
        if let over = report["downtime_exceeded_ms"]?.doubleValue {
            downtime += String(format: ": EXCEEDED by %.1f ms", over)
        }
        row("downtime", downtime)
        if let parts = report["downtime_parts"], !parts.isNull, report["downtime_ms"]?.doubleValue != nil {
            let names = [("pause_ms", "pause"), ("last_pages_ms", "last pages"), ("state_ms", "state"),
                         ("verify_ms", "verify"), ("destination_ms", "destination"), ("other_ms", "other")]
            row("  of which", names.compactMap { key, name in
                parts[key]?.doubleValue.map { String(format: "%@ %.1f", name, $0) }
            }.joined(separator: ", ") + " ms")
        }
        for (key, value) in postcopyRows(report["postcopy"]) { row(key, value) }
        let began = report["iterations"]?.doubleValue != nil
        if let iterations = report["iterations"]?.doubleValue {
            var text = String(format: "%.0f", iterations)
            if let cut = report["pass_cut_short"]?.doubleValue { text += String(format: " completed, pass %.0f cut short", cut) }
            row("iterations", text)
        } else {
            row("iterations", "none: pre-copy did not begin")
        }
        row("transferred", String(format: "%.1f MiB", (report["transferred_bytes"]?.doubleValue ?? 0) / 1_048_576))
        if began {
            row("pages", "\(HumanNumber.grouped(report["normal_pages"]?.doubleValue ?? 0)) normal, \(HumanNumber.grouped(report["zero_pages"]?.doubleValue ?? 0)) zero")
        }
        if let throughput = report["throughput_mib_s"]?.doubleValue { row("throughput", String(format: "%.1f MiB/s", throughput)) }
        for change in report["limit_changes"]?.arrayValue ?? [] { row("limits changed", limitChangeText(change)) }
        if let dropped = report["limit_changes_dropped"]?.doubleValue, dropped > 0 {
            row("", "and \(Int(dropped)) more changes, not kept")
        }
        if began {
            row("dirty rate (last)", report["dirty_pages_s"]?.doubleValue.map { HumanNumber.rate($0, unit: "pages/s") }
                ?? "\(notMeasured) (no pass completed)")
        }
        row("verify", (report["verify"]?.stringValue ?? "-") + (["off", "not reached"].contains(report["verify"]?.stringValue ?? "off") ? "" : " (\(number("verify_ms")) ms, \(number("verify_pause_ms")) ms of it while paused)"))
        if report["ring_overruns"]?.doubleValue != nil { row("ring overruns", number("ring_overruns", "%.0f")) }
        let vcpus = report["vcpus"]?.arrayValue ?? []
        let before = vcpus.map { $0["guest_pages_s_before"]?.doubleValue }
        let during = vcpus.map { $0["guest_pages_s_during"]?.doubleValue }
        func rate(_ value: Double?) -> String { value.map { HumanNumber.rate($0) } ?? "-" }
        if before.allSatisfy({ $0 == nil }) && during.allSatisfy({ $0 == nil }) {
            if !vcpus.isEmpty { row("guest pages/s", "\(notMeasured) (no pace history before, no pre-copy during)") }
        } else if vcpus.count <= 4 {
            for (index, vcpu) in vcpus.enumerated() {
                let id = Int(vcpu["id"]?.doubleValue ?? Double(index))
                row("vCPU \(id) guest pages/s", "\(rate(before[index])) before, \(rate(during[index])) during")
            }
        } else {
            // Many vCPUs: one line each for before and during, as min / median / max.
            let measuredBefore = before.compactMap { $0 }, measuredDuring = during.compactMap { $0 }
            row("guest pages/s before", measuredBefore.isEmpty ? notMeasured
                : HumanNumber.spread(measuredBefore) + " (min / median / max of \(vcpus.count) vCPUs)")
            row("guest pages/s during", measuredDuring.isEmpty ? notMeasured : HumanNumber.spread(measuredDuring))
        }
        let throttle = report["throttle"]
        var throttleText = throttle?["kind"]?.stringValue ?? "-"
        if let started = throttle?["started_s"]?.doubleValue {
            throttleText += String(format: ", from %.1f s (in pass %d)", started, Int(throttle?["started_in_pass"]?.doubleValue ?? 0))
            if let because = throttle?["started_because"], let dirty = because["dirty_mib_s"]?.doubleValue,
               let sent = because["sent_mib_s"]?.doubleValue {
                throttleText += String(format: " because the guest dirtied %.1f MiB/s while %.1f MiB/s went out", dirty, sent)
            }
            throttleText += String(format: ", tightened %d times", Int(throttle?["tightened"]?.doubleValue ?? 0))
            if let final = throttle?["final"] {
                if let cpu = final["cpu_percent"]?.doubleValue { throttleText += String(format: "; final %.0f %% CPU", cpu) }
                if let ceilings = final["ceiling_mib_s"]?.arrayValue {
                    let values = ceilings.map { $0.doubleValue ?? 0 }
                    throttleText += values.count <= 4
                        ? "; final ceilings " + values.enumerated().map { String(format: "vCPU %d %.1f", $0.offset, $0.element) }.joined(separator: ", ") + " MiB/s"
                        : "; final ceilings " + HumanNumber.spread(values) + " MiB/s (min / median / max)"
                }
            }
        } else if throttle?["kind"]?.stringValue != "none" {
            // "Not needed" is a judgement: a migration that failed before any period was judged
            // made none.
            let judged = (throttle?["periods_judged"]?.doubleValue ?? 0) > 0
            throttleText += report["status"]?.stringValue == "completed" || judged ? ", not needed" : ", not judged: the migration failed first"
        }
        row("throttle", throttleText)
        if let after = report["destination_guest_pages_s"]?.arrayValue {
            let values = after.map { $0.doubleValue ?? 0 }
            row("after, at destination", values.count <= 4
                ? values.enumerated().map { "vCPU \($0.offset) \(HumanNumber.rate($0.element))" }.joined(separator: ", ") + " guest pages/s"
                : HumanNumber.spread(values) + " guest pages/s (min / median / max)")
        }
        return lines.joined(separator: "\n")
    }
}

extension ReportTable {
    /// "at 2.1 s (pass 1): bandwidth 4.0 MiB/s -> 16.0 MiB/s": what a `migrate --set` changed.
    static func limitChangeText(_ change: JSONValue) -> String {
        func bandwidth(_ limits: JSONValue?) -> String {
            limits?["bandwidth"]?.doubleValue.map { String(format: "%.1f MiB/s", $0 / 1_048_576) } ?? "unlimited"
        }
        func downtime(_ limits: JSONValue?) -> String {
            limits?["downtime_ms"]?.doubleValue.map { HumanNumber.milliseconds($0) } ?? "?"
        }
        let before = change["before"], after = change["after"]
        var what: [String] = []
        if bandwidth(before) != bandwidth(after) { what.append("bandwidth \(bandwidth(before)) -> \(bandwidth(after))") }
        if downtime(before) != downtime(after) { what.append("downtime limit \(downtime(before)) -> \(downtime(after))") }
        if what.isEmpty { what.append("set again, unchanged: bandwidth \(bandwidth(after)), downtime limit \(downtime(after))") }
        return String(format: "at %.1f s (pass %d): ", change["t_s"]?.doubleValue ?? 0, Int(change["pass"]?.doubleValue ?? 0))
            + what.joined(separator: ", ")
    }
}

/// Numbers for people: digits grouped below a million, a unit prefix above.
enum HumanNumber {
    /// 25676 -> "25,676"; 181265311 -> "181.3 M".
    static func rate(_ value: Double, unit: String = "") -> String {
        let text: String
        switch abs(value) {
        case 1e9...: text = String(format: "%.1f G", value / 1e9)
        case 1e6...: text = String(format: "%.1f M", value / 1e6)
        default: text = grouped(value)
        }
        return unit.isEmpty ? text : (text.hasSuffix(" M") || text.hasSuffix(" G") ? text + " " + unit : text + " " + unit)
    }

    /// A whole number with thousands separated by commas.
    static func grouped(_ value: Double) -> String {
        guard value.isFinite else { return "-" }
        let digits = String(Int64(value.rounded()).magnitude)
        var out = ""
        for (index, character) in digits.enumerated() {
            if index > 0 && (digits.count - index) % 3 == 0 { out.append(",") }
            out.append(character)
        }
        return (value < 0 ? "-" : "") + out
    }

    static func milliseconds(_ value: Double) -> String {
        value >= 1000 && value.truncatingRemainder(dividingBy: 1000) == 0 ? "\(Int(value / 1000)) s" : "\(grouped(value)) ms"
    }

    /// "min / median / max" of a list, each as `rate`.
    static func spread(_ values: [Double]) -> String {
        guard !values.isEmpty else { return "-" }
        let sorted = values.sorted()
        return [sorted.first!, sorted[sorted.count / 2], sorted.last!].map { rate($0) }.joined(separator: " / ")
    }
}
