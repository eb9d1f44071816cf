import DirtyMigCore
import Foundation
import XCTest

final class ControlProtocolTests: XCTestCase {
    private var directory = ""

    override func setUp() {
        directory = "/tmp/dmctl-\(getpid())-\(Int.random(in: 0..<1_000_000))"
        mkdir(directory, 0o700)
    }

    override func tearDown() { try? FileManager.default.removeItem(atPath: directory) }

    private func server(blocking gate: DispatchSemaphore? = nil) throws -> ControlServer {
        let server = ControlServer(path: directory + "/vm.sock", vmName: "test")
        server.register("echo") { arguments throws(ControlError) in arguments }
        server.register("fail") { _ throws(ControlError) in throw ControlError(.invalidArgument, "no") }
        server.register("slow") { _ throws(ControlError) in gate?.wait(); return ["slow": true] }
        try server.start()
        return server
    }

    /// A raw connection that sends lines and reads replies, for malformed input.
    private func raw(_ path: String) throws -> UnixSocket {
        let socket = try UnixSocket.connect(path: path)
        guard case .line = socket.readLine() else { throw RuntimeError() }
        return socket
    }
    struct RuntimeError: Error {}

    private func exchange(_ socket: UnixSocket, _ line: String) -> JSONValue? {
        socket.writeLine(line)
        guard case .line(let bytes) = socket.readLine() else { return nil }
        return try? JSONValue.parse(String(decoding: bytes, as: UTF8.self))
    }

    func testGreetingRoundTripAndIdEcho() throws {
        let server = try server()
        defer { server.stop() }
        let client = try ControlClient(path: server.path)
        XCTAssertEqual(client.vmName, "test")
        XCTAssertEqual(try client.call("echo", arguments: ["x": 1]), ["x": 1])
        let socket = try raw(server.path)
        let reply = exchange(socket, #"{"execute":"echo","arguments":{"a":[1,2.5,"s",null,true]},"id":42}"#)
        XCTAssertEqual(reply?["id"], 42)
        XCTAssertEqual(reply?["return"]?["a"], [1, 2.5, "s", nil, true])
    }

    func testMalformedLinesGetErrorsAndTheConnectionSurvives() throws {
        let server = try server()
        defer { server.stop() }
        let socket = try raw(server.path)
        XCTAssertEqual(exchange(socket, "this is not json")?["error"]?["class"], "ParseError")
        XCTAssertEqual(exchange(socket, "[1,2]")?["error"]?["class"], "BadRequest")
        XCTAssertEqual(exchange(socket, #"{"arguments":{}}"#)?["error"]?["class"], "BadRequest")
        XCTAssertEqual(exchange(socket, #"{"execute":"echo","arguments":5}"#)?["error"]?["class"], "BadRequest")
        let unknown = exchange(socket, #"{"execute":"ehco"}"#)
        XCTAssertEqual(unknown?["error"]?["class"], "UnknownCommand")
        XCTAssertTrue(unknown?["error"]?["desc"]?.stringValue?.contains("did you mean 'echo'") ?? false)
        XCTAssertEqual(exchange(socket, #"{"execute":"fail"}"#)?["error"]?["class"], "InvalidArgument")
        XCTAssertEqual(exchange(socket, String(repeating: "x", count: (1 << 20) + 10))?["error"]?["desc"]?.stringValue?.hasPrefix("line too long"), true)
        XCTAssertEqual(exchange(socket, #"{"execute":"echo","arguments":{"still":"here"}}"#)?["return"]?["still"], "here")
    }

    func testSeveralClientsWhileOneBlocks() throws {
        let gate = DispatchSemaphore(value: 0)
        let server = try server(blocking: gate)
        defer { server.stop() }
        let blocked = try raw(server.path)
        blocked.writeLine(#"{"execute":"slow"}"#)
        // While that client waits on its command, four others are served.
        for index in 0..<4 {
            let client = try ControlClient(path: server.path)
            XCTAssertEqual(try client.call("echo", arguments: ["n": .int(Int64(index))])["n"], .int(Int64(index)))
            client.close()
        }
        gate.signal()
        guard case .line(let bytes) = blocked.readLine() else { return XCTFail("no reply") }
        XCTAssertEqual(try JSONValue.parse(String(decoding: bytes, as: UTF8.self))["return"]?["slow"], true)
    }

    func testSocketPermissionsStaleSocketsAndStop() throws {
        let path = directory + "/vm.sock"
        // A stale socket file (nobody listening) is replaced.
        let stale = try UnixSocket.listen(path: path)
        stale.fd.close()
        let server = try server()
        var info = stat()
        XCTAssertEqual(stat(path, &info), 0)
        XCTAssertEqual(info.st_mode & 0o777, 0o600)
        // A second server on a live socket is refused.
        let second = ControlServer(path: path, vmName: "test")
        XCTAssertThrowsError(try second.start()) { XCTAssertTrue("\($0)".contains("already running")) }
        server.stop()
        XCTAssertNotEqual(access(path, F_OK), 0, "stop() removes the socket")
    }

    func testClientErrors() throws {
        XCTAssertThrowsError(try ControlClient(path: directory + "/nobody.sock")) {
            XCTAssertTrue("\($0)".contains("no VM is listening"))
        }
        // A server that speaks another protocol version.
        let listener = try UnixSocket.listen(path: directory + "/old.sock")
        DispatchQueue.global().async {
            if let peer = listener.accept() {
                peer.writeLine(#"{"dirtymig":{"version":"9.0","protocol":99},"vm":"x"}"#)
                Thread.sleep(forTimeInterval: 0.2)
            }
        }
        XCTAssertThrowsError(try ControlClient(path: directory + "/old.sock")) {
            XCTAssertTrue("\($0)".contains("protocol 99"), "\($0)")
        }
    }

    func testJSON() throws {
        let text = #"{"a": 1, "b": [true, false, null], "c": "\u00e9\n\"", "d": -2.5e3, "big": 9007199254740993}"#
        let value = try JSONValue.parse(text)
        XCTAssertEqual(value["big"]?.intValue, 9_007_199_254_740_993)
        XCTAssertEqual(value["d"]?.doubleValue, -2500)
        XCTAssertEqual(value["c"]?.stringValue, "é\n\"")
        XCTAssertEqual(try JSONValue.parse(value.serialized()), value)
        XCTAssertEqual(JSONValue.double(1795390000.123).serialized(), "1795390000.123")
        XCTAssertEqual(JSONValue.object([("z", 1), ("a", 2)]).serialized(), #"{"z": 1, "a": 2}"#, "key order kept")
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "tru", "\"\\x\"", "1 2", String(repeating: "[", count: 100)] {
            XCTAssertThrowsError(try JSONValue.parse(bad), bad)
        }
    }
}
