import DirtyMigCore
import Foundation
import XCTest

/// Runs the built `dirtymig` binary as a user would.
enum CLI {
    static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// The `dirtymig` built with these tests: next to the test executable (Linux runs the
    /// .xctest bundle as a program from the build's products directory), or else in the
    /// package's release or debug products.
    static var binary: URL {
        var candidates: [URL] = []
        if let executable = Bundle.main.executableURL {
            candidates.append(executable.resolvingSymlinksInPath().deletingLastPathComponent().appendingPathComponent("dirtymig"))
        }
        if let bundle = Bundle.allBundles.map(\.bundleURL).first(where: { $0.pathExtension == "xctest" }) {
            candidates.append(bundle.deletingLastPathComponent().appendingPathComponent("dirtymig"))
        }
        candidates += ["release", "debug"].map { packageRoot.appendingPathComponent(".build/\($0)/dirtymig") }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0.path) } ?? candidates.last!
    }

    /// `dirtymig-bench`, built next to `dirtymig`.
    static var benchmarkBinary: URL { binary.deletingLastPathComponent().appendingPathComponent("dirtymig-bench") }

    struct Result { var status: Int32; var stdout: String; var stderr: String }

    @discardableResult
    static func run(_ arguments: [String], environment: [String: String]? = nil, program: URL? = nil) throws -> Result {
        let process = Process()
        process.executableURL = program ?? binary
        process.arguments = arguments
        if let environment { process.environment = environment }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Result(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                      stderr: String(decoding: stderr, as: UTF8.self))
    }

    /// Starts a long-running command; returns the process and a reader for its first stdout line.
    static func start(_ arguments: [String]) throws -> (Process, FileHandle) {
        let process = Process()
        process.executableURL = binary
        process.arguments = arguments
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.standardError
        try process.run()
        return (process, out.fileHandleForReading)
    }

    static func readLine(_ handle: FileHandle, timeout: Double = 30) -> String? {
        var data = Data()
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let byte = handle.readData(ofLength: 1)
            if byte.isEmpty { return data.isEmpty ? nil : String(decoding: data, as: UTF8.self) }
            if byte.first == 0x0A { return String(decoding: data, as: UTF8.self) }
            data.append(byte)
        }
        return nil
    }
}

/// Checks, through its control socket, that a VM's `vcpus` vCPUs all make progress over 0.5 s.
func assertGuestRuns(socket path: String, vcpus: Int, file: StaticString = #filePath, line: UInt = #line) throws {
    func pages() throws -> [Double] {
        let client = try ControlClient(path: path)
        defer { client.close() }
        return (try client.call("query-status")["vcpu_stats"]?.arrayValue ?? []).map { $0["pages"]?.doubleValue ?? 0 }
    }
    let before = try pages()
    Thread.sleep(forTimeInterval: 0.5)
    let after = try pages()
    XCTAssertEqual(before.count, vcpus, file: file, line: line)
    for index in before.indices where index < after.count {
        XCTAssertGreaterThan(after[index], before[index], "\(path) vCPU \(index) keeps running", file: file, line: line)
    }
}

/// A new directory only this user can enter (mkdtemp makes it 0700), for control sockets and
/// files a test leaves behind (a SIGKILLed VM leaves its socket).
func privateTemporaryDirectory(_ prefix: String) throws -> String {
    var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
    guard mkdtemp(&template) != nil else { throw XCTSkip("cannot create a temporary directory under /tmp") }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// Tests that boot VMs through the command line call this first: where /dev/kvm is missing it
/// skips the test and prints why.
func requireKVMDevice() throws {
    guard access("/dev/kvm", R_OK | W_OK) == 0 else {
        let reason = "skipped: needs a working /dev/kvm (open it read-write)"
        FileHandle.standardError.write(Data((reason + "\n").utf8))
        throw XCTSkip(reason)
    }
}

/// A test case whose commands run as real processes, with their sockets and files in a private
/// temporary directory (/tmp/PREFIX-XXXXXX): at the end, processes still running are killed and
/// the directory is removed. Skipped where /dev/kvm is missing.
class ProcessTestCase: XCTestCase {
    var directory = ""
    var processes: [Process] = []
    class var directoryPrefix: String { "dmp" }

    override func setUpWithError() throws {
        try requireKVMDevice()
        directory = try privateTemporaryDirectory(Self.directoryPrefix)
    }

    override func tearDown() {
        for process in processes where process.isRunning { kill(process.processIdentifier, SIGKILL) }
        for process in processes { process.waitUntilExit() }
        try? FileManager.default.removeItem(atPath: directory)
    }

    func socket(_ name: String) -> String { directory + "/" + name + ".sock" }

    /// Whether `condition` holds within `seconds` (checked every 20 ms).
    func waitUntil(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if condition() { return true }
            usleep(20_000)
        }
        return condition()
    }

    /// A loopback port free now, below the kernel's range of ephemeral ports where it can: a port
    /// the kernel hands out for a listener it may hand out again, before the test's receiver
    /// binds it, as the local port of another connection (CI once saw a receiver refused with
    /// "the port is in use" that way). Ports below the range are never handed out.
    func freePort() throws -> UInt16 {
        let range = (try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8))?
            .split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }).compactMap { Int($0) }
        if let low = range?.first, low > 12_000 {
            for _ in 0..<100 {
                let port = UInt16(Int.random(in: 10_000..<low))
                if let listener = try? TCPSocket.listen(HostPort(host: "127.0.0.1", port: port)) { return listener.localPort }
            }
        }
        return try TCPSocket.listen(HostPort(host: "127.0.0.1", port: 0)).localPort
    }

    /// Starts a command; its stderr is collected in the returned buffer (and stdout's first line
    /// is read by the caller). `prefix` runs it under a shell command (ulimit, env ...).
    func start(_ arguments: [String], prefix: [String] = []) throws -> (Process, FileHandle, Pipe) {
        let process = Process()
        if prefix.isEmpty {
            process.executableURL = CLI.binary
            process.arguments = arguments
        } else {
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", prefix.joined(separator: " ") + " \"$0\" \"$@\"", CLI.binary.path] + arguments
        }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        processes.append(process)
        return (process, out.fileHandleForReading, err)
    }

    /// A key file as the README makes one: 32 random bytes in hex, mode 0600 (or `mode`).
    func makePSKFile(_ name: String, mode: Int = 0o600) throws -> String {
        var bytes = [UInt8](repeating: 0, count: 32)
        let random = open("/dev/urandom", O_RDONLY)
        XCTAssertEqual(read(random, &bytes, 32), 32)
        close(random)
        let file = directory + "/" + name
        _ = FileManager.default.createFile(atPath: file, contents: Data((bytes.map { String(format: "%02x", $0) }.joined() + "\n").utf8),
                                       attributes: [.posixPermissions: mode])
        return file
    }

    /// A CA and certificates signed by it, made with the `openssl` command (skips without it):
    /// `dest` for localhost and 127.0.0.1, `source` for the name "source", and `rogue` (for
    /// localhost too) from another CA, which also is the only CA `rogue` trusts.
    func makeCertificates() throws {
        guard let openssl = ["/usr/bin/openssl", "/usr/local/bin/openssl"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            let reason = "skipped: needs the openssl command to make test certificates"
            FileHandle.standardError.write(Data((reason + "\n").utf8))
            throw XCTSkip(reason)
        }
        func run(_ arguments: [String]) throws {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: openssl)
            process.arguments = arguments
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            XCTAssertEqual(process.terminationStatus, 0, "openssl \(arguments.joined(separator: " "))")
        }
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for ca in ["ca", "otherca"] {
            try run(["req", "-x509"] + curve + ["-keyout", certificatePath("\(ca).key"), "-out", certificatePath("\(ca).pem"), "-days", "2", "-subj", "/CN=\(ca)"])
        }
        for (name, ca, names) in [("dest", "ca", "DNS:localhost,IP:127.0.0.1"), ("source", "ca", "DNS:source"),
                                  ("rogue", "otherca", "DNS:localhost,IP:127.0.0.1")] {
            let dir = certificatePath(name)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try run(["req"] + curve + ["-keyout", dir + "/key.pem", "-out", dir + "/req.csr", "-subj", "/CN=\(name)"])
            try Data("subjectAltName=\(names)\n".utf8).write(to: URL(fileURLWithPath: dir + "/ext"))
            try run(["x509", "-req", "-in", dir + "/req.csr", "-CA", certificatePath("\(ca).pem"), "-CAkey", certificatePath("\(ca).key"),
                     "-CAcreateserial", "-out", dir + "/cert.pem", "-days", "2", "-extfile", dir + "/ext"])
            try FileManager.default.copyItem(atPath: certificatePath("\(ca).pem"), toPath: dir + "/ca.pem")
            XCTAssertEqual(chmod(dir + "/key.pem", 0o600), 0)
        }
    }

    /// A file in the test's directory (certificates: certificatePath("dest") is a --tls-dir).
    func certificatePath(_ name: String) -> String { directory + "/" + name }

    /// What a process wrote to stderr so far (non-blocking).
    func stderrText(_ pipe: Pipe) -> String {
        let handle = pipe.fileHandleForReading
        let flags = fcntl(handle.fileDescriptor, F_GETFL)
        _ = fcntl(handle.fileDescriptor, F_SETFL, flags | O_NONBLOCK)
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let count = read(handle.fileDescriptor, &buffer, buffer.count)
            if count <= 0 { break }
            data.append(contentsOf: buffer[0..<count])
        }
        return String(decoding: data, as: UTF8.self)
    }
}

/// Waits until vCPU 0 of the VM behind `path` has written `pages` pages (at most 10 s). A test
/// that must catch a migration mid-pass waits for this first: a migration started before the
/// guest wrote anything has tiny first passes and can converge before the test acts.
func waitForWrites(_ path: String, pages: Double, file: StaticString = #filePath, line: UInt = #line) throws {
    let client = try ControlClient(path: path)
    defer { client.close() }
    let deadline = Date().addingTimeInterval(10)
    while Date() < deadline {
        if (try client.call("query-status")["vcpu_stats"]?[0]?["writes"]?.doubleValue ?? 0) >= pages { return }
        usleep(20_000)
    }
    XCTFail("vCPU 0 of \(path) did not write \(Int(pages)) pages within 10 s", file: file, line: line)
}

/// Starts `dirtymig migrate --vm SOCKET --to 127.0.0.1:PORT` at 5 MiB/s (seconds for the tens of
/// MiB a test guest has written), SIGKILLs the source VM's process 1.5 s in, and returns
/// migrate's exit status once it has ended. Waits first until the guest wrote 10 MiB, so that
/// the first pass alone outlasts the 1.5 s.
func migrateKillingTheSource(_ source: Process, socket: String, port: UInt16) throws -> Int32 {
    try waitForWrites(socket, pages: 2560)
    let migrate = Process()
    migrate.executableURL = CLI.binary
    migrate.arguments = ["migrate", "--vm", socket, "--to", "127.0.0.1:\(port)", "--bandwidth", "5M"]
    migrate.standardOutput = Pipe()
    migrate.standardError = Pipe()
    try migrate.run()
    Thread.sleep(forTimeInterval: 1.5)
    kill(source.processIdentifier, SIGKILL)
    migrate.waitUntilExit()
    return migrate.terminationStatus
}
