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
        func cell(_ text: String, _ width: Int) -> String { text.padding(toLength: max(width, text.count + 1), withPad: " ", startingAt: 0) }
        emit(cell("NAME", 16) + cell("STATE", 11) + cell("PID", 8) + cell("MEMORY", 9) + cell("VCPUS", 6) + cell("TRACK", 7) + cell("UPTIME", 9) + "SOCKET")
        for row in rows {
            let memory = row["memory_bytes"]?.uint64Value.map { ByteSize.format($0) } ?? receiverMemory(row)
            let uptime = row["uptime_s"]?.doubleValue.map { String(format: "%.0f s", $0) } ?? "-"
            emit(cell(row["name"]?.stringValue ?? "-", 16) + cell(row["state"]?.stringValue ?? "-", 11)
                 + cell(row["pid"]?.doubleValue.map { String(Int($0)) } ?? "-", 8) + cell(memory, 9)
                 + cell(row["vcpus"]?.doubleValue.map { String(Int($0)) } ?? "-", 6) + cell(row["track"]?.stringValue ?? "-", 7)
                 + cell(uptime, 9) + (row["socket"]?.stringValue ?? ""))
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
