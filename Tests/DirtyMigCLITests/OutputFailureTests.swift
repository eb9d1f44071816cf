import DirtyMigCore
import Foundation
import XCTest

/// Logs, standard output and standard error that cannot be written (a full disk, a reader that
/// went away) must never end a VM's process: a peer controls how much a receiver logs, so a
/// connection flood against a standby whose log is on a full disk used to kill it (a trap in
/// Foundation's FileHandle.write), and a guest's console line killed `boot` at once. What could
/// not be written is counted and said once, when the stream takes a write again.
final class OutputFailureTests: ProcessTestCase {
    override class var directoryPrefix: String { "dmw" }

    /// A tmpfs of 64 KiB mounted on a new private directory `relative` to the test's directory
    /// (mode 0700, root's: fit for control sockets), and its unmount. Skips, printing why, where
    /// this process may not mount.
    private func smallDisk(_ relative: String) throws -> (path: String, unmount: () -> Void) {
        func skip(_ reason: String) -> XCTSkip {
            FileHandle.standardError.write(Data(("skipped: " + reason + "\n").utf8))
            return XCTSkip(reason)
        }
        guard geteuid() == 0 else { throw skip("mounting a small tmpfs (a disk that fills) needs root") }
        let path = directory + "/" + relative
        guard (try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                                        attributes: [.posixPermissions: 0o700])) != nil else {
            throw skip("cannot create \(path)")
        }
        guard mount("tmpfs", path, "tmpfs", 0, "size=64k,mode=0700") == 0 else {
            throw skip("mount -t tmpfs on \(path) failed: \(String(cString: strerror(errno)))")
        }
        return (path, { _ = umount2(path, Int32(MNT_DETACH)) })
    }

    /// Fills the disk at `path` with a file until it refuses more (ENOSPC); returns the file.
    @discardableResult
    private func fill(_ path: String) throws -> String {
        let file = path + "/filler"
        let fd = open(file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        let block = [UInt8](repeating: 0x5A, count: 4096)
        while true {
            let written = block.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            if written > 0 { continue }
            XCTAssertEqual(errno, ENOSPC, "the tmpfs filled up")
            break
        }
        // Page-sized writes stop at the last whole page: take the crumbs too.
        while [UInt8(0)].withUnsafeBytes({ write(fd, $0.baseAddress, 1) }) == 1 {}
        return file
    }

    /// Connects to `port` and hangs up at once, `count` times: a receiver logs one refusal line
    /// for each.
    private func connectAndClose(_ port: UInt16, count: Int) throws {
        for _ in 0..<count {
            let socket = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))
            socket.shutdown()
        }
    }

    private func queryStatus(_ socket: String) throws -> JSONValue {
        let client = try ControlClient(path: socket, greetingTimeout: 2, callTimeout: 2)
        defer { client.close() }
        return try client.call("query-status")
    }

    func testADetachedReceiverWhoseLogIsOnAFullDiskServesOnAndSaysWhatItLost() throws {
        // The default directory (XDG_RUNTIME_DIR/dirtymig) is the small disk: the detached
        // receiver's socket and log go there, and `list` finds it.
        let disk = try smallDisk("xdg/dirtymig")
        defer { disk.unmount() }
        var environment = ProcessInfo.processInfo.environment
        environment["XDG_RUNTIME_DIR"] = directory + "/xdg"
        let control = disk.path + "/rx.sock", log = disk.path + "/rx.log"
        let port = try freePort()
        let started = try CLI.run(["receive", "--name", "rx", "--listen", "127.0.0.1:\(port)", "--detach"], environment: environment)
        XCTAssertEqual(started.status, 0, started.stderr)
        XCTAssertTrue(started.stdout.contains(control), started.stdout)
        defer { _ = try? CLI.run(["stop", "--vm", "rx"], environment: environment) }
        let pid = pid_t(try XCTUnwrap(try queryStatus(control)["pid"]?.doubleValue))

        let filler = try fill(disk.path)
        // 200 refusals, about 100 bytes each: well past the page the log has begun.
        try connectAndClose(port, count: 200)
        Thread.sleep(forTimeInterval: 1)
        XCTAssertEqual(kill(pid, 0), 0, "the receiver is alive")
        XCTAssertEqual(try queryStatus(control)["state"], "listening", "and serves its control socket")
        let listed = try CLI.run(["list", "--json"], environment: environment)
        XCTAssertEqual(listed.status, 0, listed.stderr)
        XCTAssertEqual(try JSONValue.parse(listed.stdout)["state"], "listening", listed.stdout)

        // Room again: the next line the receiver logs says what was lost, once.
        XCTAssertEqual(unlink(filler), 0)
        try connectAndClose(port, count: 2)
        var text = ""
        XCTAssertTrue(waitUntil(seconds: 5) {
            text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
            return text.contains("could not be written")
        }, "the log says what it lost: \(text.suffix(2000))")
        let notes = text.split(separator: "\n").filter { $0.contains("could not be written") }
        print("the receiver's log, once it had room: \(notes)")
        XCTAssertEqual(notes.count, 1, "said once")
        XCTAssertTrue(notes.first?.hasPrefix("dirtymig: ") == true, "the note is a line of its own, also after a torn one: \(notes)")
        XCTAssertTrue(notes.first?.contains(" lines (") == true && notes.first?.contains("bytes) of standard error could not be written") == true && notes.first?.contains("No space left on device") == true,
                      "\(notes)")
        XCTAssertEqual(try queryStatus(control)["state"], "listening")
    }

    func testBootWithStandardErrorOnAFullDiskRunsOnAndSaysWhatItLostAtExit() throws {
        let disk = try smallDisk("disk")
        defer { disk.unmount() }
        let errors = disk.path + "/boot.err"
        let errorFD = open(errors, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        XCTAssertGreaterThanOrEqual(errorFD, 0)
        let filler = try fill(disk.path)

        let vm = socket("full")
        let process = Process()
        process.executableURL = CLI.binary
        process.arguments = ["boot", "--memory", "64M", "--vcpus", "1", "--control", vm]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle(fileDescriptor: errorFD, closeOnDealloc: true)
        try process.run()
        processes.append(process)
        // The guest's first console line ("dirtymig guest: 1 vCPUs, 64 MiB") goes to stderr.
        let ready = try XCTUnwrap(CLI.readLine(out.fileHandleForReading), "boot printed nothing and \(process.isRunning ? "runs" : "ended")")
        XCTAssertTrue(ready.contains("running"), ready)
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertTrue(process.isRunning, "boot runs on")
        XCTAssertEqual(try queryStatus(vm)["state"], "running")

        XCTAssertEqual(unlink(filler), 0)
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationReason, .exit)
        XCTAssertEqual(process.terminationStatus, 0)
        let text = try String(contentsOfFile: errors, encoding: .utf8)
        print("boot's stderr, once it had room: \(text)")
        XCTAssertTrue(text.contains("could not be written") && text.contains("No space left on device"), text)
    }

    /// A pipe whose reading end is already closed: every write to it fails with EPIPE (and
    /// raises SIGPIPE, which used to end the process).
    private func brokenPipe() -> FileHandle {
        var ends: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&ends), 0)
        close(ends[0])
        return FileHandle(fileDescriptor: ends[1], closeOnDealloc: true)
    }

    func testClosedPipesOnStandardOutputAndErrorEndNoProcess() throws {
        // A VM whose stdout and stderr lead nowhere: its ready line and the guest's console line
        // are lost, and it runs and serves on.
        let vm = socket("pipes")
        let process = Process()
        process.executableURL = CLI.binary
        process.arguments = ["boot", "--memory", "64M", "--vcpus", "1", "--control", vm]
        process.standardOutput = brokenPipe()
        process.standardError = brokenPipe()
        try process.run()
        processes.append(process)
        XCTAssertTrue(waitUntil(seconds: 20) { (try? queryStatus(vm))?["state"] == "running" || !process.isRunning },
                      "boot serves its control socket")
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertTrue(process.isRunning, "boot runs on (ended by \(process.isRunning ? "nothing" : "\(process.terminationReason == .uncaughtSignal ? "signal" : "exit") \(process.terminationStatus)"))")
        XCTAssertEqual(try queryStatus(vm)["state"], "running")
        XCTAssertEqual(try CLI.run(["stop", "--vm", vm]).status, 0)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationReason, .exit, "ended by exit, not by signal \(process.terminationStatus)")

        // A short command whose output cannot be written fails (status 1) and says so on stderr.
        let version = Process()
        version.executableURL = CLI.binary
        version.arguments = ["--version"]
        version.standardOutput = brokenPipe()
        let errors = Pipe()
        version.standardError = errors
        try version.run()
        let said = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        version.waitUntilExit()
        print("--version into a closed pipe: \(version.terminationReason == .exit ? "exit" : "signal") \(version.terminationStatus): \(said)")
        XCTAssertEqual(version.terminationReason, .exit, "not killed by signal \(version.terminationStatus)")
        XCTAssertEqual(version.terminationStatus, 1)
        XCTAssertTrue(said.contains("could not be written") && said.contains("Broken pipe"), said)
    }
}
