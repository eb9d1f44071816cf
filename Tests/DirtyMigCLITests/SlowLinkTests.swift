import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// Migration and replication between two hosts (two network namespaces joined by a veth pair, TwoHostLink)
/// on a link slower than the guest dirties memory (tbf, 20 Mbit/s: a 2 MiB checkpoint takes
/// 0.84 s), and across a cut of that link. What must hold: a standby never takes over while its
/// primary lives and its bytes still come, however slowly; a VM stopped on purpose never comes
/// back on its standby; and when a cut made the standby take over while the primary ran on, the
/// primary stops its copy's output once it hears of it, so the world sees one VM.
final class SlowLinkTests: TwoHostTestCase {
    override class var directoryPrefix: String { "dms" }


    /// The primary, in the left namespace: vCPU 0 checks 8 MiB at 50 MiB/s (every checkpoint
    /// carries most of the 8 MiB: 3.4 s at 20 Mbit/s) and emits a line every 10 ms.
    private func bootPrimary(output: String) throws -> (Process, Pipe) {
        let (process, out, errors) = try start(["boot", "--memory", "128M", "--vcpus", "1", "--track", "ring",
                                                "--control", socket("primary"), "--guest-output", output,
                                                "--workload", "0:check,ws=8M,rate=50M,emit=10ms"],
                                               prefix: link.inside(link.left))
        let ready = try XCTUnwrap(CLI.readLine(out), "boot printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("running"), ready)
        return (process, errors)
    }

    /// The standby, in the right namespace, with the same key (across hosts, plaintext needs
    /// --insecure; PSK is what users run).
    private func startStandby(key: String, output: String? = nil, extra: [String] = []) throws -> (Process, Pipe) {
        var arguments = ["receive", "--listen", "\(link.rightAddress):\(port)", "--standby", "--psk-file", key,
                         "--control", socket("standby")] + extra
        if let output { arguments += ["--guest-output", output] }
        let (process, out, errors) = try start(arguments, prefix: link.inside(link.right))
        let ready = try XCTUnwrap(CLI.readLine(out), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening for a replication"), ready)
        return (process, errors)
    }

    private func protect(key: String) throws {
        let result = try CLI.run(["migrate", "--vm", socket("primary"), "--continuous", "--to", "\(link.rightAddress):\(port)",
                                  "--psk-file", key, "--json"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let report = try JSONValue.parse(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertEqual(report["status"]?.stringValue, "protected", result.stdout)
    }

    private func replication() -> JSONValue? {
        guard let client = try? ControlClient(path: socket("primary"), callTimeout: 5) else { return nil }
        defer { client.close() }
        return try? client.call("query-replication")
    }

    private func fileSize(_ path: String) -> Int {
        ((try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int) ?? 0
    }

    func testAStandbyOnASlowLinkDoesNotTakeOverWhileItsPrimaryLives() throws {
        let key = try makePSKFile("key.psk")
        let (standby, standbyErrors) = try startStandby(key: key)
        let (primary, primaryErrors) = try bootPrimary(output: directory + "/primary.out")
        try protect(key: key)
        let start = replication()?["checkpoints"]?.doubleValue ?? 0
        // Ten seconds: three or so checkpoints of about 8 MiB, each taking seconds to cross.
        var heard: [Double] = []
        let deadline = Date().addingTimeInterval(10)
        while Date() < deadline {
            let standbyStatus = status("standby")
            XCTAssertNil(standbyStatus?["vcpu_stats"], "the standby runs the VM while its primary lives: \(stderrText(standbyErrors))")
            XCTAssertEqual(standbyStatus?["standby"]?["phase"]?.stringValue, "protecting")
            if let ms = standbyStatus?["standby"]?["last_heard_ms"]?.doubleValue { heard.append(ms) }
            XCTAssertEqual(replication()?["status"]?.stringValue, "protected", stderrText(primaryErrors))
            if standbyStatus?["vcpu_stats"] != nil { break }
            Thread.sleep(forTimeInterval: 0.25)
        }
        let figures = try XCTUnwrap(replication())
        let acknowledged = (figures["checkpoints"]?.doubleValue ?? 0) - start
        print("20 Mbit/s link: \(Int(acknowledged)) checkpoints acknowledged in 10 s, \(Int(figures["bytes_per_s"]?.doubleValue ?? 0)) B/s, last_heard_ms at most \(Int(heard.max() ?? -1))")
        XCTAssertGreaterThanOrEqual(acknowledged, 1, "checkpoints keep being acknowledged on a slow link")
        // Checkpoints seconds apart still make a rate (a one-second window read 0 between them),
        // and it is the link's: 20 Mbit/s is 2.5 MB/s.
        let rate = figures["bytes_per_s"]?.doubleValue ?? 0
        XCTAssertGreaterThan(rate, 0.3 * 2.5e6)
        XCTAssertLessThan(rate, 1.2 * 2.5e6)
        // The standby hears bytes all the time a checkpoint crawls over the link.
        XCTAssertLessThan(heard.max() ?? 1e9, 500, "last_heard_ms counts from the last byte")
        // Epochs stretch to what the link carries (an 8 MiB checkpoint takes 3.4 s), with one
        // checkpoint in flight at a time rather than a queue of them.
        let effective = figures["effective_interval_ms"]?.doubleValue ?? 0
        print("effective interval: median epoch \(Int(effective)) ms (--checkpoint-interval 25 ms), lag \(figures["lag_checkpoints"]?.doubleValue ?? -1)")
        XCTAssertGreaterThan(effective, 1000, "the epochs stretch as long as a checkpoint takes to cross")
        XCTAssertLessThanOrEqual(figures["lag_checkpoints"]?.doubleValue ?? 99, 1, "one checkpoint in flight at a time")
        XCTAssertTrue(primary.isRunning && standby.isRunning)
    }

    /// 1 % of the packets lost each way, at random: checkpoints keep being acknowledged, the
    /// standby never takes over while its primary lives, and a stop still ends the replication.
    func testAReplicationOnALossyLinkKeepsItsStandbyAndItsCheckpoints() throws {
        try skippingWithoutTwoHosts { try link.setLoss(perMille: 10) }
        let key = try makePSKFile("key.psk")
        let (standby, standbyErrors) = try startStandby(key: key)
        let (primary, primaryErrors) = try bootPrimary(output: directory + "/primary.out")
        try protect(key: key)
        let start = replication()?["checkpoints"]?.doubleValue ?? 0
        let deadline = Date().addingTimeInterval(8)
        while Date() < deadline {
            XCTAssertNil(status("standby")?["vcpu_stats"], "the standby runs the VM while its primary lives: \(stderrText(standbyErrors))")
            XCTAssertEqual(replication()?["status"]?.stringValue, "protected", stderrText(primaryErrors))
            Thread.sleep(forTimeInterval: 0.25)
        }
        let acknowledged = (replication()?["checkpoints"]?.doubleValue ?? 0) - start
        print("20 Mbit/s link, 1 % loss each way: \(Int(acknowledged)) checkpoints acknowledged in 8 s")
        XCTAssertGreaterThanOrEqual(acknowledged, 1, "checkpoints keep being acknowledged on a lossy link")
        let stopped = try CLI.run(["stop", "--vm", socket("primary"), "--timeout", "30s"])
        XCTAssertEqual(stopped.status, 0, stopped.stderr)
        primary.waitUntilExit()
        XCTAssertTrue(stderrText(primaryErrors).contains("discarded its copy"), stderrText(primaryErrors))
        XCTAssertTrue(standby.isRunning)
        XCTAssertFalse(stderrText(standbyErrors).contains("took over"))
    }

    func testAPrimaryStoppedOnASlowLinkEndsItsReplicationAndTheStandbyDiscardsItsCopy() throws {
        let key = try makePSKFile("key.psk")
        let (standby, standbyErrors) = try startStandby(key: key, extra: ["--failover-after", "60s"])
        let (primary, primaryErrors) = try bootPrimary(output: directory + "/primary.out")
        try protect(key: key)
        Thread.sleep(forTimeInterval: 1)   // a checkpoint is in flight now
        let began = Date()
        let stopped = try CLI.run(["stop", "--vm", socket("primary"), "--timeout", "30s"])
        let took = Date().timeIntervalSince(began)
        XCTAssertEqual(stopped.status, 0, stopped.stderr)
        primary.waitUntilExit()
        let primaryLog = stderrText(primaryErrors)
        print("stop of a primary on a 20 Mbit/s link took \(Int(took * 1000)) ms; its log: \(primaryLog)")
        XCTAssertTrue(primaryLog.contains("discarded its copy"), primaryLog)
        // The standby discarded its copy and listens again; it never resumes the VM.
        waitFor("the standby listens again", timeout: 10) { status("standby").map { $0["standby"] == nil || $0["standby"] == .null } ?? false }
        Thread.sleep(forTimeInterval: 3)
        let after = status("standby")
        XCTAssertNil(after?["vcpu_stats"], "a VM stopped on purpose came back on its standby")
        let standbyLog = stderrText(standbyErrors)
        XCTAssertFalse(standbyLog.contains("took over"), standbyLog)
        XCTAssertTrue(standbyLog.contains("stopped on purpose"), standbyLog)
        XCTAssertTrue(standby.isRunning)
    }

    func testALinkCutLetsTheStandbyTakeOverAndThePrimaryStopsItsOutputWhenTheLinkReturns() throws {
        let key = try makePSKFile("key.psk")
        let primaryOutput = directory + "/primary.out"
        let (_, standbyErrors) = try startStandby(key: key, output: directory + "/standby.out")
        let (primary, primaryErrors) = try bootPrimary(output: primaryOutput)
        try protect(key: key)
        Thread.sleep(forTimeInterval: 0.5)
        try link.cut()
        // Both sides decide on their own during the cut; the link returns as soon as both have,
        // so that how long the cut lasts does not depend on how loaded this machine is.
        waitFor("the standby takes over and the primary reports unprotected during the cut", timeout: 10) {
            status("standby")?["vcpu_stats"] != nil && replication()?["status"]?.stringValue == "unprotected"
        }
        try link.restore()
        let restored = Date()
        // Two VMs ran during the cut (what two parties cannot avoid); once the link is back the
        // primary hears that its standby took over (as soon as TCP retransmits that word: after
        // a cut of seconds, its retransmission timer has backed off to seconds too), and its copy
        // falls silent.
        waitFor("the primary learns that its standby took over", timeout: 60) {
            replication()?["status"]?.stringValue == "superseded"
        }
        let figures = try XCTUnwrap(replication())
        print("\(Int(Date().timeIntervalSince(restored) * 1000)) ms after the link returned: \(figures["error"]?.stringValue ?? "?")")
        if figures["status"]?.stringValue != "superseded" {
            print("the primary's log: \(stderrText(primaryErrors))\nthe standby's log: \(stderrText(standbyErrors))")
        }
        XCTAssertEqual(status("primary")?["state"]?.stringValue, "superseded")
        let size = fileSize(primaryOutput)
        Thread.sleep(forTimeInterval: 1)
        XCTAssertEqual(fileSize(primaryOutput), size, "the superseded primary's guest output still flows")
        XCTAssertTrue(primary.isRunning, stderrText(primaryErrors))
        let primaryLog = stderrText(primaryErrors)
        XCTAssertTrue(primaryLog.contains("unprotected"), "the primary's log says it lost its standby: \(primaryLog)")
        XCTAssertTrue(primaryLog.contains("the standby took over"), primaryLog)
        // The stale copy cannot be moved or protected again: only the standby's counts now.
        let again = try CLI.run(["migrate", "--vm", socket("primary"), "--continuous", "--to", "\(link.rightAddress):\(port)",
                                 "--psk-file", key])
        XCTAssertNotEqual(again.status, 0)
        XCTAssertTrue(again.stderr.contains("superseded"), again.stderr)
        XCTAssertTrue(stderrText(standbyErrors).contains("took over"))
        try assertGuestRuns(socket: socket("standby"), vcpus: 1)
    }

    /// A manual standby cut off past the primary's loss time keeps its copy; when the link returns
    /// the primary protects the VM again by itself, sending what changed since the standby's
    /// checkpoint once (as the first checkpoint: a pass first would send the rewritten working
    /// set twice). Then the primary is killed while a checkpoint crawls over the link: the
    /// standby hears of it from the close at once, not after the megabytes a grown send buffer
    /// held (its kernel has at most 256 KiB unsent to deliver first).
    func testAManualStandbyIsProtectedAgainWithWhatChangedAndAKilledPrimaryIsSeenAtOnce() throws {
        let key = try makePSKFile("key.psk")
        let (standby, standbyErrors) = try startStandby(key: key, extra: ["--failover", "manual"])
        let (primary, primaryErrors) = try bootPrimary(output: directory + "/primary.out")
        try protect(key: key)
        func phase() -> String? { status("standby")?["standby"]?["phase"]?.stringValue }
        Thread.sleep(forTimeInterval: 0.5)
        try link.cut()
        waitFor("the primary to lose its standby and the standby to wait for failover", timeout: 20) {
            replication()?["status"]?.stringValue == "unprotected" && phase() == StandbySession.Phase.awaitingFailover.rawValue
        }
        try link.restore()
        let back = Date()
        waitFor("the VM protected again once the link returned", timeout: 30) { replication()?["status"]?.stringValue == "protected" }
        let again = try XCTUnwrap(replication())
        let resync = again["last_reprotect"]
        let bytes = resync?["bytes"]?.doubleValue ?? 0
        print("20 Mbit/s link cut past the primary's loss time, manual standby: protected again \(Int(Date().timeIntervalSince(back) * 1000)) ms after the link returned; \(resync.map { "\($0)" } ?? "no resync figures")")
        XCTAssertEqual(resync?["kind"]?.stringValue, "delta", "\(again)")
        // The guest rewrites 8 MiB: what changed is at most that, sent once.
        XCTAssertGreaterThan(bytes, 0)
        XCTAssertLessThan(bytes, 1.5 * 8 * 1_048_576, "what changed went out once")
        XCTAssertNil(status("standby")?["vcpu_stats"], "the manual standby ran the VM: \(stderrText(standbyErrors))")

        waitFor("the standby protecting with a checkpoint in flight", timeout: 20) {
            phase() == StandbySession.Phase.protecting.rawValue && (replication()?["checkpoints"]?.doubleValue ?? 0) >= (again["checkpoints"]?.doubleValue ?? 0) + 1
        }
        let crossing = try XCTUnwrap(replication()?["effective_interval_ms"]?.doubleValue)
        Thread.sleep(forTimeInterval: 0.5)
        let killed = Date()
        kill(primary.processIdentifier, SIGKILL)
        waitFor("the standby to see its primary gone", timeout: 20) { phase() == StandbySession.Phase.awaitingFailover.rawValue }
        let seen = Date().timeIntervalSince(killed) * 1000
        print("a primary killed with a checkpoint crossing (\(Int(crossing)) ms each): its standby saw it gone \(Int(seen)) ms later")
        XCTAssertLessThan(seen, 0.25 * crossing, "the standby waited for the dead primary's queued checkpoint: \(stderrText(primaryErrors))")
        XCTAssertTrue(standby.isRunning)
    }

    /// The last pass goes out with the VM paused; its rate is what the link carried until the
    /// destination had it all, not how fast the bytes went into the socket buffer (which gave
    /// 2,788 MiB/s on this 20 Mbit/s link).
    func testTheFinalPassReportsTheRateTheLinkCarried() throws {
        let key = try makePSKFile("key.psk")
        try startDestination(key: key)
        let (_, sourceOut, sourceErrors) = try start(["boot", "--memory", "128M", "--vcpus", "1", "--track", "bitmap",
                                                      "--control", socket("source"), "--workload", "0:write,ws=4M,rate=2M"],
                                                     prefix: link.inside(link.left))
        XCTAssertNotNil(CLI.readLine(sourceOut), stderrText(sourceErrors))
        let result = try CLI.run(["migrate", "--vm", socket("source"), "--to", "\(link.rightAddress):\(port)", "--psk-file", key,
                                  "--downtime", "1s", "--json"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let report = try JSONValue.parse(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        let passes = try XCTUnwrap(report["passes"]?.arrayValue)
        let last = try XCTUnwrap(passes.last)
        let rate = try XCTUnwrap(last["bandwidth_mib_s"]?.doubleValue)
        print("20 Mbit/s link (2.38 MiB/s): passes at \(passes.map { String(format: "%.2f", $0["bandwidth_mib_s"]?.doubleValue ?? 0) }.joined(separator: ", ")) MiB/s; last pass \(Int(last["bytes_sent"]?.doubleValue ?? 0)) bytes")
        XCTAssertLessThan(rate, 2.38 * 1.25, "the final pass cannot have moved faster than the link")
    }
}
