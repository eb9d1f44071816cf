@testable import DirtyMigCLI
import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// Replication's faults from the command line, as two hosts would run it (processes on
/// loopback): the primary killed mid-epoch, the standby killed, a link that goes silent with a
/// manual standby, and strangers on the standby's port. The guest checks its own memory (a
/// `check` workload, `guest_errors`) and emits numbered lines (`emit=`), so a lost or torn
/// checkpoint, or output lost or repeated across a failover, shows in what the guest itself says.
final class ReplicationCLITests: ReplicationProcessTestCase {
    override class var directoryPrefix: String { "dmr" }

    /// A primary whose vCPU 0 checks 32 MiB at 20 MiB/s and emits a line every 10 ms; vCPU 1 reads.
    private func bootPrimary(output: String, workloads: [String] = ["0:check,ws=32M,rate=20M,emit=10ms", "1:read,ws=16M"]) throws -> Process {
        let (process, out, errors) = try start(["boot", "--memory", "256M", "--vcpus", "2", "--track", "ring",
                                                "--control", socket("primary"), "--guest-output", output]
                                               + workloads.flatMap { ["--workload", $0] })
        let ready = try XCTUnwrap(CLI.readLine(out), "boot printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("running"), ready)
        return process
    }

    private func startStandby(_ name: String, port: UInt16, extra: [String] = [], output: String? = nil) throws -> (Process, Pipe) {
        var arguments = ["receive", "--listen", "127.0.0.1:\(port)", "--standby", "--control", socket(name)] + extra
        if let output { arguments += ["--guest-output", output] }
        let (process, out, errors) = try start(arguments)
        let ready = try XCTUnwrap(CLI.readLine(out), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening for a replication"), ready)
        return (process, errors)
    }

    private func replicate(to port: UInt16, _ extra: [String] = []) throws -> JSONValue {
        let result = try CLI.run(["migrate", "--vm", socket("primary"), "--continuous", "--to", "127.0.0.1:\(port)", "--json"] + extra)
        XCTAssertEqual(result.status, 0, result.stderr)
        let report = try JSONValue.parse(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertEqual(report["status"]?.stringValue, "protected", result.stdout)
        return report
    }

    private func replication() throws -> JSONValue {
        let result = try CLI.run(["migrate", "--vm", socket("primary"), "--replication", "--json"])
        XCTAssertEqual(result.status, 0, result.stderr)
        return try JSONValue.parse(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// vCPU 0 of the VM behind `name` completes more passes, and counts no error in any.
    private func assertCheckingWithoutErrors(_ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        func check() -> (passes: Double, errors: Double)? {
            guard let vcpu = status(name)?["vcpu_stats"]?[0] else { return nil }
            return (vcpu["passes"]?.doubleValue ?? 0, vcpu["guest_errors"]?.doubleValue ?? -1)
        }
        let before = try XCTUnwrap(check(), "no status from \(name)", file: file, line: line)
        // 32 MiB at 20 MiB/s: a pass every 1.6 s.
        waitFor("\(name): another pass of the check workload", timeout: 10, file: file, line: line) {
            (check()?.passes ?? 0) >= before.passes + 1
        }
        XCTAssertEqual(check()?.errors, 0, "\(name): the guest found memory it did not write", file: file, line: line)
    }

    func testKillingThePrimaryMidEpochLetsTheStandbyTakeOverAndNothingReleasedIsLostOrRepeated() throws {
        let port = try freePort()
        let primaryOutput = directory + "/primary.out", standbyOutput = directory + "/standby.out"
        let (standby, standbyErrors) = try startStandby("standby", port: port, output: standbyOutput)
        let primary = try bootPrimary(output: primaryOutput)
        let report = try replicate(to: port)
        XCTAssertGreaterThan(report["initial_copy_bytes"]?.doubleValue ?? 0, 0)
        Thread.sleep(forTimeInterval: 1.0)
        let figures = try replication()
        XCTAssertGreaterThan(figures["checkpoints"]?.doubleValue ?? 0, 10)
        XCTAssertEqual(figures["lag_checkpoints"]?.doubleValue ?? 99, 0, accuracy: 3)
        // On loopback an acknowledgement comes well within an epoch: epochs keep their interval.
        XCTAssertLessThan(figures["effective_interval_ms"]?.doubleValue ?? 1e9, 100, figures.serialized())
        XCTAssertEqual(status("standby")?["standby"]?["phase"]?.stringValue, "protecting")

        kill(primary.processIdentifier, SIGKILL)
        let killed = Date()
        primary.waitUntilExit()
        waitFor("the standby runs the VM", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        print("failover: the standby serves the VM \(Int(Date().timeIntervalSince(killed) * 1000)) ms after SIGKILL to the primary (--failover-after 500 ms)")
        XCTAssertTrue(standby.isRunning, stderrText(standbyErrors))
        try assertGuestRuns(socket: socket("standby"), vcpus: 2)
        try assertCheckingWithoutErrors("standby")

        // What the outside saw: the primary's released lines, then the standby's, one stream.
        let before = try outputLines(primaryOutput), after = try outputLines(standbyOutput)
        XCTAssertGreaterThan(before.count, 50, "the primary released its output as checkpoints were acknowledged")
        XCTAssertGreaterThan(after.count, 10, "the standby's guest goes on emitting")
        // Each side's lines are one unbroken run, and nothing is seen twice. Between them, the
        // lines of the last acknowledged epoch may be missing: released by the acknowledgement,
        // not yet written when the SIGKILL landed (the standby resumes after them). An epoch is
        // 25 ms, a line every 10 ms: at most 5 lines allows for an epoch stretched by load.
        let primarySequence = before.map(\.sequence), standbySequence = after.map(\.sequence)
        XCTAssertEqual(primarySequence, Array(1...UInt64(max(primarySequence.count, 1))).prefix(primarySequence.count).map { $0 })
        if let first = standbySequence.first, let last = primarySequence.last {
            XCTAssertEqual(standbySequence, Array(first..<first + UInt64(standbySequence.count)))
            XCTAssertTrue((last + 1)...(last + 6) ~= first,
                          "the standby continues right after the primary's last released line, or one epoch later (primary ended at \(last), standby began at \(first))")
        }
        XCTAssertEqual(after.map(\.errors).max() ?? 1, 0)
    }

    func testKillingTheStandbyLeavesThePrimaryRunningAndANewStandbyProtectsItAgain() throws {
        let first = try freePort()
        let (standby, _) = try startStandby("standby", port: first)
        let primary = try bootPrimary(output: directory + "/primary.out")
        _ = try replicate(to: first)
        Thread.sleep(forTimeInterval: 0.5)
        // list: the primary replicates, protected, at an epoch; the standby holds one.
        func listed(_ name: String, replication: JSONValue? = nil) throws -> (row: JSONValue, label: String) {
            let row = ListCommand.row(name: name, socket: socket(name), status: try XCTUnwrap(status(name), "no status from \(name)"),
                                      migration: nil, replication: replication)
            return (row, ListCommand.stateLabel(row))
        }
        let protected = try listed("primary", replication: try replication())
        XCTAssertEqual(protected.row["state"], "replicating")
        XCTAssertTrue(protected.label.hasPrefix("replicating (protected, epoch "), protected.label)
        let follows = try listed("standby")
        XCTAssertEqual(follows.row["state"], "standby")
        XCTAssertTrue(follows.label.hasPrefix("standby (protecting, epoch "), follows.label)
        XCTAssertGreaterThan(follows.row["received_bytes"]?.doubleValue ?? 0, 1_048_576, "\(follows.row)")
        let pid = status("primary")?["pid"]?.doubleValue
        kill(standby.processIdentifier, SIGKILL)
        standby.waitUntilExit()
        try waitFor("the primary reports unprotected", timeout: 10) {
            try replication()["status"]?.stringValue == "unprotected"
        }
        let lost = try replication()
        XCTAssertNotNil(lost["error"]?.stringValue)
        print("standby killed: \(lost["error"]?.stringValue ?? "?"); pause max \(lost["pause_ms"]?["max"]?.doubleValue ?? 0) ms")
        XCTAssertTrue(primary.isRunning)
        try assertGuestRuns(socket: socket("primary"), vcpus: 2)
        let unprotected = try listed("primary", replication: lost)
        XCTAssertTrue(unprotected.label.hasPrefix("replicating (unprotected: standby lost, reconnecting, "), unprotected.label)

        // Without stopping the VM: a new standby, a new replication (which replaces the one
        // still seeking the lost standby).
        let second = try freePort()
        _ = try startStandby("standby2", port: second)
        _ = try replicate(to: second)
        XCTAssertEqual(status("primary")?["pid"]?.doubleValue, pid, "the same VM process throughout")
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(try replication()["status"]?.stringValue, "protected")
        try assertCheckingWithoutErrors("primary")
    }

    /// The primary's lines, then the standby's after it took over: each one unbroken run, the
    /// standby's starting right after the primary's last released line or one epoch later.
    private func assertOutputContinues(primary: String, standby: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let before = try outputLines(primary).map(\.sequence), after = try outputLines(standby)
        XCTAssertGreaterThan(after.count, 10, "the standby's guest goes on emitting", file: file, line: line)
        XCTAssertEqual(before, Array(1...UInt64(max(before.count, 1))).prefix(before.count).map { $0 }, file: file, line: line)
        if let first = after.first?.sequence, let last = before.last {
            XCTAssertEqual(after.map(\.sequence), Array(first..<first + UInt64(after.count)), file: file, line: line)
            XCTAssertTrue((last + 1)...(last + 6) ~= first,
                          "the standby continues right after the primary's last released line (primary ended at \(last), standby began at \(first))",
                          file: file, line: line)
        }
        XCTAssertEqual(after.map(\.errors).max() ?? 1, 0, file: file, line: line)
    }

    /// The standby's process dies and a new one is started on the same address: the primary,
    /// unprotected and saying how long it goes on seeking, protects the VM again by itself; the
    /// new standby's copy is the VM (it takes over when the primary dies, memory and output whole).
    func testAStandbyStartedAgainOnItsAddressProtectsTheVMAgainByItself() throws {
        let port = try freePort()
        let primaryOutput = directory + "/primary.out", standbyOutput = directory + "/standby2.out"
        let (standby, _) = try startStandby("standby", port: port)
        let primary = try bootPrimary(output: primaryOutput)
        _ = try replicate(to: port, ["--reprotect-for", "30s"])
        Thread.sleep(forTimeInterval: 0.5)
        let pid = status("primary")?["pid"]?.doubleValue
        kill(standby.processIdentifier, SIGKILL)
        standby.waitUntilExit()
        try waitFor("the primary reports unprotected, reconnecting", timeout: 10) {
            let figures = try replication()
            return figures["status"]?.stringValue == "unprotected" && figures["reprotect_s_left"]?.doubleValue != nil
        }
        let seeking = try replication()
        XCTAssertEqual(seeking["reprotect_for_s"]?.doubleValue, 30)
        XCTAssertGreaterThan(seeking["reprotect_s_left"]?.doubleValue ?? 0, 20, seeking.serialized())
        XCTAssertLessThanOrEqual(seeking["reprotect_s_left"]?.doubleValue ?? 99, 30, seeking.serialized())
        XCTAssertTrue(ReplicationTable.render(seeking).contains("unprotected (reconnecting, "), ReplicationTable.render(seeking))
        let row = ListCommand.row(name: "primary", socket: socket("primary"), status: try XCTUnwrap(status("primary")),
                                  migration: nil, replication: seeking)
        XCTAssertTrue(ListCommand.stateLabel(row).contains("reconnecting, "), ListCommand.stateLabel(row))
        Thread.sleep(forTimeInterval: 1)   // unprotected a while: the guest's output flows meanwhile

        _ = try startStandby("standby2", port: port, output: standbyOutput)
        let back = Date()
        try waitFor("the primary protects the VM again by itself", timeout: 10) {
            try replication()["status"]?.stringValue == "protected"
        }
        let took = Date().timeIntervalSince(back)
        print("re-protected \(Int(took * 1000)) ms after the new standby listened")
        XCTAssertLessThan(took, 2.0, "protection is restored within 2 s of the standby's return")
        let again = try replication()
        XCTAssertEqual(again["reprotections"]?.doubleValue, 1)
        XCTAssertEqual(again["error"], .null)
        XCTAssertEqual(again["reprotect_s_left"], .null)
        XCTAssertEqual(status("primary")?["pid"]?.doubleValue, pid, "the same VM process throughout")
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(status("standby2")?["standby"]?["phase"]?.stringValue, "protecting")
        XCTAssertGreaterThan(try replication()["checkpoints"]?.doubleValue ?? 0, again["checkpoints"]?.doubleValue ?? 0)

        kill(primary.processIdentifier, SIGKILL)
        primary.waitUntilExit()
        waitFor("the new standby runs the VM", timeout: 5) { status("standby2")?["vcpu_stats"] != nil }
        try assertCheckingWithoutErrors("standby2")
        try assertOutputContinues(primary: primaryOutput, standby: standbyOutput)
    }

    /// A standby that stops reading (its process stopped past the primary's loss time) is lost;
    /// the primary greets it again as the same replication while it is stopped, and when it
    /// runs again it takes that resume before its --failover-after of silence: it never takes
    /// over, and receives only the pages changed since the checkpoint it held. (vCPU 1 fills
    /// 96 MiB once and rests, so the VM holds far more data than the check workload dirties.)
    func testAStandbyThatStalledIsProtectingAgainWithWhatChanged() throws {
        let port = try freePort()
        let (standby, standbyErrors) = try startStandby("standby", port: port, extra: ["--failover-after", "200ms"])
        _ = try bootPrimary(output: directory + "/primary.out",
                            workloads: ["0:check,ws=32M,rate=4M,emit=10ms", "1:write,ws=96M,offset=64M,passes=1,rate=1G"])
        Thread.sleep(forTimeInterval: 1)   // the filler's one pass
        let initial = try replicate(to: port, ["--reprotect-for", "30s"])
        Thread.sleep(forTimeInterval: 0.5)
        kill(standby.processIdentifier, SIGSTOP)
        try waitFor("the primary reports unprotected", timeout: 10) { try replication()["status"]?.stringValue == "unprotected" }
        Thread.sleep(forTimeInterval: 0.5)   // the primary dials the stopped standby meanwhile
        kill(standby.processIdentifier, SIGCONT)
        let back = Date()
        try waitFor("the primary protects the VM again by itself", timeout: 10) {
            try replication()["status"]?.stringValue == "protected"
        }
        let again = try replication()
        let last = try XCTUnwrap(again["last_reprotect"])
        let initialBytes = try XCTUnwrap(initial["initial_copy_bytes"]?.doubleValue)
        let resyncBytes = last["bytes"]?.doubleValue ?? .infinity
        print("re-protected \(Int(Date().timeIntervalSince(back) * 1000)) ms after the standby read again: \(last.serialized()); initial copy \(Int(initialBytes)) bytes, resync/initial \(String(format: "%.3f", resyncBytes / initialBytes))")
        XCTAssertEqual(last["kind"]?.stringValue, "delta", last.serialized())
        XCTAssertLessThan(resyncBytes, 0.3 * initialBytes, "only what changed is sent again")
        XCTAssertEqual(again["reprotections"]?.doubleValue, 1)
        XCTAssertEqual(again["reprotect_deltas"]?.doubleValue, 1)
        XCTAssertTrue(ReplicationTable.render(again).contains("last re-protection"), ReplicationTable.render(again))
        Thread.sleep(forTimeInterval: 0.5)
        let follows = try XCTUnwrap(status("standby"))
        XCTAssertNil(follows["vcpu_stats"], "the standby took over a VM whose primary lives: \(stderrText(standbyErrors))")
        XCTAssertEqual(follows["standby"]?["phase"]?.stringValue, "protecting", follows.serialized())
        XCTAssertTrue(standby.isRunning)
        try assertCheckingWithoutErrors("primary")
    }

    /// Seeking the standby ends after --reprotect-for: the VM runs on unprotected, saying so, and
    /// a standby that comes later is not protecting until asked; with 0s it is never sought.
    func testSeekingALostStandbyEndsAfterReprotectFor() throws {
        let port = try freePort()
        let (standby, _) = try startStandby("standby", port: port)
        _ = try bootPrimary(output: directory + "/primary.out")
        _ = try replicate(to: port, ["--reprotect-for", "1s"])
        kill(standby.processIdentifier, SIGKILL)
        standby.waitUntilExit()
        try waitFor("the primary reports unprotected", timeout: 10) { try replication()["status"]?.stringValue == "unprotected" }
        try waitFor("the primary stops seeking its standby", timeout: 10) { try replication()["reprotect_s_left"] == .null }
        let given = try replication()
        XCTAssertEqual(given["status"]?.stringValue, "unprotected")
        XCTAssertTrue(given["error"]?.stringValue?.contains("--reprotect-for") ?? false, given.serialized())
        let (second, _) = try startStandby("standby2", port: port)
        Thread.sleep(forTimeInterval: 1.5)
        XCTAssertEqual(try replication()["status"]?.stringValue, "unprotected", "sought after --reprotect-for ran out")
        XCTAssertNil(status("standby2")?["standby"]?["phase"]?.stringValue, "the late standby follows no replication")

        // Asked again, with 0s: protected, and once the standby is lost, not sought at all.
        _ = try replicate(to: port, ["--reprotect-for", "0s"])
        kill(second.processIdentifier, SIGKILL)
        second.waitUntilExit()
        try waitFor("the primary reports unprotected", timeout: 10) { try replication()["status"]?.stringValue == "unprotected" }
        let never = try replication()
        XCTAssertEqual(never["reprotect_s_left"], .null, never.serialized())
        XCTAssertEqual(never["reprotect_for_s"]?.doubleValue, 0)
    }

    func testASilentLinkLeavesAManualStandbyWaitingUntilFailover() throws {
        let port = try freePort()
        _ = try startStandby("standby", port: port, extra: ["--failover", "manual", "--failover-after", "200ms"])
        let relay = try FaultRelay(to: port)
        defer { relay.cut() }
        let primary = try bootPrimary(output: directory + "/primary.out")
        _ = try replicate(to: relay.port)
        Thread.sleep(forTimeInterval: 0.5)
        relay.stall()
        try waitFor("the primary reports unprotected", timeout: 10) {
            try replication()["status"]?.stringValue == "unprotected"
        }
        XCTAssertTrue(primary.isRunning)
        try assertGuestRuns(socket: socket("primary"), vcpus: 2)
        // The standby keeps its checkpoint and does not run the VM: the primary lives.
        let waiting = try XCTUnwrap(status("standby"))
        XCTAssertEqual(waiting["standby"]?["phase"]?.stringValue, "primary lost, awaiting failover", waiting.serialized())
        XCTAssertNil(waiting["vcpu_stats"])

        let failover = try CLI.run(["failover", "--vm", socket("standby")])
        XCTAssertEqual(failover.status, 0, failover.stderr)
        XCTAssertTrue(failover.stdout.contains("resumes the VM from checkpoint"), failover.stdout)
        waitFor("the standby runs the VM after 'dirtymig failover'", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        try assertCheckingWithoutErrors("standby")
    }

    /// An operator's `failover` while the primary still runs would start a second copy: refused,
    /// saying so, unless --force; forced, the standby takes over and tells the primary, which
    /// says plainly that its standby took over and stops its output. Over TLS, where cutting the
    /// connection under the primary used to leave it a decode error instead of the word.
    func testFailoverIsRefusedWhileThePrimaryIsHeardAndForcedTellsThePrimary() throws {
        let key = try makePSKFile("replication.psk")
        let port = try freePort()
        let primaryOutput = directory + "/primary.out"
        let (_, standbyErrors) = try startStandby("standby", port: port, extra: ["--psk-file", key])
        let (primary, out, primaryErrors) = try start(["boot", "--memory", "256M", "--vcpus", "2", "--track", "ring",
                                                       "--control", socket("primary"), "--guest-output", primaryOutput,
                                                       "--workload", "0:check,ws=32M,rate=20M,emit=10ms", "--workload", "1:read,ws=16M"])
        XCTAssertTrue(CLI.readLine(out)?.contains("running") ?? false, stderrText(primaryErrors))
        _ = try replicate(to: port, ["--psk-file", key])
        Thread.sleep(forTimeInterval: 0.5)

        let refused = try CLI.run(["failover", "--vm", socket("standby")])
        XCTAssertEqual(refused.status, 1, refused.stdout)
        for words in ["the primary was heard from", "ms ago", "a failover now would run a second copy", "stop the primary first", "--force"] {
            XCTAssertTrue(refused.stderr.contains(words), "'\(words)' in: \(refused.stderr)")
        }
        XCTAssertEqual(status("standby")?["standby"]?["phase"]?.stringValue, "protecting", "a refusal changes nothing")
        XCTAssertNil(status("standby")?["vcpu_stats"])
        XCTAssertEqual(try replication()["status"]?.stringValue, "protected")

        let forced = try CLI.run(["failover", "--vm", socket("standby"), "--force"])
        XCTAssertEqual(forced.status, 0, forced.stderr)
        XCTAssertTrue(forced.stdout.contains("resumes the VM from checkpoint"), forced.stdout)
        XCTAssertTrue(forced.stdout.contains("is told that its standby took over"), forced.stdout)
        waitFor("the standby runs the VM", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        try waitFor("the primary hears that its standby took over", timeout: 5) {
            try replication()["status"]?.stringValue == "superseded"
        }
        XCTAssertTrue(primary.isRunning)
        let primaryStatus = try XCTUnwrap(status("primary"))
        XCTAssertEqual(primaryStatus["state"]?.stringValue, "superseded")
        XCTAssertTrue(primaryStatus["superseded"]?.stringValue?.contains("took over") ?? false, primaryStatus.serialized())
        let primaryLog = stderrText(primaryErrors)
        XCTAssertTrue(primaryLog.contains("the standby took over: it resumed the VM from checkpoint"), primaryLog)
        XCTAssertFalse(primaryLog.contains("decode") || primaryLog.contains("is lost"), "the primary heard the word, not a broken link: \(primaryLog)")
        XCTAssertTrue(stderrText(standbyErrors).contains("failover --force"))
        // One VM's output: the primary's stopped when it heard.
        let size = (try? FileManager.default.attributesOfItem(atPath: primaryOutput)[.size] as? Int) ?? nil
        Thread.sleep(forTimeInterval: 0.3)
        XCTAssertEqual((try? FileManager.default.attributesOfItem(atPath: primaryOutput)[.size] as? Int) ?? nil, size,
                       "the superseded primary's guest output still flows")
        try assertCheckingWithoutErrors("standby")
    }

    func testFailoverWithoutForceWorksOnceThePrimaryIsKilled() throws {
        let port = try freePort()
        _ = try startStandby("standby", port: port, extra: ["--failover", "manual"])
        let primary = try bootPrimary(output: directory + "/primary.out")
        _ = try replicate(to: port)
        Thread.sleep(forTimeInterval: 0.5)
        kill(primary.processIdentifier, SIGKILL)
        primary.waitUntilExit()
        waitFor("the standby sees its primary gone", timeout: 5) {
            status("standby")?["standby"]?["phase"]?.stringValue == "primary lost, awaiting failover"
        }
        let failover = try CLI.run(["failover", "--vm", socket("standby")])
        XCTAssertEqual(failover.status, 0, failover.stderr)
        XCTAssertTrue(failover.stdout.contains("resumes the VM from checkpoint"), failover.stdout)
        XCTAssertFalse(failover.stdout.contains("told"), "nobody to tell: \(failover.stdout)")
        waitFor("the standby runs the VM after 'dirtymig failover'", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        try assertCheckingWithoutErrors("standby")
    }

    func testStrangersOnTheStandbysPortAreRefusedAndItKeepsItsCopy() throws {
        let port = try freePort()
        _ = try startStandby("standby", port: port)
        let primary = try bootPrimary(output: directory + "/primary.out")
        _ = try replicate(to: port)

        // Garbage, a migration protocol of another version, and a plain migration.
        func exchange(_ bytes: [UInt8]) throws -> String {
            let stranger = try TCPSocket.connect(HostPort(host: "127.0.0.1", port: port))
            defer { stranger.shutdown() }
            stranger.setTimeouts(send: 5, receive: 5)
            try stranger.send(bytes)
            let header = try stranger.receive(count: 8)
            let length = Int(header[4]) | Int(header[5]) << 8 | Int(header[6]) << 16 | Int(header[7]) << 24
            return String(decoding: try stranger.receive(count: length), as: UTF8.self)
        }
        var oldHello = [UInt8]()
        for word: UInt32 in [MigrationFrameType.hello.rawValue, 8, MigrationWire.magic, 4] {
            withUnsafeBytes(of: word.littleEndian) { oldHello += $0 }
        }
        XCTAssertTrue(try exchange(Array("GET / HTTP/1.1\r\n\r\n".utf8)).contains("not a dirtymig migration stream"))
        XCTAssertTrue(try exchange(oldHello).contains("version 4"))
        let migrate = try CLI.run(["migrate", "--vm", socket("primary"), "--to", "127.0.0.1:\(port)"])
        XCTAssertNotEqual(migrate.status, 0)
        XCTAssertTrue(migrate.stderr.contains("under way") || migrate.stdout.contains("busy"), migrate.stdout + migrate.stderr)

        let checkpoints = try XCTUnwrap(status("standby")?["standby"]?["checkpoints"]?.doubleValue)
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertGreaterThan(status("standby")?["standby"]?["checkpoints"]?.doubleValue ?? 0, checkpoints + 5,
                             "the replication goes on")
        kill(primary.processIdentifier, SIGKILL)
        waitFor("the standby runs the VM", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        try assertCheckingWithoutErrors("standby")
    }

    func testAnEncryptedReplicationSurvivesTamperingOnItsLastCheckpoint() throws {
        let key = try makePSKFile("replication.psk")
        let port = try freePort()
        _ = try startStandby("standby", port: port, extra: ["--psk-file", key])
        let primary = try bootPrimary(output: directory + "/primary.out")
        // A plaintext primary is refused by an encrypted standby, and the VM runs on.
        let plain = try CLI.run(["migrate", "--vm", socket("primary"), "--continuous", "--to", "127.0.0.1:\(port)", "--json"])
        XCTAssertEqual(plain.status, 1, plain.stdout)
        XCTAssertTrue(plain.stderr.contains("credentials") || plain.stdout.contains("credentials"), plain.stdout + plain.stderr)
        XCTAssertEqual(try replication()["status"]?.stringValue, "unprotected")
        // Through a relay that flips one byte of a TLS record well into the checkpoints.
        try replicateThroughTamperingRelay(.flip, to: port, key: key, primary: primary)
    }

    func testAnEncryptedReplicationSurvivesARecordDroppedFromItsLastCheckpoint() throws {
        let key = try makePSKFile("replication.psk")
        let port = try freePort()
        _ = try startStandby("standby", port: port, extra: ["--psk-file", key])
        let primary = try bootPrimary(output: directory + "/primary.out")
        try replicateThroughTamperingRelay(.drop, to: port, key: key, primary: primary)
    }

    /// Replicates with `key` through a relay that alters the stream well into the checkpoints:
    /// the primary runs on unprotected; the standby refuses the altered checkpoint, keeps its last
    /// committed one and, since its primary is alive, takes over only when told.
    private func replicateThroughTamperingRelay(_ action: TamperingRelay.Action, to port: UInt16, key: String,
                                                primary: Process) throws {
        let relay = try TamperingRelay(to: port, action: action, record: 3000)
        defer { relay.stop() }
        let report = try replicate(to: relay.port, ["--psk-file", key])
        XCTAssertEqual(report["channel"]?["encrypted"]?.boolValue, true, report.serialized())
        XCTAssertTrue(report["channel"]?["peer_identity"]?.stringValue?.contains("PSK identity") ?? false, report.serialized())
        waitFor("the relay alters a record", timeout: 20) { relay.tampered }
        try waitFor("the primary reports unprotected", timeout: 10) {
            try replication()["status"]?.stringValue == "unprotected"
        }
        XCTAssertTrue(primary.isRunning)
        // The standby refused the altered record: it keeps its last committed checkpoint and,
        // since its primary is alive, takes over only when told.
        waitFor("the standby holds its checkpoint", timeout: 5) {
            status("standby")?["standby"]?["phase"]?.stringValue == "primary lost, awaiting failover"
        }
        let failover = try CLI.run(["failover", "--vm", socket("standby")])
        XCTAssertEqual(failover.status, 0, failover.stderr)
        waitFor("the standby runs the VM", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        try assertCheckingWithoutErrors("standby")
    }

    func testAReplicationWithCertificatesChecksBothSides() throws {
        try makeCertificates()
        let port = try freePort()
        // The standby's certificate is for 127.0.0.1 (the host in --to); the primary's for "source".
        let (_, errors) = try startStandby("standby", port: port, extra: ["--tls-dir", certificatePath("dest"), "--tls-peer", "source"])
        let primary = try bootPrimary(output: directory + "/primary.out")
        // A primary with another CA's certificate is refused, and its VM runs on.
        let rogue = try CLI.run(["migrate", "--vm", socket("primary"), "--continuous", "--to", "127.0.0.1:\(port)",
                                 "--tls-dir", certificatePath("rogue"), "--json"])
        XCTAssertEqual(rogue.status, 1, rogue.stdout)
        XCTAssertTrue(primary.isRunning)
        let report = try replicate(to: port, ["--tls-dir", certificatePath("source")])
        XCTAssertTrue(report["channel"]?["peer_identity"]?.stringValue?.contains("CN=dest") ?? false, report.serialized())
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertTrue(stderrText(errors).contains("CN=source"), "the standby logs who the primary proved to be")
        kill(primary.processIdentifier, SIGKILL)
        waitFor("the standby runs the VM", timeout: 5) { status("standby")?["vcpu_stats"] != nil }
        try assertCheckingWithoutErrors("standby")
    }
}
