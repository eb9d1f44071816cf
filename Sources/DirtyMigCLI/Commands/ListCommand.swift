import DirtyMigCore
import Foundation

/// `dirtymig list`: the VMs and receivers this user runs (their sockets in the default
/// directory that answer), each with what `query-status` says.
enum ListCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let directory = ControlSocketPath.defaultDirectory()
        var rows: [JSONValue] = []
        for name in ControlSocketPath.listRunning(directory: directory) {
            let path = ControlSocketPath.path(forName: name)
            guard let client = try? ControlClient(path: path, greetingTimeout: 2, callTimeout: 2),
                  let status = try? client.call("query-status") else { continue }
            // A VM that migrates says so, with how far it is (a receiver has no query-migrate).
            let migration = status["state"]?.stringValue == "running" ? (try? client.call("query-migrate")) : nil
            client.close()
            // (row key, query-status key): what a VM or a receiver says of itself, passed on.
            let copied: [(String, String)] = [
                ("state", "state"), ("pid", "pid"), ("memory_bytes", "memory_bytes"), ("vcpus", "vcpus"),
                ("track", "track"), ("uptime_s", "uptime_s"), ("listen", "listen"),
                ("prepared_memory_bytes", "prepared_memory"), ("prepared_memory_state", "prepared_memory_state"),
                ("credentials", "credentials"), ("superseded", "superseded"),
            ]
            var row: [(String, JSONValue)] = [("name", .string(name))]
            row += copied.map { ($0.0, status[$0.1] ?? .null) }
            if let migration, MigrationProgress.isUnderWay(phase: migration["phase"]?.stringValue) {
                row[1] = ("state", "migrating")
                row.append(("migration", migration))
            }
            row.append(("socket", .string(path)))
            rows.append(.object(row))
        }
        if arguments.has("json") {
            for row in rows { emit(row.serialized()) }
            return 0
        }
        guard !rows.isEmpty else {
            printError("dirtymig: nothing is running (no control socket answers in \(directory))")
            return 0
        }
        let header = ["NAME", "STATE", "PID", "MEMORY", "VCPUS", "TRACK", "UPTIME", "SOCKET"]
        let lines: [[String]] = rows.map { row in
            [row["name"]?.stringValue ?? "-", stateLabel(row["state"]?.stringValue, migration: row["migration"]) + listening(row),
             row["pid"]?.doubleValue.map { String(Int($0)) } ?? "-",
             row["memory_bytes"]?.uint64Value.map { ByteSize.format($0) } ?? receiverMemory(row),
             row["vcpus"]?.doubleValue.map { String(Int($0)) } ?? "-", row["track"]?.stringValue ?? "-",
             row["uptime_s"]?.doubleValue.map { String(format: "%.0f s", $0) } ?? "-", row["socket"]?.stringValue ?? ""]
        }
        // Each column as wide as its widest cell, and at least as its header plus a space.
        let widths = header.indices.map { column in ([header] + lines).map { $0[column].count }.max() ?? 0 }
        for line in [header] + lines {
            emit(line.indices.map { column in
                column == line.count - 1 ? line[column] : line[column].padding(toLength: widths[column] + 2, withPad: " ", startingAt: 0)
            }.joined())
        }
        return 0
    }

    /// A receiver's memory cell: the RAM it prepared (`receive --memory`) and whether that is
    /// ready, in use by a standby's copy, or being prepared ("256 MiB ready"); "-" without.
    private static func receiverMemory(_ row: JSONValue) -> String {
        guard let bytes = row["prepared_memory_bytes"]?.uint64Value else { return "-" }
        let state = (row["prepared_memory_state"]?.stringValue ?? "ready").replacingOccurrences(of: "_", with: " ")
        return ByteSize.format(bytes) + " " + state
    }

    /// After a receiver's state: where it listens and what a sender must bring there
    /// (" on 10.0.0.2:4444 (TLS PSK)"); nothing for a VM.
    private static func listening(_ row: JSONValue) -> String {
        guard let listen = row["listen"]?.stringValue else { return "" }
        return " on " + listen + (row["credentials"]?.stringValue.map { " (\(credentialsLabel($0)))" } ?? "")
    }

    /// A VM whose standby took over is not the copy that runs the guest any more: say which
    /// does. A VM that migrates: how far ("migrating (pass 1 at 42 %, 16.8 MiB sent)").
    private static func stateLabel(_ state: String?, migration: JSONValue?) -> String {
        guard let state else { return "-" }
        if state == "migrating", let migration {
            var text = "migrating ("
            if let pass = migration["iteration"]?.doubleValue, pass > 0 {
                text += "pass \(Int(pass))" + (migration["pass_percent"]?.doubleValue.map { String(format: " at %.0f %%", $0) } ?? "") + ", "
            } else if let phase = migration["phase"]?.stringValue {
                text += phase + ", "
            }
            return text + String(format: "%.1f MiB sent)", (migration["sent_bytes"]?.doubleValue ?? 0) / 1_048_576)
        }
        return state == "superseded" ? "superseded (its standby took over and runs the VM; output stopped)" : state
    }

    private static func credentialsLabel(_ kind: String) -> String {
        switch kind {
        case "psk": return "TLS PSK"
        case "certificates": return "TLS certificates"
        case "insecure": return "plaintext, --insecure"
        default: return kind
        }
    }
}
