import Glibc
import Synchronization

/// A connection to a VM's control socket (see `ControlProtocol`): checks the greeting, then sends
/// commands one at a time and returns their results.
///
///     let client = try ControlClient(path: try ControlSocketPath.resolve(vm: vmOption))
///     let status = try client.call("query-status")
///     let rate = try client.call("query-dirty-rate", arguments: ["interval": 5.0], timeout: 15)
///
/// Every request carries an `id`; a reply with another id (the late answer to a call that timed
/// out) is skipped, so the connection stays usable after a timeout.
public final class ControlClient: Sendable {
    public let path: String
    /// The VM's name, from its greeting.
    public let vmName: String
    /// The dirtymig version that runs the VM, from its greeting.
    public let serverVersion: String
    /// The whole greeting object.
    public let greeting: JSONValue
    /// How long `call` waits for a reply when it is not given a timeout (nil: no limit).
    public let callTimeout: Double?

    private let socket: UnixSocket
    private let calls = Mutex(CallState())

    private struct CallState {
        var nextID: Int64 = 1
        var closed = false
    }

    /// The longest reply line accepted.
    public static let maxReplyBytes = 64 << 20

    /// Why talking to a VM failed; each description says what happened and what to do.
    public enum ClientError: Error, Sendable, CustomStringConvertible {
        /// A `--vm` value that is neither a path nor a valid name.
        case invalidName(ControlError)
        case pathTooLong(path: String, bytes: Int)
        /// No socket file: no VM by that name.
        case noSocket(name: String, path: String, running: [String])
        case permissionDenied(path: String)
        /// A socket file nobody listens on: a VM that exited without cleaning up.
        case staleSocket(name: String, path: String)
        /// Something answers, but not with a dirtymig greeting (or the file is not a socket).
        case notDirtymig(path: String, detail: String)
        /// The VM speaks another version of the control protocol.
        case protocolMismatch(path: String, serverProtocol: Int64, serverVersion: String)
        /// No greeting (command nil) or no reply within the time allowed.
        case timedOut(path: String, command: String?, seconds: Double)
        /// The VM closed the connection (it stopped).
        case disconnected(path: String)
        /// The VM sent something that is not a reply.
        case badReply(path: String, detail: String)
        /// The command ran and failed; `errorClass` and `desc` are the VM's.
        case command(ControlError)
        case system(SystemError)

        public var description: String {
            switch self {
            case .invalidName(let error):
                return error.desc
            case .pathTooLong(let path, let bytes):
                return "the control socket path \(path) is \(bytes) bytes, but Unix socket paths are limited to \(UnixSocket.maxPathBytes)"
            case .noSocket(let name, let path, let running):
                var text: String
                if ControlSocketPath.isDefaultLocation(path) {
                    let boot = name == ControlSocketPath.defaultName ? "dirtymig boot" : "dirtymig boot --name \(name)"
                    text = "no VM named \(name) is running (no socket at \(path)); start one with '\(boot)'"
                } else {
                    text = "no VM is listening at \(path) (no such socket); start one with 'dirtymig boot --control \(path)'"
                }
                if !running.isEmpty { text += "; running: \(running.joined(separator: ", "))" }
                return text
            case .permissionDenied(let path):
                return "permission denied connecting to \(path): the VM belongs to another user; run dirtymig as that user"
            case .staleSocket(let name, let path):
                return "no VM named \(name) is running: \(path) is a stale socket left by a VM that exited without cleaning up (the next VM with that name replaces it, or delete it)"
            case .notDirtymig(let path, let detail):
                return "\(path) is not a dirtymig control socket: \(detail)"
            case .protocolMismatch(let path, let serverProtocol, let serverVersion):
                return "the VM at \(path) speaks control protocol \(serverProtocol) (dirtymig \(serverVersion)), but this dirtymig (\(ControlProtocol.softwareVersion)) speaks protocol \(ControlProtocol.version); use the dirtymig that started the VM"
            case .timedOut(let path, let command, let seconds):
                if let command {
                    return "the VM at \(path) did not answer '\(command)' within \(ControlClient.format(seconds)) s"
                }
                return "the VM at \(path) did not greet within \(ControlClient.format(seconds)) s (is the process stopped?)"
            case .disconnected(let path):
                return "the VM at \(path) closed the control connection (did it stop?)"
            case .badReply(let path, let detail):
                return "the VM at \(path) sent a reply this dirtymig cannot read: \(detail)"
            case .command(let error):
                return error.desc
            case .system(let error):
                return "control connection: \(error)"
            }
        }

        /// The VM's error, when the command itself failed.
        public var controlError: ControlError? {
            if case .command(let error) = self { return error }
            return nil
        }
    }

    /// Connects to the socket at `path` and reads the greeting, waiting at most `greetingTimeout`
    /// seconds for it. `callTimeout` is the default limit for `call` (nil: wait as long as the
    /// command takes).
    public init(path: String, greetingTimeout: Double = 10, callTimeout: Double? = nil) throws(ClientError) {
        self.path = path
        self.callTimeout = callTimeout
        let bytes = path.utf8.count
        guard bytes <= UnixSocket.maxPathBytes else { throw .pathTooLong(path: path, bytes: bytes) }
        let name = ControlSocketPath.name(forPath: path)
        do {
            socket = try UnixSocket.connect(path: path)
        } catch {
            switch error.errno {
            case ENOENT, ENOTDIR:
                let running = ControlSocketPath.isDefaultLocation(path) ? ControlSocketPath.listRunning() : []
                throw .noSocket(name: name, path: path, running: running)
            case EACCES, EPERM:
                throw .permissionDenied(path: path)
            case ECONNREFUSED:
                var info = stat()
                if lstat(path, &info) == 0 && info.st_mode & S_IFMT != S_IFSOCK {
                    throw .notDirtymig(path: path, detail: "it is not a socket")
                }
                throw .staleSocket(name: name, path: path)
            case ENAMETOOLONG:
                throw .pathTooLong(path: path, bytes: bytes)
            default:
                throw .system(error)
            }
        }

        let deadline = ControlClient.deadline(after: greetingTimeout)
        let line: UnixSocket.LineResult
        do { line = try socket.readLine(limit: ControlClient.maxReplyBytes, deadline: deadline) } catch {
            socket.close()
            if error.errno == ETIMEDOUT { throw .timedOut(path: path, command: nil, seconds: greetingTimeout) }
            throw .system(error)
        }
        guard case .line(let bytes) = line else {
            socket.close()
            if line == .end { throw .disconnected(path: path) }
            throw .notDirtymig(path: path, detail: "its first line is over \(ControlClient.maxReplyBytes) bytes")
        }
        guard let greeting = try? JSONValue.parse(bytes: bytes), let info = greeting["dirtymig"] else {
            socket.close()
            let text = String(decoding: bytes.prefix(80), as: UTF8.self)
            throw .notDirtymig(path: path, detail: "it greeted with \(JSONValue.string(text)) instead of {\"dirtymig\":{...}}")
        }
        let version = info["version"]?.stringValue ?? "unknown version"
        guard let serverProtocol = info["protocol"]?.int64Value else {
            socket.close()
            throw .notDirtymig(path: path, detail: "its greeting has no protocol version")
        }
        guard serverProtocol == ControlProtocol.version else {
            socket.close()
            throw .protocolMismatch(path: path, serverProtocol: serverProtocol, serverVersion: version)
        }
        self.greeting = greeting
        self.serverVersion = version
        self.vmName = greeting["vm"]?.stringValue ?? name
    }

    /// Connects to the VM a `--vm NAME|PATH` value names (nil: the default VM).
    public convenience init(vm: String?, greetingTimeout: Double = 10, callTimeout: Double? = nil) throws(ClientError) {
        let path: String
        do { path = try ControlSocketPath.resolve(vm: vm) } catch { throw .invalidName(error) }
        try self.init(path: path, greetingTimeout: greetingTimeout, callTimeout: callTimeout)
    }

    /// Runs `command` and returns its `return` value. A reply with an `error` throws `.command`
    /// (with the VM's class and desc). `timeout` overrides `callTimeout` for this call;
    /// `.infinity` waits without limit. Calls from several threads take turns.
    public func call(_ command: String, arguments: JSONValue = .object([]), timeout: Double? = nil) throws(ClientError) -> JSONValue {
        let reply = try exchange(ControlRequest(command: command, arguments: arguments), timeout: timeout)
        switch reply {
        case .success(let value, _): return value
        case .failure(let error, _): throw .command(error)
        }
    }

    /// Sends a request (its `id` is replaced by the client's own) and returns the reply as it came.
    public func exchange(_ request: ControlRequest, timeout: Double? = nil) throws(ClientError) -> ControlReply {
        let limit = timeout ?? callTimeout
        return try calls.withLock { (state: inout CallState) throws(ClientError) -> ControlReply in
            guard !state.closed else { throw .disconnected(path: path) }
            let id = state.nextID
            state.nextID += 1
            var request = request
            request.id = .int(id)
            do throws(SystemError) { try socket.writeLine(request.json.serialized()) } catch {
                if error.errno == EPIPE || error.errno == ECONNRESET { throw .disconnected(path: path) }
                throw .system(error)
            }
            let deadline = limit.flatMap(ControlClient.deadline(after:))
            while true {
                let line: UnixSocket.LineResult
                do throws(SystemError) { line = try socket.readLine(limit: ControlClient.maxReplyBytes, deadline: deadline) } catch {
                    if error.errno == ETIMEDOUT { throw .timedOut(path: path, command: request.command, seconds: limit ?? 0) }
                    throw .system(error)
                }
                switch line {
                case .end:
                    throw .disconnected(path: path)
                case .tooLong:
                    throw .badReply(path: path, detail: "a reply longer than \(ControlClient.maxReplyBytes) bytes")
                case .line(let bytes):
                    if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
                    let json: JSONValue
                    do { json = try JSONValue.parse(bytes: bytes) } catch {
                        throw .badReply(path: path, detail: "not JSON (\(error))")
                    }
                    guard let reply = ControlReply(json: json) else {
                        throw .badReply(path: path, detail: "neither \"return\" nor \"error\" in \(json.serialized().prefix(200))")
                    }
                    // An older call's late reply (it timed out): skip it.
                    if let replyID = reply.id, replyID != .int(id) { continue }
                    return reply
                }
            }
        }
    }

    /// Closes the connection. A call blocked in another thread ends with `.disconnected`.
    public func close() {
        socket.shutdown(.both)
        calls.withLock { state in
            guard !state.closed else { return }
            state.closed = true
            socket.close()
        }
    }

    /// A deadline `seconds` from now; nil for no limit (infinite, NaN or not positive).
    static func deadline(after seconds: Double) -> UInt64? {
        guard seconds.isFinite, seconds > 0 else { return nil }
        return MonotonicClock.nanoseconds() + UInt64(min(seconds, 1e9) * 1e9)
    }

    public static func format(_ seconds: Double) -> String {
        seconds == seconds.rounded() ? String(Int(seconds)) : String((seconds * 1000).rounded() / 1000)
    }
}
