import Glibc

/// A connection to a VM's control socket: checks the greeting, then sends commands.
public final class ControlClient: @unchecked Sendable {
    // @unchecked: used by one thread at a time (the CLI).
    private let socket: UnixSocket
    public let vmName: String
    public let path: String

    public enum ClientError: Error, CustomStringConvertible {
        case noVM(path: String, running: [String])
        case permissionDenied(path: String)
        case connect(path: String, SystemError)
        case protocolMismatch(String)
        case closed
        case command(ControlError)

        public var description: String {
            switch self {
            case .noVM(let path, let running):
                let others = running.isEmpty ? "no VM is running" : "running: \(running.joined(separator: ", "))"
                return "no VM is listening at \(path) (\(others)); start one with 'dirtymig boot' (and --name NAME), or pass --vm NAME|PATH"
            case .permissionDenied(let path):
                return "no permission to connect to \(path): it belongs to another user"
            case .connect(let path, let error):
                return "cannot connect to \(path): \(error)"
            case .protocolMismatch(let text):
                return text
            case .closed:
                return "the VM closed the control connection (did it stop?)"
            case .command(let error):
                return "\(error.errorClass.rawValue): \(error.desc)"
            }
        }
    }

    public init(path: String, timeoutSeconds: Double = 0) throws(ClientError) {
        self.path = path
        do {
            socket = try UnixSocket.connect(path: path)
        } catch {
            switch error.errno {
            case ENOENT, ECONNREFUSED: throw .noVM(path: path, running: ControlSocketPath.running())
            case EACCES, EPERM: throw .permissionDenied(path: path)
            default: throw .connect(path: path, error)
            }
        }
        if timeoutSeconds > 0 { socket.setReadTimeout(seconds: timeoutSeconds) }
        guard case .line(let bytes) = socket.readLine(),
              let greeting = try? JSONValue.parse(String(decoding: bytes, as: UTF8.self)),
              let info = greeting["dirtymig"] else {
            throw .protocolMismatch("\(path) did not greet like a dirtymig control socket")
        }
        let version = info["protocol"]?.intValue ?? -1
        guard version == ControlProtocol.version else {
            throw .protocolMismatch("the VM at \(path) speaks control protocol \(version); this dirtymig speaks \(ControlProtocol.version). Use the dirtymig that started it.")
        }
        vmName = greeting["vm"]?.stringValue ?? "?"
    }

    /// Sends a command and returns its `return` value; a server error is thrown as `.command`.
    public func call(_ command: String, arguments: JSONValue = .object([])) throws(ClientError) -> JSONValue {
        let request: JSONValue = ["execute": .string(command), "arguments": arguments]
        guard socket.writeLine(request.serialized()) else { throw .closed }
        guard case .line(let bytes) = socket.readLine(), let reply = try? JSONValue.parse(String(decoding: bytes, as: UTF8.self)) else {
            throw .closed
        }
        if let error = reply["error"] {
            let errorClass = ControlError.Class(rawValue: error["class"]?.stringValue ?? "") ?? .failed
            throw .command(ControlError(errorClass, error["desc"]?.stringValue ?? "unknown error"))
        }
        return reply["return"] ?? .null
    }

    public func close() { socket.fd.close() }
}
