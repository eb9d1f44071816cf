import Foundation
import Glibc
import Synchronization

/// Two hosts on one machine: two network namespaces joined by a veth pair, whose link can be
/// slowed (tbf on both ends: this kernel has tbf and htb, not netem), cut and restored. Only the
/// two addresses inside the namespaces it made are used.
///
/// Names are unique per process and link (`dmt-PID-N-a` / `-b`); `remove()` deletes both
/// namespaces (which takes the veth pair with them), and a new link first removes namespaces
/// left by a process that died before it could. Where the process cannot make namespaces (not
/// root, no `ip`/`tc`) it throws `Unavailable` with the reason (tests skip on it, the benchmark
/// says why). Shared by the tests and `dirtymig-bench link`.
public final class TwoHostLink: @unchecked Sendable {
    // @unchecked: the names are immutable; `removed` is touched by the owner's thread only.
    public let left: String
    public let right: String
    public let leftAddress: String
    public let rightAddress: String
    private let leftDevice: String
    private let rightDevice: String
    private var removed = false

    private static let prefix = "dmt-"
    private static let made = Mutex(0)

    /// Why two hosts cannot be made here.
    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String
    }

    /// A command that shapes, cuts or restores the link failed.
    public struct CommandFailed: Error, CustomStringConvertible {
        public var description: String
        public init(description: String) { self.description = description }
    }

    /// `rateMbit`: tbf on both ends of the link (nil: as fast as veth goes).
    public init(rateMbit: Int? = nil) throws(Unavailable) {
        guard geteuid() == 0 else { throw Unavailable(description: "needs root to make network namespaces") }
        for tool in ["ip", "tc"] where Self.find(tool) == nil {
            throw Unavailable(description: "needs the '\(tool)' command (iproute2) to make network namespaces")
        }
        Self.removeLeftovers()
        let number = Self.made.withLock { made in made += 1; return made }
        let pid = getpid()
        left = "\(Self.prefix)\(pid)-\(number)-a"
        right = "\(Self.prefix)\(pid)-\(number)-b"
        leftDevice = "dmt\(pid)x\(number)a"
        rightDevice = "dmt\(pid)x\(number)b"
        let subnet = "10.\(200 + number % 50).\(pid % 250)"
        leftAddress = "\(subnet).1"
        rightAddress = "\(subnet).2"
        do {
            try Self.run("ip", ["netns", "add", left])
            try Self.run("ip", ["netns", "add", right])
            try Self.run("ip", ["link", "add", leftDevice, "netns", left, "type", "veth", "peer", "name", rightDevice, "netns", right])
            for (namespace, device, address) in [(left, leftDevice, leftAddress), (right, rightDevice, rightAddress)] {
                try Self.run("ip", ["-n", namespace, "addr", "add", "\(address)/24", "dev", device])
                try Self.run("ip", ["-n", namespace, "link", "set", device, "up"])
                try Self.run("ip", ["-n", namespace, "link", "set", "lo", "up"])
            }
            if let rateMbit { try shape(rateMbit: rateMbit) }
        } catch {
            remove()
            throw Unavailable(description: "cannot make two network namespaces joined by a veth pair: \(error)")
        }
    }

    deinit { remove() }

    /// tbf at `rateMbit` on both ends (both directions limited, as on a real link). The bucket
    /// holds a hundredth of a second at the rate (at least 4 KiB): tbf refills it once a timer
    /// tick, and a bucket smaller than a tick's worth (1 Gbit/s at 250 Hz is 500 KB) caps the
    /// link well below its rate.
    public func shape(rateMbit: Int) throws {
        let burstBytes = max(4096, rateMbit * 1_000_000 / 8 / 100)
        for (namespace, device) in [(left, leftDevice), (right, rightDevice)] {
            try Self.run("tc", ["-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf",
                                "rate", "\(rateMbit)mbit", "burst", "\(burstBytes)", "latency", "100ms"])
        }
    }

    /// Every packet between the two is dropped until `restore()` (nftables where it exists, as a
    /// failed switch would; the link set down otherwise). Connections stay open, as across a
    /// real cut: TCP keeps retrying.
    public func cut() throws { try setCut(true) }

    public func restore() throws { try setCut(false) }

    private func setCut(_ cut: Bool) throws {
        guard let nft = Self.find("nft") else {
            return try Self.run("ip", ["-n", left, "link", "set", leftDevice, cut ? "down" : "up"])
        }
        let rules = cut
            ? "add table inet dmcut; add chain inet dmcut in { type filter hook input priority 0; policy drop; }; add chain inet dmcut out { type filter hook output priority 0; policy drop; }"
            : "delete table inet dmcut"
        for namespace in [left, right] { try Self.run("ip", ["netns", "exec", namespace, nft, rules]) }
    }

    /// Drops `perMille` of the packets each namespace receives, at random (nftables' numgen:
    /// this kernel has no netem); 0 removes the rule. Needs nft.
    public func setLoss(perMille: Int) throws {
        guard let nft = Self.find("nft") else { throw Unavailable(description: "needs the 'nft' command (nftables) to drop packets at random") }
        for namespace in [left, right] {
            _ = try? Self.output("ip", ["netns", "exec", namespace, nft, "delete table inet dmloss"])
            guard perMille > 0 else { continue }
            try Self.run("ip", ["netns", "exec", namespace, nft,
                                "add table inet dmloss; add chain inet dmloss in { type filter hook input priority 0; policy accept; }; add rule inet dmloss in numgen random mod 1000 < \(perMille) drop"])
        }
    }

    /// The prefix that runs a command in `namespace` (for ProcessTestCase.start's `prefix`); the
    /// shell is replaced by it, so the test's process is the command itself.
    public func inside(_ namespace: String) -> [String] { ["exec"] + command(in: namespace) }

    /// The command that runs a program in `namespace` (`ip netns exec NAME`, which replaces itself
    /// with the program: the pid is the program's).
    public func command(in namespace: String) -> [String] { [Self.find("ip") ?? "ip", "netns", "exec", namespace] }

    public func remove() {
        guard !removed else { return }
        removed = true
        for namespace in [left, right] { Self.delete(namespace) }
    }

    /// Ends every process still inside `namespace`, then deletes it. Deleting a namespace does not
    /// end its processes: a VM a crashed test had started there ran on, unseen, for as long as
    /// the machine did (one took 44 % of a core for 45 minutes and skewed every CPU-share
    /// measurement after it).
    private static func delete(_ namespace: String) {
        let pids = ((try? output("ip", ["netns", "pids", namespace])) ?? "").split(separator: "\n").compactMap { Int32($0) }
        for pid in pids where pid != getpid() { kill(pid, SIGKILL) }
        try? run("ip", ["netns", "del", namespace])
    }

    /// Namespaces of ours whose test process is gone (it crashed, or was killed, mid-test).
    public static func removeLeftovers() {
        guard let listing = try? output("ip", ["netns", "list"]) else { return }
        for line in listing.split(separator: "\n") {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix(prefix), let pid = Int32(name.dropFirst(prefix.count).split(separator: "-").first ?? ""),
                  pid != getpid(), kill(pid, 0) != 0, errno == ESRCH else { continue }
            delete(name)
        }
    }

    public static func find(_ tool: String) -> String? {
        ["/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"].map { $0 + tool }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Runs `tool` and returns its standard output. posix_spawn and waitpid, not Foundation's
    /// Process: that one leaves threads behind, and the benchmark starts every run only on a
    /// process with no thread but its main one. The tools print a few lines at most, well under
    /// a pipe's 64 KiB, so both pipes are read once the tool has ended.
    @discardableResult
    private static func output(_ tool: String, _ arguments: [String]) throws -> String {
        guard let path = find(tool) else { throw CommandFailed(description: "no '\(tool)' command") }
        var out: [Int32] = [-1, -1], err: [Int32] = [-1, -1]
        guard pipe(&out) == 0, pipe(&err) == 0 else { throw CommandFailed(description: "pipe: \(String(cString: strerror(errno)))") }
        defer { for fd in [out[0], err[0]] { close(fd) } }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, out[1], 1)
        posix_spawn_file_actions_adddup2(&actions, err[1], 2)
        for fd in [out[0], err[0], out[1], err[1]] { posix_spawn_file_actions_addclose(&actions, fd) }
        let argv: [UnsafeMutablePointer<CChar>?] = ([path] + arguments).map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var child: pid_t = 0
        let spawned = posix_spawn(&child, path, &actions, nil, argv, environ)
        close(out[1]); close(err[1])
        guard spawned == 0 else { throw CommandFailed(description: "cannot start \(path): \(String(cString: strerror(spawned)))") }
        var status: Int32 = 0
        while waitpid(child, &status, 0) < 0 && errno == EINTR {}
        func drain(_ fd: Int32) -> String {
            var bytes: [UInt8] = [], buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let got = read(fd, &buffer, buffer.count)
                if got > 0 { bytes += buffer[0..<got]; continue }
                if got < 0 && errno == EINTR { continue }
                return String(decoding: bytes, as: UTF8.self)
            }
        }
        let stdout = drain(out[0]), stderr = drain(err[0])
        // Exited normally with status 0 (WIFEXITED and WEXITSTATUS, which Swift does not import).
        guard status & 0x7f == 0, (status >> 8) & 0xff == 0 else {
            throw CommandFailed(description: "\(tool) \(arguments.joined(separator: " ")): \(stderr)")
        }
        return stdout
    }

    private static func run(_ tool: String, _ arguments: [String]) throws { try output(tool, arguments) }
}
