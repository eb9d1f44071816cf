import Dispatch
import Glibc
import Synchronization

/// Serves the control protocol (see `ControlProtocol`) on a Unix socket.
///
///     let server = ControlServer(path: ControlSocketPath.path(forName: name), vmName: name)
///     server.register("query-status") { arguments throws(ControlError) in ... }
///     server.register("quit") { _, context throws(ControlError) in
///         context.afterReply { owner.requestStop() }   // runs once the reply is on the wire
///         return ["stopping": true]
///     }
///     try server.start()     // directory, stale-socket check, bind, chmod 0600, listen, accept thread
///     ...
///     server.stop()          // before tearing down what the handlers use
///
/// Threads: one accept thread, and one thread per client (`OSThread`, never Swift concurrency's
/// cooperative pool), so a command that blocks (a rate measurement sleeping for its interval)
/// holds up only its own client.
public final class ControlServer: Sendable {
    public let path: String
    public let vmName: String

    private let state = Mutex(State())
    private let stopFlag = StopFlag()
    /// Signalled once the first `stop()` has finished, for callers that arrive meanwhile.
    private let stopFinished = DispatchSemaphore(value: 0)
    /// Signalled by `serve()`: the accept thread waits for it when started with serving: false.
    private let servingGate = DispatchSemaphore(value: 0)

    private enum Phase { case idle, listening, stopping, stopped }

    private struct State {
        var phase = Phase.idle
        var commands: [String: ControlContextCommand] = [:]
        var listener: UnixSocket?
        var socketFile: FileIdentity?
        var acceptThread: OSThread?
        /// Whether the accept thread may take clients yet (see `start(serving:)`).
        var serving = false
        var clients: [Int: Client] = [:]
        var nextClientID = 1
    }

    private struct Client {
        let socket: UnixSocket
        var thread: OSThread?
    }

    /// Why the server could not start; each description says what to do.
    public enum SetupError: Error, Sendable, CustomStringConvertible {
        /// Something answers on the socket already.
        case alreadyRunning(name: String, path: String)
        /// The path does not fit in `sockaddr_un`.
        case pathTooLong(path: String, bytes: Int)
        /// The socket's directory is not private to this user.
        case unsafeDirectory(path: String, problem: String)
        /// Something other than a socket is in the way.
        case notASocket(path: String)
        /// `start()` after `stop()`.
        case stopped
        case system(SystemError)

        public var description: String {
            switch self {
            case .alreadyRunning(let name, let path):
                return "a VM named \(name) is already running (socket \(path)); choose another name, or stop that VM first"
            case .pathTooLong(let path, let bytes):
                return "the control socket path \(path) is \(bytes) bytes, but Unix socket paths are limited to \(UnixSocket.maxPathBytes); use a shorter name or path"
            case .unsafeDirectory(_, let problem):
                return problem
            case .notASocket(let path):
                return "\(path) exists and is not a socket; remove it or choose another name or path"
            case .stopped:
                return "this control server was stopped; make a new one"
            case .system(let error):
                return "cannot create the control socket: \(error)"
            }
        }
    }

    /// Nothing happens on disk until `start()`.
    public init(path: String, vmName: String) {
        self.path = path
        self.vmName = vmName
    }

    // MARK: Commands

    /// Registers (or replaces) a command. May be called before or after `start()`.
    public func register(_ name: String, _ command: @escaping ControlCommand) {
        register(name) { (arguments: JSONValue, _: ControlContext) throws(ControlError) -> JSONValue in
            try command(arguments)
        }
    }

    /// Registers (or replaces) a command whose handler also gets its `ControlContext`.
    public func register(_ name: String, _ command: @escaping ControlContextCommand) {
        state.withLock { $0.commands[name] = command }
    }

    /// Removes a command (a client that names it is told it is unknown).
    public func unregister(_ name: String) {
        state.withLock { _ = $0.commands.removeValue(forKey: name) }
    }

    /// The registered commands, sorted.
    public var commandNames: [String] { state.withLock { $0.commands.keys.sorted() } }

    /// How many clients are connected now.
    public var clientCount: Int { state.withLock { $0.clients.count } }

    /// Whether the server is accepting clients.
    public var isRunning: Bool { state.withLock { $0.phase == .listening } }

    // MARK: Starting

    /// Prepares the directory (created with mode 0700 if missing; refused if it is another user's
    /// or has group/other permissions), replaces a stale socket (one nobody answers on), refuses a
    /// live one, binds with mode 0600, listens, and starts the accept thread. A second call while
    /// running does nothing.
    ///
    /// `serving: false` claims the name and listens, but accepts no client until `serve()`:
    /// a VM's commands are registered only once the VM exists, and a script that connected
    /// as soon as the socket appeared got "unknown command" for its first query. Clients that
    /// connect meanwhile wait in the backlog and are greeted once every command is there.
    public func start(serving: Bool = true) throws(SetupError) {
        try state.withLock { (state: inout State) throws(SetupError) in
            switch state.phase {
            case .listening: return
            case .stopping, .stopped: throw .stopped
            case .idle: break
            }
            let (listener, identity) = try ControlServer.bind(path: path, vmName: vmName)
            state.listener = listener
            state.socketFile = identity
            state.phase = .listening
            state.serving = serving
            if serving { servingGate.signal() }
            state.acceptThread = OSThread(name: "ctl-accept") { [self] in
                servingGate.wait()
                acceptLoop(listener)
            }
        }
    }

    /// Lets the accept thread take clients (after `start(serving: false)` and the commands'
    /// registration). Idempotent.
    public func serve() {
        let open = state.withLock { state -> Bool in
            defer { state.serving = true }
            return !state.serving
        }
        if open { servingGate.signal() }
    }

    private static func bind(path: String, vmName: String) throws(SetupError) -> (UnixSocket, FileIdentity) {
        let bytes = path.utf8.count
        guard bytes <= UnixSocket.maxPathBytes else { throw .pathTooLong(path: path, bytes: bytes) }
        guard bytes > 0 else { throw .system(SystemError("empty control socket path", errno: ENOENT)) }
        let socketDirectory = directory(of: path)
        try preparePrivateDirectory(socketDirectory,
                                    isDefault: socketDirectory == ControlSocketPath.defaultDirectory())

        var info = stat()
        if lstat(path, &info) == 0 {
            guard info.st_mode & S_IFMT == S_IFSOCK else { throw .notASocket(path: path) }
            let probe: Result<UnixSocket, SystemError>
            do { probe = .success(try UnixSocket.connect(path: path)) } catch { probe = .failure(error) }
            switch probe {
            case .success(let socket):
                socket.close()
                throw .alreadyRunning(name: vmName, path: path)
            case .failure(let error) where error.errno == ECONNREFUSED:
                // Stale: left by a VM that did not clean up. Nobody listens; take the name over.
                if unlink(path) != 0 && errno != ENOENT { throw .system(SystemError("unlink stale socket \(path)")) }
            case .failure(let error):
                throw .system(error)
            }
        }

        let listener: UnixSocket
        do { listener = try UnixSocket.listen(path: path, mode: 0o600) } catch {
            // Another server bound the path between our check and our bind.
            if error.errno == EADDRINUSE { throw .alreadyRunning(name: vmName, path: path) }
            throw .system(error)
        }
        guard let identity = FileIdentity(path: path) else {
            throw .system(SystemError("stat \(path)"))
        }
        return (listener, identity)
    }

    /// The directory part of a path ("." for a bare file name).
    public static func directory(of path: String) -> String {
        guard let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")) else { return "." }
        let directory = String(path[..<slash])
        return directory.isEmpty ? "/" : directory
    }

    /// Creates `directory` with mode 0700 if it is missing; refuses one that is not a directory,
    /// belongs to another user, or grants group/other any permission.
    /// The socket's directory must be a real directory, ours, and closed to other users (the
    /// socket is 0600 too, but a loose directory lets others replace it). The advice differs:
    /// the default directory is dirtymig's to fix; a directory the user named with --control is
    /// theirs, and "chmod 700 /tmp" or "remove /tmp" would be terrible advice.
    /// mkdir first, then everything through a descriptor opened with O_NOFOLLOW: a symbolic link
    /// another user plants at the path (before our mkdir, or between a look and a chmod, as
    /// this once did by path) is refused, and its target is never touched. The mode is changed
    /// only on a directory this call created; one that was there already is checked, never
    /// changed.
    public static func preparePrivateDirectory(_ directory: String, isDefault: Bool) throws(SetupError) {
        let created: Bool
        do { created = try OpenedDirectory.make(directory, mode: 0o700) } catch {
            if error.errno == ENOENT {
                throw .system(SystemError("create the control socket directory \(directory) (its parent does not exist)", errno: ENOENT))
            }
            throw .system(SystemError("create the control socket directory \(directory)", errno: error.errno))
        }
        let privateElsewhere = "choose a --control path in a private directory of your own "
            + "(for example: mkdir -m 700 ~/dirtymig, then --control ~/dirtymig/NAME.sock)"
        let opened: OpenedDirectory
        do { opened = try OpenedDirectory(path: directory) } catch {
            // The descriptor refused it; lstat only words the refusal.
            var seen = stat()
            let present = lstat(directory, &seen) == 0
            if (error.errno == ELOOP || error.errno == ENOTDIR) && present && seen.st_mode & S_IFMT == S_IFLNK {
                let fix = isDefault ? "remove it (dirtymig creates a private directory there)" : privateElsewhere
                throw .unsafeDirectory(path: directory, problem: "the control socket directory \(directory) is a symbolic link; \(fix)")
            }
            if error.errno == ENOTDIR && present {
                let fix = isDefault ? "remove it (it is where control sockets go)" : privateElsewhere
                throw .unsafeDirectory(path: directory, problem: "\(directory) exists but is not a directory; \(fix)")
            }
            if error.errno == ENOENT || error.errno == ELOOP || error.errno == ENOTDIR {
                throw .unsafeDirectory(path: directory, problem: "the control socket directory \(directory) was replaced while it was being checked (another process is changing it); find out what changes it, then try again")
            }
            throw .system(SystemError("open the control socket directory \(directory)", errno: error.errno))
        }
        let info: stat
        do { info = try opened.status() } catch { throw .system(SystemError("stat \(directory)", errno: error.errno)) }
        let user = geteuid()
        guard info.st_uid == user else {
            let fix = isDefault ? "remove it, or set XDG_RUNTIME_DIR to a directory of your own" : privateElsewhere
            throw .unsafeDirectory(path: directory, problem: "the control socket directory \(directory) belongs to uid \(info.st_uid), not to you (uid \(user)); \(fix)")
        }
        if created {
            // In case the umask took bits away (it cannot add any).
            do { try opened.setMode(0o700) } catch { throw .system(SystemError("chmod 700 \(directory)", errno: error.errno)) }
            return
        }
        let mode = info.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            // A shared directory such as /tmp (world-writable): never advise closing it.
            let fix = mode & 0o002 != 0 ? privateElsewhere : "run 'chmod 700 \(directory)'"
            throw .unsafeDirectory(path: directory, problem: "the control socket directory \(directory) has mode 0\(String(mode, radix: 8)) but must be private (0700) so other users cannot control the VM; \(fix)")
        }
    }

    // MARK: Serving

    private func acceptLoop(_ listener: UnixSocket) {
        while true {
            let socket: UnixSocket
            do {
                socket = try listener.accept()
            } catch {
                if stopFlag.isRaised { return }
                // Out of descriptors or memory: back off and keep serving those we have.
                MonotonicClock.sleep(nanoseconds: 50_000_000)
                continue
            }
            // A client that stops reading must not wedge its thread (and so stop()) forever.
            socket.setSendTimeout(seconds: 10)
            let id: Int? = state.withLock { state in
                guard state.phase == .listening else { return nil }
                let id = state.nextClientID
                state.nextClientID += 1
                state.clients[id] = Client(socket: socket, thread: nil)
                return id
            }
            guard let id else {
                socket.close()
                return
            }
            let thread = OSThread(name: "ctl-client-\(id % 1000)") { [self] in serve(socket, id: id) }
            state.withLock { $0.clients[id]?.thread = thread }
        }
    }

    private func serve(_ socket: UnixSocket, id: Int) {
        defer {
            // Leave the table before closing, so stop() never shuts down a reused descriptor.
            state.withLock { _ = $0.clients.removeValue(forKey: id) }
            socket.close()
        }
        do { try socket.writeLine(ControlProtocol.greeting(vmName: vmName).serialized()) } catch { return }
        while true {
            let line: UnixSocket.LineResult
            do { line = try socket.readLine(limit: ControlProtocol.maxLineBytes) } catch { return }
            let reply: ControlReply
            var context: ControlContext? = nil
            switch line {
            case .end:
                return
            case .tooLong:
                reply = .failure(ControlError(.parseError, "line too long: a request line may have at most \(ControlProtocol.maxLineBytes) bytes; it was discarded"), id: nil)
            case .line(let bytes):
                if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
                (reply, context) = respond(to: bytes, clientID: id)
            }
            let delivered: Bool
            do { try socket.writeLine(reply.json.serialized()); delivered = true } catch { delivered = false }
            context?.runAfterReplyActions()
            if !delivered { return }
        }
    }

    /// One request line to its reply (and the context, whose after-reply actions are due).
    func respond(to line: [UInt8], clientID: Int) -> (ControlReply, ControlContext?) {
        let request: ControlRequest
        do { request = try ControlRequest.decode(line) } catch {
            return (.failure(error.error, id: error.id), nil)
        }
        let (command, names) = state.withLock { state in
            (state.commands[request.command], state.commands[request.command] == nil ? state.commands.keys.sorted() : [])
        }
        guard let command else {
            var desc = "unknown command '\(request.command)'"
            let nearest = ControlProtocol.suggestion(for: request.command, among: names)
            if let nearest { desc += "; did you mean '\(nearest)'?" }
            if names.isEmpty {
                desc += " (this VM serves no commands)"
            } else {
                desc += (nearest == nil ? "; commands: " : " Commands: ") + names.joined(separator: ", ")
            }
            return (.failure(ControlError(.unknownCommand, desc), id: request.id), nil)
        }
        let context = ControlContext(clientID: clientID, command: request.command, stopFlag: stopFlag)
        do {
            return (.success(try command(request.arguments, context), id: request.id), context)
        } catch {
            return (.failure(error, id: request.id), context)
        }
    }

    // MARK: Stopping

    /// Stops accepting, ends every connection (a command already running finishes and its reply is
    /// still sent; `ControlContext.sleep` returns early), waits for the server's threads, closes
    /// the listener and removes the socket file (only if it is still the one this server made).
    ///
    /// Idempotent. Safe from any thread, including a handler's after-reply action (the calling
    /// thread is not waited for). A call made while another is in progress waits for it to finish,
    /// unless made from one of the server's own threads.
    public func stop() {
        enum Role { case first(listener: UnixSocket?, acceptThread: OSThread?), wait, done }
        let current = pthread_self()
        let role: Role = state.withLock { state in
            switch state.phase {
            case .idle:
                state.phase = .stopped
                stopFlag.raise()
                return .done
            case .stopped:
                return .done
            case .stopping:
                let ours = state.acceptThread?.isCurrent(current) == true
                    || state.clients.values.contains { $0.thread?.isCurrent(current) == true }
                return ours ? .done : .wait
            case .listening:
                state.phase = .stopping
                stopFlag.raise()
                if !state.serving {
                    state.serving = true
                    servingGate.signal()   // the accept thread then finds the listener shut down
                }
                // Under the lock: a client thread leaves the table before closing its descriptor.
                state.listener?.shutdown(.both)
                for client in state.clients.values { client.socket.shutdown(.read) }
                return .first(listener: state.listener, acceptThread: state.acceptThread)
            }
        }
        switch role {
        case .done:
            return
        case .wait:
            stopFinished.wait()
            stopFinished.signal()
            return
        case .first(let listener, let acceptThread):
            if let acceptThread, !acceptThread.isCurrent(current) { acceptThread.join() }
            // The accept thread is gone, so the table is complete and every entry has its thread.
            let threads = state.withLock { $0.clients.values.compactMap(\.thread) }
            for thread in threads where !thread.isCurrent(current) { thread.join() }
            listener?.close()
            let file = state.withLock { $0.socketFile }
            if let file, FileIdentity(path: path) == file { unlink(path) }
            state.withLock {
                $0.phase = .stopped
                $0.listener = nil
                $0.acceptThread = nil
            }
            stopFinished.signal()
        }
    }
}

/// What a command handler knows about its call, and what it can ask for.
public final class ControlContext: Sendable {
    /// Which connection sent the request (1, 2, ... in order of connection).
    public let clientID: Int
    public let command: String
    private let stopFlag: StopFlag
    private let actions = Mutex<[@Sendable () -> Void]>([])

    init(clientID: Int, command: String, stopFlag: StopFlag) {
        self.clientID = clientID
        self.command = command
        self.stopFlag = stopFlag
    }

    /// A context outside any server (for calling handlers directly, e.g. in tests).
    public convenience init(clientID: Int = 0, command: String = "") {
        self.init(clientID: clientID, command: command, stopFlag: StopFlag())
    }

    /// Whether the server is stopping: a long command should give up and return.
    public var isServerStopping: Bool { stopFlag.isRaised }

    /// Runs `action` on this client's thread right after the reply has been written (or failed to
    /// be): how `quit` answers before the VM is torn down. The action may call `server.stop()`.
    public func afterReply(_ action: @escaping @Sendable () -> Void) {
        actions.withLock { $0.append(action) }
    }

    /// Sleeps up to `seconds`, waking early (within ~20 ms) if the server stops. Returns whether
    /// the whole interval elapsed.
    @discardableResult
    public func sleep(seconds: Double) -> Bool {
        guard seconds > 0 else { return !stopFlag.isRaised }   // also NaN
        let deadline = MonotonicClock.nanoseconds() + UInt64(min(seconds, 1e9) * 1e9)
        while true {
            if stopFlag.isRaised { return false }
            let now = MonotonicClock.nanoseconds()
            if now >= deadline { return true }
            MonotonicClock.sleep(nanoseconds: min(deadline - now, 20_000_000))
        }
    }

    func runAfterReplyActions() {
        let due = actions.withLock { actions -> [@Sendable () -> Void] in
            defer { actions.removeAll() }
            return actions
        }
        for action in due { action() }
    }
}

/// A one-way flag: raised once by `stop()`.
final class StopFlag: Sendable {
    private let raised = Atomic<Bool>(false)
    var isRaised: Bool { raised.load(ordering: .acquiring) }
    func raise() { raised.store(true, ordering: .releasing) }
}

/// Device and inode of a file: tells "the socket we made" from one that replaced it.
struct FileIdentity: Equatable, Sendable {
    let device: UInt64
    let inode: UInt64

    init?(path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return nil }
        device = UInt64(info.st_dev)
        inode = UInt64(info.st_ino)
    }
}

extension OSThread {
    /// Whether this is the thread `current` (from `pthread_self()`).
    func isCurrent(_ current: pthread_t) -> Bool { pthread_equal(handle, current) != 0 }
}
