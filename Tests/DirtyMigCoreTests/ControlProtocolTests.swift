import DirtyMigCore
import Foundation
import Synchronization
import XCTest

/// The control protocol end to end: a real server on a Unix socket in a private temporary
/// directory, spoken to by `ControlClient` and by raw connections (for malformed input).
/// Waits are bounded (10 s) only so a bug fails instead of hanging; what is checked is ordering
/// and flags, never how long something took.
final class ControlProtocolTests: XCTestCase {
    private var directory = ""
    private var servers: [ControlServer] = []

    override func setUpWithError() throws {
        var template = Array("/tmp/dmc-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw XCTSkip("cannot create a temporary directory under /tmp") }
        directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    override func tearDown() {
        servers.forEach { $0.stop() }
        servers = []
        try? FileManager.default.removeItem(atPath: directory)
    }

    private var socketPath: String { directory + "/vm.sock" }

    /// A started server with a few test commands.
    private func startServer(path: String? = nil, name: String = "test",
                             configure: (ControlServer) -> Void = { _ in }) throws -> ControlServer {
        let server = ControlServer(path: path ?? socketPath, vmName: name)
        server.register("echo") { arguments throws(ControlError) in arguments }
        server.register("fail") { _ throws(ControlError) in throw ControlError(.invalidArgument, "'x' must be positive") }
        server.register("query-status") { _ throws(ControlError) in ["state": "running"] }
        configure(server)
        try server.start()
        servers.append(server)
        return server
    }

    private static func deadline(_ seconds: Double = 10) -> UInt64 {
        MonotonicClock.nanoseconds() + UInt64(seconds * 1e9)
    }

    /// A connection that sends raw lines and reads raw replies.
    private final class Raw {
        let socket: UnixSocket
        let greeting: String

        init(_ path: String) throws {
            socket = try UnixSocket.connect(path: path)
            guard case .line(let bytes) = try socket.readLine(limit: 1 << 20, deadline: ControlProtocolTests.deadline()) else {
                throw ControlError(.failed, "no greeting")
            }
            greeting = String(decoding: bytes, as: UTF8.self)
        }

        func send(_ text: String) throws { try socket.writeLine(text) }

        func replyLine() throws -> String {
            switch try socket.readLine(limit: 64 << 20, deadline: ControlProtocolTests.deadline()) {
            case .line(let bytes): return String(decoding: bytes, as: UTF8.self)
            case .tooLong: throw ControlError(.failed, "reply too long")
            case .end: throw ControlError(.failed, "connection closed")
            }
        }

        func reply() throws -> JSONValue { try JSONValue.parse(try replyLine()) }

        func exchange(_ text: String) throws -> JSONValue {
            try send(text)
            return try reply()
        }

        deinit { socket.close() }
    }

    /// A value several threads set and read.
    private final class Box<Value: Sendable>: Sendable {
        private let value: Mutex<Value>
        init(_ value: Value) { self.value = Mutex(value) }
        var get: Value { value.withLock { $0 } }
        func set(_ newValue: Value) { value.withLock { $0 = newValue } }
        func modify(_ body: (inout Value) -> Void) { value.withLock { body(&$0) } }
    }

    private func onThread(_ body: @escaping @Sendable () -> Void) {
        Thread { body() }.start()
    }

    private func clientError(_ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line) -> ControlClient.ClientError? {
        do {
            try body()
            XCTFail("no error", file: file, line: line)
        } catch let error as ControlClient.ClientError {
            return error
        } catch {
            XCTFail("unexpected \(error)", file: file, line: line)
        }
        return nil
    }

    private func setupError(_ server: ControlServer, file: StaticString = #filePath, line: UInt = #line) -> ControlServer.SetupError? {
        do {
            try server.start()
            server.stop()
            XCTFail("the server started", file: file, line: line)
        } catch {
            return error
        }
        return nil
    }

    // MARK: The wire

    func testGreeting() throws {
        let server = try startServer(name: "demo-1")
        let raw = try Raw(server.path)
        XCTAssertEqual(raw.greeting, #"{"dirtymig":{"version":"0.1.0","protocol":1},"vm":"demo-1"}"#)
        let client = try ControlClient(path: server.path)
        XCTAssertEqual(client.vmName, "demo-1")
        XCTAssertEqual(client.serverVersion, ControlProtocol.softwareVersion)
    }

    func testRoundTripEchoesTheID() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","arguments":{"a":[1,2.5,"s",null,true]},"id":"x7"}"#).serialized(),
                       #"{"return":{"a":[1,2.5,"s",null,true]},"id":"x7"}"#)
        XCTAssertEqual(try raw.exchange(#"{"execute":"query-status"}"#).serialized(), #"{"return":{"state":"running"}}"#,
                       "no id in the request, none in the reply")
        XCTAssertEqual(try raw.exchange(#"{"id":{"n":[1]},"execute":"query-status"}"#)["id"], ["n": [1]])
        XCTAssertEqual(try raw.exchange(#"{"execute":"fail","id":3}"#).serialized(),
                       #"{"error":{"class":"InvalidArgument","desc":"'x' must be positive"},"id":3}"#)
        // Pipelined requests are answered in order.
        try raw.send(#"{"execute":"echo","arguments":{"n":1}}"# + "\n" + #"{"execute":"echo","arguments":{"n":2}}"#)
        XCTAssertEqual(try raw.reply()["return"]?["n"], 1)
        XCTAssertEqual(try raw.reply()["return"]?["n"], 2)
        // The same through the client.
        let client = try ControlClient(path: server.path)
        XCTAssertEqual(try client.call("echo", arguments: ["x": 1, "y": "z"]), ["x": 1, "y": "z"])
        XCTAssertEqual(try client.call("echo"), [:])
        let error = clientError { _ = try client.call("fail") }
        XCTAssertEqual(error?.controlError, ControlError(.invalidArgument, "'x' must be positive"))
        XCTAssertEqual(error?.description, "'x' must be positive")
    }

    func testMalformedJSONGetsParseErrorAndTheNextLineWorks() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        let reply = try raw.exchange("this is not json")
        XCTAssertEqual(reply["error"]?["class"], "ParseError")
        XCTAssertNil(reply["id"])
        XCTAssertTrue(reply["error"]?["desc"]?.stringValue?.contains("at byte 0") ?? false, "\(reply)")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","id":1"#)["error"]?["class"], "ParseError")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","arguments":{"still":"here"},"id":2}"#).serialized(),
                       #"{"return":{"still":"here"},"id":2}"#)
    }

    func testBadRequests() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        for line in ["[1,2]", #""query-status""#, "42", "null"] {
            let reply = try raw.exchange(line)
            XCTAssertEqual(reply["error"]?["class"], "BadRequest", line)
            XCTAssertNil(reply["id"])
        }
        let missing = try raw.exchange(#"{"arguments":{},"id":5}"#)
        XCTAssertEqual(missing["error"]?["class"], "BadRequest")
        XCTAssertEqual(missing["id"], 5, "the id is echoed once the request is an object")
        XCTAssertTrue(missing["error"]?["desc"]?.stringValue?.contains("no \"execute\"") ?? false, "\(missing)")
        XCTAssertEqual(try raw.exchange(#"{"execute":5}"#)["error"]?["class"], "BadRequest")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","arguments":5}"#)["error"]?["class"], "BadRequest")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","arguments":[]}"#)["error"]?["class"], "BadRequest")
        let unknownMember = try raw.exchange(#"{"execute":"echo","argument":{}}"#)
        XCTAssertEqual(unknownMember["error"]?["class"], "BadRequest")
        XCTAssertTrue(unknownMember["error"]?["desc"]?.stringValue?.contains("\"argument\"") ?? false, "\(unknownMember)")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","id":6}"#).serialized(), #"{"return":{},"id":6}"#)
    }

    func testUnknownCommandSuggestsAndLists() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        let reply = try raw.exchange(#"{"execute":"query-statsu","id":1}"#)
        XCTAssertEqual(reply["error"]?["class"], "UnknownCommand")
        XCTAssertEqual(reply["id"], 1)
        XCTAssertEqual(reply["error"]?["desc"],
                       "unknown command 'query-statsu'; did you mean 'query-status'? Commands: echo, fail, query-status")
        XCTAssertEqual(try raw.exchange(#"{"execute":"frobnicate"}"#)["error"]?["desc"],
                       "unknown command 'frobnicate'; commands: echo, fail, query-status")
        let client = try ControlClient(path: server.path)
        XCTAssertEqual(clientError { _ = try client.call("ehco") }?.controlError?.errorClass, .unknownCommand)
    }

    func testTooLongLineIsDiscardedAndServingContinues() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        let reply = try raw.exchange(String(repeating: "x", count: ControlProtocol.maxLineBytes + 10))
        XCTAssertEqual(reply["error"]?["class"], "ParseError")
        XCTAssertTrue(reply["error"]?["desc"]?.stringValue?.hasPrefix("line too long") ?? false, "\(reply)")
        // Much longer, and sent in pieces: still one error for the whole line.
        let piece = String(repeating: "y", count: 300_000)
        for _ in 0..<10 { try raw.socket.write(Array(piece.utf8)) }
        XCTAssertEqual(try raw.exchange("")["error"]?["class"], "ParseError")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","arguments":{"n":1},"id":1}"#)["return"]?["n"], 1)
        // Exactly at the limit is fine.
        let prefix = #"{"execute":"echo","arguments":{"s":""#, suffix = #""}}"#
        let exact = prefix + String(repeating: "z", count: ControlProtocol.maxLineBytes - prefix.utf8.count - suffix.utf8.count) + suffix
        XCTAssertEqual(exact.utf8.count, ControlProtocol.maxLineBytes)
        XCTAssertEqual(try raw.exchange(exact)["return"]?["s"]?.stringValue?.count, ControlProtocol.maxLineBytes - prefix.utf8.count - suffix.utf8.count)
    }

    func testEmptyLinesAreIgnored() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        try raw.send("\n  \n\t\r\n")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","id":1}"#)["id"], 1, "the first reply is the request's")
        XCTAssertEqual(try raw.exchange(#"{"execute":"echo","id":2}"#)["id"], 2)
    }

    func testALastLineWithoutNewlineIsAnswered() throws {
        let server = try startServer()
        let raw = try Raw(server.path)
        try raw.socket.write(Array(#"{"execute":"echo","id":9}"#.utf8))
        raw.socket.shutdown(.write)
        XCTAssertEqual(try raw.reply()["id"], 9)
    }

    // MARK: Concurrency

    func testOtherClientsAreServedWhileOneCommandBlocks() throws {
        let entered = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        let slowFinished = Box(false)
        let server = try startServer { server in
            server.register("slow") { _ throws(ControlError) in
                entered.signal()
                release.wait()
                slowFinished.set(true)
                return ["slow": true]
            }
            server.register("fast") { arguments throws(ControlError) in
                ["n": arguments["n"] ?? .null, "slow_finished": .bool(slowFinished.get)]
            }
        }
        let slowClient = try ControlClient(path: server.path)
        let slowReply = Box<JSONValue?>(nil)
        let slowDone = DispatchSemaphore(value: 0)
        onThread {
            slowReply.set(try? slowClient.call("slow"))
            slowDone.signal()
        }
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success, "the slow command started")

        // Four more clients, all at once, while the slow command is still blocked.
        let replies = Box<[Int: JSONValue]>([:])
        let group = DispatchGroup()
        for index in 0..<4 {
            group.enter()
            onThread {
                defer { group.leave() }
                guard let client = try? ControlClient(path: server.path),
                      let reply = try? client.call("fast", arguments: ["n": .number(index)]) else { return }
                replies.modify { $0[index] = reply }
            }
        }
        XCTAssertEqual(group.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(replies.get.count, 4)
        for (index, reply) in replies.get {
            XCTAssertEqual(reply["n"], .number(index))
            XCTAssertEqual(reply["slow_finished"], false, "answered while the slow command was blocked")
        }
        XCTAssertNil(slowReply.get, "the slow client is still waiting")

        release.signal()
        XCTAssertEqual(slowDone.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(slowReply.get, ["slow": true])
    }

    func testCallTimeoutLeavesTheConnectionUsable() throws {
        let release = DispatchSemaphore(value: 0)
        let server = try startServer { server in
            server.register("block") { _ throws(ControlError) in
                release.wait()
                return "late"
            }
        }
        let client = try ControlClient(path: server.path)
        let error = clientError { _ = try client.call("block", timeout: 0.1) }
        guard case .timedOut(_, let command, _)? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertEqual(command, "block")
        release.signal()
        // The late reply to "block" arrives first and is skipped.
        XCTAssertEqual(try client.call("echo", arguments: ["after": true]), ["after": true])
    }

    // MARK: Stopping

    func testQuitRepliesBeforeTheOwnerStops() throws {
        let stopRequested = DispatchSemaphore(value: 0)
        let repliedFirst = Box(false)
        let server = try startServer { server in
            server.register("quit") { _, context throws(ControlError) in
                context.afterReply { stopRequested.signal() }
                return ["stopping": true]
            }
        }
        let client = try ControlClient(path: server.path)
        XCTAssertEqual(try client.call("quit"), ["stopping": true])
        repliedFirst.set(true)
        XCTAssertEqual(stopRequested.wait(timeout: .now() + 10), .success)
        XCTAssertTrue(repliedFirst.get)
        server.stop()
        XCTAssertNotEqual(access(server.path, F_OK), 0)
        guard case .disconnected? = clientError({ _ = try client.call("echo") }) else { return XCTFail("still connected") }
    }

    func testStopFromAnAfterReplyAction() throws {
        let server = try startServer { server in
            server.register("quit") { [unowned server] _, context throws(ControlError) in
                context.afterReply { server.stop() }
                return ["stopping": true]
            }
        }
        let client = try ControlClient(path: server.path)
        let other = try ControlClient(path: server.path)
        XCTAssertEqual(try client.call("quit"), ["stopping": true])
        server.stop()   // waits for the stop the action started
        XCTAssertFalse(server.isRunning)
        XCTAssertNotEqual(access(server.path, F_OK), 0)
        guard case .disconnected? = clientError({ _ = try other.call("echo") }) else { return XCTFail("still connected") }
    }

    func testStopEndsALongCommandThatSleepsThroughItsContext() throws {
        let entered = DispatchSemaphore(value: 0)
        let sleptFully = Box<Bool?>(nil)
        let server = try startServer { server in
            server.register("measure") { _, context throws(ControlError) in
                entered.signal()
                let full = context.sleep(seconds: 3600)
                sleptFully.set(full)
                return ["interrupted": .bool(!full)]
            }
        }
        let client = try ControlClient(path: server.path)
        let reply = Box<JSONValue?>(nil)
        let done = DispatchSemaphore(value: 0)
        onThread {
            reply.set(try? client.call("measure"))
            done.signal()
        }
        XCTAssertEqual(entered.wait(timeout: .now() + 10), .success)
        server.stop()   // returns only once the command has returned
        XCTAssertEqual(sleptFully.get, false)
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(reply.get, ["interrupted": true], "the running command's reply is still delivered")
    }

    func testStopUnlinksAndIsIdempotent() throws {
        let server = try startServer()
        let client = try ControlClient(path: server.path)
        XCTAssertTrue(server.isRunning)
        server.stop()
        XCTAssertNotEqual(access(server.path, F_OK), 0, "stop() removes the socket")
        server.stop()
        XCTAssertFalse(server.isRunning)
        guard case .disconnected? = clientError({ _ = try client.call("echo") }) else { return XCTFail("still connected") }
        guard case .stopped? = setupError(server) else { return XCTFail("restarted") }
        // A server never started stops quietly.
        ControlServer(path: directory + "/never.sock", vmName: "never").stop()
    }

    func testStopLeavesASocketThatReplacedOursAlone() throws {
        let server = try startServer()
        unlink(server.path)
        let replacement = try UnixSocket.listen(path: server.path)
        defer { replacement.close() }
        server.stop()
        XCTAssertEqual(access(server.path, F_OK), 0, "not our socket: not removed")
    }

    // MARK: Setting up

    func testSocketAndDirectoryPermissions() throws {
        let path = directory + "/private/vm.sock"
        let server = try startServer(path: path)
        var info = stat()
        XCTAssertEqual(stat(path, &info), 0)
        XCTAssertEqual(info.st_mode & S_IFMT, S_IFSOCK)
        XCTAssertEqual(info.st_mode & 0o777, 0o600)
        XCTAssertEqual(stat(directory + "/private", &info), 0)
        XCTAssertEqual(info.st_mode & 0o777, 0o700, "a missing directory is created private")
        XCTAssertEqual(info.st_uid, geteuid())
        server.stop()
    }

    func testLooseOrForeignDirectoryIsRefused() throws {
        let loose = directory + "/loose"
        XCTAssertEqual(mkdir(loose, 0o755), 0)
        XCTAssertEqual(chmod(loose, 0o755), 0)
        let error = setupError(ControlServer(path: loose + "/vm.sock", vmName: "vm"))
        guard case .unsafeDirectory? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(error?.description.contains("chmod 700 \(loose)") ?? false, "\(String(describing: error))")
        XCTAssertTrue(error?.description.contains("0755") ?? false, "\(String(describing: error))")

        // A shared directory like /tmp: the advice is to go elsewhere, never to close it.
        let shared = directory + "/shared"
        XCTAssertEqual(mkdir(shared, 0o700), 0)
        XCTAssertEqual(chmod(shared, 0o1777), 0)
        let sharedError = setupError(ControlServer(path: shared + "/vm.sock", vmName: "vm"))
        XCTAssertTrue(sharedError?.description.contains("private directory of your own") ?? false, "\(String(describing: sharedError))")
        XCTAssertFalse(sharedError?.description.contains("chmod") ?? true, "\(String(describing: sharedError))")

        XCTAssertEqual(chmod(loose, 0o700), 0)
        if geteuid() == 0 {
            XCTAssertEqual(chown(loose, 65534, 65534), 0)
            let foreign = setupError(ControlServer(path: loose + "/vm.sock", vmName: "vm"))
            XCTAssertTrue(foreign?.description.contains("belongs to uid 65534") ?? false, "\(String(describing: foreign))")
        }

        let link = directory + "/link"
        XCTAssertEqual(symlink(directory, link), 0)
        let linked = setupError(ControlServer(path: link + "/vm.sock", vmName: "vm"))
        XCTAssertTrue(linked?.description.contains("symbolic link") ?? false, "\(String(describing: linked))")

        let file = directory + "/file"
        XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: Data()))
        guard case .unsafeDirectory? = setupError(ControlServer(path: file + "/vm.sock", vmName: "vm")) else {
            return XCTFail("a file as the directory")
        }
    }

    func testStaleSocketIsReused() throws {
        let stale = try UnixSocket.listen(path: socketPath)
        stale.close()   // the file stays, nobody listens: what a crashed VM leaves
        guard case .staleSocket(let name, _)? = clientError({ _ = try ControlClient(path: self.socketPath) }) else {
            return XCTFail("the client did not see a stale socket")
        }
        XCTAssertEqual(name, "vm")
        let server = try startServer()
        XCTAssertEqual(try ControlClient(path: server.path).call("query-status"), ["state": "running"])
    }

    func testSecondServerOnALiveSocketIsRefused() throws {
        let first = try startServer(name: "demo")
        let error = setupError(ControlServer(path: socketPath, vmName: "demo"))
        guard case .alreadyRunning? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(error?.description.hasPrefix("a VM named demo is already running (socket \(socketPath))") ?? false,
                      "\(String(describing: error))")
        XCTAssertEqual(try ControlClient(path: first.path).call("query-status"), ["state": "running"], "the first still serves")
    }

    func testSomethingElseInTheWayIsRefused() throws {
        XCTAssertTrue(FileManager.default.createFile(atPath: socketPath, contents: Data("x".utf8)))
        guard case .notASocket? = setupError(ControlServer(path: socketPath, vmName: "vm")) else { return XCTFail("started") }
        guard case .notDirtymig? = clientError({ _ = try ControlClient(path: self.socketPath) }) else { return XCTFail("connected") }
    }

    func testPathTooLong() throws {
        let path = directory + "/" + String(repeating: "n", count: 120) + ".sock"
        let error = setupError(ControlServer(path: path, vmName: "n"))
        guard case .pathTooLong? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertTrue(error?.description.contains("limited to \(UnixSocket.maxPathBytes)") ?? false)
        XCTAssertEqual(UnixSocket.maxPathBytes, 107)
        guard case .pathTooLong? = clientError({ _ = try ControlClient(path: path) }) else { return XCTFail("connected") }
    }

    // MARK: Client errors

    func testClientErrorOnMissingSocket() throws {
        let error = clientError { _ = try ControlClient(path: self.directory + "/nope.sock") }
        guard case .noSocket(let name, _, _)? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertEqual(name, "nope")
        XCTAssertTrue(error?.description.contains("no VM is listening at \(directory)/nope.sock") ?? false, "\(String(describing: error))")

        // A name in the default directory: the message says how to start it.
        let name2 = "dmc-absent-\(getpid())"
        let byName = clientError { _ = try ControlClient(vm: name2) }
        XCTAssertTrue(byName?.description.hasPrefix(
            "no VM named \(name2) is running (no socket at \(ControlSocketPath.path(forName: name2))); start one with 'dirtymig boot --name \(name2)'") ?? false,
            "\(String(describing: byName))")
        guard case .invalidName? = clientError({ _ = try ControlClient(vm: "bad name") }) else { return XCTFail("bad name accepted") }
    }

    func testVersionMismatch() throws {
        let error = try clientErrorFromFakeServer(greeting: #"{"dirtymig":{"version":"9.9.9","protocol":99},"vm":"old"}"#)
        guard case .protocolMismatch(_, let serverProtocol, let version)? = error else { return XCTFail("\(String(describing: error))") }
        XCTAssertEqual(serverProtocol, 99)
        XCTAssertEqual(version, "9.9.9")
        let text = error?.description ?? ""
        XCTAssertTrue(text.contains("protocol 99") && text.contains("protocol 1;"), text)
    }

    func testNotADirtymigServer() throws {
        let error = try clientErrorFromFakeServer(greeting: "SSH-2.0-OpenSSH_9.6")
        guard case .notDirtymig? = error else { return XCTFail("\(String(describing: error))") }
    }

    func testGreetingTimeout() throws {
        let error = try clientErrorFromFakeServer(greeting: nil, greetingTimeout: 0.1)
        guard case .timedOut(_, nil, _)? = error else { return XCTFail("\(String(describing: error))") }
    }

    /// Starts a one-client fake server that sends `greeting` (or nothing) and keeps the connection
    /// open until the client is done, and returns the client's error.
    private func clientErrorFromFakeServer(greeting: String?, greetingTimeout: Double = 10) throws -> ControlClient.ClientError? {
        let path = directory + "/fake.sock"
        let listener = try UnixSocket.listen(path: path)
        let finished = DispatchSemaphore(value: 0)
        onThread {
            guard let peer = try? listener.accept() else { return }
            if let greeting { try? peer.writeLine(greeting) }
            _ = finished.wait(timeout: .now() + 10)
            peer.close()
        }
        defer {
            finished.signal()
            listener.close()
        }
        return clientError { _ = try ControlClient(path: path, greetingTimeout: greetingTimeout) }
    }

    // MARK: Socket paths

    func testSocketPathResolution() throws {
        XCTAssertEqual(try ControlSocketPath.resolve(vm: nil), ControlSocketPath.path(forName: "vm"))
        XCTAssertEqual(try ControlSocketPath.resolve(vm: "demo"), ControlSocketPath.defaultDirectory() + "/demo.sock")
        XCTAssertEqual(try ControlSocketPath.resolve(vm: "/run/x/y.sock"), "/run/x/y.sock")
        XCTAssertEqual(try ControlSocketPath.resolve(vm: "a.sock"), "a.sock")
        XCTAssertEqual(try ControlSocketPath.resolve(vm: "./vm"), "./vm")
        XCTAssertThrowsError(try ControlSocketPath.resolve(vm: "bad name")) {
            XCTAssertEqual(($0 as? ControlError)?.errorClass, .invalidArgument)
            XCTAssertTrue("\($0)".contains("letters, digits"), "\($0)")
        }
        for good in ["a", "demo-1", "a_b.c", String(repeating: "x", count: 64)] {
            XCTAssertNoThrow(try ControlSocketPath.validate(name: good), good)
        }
        for bad in ["", String(repeating: "x", count: 65), "-x", ".hidden", "a b", "é", "a:b"] {
            XCTAssertThrowsError(try ControlSocketPath.validate(name: bad), bad)
        }
        XCTAssertEqual(ControlSocketPath.name(forPath: "/a/b/demo.sock"), "demo")
        XCTAssertEqual(ControlSocketPath.name(forPath: "relative"), "relative")
        XCTAssertTrue(ControlSocketPath.isDefaultLocation(ControlSocketPath.path(forName: "x")))
        XCTAssertFalse(ControlSocketPath.isDefaultLocation(directory + "/x.sock"))
    }

    func testDefaultDirectory() {
        XCTAssertEqual(ControlSocketPath.defaultDirectory(environment: ["XDG_RUNTIME_DIR": directory]), directory + "/dirtymig")
        XCTAssertEqual(ControlSocketPath.defaultDirectory(environment: ["XDG_RUNTIME_DIR": directory + "/"]), directory + "/dirtymig")
        let fallback = "/tmp/dirtymig-\(getuid())"
        XCTAssertEqual(ControlSocketPath.defaultDirectory(environment: [:]), fallback)
        XCTAssertEqual(ControlSocketPath.defaultDirectory(environment: ["XDG_RUNTIME_DIR": ""]), fallback)
        XCTAssertEqual(ControlSocketPath.defaultDirectory(environment: ["XDG_RUNTIME_DIR": "relative/dir"]), fallback)
        XCTAssertEqual(ControlSocketPath.defaultDirectory(environment: ["XDG_RUNTIME_DIR": directory + "/missing"]), fallback)
    }

    func testListRunning() throws {
        _ = try startServer(path: directory + "/b.sock", name: "b")
        _ = try startServer(path: directory + "/a.sock", name: "a")
        try UnixSocket.listen(path: directory + "/stale.sock").close()
        XCTAssertTrue(FileManager.default.createFile(atPath: directory + "/file.sock", contents: Data()))
        XCTAssertEqual(ControlSocketPath.listRunning(directory: directory), ["a", "b"])
        XCTAssertEqual(ControlSocketPath.listRunning(directory: directory, probe: false), ["a", "b", "stale"])
        XCTAssertEqual(ControlSocketPath.listRunning(directory: directory + "/missing"), [])
    }

    // MARK: Pieces

    func testSuggestions() {
        let names = ["query-status", "query-dirty-counters", "query-dirty-rate", "quit"]
        XCTAssertEqual(ControlProtocol.suggestion(for: "query-statsu", among: names), "query-status")
        XCTAssertEqual(ControlProtocol.suggestion(for: "qeury-status", among: names), "query-status")
        XCTAssertEqual(ControlProtocol.suggestion(for: "QUIT", among: names), "quit")
        XCTAssertEqual(ControlProtocol.suggestion(for: "query-dirty-r", among: names), "query-dirty-rate")
        XCTAssertEqual(ControlProtocol.suggestion(for: "quite", among: names), "quit")
        XCTAssertNil(ControlProtocol.suggestion(for: "frobnicate", among: names))
        XCTAssertNil(ControlProtocol.suggestion(for: "x", among: []))
    }

    func testRequestAndReplyCoding() throws {
        let request = try ControlRequest.decode(Array(#"{"execute":"q","arguments":{"a":1},"id":[1]}"#.utf8))
        XCTAssertEqual(request, ControlRequest(command: "q", arguments: ["a": 1], id: [1]))
        XCTAssertEqual(request.json.serialized(), #"{"execute":"q","arguments":{"a":1},"id":[1]}"#)
        XCTAssertEqual(ControlRequest(command: "q").json.serialized(), #"{"execute":"q"}"#)
        do {
            _ = try ControlRequest.decode(Array(#"{"execute":1,"id":"i"}"#.utf8))
            XCTFail("decoded")
        } catch {
            XCTAssertEqual(error.error.errorClass, .badRequest)
            XCTAssertEqual(error.id, "i")
        }
        let failure = ControlReply.failure(ControlError(.unsupported, "no"), id: 7)
        XCTAssertEqual(failure.json.serialized(), #"{"error":{"class":"Unsupported","desc":"no"},"id":7}"#)
        XCTAssertEqual(ControlReply(json: failure.json), failure)
        XCTAssertEqual(ControlReply(json: ["return": [1]]), .success([1], id: nil))
        XCTAssertNil(ControlReply(json: ["neither": 1]))
        XCTAssertEqual(ControlError(json: ["class": "FromTheFuture", "desc": "d"])?.errorClass, .failed)
        XCTAssertEqual(ControlError.Class.allCases.map(\.rawValue),
                       ["ParseError", "BadRequest", "UnknownCommand", "InvalidArgument", "Unsupported", "Failed"])
    }

    func testArgumentHelpers() throws {
        let arguments: JSONValue = ["interval": 2, "mode": "ring", "count": 2.5, "on": true, "none": nil]
        XCTAssertEqual(try arguments.doubleArgument("interval"), 2)
        XCTAssertEqual(try arguments.stringArgument("mode"), "ring")
        XCTAssertEqual(try arguments.boolArgument("on"), true)
        XCTAssertNil(try arguments.doubleArgument("missing"))
        XCTAssertNil(try arguments.intArgument("none"))
        XCTAssertThrowsError(try arguments.doubleArgument("mode")) {
            XCTAssertEqual($0 as? ControlError, ControlError(.invalidArgument, "'mode' must be a number, not a string"))
        }
        XCTAssertThrowsError(try arguments.intArgument("count"))
        XCTAssertNoThrow(try arguments.checkArguments(allowed: ["interval", "mode", "count", "on", "none"]))
        XCTAssertThrowsError(try arguments.checkArguments(allowed: ["interval"])) {
            XCTAssertEqual(($0 as? ControlError)?.errorClass, .invalidArgument)
        }
    }
}
