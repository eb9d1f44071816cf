import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import Glibc

/// `dirtymig-bench link --failover`: whether a standby across a slow link tells a primary that
/// lives from one that died, and how soon it acts. The primary (`dirtymig boot`, then
/// `migrate --continuous`) runs in one network namespace, the standby (`receive --standby`) in
/// the other, over the veth pair shaped with tbf, with a guest that dirties memory faster than
/// the link carries (so checkpoints crawl and the standby hears bytes, not frames). Three
/// trials, each `runs` times:
/// - **alive**: an automatic standby watched for `seconds` while its primary lives: it must
///   never take over, and the primary must never lose it;
/// - **death**: then the primary dies, as a host does (the link cut first, so no FIN reaches the
///   standby, then SIGKILL) in odd runs and as a process does (SIGKILL alone: its kernel closes
///   the connection) in even ones; timed from the death to the first line the guest writes on
///   the standby (the guest emits one every 10 ms), what a user of the VM sees;
/// - **link returns**: a standby in manual mode (it holds its copy, never takes over by itself)
///   and a cut long enough for the primary to give up on it; timed from the link's return to
///   the primary reporting `protected` again, with the bytes that took.
struct LinkFailoverOptions {
    var runs = 20
    var rateMbit = 20
    var seconds = 10.0
    var failoverAfter = "500ms"
    /// Longer than twice --failover-after (and at least a second): the primary gives up on its
    /// standby after that much silence.
    var cutSeconds = 3.0
    var idleSeconds = 2.0
    var workingSet = "8M"
    /// The alive-then-death trials, the link-return one, or both (`--only alive|return`).
    var aliveAndDeath = true
    var linkReturn = true
}

extension LinkFailoverOptions {
    /// 50 MiB/s dirties twenty times what 20 Mbit/s carries: every checkpoint holds most of the
    /// working set (8 MiB by default: about 3.4 s to cross; one crossing of it is the least a
    /// standby needs to be protecting again). A line every 10 ms marks the guest running.
    var bootArguments: [String] {
        ["--memory", "128M", "--vcpus", "1", "--workload", "0:check,ws=\(workingSet),rate=50M,emit=10ms"]
    }
}

func runLinkFailoverBenchmark(_ options: LinkFailoverOptions) throws {
    let dirtymig = try dirtymigBesideBenchmark()
    let link: TwoHostLink
    do { link = try TwoHostLink(rateMbit: options.rateMbit) } catch { throw BenchError("cannot make two hosts: \(error)") }
    defer { link.remove() }
    let placement = MigrationPlacement(link: link)
    var alive: [AliveTrial] = [], hostDeaths: [Double] = [], processDeaths: [Double] = [], returns: [ReturnTrial] = []
    for run in 1...options.runs {
        if options.aliveAndDeath {
            Thread.sleep(forTimeInterval: options.idleSeconds)
            let hostDies = run % 2 == 1
            let (trial, death) = try runAliveThenDeath(dirtymig: dirtymig, link: link, placement: placement, hostDies: hostDies, options: options)
            alive.append(trial)
            if hostDies { hostDeaths.append(death) } else { processDeaths.append(death) }
            log(String(format: "run %d/%d: alive %.0f s: %@, %@; %@ death: the standby ran the guest %.0f ms later",
                       run, options.runs, options.seconds, trial.tookOver ? "THE STANDBY TOOK OVER" : "no takeover",
                       trial.stayedProtected ? "protected throughout" : "NOT protected throughout", hostDies ? "host" : "process", death))
            try? link.restore()
        }
        guard options.linkReturn else { continue }
        Thread.sleep(forTimeInterval: options.idleSeconds)
        let back = try runLinkReturn(dirtymig: dirtymig, link: link, placement: placement, options: options)
        returns.append(back)
        log("run \(run)/\(options.runs): link back after a \(LinkReplicationTable.seconds(options.cutSeconds)) s cut: "
            + (back.milliseconds.map { String(format: "protected again %.0f ms later, %.2f MiB sent for it (%@)", $0, back.mebibytes ?? 0, back.note) }
               ?? "not protected again within 30 s (\(back.note))"))
    }
    emitLine("Replication between two network namespaces over a veth pair shaped with tbf to \(options.rateMbit) Mbit/s (both directions), a guest dirtying 50 MiB/s over \(options.workingSet) (the link carries 2.4 MiB/s at 20 Mbit/s); \(options.runs) runs")
    emitLine("")
    emitLine("| trial | what is measured | result | goal |")
    emitLine("|---|---|---|---|")
    if options.aliveAndDeath {
        emitLine("| primary alive, \(LinkReplicationTable.seconds(options.seconds)) s per run | takeovers by the standby | \(alive.filter(\.tookOver).count) of \(alive.count) runs | 0 |")
        emitLine("| primary alive | runs the primary stayed protected throughout | \(alive.filter(\.stayedProtected).count) of \(alive.count) | all |")
        emitLine("| primary's host dies (link cut, then SIGKILL) | death to the guest's first line on the standby, ms | \(summary(hostDeaths)) | ≤ --failover-after + 100 |")
        emitLine("| primary's process dies (SIGKILL) | death to the guest's first line on the standby, ms | \(summary(processDeaths)) | - |")
    }
    let restored = returns.compactMap(\.milliseconds)
    if options.linkReturn { emitLine("| link cut \(LinkReplicationTable.seconds(options.cutSeconds)) s, manual standby | link back to protected again, ms | \(restored.isEmpty ? "never within 30 s" : summary(restored))\(restored.count < returns.count ? " (\(restored.count) of \(returns.count) runs)" : "") | ≤ 2000 |") }
    let sent = returns.compactMap(\.mebibytes)
    if !sent.isEmpty { emitLine("| link cut, manual standby | MiB sent to protect again | \(summary(sent, "%.2f")) | - |") }
    emitLine("")
    emitLine("Conditions: standby `receive --standby --failover-after \(options.failoverAfter) --insecure` (auto for the first three trials, `--failover manual` for the last); primary `boot \(options.bootArguments.joined(separator: " "))`, `migrate --continuous --insecure`; "
             + "\(LinkReplicationTable.seconds(options.idleSeconds)) s idle before each trial; a death is timed from just before the cut (host) or the kill (process), polled every millisecond on the standby's --guest-output file; "
             + "the link's return is timed from the end of the nft command that removes the cut, polled every 10 ms on the primary's query-replication.")
}

private struct AliveTrial {
    var tookOver: Bool
    var stayedProtected: Bool
}

private struct ReturnTrial {
    var milliseconds: Double?
    var mebibytes: Double?
    var note: String
}

/// The processes of one trial: a standby in the right namespace, a primary in the left, its
/// replication started and protected.
private struct ReplicatedPair {
    let scratch: ScratchDirectory
    let standby: ChildProcess
    let boot: ChildProcess
    let primary: ControlClient
    var standbyOutput: String { scratch.file("standby.out") }
    var standbySocket: String { scratch.file("standby.sock") }

    init(dirtymig: String, placement: MigrationPlacement, manual: Bool, options: LinkFailoverOptions) throws {
        scratch = try ScratchDirectory("dirtymig-bench")
        let address = "\(placement.destinationHost):\(try placement.destinationPort())"
        standby = try placement.spawn(source: false, dirtymig,
                                      ["receive", "--listen", address, "--standby", "--failover", manual ? "manual" : "auto",
                                       "--failover-after", options.failoverAfter, "--insecure", "--control", scratch.file("standby.sock"),
                                       "--guest-output", scratch.file("standby.out")],
                                      stdout: .pipe, stderrPath: scratch.file("standby.log"))
        _ = try standby.expectLine(containing: "listening", timeout: 60)
        let primarySocket = scratch.file("primary.sock")
        boot = try placement.spawn(source: true, dirtymig, ["boot"] + options.bootArguments
                                       + ["--control", primarySocket, "--guest-output", scratch.file("primary.out")],
                                   stdout: .pipe, stderrPath: scratch.file("boot.log"))
        _ = try boot.expectLine(containing: "running", timeout: 60)
        let replicate = try ChildProcess(dirtymig, ["migrate", "--vm", primarySocket, "--continuous", "--to", address, "--json", "--insecure"],
                                         stdout: .file(scratch.file("replicate.json")), stderrPath: scratch.file("replicate.log"))
        guard replicate.waitForExit(timeout: 300), replicate.exitStatus == 0 else {
            replicate.stop()
            throw BenchError("migrate --continuous \(replicate.exitDescription ?? "did not return within 300 s"): \(replicate.stderrTail)")
        }
        primary = try ControlClient(path: primarySocket, callTimeout: 10)
    }

    func replication() -> JSONValue? { try? primary.call("query-replication") }

    /// Whether the standby runs the VM (its status then has the vCPUs' figures).
    func standbyRuns() -> Bool {
        guard let client = try? ControlClient(path: standbySocket, callTimeout: 5) else { return false }
        defer { client.close() }
        guard let status = try? client.call("query-status"), let stats = status["vcpu_stats"] else { return false }
        return stats != .null
    }

    func end() {
        _ = try? primary.call("replicate-stop", arguments: ["reason": "benchmark run ended"], timeout: 30)
        _ = try? primary.call("quit", timeout: 5)
        primary.close()
        boot.stop()
        standby.stop()
    }
}

/// Alive for `seconds` (polled every 100 ms), then the death, timed.
private func runAliveThenDeath(dirtymig: String, link: TwoHostLink, placement: MigrationPlacement, hostDies: Bool,
                               options: LinkFailoverOptions) throws -> (AliveTrial, Double) {
    let pair = try ReplicatedPair(dirtymig: dirtymig, placement: placement, manual: false, options: options)
    defer { pair.end() }
    var trial = AliveTrial(tookOver: false, stayedProtected: true)
    let aliveUntil = MonotonicClock.seconds() + options.seconds
    while MonotonicClock.seconds() < aliveUntil {
        if pair.standbyRuns() { trial.tookOver = true }
        if pair.replication()?["status"]?.stringValue != "protected" { trial.stayedProtected = false }
        usleep(100_000)
    }
    if trial.tookOver { throw BenchError("the standby took over while its primary lived: \(pair.standby.stderrTail)") }
    let died = MonotonicClock.seconds()
    if hostDies { try link.cut() }
    kill(pair.boot.pid, SIGKILL)
    while MonotonicClock.seconds() - died < 30 {
        if fileSize(pair.standbyOutput) > 0 { return (trial, (MonotonicClock.seconds() - died) * 1000) }
        usleep(1_000)
    }
    throw BenchError("the standby did not run the guest within 30 s of its primary's death: \(pair.standby.stderrTail)")
}

/// A manual standby, a cut the primary gives up over, the link back: timed to `protected`.
private func runLinkReturn(dirtymig: String, link: TwoHostLink, placement: MigrationPlacement,
                           options: LinkFailoverOptions) throws -> ReturnTrial {
    let pair = try ReplicatedPair(dirtymig: dirtymig, placement: placement, manual: true, options: options)
    defer { pair.end() }
    Thread.sleep(forTimeInterval: 1)
    try link.cut()
    let cutAt = MonotonicClock.seconds()
    while MonotonicClock.seconds() - cutAt < max(options.cutSeconds, 30), pair.replication()?["status"]?.stringValue == "protected" {
        usleep(10_000)
    }
    let lostAfter = MonotonicClock.seconds() - cutAt
    Thread.sleep(forTimeInterval: max(0, options.cutSeconds - lostAfter))
    let bytesBefore = pair.replication()?["bytes_sent"]?.doubleValue ?? 0
    try link.restore()
    let back = MonotonicClock.seconds()
    while MonotonicClock.seconds() - back < 30 {
        if let figures = pair.replication(), figures["status"]?.stringValue == "protected" {
            let bytes = (figures["bytes_sent"]?.doubleValue ?? 0) - bytesBefore
            let resync = figures["last_reprotect"]
            let note = "\(resync?["kind"]?.stringValue ?? "?") resync, \(Int(resync?["ms"]?.doubleValue ?? -1)) ms from the attempt that reached the standby to protected"
            return ReturnTrial(milliseconds: (MonotonicClock.seconds() - back) * 1000, mebibytes: bytes / 1_048_576, note: note)
        }
        usleep(10_000)
    }
    return ReturnTrial(milliseconds: nil, mebibytes: nil,
                       note: pair.replication()?["error"]?.stringValue ?? pair.replication()?["status"]?.stringValue ?? "no status")
}

private func fileSize(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_size) : 0
}

/// "median (min-max)", or "-" when no run measured it.
private func summary(_ values: [Double], _ format: String = "%.0f") -> String {
    values.isEmpty ? "-" : cell(values, format)
}
