import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// The link rule of a migration between two hosts (two network namespaces joined by a veth pair
/// shaped to 20 Mbit/s, TwoHostLink): a link that carries nothing for `--link-timeout` fails the
/// migration on both sides, the VM running on at the source and the destination discarding its
/// copy; a shorter cut is ridden out. The same with TLS and in plaintext.
final class LinkFailureTests: TwoHostTestCase {
    override class var directoryPrefix: String { "dml" }


    /// The destination in the right namespace and the source VM in the left one, vCPU 0 having
    /// written 16 MiB once (then idle, so the migration converges): the first pass alone takes
    /// about 7 s at 20 Mbit/s, so a cut 1.5 s into the migration lands in it. vCPU 1 reads, which
    /// dirties nothing and shows the guest runs. Returns the receiver and the channel options both sides use.
    private func startBothSides(tls: Bool) throws -> (receiver: Process, receiverErrors: Pipe, channel: [String]) {
        let channel = tls ? ["--psk-file", try makePSKFile("key.psk")] : ["--insecure"]
        let (receiver, out, errors) = try start(["receive", "--listen", "\(link.rightAddress):\(port)", "--once",
                                                 "--control", socket("destination")] + channel,
                                                prefix: link.inside(link.right))
        let ready = try XCTUnwrap(CLI.readLine(out), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening"), ready)
        let (_, sourceOut, sourceErrors) = try start(["boot", "--memory", "128M", "--vcpus", "2", "--track", "bitmap",
                                                      "--control", socket("source"), "--workload", "0:write,ws=16M,passes=1",
                                                      "--workload", "1:read,ws=1M"],
                                                     prefix: link.inside(link.left))
        XCTAssertNotNil(CLI.readLine(sourceOut), stderrText(sourceErrors))
        try waitForWrites(socket("source"), pages: 4096)
        return (receiver, errors, channel)
    }

    private func startMigration(channel: [String], extra: [String]) throws -> (Process, Pipe, Pipe) {
        let migrate = Process()
        migrate.executableURL = CLI.binary
        migrate.arguments = ["migrate", "--vm", socket("source"), "--to", "\(link.rightAddress):\(port)"] + channel + extra
        let out = Pipe(), errors = Pipe()
        migrate.standardOutput = out
        migrate.standardError = errors
        try migrate.run()
        processes.append(migrate)
        return (migrate, out, errors)
    }

    /// Whether vCPU 1 (the reader) of the VM behind `name` makes progress over 0.5 s.
    private func assertReaderRuns(_ name: String, file: StaticString = #filePath, line: UInt = #line) {
        func pages() -> Double { status(name)?["vcpu_stats"]?[1]?["pages"]?.doubleValue ?? -1 }
        let before = pages()
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertGreaterThan(pages(), max(before, 0), "the guest of \(name) does not run", file: file, line: line)
    }

    private func waitForExit(_ process: Process, seconds: Double) -> Bool {
        waitUntil(seconds: seconds) { !process.isRunning }
    }

    private func assertALastingCutFailsOnBothSides(tls: Bool) throws {
        let linkTimeout = 4.0
        let (receiver, receiverErrors, channel) = try startBothSides(tls: tls)
        let (migrate, migrateOut, migrateErrors) = try startMigration(channel: channel, extra: ["--link-timeout", "4s"])
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertTrue(migrate.isRunning, "the migration ended before the cut: \(stderrText(migrateErrors))")
        try link.cut()
        let cut = Date()
        guard waitForExit(migrate, seconds: linkTimeout + 15) else {
            return XCTFail("migrate still runs \(linkTimeout + 15) s after the cut")
        }
        let failedAfter = Date().timeIntervalSince(cut)
        let message = String(decoding: migrateOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) + stderrText(migrateErrors)
        print("link cut for good, --link-timeout 4s\(tls ? ", TLS" : ""): migrate failed \(String(format: "%.1f", failedAfter)) s after the cut: \(message)")
        XCTAssertNotEqual(migrate.terminationStatus, 0)
        XCTAssertTrue(message.contains("--link-timeout"), message)
        XCTAssertTrue(message.contains("the VM runs on here"), message)
        // Not before the deadline: the kernel may not give up on a link that is only slow or
        // briefly silent (its last bytes went out just before the cut, so a little less is allowed).
        XCTAssertGreaterThan(failedAfter, linkTimeout - 1, "the migration failed before --link-timeout")
        // The destination noticed on its own (the source's abort cannot cross the cut link) and
        // discarded its copy: with --once it ends.
        guard waitForExit(receiver, seconds: linkTimeout + 15) else {
            return XCTFail("the receiver still waits \(linkTimeout + 15) s after the cut: \(stderrText(receiverErrors))")
        }
        let log = stderrText(receiverErrors)
        XCTAssertNotEqual(receiver.terminationStatus, 0, log)
        XCTAssertTrue(log.contains("carried nothing"), log)
        XCTAssertTrue(log.contains("discarded"), log)
        try link.restore()
        assertReaderRuns("source")
        XCTAssertEqual(status("source")?["state"]?.stringValue, "running")
    }

    func testALastingCutFailsTheMigrationOnBothSidesAtTheLinkTimeoutAndTheVMRunsOn() throws {
        try assertALastingCutFailsOnBothSides(tls: false)
    }

    func testALastingCutFailsAnEncryptedMigrationTheSameWay() throws {
        try assertALastingCutFailsOnBothSides(tls: true)
    }

    /// A 3 s cut under a 10 s link timeout: the migration carries on once the link is back and
    /// completes, verified.
    func testACutShorterThanTheLinkTimeoutIsRiddenOut() throws {
        let (receiver, receiverErrors, channel) = try startBothSides(tls: true)
        let (migrate, out, migrateErrors) = try startMigration(channel: channel, extra: ["--link-timeout", "10s", "--verify",
                                                                                        "--downtime", "1s", "--json"])
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertTrue(migrate.isRunning, "the migration ended before the cut: \(stderrText(migrateErrors))")
        try link.cut()
        Thread.sleep(forTimeInterval: 3)
        try link.restore()
        guard waitForExit(migrate, seconds: 90) else {
            return XCTFail("the migration did not end within 90 s of the link's return: \(stderrText(migrateErrors))")
        }
        XCTAssertEqual(migrate.terminationStatus, 0, stderrText(migrateErrors))
        let report = try JSONValue.parse(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            .trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertEqual(report["status"]?.stringValue, "completed", "\(report)")
        XCTAssertEqual(report["verify"]?.stringValue, "passed", "\(report)")
        XCTAssertTrue(receiver.isRunning, stderrText(receiverErrors))
        assertReaderRuns("destination")
    }

    /// Random loss of 0.1 % and 1 % of the packets each way (TCP retransmits; the link rule must
    /// not mistake a lossy link for a dead one): the migration completes and verifies.
    func testMigrationsCompleteAndVerifyOnALossyLink() throws {
        for perMille in [1, 10] {
            try skippingWithoutTwoHosts { try link.setLoss(perMille: perMille) }
            let (receiver, receiverErrors, channel) = try startBothSides(tls: perMille == 10)
            let (migrate, out, migrateErrors) = try startMigration(channel: channel, extra: ["--link-timeout", "5s", "--verify",
                                                                                            "--downtime", "1s", "--json"])
            guard waitForExit(migrate, seconds: 120) else { return XCTFail("\(perMille) ‰ loss: the migration did not end in 120 s") }
            XCTAssertEqual(migrate.terminationStatus, 0, "\(perMille) ‰ loss: \(stderrText(migrateErrors))")
            let report = try JSONValue.parse(String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                .trimmingCharacters(in: .whitespacesAndNewlines))
            print("\(Double(perMille) / 10) % loss each way, 20 Mbit/s: \(report["status"]?.stringValue ?? "?"), verify \(report["verify"]?.stringValue ?? "?"), \(String(format: "%.1f", (report["total_ms"]?.doubleValue ?? 0) / 1000)) s")
            XCTAssertEqual(report["verify"]?.stringValue, "passed", "\(report)")
            assertReaderRuns("destination")
            // The next round starts from scratch: both processes go, and the sockets with them.
            for process in [receiver] + processes where process.isRunning { kill(process.processIdentifier, SIGKILL) }
            for process in processes { process.waitUntilExit() }
            processes.removeAll()
            _ = receiverErrors
            for name in ["source", "destination"] { try? FileManager.default.removeItem(atPath: socket(name)) }
        }
    }

    /// The side that only waits (a sender waiting for the destination's word, a destination
    /// waiting for the next frame) notices a dead link too: with `watchLink`, a receive with no
    /// timeout of its own fails about the deadline after the cut (keepalive probes go unanswered),
    /// where the same receive on an unwatched socket still waits.
    func testAWatchedSocketThatOnlyWaitsNoticesADeadLink() throws {
        let rightAddress = link.rightAddress
        let listener = try inNamespace(link.right) { try TCPSocket.listen(HostPort(host: rightAddress, port: 0)) }
        let endpoint = HostPort(host: link.rightAddress, port: listener.localPort)
        let watched = try inNamespace(link.left) { try TCPSocket.connect(endpoint) }
        let watchedPeer = try listener.accept()
        let unwatched = try inNamespace(link.left) { try TCPSocket.connect(endpoint) }
        let unwatchedPeer = try listener.accept()
        defer { for socket in [watched, watchedPeer, unwatched, unwatchedPeer] { socket.shutdown() } }
        watched.watchLink(timeoutSeconds: 2)
        let watchedEnd = Outcome<Void>(), unwatchedEnd = Outcome<Void>()
        Thread.detachNewThread { watchedEnd.set(Result { _ = try watched.receive(count: 1) }) }
        Thread.detachNewThread { unwatchedEnd.set(Result { _ = try unwatched.receive(count: 1) }) }
        Thread.sleep(forTimeInterval: 0.3)
        try link.cut()
        let cut = Date()
        XCTAssertTrue(waitUntil(seconds: 12) { watchedEnd.value != nil }, "the watched socket still waits 12 s after the cut")
        let noticedAfter = Date().timeIntervalSince(cut)
        print("a socket that only waits, watchLink 2 s: the dead link noticed \(String(format: "%.1f", noticedAfter)) s after the cut")
        guard case .failure(let error)? = watchedEnd.value else { return XCTFail("the receive returned: \(String(describing: watchedEnd.value))") }
        XCTAssertEqual((error as? SystemError)?.errno, ETIMEDOUT, "\(error)")
        // The deadline runs from the last byte either way, 0.3 s before the cut.
        XCTAssertGreaterThan(noticedAfter + 0.3, 1.5, "noticed before the deadline")
        XCTAssertNil(unwatchedEnd.value, "the unwatched socket's receive ended too: the test shows nothing")
        try link.restore()
    }

    /// Removing the link ends what still runs in its namespaces: deleting a namespace alone left
    /// a crashed test's VM running for good.
    func testRemovingTheLinkEndsWhatRunsInItsNamespaces() throws {
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/bin/sh")
        sleeper.arguments = ["-c", link.inside(link.left).joined(separator: " ") + " sleep 300"]
        try sleeper.run()
        processes.append(sleeper)
        XCTAssertTrue(waitUntil(seconds: 5) { ((try? String(contentsOfFile: "/proc/\(sleeper.processIdentifier)/cmdline", encoding: .utf8)) ?? "").hasPrefix("sleep") },
                      "the sleeper did not start in the namespace")
        link.remove()
        XCTAssertTrue(waitUntil(seconds: 5) { !sleeper.isRunning }, "a process in a removed namespace runs on")
    }

    /// Runs `body` on a thread inside network namespace `name` (setns affects only the calling
    /// thread): a socket made there stays in that namespace, whichever thread uses it after.
    private func inNamespace<T: Sendable>(_ name: String, _ body: @escaping @Sendable () throws -> T) throws -> T {
        let outcome = Outcome<T>()
        Thread.detachNewThread {
            outcome.set(Result {
                let fd = open("/var/run/netns/\(name)", O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw SystemError("open /var/run/netns/\(name)") }
                defer { close(fd) }
                // glibc's setns(2) is not in Swift's Glibc module (it needs _GNU_SOURCE).
                guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else { throw SystemError("dlsym setns") }
                let setns = unsafeBitCast(symbol, to: (@convention(c) (Int32, Int32) -> Int32).self)
                let newNetworkNamespace: Int32 = 0x4000_0000   // CLONE_NEWNET
                guard setns(fd, newNetworkNamespace) == 0 else { throw SystemError("setns \(name)") }
                return try body()
            })
        }
        guard waitUntil(seconds: 10, { outcome.value != nil }), let result = outcome.value else {
            throw TwoHostLink.CommandFailed(description: "nothing came back from namespace \(name) within 10 s")
        }
        return try result.get()
    }
}

/// A result another thread sets once.
private final class Outcome<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Result<T, any Error>?
    var value: Result<T, any Error>? { lock.lock(); defer { lock.unlock() }; return stored }
    func set(_ result: Result<T, any Error>) { lock.lock(); stored = result; lock.unlock() }
}
