import Foundation
import Synchronization

/// The primary side of continuous replication, inside the VM's process (seed 004, Remus).
///
/// `start` connects to a standby, copies the VM to it as a migration's pre-copy does, and takes
/// a first checkpoint; it returns once the standby has acknowledged it (the VM is protected).
/// From then on two threads run until `stop` or until the standby is lost:
/// - the epoch thread: when `--checkpoint-interval` has passed, or the guest has dirtied
///   `--checkpoint-pages` pages (the ring's dirty trigger), and the checkpoint before has crossed
///   the link (acknowledged, or all taken by the standby's TCP: on a link slower than the guest
///   dirties memory the epoch stretches to what the link carries, rather than a queue of stale
///   checkpoints waiting in the buffers), it pauses the vCPUs, collects the
///   epoch's dirty pages as a dense list, copies them and the vCPU/device state into the staging
///   buffer, resumes the vCPUs and sends the buffer while the next epoch runs; it is the only
///   thread that sends, so the end of replication goes out between two frames;
/// - the listening thread: each checkpointAck releases the guest output held for that epoch
///   (output commit); `StandbyLiveness` decides when silence means the standby is lost (then the
///   VM runs on unprotected and its output flows again); after that it keeps listening, so that
///   a standby that took over meanwhile (a link cut both sides saw) is heard of when the link
///   comes back, and this copy's output stops (`superseded`).
///
/// A standby lost is sought again for `--reprotect-for` (the re-protecting thread): the
/// standby's address is tried with back-off, greeting it as the same replication resuming (one
/// session id for the replicator's life). A standby that still holds a checkpoint of it names
/// that checkpoint and receives only the pages changed since (`CheckpointLedger`); one that holds nothing gets the initial copy again; then the
/// checkpoints resume. The lost connection stays open meanwhile, its listening thread
/// listening for a takeover, until the standby has answered: a standby that took over (said on
/// either connection) is never protected against: this copy is stale then, and replication ends.
///
/// The connection is never closed while the standby could read the close as a dead primary:
/// a stop or a loss first sends `replicationEnd` (the standby discards its copy), and a stop
/// waits for the standby to confirm it (`replicationEnded`) for as long as the link carries
/// data.
public final class Replicator: Sendable {
    public let machine: Machine
    public let options: ReplicationOptions
    private let state: Mutex<Shared>
    /// Signalled by the dirty trigger, by an acknowledgement and by stop().
    private let wake = DispatchSemaphore(value: 0)
    /// The dirty trigger fired in this epoch.
    private let triggered = Atomic<Bool>(false)
    /// Signalled as a connection's epoch thread ends: the re-protecting thread greets the standby
    /// before (that thread may be stuck in a send on the lost connection until the standby's
    /// answer lets it be closed), and resyncs only after (it is the only thread that sends, and
    /// records what it staged). A lost connection's listening thread goes on (see `generation`).
    private let epochsDone = DispatchSemaphore(value: 0)
    /// The replication's session id, the same in every hello (a reconnection greets the standby
    /// as the same replication resuming).
    private let replication = SessionID.random()
    /// Wakes the re-protecting thread from its back-off (a stop); signalled as it ends.
    private let reprotectWake = DispatchSemaphore(value: 0)
    private let reprotectDone = DispatchSemaphore(value: 0)
    /// Raised by `stop` and by the loss of the standby; read for every page of the initial copy.
    private let stopping = Atomic<Bool>(false)
    /// Signalled once the end of replication is settled: confirmed by the standby, or the
    /// standby lost or gone (what `stop` waits for).
    private let endSettled = DispatchSemaphore(value: 0)
    /// Where the primary's own log lines go (its stderr in `dirtymig boot`): the loss of the
    /// standby and a takeover by it, with the reason.
    private let log: @Sendable (String) -> Void

    private struct Shared {
        var figures: ReplicationFigures
        var session: MigrationSession?
        var stopReason: String?
        var lost = false
        /// replicationEnd went out; `endConfirmed` once the standby said it discarded its copy.
        var endSent = false
        var endSettled = false
        /// The connection while it is being set up, which `stop` cuts short (one per connection).
        var attempt = ConnectionAttempt()
        /// A connection's two threads run (a loss then hands over to the re-protecting thread).
        var connected = false
        /// The re-protecting thread runs, and the epoch thread: whichever of them ends last
        /// releases the machine's transfer claim.
        var reprotecting = false
        var epochsRunning = false
        /// Until when the re-protecting thread tries (monotonic ns); nil when it does not.
        var reprotectDeadline: UInt64?
        /// Why the standby was lost last, for the error while re-protecting.
        var lossReason: String?
        /// Checkpoints sent and acknowledged on this connection: one a lost connection left
        /// unanswered is no answer owed by the next standby.
        var connectionSent: UInt64 = 0
        var connectionAcknowledged: UInt64 = 0
        /// Counts connections: a listening thread whose connection is no longer the current one
        /// listens only for a takeover, and its connection's end is no news.
        var generation: UInt64 = 0
        /// The pages of the checkpoints the standby has not acknowledged (a resync's delta).
        var ledger = CheckpointLedger(capacity: Int(Replicator.maxUnanswered) + 2)
        /// The lost connection, open until the standby answered a resume (or was given up on).
        var lostSession: MigrationSession?
        /// When the last checkpoint's pause began, and the epochs' lengths (`--checkpoint-interval`,
        /// or longer when an acknowledgement took longer).
        var lastPauseStart: UInt64?
        var epochs = RecentSamples()
        var started: UInt64 = MonotonicClock.nanoseconds()
        var pauses = RecentSamples()
        var dirtyPages = RecentSamples()
        var pagesCopiedPaused = RecentSamples()
        var outputDelays = RecentSamples()
        var pauseParts = PausePart.allCases.map { _ in RecentSamples() }
        var acknowledged = RateWindow()
        var bytes = RateWindow()
    }

    public init(machine: Machine, options: ReplicationOptions, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.machine = machine
        self.options = options
        self.log = log
        var figures = ReplicationFigures(
            standby: options.standby.description, track: machine.configuration.tracking,
            intervalSeconds: options.intervalSeconds, checkpointPages: options.checkpointPages)
        figures.compression.mode = options.compression
        figures.reprotectForSeconds = options.reprotectForSeconds
        state = Mutex(Shared(figures: figures))
    }

    /// The figures now (recent windows for medians and rates).
    public var figures: ReplicationFigures {
        let delays = machine.output.takeDelays()
        let now = MonotonicClock.nanoseconds()
        return state.withLock { shared in
            for delay in delays { shared.outputDelays.add(Double(delay) / 1e6) }
            var figures = shared.figures
            figures.pauseMedianMs = shared.pauses.percentile(50)
            figures.pauseP99Ms = shared.pauses.percentile(99)
            figures.pauseMaxMs = shared.pauses.maximum
            figures.pausePartsMedianMs = PausePart.allCases.map { ($0.name, shared.pauseParts[$0.rawValue].percentile(50)) }
            if let median = shared.pauses.positionOfPercentile(50) {
                figures.medianPauseParts = PausePart.allCases.map { ($0.name, shared.pauseParts[$0.rawValue].value(at: median)) }
            }
            figures.effectiveIntervalMedianMs = shared.epochs.isEmpty ? nil : shared.epochs.percentile(50)
            figures.dirtyPagesMedian = shared.dirtyPages.percentile(50)
            figures.dirtyPagesMax = shared.dirtyPages.maximum
            figures.pagesCopiedPausedMedian = shared.pagesCopiedPaused.percentile(50)
            figures.outputDelayMedianMs = shared.outputDelays.percentile(50)
            figures.outputDelayP99Ms = shared.outputDelays.percentile(99)
            figures.pauseSamples = shared.pauses.count
            figures.outputDelaySamples = shared.outputDelays.count
            figures.checkpointsPerSecond = figures.status == .protected ? shared.acknowledged.perSecond(now: now) : 0
            figures.bytesPerSecond = figures.status == .protected ? shared.bytes.perSecond(now: now) : 0
            figures.outputLinesReleased = machine.output.releasedCount
            figures.outputLinesHeld = machine.output.heldCount
            figures.uptimeSeconds = Double(now - shared.started) / 1e9
            if figures.status == .unprotected, let deadline = shared.reprotectDeadline {
                figures.reprotectSecondsLeft = Double(deadline > now ? deadline - now : 0) / 1e9
            }
            return figures
        }
    }

    /// Starts the recent windows (pauses, dirty pages, output delays) afresh: a benchmark's
    /// warm-up and the first checkpoint (which carries the initial copy's last pages) leave them.
    public func resetWindows() {
        _ = machine.output.takeDelays()
        state.withLock { shared in
            shared.pauses = RecentSamples()
            shared.dirtyPages = RecentSamples()
            shared.pagesCopiedPaused = RecentSamples()
            shared.outputDelays = RecentSamples()
            shared.epochs = RecentSamples()
            shared.pauseParts = PausePart.allCases.map { _ in RecentSamples() }
        }
    }

    /// Nothing runs any more: stopped, superseded, or unprotected without re-protecting.
    public var isFinished: Bool {
        state.withLock { shared in
            [.stopped, .superseded].contains(shared.figures.status) || (shared.figures.status == .unprotected && !shared.reprotecting)
        }
    }

    /// Unprotected, and looking for the standby again (`--reprotect-for`).
    public var isReprotecting: Bool { state.withLock { $0.reprotecting } }

    // MARK: Start: connect, initial copy, first checkpoint

    /// Runs until the standby holds a first checkpoint (status `protected`) or replication
    /// failed to start (`unprotected`, with the reason in `error`). The caller must hold the
    /// machine's transfer claim; it is released when replication ends.
    @discardableResult
    public func start() -> ReplicationFigures {
        var opened: MigrationChannel?
        do {
            let (channel, _) = try connect()
            opened = channel
            let compressor = try initialCopy(channel)
            runConnection(channel, compressor: compressor)
        } catch {
            lose(error.description)
            abandon(opened, because: error)
            machine.transferClaim.release()
        }
        return figures
    }

    /// The connection's two threads, from its first checkpoint on.
    private func runConnection(_ channel: MigrationChannel, compressor: PageBatchCompressor?) {
        let (generation, connection) = state.withLock { shared in
            shared.connected = true
            shared.epochsRunning = true
            shared.reprotecting = false   // the epoch thread holds the transfer claim now
            return (shared.generation, shared.session?.control)
        }
        // From protection on (the initial copy is a bulk transfer; a primary dead during it
        // leaves nothing to take over).
        connection?.tcp.limitUnsentBytes(Self.unsentBytesLimit)
        _ = OSThread(name: "repl-listen") { [self] in
            if let connection { listenToStandby(channel, connection: connection, generation: generation) }
        }
        let heartbeat = PrimaryHeartbeat.start(channel: channel) { [self] in heartbeatNanoseconds.load(ordering: .relaxed) }
        _ = OSThread(name: "repl-epochs") { [self] in epochLoop(channel, heartbeat: heartbeat, compressor: compressor) }
    }

    /// A connection that failed before its threads ran: the first checkpoint may have reached
    /// the standby, which must discard it, not read the close as a dead primary.
    private func abandon(_ opened: MigrationChannel?, because error: MigrationError) {
        if let opened {
            let reason = MigrationReason("the primary could not start replicating (\(error)); it runs the VM on, unprotected")
            opened.transport.setReceiveDeadline(nil)
            try? opened.send(.replicationEnd, reason.encode())
        }
        // Not the lost connection, while re-protecting: its listening thread waits on it for word
        // of a takeover (an attempt that failed before it connected leaves it the current one).
        state.withLock { $0.session === $0.lostSession ? nil : $0.session }?.close()
    }

    /// `again`: a re-protection (the figures go on; `started` stays the first connection's);
    /// `resume`: greet the standby as this replication resuming (it answers with the checkpoint
    /// it holds, or refuses with a kind of refusal: `.refused` then carries the reply).
    private func connect(again: Bool = false, resume: Bool = false) throws(MigrationError) -> (MigrationChannel, MigrationHelloReply) {
        guard machine.tracker != nil else {
            throw .machine("this VM was started without dirty tracking; boot it with --track bitmap, ring or quota")
        }
        let started = MonotonicClock.nanoseconds()
        let session: MigrationSession
        let (attempt, lostRoundTrip) = state.withLock { ($0.attempt, $0.lostSession?.control.tcp.leastRoundTripSeconds) }
        do {
            session = try MigrationSession.connect(to: options.standby, security: options.security, id: replication,
                                                   timeout: again ? Self.reconnectTimeout(roundTrip: lostRoundTrip) : 5,
                                                   attempt: attempt)
        } catch {
            if let reason = state.withLock({ $0.stopReason }) { throw .cancelled(reason) }
            throw error
        }
        // The acknowledgements are read on one thread while checkpoints go out on another.
        session.control.allowConcurrentSendAndReceive()
        let stopped = state.withLock { shared -> Bool in
            shared.session = session
            if !again { shared.started = started }
            shared.figures.channel = session.control.channel
            return shared.stopReason != nil
        }
        if stopped { throw .cancelled(state.withLock { $0.stopReason } ?? "stopped") }
        let channel = session.channel
        var hello = MigrationHello(announcing: machine)
        hello.replicate = true
        hello.resume = resume
        hello.pageCodecCode = options.compression.codec.rawValue
        let reply: MigrationHelloReply
        do { reply = try session.answer(hello) } catch {
            session.close()
            throw error
        }
        guard reply.accepted else {
            session.close()
            // A resume's refusal says what to do (start afresh, or this copy is stale).
            if resume && reply.refusal != .other { return (channel, reply) }
            throw .refused(reply.reason)
        }
        heartbeatNanoseconds.store(UInt64(max(reply.heartbeatMilliseconds, 5)) * 1_000_000, ordering: .relaxed)
        state.withLock { $0.figures.setupSeconds = Double(MonotonicClock.nanoseconds() - started) / 1e9 }
        return (channel, reply)
    }

    /// What the replication connection may hold unsent. A primary's process that dies has its
    /// kernel send what was queued, then close: the standby hears bytes until then, and takes
    /// over only at the close. With the send buffer the kernel grew (megabytes: a checkpoint
    /// waiting for a slow link), a SIGKILLed primary on a 20 Mbit/s link let its standby run
    /// the guest 2,031 ms after the kill, against 521 ms for a primary whose link was cut
    /// (`dirtymig-bench link --failover`). 256 KiB is 0.1 s at that rate.
    static let unsentBytesLimit: Int32 = 256 << 10

    /// How long a re-protecting attempt waits for its connection: four of the lost connection's
    /// least round trips, from 0.5 s to 5 s. A connect whose SYN a cut link dropped waits for
    /// the kernel's retransmissions (1 s, then 3 s later), while a fresh attempt sends a fresh
    /// SYN: with 5 s, a standby whose link came back was reached 0.9 s or 2.1 s after the
    /// link's return (a 2 MiB resync at 20 Mbit/s, `dirtymig-bench link --failover --only
    /// return --working-set 2M`), depending on which retransmission came first. The smoothed
    /// round trip would not do: a sender that fills a slow link's queue makes it seconds long.
    static func reconnectTimeout(roundTrip: Double?) -> Double {
        min(5, max(0.5, 4 * (roundTrip ?? 1.25)))
    }

    /// How often the standby wants to hear from us (a fifth of its --failover-after).
    private let heartbeatNanoseconds = Atomic<UInt64>(100_000_000)

    /// Silence from the standby for this long (beyond an epoch) means it is lost (see
    /// StandbyLiveness): twice its --failover-after, so that a standby that took over has done
    /// so before this side lets its held output go (and at least a second, for a busy machine's
    /// scheduling).
    private var lossNanoseconds: UInt64 {
        max(1_000_000_000, 10 * heartbeatNanoseconds.load(ordering: .relaxed)) + UInt64(options.intervalSeconds * 1e9)
    }

    /// The migration's pre-copy, live, until what is left is small; then the first checkpoint.
    /// Returns the compressor (`--compress`), whose measurements the checkpoints go on with.
    /// A re-protection (`again`) names what its standby holds: `resync`, the pages changed
    /// since its checkpoint (pass 1 carries only those), or why it gets the whole VM.
    private func initialCopy(_ channel: MigrationChannel, again: Bool = false,
                             resync: Result<DirtyPageBitmap, CheckpointLedger.FullCopyReason> = .failure(.nothingHeld),
                             heldEpoch: UInt64? = nil, dialled: UInt64 = 0) throws(MigrationError) -> PageBatchCompressor? {
        let started = MonotonicClock.nanoseconds()
        let passes = try PreCopyPasses(memory: machine.memory, tracker: machine.tracker!, channel: channel,
                                       compression: options.compression, changedSince: try? resync.get())
        var bytes: UInt64 = 0, pages: UInt64 = 0
        defer { state.withLock { $0.figures.ringOverruns += passes.ringOverruns } }
        // A resync no larger than a first checkpoint may be goes out as that checkpoint, with no
        // pass before it: on a link slower than the guest dirties its working set, a pass of the
        // changed pages left about as much dirty again, and the checkpoint carried it all a second
        // time (a 20 Mbit/s link and a guest rewriting 8 MiB: 16 MiB and 8 s from the link's
        // return to protected, where one crossing of 8 MiB takes 3.4 s).
        let passesFirst = !(passes.resyncsChanges && passes.pending.count <= Self.firstCheckpointPages)
        for _ in 1...Self.maxInitialPasses where passesFirst {
            let outcome = try passes.run(shouldStop: { isStopping })
            bytes += outcome.sent.bytes
            pages += outcome.sent.normalPages + outcome.sent.zeroPages
            let shrinking = outcome.dirty.count < outcome.carried / 2
            if passes.pending.count <= Self.firstCheckpointPages || !shrinking { break }
            if isStopping { throw .cancelled(stopReasonText) }
        }
        let pending = passes.pending
        // The first checkpoint carries what the last pass left dirty as well.
        let staged = StagedCheckpoint(preparedPages: pending.count + 1024)
        staged.begin()
        let epoch = try checkpoint(into: staged, carrying: pending, first: true)
        let compressor = passes.transfer.pages.compressor
        guard let sent = try staged.send(over: channel, compressor: compressor, shouldStop: { isStopping }) else {
            throw .cancelled(stopReasonText)
        }
        bytes += sent
        pages += UInt64(staged.pages.count)
        state.withLock { shared in
            shared.figures.checkpointsSent += 1
            shared.connectionSent += 1
        }
        let ack = try channel.receive(.checkpointAck) { payload throws(MigrationProtocolError) in
            try EpochFrame(decoding: payload, what: "checkpoint ack")
        }
        guard ack.epoch == epoch else {
            throw .protocolError(.unexpected("an acknowledgement of checkpoint \(ack.epoch) after checkpoint \(epoch)"))
        }
        let stoppedMeanwhile = state.withLock { shared -> Bool in
            // A stop while re-protecting finds the status unprotected and does not wait for an
            // end the standby confirms: this connection must not go on to checkpoints.
            if again && shared.stopReason != nil { return true }
            let now = MonotonicClock.nanoseconds()
            if again {
                var full: String?
                if !passes.resyncsChanges {
                    if case .failure(let reason) = resync { full = reason.description } else { full = CheckpointLedger.FullCopyReason.dirtyInformationLost.description }
                }
                shared.figures.lastReprotect = ReprotectFigures(
                    delta: passes.resyncsChanges, fullBecause: full, heldEpoch: heldEpoch, pages: pages, bytes: bytes,
                    seconds: Double(now - (dialled == 0 ? started : dialled)) / 1e9)
                if passes.resyncsChanges { shared.figures.reprotectDeltas += 1 }
            } else {
                shared.figures.initialSeconds = Double(now - started) / 1e9
                shared.figures.initialBytes = bytes
            }
            shared.ledger.started(at: epoch)
            shared.figures.bytesSent += bytes
            shared.figures.status = .protected
            shared.figures.compression = CompressionReport(mode: options.compression, tally: compressor?.tally ?? CompressionTally())
            if again {
                shared.figures.error = nil
                shared.figures.reprotections += 1
                shared.reprotectDeadline = nil
            }
            return false
        }
        if stoppedMeanwhile { throw .cancelled(stopReasonText) }
        acknowledged(epoch)
        if let pages = options.checkpointPages { armDirtyTrigger(pages: pages) }
        return compressor
    }

    /// Pages the staging buffer holds from the start (16 MiB): epochs up to this size never
    /// allocate while the vCPUs are paused.
    static let preparedPages = 4096
    /// Passes before the first checkpoint at most; fewer when the dirty set stops shrinking.
    static let maxInitialPasses = 8
    /// The first checkpoint is taken once a pass leaves at most this many pages dirty (16 MiB
    /// copied while paused, once).
    static let firstCheckpointPages = 4096

    // MARK: Epochs

    /// Pauses the vCPUs, collects the epoch's dirty pages as a dense list (plus `carrying`, the
    /// first time), stages them (over what was staged while the epoch ran) and the state, closes
    /// the output epoch, resumes. Returns the epoch (the pause goes into the figures).
    private func checkpoint(into staged: StagedCheckpoint, carrying: DirtyPageBitmap? = nil,
                            first: Bool = false) throws(MigrationError) -> UInt64 {
        let tracker = machine.tracker!
        let pauseStart = MonotonicClock.nanoseconds()
        var mark = pauseStart
        var parts = [Double](repeating: 0, count: PausePart.allCases.count)
        func lap(_ part: PausePart) {
            let now = MonotonicClock.nanoseconds()
            parts[part.rawValue] = Double(now - mark) / 1e6
            mark = now
        }
        machine.pause()
        defer { machine.resume() }
        lap(.stopVCPUs)
        let list: DirtyList
        do { list = try tracker.collectList() } catch { throw .machine("dirty tracking failed: \(error)") }
        while wake.wait(timeout: .now()) == .success {}   // a trigger that fired for this epoch
        triggered.store(false, ordering: .releasing)
        var pages = list.pages
        let lost = list.losses.count + staged.lossesSeen
        if lost > 0 {
            // Dirty information was lost: everything that holds data could have changed.
            staged.startResync(losses: list.losses.count)
            pages = machine.memory.dataPages().pageList()
        } else if var carried = carrying {
            for page in pages { carried.set(Int(page)) }
            pages = carried.pageList()
        }
        lap(.collect)
        staged.stage(pages, from: machine.memory, paused: true)
        lap(.copy)
        let saved: [UInt8]
        do { saved = try machine.saveState().encode() } catch { throw .machine("cannot save the vCPU state: \(error)") }
        staged.setState(saved)
        if first { machine.output.startHolding() }
        let epoch = machine.output.endEpoch()
        staged.setEpoch(epoch)
        lap(.state)
        // The pause ends here, as the vCPUs are let back in; `resume` is what letting them in
        // costs this thread (on two cores, mostly waiting while the woken vCPU threads run).
        let pause = MonotonicClock.nanoseconds() - pauseStart
        machine.resume()
        lap(.resume)
        state.withLock { shared in
            if let last = shared.lastPauseStart, !first { shared.epochs.add(Double(pauseStart - last) / 1e6) }
            shared.lastPauseStart = pauseStart
            shared.pauses.add(Double(pause) / 1e6)
            for part in PausePart.allCases { shared.pauseParts[part.rawValue].add(parts[part.rawValue]) }
            shared.dirtyPages.add(Double(staged.pages.count))
            shared.pagesCopiedPaused.add(Double(staged.pagesCopiedPaused))
            if staged.resync {
                shared.figures.ringOverruns += UInt64(lost)
                shared.figures.resyncs += 1
            }
        }
        return epoch
    }

    /// While the epoch runs: collects what the guest has dirtied so far and copies it into the
    /// staging buffer, so that the pause copies only what comes after. With the dirty trigger,
    /// the pages staged count towards it (the trigger re-arms at every collection).
    private func stageWhileRunning(_ staged: StagedCheckpoint) throws(MigrationError) {
        guard !staged.resync else { return }
        let tracker = machine.tracker!
        let list: DirtyList
        do { list = try tracker.collectList() } catch { throw .machine("dirty tracking failed: \(error)") }
        if !list.isComplete {
            staged.startResync(losses: list.losses.count)
        } else if !list.pages.isEmpty {
            staged.stage(list.pages, from: machine.memory, paused: false)
        }
        if let pages = options.checkpointPages { armDirtyTrigger(pages: max(pages - staged.pages.count, 1)) }
    }

    /// The epoch ends once the guest has dirtied `pages` more (ring and quota tracking).
    private func armDirtyTrigger(pages: Int) {
        guard let tracker = machine.tracker, tracker.hasDirtyTrigger else { return }
        tracker.setDirtyTrigger(pages: pages) { [self] in
            triggered.store(true, ordering: .releasing)
            wake.signal()
        }
    }

    /// Epochs shorter than this are not staged while they run: their pauses copy little, and a
    /// collection more per epoch would lower the highest checkpoint rate.
    static let shortestStagedEpochNanoseconds: UInt64 = 5_000_000
    /// Early stages stop once the epoch has less than this left: the pause copies what the
    /// guest dirties in about this long (1,000 pages at 160 MiB/s took 0.75 ms to copy paused).
    static let lastStageLeadNanoseconds: UInt64 = 2_000_000

    /// How often an epoch past its end looks whether the checkpoint before has crossed the link.
    static let crossingPollNanoseconds: UInt64 = 1_000_000
    /// Checkpoints the standby's TCP took but its reader has not answered, at most, before an
    /// epoch waits for an answer: a reader that falls behind is not buried under more.
    static let maxUnanswered: UInt64 = 4

    /// Whether the next epoch may end: the checkpoint before is acknowledged, or the standby's
    /// TCP holds all of it (the link carried it; its answer follows) and fewer than
    /// `maxUnanswered` are unanswered. Waiting for the answer alone cut the highest checkpoint
    /// rate with a 25 MiB/s writer (0.1 ms epochs, two shared cores: each answer waits for the
    /// standby's threads to be scheduled) to 994 a second with the ring and 269 with the bitmap;
    /// this way it was 3,762 and 3,007 (`dirtymig-bench replication --only rate`).
    private func previousCheckpointCrossed() -> Bool {
        let (unanswered, connection) = state.withLock { shared in
            (shared.connectionSent - min(shared.connectionSent, shared.connectionAcknowledged), shared.session?.control)
        }
        if unanswered == 0 { return true }
        guard unanswered < Self.maxUnanswered, let progress = connection?.tcp.progress else { return false }
        return progress.allAcknowledged
    }

    private func epochLoop(_ channel: MigrationChannel, heartbeat: PrimaryHeartbeat, compressor: PageBatchCompressor?) {
        let staged = StagedCheckpoint(preparedPages: Self.preparedPages)
        let interval = UInt64(options.intervalSeconds * 1e9)
        let stagesEarly = options.stagesWhileRunning && interval >= Self.shortestStagedEpochNanoseconds
        var epochStart = MonotonicClock.nanoseconds()
        var lastStats = epochStart
        defer {
            heartbeat.end()
            machine.tracker?.setDirtyTrigger(pages: nil, nil)
            // A loss that re-protects hands the claim to the re-protecting thread (decided with
            // the loss, before this thread saw `stopping`), unless that one ended first.
            let last = state.withLock { shared -> Bool in
                // Pages an unfinished epoch took from the tracker are owed to a resync too.
                shared.ledger.addUnsent(staged.pages)
                if staged.resync { shared.ledger.forget() }
                shared.epochsRunning = false
                return !shared.reprotecting
            }
            if last { machine.transferClaim.release() }
            epochsDone.signal()
        }
        do {
            while true {
                staged.begin()
                let end = epochStart + interval
                // The first early stage halfway through the epoch, each next one halfway through
                // what is left, until the lead is reached: each copies about half the one before.
                var nextStage: UInt64? = stagesEarly ? epochStart + interval / 2 : nil
                // Wait for the epoch's end: its interval or the dirty trigger, once the checkpoint
                // before is acknowledged; or a stop. (The heartbeat says we live meanwhile.)
                var stretched = false
                while !isStopping {
                    var now = MonotonicClock.nanoseconds()
                    if now - lastStats >= 1_000_000_000 { writeStats(); lastStats = now }
                    let over = now >= end || triggered.load(ordering: .acquiring)
                    if over {
                        if previousCheckpointCrossed() {
                            // Stretched past its interval, the epoch dirtied more than its early
                            // stages copied: one more stage, so the pause copies only what the
                            // guest dirties during it.
                            if stretched && stagesEarly { try stageWhileRunning(staged) }
                            break
                        }
                        stretched = true
                        nextStage = nil
                    }
                    if let due = nextStage, now >= due {
                        try stageWhileRunning(staged)
                        now = MonotonicClock.nanoseconds()
                        nextStage = end > now && end - now >= 2 * Self.lastStageLeadNanoseconds ? now + (end - now) / 2 : nil
                        continue
                    }
                    // An acknowledgement, the trigger or a stop wakes this up early; the standby's
                    // TCP taking the rest of a checkpoint does not, so that is looked at again soon.
                    let until = over ? min(lastStats + 1_000_000_000, now + Self.crossingPollNanoseconds)
                                     : min(lastStats + 1_000_000_000, end, nextStage ?? end)
                    _ = wake.wait(timeout: .now() + .nanoseconds(Int(until > now ? until - now : 0)))
                }
                if isStopping { break }
                epochStart = MonotonicClock.nanoseconds()
                let epoch = try checkpoint(into: staged)
                state.withLock { $0.ledger.record(epoch: epoch, pages: staged.pages) }
                // A stop or a loss abandons the checkpoint between two of its frames: the end of
                // replication must not wait behind megabytes on a slow link.
                guard let bytes = try heartbeat.sending({ () throws(MigrationError) in
                    try staged.send(over: channel, compressor: compressor, shouldStop: { isStopping })
                }) else { break }
                let sent = MonotonicClock.nanoseconds()
                state.withLock { shared in
                    if let compressor { shared.figures.compression.tally = compressor.tally }
                    shared.figures.checkpointsSent += 1
                    shared.connectionSent += 1
                    shared.figures.bytesSent += bytes
                    shared.bytes.add(Double(bytes), at: sent)
                }
            }
            sendEnd(channel, heartbeat: heartbeat)
        } catch {
            // Not the link's failure: pages taken from the tracker may be in no record.
            if case .connection = error {} else { state.withLock { $0.ledger.forget() } }
            lose("the standby is lost: \(error)")
        }
    }

    /// Tells the standby that replication ends, between two frames: stopped on purpose (it
    /// discards its copy and confirms), or given up by this side (it discards its copy rather
    /// than take over a VM that runs on here).
    private func sendEnd(_ channel: MigrationChannel, heartbeat: PrimaryHeartbeat) {
        let end = state.withLock { shared -> (String, Bool)? in
            // Seeking the standby again, this side has not given up: the standby keeps its copy
            // (a resume sends only what changed since). Told if re-protecting ends without it.
            if shared.lost && shared.reprotecting { return nil }
            shared.endSent = true
            if shared.lost { return ("the primary gave up on its standby (\(shared.figures.error ?? "lost")); it runs the VM on, unprotected", true) }
            return (shared.stopReason ?? "replication was stopped", false)
        }
        guard let (reason, lost) = end else { return }
        heartbeat.end()   // nothing after the end
        do {
            try heartbeat.sending { () throws(MigrationError) in try channel.send(.replicationEnd, MigrationReason(reason).encode()) }
        } catch {
            if !lost { lose("the standby could not be told that replication ends: \(error)") }
        }
    }

    // MARK: Listening to the standby

    /// Reads what the standby sends until the connection ends: acknowledgements, the
    /// confirmation of the end, and word that it took over. Decides when it is lost
    /// (StandbyLiveness); once lost, keeps listening for a takeover only, also while (and after)
    /// a newer connection (`generation` passed) protects the VM: its end is no news then.
    private func listenToStandby(_ channel: MigrationChannel, connection: any MigrationConnection, generation: UInt64) {
        /// Lost, or no longer the current connection: only a takeover is news.
        func watching() -> Bool { state.withLock { $0.lost || $0.generation != generation } }
        func current() -> Bool { state.withLock { $0.generation == generation } }
        var liveness = StandbyLiveness(lossNanoseconds: lossNanoseconds, now: MonotonicClock.nanoseconds())
        while true {
            do throws(MigrationError) {
                while true {
                    let tick = min(heartbeatNanoseconds.load(ordering: .relaxed), 100_000_000)
                    let ready: Bool
                    do { ready = try connection.waitForData(nanoseconds: tick) } catch { throw .connection(error) }
                    if ready {
                        // A frame has begun: the rest of it comes at once, or the link failed. Once the
                        // standby is lost only a takeover is listened for, for as long as the connection
                        // lasts: a deadline could expire while a send of ours holds a TLS connection
                        // (seconds, as a link recovers from a cut), and the word would go unread.
                        let watching = watching()
                        channel.transport.setReceiveDeadline(watching ? nil : MonotonicClock.nanoseconds() + max(lossNanoseconds, 5_000_000_000))
                        let (type, payload) = try channel.receive([.checkpointAck, .replicationEnded, .tookOver, .heartbeat])
                        liveness.heard(at: MonotonicClock.nanoseconds())
                        let epoch = try MigrationError.wrap { () throws(MigrationProtocolError) in
                            try EpochFrame(decoding: payload, what: "\(type)").epoch
                        }
                        switch type {
                        case .checkpointAck: if current() { acknowledged(epoch) }
                        case .replicationEnded:
                            if current() { settleEnd(confirmed: true) }
                            return
                        case .tookOver:
                            superseded(at: epoch)
                            return
                        default: break
                        }
                        continue
                    }
                    let (lost, awaiting) = state.withLock { shared in
                        (shared.lost || shared.generation != generation, shared.endSent || shared.connectionSent > shared.connectionAcknowledged)
                    }
                    if lost { continue }   // only a takeover is still to be heard of
                    if let verdict = liveness.observe(connection.tcp.progress, awaitingAnswer: awaiting, at: MonotonicClock.nanoseconds()) {
                        switch verdict {
                        case .silent(let milliseconds):
                            lose("the standby is lost: nothing from it, and none of our data taken, for \(milliseconds) ms")
                        case .notAnswering(let milliseconds):
                            lose("the standby is lost: it has held everything sent for \(milliseconds) ms without acknowledging it")
                        }
                    }
                }
            } catch {
                let (lost, ending) = state.withLock { ($0.lost || $0.generation != generation, $0.endSent) }
                if lost {
                    // Still open after a timeout (the link is slow again, or cut again): keep
                    // listening for a takeover; a closed connection ends it.
                    if case .connection(let failure) = error, failure.errno == ETIMEDOUT, !isSuperseded { continue }
                    return
                }
                if ending, case .connection = error {
                    // It closed after the end: it holds no copy that could resume.
                    settleEnd(confirmed: true)
                } else {
                    lose("the standby is lost: \(error)")
                }
                return
            }
        }
    }

    /// Checkpoint `epoch` is the standby's copy now: the output held for it may leave.
    private func acknowledged(_ epoch: UInt64) {
        let now = MonotonicClock.nanoseconds()
        state.withLock { shared in
            shared.figures.checkpointsAcknowledged += 1
            shared.connectionAcknowledged += 1
            shared.ledger.acknowledge(epoch)
            shared.figures.lastAcknowledgedEpoch = epoch
            shared.acknowledged.add(1, at: now)
        }
        machine.output.release(through: epoch)
        wake.signal()   // an epoch that waited for it may end
    }

    // MARK: Ending

    private var isStopping: Bool { stopping.load(ordering: .acquiring) }
    private var isSuperseded: Bool { state.withLock { $0.figures.status == .superseded } }
    private var stopReasonText: String { state.withLock { $0.stopReason } ?? "replication was stopped" }

    /// The standby is gone (or never came): the VM runs on here, unprotected; its output flows.
    /// The connection stays open: the epoch thread tells the standby, if it still can, that this
    /// side gave up (so it discards rather than takes over), and the listening thread hears of
    /// a takeover that happened anyway.
    ///
    /// A connection that had its threads running (not a first start that failed: the user sees
    /// that failure) is then sought again for --reprotect-for, unless replication is being
    /// stopped.
    private func lose(_ reason: String) {
        let (first, reprotect) = state.withLock { shared -> (Bool, Bool) in
            guard !shared.lost, shared.figures.status != .stopped, shared.figures.status != .superseded else { return (false, false) }
            shared.lost = true
            stopping.store(true, ordering: .releasing)
            shared.figures.status = .unprotected
            shared.figures.error = reason
            shared.lossReason = reason
            let reprotect = shared.connected && shared.stopReason == nil && options.reprotectForSeconds > 0
            shared.connected = false
            if reprotect {
                shared.reprotecting = true
                shared.reprotectDeadline = MonotonicClock.nanoseconds() + UInt64(options.reprotectForSeconds * 1e9)
            }
            return (true, reprotect)
        }
        guard first else { return }
        log("dirtymig: replication to \(options.standby): \(reason); the VM runs on here, unprotected"
            + (reprotect ? String(format: "; it is protected again if the standby answers within %.0f s", options.reprotectForSeconds) : ""))
        machine.tracker?.setDirtyTrigger(pages: nil, nil)
        machine.output.stopHolding()
        wake.signal()
        settleEnd(confirmed: false)
        if reprotect { _ = OSThread(name: "repl-reprotect") { [self] in reprotectLoop() } }
    }

    // MARK: Re-protecting

    /// The second attempt starts this long after the first; each next one twice as long after
    /// the one before, up to `longestBackoffNanoseconds`, so that a standby back on its address
    /// (or behind a link that came back) is reached within about that long.
    static let firstBackoffNanoseconds: UInt64 = 50_000_000
    static let longestBackoffNanoseconds: UInt64 = 500_000_000

    /// After a loss: waits for the lost connection's epoch thread to end, then tries the
    /// standby's address until one answers and holds a first checkpoint (protected again), or
    /// --reprotect-for runs out, or replication is stopped or superseded. Holds the machine's
    /// transfer claim throughout, and releases it unless a connection took it over.
    ///
    /// Each attempt greets the standby as this replication resuming. One that holds a
    /// checkpoint of it says which, and gets what changed since (or the whole VM, when this
    /// side cannot tell what changed); one that holds nothing is greeted afresh at once and gets
    /// the initial copy; one that took over makes this copy superseded. The lost connection is
    /// left open until the standby answered (an auto standby that still reads it would take a
    /// close for a dead primary), its listening thread listening for a takeover.
    private func reprotectLoop() {
        defer { reprotectDone.signal() }
        state.withLock { shared in
            if shared.lostSession == nil { shared.lostSession = shared.session }
        }
        var backoff = Self.firstBackoffNanoseconds
        var resume = true
        while true {
            let go = state.withLock { shared -> Bool in
                guard shared.figures.status == .unprotected, shared.stopReason == nil,
                      let deadline = shared.reprotectDeadline, MonotonicClock.nanoseconds() < deadline else { return false }
                shared.attempt = ConnectionAttempt()
                return true
            }
            guard go else { return finishReprotecting() }
            var opened: MigrationChannel?
            var resynced = false
            let dialled = MonotonicClock.nanoseconds()
            do throws(MigrationError) {
                // The standby is greeted while the lost connection's epoch thread may still be
                // in a send on it: after a cut, that send waits for TCP's retransmission timer,
                // backed off to a second or more, and only a standby that accepts the resume
                // (or says it holds nothing) lets this side close that connection and end the
                // send. Waiting for the thread first cost 0.85 s after every link's return.
                let (channel, reply) = try connect(again: true, resume: resume)
                if !reply.accepted {
                    switch reply.refusal {
                    case .tookOver:
                        superseded(at: reply.heldEpoch ?? 0)
                        return finishReprotecting()
                    default:
                        // It holds nothing of this replication: a close of the lost connection is
                        // no news to it. Greeted afresh at once.
                        log("dirtymig: replication to \(options.standby): the standby holds no copy of the VM any more (\(reply.reason)); copying the whole VM to it")
                        closeLostSession()
                        resume = false
                        continue
                    }
                }
                if resume { closeLostSession() }   // the standby dropped it when it accepted
                // The lost connection's epoch thread ends before this one touches what the
                // connections share: it is the only thread that sends, and what it staged is
                // recorded for the resync.
                while state.withLock({ $0.epochsRunning }) {
                    _ = epochsDone.wait(timeout: .now() + .milliseconds(100))
                    if !reprotectGoesOn { throw .cancelled(stopReasonText) }
                }
                while epochsDone.wait(timeout: .now()) == .success {}   // each end is signalled once
                state.withLock { shared in
                    // A fresh connection: nothing sent on it yet, nothing lost or ending; the lost
                    // one's listening thread hears only of a takeover from now on (the standby
                    // drops that connection as it accepts this one).
                    shared.generation += 1
                    shared.lost = false
                    shared.endSent = false
                    shared.endSettled = false
                    shared.connectionSent = 0
                    shared.connectionAcknowledged = 0
                    shared.lastPauseStart = nil
                }
                stopping.store(false, ordering: .releasing)
                while endSettled.wait(timeout: .now()) == .success {}   // the lost connection's
                opened = channel
                resynced = true
                let changed = state.withLock { shared in
                    shared.ledger.changed(since: reply.heldEpoch, pageCount: machine.memory.pageCount)
                }
                let compressor = try initialCopy(channel, again: true, resync: changed, heldEpoch: reply.heldEpoch, dialled: dialled)
                let report = state.withLock { $0.figures.lastReprotect }
                log("dirtymig: replication to \(options.standby): the standby answered again; the VM is protected again" + (report.map { "; \($0.summary)" } ?? ""))
                runConnection(channel, compressor: compressor)
                return
            } catch {
                state.withLock { shared in
                    shared.lost = true
                    shared.figures.status = .unprotected
                    shared.figures.error = "\(shared.lossReason ?? "the standby is lost"); trying to protect the VM again: \(error)"
                    // A resync that failed half-way consumed dirty information, and the copy it
                    // was bringing up to date is discarded there: the next one is whole.
                    if resynced { shared.ledger.forget() }
                }
                stopping.store(true, ordering: .releasing)
                machine.tracker?.setDirtyTrigger(pages: nil, nil)
                machine.output.stopHolding()   // a first checkpoint may have started holding it
                abandon(opened, because: error)
            }
            // The back-off runs from the attempt's start: one that waited out its connect timeout
            // (a SYN the cut link dropped) has waited already, and the next SYN goes out at once.
            let wait = state.withLock { shared -> UInt64 in
                let now = MonotonicClock.nanoseconds()
                let left = shared.reprotectDeadline.map { $0 > now ? $0 - now : 0 } ?? 0
                let due = dialled + backoff
                return min(due > now ? due - now : 0, left)
            }
            _ = reprotectWake.wait(timeout: .now() + .nanoseconds(Int(wait)))
            backoff = min(backoff * 2, Self.longestBackoffNanoseconds)
        }
    }

    /// The lost connection is closed once the standby answered a resume (it dropped it) or
    /// said it holds nothing: a close can no longer look like a dead primary to it.
    private func closeLostSession() {
        state.withLock { shared -> MigrationSession? in
            defer { shared.lostSession = nil }
            return shared.lostSession
        }?.close()
    }

    /// Re-protecting ended without the standby (given up, or stopped): a standby that still holds
    /// a copy on the lost connection is told to discard it (it would otherwise take over a VM
    /// that runs on here once it reads on), and the connection is left to its listening thread.
    private func tellTheLostStandby(_ reason: String) {
        guard let lost = state.withLock({ $0.lostSession }) else { return }
        try? lost.channel.send(.replicationEnd, MigrationReason(reason).encode())
    }

    private var reprotectGoesOn: Bool {
        state.withLock { shared in
            guard let deadline = shared.reprotectDeadline else { return false }
            return shared.figures.status == .unprotected && shared.stopReason == nil && MonotonicClock.nanoseconds() < deadline
        }
    }

    /// Re-protecting ends without a standby: given up (said in the error), stopped, or superseded.
    private func finishReprotecting() {
        let superseded = state.withLock { $0.figures.status == .superseded }
        if superseded {
            closeLostSession()
        } else {
            tellTheLostStandby(state.withLock { $0.stopReason }
                               ?? "the primary gave up seeking its standby (--reprotect-for ran out); it runs the VM on, unprotected")
        }
        let last = state.withLock { shared -> Bool in
            if shared.figures.status == .unprotected, shared.stopReason == nil {
                let reason = shared.figures.error ?? shared.lossReason ?? "the standby is lost"
                shared.figures.error = String(format: "%@; no standby answered within --reprotect-for (%.0f s): the VM runs on unprotected (start a replication again with 'dirtymig migrate --continuous')",
                                              reason, options.reprotectForSeconds)
                log("dirtymig: replication to \(options.standby): no standby answered within --reprotect-for; the VM runs on here, unprotected")
            }
            shared.reprotectDeadline = nil
            shared.reprotecting = false
            return !shared.epochsRunning
        }
        if last { machine.transferClaim.release() }
    }

    /// The standby resumed the VM from checkpoint `epoch` (it heard nothing from here for its
    /// --failover-after, most likely a link cut both sides saw): the VM runs there now. This copy
    /// is stale; its output stops at once so that the world sees one VM.
    private func superseded(at epoch: UInt64) {
        let reason = "the standby took over: it resumed the VM from checkpoint \(epoch) and runs it now; this copy's guest output is stopped (stop this copy with 'dirtymig stop')"
        machine.output.fence(because: "its standby \(options.standby) took over: it resumed the VM from checkpoint \(epoch) and runs it now; this copy's guest output is stopped (stop this copy with 'dirtymig stop')")
        state.withLock { shared in
            shared.lost = true
            shared.figures.status = .superseded
            shared.figures.error = reason
            shared.figures.supersededAtEpoch = epoch
        }
        stopping.store(true, ordering: .releasing)
        wake.signal()
        log("dirtymig: replication to \(options.standby): \(reason)")
        settleEnd(confirmed: false)
        state.withLock { $0.session }?.close()
    }

    private func settleEnd(confirmed: Bool) {
        let first = state.withLock { shared -> Bool in
            guard !shared.endSettled else { return false }
            shared.endSettled = true
            if shared.endSent && !shared.lost { shared.figures.endConfirmed = confirmed }
            return true
        }
        if first { endSettled.signal() }
    }

    /// Ends replication: the standby is told (between two frames of whatever is in flight) and
    /// discards its copy; the VM runs on here. Returns once the standby confirmed it, or was lost
    /// (then `endConfirmed` is false and the error says why): it waits as long as the link
    /// carries data, so that a VM stopped on purpose never comes back on its standby.
    @discardableResult
    public func stop(reason: String = "the primary stopped replicating") -> ReplicationFigures {
        let (running, reprotecting, attempt) = state.withLock { shared -> (Bool, Bool, ConnectionAttempt) in
            if shared.stopReason == nil { shared.stopReason = reason }
            stopping.store(true, ordering: .releasing)
            return (shared.figures.status == .protected, shared.reprotecting, shared.attempt)
        }
        attempt.cancel()   // still connecting or in the TLS handshake: cut it now
        wake.signal()
        if running {
            endSettled.wait()
            endSettled.signal()
        }
        if reprotecting {
            // The re-protecting thread sees the stop between two attempts (or its attempt is cut
            // short) and releases the transfer claim: a new replication may start at once.
            reprotectWake.signal()
            reprotectDone.wait()
            reprotectDone.signal()
        }
        let session = state.withLock { shared -> MigrationSession? in
            if shared.figures.status == .protected || shared.figures.status == .starting
                || (reprotecting && shared.figures.status == .unprotected) { shared.figures.status = .stopped }
            // A lost connection not yet settled is left to its listening thread (a standby cut off
            // may still read our end of replication before the close).
            return shared.figures.status == .stopped && !reprotecting ? shared.session : nil
        }
        // Confirmed (or the standby is gone): closing can no longer look like a dead primary.
        session?.close()
        machine.output.stopHolding()
        return figures
    }

    // MARK: Stats file

    private func writeStats() {
        guard let path = options.statsPath else { return }
        let line = figures.json.serialized() + "\n"
        let fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        _ = line.utf8CString.withUnsafeBufferPointer { write(fd, $0.baseAddress, $0.count - 1) }
        close(fd)
    }
}
