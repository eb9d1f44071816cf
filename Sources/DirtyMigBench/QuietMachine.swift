import DirtyMigCore
import Foundation
import Glibc

/// The pause before every migration run: nothing of the benchmark's left running, then the same
/// idle time for every migrator, so no run inherits warm memory or a busy CPU from the one before.
enum QuietMachine {
    /// Checks that the benchmark runs nothing but its main thread and has no child process left,
    /// waits `seconds`, and returns how busy the machine's CPUs were meanwhile (0-1, everything
    /// not idle: another user's build on this shared machine shows here).
    static func idle(_ seconds: Double) throws -> Double {
        let deadline = MonotonicClock.seconds() + 10
        // Threads of an in-process VM or receiver end shortly after their machine is released.
        while benchmarkThreads().count > 1 && MonotonicClock.seconds() < deadline { usleep(20_000) }
        let threads = benchmarkThreads()
        guard threads.count == 1 else {
            throw BenchError("the benchmark still runs \(threads.count - 1) thread(s) besides its main one (\(threads.dropFirst().joined(separator: ", "))): the next run would not start on a quiet machine")
        }
        var status: Int32 = 0
        let child = waitpid(-1, &status, WNOHANG)
        guard child == -1 && errno == ECHILD else {
            throw BenchError("a child process of the benchmark is still running or unreaped (waitpid: \(child))")
        }
        let before = cpuTimes()
        Thread.sleep(forTimeInterval: seconds)
        let after = cpuTimes()
        let total = after.total - before.total
        return total > 0 ? Double(total - (after.idle - before.idle)) / Double(total) : 0
    }

    /// The names of this process's threads (/proc/self/task/*/comm), the main thread first.
    static func benchmarkThreads() -> [String] {
        let tasks = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []).sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }
        return tasks.map { task in
            ((try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8)) ?? task)
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
    }

    /// All CPUs' jiffies from /proc/stat: the total and the idle part (idle + iowait).
    static func cpuTimes() -> (total: UInt64, idle: UInt64) {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8),
              let line = text.split(separator: "\n").first, line.hasPrefix("cpu ") else { return (0, 0) }
        let fields = line.split(separator: " ").dropFirst().compactMap { UInt64($0) }
        guard fields.count >= 5 else { return (0, 0) }
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        return (fields.prefix(8).reduce(0, +), fields[3] + fields[4])
    }
}

/// How much of the machine's CPU time others used while a migration ran: this machine is shared,
/// and a build started meanwhile slows whichever migrator it falls on. Everything busy on the
/// machine minus what the benchmark and its programs used (its own time, its reaped children's,
/// and its live children's from /proc/PID/stat).
struct OthersCPUShare {
    private let machine: (total: UInt64, idle: UInt64)
    private let own: UInt64

    init(children: [pid_t]) {
        machine = QuietMachine.cpuTimes()
        own = OthersCPUShare.ownJiffies(children: children)
    }

    /// Others' share of all CPUs since `init` (0-1).
    func othersShare(children: [pid_t]) -> Double {
        let now = QuietMachine.cpuTimes()
        let total = now.total - machine.total
        guard total > 0 else { return 0 }
        let busy = Double(total - (now.idle - machine.idle))
        let ours = Double(OthersCPUShare.ownJiffies(children: children)) - Double(own)
        return max(0, busy - ours) / Double(total)
    }

    /// utime + stime + cutime + cstime of this process, plus utime + stime of each live child.
    private static func ownJiffies(children: [pid_t]) -> UInt64 {
        let mine = ProcStat.fields("/proc/self/stat")
        var jiffies = mine.count > 13 ? mine[10] + mine[11] + mine[12] + mine[13] : 0
        for child in children { jiffies += ProcStat.cpuJiffies("/proc/\(child)/stat") ?? 0 }
        return jiffies
    }
}

/// A process's or thread's /proc/.../stat.
enum ProcStat {
    /// The numeric fields after "pid (comm) " and the state (field 3): index 0 is field 4, so
    /// utime, stime, cutime, cstime (fields 14-17) are indices 10-13. Empty if unreadable.
    static func fields(_ path: String) -> [UInt64] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return [] }
        return text[text.index(after: close)...].split(separator: " ").dropFirst().map { UInt64($0) ?? 0 }
    }

    /// utime + stime, in clock ticks.
    static func cpuJiffies(_ path: String) -> UInt64? {
        let values = fields(path)
        return values.count > 11 ? values[10] + values[11] : nil
    }
}
