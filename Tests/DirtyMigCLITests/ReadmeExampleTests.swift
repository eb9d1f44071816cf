import DirtyMigCore
import Foundation
import XCTest

/// The README's shell blocks: each ```sh fence and the marker comment on the line before it.
/// An example is marked `<!-- example: NAME -->`; the test command `<!-- test-command -->`
/// (`.ci/run` runs that one). Shell text that is not meant to run as written (installing
/// packages, two-host forms) is fenced as ```text.
struct ReadmeShellBlock {
    static let examplePrefix = "<!-- example: "
    static let markerSuffix = " -->"
    static let testCommandMarker = "<!-- test-command -->"

    /// The line before the fence, nil when it is empty or there is none.
    let marker: String?
    let body: String
    /// 1-based line of the first line of the body, for messages.
    let line: Int

    /// The example's name, when the block is marked as one.
    var exampleName: String? {
        guard let marker, marker.hasPrefix(Self.examplePrefix), marker.hasSuffix(Self.markerSuffix) else { return nil }
        return String(marker.dropFirst(Self.examplePrefix.count).dropLast(Self.markerSuffix.count))
    }

    static var readmePath: String { CLI.packageRoot.appendingPathComponent("README.md").path }

    static func parse(_ text: String) -> [ReadmeShellBlock] {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        var blocks: [ReadmeShellBlock] = []
        var index = 0
        while index < lines.count {
            guard lines[index] == "```sh" else { index += 1; continue }
            let previous = index > 0 ? lines[index - 1].trimmingCharacters(in: .whitespaces) : ""
            let start = index + 1
            var end = start
            while end < lines.count, lines[end] != "```" { end += 1 }
            blocks.append(ReadmeShellBlock(marker: previous.isEmpty ? nil : previous,
                                           body: lines[start..<min(end, lines.count)].joined(separator: "\n") + "\n", line: start + 1))
            index = end + 1
        }
        return blocks
    }

    static func readme() throws -> [ReadmeShellBlock] {
        parse(try String(contentsOfFile: readmePath, encoding: .utf8))
    }
}

/// Every example in the README runs as written on one machine: each marked block runs with bash
/// (`-euo pipefail`) in an empty directory of its own, with the `dirtymig` built with these tests
/// first on PATH and XDG_RUNTIME_DIR inside that directory, so its control sockets (the default
/// directory, under the example's own names) cannot meet another test's VMs or the user's.
/// Whatever an example leaves running is stopped afterwards, even when it fails.
final class ReadmeExampleTests: XCTestCase {
    /// The examples this class runs, one test each: an example added to the README without a
    /// test here fails `testEveryExampleHasATest`.
    static let covered: Set<String> = ["quick-start", "migrate-detached", "steer", "encrypted", "compressed", "postcopy", "replication", "dirty-rates", "plot"]

    /// Set in every example's environment (and so inherited by everything it starts, detached
    /// VMs included): how the cleanup finds what an example left behind.
    static let markerVariable = "DIRTYMIG_README_EXAMPLE"

    /// Longest an example may take; the longest takes about 5 s.
    static let exampleTimeout: Double = 60

    // MARK: the README's blocks

    func testEveryShellBlockIsAnExampleOrTheTestCommand() throws {
        let blocks = try ReadmeShellBlock.readme()
        XCTAssertFalse(blocks.isEmpty, "README.md has shell blocks")
        var names: [String] = []
        for block in blocks {
            if block.marker == ReadmeShellBlock.testCommandMarker { continue }
            guard let name = block.exampleName else {
                XCTFail("README.md line \(block.line): a ```sh block must follow <!-- example: NAME --> (so the tests run it) or <!-- test-command -->; fence shell text that cannot run as written (root, two hosts) as ```text")
                continue
            }
            XCTAssertTrue(ControlSocketPath.isValid(name: name), "README.md line \(block.line): example name '\(name)'")
            names.append(name)
        }
        XCTAssertEqual(names.count, Set(names).count, "example names are unique: \(names)")
        XCTAssertEqual(blocks.filter { $0.marker == ReadmeShellBlock.testCommandMarker }.count, 1, "one test command")
    }

    func testEveryExampleHasATest() throws {
        let names = Set(try ReadmeShellBlock.readme().compactMap(\.exampleName))
        XCTAssertEqual(names, Self.covered, "each README example has a test in ReadmeExampleTests, and each test an example")
    }

    /// One machine: every address is loopback, and no two examples give a VM the same name, so
    /// they can even run side by side.
    func testExamplesStayOnThisMachine() throws {
        var owner: [String: String] = [:]
        for block in try ReadmeShellBlock.readme() {
            guard let example = block.exampleName else { continue }
            let words = block.body.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).map(String.init)
            for (index, word) in words.enumerated() where index + 1 < words.count {
                if word == "--to" || word == "--listen" {
                    XCTAssertTrue(words[index + 1].hasPrefix("127.0.0.1:"), "example '\(example)': \(word) \(words[index + 1]) is not loopback")
                }
                if word == "--name" {
                    let name = words[index + 1]
                    XCTAssertNotEqual(name, ControlSocketPath.defaultName, "example '\(example)' names a VM '\(name)', the default")
                    if let other = owner[name] { XCTFail("examples '\(other)' and '\(example)' both start a VM named '\(name)'") }
                    owner[name] = example
                }
            }
        }
    }

    /// The README's prerequisites name every package `.ci/run` installs for the build and the
    /// tests, so a reader on a fresh machine installs what CI does.
    func testPrerequisitesNameWhatCIInstalls() throws {
        let readme = try String(contentsOfFile: ReadmeShellBlock.readmePath, encoding: .utf8)
        let start = try XCTUnwrap(readme.range(of: "## Prerequisites"), "README.md has a Prerequisites section")
        let section = readme[start.upperBound...]
        let prerequisites = section.range(of: "\n## ").map { section[..<$0.lowerBound] } ?? section
        let ci = try String(contentsOf: CLI.packageRoot.appendingPathComponent(".ci/run"), encoding: .utf8)
        let packages = ci.components(separatedBy: "need_packages+=(").dropFirst().map { String($0.prefix { $0 != ")" }) }
        XCTAssertFalse(packages.isEmpty, ".ci/run installs packages")
        let words = Set(prerequisites.split(whereSeparator: { !($0.isLetter || $0.isNumber || $0 == "-") }).map(String.init))
        for package in packages {
            XCTAssertTrue(words.contains(package), "README.md's Prerequisites do not name \(package), which .ci/run installs")
        }
    }

    // MARK: the examples, run

    func testQuickStart() throws {
        try run("quick-start") { output, _ in
            XCTAssertTrue(output.contains("status                completed"), output)
            XCTAssertTrue(output.contains("verify                passed"), output)
        }
    }

    func testMigrateDetached() throws {
        try run("migrate-detached") { output, _ in
            XCTAssertTrue(output.contains("verify                passed"), output)
            // `list` after the move: the destination runs the VM, the source has ended.
            // NAME, PID, STATE, ...: the pid is before the state, which may carry words of progress.
            let rows = output.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }.filter { $0.first?.hasPrefix("demo") ?? false }
            XCTAssertEqual(rows.map { [$0[0]] + Array($0.dropFirst(2).prefix(1)) }, [["demo-moved", "running"]], output)
        }
    }

    func testSteer() throws {
        try run("steer") { output, _ in
            XCTAssertTrue(output.contains("migrating ("), "list shows the migration's progress: \(output)")
            XCTAssertTrue(output.contains("limits changed"), "the report lists the change: \(output)")
            XCTAssertTrue(output.contains("status                completed"), output)
        }
    }

    func testEncrypted() throws {
        try run("encrypted") { output, _ in
            XCTAssertTrue(output.contains("TLSv1.3"), "the report names the channel: \(output)")
            XCTAssertTrue(output.contains("verify                passed"), output)
        }
    }

    func testCompressed() throws {
        try run("compressed") { output, _ in
            XCTAssertTrue(output.contains("status                completed"), output)
            XCTAssertTrue(output.contains("verify                passed"), output)
            // "compression           zstd: 65 of 65 batches, 128.0 MiB of pages in 38.4 MiB (ratio 3.34), ..."
            let line = output.split(separator: "\n").first { $0.hasPrefix("compression ") }.map(String.init) ?? ""
            let ratio = line.range(of: "ratio ").flatMap { Double(line[$0.upperBound...].prefix { $0 != ")" }) }
            XCTAssertGreaterThan(ratio ?? 0, 2, "text-like pages travel in less than half their size: \(output)")
        }
    }

    func testPostcopy() throws {
        if let reason = UserFaultFD.unavailableReason() { throw XCTSkip("skipped: needs userfaultfd (\(reason))") }
        try run("postcopy") { output, _ in
            XCTAssertTrue(output.contains("status                completed"), output)
            XCTAssertTrue(output.contains("verify                passed"), output)
            // "post-copy             after pass 1 at 2682 ms: the guest dirtied 60.5 MiB/s against 60.0 MiB/s ..."
            XCTAssertTrue(output.contains("post-copy             after pass 1 at"), output)
            XCTAssertTrue(output.contains("could not meet --downtime"), output)
            XCTAssertTrue(output.contains("  faults              "), output)
            XCTAssertFalse(output.contains("throttle              dirty-limit"), "with --postcopy, auto throttles nothing: \(output)")
        }
    }

    func testReplication() throws {
        try run("replication") { output, directory in
            XCTAssertTrue(output.contains("status                  protected"), output)
            // The standby's guest runs on, checking its memory without an error, and its output
            // goes on at the line after the last one the primary released.
            XCTAssertTrue(output.contains(" errors "), "dirtyrate shows the check workload's errors column: \(output)")
            let last = try Self.sequenceNumbers(directory + "/primary.out").last
            let first = try Self.sequenceNumbers(directory + "/standby.out").first
            XCTAssertNotNil(last, "the primary released output")
            XCTAssertNotNil(first, "the standby's guest went on emitting")
            // Never a line twice. A line can be missing at most for one epoch (25 ms, 10 ms a line):
            // the one the primary was told it could release, and was killed before it wrote.
            if let last, let first { XCTAssertTrue((last + 1)...(last + 3) ~= first, "one stream across the failover: \(last), then \(first)") }
            for file in ["primary.out", "standby.out"] {
                let text = try String(contentsOfFile: directory + "/" + file, encoding: .utf8)
                XCTAssertFalse(text.split(separator: "\n").contains { !$0.contains(" errors=0 ") }, "\(file): the guest found no error")
            }
        }
    }

    func testDirtyRates() throws {
        try run("dirty-rates") { output, _ in
            XCTAssertTrue(output.contains("enforced by: dirty-limit"), output)
            XCTAssertTrue(output.contains("v0 MiB/s"), output)
        }
    }

    func testPlot() throws {
        try run("plot") { _, directory in
            let svg = try String(contentsOfFile: directory + "/move.svg", encoding: .utf8)
            XCTAssertTrue(svg.contains("<svg"), "move.svg is an SVG picture")
            XCTAssertTrue(svg.contains("pass 1"), "move.svg labels the passes")
        }
    }

    // MARK: running one

    /// Runs the README's example `name` and then `check(output, directory)` on what it printed
    /// (stdout and stderr together) and the directory it ran in. Skips where /dev/kvm, bash, or a
    /// command the example uses is missing, or a port it uses is taken by another program.
    private func run(_ name: String, check: (String, String) throws -> Void) throws {
        try requireKVMDevice()
        let example = try XCTUnwrap(try ReadmeShellBlock.readme().first { $0.exampleName == name }, "README.md has no example '\(name)'")
        try Self.requireCommands(in: example.body)
        try Self.requirePortsFree(in: example.body)

        let root = try privateTemporaryDirectory("dmx")
        let work = root + "/work", runtime = root + "/run"
        for directory in [work, runtime] { XCTAssertEqual(mkdir(directory, 0o700), 0, directory) }
        defer {
            Self.stopEverything(startedFor: root, runtime: runtime)
            try? FileManager.default.removeItem(atPath: root)
        }
        let script = root + "/example.sh", log = root + "/output"
        try Data(example.body.utf8).write(to: URL(fileURLWithPath: script))

        var environment = ProcessInfo.processInfo.environment
        environment["PATH"] = CLI.binary.deletingLastPathComponent().path + ":" + (environment["PATH"] ?? "/usr/bin:/bin")
        environment["XDG_RUNTIME_DIR"] = runtime
        environment[Self.markerVariable] = root
        let started = Date()
        let status = try Self.runBash(script: script, in: work, log: log, environment: environment, timeout: Self.exampleTimeout)
        let text = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        print("README example '\(name)' ran in \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
        let shown = "README.md line \(example.line), example '\(name)'"
        guard let status else {
            XCTFail("\(shown) did not end within \(Int(Self.exampleTimeout)) s; its output:\n\(text)")
            return
        }
        guard status == 0 else {
            XCTFail("\(shown) failed (\(status > 0 ? "exit status \(status)" : "signal \(-status)")); its output:\n\(text)")
            return
        }
        // The README promises that each example stops what it started.
        let left = ControlSocketPath.listRunning(directory: runtime + "/dirtymig")
        XCTAssertEqual(left, [], "\(shown) leaves VMs running")
        try check(text, work)
    }

    /// Runs `bash -euo pipefail SCRIPT` in `directory`, its output (stdout and stderr) to `log`;
    /// returns its exit status (minus the signal's number if one ended it), or nil if it did not
    /// end within `timeout` seconds (it is killed then). Started with posix_spawn and reaped with
    /// waitpid: Foundation's Process learns that its child ended only once every process that
    /// inherited its descriptors has closed them, so an example that leaves a background job
    /// would hold the test for that job's life.
    private static func runBash(script: String, in directory: String, log: String, environment: [String: String],
                                timeout: Double) throws -> Int32? {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        let arguments = ["/bin/bash", "-c", "cd -- \"$0\" && exec /bin/bash -e -u -o pipefail \"$1\"", directory, script]
        let argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for pointer in argv + envp { free(pointer) } }
        var pid: pid_t = 0
        let result = posix_spawn(&pid, "/bin/bash", &actions, nil, argv, envp)
        guard result == 0 else { throw CocoaError(.executableLoad, userInfo: [NSLocalizedDescriptionKey: "cannot start bash: \(String(cString: strerror(result)))"]) }
        let deadline = Date().addingTimeInterval(timeout)
        var status: Int32 = 0
        while true {
            let reaped = waitpid(pid, &status, WNOHANG)
            if reaped == pid { break }
            if reaped < 0 && errno != EINTR {
                throw CocoaError(.executableLoad, userInfo: [NSLocalizedDescriptionKey: "waitpid: \(String(cString: strerror(errno)))"])
            }
            if Date() >= deadline {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                return nil
            }
            usleep(20_000)
        }
        return status & 0x7f == 0 ? (status >> 8) & 0xff : -(status & 0x7f)
    }

    /// The `seq=` numbers of a `--guest-output` file, in order.
    private static func sequenceNumbers(_ path: String) throws -> [Int] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").compactMap { line in
            line.split(separator: " ").first { $0.hasPrefix("seq=") }.flatMap { Int($0.dropFirst(4)) }
        }
    }

    /// The commands besides dirtymig and the shell's builtins that examples use.
    private static func requireCommands(in script: String) throws {
        var needed = ["bash"]
        for command in ["openssl", "awk", "grep", "seq", "sleep", "head", "tail"] where script.contains(command + " ") {
            needed.append(command)
        }
        let path = ["/usr/local/bin", "/usr/bin", "/bin"]
        for command in needed where !path.contains(where: { FileManager.default.isExecutableFile(atPath: $0 + "/" + command) }) {
            let reason = "skipped: the example needs the \(command) command"
            FileHandle.standardError.write(Data((reason + "\n").utf8))
            throw XCTSkip(reason)
        }
    }

    /// The loopback ports an example listens on must be free (a socket just closed may linger
    /// for a moment: wait up to 5 s); one another program holds skips the test, saying which.
    private static func requirePortsFree(in script: String) throws {
        let ports = script.components(separatedBy: "127.0.0.1:").dropFirst().compactMap { UInt16($0.prefix { $0.isNumber }) }
        for port in Set(ports) {
            let deadline = Date().addingTimeInterval(5)
            while (try? TCPSocket.listen(HostPort(host: "127.0.0.1", port: port))) == nil {
                guard Date() < deadline else {
                    let reason = "skipped: another program listens on 127.0.0.1:\(port), which the README's example uses"
                    FileHandle.standardError.write(Data((reason + "\n").utf8))
                    throw XCTSkip(reason)
                }
                usleep(100_000)
            }
        }
    }

    /// Stops what an example left: first as a user would (`dirtymig stop` on every socket that
    /// answers in its runtime directory), then SIGKILL to every process that still carries the
    /// example's marker in its environment (a VM whose socket went away, or a stuck command).
    private static func stopEverything(startedFor root: String, runtime: String) {
        let sockets = runtime + "/dirtymig"
        for name in ControlSocketPath.listRunning(directory: sockets) {
            _ = try? CLI.run(["stop", "--vm", sockets + "/" + name + ControlSocketPath.suffix, "--timeout", "5s"])
        }
        let deadline = Date().addingTimeInterval(10)
        var left = processes(marked: root)
        while !left.isEmpty, Date() < deadline {
            for pid in left { kill(pid, SIGKILL) }
            usleep(50_000)
            left = processes(marked: root)
        }
        if !left.isEmpty { XCTFail("processes of the example in \(root) survived SIGKILL: \(left)") }
    }

    /// The live processes whose environment has `DIRTYMIG_README_EXAMPLE=root` (zombies have
    /// none left to read, so they do not count).
    private static func processes(marked root: String) -> [pid_t] {
        let marker = Array("\(markerVariable)=\(root)".utf8)
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> pid_t? in
            guard let pid = pid_t(entry), pid != getpid(),
                  let environ = FileManager.default.contents(atPath: "/proc/\(entry)/environ") else { return nil }
            let variables = environ.split(separator: 0, omittingEmptySubsequences: true)
            return variables.contains { Array($0) == marker } ? pid : nil
        }
    }
}
