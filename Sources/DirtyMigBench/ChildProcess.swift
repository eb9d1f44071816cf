import DirtyMigCore
import Foundation
import Glibc

/// A program the benchmark starts as a user's shell would (`dirtymig boot`, `qemu-system-x86_64`),
/// with posix_spawn rather than Foundation's Process: the benchmark's own process must run no
/// thread of its own while a migration is measured, and spawning directly keeps it at exactly
/// the main thread (nothing watches the child; the main thread reaps it with waitpid).
///
/// Its standard input is /dev/null, its standard error goes to a log file (read when something
/// fails), and its standard output either to a file (read once the program has exited) or to a
/// pipe the benchmark reads lines from, such as `dirtymig boot`'s "running" line. A pipe is
/// left open until the program exits: a program that writes to a closed pipe dies of SIGPIPE.
final class ChildProcess {
    enum Output {
        case pipe
        case file(String)
    }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }

    let name: String
    let pid: pid_t
    let stderrPath: String
    private var stdoutPipe: Int32 = -1
    private var pending: [UInt8] = []
    /// waitpid's status once reaped.
    private var reapedStatus: Int32?

    init(_ executable: String, _ arguments: [String], stdout: Output, stderrPath: String) throws {
        name = (executable as NSString).lastPathComponent + (arguments.first.map { " " + $0 } ?? "")
        self.stderrPath = stderrPath
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 2, stderrPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var pipeEnds: [Int32] = [-1, -1]
        switch stdout {
        case .file(let path):
            posix_spawn_file_actions_addopen(&actions, 1, path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        case .pipe:
            // Close-on-exec for both ends here; dup2 onto 1 gives the child a copy without it.
            guard pipe(&pipeEnds) == 0 else { throw Failure("pipe: \(String(cString: strerror(errno)))") }
            for end in pipeEnds { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
            posix_spawn_file_actions_adddup2(&actions, pipeEnds[1], 1)
        }
        let argv: [UnsafeMutablePointer<CChar>?] = ([executable] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let result = posix_spawn(&child, executable, &actions, nil, argv, environ)
        if pipeEnds[1] >= 0 { Glibc.close(pipeEnds[1]) }
        guard result == 0 else {
            if pipeEnds[0] >= 0 { Glibc.close(pipeEnds[0]) }
            throw Failure("cannot start \(executable): \(String(cString: strerror(result)))")
        }
        pid = child
        stdoutPipe = pipeEnds[0]
        LiveChildren.add(child)
    }

    /// `executable arguments` started through `prefix` (`ip netns exec NAME`: MigrationPlacement),
    /// or directly when it is empty.
    convenience init(_ executable: String, _ arguments: [String], prefix: [String], stdout: Output, stderrPath: String) throws {
        guard let launcher = prefix.first else {
            try self.init(executable, arguments, stdout: stdout, stderrPath: stderrPath)
            return
        }
        try self.init(launcher, Array(prefix.dropFirst()) + [executable] + arguments, stdout: stdout, stderrPath: stderrPath)
    }

    /// The next line on the program's standard output (without its newline), or nil if none came
    /// within `timeout` seconds or the program closed its output first.
    func readLine(timeout: Double) -> String? {
        guard stdoutPipe >= 0 else { return nil }
        let deadline = MonotonicClock.seconds() + timeout
        while true {
            if let newline = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                return line
            }
            let remaining = deadline - MonotonicClock.seconds()
            guard remaining > 0 else { return nil }
            var poller = pollfd(fd: stdoutPipe, events: Int16(POLLIN), revents: 0)
            let ready = poll(&poller, 1, Int32(min(remaining * 1000, 1000).rounded(.up)))
            if ready < 0 && errno != EINTR { return nil }
            guard ready > 0 else { continue }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = read(stdoutPipe, &chunk, chunk.count)
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { return nil }
            pending += chunk[..<count]
        }
    }

    /// Waits for a line containing `marker`; lines before it are skipped. Throws with the
    /// program's standard error if it does not come within `timeout` seconds.
    func expectLine(containing marker: String, timeout: Double) throws -> String {
        let deadline = MonotonicClock.seconds() + timeout
        while let line = readLine(timeout: max(0, deadline - MonotonicClock.seconds())) {
            if line.contains(marker) { return line }
        }
        throw Failure("\(name) did not print a '\(marker)' line within \(Int(timeout)) s\(exitDescription.map { " (it \($0))" } ?? ""): \(stderrTail)")
    }

    /// Nil while the program runs; else how it ended ("exited with status 1").
    var exitDescription: String? {
        guard let status = reap() else { return nil }
        return status & 0x7f == 0 ? "exited with status \((status >> 8) & 0xff)" : "was killed by signal \(status & 0x7f)"
    }

    /// The exit status once the program has exited normally (nil while it runs or if a signal
    /// ended it).
    var exitStatus: Int32? {
        guard let status = reap(), status & 0x7f == 0 else { return nil }
        return (status >> 8) & 0xff
    }

    /// Reaps the program if it has ended; returns waitpid's status then.
    private func reap() -> Int32? {
        if let reapedStatus { return reapedStatus }
        var status: Int32 = 0
        guard waitpid(pid, &status, WNOHANG) == pid else { return nil }
        reapedStatus = status
        LiveChildren.remove(pid)
        if stdoutPipe >= 0 { Glibc.close(stdoutPipe); stdoutPipe = -1 }
        return status
    }

    /// Waits up to `timeout` seconds for the program to end (checking every 10 ms); true if it did.
    @discardableResult
    func waitForExit(timeout: Double) -> Bool {
        let deadline = MonotonicClock.seconds() + timeout
        while reap() == nil {
            if MonotonicClock.seconds() >= deadline { return false }
            usleep(10_000)
        }
        return true
    }

    /// Ends the program: SIGTERM (dirtymig and QEMU both stop cleanly on it), then SIGKILL if it
    /// has not ended within `grace` seconds. Returns once it has been reaped.
    func stop(grace: Double = 10) {
        guard reap() == nil else { return }
        kill(pid, SIGTERM)
        if !waitForExit(timeout: grace) {
            kill(pid, SIGKILL)
            waitForExit(timeout: 30)
        }
    }

    /// The last lines of the program's standard error, for failure messages.
    var stderrTail: String {
        let text = (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? ""
        let lines = text.split(separator: "\n").suffix(5)
        return lines.isEmpty ? "(nothing on its standard error)" : lines.joined(separator: " | ")
    }

    deinit {
        stop()
        if stdoutPipe >= 0 { Glibc.close(stdoutPipe) }
    }
}

/// The programs the benchmark has started and not yet reaped, so that a benchmark ended by
/// SIGTERM, SIGHUP or SIGINT ends them too: a QEMU left behind at 100 % of a CPU spoils every
/// figure measured after it (seen when a benchmark was killed). SIGKILL cannot be caught; the
/// children of a benchmark killed that way live on.
///
/// A fixed table the signal handler can read without allocating or locking; only the main
/// thread writes it (the benchmark runs no other thread).
enum LiveChildren {
    private static let capacity = 64
    nonisolated(unsafe) private static let pids: UnsafeMutablePointer<pid_t> = {
        let table = UnsafeMutablePointer<pid_t>.allocate(capacity: capacity)
        table.initialize(repeating: 0, count: capacity)
        return table
    }()

    /// Called once at start, before any child: the table exists before a handler can read it.
    static func endWithTheBenchmark() {
        _ = pids
        for signalNumber in [SIGTERM, SIGHUP, SIGINT] {
            signal(signalNumber) { signalNumber in
                for index in 0..<LiveChildren.capacity where LiveChildren.pids[index] > 0 {
                    kill(LiveChildren.pids[index], SIGTERM)
                }
                signal(signalNumber, SIG_DFL)
                raise(signalNumber)
            }
        }
    }

    static func add(_ pid: pid_t) {
        if let free = (0..<capacity).first(where: { pids[$0] == 0 }) { pids[free] = pid }
    }

    static func remove(_ pid: pid_t) {
        if let slot = (0..<capacity).first(where: { pids[$0] == pid }) { pids[slot] = 0 }
    }
}
