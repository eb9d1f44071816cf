import DirtyMigCore
import Foundation

/// `--detach` for `boot` and `receive`: runs the same command again in the background, in a
/// session of its own (so closing the terminal does not stop it), with its output in a log file
/// next to its control socket, and returns once that socket serves, printing where. Scripts
/// get a VM that is ready when the command returns, with no polling of their own.
enum Detach {
    static let environmentKey = "DIRTYMIG_DETACHED"

    /// In the background process: leave the terminal's session.
    static func leaveSessionIfDetached() {
        if ProcessInfo.processInfo.environment[environmentKey] == "1" { _ = setsid() }
    }

    /// The log of a detached command: its control socket's path with `.log` for `.sock`.
    static func logPath(forControl path: String) -> String {
        (path.hasSuffix(".sock") ? String(path.dropLast(5)) : path) + ".log"
    }

    /// Starts this command again without --detach and waits (up to `timeout` seconds) until its
    /// control socket serves in `state`; then prints one line and returns 0. If the background
    /// command ends first, prints what it logged and returns its status.
    static func run(controlPath: String, name: String, state: String, timeout: Double = 120) throws -> Int32 {
        let log = logPath(forControl: controlPath)
        let directory = ControlServer.directory(of: controlPath)
        do { try ControlServer.preparePrivateDirectory(directory, isDefault: directory == ControlSocketPath.defaultDirectory()) } catch {
            throw RuntimeFailure("\(error)")
        }
        // The background process logs to a new file of its own, created 0600 by open (nothing is
        // chmodded by path; O_NOFOLLOW|O_EXCL never writes through a link), which takes the log's
        // name only once that process serves the socket: a command that loses the name to a VM
        // already running (or fails otherwise) leaves that VM's log as it was.
        let pending = "\(log).\(getpid()).new"
        let logFile: FileDescriptor
        do { logFile = try FileDescriptor.open(pending, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600) } catch {
            throw RuntimeFailure("cannot create the log file \(pending): \(String(cString: strerror(error.errno)))")
        }
        defer { logFile.close() }   // the background process has its own copy by then
        let logHandle = FileHandle(fileDescriptor: logFile.rawValue, closeOnDealloc: false)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0])
        process.arguments = CommandLine.arguments.dropFirst().filter { $0 != "--detach" }
        var environment = ProcessInfo.processInfo.environment
        environment[environmentKey] = "1"
        process.environment = environment
        process.standardInput = FileHandle(forReadingAtPath: "/dev/null")
        process.standardOutput = logHandle
        process.standardError = logHandle
        do { try process.run() } catch { throw RuntimeFailure("cannot start the background process: \(error.localizedDescription)") }
        let pid = process.processIdentifier
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if !process.isRunning {
                let text = (try? String(contentsOfFile: pending, encoding: .utf8)) ?? ""
                unlink(pending)
                printError(text.split(separator: "\n").suffix(10).joined(separator: "\n"))
                return process.terminationStatus == 0 ? 1 : process.terminationStatus
            }
            // Ours only: a socket of the same name could still be another process's.
            if let client = try? ControlClient(path: controlPath, greetingTimeout: 1, callTimeout: 1) {
                let status = try? client.call("query-status")
                client.close()
                if let status, status["pid"]?.doubleValue == Double(pid), status["state"]?.stringValue == state {
                    // The name is ours: so is the log's (an old one is a stopped VM's).
                    guard rename(pending, log) == 0 else {
                        emit("dirtymig: '\(name)' \(state) in the background (pid \(pid)); control socket \(controlPath); log \(pending) (cannot rename it to \(log): \(String(cString: strerror(errno))))")
                        return 0
                    }
                    emit("dirtymig: '\(name)' \(state) in the background (pid \(pid)); control socket \(controlPath); log \(log)")
                    return 0
                }
            }
            usleep(10_000)
        }
        kill(pid, SIGTERM)
        throw RuntimeFailure("the background process did not serve its control socket within \(Int(timeout)) s (stopped it); see \(pending)")
    }
}
