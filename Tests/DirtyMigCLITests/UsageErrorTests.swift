import DirtyMigCore
import Foundation
import XCTest

/// Every kind of bad input in the list: a clear message naming the problem, exit status 2.
final class UsageErrorTests: XCTestCase {
    private func expectUsageError(_ arguments: [String], mentions words: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let result = try CLI.run(arguments)
        XCTAssertEqual(result.status, 2, "\(arguments): \(result.stderr)", file: file, line: line)
        for word in words {
            XCTAssertTrue(result.stderr.contains(word), "\(arguments): expected '\(word)' in: \(result.stderr)", file: file, line: line)
        }
    }

    func testUnknownCommandsAndOptions() throws {
        try expectUsageError(["bot"], mentions: ["unknown command 'bot'", "did you mean 'boot'"])
        try expectUsageError(["dirtyrte"], mentions: ["did you mean 'dirtyrate'"])
        try expectUsageError(["boot", "--memroy", "1G"], mentions: ["unknown option '--memroy'", "did you mean '--memory'"])
        try expectUsageError(["dirtyrate", "--intervall", "1s"], mentions: ["did you mean '--interval'"])
        try expectUsageError(["boot", "--memory"], mentions: ["--memory needs a value"])
        try expectUsageError(["boot", "--vcpus", "2", "--vcpus", "3"], mentions: ["given twice"])
        try expectUsageError(["boot", "stray"], mentions: ["unexpected argument 'stray'"])
    }

    /// The benchmarks run for minutes to an hour: a mistyped option must stop them before they
    /// start, not be ignored.
    func testTheBenchmarkRefusesOptionsItDoesNotTake() throws {
        let bench = CLI.benchmarkBinary
        guard FileManager.default.isExecutableFile(atPath: bench.path) else {
            throw XCTSkip("dirtymig-bench is not built next to \(CLI.binary.path)")
        }
        let cases: [([String], String)] = [
            (["migration", "--encryted"], "migration does not take '--encryted'"),
            (["throttle", "--runs", "3"], "throttle does not take '--runs'"),
            (["migration", "--runs"], "--runs needs a value"),
            (["migration", "--runs", "2"], "at least 5 runs"),
            (["migrations"], "no benchmark named 'migrations'"),
            (["postcopy", "--encrypted"], "postcopy does not take '--encrypted'"),
            (["postcopy", "--only", "xen"], "--only xen: expected dirtymig or qemu"),
            (["postcopy", "--scenario", "busy"], "--scenario busy: expected writer, reader, idle"),
            (["postcopy", "--bandwidth", "fast"], "--bandwidth fast: invalid rate"),
            (["postcopy", "--bandwidth", "100K"], "at least 1M"),
            (["postcopy", "--no-qemu", "--only", "qemu"], "leave nothing to run"),
            (["postcopy", "--runs", "0"], "--runs must be at least 1"),
            (["link", "--only", "xen"], "--only xen: expected rows among dirtymig, dirtymig-psk"),
            (["link", "--only", "qemu-zstd,qemu-zstd"], "a row named twice"),
            (["link", "--no-qemu", "--only", "qemu,qemu-zstd"], "leave nothing to run"),
            (["link", "--rates", "100,,1000"], "comma-separated Mbit/s"),
            (["link", "--scenario", "writer"], "--scenario writer: expected written, rewriting, text"),
            (["link", "--seconds", "5"], "--seconds is for link --replication"),
            (["link", "--runs", "0"], "--runs must be at least 1"),
            (["link", "--replication", "--only", "qemu"], "--only is for link's pre-copy table"),
            (["link", "--replication", "--scenario", "text"], "with --replication, expected idle, writer, fast-writer"),
            (["link", "--replication", "--seconds", "0.5"], "at least 1"),
            (["link", "--replicaton"], "link does not take '--replicaton'"),
            (["link", "--failover", "--only", "death"], "with --failover, expected alive"),
            (["link", "--failover", "--rates", "20,100"], "link --failover runs at one rate"),
            (["link", "--failover", "--failover-after", "5"], "a duration from 50ms to 60s"),
        ]
        for (arguments, words) in cases {
            let result = try CLI.run(arguments, program: bench)
            XCTAssertEqual(result.status, 2, "\(arguments): \(result.stderr)")
            XCTAssertTrue(result.stderr.contains(words) && result.stderr.contains("usage: dirtymig-bench"),
                          "\(arguments): expected '\(words)' in: \(result.stderr)")
            XCTAssertEqual(result.stdout, "", "\(arguments): nothing measured")
        }
        let help = try CLI.run(["migration", "--help"], program: bench)
        XCTAssertEqual(help.status, 0, help.stderr)
        XCTAssertTrue(help.stdout.contains("--encrypted") && help.stdout.contains("replication"), help.stdout)
        XCTAssertTrue(help.stdout.contains("postcopy [--runs N]") && help.stdout.contains("[--bandwidth RATE]"), help.stdout)
        XCTAssertTrue(help.stdout.contains("link --replication [--runs N]") && help.stdout.contains("[--only ROW,...]"), help.stdout)
    }

    func testValuesThatDoNotParse() throws {
        try expectUsageError(["boot", "--memory", "1Q"], mentions: ["--memory", "unknown suffix 'Q'"])
        try expectUsageError(["boot", "--vcpus", "two"], mentions: ["--vcpus", "whole number"])
        try expectUsageError(["dirtyrate", "--interval", "5"], mentions: ["add a unit"])
        try expectUsageError(["dirtyrate", "--mode", "smaple"], mentions: ["did you mean 'sample'"])
        try expectUsageError(["boot", "--track", "rings"], mentions: ["not one of bitmap, ring, quota"])
        try expectUsageError(["migrate", "--bandwidth", "fast"], mentions: ["--bandwidth", "invalid rate"])
        try expectUsageError(["boot", "--workload", "0:write,rate=lots"], mentions: ["invalid rate"])
        try expectUsageError(["boot", "--workload", "0:wirte"], mentions: ["did you mean 'write'"])
    }

    /// `migrate --status` and `--set` act on the migration under way: their own mistakes are
    /// usage errors before any VM is asked.
    func testSteeringAMigrationRefusesWhatItCannotDo() throws {
        try expectUsageError(["migrate", "--set", "speed=1M"], mentions: ["'speed' is not a limit that can change", "bandwidth=RATE"])
        try expectUsageError(["migrate", "--set", "bandwith=1M"], mentions: ["did you mean 'bandwidth'"])
        try expectUsageError(["migrate", "--set", "bandwidth"], mentions: ["expected LIMIT=VALUE"])
        try expectUsageError(["migrate", "--set", "bandwidth=1"], mentions: ["bandwidth must be from 4096 bytes/s"])
        try expectUsageError(["migrate", "--set", "bandwidth=fast"], mentions: ["--set bandwidth=fast", "invalid rate"])
        try expectUsageError(["migrate", "--set", "downtime=300"], mentions: ["--set downtime=300", "add a unit"])
        try expectUsageError(["migrate", "--set", "downtime=11m"], mentions: ["downtime must be from 1 ms to 600 s"])
        try expectUsageError(["migrate", "--set", "downtime=1s", "--set", "downtime=2s"], mentions: ["--set downtime given twice"])
        try expectUsageError(["migrate", "--status", "--set", "bandwidth=1M"], mentions: ["cannot be combined"])
        try expectUsageError(["migrate", "--status", "--to", "127.0.0.1:4444"], mentions: ["--to does not go with --status"])
        try expectUsageError(["migrate", "--set", "downtime=1s", "--bandwidth", "1M"], mentions: ["--set bandwidth=VALUE"])
        try expectUsageError(["migrate", "--status", "--replication"], mentions: ["--replication does not go with --status"])
        try expectUsageError(["migrate", "--start-postcopy", "--status"], mentions: ["cannot be combined"])
        try expectUsageError(["migrate", "--start-postcopy", "--postcopy"], mentions: ["--postcopy does not go with --start-postcopy"])
    }

    func testPostcopyOptions() throws {
        try expectUsageError(["migrate", "--postcopy-after", "2"], mentions: ["--postcopy-after applies with --postcopy"])
        try expectUsageError(["migrate", "--postcopy", "--postcopy-after", "0"], mentions: ["--postcopy-after", "positive whole number"])
        try expectUsageError(["migrate", "--postcopy", "--postcopy-after", "1001"], mentions: ["--postcopy-after 1001", "1 to 1000"])
        try expectUsageError(["migrate", "--continuous", "--to", "127.0.0.1:4444", "--postcopy"],
                             mentions: ["a replicated VM cannot switch to post-copy"])
    }

    func testImpossibleRequests() throws {
        try expectUsageError(["boot", "--memory", "16M"], mentions: ["below the guest's minimum"])
        try expectUsageError(["boot", "--memory", "60G"], mentions: ["more than this host has"])
        try expectUsageError(["boot", "--vcpus", "0"], mentions: ["positive"])
        try expectUsageError(["boot", "--vcpus", "65"], mentions: ["at most 64"])
        try expectUsageError(["boot", "--ring-entries", "1000"], mentions: ["power of two from 256 to 65536"])
        try expectUsageError(["boot", "--ring-entries", "128"], mentions: ["power of two from 256 to 65536"])
        try expectUsageError(["boot", "--ring-entries", "131072"], mentions: ["power of two from 256 to 65536"])
        try expectUsageError(["boot", "--track", "bitmap", "--ring-entries", "4096"], mentions: ["not bitmap"])
        try expectUsageError(["boot", "--memory", "256M", "--workload", "0:write,ws=512M"], mentions: ["outside the", "workload area"])
        try expectUsageError(["boot", "--vcpus", "2", "--workload", "3:read"], mentions: ["vCPU 3", "2 vCPUs"])
        try expectUsageError(["boot", "--export-config", "x"], mentions: ["needs --export-image"])
    }

    func testNamesPortsAndListenFailuresSayWhatIsWrong() throws {
        try expectUsageError(["migrate", "--vm", "x", "--to", "host:70000"], mentions: ["port 70000 is above 65535"])
        try expectUsageError(["receive", "--listen", "host:65536"], mentions: ["port 65536 is above 65535"])
        let unresolved = try CLI.run(["receive", "--listen", "nosuchhost.invalid:4444", "--control", NSTemporaryDirectory() + "dm-rx-\(getpid())/r.sock"])
        XCTAssertEqual(unresolved.status, 1)
        XCTAssertTrue(unresolved.stderr.contains("'nosuchhost.invalid': the name does not resolve"), unresolved.stderr)
        XCTAssertFalse(unresolved.stderr.contains("connection failed") || unresolved.stderr.contains("No route to host"), unresolved.stderr)
        XCTAssertFalse(unresolved.stderr.contains("dirtymig: dirtymig"), unresolved.stderr)
        let foreign = try CLI.run(["receive", "--listen", "192.0.2.1:4444", "--insecure", "--control", NSTemporaryDirectory() + "dm-rx-\(getpid())/r.sock"])
        XCTAssertEqual(foreign.status, 1)
        XCTAssertTrue(foreign.stderr.contains("not one of this host's"), foreign.stderr)
    }

    /// No command is a usage error: the overview on standard error, exit status 2.
    func testNoCommandPrintsTheUsageAndFails() throws {
        let bare = try CLI.run([])
        XCTAssertEqual(bare.status, 2, bare.stderr)
        XCTAssertEqual(bare.stdout, "")
        XCTAssertTrue(bare.stderr.contains("Usage: dirtymig COMMAND") && bare.stderr.contains("Commands:"), bare.stderr)
    }

    /// A bare number's hint names the unit it more likely meant.
    func testABareDurationSuggestsALikelyUnit() throws {
        try expectUsageError(["migrate", "--downtime", "300"], mentions: ["e.g. '300ms'"])
        try expectUsageError(["dirtyrate", "--interval", "5"], mentions: ["e.g. '5s'"])
    }

    /// Every option's description starts in one column; an option too long for it has its
    /// description on the next line, never run into the option.
    func testHelpKeepsDescriptionsInTheirColumn() throws {
        for command in ["boot", "dirtyrate", "migrate", "receive", "limit", "list", "stop", "plot", "failover"] {
            let help = try CLI.run([command, "--help"])
            XCTAssertEqual(help.status, 0, help.stderr)
            let lines = help.stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            guard let start = lines.firstIndex(of: "Options:") else { XCTFail("\(command): no options"); continue }
            for (index, line) in lines.enumerated().dropFirst(start + 1) {
                if line.isEmpty { break }
                let column = String(repeating: " ", count: 28)
                if line.hasPrefix("  -") {
                    // Either the description follows in the column, or on the next line.
                    if lines[index + 1].hasPrefix(column) { continue }
                    XCTAssertTrue(line.count > 28 && Array(line)[26...27] == [" ", " "], "\(command): '\(line)'")
                } else {
                    XCTAssertTrue(line.hasPrefix(column) && line.count > 28, "\(command): '\(line)'")
                }
            }
        }
        let migrate = try CLI.run(["migrate", "--help"]).stdout
        XCTAssertTrue(migrate.contains("  --checkpoint-interval DURATION\n" + String(repeating: " ", count: 28) + "with --continuous:"), migrate)
    }

    func testHelpAndVersion() throws {
        for arguments in [["--help"], ["help"], ["help", "boot"], ["boot", "--help"], ["dirtyrate", "-h"]] {
            let result = try CLI.run(arguments)
            XCTAssertEqual(result.status, 0, "\(arguments)")
            XCTAssertTrue(result.stdout.contains("Usage:"), "\(arguments)")
        }
        XCTAssertEqual(try CLI.run(["--version"]).stdout, "dirtymig 0.1.0\n")
        let limit = try CLI.run(["limit", "--vm", "/tmp/no-such-dirtymig-vm.sock"])
        XCTAssertEqual(limit.status, 1)
        XCTAssertTrue(limit.stderr.contains("no VM"), limit.stderr)
    }

    func testMigrationUsageErrors() throws {
        try expectUsageError(["receive"], mentions: ["--listen HOST:PORT is required"])
        try expectUsageError(["receive", "--listen", "4444"], mentions: ["--listen '4444'", "HOST:PORT"])
        try expectUsageError(["migrate", "--to", "nowhere"], mentions: ["--to 'nowhere'", "HOST:PORT"])
        try expectUsageError(["migrate", "--vm", "x"], mentions: ["--vm needs --to"])
        try expectUsageError(["migrate", "--to", "127.0.0.1:1", "--memory", "1G"], mentions: ["--memory applies to the local migration"])
        try expectUsageError(["migrate", "--throttle", "fast"], mentions: ["--throttle", "dirty-limit"])
        try expectUsageError(["migrate", "--throttle", "dirty-quota", "--track", "ring", "--memory", "128M"],
                             mentions: ["--throttle dirty-quota needs a VM booted with --track quota", "--track ring"])
        try expectUsageError(["migrate", "--throttle", "dirty-limit", "--track", "bitmap", "--memory", "128M"],
                             mentions: ["--throttle dirty-limit needs a VM booted with --track ring"])
        try expectUsageError(["limit", "--rate", "1M", "--show"], mentions: ["one of --rate, --cancel and --show"])
        try expectUsageError(["limit", "--vcpu", "-1", "--show"], mentions: ["--vcpu"])
        try expectUsageError(["migrate", "--downtime", "soon"], mentions: ["--downtime"])
        try expectUsageError(["migrate", "--max-iterations", "0"], mentions: ["--max-iterations"])
        try expectUsageError(["migrate", "--to", "127.0.0.1:1", "--reprotect-for", "5s"],
                             mentions: ["--reprotect-for applies to --continuous"])
        try expectUsageError(["migrate", "--vm", "x", "--replication", "--reprotect-for", "5s"],
                             mentions: ["--reprotect-for applies to --continuous"])
        try expectUsageError(["migrate", "--reprotect-for", "0"], mentions: ["--reprotect-for", "add a unit"])
    }

    /// --reprotect-for: 0 s (never) to 24 h, checked in one place for the command line and the
    /// control socket.
    func testTheTimeToProtectAgainIsBounded() throws {
        var options = ReplicationOptions(standby: HostPort(host: "127.0.0.1", port: 1))
        XCTAssertEqual(options.reprotectForSeconds, 300, "five minutes unless asked")
        XCTAssertNoThrow(try options.set(intervalSeconds: nil, checkpointPages: nil, reprotectForSeconds: 0))
        XCTAssertEqual(options.reprotectForSeconds, 0)
        XCTAssertThrowsError(try options.set(intervalSeconds: nil, checkpointPages: nil, reprotectForSeconds: 86_401)) { error in
            XCTAssertEqual(error as? ReplicationOptions.Invalid, .reprotectFor)
            XCTAssertTrue("\(error)".contains("--reprotect-for"))
        }
        XCTAssertThrowsError(try options.set(intervalSeconds: nil, checkpointPages: nil, reprotectForSeconds: -1))
    }

    func testPlotSaysWhyItCannotRead() throws {
        let missing = try CLI.run(["plot", "--from", "/nonexistent-dirtymig/report.json"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.stderr.contains("cannot read /nonexistent-dirtymig/report.json: No such file or directory"), missing.stderr)
        let directory = try CLI.run(["plot", "--from", "/", "--output", "/nonexistent-dirtymig/x.svg"])
        XCTAssertEqual(directory.status, 1)
        XCTAssertTrue(directory.stderr.contains("cannot read /: Is a directory"), directory.stderr)
    }

    func testNoVMToTalkTo() throws {
        let result = try CLI.run(["dirtyrate", "--vm", "/tmp/no-such-dirtymig-vm.sock", "--count", "1"])
        XCTAssertEqual(result.status, 1)
        XCTAssertTrue(result.stderr.contains("no VM is listening"), result.stderr)
    }
}
