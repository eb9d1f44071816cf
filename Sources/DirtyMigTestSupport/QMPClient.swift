import DirtyMigCore
import Foundation

/// A minimal client for QEMU's QMP socket, for driving QEMU as a peer (tests, benchmarks): one
/// JSON object per line. Asynchronous events that arrive while a command waits for its reply are
/// kept for `waitForEvent` (a migration can end between a command and its reply).
public final class QMPClient {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    let socket: UnixSocket
    /// Events read but not yet asked for, oldest first; the oldest are dropped past `maxKeptEvents`.
    private var keptEvents: [JSONValue] = []
    static let maxKeptEvents = 256

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
            if reply["event"] != nil { keep(reply); continue }
            if let error = reply["error"] { throw Failure(description: "QMP \(command): \(error.serialized())") }
            return reply["return"] ?? .null
        }
    }

    /// Waits up to `timeout` seconds for an event named `name` for which `matches` holds (events
    /// that came earlier count; others are dropped as they are passed over). Nil on timeout.
    /// Nothing is sent to QEMU meanwhile: a way to learn that a migration ended without polling.
    public func waitForEvent(_ name: String, timeout: Double, where matches: (JSONValue) -> Bool = { _ in true }) throws -> JSONValue? {
        while !keptEvents.isEmpty {
            let event = keptEvents.removeFirst()
            if event["event"]?.stringValue == name && matches(event) { return event }
        }
        let deadline = MonotonicClock.nanoseconds() + UInt64(max(0, timeout) * 1e9)
        while true {
            let line: UnixSocket.LineResult
            do { line = try socket.readLine(limit: 1 << 20, deadline: deadline) } catch {
                if error.errno == ETIMEDOUT { return nil }
                throw error
            }
            guard case .line(let bytes) = line else { throw Failure(description: "QEMU closed QMP") }
            let message = try JSONValue.parse(String(decoding: bytes, as: UTF8.self))
            if message["event"]?.stringValue == name && matches(message) { return message }
        }
    }

    private func keep(_ event: JSONValue) {
        keptEvents.append(event)
        if keptEvents.count > QMPClient.maxKeptEvents { keptEvents.removeFirst(keptEvents.count - QMPClient.maxKeptEvents) }
    }
}
