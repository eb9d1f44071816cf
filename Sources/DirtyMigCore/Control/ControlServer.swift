import Foundation
import Glibc

/// Serves the control protocol on a Unix socket: mode 0600 in a 0700 directory, one thread per
/// client (commands may block; blocking never touches Swift concurrency's cooperative pool).
public final class ControlServer: @unchecked Sendable {
    // @unchecked: `commands` is filled before start(); `clients` is guarded by `lock`.
    public let path: String
    public let vmName: String
    private var commands: [String: ControlCommand] = [:]
    private var listener: UnixSocket?
    private var acceptThread: OSThread?
    private let lock = NSLock()
    private var clients: [ObjectIdentifier: UnixSocket] = [:]
    private var stopped = false

    public enum SetupError: Error, CustomStringConvertible {
        case alreadyRunning(name: String, path: String)
        case unsafeDirectory(String)
        case system(SystemError)

        public var description: String {
            switch self {
            case .alreadyRunning(let name, let path):
                return "a VM named '\(name)' is already running (its control socket \(path) answers); choose another --name or stop it"
            case .unsafeDirectory(let path):
                return "\(path) is not a private directory (it must be owned by you with mode 0700); remove it or pass --control PATH"
            case .system(let error):
                return "cannot create the control socket: \(error)"
            }
        }
    }

    public init(path: String, vmName: String) {
        self.path = path
        self.vmName = vmName
    }

    /// Registers a command; call before start().
    public func register(_ name: String, _ command: @escaping ControlCommand) {
        commands[name] = command
    }

    public func start() throws(SetupError) {
        let directory = (path as NSString).deletingLastPathComponent
        try ControlServer.preparePrivateDirectory(directory)
        if access(path, F_OK) == 0 {
            if let probe = try? UnixSocket.connect(path: path) {
                probe.fd.close()
                throw .alreadyRunning(name: vmName, path: path)
            }
            unlink(path)   // stale: nobody answers
        }
        do { listener = try UnixSocket.listen(path: path, mode: 0o600) } catch { throw .system(error) }
        acceptThread = OSThread(name: "control-accept") { [self] in acceptLoop() }
    }

    private static func preparePrivateDirectory(_ directory: String) throws(SetupError) {
        var info = stat()
        if stat(directory, &info) != 0 {
            if mkdir(directory, 0o700) != 0 && errno != EEXIST { throw .system(SystemError("mkdir \(directory)")) }
            return
        }
        // Only insist on privacy for directories we would have created ourselves.
        if directory == ControlSocketPath.defaultDirectory()
            && (info.st_uid != getuid() || info.st_mode & 0o077 != 0) {
            throw .unsafeDirectory(directory)
        }
    }

    /// Closes the listener and every client, waits for the accept thread, removes the socket.
    public func stop() {
        lock.lock()
        if stopped { lock.unlock(); return }
        stopped = true
        let open = Array(clients.values)
        lock.unlock()
        listener?.shutdownBoth()
        for client in open { client.shutdownBoth() }
        acceptThread?.join()
        unlink(path)
    }

    private func acceptLoop() {
        while let listener, let client = listener.accept() {
            lock.lock()
            if stopped { lock.unlock(); client.fd.close(); break }
            clients[ObjectIdentifier(client)] = client
            lock.unlock()
            _ = OSThread(name: "control-client") { [self] in serve(client) }
        }
    }

    private func serve(_ client: UnixSocket) {
        defer {
            lock.lock(); clients[ObjectIdentifier(client)] = nil; lock.unlock()
            client.fd.close()
        }
        guard client.writeLine(ControlProtocol.greeting(vmName: vmName).serialized()) else { return }
        while true {
            switch client.readLine(limit: ControlProtocol.maxLineBytes) {
            case .closed:
                return
            case .tooLong:
                client.writeLine(reply(error: ControlError(.parseError, "line too long (limit \(ControlProtocol.maxLineBytes) bytes)"), id: nil))
            case .line(let bytes):
                let text = String(decoding: bytes, as: UTF8.self)
                guard !text.trimmingCharacters(in: .whitespaces).isEmpty else { continue }
                if !client.writeLine(handle(text)) { return }
            }
        }
    }

    /// One request line to one reply line.
    func handle(_ line: String) -> String {
        let request: JSONValue
        do { request = try JSONValue.parse(line) } catch {
            return reply(error: ControlError(.parseError, "not JSON: \(error)"), id: nil)
        }
        guard case .object = request else {
            return reply(error: ControlError(.badRequest, "a request must be a JSON object like {\"execute\": \"query-status\"}"), id: nil)
        }
        let id = request["id"]
        guard let name = request["execute"]?.stringValue else {
            return reply(error: ControlError(.badRequest, "the request has no string \"execute\""), id: id)
        }
        let arguments = request["arguments"] ?? .object([])
        guard case .object = arguments else {
            return reply(error: ControlError(.badRequest, "\"arguments\" must be an object"), id: id)
        }
        guard let command = commands[name] else {
            let names = commands.keys.sorted()
            return reply(error: ControlError(.unknownCommand, "unknown command '\(name)'\(suggestion(name, names)); commands: \(names.joined(separator: ", "))"), id: id)
        }
        do {
            let result = try command(arguments)
            var pairs: [(String, JSONValue)] = [("return", result)]
            if let id { pairs.append(("id", id)) }
            return JSONValue.object(pairs).serialized()
        } catch {
            return reply(error: error, id: id)
        }
    }

    private func reply(error: ControlError, id: JSONValue?) -> String {
        var pairs: [(String, JSONValue)] = [("error", error.json)]
        if let id { pairs.append(("id", id)) }
        return JSONValue.object(pairs).serialized()
    }
}
