import DirtyMigCore
import Foundation
import XCTest

/// The hardening issue's defects, through the command line with real processes: numbers out of
/// range, SIGTERM to either side of a migration, a second sender, the control socket's first
/// moments and bursts, and a VM that does not fit in the memory it is given. Each test keeps its
/// control sockets in a private temporary directory.
final class HardeningTests: ProcessTestCase {
    override class var directoryPrefix: String { "dmh" }

    /// A VM whose writer dirties 64 MiB at 20 MiB/s while a reader reads.
    private func boot(_ name: String, memory: String = "256M", writer: String = "0:write,ws=64M,pattern=random,rate=20M") throws -> (Process, Pipe) {
        let (process, output, errors) = try start(["boot", "--memory", memory, "--vcpus", "2", "--track", "ring",
                                                   "--control", socket(name), "--workload", writer, "--workload", "1:read,ws=16M"])
        let ready = try XCTUnwrap(CLI.readLine(output), "boot printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("running"), ready)
        return (process, errors)
    }

    private func receive(_ name: String, port: UInt16, prefix: [String] = []) throws -> (Process, Pipe) {
        let (process, output, errors) = try start(["receive", "--listen", "127.0.0.1:\(port)", "--control", socket(name)], prefix: prefix)
        let ready = try XCTUnwrap(CLI.readLine(output), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening"), ready)
        return (process, errors)
    }

    private func assertRuns(_ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        try assertGuestRuns(socket: socket(name), vcpus: 2, file: file, line: line)
    }

    /// Starts `dirtymig migrate --vm NAME ...` in the background, its JSON report on stdout.
    private func migrate(_ name: String, to port: UInt16, _ extra: [String]) throws -> (Process, FileHandle) {
        let (process, output, _) = try start(["migrate", "--vm", socket(name), "--to", "127.0.0.1:\(port)", "--json"] + extra)
        return (process, output)
    }

    private func waitForExit(_ process: Process, seconds: Double) -> Double? {
        let start = Date()
        while process.isRunning && Date().timeIntervalSince(start) < seconds { usleep(10_000) }
        return process.isRunning ? nil : Date().timeIntervalSince(start)
    }

    // MARK: Defect 2: numbers

    func testNumbersOutOfRangeAreRefusedAndTheVMRunsOn() throws {
        let (vm, _) = try boot("num")
        let client = try ControlClient(path: socket("num"))
        defer { client.close() }
        for (key, value) in [("timeout_s", 2e10), ("timeout_s", 1e30), ("bandwidth", 1e30), ("max_iterations", 1.5),
                             ("downtime_ms", 0.5), ("bandwidth", 4095)] {
            XCTAssertThrowsError(try client.call("migrate", arguments: .object([("to", .string("127.0.0.1:1")), (key, .double(value))]))) {
                let error = ($0 as? ControlClient.ClientError)?.controlError
                XCTAssertEqual(error?.errorClass, .invalidArgument, "\(key) \(value): \($0)")
            }
        }
        let cli = try CLI.run(["migrate", "--vm", socket("num"), "--to", "127.0.0.1:1", "--timeout", "99999999999s"])
        XCTAssertEqual(cli.status, 2, cli.stderr)
        XCTAssertTrue(cli.stderr.contains("timeout must be from 1 ms to 30 days"), cli.stderr)
        XCTAssertTrue(vm.isRunning)
        try assertRuns("num")
    }

    // MARK: Defect 3: SIGTERM to the receiver

    func testSIGTERMToTheReceiverDuringAMigrationAbortsItAndTheSourceRunsOn() throws {
        let (source, _) = try boot("rsrc")
        let port = try freePort()
        let (receiver, receiverErrors) = try receive("rdst", port: port)
        try waitForWrites(socket("rsrc"), pages: 2560)   // the first pass then outlasts the test's wait
        let (migration, report) = try migrate("rsrc", to: port, ["--bandwidth", "5M", "--verify"])
        Thread.sleep(forTimeInterval: 1.5)
        kill(receiver.processIdentifier, SIGTERM)
        let receiverExit = waitForExit(receiver, seconds: 5)
        XCTAssertNotNil(receiverExit, "the receiver exits within 5 s of SIGTERM")
        XCTAssertEqual(receiver.terminationStatus, 0)
        XCTAssertNotNil(waitForExit(migration, seconds: 10), "migrate ends")
        XCTAssertEqual(migration.terminationStatus, 1, "the migration did not complete")
        let json = try JSONValue.parse(String(decoding: report.readDataToEndOfFile(), as: UTF8.self))
        XCTAssertEqual(json["status"], "failed")
        let error = json["error"]?.stringValue ?? ""
        print("receiver stopped mid-migration: migrate reported: \(error)")
        XCTAssertTrue(error.contains("the destination is stopping"), error)
        let log = stderrText(receiverErrors)
        XCTAssertTrue(log.contains("its partial VM was discarded"), log)
        XCTAssertTrue(source.isRunning, "the source runs on")
        try assertRuns("rsrc")
    }

    // MARK: Defect 4: SIGTERM to the source

    func testSIGTERMToTheSourceDuringAMigrationCancelsItAndStopsTheVM() throws {
        let (source, _) = try boot("ssrc", writer: "0:write,ws=128M,pattern=random,rate=50M")
        let port = try freePort()
        let (receiver, receiverErrors) = try receive("sdst", port: port)
        // The SIGTERM must come in the middle of the first pass: with 40 MiB written before the
        // migration starts, that pass takes 2 s at 20 MiB/s. A migration started before the guest
        // wrote anything finished its tiny first passes, and converged, before the signal.
        try waitForWrites(socket("ssrc"), pages: 10_240)
        let (migration, report) = try migrate("ssrc", to: port, ["--bandwidth", "20M", "--throttle", "none"])
        Thread.sleep(forTimeInterval: 1.5)
        kill(source.processIdentifier, SIGTERM)
        let exited = waitForExit(source, seconds: 5)
        XCTAssertNotNil(exited, "the source exits within 5 s of SIGTERM")
        print("source stopped \(String(format: "%.2f", exited ?? -1)) s after SIGTERM")
        XCTAssertEqual(source.terminationStatus, 0)
        XCTAssertNotNil(waitForExit(migration, seconds: 5))
        XCTAssertEqual(migration.terminationStatus, 1)
        let json = try JSONValue.parse(String(decoding: report.readDataToEndOfFile(), as: UTF8.self))
        XCTAssertEqual(json["status"], "failed")
        XCTAssertTrue(json["error"]?.stringValue?.contains("the source was asked to stop") ?? false, "\(json["error"] ?? .null)")
        // The destination discarded its copy and listens on.
        Thread.sleep(forTimeInterval: 0.3)
        let log = stderrText(receiverErrors)
        XCTAssertTrue(log.contains("the source was asked to stop") && log.contains("its partial VM was discarded"), log)
        XCTAssertTrue(receiver.isRunning)
        let status = try ControlClient(path: socket("sdst")).call("query-status")
        XCTAssertEqual(status["state"], "listening")
    }

    // MARK: Signals to the `migrate` command itself

    func testCtrlCOnMigrateCancelsTheMigrationAndKillDoesNot() throws {
        let (source, _) = try boot("csrc")
        let port = try freePort()
        let (_, receiverErrors) = try receive("cdst", port: port)
        try waitForWrites(socket("csrc"), pages: 2560)   // the first pass then outlasts the test's wait
        let (migration, report) = try migrate("csrc", to: port, ["--bandwidth", "5M"])
        Thread.sleep(forTimeInterval: 1.5)
        kill(migration.processIdentifier, SIGINT)
        XCTAssertNotNil(waitForExit(migration, seconds: 5))
        XCTAssertEqual(migration.terminationStatus, 130)
        let json = try JSONValue.parse(String(decoding: report.readDataToEndOfFile(), as: UTF8.self))
        XCTAssertEqual(json["status"], "failed")
        XCTAssertTrue(json["error"]?.stringValue?.contains("cancelled (SIGINT to 'dirtymig migrate')") ?? false, "\(json["error"] ?? .null)")
        XCTAssertTrue(source.isRunning)
        try assertRuns("csrc")
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertTrue(stderrText(receiverErrors).contains("its partial VM was discarded"))

        // SIGHUP (the terminal went away) cancels too.
        let (hungUp, hungUpReport) = try migrate("csrc", to: port, ["--bandwidth", "5M"])
        Thread.sleep(forTimeInterval: 1.5)
        kill(hungUp.processIdentifier, SIGHUP)
        XCTAssertNotNil(waitForExit(hungUp, seconds: 5))
        XCTAssertEqual(hungUp.terminationStatus, 130)
        let hungUpJSON = try JSONValue.parse(String(decoding: hungUpReport.readDataToEndOfFile(), as: UTF8.self))
        XCTAssertTrue(hungUpJSON["error"]?.stringValue?.contains("cancelled (SIGHUP") ?? false, "\(hungUpJSON["error"] ?? .null)")
        XCTAssertGreaterThan(hungUpJSON["transferred_bytes"]?.doubleValue ?? 0, 0, "a failed report says what was sent")
        XCTAssertGreaterThanOrEqual(hungUpJSON["iterations"]?.doubleValue ?? -1, 0)
        try assertRuns("csrc")

        // SIGKILL leaves no one to ask for a cancel: the migration, which runs in the VM's
        // process, goes on and completes.
        let (killed, _) = try migrate("csrc", to: port, ["--bandwidth", "40M"])
        Thread.sleep(forTimeInterval: 1.0)
        kill(killed.processIdentifier, SIGKILL)
        XCTAssertNotNil(waitForExit(source, seconds: 30), "the migration completed and the source stopped")
        XCTAssertEqual(source.terminationStatus, 0)
        try assertRuns("cdst")
    }

    // MARK: Scripts: --detach, list, stop

    func testDetachListAndStop() throws {
        let vm = socket("bg")
        let boot = try CLI.run(["boot", "--memory", "128M", "--control", vm, "--detach"])
        XCTAssertEqual(boot.status, 0, boot.stderr)
        XCTAssertTrue(boot.stdout.contains("running in the background") && boot.stdout.contains(vm), boot.stdout)
        // Ready when the command returns: the first query works.
        let status = try ControlClient(path: vm).call("query-status")
        XCTAssertEqual(status["state"], "running")
        let pid = try XCTUnwrap(status["pid"]?.doubleValue)
        XCTAssertEqual(kill(pid_t(pid), 0), 0)

        let port = try freePort()
        let receiver = socket("bgrx")
        let receive = try CLI.run(["receive", "--listen", "127.0.0.1:\(port)", "--control", receiver, "--detach"])
        XCTAssertEqual(receive.status, 0, receive.stderr)
        XCTAssertEqual(try ControlClient(path: receiver).call("query-status")["state"], "listening")

        // A second boot with the same socket fails, and says why (from its log).
        let clash = try CLI.run(["boot", "--memory", "128M", "--control", vm, "--detach"])
        XCTAssertNotEqual(clash.status, 0)
        XCTAssertTrue(clash.stderr.contains("already running"), clash.stderr)

        for path in [vm, receiver] {
            let stopped = try CLI.run(["stop", "--vm", path])
            XCTAssertEqual(stopped.status, 0, stopped.stderr)
            XCTAssertThrowsError(try ControlClient(path: path), "\(path) is gone")
        }
        // Ended: gone, or a zombie its new parent has not reaped yet.
        var state: String?
        if let stat = try? String(contentsOfFile: "/proc/\(Int(pid))/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") {
            state = String(stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).prefix(1))
        }
        XCTAssertTrue(state == nil || state == "Z", "the detached VM's process ended (state \(state ?? "gone"))")
        XCTAssertTrue(FileManager.default.fileExists(atPath: directory + "/bg.log"))
    }

    /// Once `migrate` has returned, the destination answers the VM's commands (not the
    /// receiver's): the VM hops from receiver to receiver, each queried as soon as it lands.
    func testTheDestinationServesTheVMsCommandsWhenMigrateReturns() throws {
        let (_, started, errors) = try start(["boot", "--memory", "64M", "--vcpus", "1", "--track", "ring", "--control", socket("hop0"),
                                            "--workload", "0:write,ws=8M,rate=20M"])
        XCTAssertNotNil(CLI.readLine(started), stderrText(errors))
        for hop in 1...10 {
            let port = try freePort()
            let (_, output, receiverErrors) = try start(["receive", "--listen", "127.0.0.1:\(port)", "--control", socket("hop\(hop)")])
            XCTAssertNotNil(CLI.readLine(output), stderrText(receiverErrors))
            let migrated = try CLI.run(["migrate", "--vm", socket("hop\(hop - 1)"), "--to", "127.0.0.1:\(port)", "--json"])
            XCTAssertEqual(migrated.status, 0, "hop \(hop): \(migrated.stderr)")
            let client = try ControlClient(path: socket("hop\(hop)"))
            defer { client.close() }
            XCTAssertNoThrow(try client.call("query-dirty-rate", arguments: ["mode": "sample", "interval": .double(0.05)]), "hop \(hop)")
        }
    }

    /// A second `--detach` under a running VM's name fails, says why, and leaves the running
    /// VM's log in place: the same file, still written by that VM (receive's too).
    func testAFailedDetachKeepsTheRunningVMsLog() throws {
        var environment = ProcessInfo.processInfo.environment
        environment["XDG_RUNTIME_DIR"] = directory
        let control = directory + "/dirtymig"
        let commands = [("logt", ["boot", "--name", "logt", "--memory", "64M", "--vcpus", "1", "--detach"]),
                        ("logrx", ["receive", "--name", "logrx", "--listen", "127.0.0.1:\(try freePort())", "--detach"])]
        defer { for (name, _) in commands { _ = try? CLI.run(["stop", "--vm", name], environment: environment) } }
        for (name, arguments) in commands {
            let log = control + "/\(name).log"
            let first = try CLI.run(arguments, environment: environment)
            XCTAssertEqual(first.status, 0, first.stderr)
            XCTAssertTrue(first.stdout.contains("log \(log)"), first.stdout)
            let before = try String(contentsOfFile: log, encoding: .utf8)
            XCTAssertFalse(before.isEmpty, "the VM logged its start")
            var info = stat()
            XCTAssertEqual(stat(log, &info), 0)
            let inode = info.st_ino

            let second = try CLI.run(arguments, environment: environment)
            XCTAssertEqual(second.status, 1, second.stderr)
            XCTAssertTrue(second.stderr.contains("a VM named \(name) is already running"), second.stderr)
            XCTAssertEqual(stat(log, &info), 0, "\(name)'s log is still there")
            XCTAssertEqual(info.st_ino, inode, "the same file")
            let after = try String(contentsOfFile: log, encoding: .utf8)
            XCTAssertTrue(after.hasPrefix(before) && !after.contains("already running"), "the running VM's log only grew: \(after)")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: control).filter { $0.hasSuffix(".new") }, [],
                           "the second command's own log is gone")

            // The running VM writes to that file still (not to an unlinked one).
            let pid = try XCTUnwrap(try ControlClient(path: control + "/\(name).sock").call("query-status")["pid"]?.doubleValue)
            XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(Int(pid))/fd/2"), log)
        }
    }

    /// `list` finds what runs in the default directory (here a private XDG_RUNTIME_DIR): a VM
    /// with its memory, a receiver with its address and the RAM it has ready; both go after
    /// `stop`, and an empty list says so.
    func testListShowsVMsAndReceiversInTheDefaultDirectory() throws {
        var environment = ProcessInfo.processInfo.environment
        environment["XDG_RUNTIME_DIR"] = directory
        func run(_ arguments: [String]) throws -> CLI.Result {
            let result = try CLI.run(arguments, environment: environment)
            XCTAssertEqual(result.status, 0, "\(arguments): \(result.stderr)")
            return result
        }
        let port = try freePort()
        _ = try run(["boot", "--name", "listvm", "--memory", "128M", "--vcpus", "1", "--detach"])
        _ = try run(["receive", "--name", "listrx", "--listen", "127.0.0.1:\(port)", "--memory", "128M", "--detach"])
        let key = directory + "/list.psk", pskPort = try freePort()
        XCTAssertTrue(FileManager.default.createFile(atPath: key, contents: Data((String(repeating: "5a", count: 32) + "\n").utf8),
                                                    attributes: [.posixPermissions: 0o600]))
        _ = try run(["receive", "--name", "listpsk", "--listen", "127.0.0.1:\(pskPort)", "--psk-file", key, "--detach"])
        defer {
            for name in ["listvm", "listrx", "listpsk"] { _ = try? CLI.run(["stop", "--vm", name], environment: environment) }
        }

        let rows = try run(["list", "--json"]).stdout.split(separator: "\n").map { try JSONValue.parse(String($0)) }
        let vm = try XCTUnwrap(rows.first { $0["name"] == "listvm" }, "\(rows)")
        XCTAssertEqual(vm["state"], "running")
        XCTAssertEqual(vm["memory_bytes"]?.uint64Value, 128 << 20)
        XCTAssertEqual(vm["socket"]?.stringValue, directory + "/dirtymig/listvm.sock")
        let receiver = try XCTUnwrap(rows.first { $0["name"] == "listrx" }, "\(rows)")
        XCTAssertEqual(receiver["state"], "listening")
        XCTAssertEqual(receiver["listen"]?.stringValue, "127.0.0.1:\(port)")
        XCTAssertEqual(receiver["prepared_memory_bytes"]?.uint64Value, 128 << 20)
        XCTAssertEqual(receiver["credentials"], "plaintext")
        let pskReceiver = try XCTUnwrap(rows.first { $0["name"] == "listpsk" }, "\(rows)")
        XCTAssertEqual(pskReceiver["credentials"], "psk")
        XCTAssertEqual(pskReceiver["prepared_memory_bytes"], .null)

        let table = try run(["list"]).stdout
        XCTAssertTrue(table.hasPrefix("NAME"), table)
        let vmLine = try XCTUnwrap(table.split(separator: "\n").first { $0.hasPrefix("listvm") }, table)
        XCTAssertTrue(vmLine.contains("running") && vmLine.contains("128 MiB"), String(vmLine))
        let receiverLine = try XCTUnwrap(table.split(separator: "\n").first { $0.hasPrefix("listrx") }, table)
        // Where it listens goes with its state; the memory column holds memory only.
        XCTAssertTrue(receiverLine.contains("listening on 127.0.0.1:\(port) (plaintext)"), String(receiverLine))
        let memoryColumn = try XCTUnwrap(table.split(separator: "\n").first?.range(of: "MEMORY")?.lowerBound.utf16Offset(in: table))
        XCTAssertTrue(receiverLine.dropFirst(memoryColumn).hasPrefix("128 MiB ready"), String(receiverLine))
        let pskLine = try XCTUnwrap(table.split(separator: "\n").first { $0.hasPrefix("listpsk") }, table)
        XCTAssertTrue(pskLine.contains(" on 127.0.0.1:\(pskPort) (TLS PSK)"), String(pskLine))

        for name in ["listvm", "listrx", "listpsk"] { _ = try run(["stop", "--vm", name]) }
        let empty = try run(["list"])
        XCTAssertEqual(empty.stdout, "")
        XCTAssertTrue(empty.stderr.contains("nothing is running"), empty.stderr)
    }

    /// Another user's symbolic link where the default control directory goes (here in a private
    /// XDG_RUNTIME_DIR), pointing at a directory of theirs: refused with the reason, and the
    /// directory it points to keeps its mode (ControlDirectoryTests races the link against the
    /// creation itself).
    func testAControlDirectoryPlantedAsALinkIsRefusedAndItsTargetKeepsItsMode() throws {
        let runtime = directory + "/run", target = directory + "/elsewhere"
        XCTAssertEqual(mkdir(runtime, 0o700), 0)
        XCTAssertEqual(mkdir(target, 0o755), 0)
        XCTAssertEqual(chmod(target, 0o755), 0)
        XCTAssertEqual(symlink(target, runtime + "/dirtymig"), 0)
        var environment = ProcessInfo.processInfo.environment
        environment["XDG_RUNTIME_DIR"] = runtime
        for arguments in [["boot", "--memory", "64M", "--vcpus", "1"], ["boot", "--memory", "64M", "--vcpus", "1", "--detach"],
                          ["receive", "--listen", "127.0.0.1:\(try freePort())", "--detach"]] {
            let result = try CLI.run(arguments, environment: environment)
            XCTAssertEqual(result.status, 1, "\(arguments): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains("the control socket directory \(runtime)/dirtymig is a symbolic link; remove it"), result.stderr)
            var info = stat()
            XCTAssertEqual(stat(target, &info), 0)
            XCTAssertEqual(String(info.st_mode & 0o7777, radix: 8), "755", "\(arguments) left the link's target alone")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: target), [], "nothing was created through the link")
    }

    // MARK: Defect 5: a second sender

    func testASecondSenderIsToldTheReceiverIsBusy() throws {
        _ = try boot("bsa")
        _ = try boot("bsb")
        let port = try freePort()
        _ = try receive("bdst", port: port)
        try waitForWrites(socket("bsa"), pages: 2560)   // the first pass then outlasts the test's wait
        let (first, _) = try migrate("bsa", to: port, ["--bandwidth", "5M"])
        Thread.sleep(forTimeInterval: 1.0)
        let started = Date()
        let second = try CLI.run(["migrate", "--vm", socket("bsb"), "--to", "127.0.0.1:\(port)", "--json"])
        XCTAssertLessThan(Date().timeIntervalSince(started), 3, "refused at once")
        XCTAssertEqual(second.status, 1)
        let json = try JSONValue.parse(second.stdout)
        XCTAssertTrue(json["error"]?.stringValue?.contains("busy: a migration from 127.0.0.1:") ?? false, second.stdout)
        try assertRuns("bsb")
        kill(first.processIdentifier, SIGINT)
    }

    // MARK: Defects 7 and 8: the control socket

    func testTheControlSocketServesEveryCommandFromItsFirstConnection() throws {
        for round in 0..<4 {
            let name = "early\(round)"
            let path = socket(name)
            let arguments = round % 2 == 0
                ? ["boot", "--memory", "64M", "--vcpus", "1", "--control", path]
                : ["receive", "--listen", ":\(try freePort())", "--insecure", "--control", path]   // ":PORT", as the README writes it
            let (process, _, _) = try start(arguments)
            let deadline = Date().addingTimeInterval(20)
            var client: ControlClient?
            while client == nil && Date() < deadline {
                client = try? ControlClient(path: path)
                if client == nil { usleep(1000) }
            }
            let connected = try XCTUnwrap(client, "the socket never accepted")
            let status = try connected.call("query-status")
            XCTAssertEqual(status["state"], round % 2 == 0 ? "running" : "listening", "round \(round)")
            connected.close()
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
        }
    }

    func testTwoHundredClientsConnectingAtOnceAreAllTakenIn() throws {
        _ = try boot("burst", memory: "64M", writer: "0:idle")
        var refused = 0
        var descriptors: [Int32] = []
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let path = Array(socket("burst").utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: path); $0[path.count] = 0 }
        for _ in 0..<200 {
            let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if result != 0 && errno == EAGAIN { refused += 1 }
            descriptors.append(fd)
        }
        descriptors.forEach { close($0) }
        XCTAssertEqual(refused, 0, "\(refused) of 200 non-blocking connects failed with EAGAIN")
        try assertRunsOne("burst")
    }

    private func assertRunsOne(_ name: String) throws {
        let client = try ControlClient(path: socket(name))
        defer { client.close() }
        XCTAssertEqual(try client.call("query-status")["state"], "running")
    }

    // MARK: Defect 6: memory

    /// A memory cgroup of 320 MiB for the commands started with its prefix; nil (with the
    /// reason printed) where this machine gives no writable memory controller.
    private func memoryCgroup() throws -> (prefix: [String], cleanup: () -> Void) {
        let membership = (try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8)) ?? ""
        var base: String?, limitFile = "", procsFile = "cgroup.procs"
        if let line = membership.split(separator: "\n").first(where: { $0.split(separator: ":", omittingEmptySubsequences: false).dropFirst().first?.split(separator: ",").contains("memory") == true }) {
            let path = String(line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)[2])
            base = "/sys/fs/cgroup/memory" + (path == "/" ? "" : path)
            limitFile = "memory.limit_in_bytes"
        } else if let line = membership.split(separator: "\n").first(where: { $0.hasPrefix("0::") }),
                  (try? String(contentsOfFile: "/sys/fs/cgroup/cgroup.controllers", encoding: .utf8))?.contains("memory") == true {
            base = "/sys/fs/cgroup" + String(line.dropFirst(3))
            limitFile = "memory.max"
            procsFile = "cgroup.procs"
        }
        let group = (base ?? "") + "/dirtymig-test-\(getpid())-\(Int.random(in: 0..<1_000_000))"
        guard let base, access(base, W_OK) == 0, mkdir(group, 0o755) == 0,
              (try? "\(320 << 20)".write(toFile: group + "/" + limitFile, atomically: false, encoding: .utf8)) != nil else {
            let reason = "skipped: needs a writable memory cgroup (v1 memory controller or v2 with memory enabled)"
            FileHandle.standardError.write(Data((reason + "\n").utf8))
            throw XCTSkip(reason)
        }
        return (["echo $$ >", group + "/" + procsFile, "&& exec"], { rmdir(group) })
    }

    func testAVMThatDoesNotFitIsRefusedWithTheFiguresAndTheRefusalReachesTheSender() throws {
        let cgroup = try memoryCgroup()
        defer {
            for process in processes where process.isRunning { kill(process.processIdentifier, SIGKILL) }
            for process in processes { process.waitUntilExit() }
            cgroup.cleanup()
        }
        // boot: 400 MiB of working set in a 320 MiB cgroup.
        let (refused, _, bootErrors) = try start(["boot", "--memory", "512M", "--vcpus", "1", "--control", socket("big"),
                                                  "--workload", "0:write,ws=400M,rate=10M"], prefix: cgroup.prefix)
        XCTAssertNotNil(waitForExit(refused, seconds: 20))
        XCTAssertEqual(refused.terminationReason, .exit, "refused, not killed")
        XCTAssertEqual(refused.terminationStatus, 1)
        let message = stderrText(bootErrors)
        print("boot in a 320 MiB cgroup: \(message)")
        XCTAssertTrue(message.contains("not enough memory") && message.contains("the memory cgroup's limit"), message)

        // receive in the cgroup, the same VM migrated to it from outside.
        let (source, _) = try boot("bigsrc", memory: "512M", writer: "0:write,ws=400M,rate=10M")
        let port = try freePort()
        let (receiver, _) = try receive("bigdst", port: port, prefix: cgroup.prefix)
        let result = try CLI.run(["migrate", "--vm", socket("bigsrc"), "--to", "127.0.0.1:\(port)", "--json"])
        XCTAssertEqual(result.status, 1)
        let json = try JSONValue.parse(result.stdout)
        let error = json["error"]?.stringValue ?? ""
        print("migration into a 320 MiB cgroup: \(error)")
        XCTAssertTrue(error.contains("refused") && error.contains("not enough memory"), error)
        XCTAssertTrue(receiver.isRunning, "the receiver listens on")
        XCTAssertTrue(source.isRunning)
        try assertRuns("bigsrc")
    }
}
