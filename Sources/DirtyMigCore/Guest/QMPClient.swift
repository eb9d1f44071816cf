import Foundation

/// A minimal client for QEMU's QMP socket, for driving QEMU as a peer (tests, benchmarks): one
/// JSON object per line, asynchronous events skipped.
public final class QMPClient {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    let socket: UnixSocket

    /// Connects (waiting up to `timeout` s for QEMU to create the socket) and negotiates.
    public init(path: String, timeout: Double = 20) throws {
        let deadline = Date().addingTimeInterval(timeout)
        var connected: UnixSocket?
        while connected == nil && Date() < deadline {
            connected = try? UnixSocket.connect(path: path)
            if connected == nil { Thread.sleep(forTimeInterval: 0.05) }
        }
        guard let connected else { throw Failure(description: "QEMU's QMP socket \(path) never appeared") }
        socket = connected
        _ = try socket.readLine(limit: 1 << 20)   // greeting
        _ = try execute("qmp_capabilities")
    }

    /// Runs a command and returns its "return" member; a QMP error is thrown.
    @discardableResult
    public func execute(_ command: String, _ arguments: JSONValue? = nil) throws -> JSONValue {
        var request: [(String, JSONValue)] = [("execute", .string(command))]
        if let arguments { request.append(("arguments", arguments)) }
        try socket.writeLine(JSONValue.object(request).serialized())
        while true {
            guard case .line(let bytes) = try socket.readLine(limit: 1 << 20) else { throw Failure(description: "QEMU closed QMP") }
            let reply = try JSONValue.parse(String(decoding: bytes, as: UTF8.self))
            if reply["event"] != nil { continue }
            if let error = reply["error"] { throw Failure(description: "QMP \(command): \(error.serialized())") }
            return reply["return"] ?? .null
        }
    }
}
