import Glibc

/// The standby's side of one replication, after its hello: an explicit state machine.
///
///     initial copy ──first checkpoint applied──▶ protecting ──primary gone──▶ take over
///          │                                        │  (auto; manual: after `failover`)
///          └─ primary gone: discard                 ├─ replicationEnd: discard
///                                                   └─ bad checkpoint: keep the copy, await `failover`
///
/// Guest memory is written directly during the initial copy (there is nothing to protect yet);
/// from the first checkpoint on, each epoch is staged and applied whole (CheckpointStaging), so
/// the copy is always exactly the primary's last acknowledged checkpoint.
enum IncomingReplication {
    enum Phase {
        case initialCopy(PageReceiver)
        case protecting(state: [UInt8], epoch: UInt64)
    }

    /// Returns the VM running here after a failover; throws when the copy is discarded.
    static func run<VM: IncomingVM>(_ channel: MigrationChannel, hello: MigrationHello, built: inout Bool,
                                    session: StandbySession,
                                    build: () throws(MigrationError) -> VM,
                                    commit: () -> Bool, stopping: () -> Bool,
                                    log: (String) -> Void) throws(MigrationError) -> VM {
        let vm: VM
        do { vm = try build() } catch {
            try? channel.send(.helloReply, MigrationHelloReply.refuse(error.reasonForPeer).encode())
            throw error
        }
        built = true
        var reply = MigrationHelloReply.accept
        reply.heartbeatMilliseconds = session.options.heartbeatMilliseconds
        try channel.send(.helloReply, reply.encode())

        // Once protecting, nothing from the primary for --failover-after means it is gone.
        let watched = MigrationChannel(transport: channel.transport, frameSeconds: session.options.failoverAfterSeconds)
        let staging = CheckpointStaging(memory: vm.memory)
        var phase = Phase.initialCopy(PageReceiver(memory: vm.memory, verifying: false))
        defer { if case .initialCopy(let pages) = phase { pages.passEnded() } }
        var lost: String
        var keepWaiting = false   // a bad checkpoint: the primary lives, so never take over unasked
        receiving: while true {
            let current = phase
            do {
                switch current {
                case .initialCopy(let pages):
                    let (type, length) = try channel.receiveHeader()
                    if try IncomingMigration.receivePassFrame(type, length: length, into: pages, channel: channel) { continue }
                    let (state, epoch) = try receiveCheckpointFrame(type, length: length, staging: staging, channel: channel)
                    guard let state else { continue }
                    pages.passEnded()
                    phase = .protecting(state: state, epoch: epoch)
                    session.committed(epoch)
                    try channel.send(.checkpointAck, EpochFrame(epoch: epoch).encode())
                case .protecting:
                    let (type, length) = try watched.receiveHeader()
                    session.heard()
                    let (state, epoch) = try receiveCheckpointFrame(type, length: length, staging: staging, channel: watched)
                    guard let state else { continue }
                    phase = .protecting(state: state, epoch: epoch)
                    session.committed(epoch)
                    try channel.send(.checkpointAck, EpochFrame(epoch: epoch).encode())
                }
            } catch {
                guard case .protecting(_, let epoch) = phase, !stopping() else { throw error }
                staging.reset()   // a torn epoch is dropped whole
                switch error {
                case .peerAborted, .refused, .cancelled:
                    throw error   // replicationEnd or an abort: the primary lives and says why
                case _ where Self.refusedByUs(error):
                    // The primary is alive but sent something we refused (a bad checkpoint, or a
                    // TLS record that failed its integrity check: the stream was tampered with
                    // on the way): tell it, keep the copy.
                    channel.sendAbort("the standby refused a checkpoint (\(error)); it keeps checkpoint \(epoch) and takes over only on 'dirtymig failover'")
                    keepWaiting = true
                default:
                    break
                }
                lost = session.failoverRequested ? "failover requested" : "\(error)"
                break receiving
            }
        }
        guard case .protecting(let state, let epoch) = phase else { throw .machine("unreachable: no checkpoint") }
        if (session.options.failover == .manual || keepWaiting) && !session.failoverRequested {
            log("the primary is lost (\(lost)); holding checkpoint \(epoch): run 'dirtymig failover' to resume the VM here")
            guard session.awaitFailover(reason: lost, stopping: stopping) else {
                throw .cancelled(MigrationReceiver.stoppingReason)
            }
        }
        session.takingOver()
        do {
            try vm.restoreState(try MachineState(decoding: state))
        } catch {
            throw .machine("cannot resume the VM from checkpoint \(epoch): \(error)")
        }
        guard commit() else { throw .cancelled(MigrationReceiver.stoppingReason) }
        do { try vm.start() } catch {
            vm.stop()
            throw .machine("cannot resume the VM from checkpoint \(epoch): \(error)")
        }
        log("took over from the primary (\(lost)): the VM runs here from checkpoint \(epoch)")
        return vm
    }

    /// Whether the replication ended because this side refused what arrived (the primary lives).
    static func refusedByUs(_ error: MigrationError) -> Bool {
        switch error {
        case .protocolError: return true
        case .connection(let failure): return failure.errno == EBADMSG || failure.errno == EPROTO
        default: return false
        }
    }

    /// A frame of the checkpoint stream. Returns the state of a checkpoint just applied (and
    /// its epoch), or nil for a frame that does not complete one.
    private static func receiveCheckpointFrame(_ type: MigrationFrameType, length: Int, staging: CheckpointStaging,
                                               channel: MigrationChannel) throws(MigrationError) -> ([UInt8]?, UInt64) {
        switch type {
        case .checkpointPages:
            try staging.receivePages(from: channel, payloadLength: length)
            return (nil, 0)
        case .checkpointEnd:
            let payload = try channel.receivePayload(length)
            let end = try MigrationError.wrap { () throws(MigrationProtocolError) in try CheckpointEnd(decoding: payload) }
            return (try staging.apply(end), end.epoch)
        case .heartbeat:
            _ = try channel.receivePayload(length)
            return (nil, 0)
        case .replicationEnd:
            let reason = MigrationChannel.abortReason(try channel.receivePayload(length))
            throw .peerAborted("the primary stopped replicating (\(reason)); the standby discarded its copy")
        case .abort:
            throw .peerAborted(MigrationChannel.abortReason(try channel.receivePayload(length)))
        default:
            throw .protocolError(.unexpected("a \(type) frame in a replication"))
        }
    }
}
