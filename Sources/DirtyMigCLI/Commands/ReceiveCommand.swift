import DirtyMigCore
import Foundation
import Synchronization

/// `dirtymig receive`: listen for a migration; once one completes, the VM runs in this process
/// and is served like a booted one (so it can be migrated on again).
enum ReceiveCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        guard let listenText = arguments.string("listen") else {
            throw arguments.error("--listen HOST:PORT is required (for example --listen 0.0.0.0:4444)")
        }
        guard let endpoint = HostPort.parse(listenText) else {
            throw arguments.error("--listen \(listenText): expected HOST:PORT, for example 127.0.0.1:4444 or :4444")
        }
        var name = ControlSocketPath.defaultName
        if let chosen = arguments.string("name") {
            do { try ControlSocketPath.validate(name: chosen) } catch { throw arguments.error(error.desc) }
            name = chosen
        }
        let controlPath = arguments.string("control") ?? ControlSocketPath.path(forName: name)
        let once = arguments.has("once")
        let standby = try standbyOptions(arguments)
        let guestOutput = try GuestOutputFile.requested(by: arguments)
        let security = try ChannelOptions.security(arguments)
        // Resolved once, here: the receiver listens on exactly the addresses checked.
        let addresses: [SocketAddress]
        do { addresses = try security.checkListening(on: endpoint) } catch {
            if case .unresolved = error { throw RuntimeFailure(error.description) }
            throw arguments.error(error.description)
        }
        let prepareSize = try arguments.guestMemorySize()
        if arguments.has("detach") { return try Detach.run(controlPath: controlPath, name: name, state: "listening") }

        let kvm: KVMSystem
        do { kvm = try KVMSystem() } catch { throw RuntimeFailure("\(error)") }
        let stop = StopSignals()   // before any other thread exists
        // The control socket is claimed now, so a name clash shows before any migration.
        let server = ControlServer(path: controlPath, vmName: name)
        let vmName = name
        do { try server.start(serving: false) } catch { throw RuntimeFailure("\(error)") }
        let log: @Sendable (String) -> Void = { line in printError("dirtymig receive: \(line)") }
        let prepared = prepareSize.map { PreparedMemory(size: $0, log: log) }
        // A received VM's commands replace the receiver's before the source is told it runs here.
        let hosted = Mutex<VMHost.Hosted?>(nil)
        let receiver: MigrationReceiver
        do {
            receiver = try MigrationReceiver.listen(on: endpoint, addresses: addresses, kvm: kvm, name: name, standby: standby, security: security,
                                                    log: log, guestOutput: guestOutput?.sink, preparedMemory: prepared,
                                                    onRunning: { machine in hosted.withLock { $0 = VMHost.attach(machine, server: server, stop: stop) } })
        } catch {
            server.stop()
            throw RuntimeFailure("\(error)")
        }
        // Listening already (a port in use is reported at once), accepting not yet: a sender
        // that connects now waits in the backlog until the memory is ready.
        if let prepared {
            do { try prepared.prepare() } catch {
                server.stop()
                if case .invalidConfiguration = error { throw arguments.error("\(error)") }
                throw RuntimeFailure("\(error)")
            }
        }
        // SIGINT/SIGTERM while listening ends the run; during an incoming migration it aborts it
        // (the source is told and resumes; see MigrationReceiver's commit point).
        let shown = HostPort(host: endpoint.host.isEmpty ? "*" : endpoint.host, port: receiver.port)
        let stopping = StopFlagBox()
        func serveReceiver() {
            stop.onSignal { stopping.raise(); receiver.stop() }
            registerCommands(on: server, receiver: receiver, stopping: stopping, vmName: vmName, shown: shown, standby: standby,
                             prepared: prepared, security: security)
        }
        serveReceiver()
        server.serve()
        emit("dirtymig: listening for \(standby == nil ? "a migration" : "a replication (standby, failover \(standby!.failover.rawValue))") on \(shown) (\(security.isEncrypted ? "TLS 1.3, \(security.optionsText)" : "plaintext"))\(prepared.map { "; \(ByteSize.format($0.size)) of guest memory prepared in \(String(format: "%.2f", $0.secondsToPrepare)) s" } ?? ""); control socket \(controlPath)")

        while true {
            let machine: Machine
            do {
                machine = try receiver.receiveOne()
            } catch {
                // The receiver has logged what happened to the migration and its partial VM. A
                // VM that ran here but whose source was never told is stopped by now: the
                // receiver's commands come back.
                if hosted.withLock({ value in defer { value = nil }; return value != nil }) {
                    for command in server.commandNames where !receiverCommands.contains(command) { server.unregister(command) }
                    serveReceiver()
                }
                if stopping.isRaised {
                    server.stop()
                    printError("dirtymig receive: stopped")
                    return 0
                }
                if once {
                    server.stop()
                    return 1
                }
                continue
            }
            receiver.stop()   // one VM per process: it runs here now
            let configuration = machine.configuration
            let host = hosted.withLock { $0 } ?? VMHost.attach(machine, server: server, stop: stop)
            return VMHost.run(host,
                              ready: "dirtymig: VM '\(name)' received and running (\(ByteSize.format(configuration.memorySize)), \(configuration.vcpuCount) vCPU\(configuration.vcpuCount == 1 ? "" : "s"), --track \(configuration.tracking?.rawValue ?? "none")); control socket \(controlPath)")
        }
    }
}

extension ReceiveCommand {
    /// What a receiver serves until a VM runs here.
    static let receiverCommands: Set<String> = ["query-status", "failover", "quit"]

    static func registerCommands(on server: ControlServer, receiver: MigrationReceiver, stopping: StopFlagBox, vmName: String,
                                 shown: HostPort, standby: StandbyOptions?, prepared: PreparedMemory?, security: ChannelSecurity) {
        server.register("query-status") { (_: JSONValue) throws(ControlError) in
            let peer = receiver.activePeer
            let session = receiver.standbySession
            let state = session != nil ? "standby" : peer == nil ? "listening" : "receiving"
            return ["name": .string(vmName), "state": .string(state), "pid": .number(Int(getpid())),
                    "listen": .string(shown.description), "from": peer.map { .string($0) } ?? .null,
                    "received_bytes": peer == nil ? .null : receiver.activeBytesReceived.map { .number($0) } ?? .null,
                    "standby": session?.json ?? .null,
                    "prepared_memory": prepared.map { .number(Int($0.size)) } ?? .null,
                    "prepared_memory_state": prepared.map { .string($0.availability.rawValue) } ?? .null,
                    "credentials": .string(security.credentialsKind)]
        }
        // An operator's (or a third party's) decision that the primary is gone; refused while
        // the primary is heard from, unless forced.
        server.register("failover") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: ["force"])
            let force = try arguments.boolArgument("force") ?? false
            guard let session = receiver.standbySession else {
                throw ControlError(.failed, standby == nil ? "this receiver is not a standby (receive --standby)" : "this standby follows no replication")
            }
            let granted: StandbySession.FailoverGranted
            do throws(StandbySession.FailoverRefusal) { granted = try session.requestFailover(force: force) } catch {
                throw ControlError(.failed, error.description)
            }
            return ["failover": true, "epoch": .number(granted.epoch),
                    "primary_heard_ms_ago": granted.primaryHeardMillisecondsAgo.map { .number($0) } ?? .null]
        }
        // `quit` (what `dirtymig stop` sends) does what SIGTERM does.
        server.register("quit") { (_: JSONValue, context: ControlContext) throws(ControlError) in
            context.afterReply { stopping.raise(); receiver.stop() }
            return ["stopping": true]
        }
    }

    static func standbyOptions(_ arguments: ParsedArguments) throws(UsageError) -> StandbyOptions? {
        guard arguments.has("standby") else {
            for option in ["failover", "failover-after"] where arguments.has(option) {
                throw arguments.error("--\(option) applies to a standby (--standby)")
            }
            return nil
        }
        var options = StandbyOptions()
        if let mode = try arguments.choice("failover") { options.failover = StandbyOptions.Failover(rawValue: mode)! }
        if let after = try arguments.duration("failover-after") {
            guard StandbyOptions.failoverAfterRange.contains(after) else {
                throw arguments.error("--failover-after must be from 50ms to 60s")
            }
            options.failoverAfterSeconds = after
        }
        return options
    }
}

/// A flag raised from the signal thread and read by the main one.
final class StopFlagBox: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var raised = false
    func raise() { lock.lock(); raised = true; lock.unlock() }
    var isRaised: Bool { lock.lock(); defer { lock.unlock() }; return raised }
}
