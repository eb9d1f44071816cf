import DirtyMigCore
import Foundation

/// `dirtymig limit`: set, change, cancel or list per-vCPU dirty-rate ceilings on a running VM.
/// With neither --rate nor --cancel it lists them (what --show asks for explicitly).
enum LimitCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let rate = try arguments.rate("rate")
        let cancel = arguments.has("cancel")
        let actions = [rate != nil, cancel, arguments.has("show")].filter { $0 }.count
        guard actions <= 1 else { throw arguments.error("give one of --rate, --cancel and --show") }
        var vcpu: Int? = nil
        if let text = arguments.string("vcpu"), text != "all" {
            guard let id = Int(text), id >= 0 else {
                throw arguments.error("--vcpu takes a vCPU number (0, 1, ...) or 'all', not '\(text)'")
            }
            vcpu = id
        }
        if let rate, rate < 4096 { throw arguments.error("--rate must be at least 4K (one page per second)") }

        let client = try ControlClient(path: ControlSocketPath.resolve(vm: arguments.string("vm")))
        defer { client.close() }
        var request: [(String, JSONValue)] = []
        if let vcpu { request.append(("vcpu", .number(vcpu))) }
        let reply: JSONValue
        if let rate {
            request.append(("rate", .number(rate)))
            reply = try client.call("set-dirty-limit", arguments: .object(request))
        } else if cancel {
            reply = try client.call("cancel-dirty-limit", arguments: .object(request))
        } else {
            reply = try client.call("query-dirty-limit")
        }
        if arguments.has("json") {
            emit(reply.serialized())
        } else {
            for line in LimitTable.lines(reply, only: vcpu) { emit(line) }
        }
        return 0
    }
}

/// The terminal form of `query-dirty-limit`: one row per vCPU.
enum LimitTable {
    static func lines(_ reply: JSONValue, only vcpu: Int?) -> [String] {
        let quota = reply["track"]?.stringValue == "quota"
        var header = ["VCPU", "LIMIT MiB/s", "MIGRATION MiB/s", "CURRENT MiB/s", "HELD %", "EXITS", "LAST HOLD ms"]
        if quota { header.append("QUOTA pages/\(format(reply["quota_interval_ms"]?.doubleValue, "%.0f"))ms") }
        var rows = [header]
        for entry in reply["vcpus"]?.arrayValue ?? [] {
            let id = Int(entry["id"]?.intValue ?? -1)
            if let vcpu, vcpu != id { continue }
            var row = [
                "\(id)",
                format(entry["limit_bytes_s"]?.doubleValue.map { $0 / 1_048_576 }, "%.2f"),
                format(entry["migration_limit_bytes_s"]?.doubleValue.map { $0 / 1_048_576 }, "%.2f"),
                format(entry["current_bytes_s"]?.doubleValue.map { $0 / 1_048_576 }, "%.2f"),
                format(entry["held_fraction"]?.doubleValue.map { $0 * 100 }, "%.1f"),
                format(entry["exits"]?.doubleValue, "%.0f"),
                format(entry["last_hold_ms"]?.doubleValue, "%.2f"),
            ]
            if quota { row.append(format(entry["quota_pages_per_interval"]?.doubleValue, "%.1f")) }
            rows.append(row)
        }
        let widths = header.indices.map { column in rows.map { $0[column].count }.max()! + 2 }
        var lines = rows.map { row in
            row.enumerated().map { column, text in
                column == 0 ? text.padding(toLength: widths[0], withPad: " ", startingAt: 0)
                    : String(repeating: " ", count: widths[column] - text.count) + text
            }.joined()
        }
        let mechanism = reply["mechanism"]?.stringValue ?? "none"
        var footer = "enforced by: \(mechanism)"
        if let cpu = reply["cpu_throttle_percent"]?.intValue, cpu > 0 { footer += "; auto-converge holds every vCPU \(cpu) % of the time" }
        lines.append(footer)
        return lines
    }

    private static func format(_ value: Double?, _ pattern: String) -> String {
        value.map { String(format: pattern, $0) } ?? "-"
    }
}
