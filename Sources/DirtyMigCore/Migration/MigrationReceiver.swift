import CKVM
import Dispatch
import Foundation
import Glibc
import Synchronization

/// What the receiver's state machine fills: guest memory first, then the saved CPU and device
/// state, then it runs. `Machine` is the real one; the fuzz test uses a memory-only stand-in.
public protocol IncomingVM: AnyObject, Sendable {
    var memory: GuestMemory { get }
    /// Whether a saved state fits this VM, checked before anything is applied.
    func checkRestorable(_ saved: MachineState) throws(MachineError)
    func restoreState(_ saved: MachineState) throws(MachineError)
    func start() throws(MachineError)
    func stop()
    /// The kernel thread ids of the vCPU threads, in vCPU order (post-copy charges each vCPU the
    /// time it waited for pages; empty where there are none).
    var vcpuThreadIDs: [UInt32] { get }
    /// Whether its post-copy link is paused (what `query-status` shows).
    var postcopyLink: PostCopyLinkState { get }
}

/// The destination side.
///
/// An accept thread takes every connection at once and gives each its own thread, so the
/// listening socket keeps serving whatever one peer does:
/// - a connection has `Limits.handshakeSeconds` to complete its TLS handshake (if any) and
///   deliver its whole hello (a peer that sends nothing, or a byte every 4 s, is closed; at most
///   `maxPendingHandshakes` may wait at once, more are told "busy");
/// - the first valid hello takes the receiver's one migration slot; a hello that arrives while a
///   migration runs is refused at once with "busy: a migration from HOST is in progress";
/// - the migration in the slot is a session (`IncomingSession`): a connection whose hello joins
///   it (its id, a role its hello announced) is authenticated as the first was, under the same
///   deadline, and handed to it; the session's end closes it. The slot is the table of open
///   sessions, so it holds at most one; the last few that ended are remembered, so that a late
///   join hears that its session ended rather than that it never existed;
/// - once running, each frame must arrive within `frameSeconds`.
///
/// The VM exists in exactly one place: until the commit point the source owns it, and a
/// migration that fails (peer gone, bad data, verification, `stop()`) drops its partial VM here
/// and tells the source, which resumes. The commit point is taken under the same lock as
/// `stop()`: a receiver asked to stop before it aborts the migration; after it, the VM runs here
/// and the stop applies to it like to any running VM.
public final class MigrationReceiver: Sendable {
    public struct Limits: Sendable {
        /// From accept to a complete hello.
        public var handshakeSeconds = 5.0
        /// Connections waiting for their handshake and hello at once; more are refused at once
        /// ("the destination is busy", in clear), with a log line.
        public var maxPendingHandshakes = 16
        /// One frame, header to last byte, once the migration runs (the sender sends at least a
        /// quarter-second batch at a time, see PageSender.batchLimit).
        public var frameSeconds = 60.0
        /// Why this host cannot serve post-copy's demand faults (nil: it can). A test stands in
        /// a host without a usable userfaultfd here.
        public var postcopyUnavailable: @Sendable () -> String? = { UserFaultFD.unavailableReason() }
        public init() {}
    }

    public let listener: TCPSocket
    /// What received VMs run on (KVM; a test's fake): the host's limits a hello is checked against.
    let hypervisor: any Hypervisor
    /// Builds a received VM on `hypervisor`: made where the hypervisor's type is known, so that
    /// the VM's vCPU threads run specialised (see `Hypervisor`).
    private let makeMachine: @Sendable (MachineConfiguration, any BootSource, GuestMemory?) throws(MachineError) -> Machine
    /// The name the received VM gets (its control socket); nil keeps the sender's name.
    public let name: String?
    public let limits: Limits
    /// A standby (`receive --standby`) takes replications, and only those; nil: migrations.
    public let standby: StandbyOptions?
    /// What a peer must prove before its hello is read (TLS credentials), or plaintext.
    public let security: ChannelSecurity
    /// This host's TSC frequency (kHz), which a guest must find here too.
    public let hostTSCKHz: UInt64?
    /// Where a received VM's guest output lines go (GuestOutput.setSink), set before it runs,
    /// so the first lines it emits here are not dropped.
    public let guestOutput: (@Sendable (String) -> Void)?
    /// Guest memory allocated before any migration (`receive --memory`), for a VM of its size.
    public let preparedMemory: PreparedMemory?
    /// Called with a received VM once it runs here and before the source is told so, on the
    /// migration's thread: whatever serves the VM (its control commands) is in place by the time
    /// the source reports the migration completed. If the source cannot be told, the VM is
    /// stopped and `receiveOne` reports the failure.
    public let onRunning: (@Sendable (Machine) -> Void)?
    /// One line per event a person watching the receiver needs (a refused peer, a failed or
    /// aborted migration and whether a partial VM was dropped): stderr in `dirtymig receive`.
    private let log: @Sendable (String) -> Void
    private let state = Mutex(State())
    /// Signalled once per outcome queued and once by `stop()`.
    private let arrivals = DispatchSemaphore(value: 0)
    /// Where connections refused from the accept loop are closed.
    private let refused = LingeringClose()

    /// Why a migration in flight ends when the receiver is asked to stop.
    public static let stoppingReason = "the destination is stopping: it aborted the incoming migration and discarded its copy; the VM runs on at the source"
    /// Outcomes kept for `receiveOne` (failures beyond this are dropped oldest first).
    static let maxQueuedOutcomes = 64
    /// Sessions that ended, remembered for the refusal of a late join (oldest dropped first).
    static let rememberedEndedSessions = 16

    private struct State {
        var stopping = false
        var accepting = false
        var nextID = 0
        var handshakes: [Int: TCPSocket] = [:]
        var active: Active?
        /// The sessions that ended last, and how, newest last.
        var ended: [(id: SessionID, how: String)] = []
        var outcomes: [Result<Machine, MigrationError>] = []
        /// The replication this standby follows now.
        var session: StandbySession?
    }

    private struct Active {
        let id: Int
        let peer: String
        /// The connection's socket; a standby's replication that resumed, the resume's.
        var socket: TCPSocket
        /// The session's connections; after a post-copy resume, the resume's.
        var session: IncomingSession
        /// Where a resume of this session's post-copy reaches it (a `--postcopy` migration's).
        let resumes: PostCopyResumePoint?
        var committed = false
    }

    public convenience init(listener: TCPSocket, kvm: KVMSystem, name: String? = nil, limits: Limits = Limits(),
                            standby: StandbyOptions? = nil, security: ChannelSecurity = .plain,
                            log: @escaping @Sendable (String) -> Void = { _ in },
                            guestOutput: (@Sendable (String) -> Void)? = nil, preparedMemory: PreparedMemory? = nil,
                            onRunning: (@Sendable (Machine) -> Void)? = nil) {
        self.init(listener: listener, hypervisor: kvm, name: name, limits: limits, standby: standby, security: security,
                  log: log, guestOutput: guestOutput, preparedMemory: preparedMemory, onRunning: onRunning)
    }

    init<H: Hypervisor>(listener: TCPSocket, hypervisor: H, name: String? = nil, limits: Limits = Limits(),
                        standby: StandbyOptions? = nil, security: ChannelSecurity = .plain,
                        log: @escaping @Sendable (String) -> Void = { _ in },
                        guestOutput: (@Sendable (String) -> Void)? = nil, preparedMemory: PreparedMemory? = nil,
                        onRunning: (@Sendable (Machine) -> Void)? = nil) {
        self.listener = listener
        self.preparedMemory = preparedMemory
        self.onRunning = onRunning
        self.hypervisor = hypervisor
        makeMachine = { configuration, bootSource, memory throws(MachineError) in
            try Machine(configuration, hypervisor: hypervisor, bootSource: bootSource, boot: .incoming, memory: memory)
        }
        self.name = name
        self.limits = limits
        self.standby = standby
        self.security = security
        self.guestOutput = guestOutput
        self.log = log
        hostTSCKHz = hypervisor.tscKHz
    }

    /// Listens on `endpoint`. A port in use is a clear error; so is a non-loopback address
    /// without credentials (unless `security.insecure`), and a name that does not resolve.
    /// `addresses`: what `security.checkListening(on: endpoint)` returned, if the caller checked
    /// already (the name is then not resolved again); nil resolves and checks here.
    public static func listen(on endpoint: HostPort, addresses: [SocketAddress]? = nil, kvm: KVMSystem, name: String? = nil,
                              limits: Limits = Limits(), standby: StandbyOptions? = nil, security: ChannelSecurity = .plain,
                              log: @escaping @Sendable (String) -> Void = { _ in },
                              guestOutput: (@Sendable (String) -> Void)? = nil,
                              preparedMemory: PreparedMemory? = nil,
                              onRunning: (@Sendable (Machine) -> Void)? = nil) throws(MigrationError) -> MigrationReceiver {
        try listen(on: endpoint, addresses: addresses, hypervisor: kvm, name: name, limits: limits, standby: standby,
                   security: security, log: log, guestOutput: guestOutput, preparedMemory: preparedMemory, onRunning: onRunning)
    }

    static func listen<H: Hypervisor>(on endpoint: HostPort, addresses: [SocketAddress]? = nil, hypervisor: H, name: String? = nil,
                                      limits: Limits = Limits(), standby: StandbyOptions? = nil, security: ChannelSecurity = .plain,
                                      log: @escaping @Sendable (String) -> Void = { _ in },
                                      guestOutput: (@Sendable (String) -> Void)? = nil,
                                      preparedMemory: PreparedMemory? = nil,
                                      onRunning: (@Sendable (Machine) -> Void)? = nil) throws(MigrationError) -> MigrationReceiver {
        var checked = addresses ?? []
        if addresses == nil {
            do { checked = try security.checkListening(on: endpoint) } catch { throw .channel(error) }
        }
        do {
            return MigrationReceiver(listener: try TCPSocket.listen(endpoint, addresses: checked), hypervisor: hypervisor, name: name, limits: limits,
                                     standby: standby, security: security, log: log, guestOutput: guestOutput,
                                     preparedMemory: preparedMemory, onRunning: onRunning)
        } catch {
            if error.errno == EADDRINUSE || error.errno == EADDRNOTAVAIL || error.errno == EACCES {
                throw .listen(SystemError("listen on \(endpoint)", errno: error.errno))
            }
            throw .listen(error)
        }
    }

    public var port: UInt16 { listener.localPort }

    /// Whether a migration holds the slot now, and from where.
    public var activePeer: String? { state.withLock { $0.active?.peer } }

    /// What the migration (or replication) that holds the slot has received so far, bytes on its
    /// connection; nil when none holds it.
    public var activeBytesReceived: UInt64? { state.withLock { $0.active?.socket }?.bytesReceived }

    /// The session of the migration that holds the slot: where the connections that join it wait.
    public var activeSession: IncomingSession? { state.withLock { $0.active?.session } }

    /// The replication this standby follows now, if any.
    public var standbySession: StandbySession? { state.withLock { $0.session } }

    /// Stops listening, closes every connection still in its handshake, and aborts the migration
    /// in flight unless it has passed its commit point (its source is told and resumes). A
    /// thread in `receiveOne` returns the outcomes already queued, then throws `.receiverStopped`.
    public func stop() {
        let first = state.withLock { state -> Bool in
            let first = !state.stopping
            state.stopping = true
            for socket in state.handshakes.values { socket.shutdown() }
            // Only the receiving half: the migration's thread sees the stream end and can still
            // tell the source why before it closes.
            if let active = state.active, !active.committed { active.socket.shutdownReceiving() }
            state.session?.wake()
            return first
        }
        listener.shutdown()
        if first { arrivals.signal() }
    }

    /// The outcome of the next migration that took the slot: the running VM, or why it failed
    /// (its partial VM is gone; call again for the next one). Connections refused before they
    /// took the slot (no or a late handshake, other credentials, not dirtymig, another version,
    /// the wrong role, "busy") are only logged: anyone who can reach the port can make those,
    /// and `receive --once` must not end on a stranger's account before any migration came.
    public func receiveOne() throws(MigrationError) -> Machine {
        startAccepting()
        while true {
            // Once stopped, the migration in flight (aborted, or past its commit point) is still
            // to be heard from: its outcome comes before `.receiverStopped`. Looked at before
            // waiting: a stop whose wake-up was taken by the wait that then got that outcome
            // would otherwise leave the next call waiting for good (a wake-up counted for an
            // outcome taken without waiting only makes a later wait look again).
            let (outcome, stopped) = state.withLock { state -> (Result<Machine, MigrationError>?, Bool) in
                state.outcomes.isEmpty ? (nil, state.stopping && state.active == nil) : (state.outcomes.removeFirst(), false)
            }
            if let outcome { return try outcome.get() }
            if stopped {
                arrivals.signal()   // for any other waiter
                throw .receiverStopped
            }
            arrivals.wait()
        }
    }

    /// Queues an outcome for `receiveOne`; `releasing` frees the slot in the same step, so a
    /// sender that tries again at once is not told "busy" by the migration that just ended, and
    /// a stopped receiver's last outcome is never missed.
    private func deliver(_ outcome: Result<Machine, MigrationError>, releasing id: Int? = nil) {
        state.withLock { state in
            if let id, state.active?.id == id { state.active = nil }
            state.outcomes.append(outcome)
            if state.outcomes.count > Self.maxQueuedOutcomes,
               let failure = state.outcomes.firstIndex(where: { if case .failure = $0 { return true }; return false }) {
                state.outcomes.remove(at: failure)
                return
            }
        }
        arrivals.signal()
    }

    private func startAccepting() {
        let start = state.withLock { state -> Bool in
            defer { state.accepting = true }
            return !state.accepting && !state.stopping
        }
        if start { _ = OSThread(name: "migr-accept") { [self] in acceptLoop() } }
    }

    private func acceptLoop() {
        while true {
            let socket: TCPSocket
            do { socket = try listener.accept() } catch {
                if state.withLock({ $0.stopping }) { return }
                // Out of descriptors or memory: back off and keep serving.
                MonotonicClock.sleep(nanoseconds: 50_000_000)
                continue
            }
            let peer = socket.peerDescription
            let id = state.withLock { state -> Int? in
                guard !state.stopping, state.handshakes.count < limits.maxPendingHandshakes else { return nil }
                state.nextID += 1
                state.handshakes[state.nextID] = socket
                return state.nextID
            }
            guard let id else {
                guard !state.withLock({ $0.stopping }) else { socket.shutdown(); continue }
                log("refused a connection from \(peer): \(limits.maxPendingHandshakes) connections are already waiting to say hello")
                // Told why in clear (a TLS sender would otherwise blame the credentials), and
                // closed without a thread of its own.
                MigrationConnector.refuseBusy(socket, waiting: limits.maxPendingHandshakes)
                refused.close(socket)
                continue
            }
            _ = OSThread(name: "migr-in-\(id % 1000)") { [self] in serve(socket, id: id, peer: peer) }
        }
    }

    private enum Claim { case claimed, busy(String), stopping }

    /// One connection: its hello under the handshake deadline, then the slot, then the migration.
    private func serve(_ socket: TCPSocket, id: Int, peer: String) {
        // A standby that took over hands the connection to the thread that tells the old primary.
        var handedOver = false
        defer {
            if !handedOver { socket.shutdown() }
            state.withLock { state in
                state.handshakes[id] = nil
                if state.active?.id == id { state.active = nil }
            }
        }
        socket.setTimeouts(send: 10, receive: 30)
        socket.setReceiveDeadline(MonotonicClock.nanoseconds() + UInt64(limits.handshakeSeconds * 1e9))
        // The channel first (TLS: the peer proves its credentials), then the hello, both within
        // the handshake deadline: nothing is allocated for a peer before it has authenticated.
        let connection: any MigrationConnection
        do { connection = try MigrationConnector.accept(socket, security: security) } catch {
            if state.withLock({ $0.stopping }) { return }
            var error = error
            var late = false
            if case .connection(let system) = error { late = system.errno == ETIMEDOUT }
            if case .channel(.handshake(let why)) = error { late = why.hasSuffix(TLSConnection.lateHandshake) }
            if late {
                error = .timedOut("no complete \(security.isEncrypted ? "TLS handshake" : "hello") within \(limits.handshakeSeconds) s of connecting")
            }
            log("refused a connection from \(peer): \(error) (nothing was allocated for it)")
            return
        }
        let handshake = MigrationChannel(transport: connection)
        let opening: ConnectionHello
        do { opening = try Self.readOpening(handshake) } catch {
            if state.withLock({ $0.stopping }) { return }   // cut short by stop(): nothing to report
            var error = error
            if case .connection(let system) = error, system.errno == ETIMEDOUT {
                error = .timedOut("no complete hello within \(limits.handshakeSeconds) s of connecting")
            }
            // A dirtymig of another version learns why; anything else gets a few bytes it ignores.
            try? handshake.send(.helloReply, MigrationHelloReply.refuse(error.reasonForPeer).encode())
            log("refused a connection from \(peer): \(error)")
            return
        }
        connection.setReceiveDeadline(nil)
        if connection.channel.encrypted { log("accepted \(peer) over \(connection.channel.summary)") }
        let hello: MigrationHello
        switch opening {
        case .join(let join):
            handedOver = admit(join, connection: connection, channel: handshake, peer: peer)
            return
        case .control(let control) where control.resume && control.replicate:
            handedOver = resumeReplication(control, socket: socket, connection: connection, channel: handshake, peer: peer)
            return
        case .control(let control) where control.resume:
            handedOver = resume(control, connection: connection, channel: handshake, peer: peer)
            return
        case .control(let control):
            hello = control
        }
        if let reason = Self.roleMismatch(hello, standby: standby, postcopyUnavailable: limits.postcopyUnavailable) {
            try? handshake.send(.helloReply, MigrationHelloReply.refuse(reason).encode())
            log("refused a connection from \(peer): \(reason)")
            return
        }

        let session = IncomingSession(id: hello.session, announced: hello.joins)
        let resumes = hello.postcopy ? PostCopyResumePoint(session: hello.session, pageCount: Int(hello.memorySize / GuestLayout.pageSize)) : nil
        let claim = state.withLock { state -> Claim in
            if state.stopping { return .stopping }
            if let active = state.active { return .busy(active.peer) }
            state.handshakes[id] = nil
            state.active = Active(id: id, peer: peer, socket: socket, session: session, resumes: resumes)
            return .claimed
        }
        switch claim {
        case .busy(let other):
            let reason = "busy: a migration from \(other) is in progress; try again when it has finished"
            try? handshake.send(.helloReply, MigrationHelloReply.refuse(reason).encode())
            log("refused a migration from \(peer): \(reason)")
            return
        case .stopping:
            try? handshake.send(.helloReply, MigrationHelloReply.refuse("the destination is stopping").encode())
            return
        case .claimed:
            break
        }

        var frameSeconds = limits.frameSeconds
        if standby == nil {
            // The sender's link rule, on this side too: a link silent for its --link-timeout ends
            // the migration here as it does there (the copy is discarded), a shorter cut is
            // ridden out, so a frame under way may take the cut's length longer. A standby
            // keeps its own rule (--failover-after), and its connection outlives a cut.
            let linkTimeout = Double(hello.linkTimeoutMilliseconds) / 1000
            connection.tcp.watchLink(timeoutSeconds: linkTimeout)
            connection.setTimeouts(send: linkTimeout, receive: linkTimeout)
            frameSeconds += linkTimeout
        }
        let channel = MigrationChannel(transport: connection, frameSeconds: frameSeconds)
        var built = false
        let outcome: Result<Machine, MigrationError>
        do {
            if let standby {
                let session = StandbySession(primary: peer, replication: hello.session, memorySize: hello.memorySize,
                                             vcpuCount: hello.vcpuCount, options: standby,
                                             lastByte: { socket.lastReceivedNanoseconds })
                session.follow(connection)
                state.withLock { $0.session = session }
                defer { state.withLock { if $0.session === session { $0.session = nil } } }
                log("replication from \(peer): taking the initial copy")
                outcome = .success(try IncomingReplication.run(
                    channel, connection: connection, hello: hello, built: &built, session: session,
                    build: { () throws(MigrationError) in try build(hello) }, commit: { commit(id) },
                    stopping: { state.withLock { $0.stopping } }, log: log))
                handedOver = true
            } else {
                outcome = .success(try IncomingMigration.run(channel, hello: hello, built: &built,
                                                             build: { () throws(MigrationError) in try build(hello) },
                                                             commit: { commit(id) }, running: { onRunning?($0) },
                                                             faults: { session.take(.faults, timeout: 5) }, resumes: resumes,
                                                             log: log))
            }
        } catch {
            var error = error
            if state.withLock({ $0.stopping }), !isCommitted(id) { error = .cancelled(Self.stoppingReason) }
            // Nothing came for (nearly) the whole link deadline: the link, or the source's host,
            // went silent (not a peer that trickled a frame past its deadline, nor one that closed).
            let linkTimeout = Double(hello.linkTimeoutMilliseconds) / 1000
            if standby == nil, !isCommitted(id), case .connection(let system) = error, system.errno == ETIMEDOUT,
               Double(MonotonicClock.nanoseconds() - connection.tcp.lastReceivedNanoseconds) >= linkTimeout * 0.9e9 {
                error = .timedOut("the link from \(peer) carried nothing for \(linkTimeout) s (the source's --link-timeout; \(system.operation) timed out)")
            }
            channel.sendAbort(error.description)
            log("the migration from \(peer) failed: \(error); \(built ? "its partial VM was discarded" : "nothing had been allocated for it")")
            outcome = .failure(error)
            preparedMemory?.replaceIfTaken()   // a VM built on it failed: its pages are spoilt
        }
        // Before the slot is freed: the connections that joined close with their session (the
        // one a post-copy resume made, if any, too).
        let how: String
        switch outcome {
        case .success: how = "completed"
        case .failure(.cancelled(let why)): how = "cancelled: \(why)"
        case .failure(let error): how = "failed: \(error)"
        }
        resumes?.end()
        if let resumed = state.withLock({ $0.active?.id == id ? $0.active?.session : nil }), resumed !== session {
            resumed.end(how)
        }
        end(session, how: how)
        deliver(outcome, releasing: id)
    }

    /// A connection whose hello joins a session: admitted (true: the session owns it now) only
    /// to the open session with its id, for a role that session announced and not beyond the
    /// number announced; otherwise refused with the reason, which its sender shows. Nothing is
    /// kept for it before the check.
    private func admit(_ join: SessionJoin, connection: any MigrationConnection, channel: MigrationChannel,
                       peer: String) -> Bool {
        let (open, ended) = state.withLock { state in
            (state.active.flatMap { $0.session.id == join.session ? $0.session : nil },
             state.ended.last { $0.id == join.session }?.how)
        }
        let refusal = if let open { open.admit(join.role) }
            else if let ended { IncomingSession.endedReason(join.session, ended) }
            else { "no session \(join.session) is open here (it never began here, or ended long ago): a connection joins only the session its control connection opened" }
        if let refusal {
            try? channel.send(.helloReply, MigrationHelloReply.refuse(refusal).encode())
            log("refused a \(join.role) connection from \(peer): \(refusal)")
            return false
        }
        guard let open, (try? channel.send(.helloReply, MigrationHelloReply.accept.encode())) != nil else { return false }
        open.deliver(connection, role: join.role)
        return true
    }

    /// A control hello that resumes a paused post-copy: handed over (true: the post-copy thread
    /// owns the connection now) only to the post-copy of the session it names, here, after its
    /// switch and before its end; otherwise refused with the reason. Its faults connection then
    /// joins a session of the same id made for the resume, which replaces the one before (whose
    /// connections the failed link left dead).
    private func resume(_ hello: MigrationHello, connection: any MigrationConnection, channel: MigrationChannel,
                        peer: String) -> Bool {
        let (active, ended) = state.withLock { state in
            (state.active.flatMap { $0.resumes != nil ? ($0.session.id, $0.resumes!) : nil },
             state.ended.last { $0.id == hello.session }?.how)
        }
        var refusal: String?
        if let (held, point) = active {
            if held != hello.session {
                refusal = "session \(hello.session) is not the post-copy held here (that is session \(held)): only the session that switched may resume it"
            } else if Int(hello.memorySize / GuestLayout.pageSize) != point.pageCount {
                refusal = "session \(hello.session)'s VM has \(point.pageCount) pages of RAM here, the resume announces \(hello.memorySize / GuestLayout.pageSize)"
            }
        } else if let ended {
            refusal = IncomingSession.endedReason(hello.session, ended) + "; there is no post-copy to resume"
        } else {
            refusal = "no post-copy is paused here to resume (session \(hello.session) never switched here, or ended long ago)"
        }
        let session = IncomingSession(id: hello.session, announced: hello.joins)
        if refusal == nil, let (_, point) = active {
            // Accepted before it is offered: the post-copy thread's first frame follows the reply.
            guard (try? channel.send(.helloReply, MigrationHelloReply.accept.encode())) != nil else { return false }
            refusal = point.offer(PostCopyResumePoint.Offer(control: connection, session: session))
            if refusal == nil {
                let replaced = state.withLock { state -> IncomingSession? in
                    guard state.active?.session.id == hello.session else { return nil }
                    defer { state.active?.session = session }
                    return state.active?.session
                }
                replaced?.end("replaced by a post-copy resume")
                log("post-copy of session \(hello.session) resumes from \(peer)")
                return true
            }
            session.end("refused")
            log("refused a post-copy resume from \(peer): \(refusal!)")
            return false
        }
        try? channel.send(.helloReply, MigrationHelloReply.refuse(refusal!).encode())
        log("refused a post-copy resume from \(peer): \(refusal!)")
        return false
    }

    /// A control hello that resumes a replication (flags `replicate` and `resume`): its primary
    /// came back over a new connection. Handed over (true: the replication's thread owns the
    /// connection now) only to the replication this standby follows, with that session id, while
    /// it holds a committed checkpoint and nothing decided to take over; answered with that
    /// checkpoint's epoch. Otherwise refused with the reason and its kind: `nothingToResume`
    /// (the primary starts afresh) or `tookOver` (the primary's copy is stale).
    private func resumeReplication(_ hello: MigrationHello, socket: TCPSocket, connection: any MigrationConnection,
                                   channel: MigrationChannel, peer: String) -> Bool {
        func refuse(_ reason: String, _ kind: MigrationHelloReply.HelloRefusal, epoch: UInt64? = nil) -> Bool {
            try? channel.send(.helloReply, MigrationHelloReply.refuse(reason, kind, epoch: epoch).encode())
            log("refused a replication resuming from \(peer): \(reason)")
            return false
        }
        if let reason = Self.roleMismatch(hello, standby: standby, postcopyUnavailable: limits.postcopyUnavailable) {
            return refuse(reason, .other)
        }
        let following = state.withLock { $0.session }
        guard let following else {
            return refuse("this standby holds no copy of replication \(hello.session) (it follows none: it was started again, or discarded its copy); start the replication afresh", .nothingToResume)
        }
        guard following.replication == hello.session else {
            return refuse("this standby follows replication \(following.replication) from \(following.primary), not \(hello.session): it is busy; stop that replication first, or use another standby", .other)
        }
        guard hello.memorySize == following.memorySize, hello.vcpuCount == following.vcpuCount else {
            return refuse("replication \(hello.session)'s VM has \(ByteSize.format(following.memorySize)) of RAM and \(following.vcpuCount) vCPUs here; the resume announces \(ByteSize.format(hello.memorySize)) and \(hello.vcpuCount)", .other)
        }
        let codec: PageCodec
        do { codec = try Self.checkedCodec(hello) } catch { return refuse(error.reasonForPeer, .other) }
        let resume = StandbyResume(connection: connection, channel: MigrationChannel(transport: connection, frameSeconds: limits.frameSeconds),
                                   hello: hello, codec: codec, peer: peer)
        switch following.acceptResume(resume) {
        case .failure(.nothingHeld(let why)):
            return refuse("this standby holds no checkpoint of replication \(hello.session): \(why); start the replication afresh", .nothingToResume)
        case .failure(.tookOver(let epoch)):
            return refuse("this standby took over replication \(hello.session): it resumed the VM from checkpoint \(epoch) and runs it; the primary's copy is stale", .tookOver, epoch: epoch)
        case .failure(.keptForOperator(let epoch)):
            return refuse("this standby refused a checkpoint of replication \(hello.session) and keeps checkpoint \(epoch) for an operator: run 'dirtymig failover' on it, or stop it and start the replication afresh", .other)
        case .success(let epoch):
            state.withLock { state in
                if state.session === following { state.active?.socket = socket }
            }
            var reply = MigrationHelloReply.accept
            reply.heartbeatMilliseconds = following.options.heartbeatMilliseconds
            reply.heldEpoch = epoch
            // Accepted before the reply: the replication's thread reads the resync's first frame
            // after it. A reply that cannot go out fails that read, and the torn copy is dropped.
            try? channel.send(.helloReply, reply.encode())
            log("replication \(hello.session) resumes from \(peer): the standby holds checkpoint \(epoch) and takes what changed since")
            return true
        }
    }

    /// Ends `session` (closing the connections that joined it) and remembers how.
    private func end(_ session: IncomingSession, how: String) {
        session.end(how)
        state.withLock { state in
            state.ended.append((session.id, how))
            if state.ended.count > Self.rememberedEndedSessions { state.ended.removeFirst() }
        }
    }

    /// The commit point: false if the receiver is stopping (the migration must be aborted).
    private func commit(_ id: Int) -> Bool {
        state.withLock { state in
            guard !state.stopping, state.active?.id == id else { return false }
            state.active?.committed = true
            return true
        }
    }

    private func isCommitted(_ id: Int) -> Bool {
        state.withLock { $0.active?.id == id && $0.active?.committed == true }
    }

    /// The page codec the hello announces, which this build must know: checked before the VM
    /// is built, so an unknown one is refused with nothing allocated.
    static func checkedCodec(_ hello: MigrationHello) throws(MigrationError) -> PageCodec {
        guard let codec = hello.pageCodec else { throw .refused(PageCodec.unknown(hello.pageCodecCode)) }
        return codec
    }

    /// A replication reaches only a standby, and a standby takes only replications.
    static func roleMismatch(_ hello: MigrationHello, standby: StandbyOptions?,
                             postcopyUnavailable: () -> String? = { UserFaultFD.unavailableReason() }) -> String? {
        if hello.replicate && standby == nil {
            return "this receiver is not a standby: start it with 'dirtymig receive --standby' to take a replication"
        }
        if hello.postcopy && hello.replicate {
            return "a replicated VM cannot switch to post-copy: its standby keeps whole checkpoints"
        }
        if hello.postcopy, let reason = postcopyUnavailable() {
            return "this destination cannot serve post-copy: \(reason); migrate without --postcopy"
        }
        if !hello.replicate && standby != nil {
            return "this receiver is a standby: it takes a replication ('dirtymig migrate --continuous'), not a migration"
        }
        return nil
    }

    static func readHello(_ channel: MigrationChannel) throws(MigrationError) -> MigrationHello {
        try channel.receive(.hello, MigrationHello.init(decoding:))
    }

    /// The first frame of an accepted connection: a session's control hello, or a join.
    static func readOpening(_ channel: MigrationChannel) throws(MigrationError) -> ConnectionHello {
        try channel.receive(.hello, ConnectionHello.init(decoding:))
    }

    /// Builds the empty VM the hello announces, after checking it against this host.
    private func build(_ hello: MigrationHello) throws(MigrationError) -> Machine {
        let (configuration, bootSource) = try Self.configuration(for: hello, hypervisor: hypervisor, name: name,
                                                                 hostTSCKHz: hostTSCKHz)
        let prepared = preparedMemory?.take(size: configuration.memorySize)
        if let preparedMemory, prepared == nil {
            log(preparedMemory.size == configuration.memorySize
                ? "the prepared guest memory is being prepared again: this VM gets fresh memory"
                : "the incoming VM has \(ByteSize.format(configuration.memorySize)) of RAM, not the \(ByteSize.format(preparedMemory.size)) prepared with --memory: it gets fresh memory")
        }
        do {
            let machine = try makeMachine(configuration, bootSource, prepared)
            machine.output.setSink(guestOutput)
            return machine
        } catch {
            if case .insufficientMemory = error { throw .refused(error.description) }
            throw .refused("cannot build the VM here: \(error)")
        }
    }

    /// Checks a sender's announcement against this host, before anything is allocated: the boot
    /// source's announcement agrees with it (the workload guest: its config block keeps the
    /// working sets inside RAM), the CPU has what the guest uses, and the TSC ticks at the
    /// guest's rate. (Whether the memory is there is checked when the VM is built, right before
    /// it is allocated.)
    public static func configuration(for hello: MigrationHello, kvm: KVMSystem, name: String?,
                                     hostTSCKHz: UInt64?) throws(MigrationError) -> MachineConfiguration {
        try configuration(for: hello, hypervisor: kvm, name: name, hostTSCKHz: hostTSCKHz).0
    }

    static func configuration(for hello: MigrationHello, hypervisor: any Hypervisor, name: String?,
                              hostTSCKHz: UInt64?) throws(MigrationError) -> (MachineConfiguration, any BootSource) {
        let bootSource = try BootSources.decode(hello.bootSource, hello.bootAnnouncement,
                                                memorySize: hello.memorySize, vcpuCount: hello.vcpuCount)
        let missing = hello.requiredFeatures.missing(in: hypervisor.cpuFeatures)
        guard missing.isEmpty else {
            throw .refused("this host's CPU lacks what the guest uses: \(missing.joined(separator: ", "))")
        }
        try checkTSC(hello.tscKHz, hostKHz: hostTSCKHz, canScale: hypervisor.canScaleTSC)
        var configuration = MachineConfiguration(
            name: name ?? hello.name, memorySize: hello.memorySize, vcpuCount: hello.vcpuCount,
            workloads: [], tracking: hello.tracking, ringEntries: hello.ringEntries)
        bootSource.describe(&configuration)
        // The memory check comes with the build (Machine.init), right before the allocation.
        do { try configuration.validate(against: hypervisor) } catch { throw .refused("\(error)") }
        return (configuration, bootSource)
    }

    /// x86 TSCs tick at 100 MHz to 20 GHz: anything else in a hello is not a real host's. The
    /// guest paces its workloads (and keeps its time) by the TSC, and a VM restored under KVM
    /// keeps ticking at the destination's rate unless KVM_SET_TSC_KHZ can scale it, which needs
    /// KVM_CAP_TSC_CONTROL. Without it, frequencies more than 250 ppm apart (Firecracker's
    /// tolerance) are refused before anything is sent, rather than after a whole transfer.
    static func checkTSC(_ sourceKHz: UInt64, hostKHz: UInt64?, canScale: Bool) throws(MigrationError) {
        guard (100_000...20_000_000).contains(sourceKHz) else {
            throw .protocolError(.malformed("a TSC frequency of \(sourceKHz) kHz, which no x86 host has (100 MHz to 20 GHz)"))
        }
        guard let hostKHz, !canScale else { return }
        let difference = hostKHz > sourceKHz ? hostKHz - sourceKHz : sourceKHz - hostKHz
        guard difference * 4000 > sourceKHz else { return }
        let percent = (Double(hostKHz) / Double(sourceKHz) - 1) * 100
        throw .refused("the source's TSC ticks at \(sourceKHz) kHz and this host's at \(hostKHz) kHz, and this kernel cannot make a guest's TSC tick at another rate (no KVM_CAP_TSC_CONTROL): the guest's clock and pacing would run \(String(format: "%+.2f", percent)) % off here. Migrate between hosts whose TSCs tick at the same rate (within 250 ppm)")
    }

    /// One whole migration over `transport`, hello first, with no sockets and no slot: what the
    /// fuzz test drives. `build` makes the VM for an accepted hello.
    public static func receive<VM: IncomingVM>(over transport: any MigrationTransport,
                                               build: (MigrationHello) throws(MigrationError) -> VM) throws(MigrationError) -> VM {
        let channel = MigrationChannel(transport: transport)
        let hello = try readHello(channel)
        var built = false
        do {
            return try IncomingMigration.run(channel, hello: hello, built: &built,
                                             build: { () throws(MigrationError) in try build(hello) }, commit: { true })
        } catch {
            channel.sendAbort(error.description)
            throw error
        }
    }
}

/// One incoming migration on one connection, after its hello: an explicit state machine in
/// which each frame is legal in exactly one state.
enum IncomingMigration {
    enum Phase<VM: IncomingVM> {
        case receivingMemory(VM, PageReceiver)
        case awaitingCompletion(VM, PageReceiver, stateBytes: [UInt8])
    }

    /// A frame of the pre-copy passes (a migration's, or a replication's initial copy): pages
    /// into guest memory, the plan of pass 1, or a pass's end, acknowledged. False: another type.
    static func receivePassFrame(_ type: MigrationFrameType, length: Int, into pages: PageReceiver,
                                 channel: MigrationChannel) throws(MigrationError) -> Bool {
        switch type {
        case .pages:
            try pages.receive(from: channel, payloadLength: length)
        case .compressedPages:
            try pages.receiveCompressed(from: channel, payloadLength: length)
        case .passPlan:
            try pages.receivePlan(from: channel, payloadLength: length)
        case .iterationEnd:
            let payload = try channel.receivePayload(length)
            let end = try MigrationError.wrap { () throws(MigrationProtocolError) in try MigrationPassEnd(decoding: payload) }
            try pages.settle()
            pages.passEnded()
            // Everything of the pass is in guest memory now: say so, so the sender measures
            // real bandwidth and never pauses with a backlog still in flight.
            try channel.send(.iterationAck, end.encodeAck())
        default:
            // Whatever comes next (the state, a checkpoint, an abort) sees every page in memory.
            try pages.settle()
            return false
        }
        return true
    }

    /// Builds the VM, answers the hello, fills memory pass by pass, restores the state, takes
    /// the commit point (`commit` false: abort) and resumes the VM. `built` says whether a VM
    /// was allocated (so a failure's message can say whether one was dropped).
    static func run<VM: IncomingVM>(_ channel: MigrationChannel, hello: MigrationHello, built: inout Bool,
                                    build: () throws(MigrationError) -> VM,
                                    commit: () -> Bool, running: (VM) -> Void = { _ in },
                                    faults: () -> (any MigrationConnection)? = { nil },
                                    resumes: PostCopyResumePoint? = nil,
                                    log: (String) -> Void = { _ in }) throws(MigrationError) -> VM {
        let vm: VM
        let codec: PageCodec
        do {
            codec = try MigrationReceiver.checkedCodec(hello)
            vm = try build()
        } catch {
            try? channel.send(.helloReply, MigrationHelloReply.refuse(error.reasonForPeer).encode())
            throw error
        }
        built = true
        let pages = try PageReceiver(memory: vm.memory, verifying: hello.verify, codec: codec)
        try channel.send(.helloReply, MigrationHelloReply.accept.encode())
        var phase = Phase.receivingMemory(vm, pages)
        defer {
            // However it ends, no thread keeps allocating pages for this migration.
            if case .receivingMemory(_, let pages) = phase { pages.passEnded() }
        }
        // After postcopyPrepare the pages it named are holes: only the switch (or an abort) may
        // follow, never a page that would fill one with a stale copy.
        var dropped: DirtyPageBitmap?
        while true {
            switch phase {
            case .receivingMemory(let vm, let pages):
                let (type, length) = try channel.receiveHeader()
                if dropped != nil && type != .postcopySwitch && type != .abort {
                    throw .protocolError(.unexpected("a \(type) frame after postcopyPrepare"))
                }
                if try receivePassFrame(type, length: length, into: pages, channel: channel) { continue }
                switch type {
                case .postcopyPrepare where hello.postcopy:
                    dropped = try PostCopyDestination.prepare(vm.memory, pages: pages, control: channel, payloadLength: length)
                case .state:
                    pages.passEnded()
                    phase = .awaitingCompletion(vm, pages, stateBytes: try channel.receivePayload(length))
                case .postcopySwitch where hello.postcopy:
                    pages.passEnded()
                    let outcome = try PostCopyDestination.run(
                        vm, control: channel, payloadLength: length, digest: pages.digest, dropped: dropped, faults: faults(),
                        linkTimeoutSeconds: Double(hello.linkTimeoutMilliseconds) / 1000, resumes: resumes,
                        commit: commit, running: running, log: log)
                    if case .broken(let reason, let pagesAtSource) = outcome {
                        log("post-copy failed here after the VM began to run here: \(reason); \(pagesAtSource) pages are still at the source, and vCPUs that touch them wait")
                    }
                    return vm
                case .abort:
                    throw .peerAborted(MigrationChannel.abortReason(try channel.receivePayload(length)))
                default:
                    throw .protocolError(.unexpected("a \(type) frame while receiving memory"))
                }

            case .awaitingCompletion(let vm, let pages, let stateBytes):
                let completion = try channel.receive(.complete, MigrationCompletion.init(decoding:))
                let completed = MonotonicClock.nanoseconds()
                var verifyNanoseconds: UInt64 = 0
                if completion.verify {
                    let start = MonotonicClock.nanoseconds()
                    // Kept as pages landed when the hello announced --verify; otherwise hashed now.
                    let ours = pages.digest?.value ?? MemoryDigest.compute(vm.memory)
                    let oursState = MemoryDigest.hash(stateBytes)
                    verifyNanoseconds = MonotonicClock.nanoseconds() - start + (pages.digest?.nanoseconds ?? 0)
                    if ours != completion.memoryDigest || oursState != completion.stateDigest {
                        let memoryDiffers = ours != completion.memoryDigest
                        let message = "\(memoryDiffers ? "memory digest" : "state digest") differs (source 0x\(String(memoryDiffers ? completion.memoryDigest : completion.stateDigest, radix: 16)), destination 0x\(String(memoryDiffers ? ours : oursState, radix: 16)))"
                        try? channel.send(.result, MigrationResult(status: .verifyFailed, verifyNanoseconds: verifyNanoseconds,
                                                                   message: message).encode())
                        throw .verifyFailed(message)
                    }
                }
                do {
                    try vm.restoreState(try MachineState(decoding: stateBytes))
                } catch {
                    let message = "cannot resume the VM here: \(error)"
                    try? channel.send(.result, MigrationResult(status: .failed, message: message).encode())
                    throw .machine(message)
                }
                // The commit point, under the receiver's lock: a stop requested before it aborts
                // the migration (the source resumes); after it, the VM is this host's.
                guard commit() else {
                    try? channel.send(.result, MigrationResult(status: .failed, message: MigrationReceiver.stoppingReason).encode())
                    throw .cancelled(MigrationReceiver.stoppingReason)
                }
                do { try vm.start() } catch {
                    let message = "cannot resume the VM here: \(error)"
                    try? channel.send(.result, MigrationResult(status: .failed, message: message).encode())
                    vm.stop()
                    throw .machine(message)
                }
                running(vm)
                do {
                    try channel.send(.result, MigrationResult(status: .resumed, verifyNanoseconds: verifyNanoseconds,
                                                              resumeNanoseconds: MonotonicClock.nanoseconds() - completed).encode())
                } catch {
                    // The source never learns that we run the VM; it resumes its own copy. Two
                    // copies must never run: drop ours.
                    vm.stop()
                    throw error
                }
                pages.populateAfterResume()
                return vm
            }
        }
    }
}
