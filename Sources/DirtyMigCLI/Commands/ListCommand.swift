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
            client.close()
            rows.append([
                "name": .string(name), "state": status["state"] ?? .null, "pid": status["pid"] ?? .null,
                "memory_bytes": status["memory_bytes"] ?? .null, "vcpus": status["vcpus"] ?? .null,
                "track": status["track"] ?? .null, "uptime_s": status["uptime_s"] ?? .null,
                "listen": status["listen"] ?? .null, "prepared_memory_bytes": status["prepared_memory"] ?? .null,
                "socket": .string(path),
            ])
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
            [row["name"]?.stringValue ?? "-", row["state"]?.stringValue ?? "-",
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

    /// A receiver's memory cell: the address it listens on, after the RAM it has ready
    /// (`receive --memory`).
    private static func receiverMemory(_ row: JSONValue) -> String {
        guard let listen = row["listen"]?.stringValue else { return "-" }
        guard let prepared = row["prepared_memory_bytes"]?.uint64Value else { return "on " + listen }
        return ByteSize.format(prepared) + " ready, on " + listen
    }
}
