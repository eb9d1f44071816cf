import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// The bytes a network namespace's interfaces (loopback aside) have transmitted, read from its
/// /proc/net/dev by `cat` started inside it. Between two hosts only the migration crosses the
/// link (control and QMP sockets are files), so the difference over a run is what the source
/// put on the wire: TCP/IP and Ethernet headers included, as tbf counts them. The one count that
/// does not depend on what a migrator reports: QEMU 7.2 counts a multifd page's bytes before it
/// compresses them.
enum NamespaceTraffic {
    static func transmittedBytes(prefix: [String]) throws -> UInt64 {
        let scratch = try ScratchDirectory("dirtymig-bench-netdev")
        let path = scratch.file("dev")
        let reader = try ChildProcess("/bin/cat", ["/proc/net/dev"], prefix: prefix, stdout: .file(path), stderrPath: scratch.file("err"))
        guard reader.waitForExit(timeout: 10), reader.exitStatus == 0 else {
            reader.stop()
            throw BenchError("cannot read the namespace's /proc/net/dev: \(reader.stderrTail)")
        }
        guard let bytes = NetDevCounters.transmittedBytes(procNetDev: try String(contentsOfFile: path, encoding: .utf8)) else {
            throw BenchError("the namespace's /proc/net/dev has no interface besides lo")
        }
        return bytes
    }
}
