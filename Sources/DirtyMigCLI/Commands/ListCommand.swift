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
            // A VM that migrates or replicates says so, with how far it is (a receiver has neither
            // query-migrate nor query-replication; its query-status says what it receives).
            let running = status["state"]?.stringValue == "running"
            let migration = running ? (try? client.call("query-migrate")) : nil
            let migrating = MigrationProgress.isUnderWay(phase: migration?["phase"]?.stringValue)
            let replication = running && !migrating ? (try? client.call("query-replication")) : nil
            client.close()
            rows.append(row(name: name, socket: path, status: status, migration: migrating ? migration : nil, replication: replication))
        }
        if arguments.has("json") {
            for row in rows { emit(row.serialized()) }
            return 0
        }
        guard !rows.isEmpty else {
            printError("dirtymig: nothing is running (no control socket answers in \(directory))")
            return 0
        }
        // The pid before the state: a state carries its progress in words ("replicating
        // (protected, epoch 41, 0 behind)"), and a script that takes the second field for the pid
        // (awk '{ print $2 }') must not get a word of it instead.
        let header = ["NAME", "PID", "STATE", "MEMORY", "VCPUS", "TRACK", "UPTIME", "SOCKET"]
        let lines: [[String]] = rows.map { row in
            [row["name"]?.stringValue ?? "-", row["pid"]?.doubleValue.map { String(Int($0)) } ?? "-",
             stateLabel(row) + listening(row),
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

    /// One VM's or receiver's row: what its `query-status` says, and for a VM that migrates or
    /// replicates, state `migrating` or `replicating` with the `query-migrate` (a migration under
    /// way) or `query-replication` object.
    static func row(name: String, socket: String, status: JSONValue, migration: JSONValue?, replication: JSONValue?) -> JSONValue {
        // (row key, query-status key): what a VM or a receiver says of itself, passed on.
        let copied: [(String, String)] = [
            ("state", "state"), ("pid", "pid"), ("memory_bytes", "memory_bytes"), ("vcpus", "vcpus"),
            ("track", "track"), ("uptime_s", "uptime_s"), ("listen", "listen"),
            ("prepared_memory_bytes", "prepared_memory"), ("prepared_memory_state", "prepared_memory_state"),
            ("credentials", "credentials"), ("superseded", "superseded"),
            ("from", "from"), ("received_bytes", "received_bytes"), ("standby", "standby"), ("postcopy", "postcopy"),
        ]
        var row: [(String, JSONValue)] = [("name", .string(name))]
        row += copied.map { ($0.0, status[$0.1] ?? .null) }
        if let migration {
            row[1] = ("state", "migrating")
            row.append(("migration", migration))
        } else if let replication, replicatingStatuses.contains(replication["status"]?.stringValue ?? "") {
            row[1] = ("state", "replicating")
            row.append(("replication", replication))
        }
        row.append(("socket", .string(socket)))
        return .object(row)
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

    /// The replication statuses under which a VM is shown replicating: a replication that
    /// stopped (or whose standby took over) leaves the VM running (or superseded).
    static let replicatingStatuses: Set<String> = ["starting", "protected", "unprotected"]

    /// A VM whose standby took over is not the copy that runs the guest any more: say which
    /// does. A VM that migrates or replicates, a receiver that receives, a standby: how far
    /// ("migrating (pass 1 at 42 %, 16.8 MiB sent)", "replicating (protected, epoch 41, 0 behind)",
    /// "receiving (from 10.0.0.1:50312, 12.5 MiB received)", "standby (protecting, epoch 41)").
    static func stateLabel(_ row: JSONValue) -> String {
        guard let state = row["state"]?.stringValue else { return "-" }
        func mib(_ bytes: Double?) -> String? { bytes.map { String(format: "%.1f MiB", $0 / 1_048_576) } }
        switch state {
        case "migrating":
            guard let migration = row["migration"] else { return state }
            var text = "migrating ("
            if let pass = migration["iteration"]?.doubleValue, pass > 0 {
                text += "pass \(Int(pass))" + (migration["pass_percent"]?.doubleValue.map { String(format: " at %.0f %%", $0) } ?? "") + ", "
            } else if let phase = migration["phase"]?.stringValue {
                text += phase + ", "
            }
            return text + String(format: "%.1f MiB sent)", (migration["sent_bytes"]?.doubleValue ?? 0) / 1_048_576)
        case "replicating":
            guard let replication = row["replication"] else { return state }
            let sent = mib(replication["bytes_sent"]?.doubleValue).map { $0 + " sent" }
            let checkpoints = replication["checkpoints"]?.doubleValue.map { "\(Int($0)) checkpoint\($0 == 1 ? "" : "s")" }
            var parts: [String?]
            switch replication["status"]?.stringValue {
            case "starting":
                parts = ["initial copy", sent]
            case "protected":
                parts = ["protected", replication["last_epoch"]?.doubleValue.map { "epoch \(Int($0))" },
                         replication["lag_checkpoints"]?.doubleValue.map { "\(Int($0)) behind" }]
            default:
                // Seeking the standby again: how long it goes on.
                let seeking = replication["reprotect_s_left"]?.doubleValue.map { String(format: "reconnecting, %.0f s left", $0.rounded(.up)) }
                parts = ["unprotected: standby lost", seeking, checkpoints]
            }
            return "replicating (" + parts.compactMap { $0 }.joined(separator: ", ") + ")"
        case "receiving":
            let parts = [row["from"]?.stringValue.map { "from " + $0 }, mib(row["received_bytes"]?.doubleValue).map { $0 + " received" }]
            let shown = parts.compactMap { $0 }
            return shown.isEmpty ? state : "receiving (" + shown.joined(separator: ", ") + ")"
        case "standby":
            guard let standby = row["standby"], let phase = standby["phase"]?.stringValue else { return state }
            var parts = [phase]
            if phase == "initial copy" {
                if let received = mib(row["received_bytes"]?.doubleValue) { parts.append(received + " received") }
            } else if let epoch = standby["committed_epoch"]?.doubleValue {
                parts.append("epoch \(Int(epoch))")
            }
            return "standby (" + parts.joined(separator: ", ") + ")"
        case "superseded":
            return "superseded (its standby took over and runs the VM; output stopped)"
        case PostCopyLinkState.pausedStateName:
            // Either side of a post-copy whose link failed: since when, and why.
            guard let link = row["postcopy"], let since = link["paused_since"]?.doubleValue else { return state }
            let clock = DateFormatter()
            clock.dateFormat = "HH:mm:ss"
            return "\(state) (since \(clock.string(from: Date(timeIntervalSince1970: since))), \(String(format: "%.0f s", link["paused_s"]?.doubleValue ?? 0)): \(link["reason"]?.stringValue ?? "-"))"
        default:
            return state
        }
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
