import Foundation
import Glibc

/// How much memory this process can really have now: the kernel's MemAvailable, and, when the
/// process runs in a memory cgroup (v1 or v2) with a limit, what is left under that limit
/// (counting its inactive page cache as reclaimable), whichever is smaller. Total RAM says
/// nothing about either: two VMs that each fitted in it were both OOM-killed, silently.
public struct MemoryBudget: Sendable, Equatable {
    public var availableBytes: UInt64
    /// Where the figure comes from, for messages: "MemAvailable" or "the memory cgroup's limit".
    public var source: String

    public static func current() -> MemoryBudget {
        var budget = MemoryBudget(availableBytes: meminfoAvailable() ?? UInt64.max, source: "MemAvailable")
        for headroom in cgroupDirectories.compactMap({ headroom(in: $0.directory, version2: $0.version2) })
        where headroom < budget.availableBytes {
            budget = MemoryBudget(availableBytes: headroom, source: "the memory cgroup's limit")
        }
        return budget
    }

    /// Memory a VM's process needs beyond the pages its guest touches: dirty bitmaps and rings,
    /// thread stacks, socket buffers, the runtime. Measured RSS of an idle 1 GiB VM's process
    /// less its guest pages was about 20 MiB; this keeps a margin on that.
    public static let processOverhead: UInt64 = 64 << 20

    /// Throws unless `bytes` fit in what is available now.
    public static func check(needed bytes: UInt64, for what: String) throws(MachineError) {
        let budget = current()
        guard bytes > budget.availableBytes else { return }
        throw .insufficientMemory(what: what, needed: bytes, available: budget.availableBytes, source: budget.source)
    }

    /// A small file's text, read with plain syscalls (Foundation's reader cost about 0.3 ms a
    /// file here, and a check reads several).
    static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 8192)
        while bytes.count < 1 << 20 {
            let count = Glibc.read(fd, &buffer, buffer.count)
            if count <= 0 { break }
            bytes.append(contentsOf: buffer[0..<count])
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func meminfoAvailable() -> UInt64? {
        guard let text = read("/proc/meminfo") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let fields = line.split(separator: " ")
            if fields.count >= 2, let kib = UInt64(fields[1]) { return kib * 1024 }
        }
        return nil
    }

    /// The memory cgroup directories that apply to this process (its own cgroup and the
    /// ancestors visible in the mount), v1 and v2: found once, as a process does not move.
    static let cgroupDirectories: [(directory: String, version2: Bool)] = {
        guard let membership = read("/proc/self/cgroup"), let mounts = read("/proc/self/mountinfo") else { return [] }
        var results: [(directory: String, version2: Bool)] = []
        for line in membership.split(separator: "\n") {
            // "hierarchy-ID:controllers:path"
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            let controllers = parts[1].split(separator: ",")
            let version2 = parts[0] == "0" && parts[1].isEmpty
            guard version2 || controllers.contains("memory") else { continue }
            guard let mount = mountPoint(in: mounts, version2: version2) else { continue }
            var path = String(parts[2])
            while true {
                let directory = mount.directory + String(path.dropFirst(mount.root == "/" ? 0 : mount.root.count))
                results.append((directory, version2))
                guard path != "/", path != mount.root, let slash = path.lastIndex(of: "/") else { break }
                path = slash == path.startIndex ? "/" : String(path[..<slash])
            }
        }
        return results
    }()

    /// Where the memory controller's (v1) or the unified (v2) hierarchy is mounted, and which
    /// cgroup path is that mount's root.
    private static func mountPoint(in mountinfo: String, version2: Bool) -> (directory: String, root: String)? {
        for line in mountinfo.split(separator: "\n") {
            // "id parent major:minor root mount-point options - fstype source super-options"
            let halves = line.components(separatedBy: " - ")
            guard halves.count == 2 else { continue }
            let fields = halves[0].split(separator: " ")
            let tail = halves[1].split(separator: " ")
            guard fields.count >= 5, tail.count >= 3 else { continue }
            if version2 ? tail[0] == "cgroup2" : (tail[0] == "cgroup" && tail[2].split(separator: ",").contains("memory")) {
                return (String(fields[4]), String(fields[3]))
            }
        }
        return nil
    }

    private static func headroom(in directory: String, version2: Bool) -> UInt64? {
        func number(_ file: String) -> UInt64? {
            guard let text = read(directory + "/" + file) else { return nil }
            return UInt64(text.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        func stat(_ key: String) -> UInt64 {
            guard let text = read(directory + "/memory.stat") else { return 0 }
            for line in text.split(separator: "\n") where line.hasPrefix(key + " ") {
                return UInt64(line.split(separator: " ").last ?? "") ?? 0
            }
            return 0
        }
        // v2 writes "max" for no limit (UInt64 parse fails); v1 a number near 2^63.
        guard let limit = number(version2 ? "memory.max" : "memory.limit_in_bytes"), limit < (1 << 60),
              let usage = number(version2 ? "memory.current" : "memory.usage_in_bytes") else { return nil }
        let reclaimable = stat(version2 ? "inactive_file" : "total_inactive_file")
        let used = usage > reclaimable ? usage - reclaimable : 0
        return limit > used ? limit - used : 0
    }
}
