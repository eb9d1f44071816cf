import Glibc

/// The standby's side of one replication, after its hello: an explicit state machine.
///
///     initial copy ──first checkpoint applied──▶ protecting ──primary gone──▶ take over
///          │  ▲                                     │  (auto; manual: after `failover`)
///          │  └──── the primary resumes ────────────┤  (protecting, or awaiting `failover`)
///          └─ primary gone: discard                 ├─ replicationEnd: discard, confirm
///                                                   └─ bad checkpoint: keep the copy, await `failover`
///
/// "The primary resumes": it greets this standby again over a new connection as the same
/// replication (`StandbySession.acceptResume`, before any takeover was decided). The old
/// connection is dropped (a staged epoch on it with it), and the pages changed since the
/// committed checkpoint arrive as an initial copy's do, written straight into guest memory:
/// the copy is torn until the resync's first checkpoint, and a resync that fails is discarded
/// as an initial copy is (the primary lives: it was just heard from).
///
/// "Primary gone" while protecting is silence: no byte for --failover-after (or the connection
/// closed without a replicationEnd: the primary's process died). A slow link is not silence.
/// An operator's `failover` is seen between two frames (the primary sends one at least every
/// fifth of --failover-after), so the connection stays whole and can carry the word that the
/// standby took over to a primary that still runs.
///
/// Guest memory is written directly during the initial copy (there is nothing to protect yet);
/// from the first checkpoint on, each epoch is staged and applied whole (CheckpointStaging), so
/// the copy is always exactly the primary's last acknowledged checkpoint.
enum IncomingReplication {
    enum Phase {
        case initialCopy(PageReceiver)
        /// The last checkpoint applied: its state, decoded and checked against this VM before
        /// the checkpoint was applied and acknowledged.
        case protecting(state: MachineState, epoch: UInt64)
    }

    /// How long a standby that took over keeps the old connection open after telling the primary
    /// (`tookOver`): about as long as TCP keeps retrying a silent peer (tcp_retries2 = 15 is
    /// 15 minutes or so), so a primary cut off from us hears of it when the link comes back.
    static let takeoverNoticeSeconds = 900.0

    /// Returns the VM running here after a failover; throws when the copy is discarded.
    static func run<VM: IncomingVM>(_ channel: MigrationChannel, connection: any MigrationConnection,
                                    hello: MigrationHello, built: inout Bool,
                                    session: StandbySession,
                                    build: () throws(MigrationError) -> VM,
                                    commit: () -> Bool, stopping: () -> Bool,
                                    log: @escaping @Sendable (String) -> Void) throws(MigrationError) -> VM {
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
        let initialPages = try PageReceiver(memory: vm.memory, verifying: false, codec: codec)
        var reply = MigrationHelloReply.accept
        reply.heartbeatMilliseconds = session.options.heartbeatMilliseconds
        try channel.send(.helloReply, reply.encode())

        // The connection followed: the first one (its caller's), or the last resume's, which
        // this thread owns and closes (`resumed`), unless it goes to the thread that tells the
        // former primary of a takeover.
        var link = Link(channel: channel, connection: connection)
        var resumed: (any MigrationConnection)?
        defer {
            session.end()
            resumed?.shutdown()
        }
        var staging = CheckpointStaging(memory: vm.memory, decompressor: initialPages.decompressor)
        var phase = Phase.initialCopy(initialPages)
        defer { if case .initialCopy(let pages) = phase { pages.passEnded() } }
        var lost = ""
        var keepWaiting = false   // a bad checkpoint: the primary lives, so never take over unasked

        /// The primary came back on a new connection (`StandbySession.acceptResume`, which shut
        /// the old one): what changed since the committed checkpoint comes as an initial copy's
        /// passes, straight into guest memory, then a first checkpoint. Until that checkpoint
        /// the copy is torn: the resync failing discards it, as an initial copy failing does.
        func adopt(_ resume: StandbyResume) throws(MigrationError) {
            link.connection.shutdown()
            resumed?.shutdown()
            resumed = resume.connection
            link = Link(channel: resume.channel, connection: resume.connection)
            session.follow(resume.connection)
            let pages = try PageReceiver(memory: vm.memory, verifying: false, codec: resume.codec,
                                         olderData: vm.memory.dataPages())
            staging.reset()
            staging = CheckpointStaging(memory: vm.memory, decompressor: pages.decompressor)
            phase = .initialCopy(pages)
            keepWaiting = false
            log("the primary came back from \(resume.peer): taking what changed since the checkpoint held; the copy is incomplete until the resync's first checkpoint")
        }

        following: while true {
            receiving: while true {
                let current = phase
                do {
                    switch current {
                    case .initialCopy(let pages):
                        let (type, length) = try link.channel.receiveHeader()
                        if try IncomingMigration.receivePassFrame(type, length: length, into: pages, channel: link.channel) { continue }
                        guard let (state, epoch) = try receiveCheckpointFrame(type, length: length, staging: staging,
                                                                              vm: vm, session: session, channel: link.channel) else { continue }
                        pages.passEnded()
                        phase = .protecting(state: state, epoch: epoch)
                        try link.channel.send(.checkpointAck, EpochFrame(epoch: epoch).encode())
                        // From now on the primary is lost only after --failover-after of silence: no
                        // byte at all (a checkpoint that crawls over a slow link is not silence), and
                        // no frame deadline (a 2 MiB checkpoint takes 0.84 s at 20 Mbit/s).
                        link.connection.setReceiveDeadline(nil)
                        link.connection.setTimeouts(send: 10, receive: session.options.failoverAfterSeconds)
                        link.connection.tcp.retransmitThinStreamsSteadily()
                    case .protecting:
                        if let request = session.failoverRequest {
                            staging.reset()   // a checkpoint the request came before is not applied
                            lost = request
                            break receiving
                        }
                        let (type, length) = try link.watched.receiveHeader()
                        guard let (state, epoch) = try receiveCheckpointFrame(type, length: length, staging: staging,
                                                                              vm: vm, session: session, channel: link.watched) else { continue }
                        phase = .protecting(state: state, epoch: epoch)
                        try link.channel.send(.checkpointAck, EpochFrame(epoch: epoch).encode())
                    }
                } catch {
                    guard case .protecting(_, let epoch) = phase, !stopping() else { throw error }
                    staging.reset()   // a torn epoch is dropped whole
                    if let resume = session.takeResume() {
                        try adopt(resume)
                        continue receiving
                    }
                    switch error {
                    case .peerAborted, .refused, .cancelled:
                        throw error   // replicationEnd or an abort: the primary lives and says why
                    case _ where Self.refusedByUs(error):
                        // The primary is alive but sent something we refused (a bad checkpoint, or a
                        // TLS record that failed its integrity check: the stream was tampered with
                        // on the way): tell it, keep the copy.
                        link.channel.sendAbort("the standby refused a checkpoint (\(error)); it keeps checkpoint \(epoch) and takes over only on 'dirtymig failover'")
                        keepWaiting = true
                    default:
                        break
                    }
                    lost = session.failoverRequest ?? "\(error)"
                    break receiving
                }
            }
            guard case .protecting(_, let epoch) = phase else { throw .machine("unreachable: no checkpoint") }
            if (session.options.failover == .manual || keepWaiting) && !session.failoverRequested {
                log("the primary is lost (\(lost)); holding checkpoint \(epoch): run 'dirtymig failover' to resume the VM here")
                switch session.awaitFailover(reason: lost, heldForOperator: keepWaiting, stopping: stopping) {
                case .failover: break
                case .stopping: throw .cancelled(MigrationReceiver.stoppingReason)
                case .resumed:
                    guard let resume = session.takeResume() else { throw .cancelled(MigrationReceiver.stoppingReason) }
                    try adopt(resume)
                    continue following
                }
            }
            // A resume that came first wins: the primary lives, nothing is taken over.
            if !session.takingOver() {
                guard let resume = session.takeResume() else { throw .cancelled(MigrationReceiver.stoppingReason) }
                try adopt(resume)
                continue following
            }
            break following
        }
        guard case .protecting(let state, let epoch) = phase else { throw .machine("unreachable: no checkpoint") }
        do {
            try vm.restoreState(state)
        } catch {
            throw .machine("cannot resume the VM from checkpoint \(epoch): \(error)")
        }
        guard commit() else { throw .cancelled(MigrationReceiver.stoppingReason) }
        do { try vm.start() } catch {
            vm.stop()
            throw .machine("cannot resume the VM from checkpoint \(epoch): \(error)")
        }
        log("took over from the primary (\(lost)): the VM runs here from checkpoint \(epoch)")
        resumed = nil   // the notice's thread closes it
        tellTheFormerPrimary(link.channel, connection: link.connection, epoch: epoch, log: log)
        return vm
    }

    /// The connection a replication follows, and its frames without a deadline of their own
    /// (once protecting, silence is what counts).
    private struct Link {
        let channel: MigrationChannel
        let connection: any MigrationConnection
        let watched: MigrationChannel

        init(channel: MigrationChannel, connection: any MigrationConnection) {
            self.channel = channel
            self.connection = connection
            watched = MigrationChannel(transport: connection)
        }
    }

    /// After a takeover: if the primary still lives (a link cut both sides saw as silence), it
    /// must learn that the VM runs here, so that it stops its stale copy's output when the link
    /// returns. `tookOver` is queued on the old connection, which a thread of its own keeps open
    /// (reading and dropping what the primary still sends, so that no reset destroys the word in
    /// flight) until the primary closes it or `takeoverNoticeSeconds` pass. A primary that died
    /// just makes this fail at once.
    private static func tellTheFormerPrimary(_ channel: MigrationChannel, connection: any MigrationConnection,
                                             epoch: UInt64, log: @escaping @Sendable (String) -> Void) {
        connection.setTimeouts(send: 10, receive: 0)
        do { try channel.send(.tookOver, EpochFrame(epoch: epoch).encode()) } catch {
            connection.shutdown()
            return
        }
        _ = OSThread(name: "repl-notice") {
            let deadline = MonotonicClock.nanoseconds() + UInt64(takeoverNoticeSeconds * 1e9)
            connection.setReceiveDeadline(deadline)
            // Raw bytes, not frames: the silence that made this side take over may have come in
            // the middle of a checkpoint frame, and the rest of it arrives when the link
            // returns. Read as frames, that rest was taken for a header, refused, and the
            // connection shut before the primary had read `tookOver` (its send of the frame held
            // the TLS connection until this side took the bytes).
            while (try? connection.receive(count: 4096)) != nil {}
            connection.shutdown()
        }
    }

    /// Whether the replication ended because this side refused what arrived (the primary lives).
    static func refusedByUs(_ error: MigrationError) -> Bool {
        switch error {
        case .protocolError: return true
        case .connection(let failure): return failure.errno == EBADMSG || failure.errno == EPROTO
        default: return false
        }
    }

    /// A frame of the checkpoint stream. Returns the state of a checkpoint just applied and
    /// committed (and its epoch), or nil for a frame that does not complete one, and for a
    /// checkpoint that came after a `failover` request (not applied: the request named the one
    /// before). A checkpoint's state is decoded and checked against this VM before its pages are
    /// applied: one that could not be resumed is refused whole, and the last good copy stays.
    private static func receiveCheckpointFrame<VM: IncomingVM>(_ type: MigrationFrameType, length: Int,
                                                               staging: CheckpointStaging, vm: VM, session: StandbySession,
                                                               channel: MigrationChannel) throws(MigrationError) -> (MachineState, UInt64)? {
        switch type {
        case .checkpointPages:
            try staging.receivePages(from: channel, payloadLength: length)
            return nil
        case .checkpointCompressedPages:
            try staging.receiveCompressedPages(from: channel, payloadLength: length)
            return nil
        case .checkpointEnd:
            let payload = try channel.receivePayload(length)
            let end = try MigrationError.wrap { () throws(MigrationProtocolError) in try CheckpointEnd(decoding: payload) }
            let state: MachineState
            do {
                state = try MachineState(decoding: end.state)
                try vm.checkRestorable(state)
            } catch {
                staging.reset()
                throw .protocolError(.malformed("checkpoint \(end.epoch)'s state cannot be resumed here (\(error)): it was refused whole"))
            }
            guard try session.commit(end.epoch, applying: { () throws(MigrationError) in _ = try staging.apply(end) }) else {
                staging.reset()
                return nil
            }
            return (state, end.epoch)
        case .heartbeat:
            _ = try channel.receivePayload(length)
            return nil
        case .replicationEnd:
            let reason = MigrationChannel.abortReason(try channel.receivePayload(length))
            staging.reset()
            // Said before the copy is dropped: the primary's stop waits for this word.
            try? channel.send(.replicationEnded, EpochFrame(epoch: 0).encode())
            throw .peerAborted("the primary stopped replicating (\(reason)); the standby discarded its copy")
        case .abort:
            throw .peerAborted(MigrationChannel.abortReason(try channel.receivePayload(length)))
        default:
            throw .protocolError(.unexpected("a \(type) frame in a replication"))
        }
    }
}
