import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// Where the two ends of a migration run: both on this host over loopback (every benchmark but
/// `link`), or the source in one network namespace and the destination in the other, joined by
/// a shaped veth pair (TwoHostLink), as two hosts on a link. The same for both migrators: each
/// side's processes are started inside its namespace (`ip netns exec` replaces itself with the
/// program, so the pid is the program's); control and QMP sockets are files and work across.
struct MigrationPlacement {
    var sourcePrefix: [String] = []
    var destinationPrefix: [String] = []
    var destinationHost = "127.0.0.1"
    /// Plaintext to an address other than loopback needs `--insecure` on both dirtymig sides.
    var acrossHosts = false

    static let loopback = MigrationPlacement()

    init() {}

    init(link: TwoHostLink) {
        sourcePrefix = link.command(in: link.left)
        destinationPrefix = link.command(in: link.right)
        destinationHost = link.rightAddress
        acrossHosts = true
    }

    /// A port the destination can listen on: any free loopback port here; in a namespace the
    /// benchmark made, nothing else listens.
    func destinationPort() throws -> UInt16 { acrossHosts ? 4470 : try freeLoopbackPort() }

    /// `executable arguments`, started inside the source's or the destination's namespace.
    func spawn(source: Bool, _ executable: String, _ arguments: [String], stdout: ChildProcess.Output,
               stderrPath: String) throws -> ChildProcess {
        try ChildProcess(executable, arguments, prefix: source ? sourcePrefix : destinationPrefix, stdout: stdout, stderrPath: stderrPath)
    }
}
