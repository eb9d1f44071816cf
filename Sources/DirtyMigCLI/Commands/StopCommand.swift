import DirtyMigCore
import Foundation

/// `dirtymig stop`: asks a VM (or a receiver) to quit through its control socket, as SIGTERM
/// would (a migration under way is cancelled first), and waits until it has ended.
enum StopCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let timeout = try arguments.duration("timeout") ?? 10
        guard timeout > 0, timeout <= 3600 else { throw arguments.error("--timeout must be from 1ms to 60m") }
        let path = try ControlSocketPath.resolve(vm: arguments.string("vm"))
        let client = try ControlClient(path: path)
        let status = try? client.call("query-status", timeout: 5)
        _ = try client.call("quit", timeout: 5)
        client.close()
        let deadline = Date().addingTimeInterval(timeout)
        let pid = status?["pid"]?.doubleValue.map { pid_t($0) }
        // Gone once nothing answers on the socket (the process removes it as it ends) and the
        // process has ended (it releases the VM's memory last).
        while Date() < deadline {
            let answers = (try? UnixSocket.connect(path: path)).map { $0.close(); return true } ?? false
            if !answers && !(pid.map(isAlive) ?? false) {
                printError("dirtymig: stopped \(ControlSocketPath.name(forPath: path))\(status?["pid"]?.doubleValue.map { " (pid \(Int($0)))" } ?? "")")
                return 0
            }
            usleep(20_000)
        }
        throw RuntimeFailure("\(path) (or its process) is still there \(ControlClient.format(timeout)) s after 'quit'; the process may be stuck (kill it with SIGKILL)")
    }

    /// Whether a process exists and is not a zombie waiting to be reaped.
    static func isAlive(_ pid: pid_t) -> Bool {
        guard kill(pid, 0) == 0 else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return true }
        return stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).first != "Z"
    }
}
