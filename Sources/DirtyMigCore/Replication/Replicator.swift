import Foundation
import Synchronization

/// The primary side of continuous replication, inside the VM's process (seed 004, Remus).
///
/// `start` connects to a standby, copies the VM to it as a migration's pre-copy does, and takes
/// a first checkpoint; it returns once the standby has acknowledged it (the VM is protected).
/// From then on two threads run until `stop` or until the standby is lost:
/// - the epoch thread: when `--checkpoint-interval` has passed, or the guest has dirtied
///   `--checkpoint-pages` pages (the ring's dirty trigger), it pauses the vCPUs, collects the
///   epoch's dirty pages as a dense list, copies them and the vCPU/device state into the staging
///   buffer, resumes the vCPUs and sends the buffer while the next epoch runs; it is the only
///   thread that sends, so the end of replication goes out between two frames;
/// - the listening thread: each checkpointAck releases the guest output held for that epoch
///   (output commit); `StandbyLiveness` decides when silence means the standby is lost (then the
///   VM runs on unprotected and its output flows again); after that it keeps listening, so that
///   a standby that took over meanwhile (a link cut both sides saw) is heard of when the link
///   comes back, and this copy's output stops (`superseded`).
///
/// The connection is never closed while the standby could read the close as a dead primary:
/// a stop or a loss first sends `replicationEnd` (the standby discards its copy), and a stop
/// waits for the standby to confirm it (`replicationEnded`) for as long as the link carries
/// data.
public final class Replicator: Sendable {
    public let machine: Machine
    public let options: ReplicationOptions
    private let state: Mutex<Shared>
    /// Signalled by the dirty trigger and by stop().
    private let wake = DispatchSemaphore(value: 0)
    private let threadsDone = DispatchSemaphore(value: 0)
    /// Raised by `stop` and by the loss of the standby; read for every page of the initial copy.
    private let stopping = Atomic<Bool>(false)
    /// Signalled once the end of replication is settled: confirmed by the standby, or the
    /// standby lost or gone (what `stop` waits for).
    private let endSettled = DispatchSemaphore(value: 0)
    /// Where the primary's own log lines go (its stderr in `dirtymig boot`): the loss of the
    /// standby and a takeover by it, with the reason.
    private let log: @Sendable (String) -> Void
    /// The connection while it is being set up, which `stop` cuts short.
    private let attempt = ConnectionAttempt()

    private struct Shared {
        var figures: ReplicationFigures
        var session: MigrationSession?
        var stopReason: String?
        var lost = false
        /// replicationEnd went out; `endConfirmed` once the standby said it discarded its copy.
        var endSent = false
        var endSettled = false
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
            shared.pauseParts = PausePart.allCases.map { _ in RecentSamples() }
        }
    }

    public var isFinished: Bool {
        state.withLock { [.unprotected, .stopped, .superseded].contains($0.figures.status) }
    }

    // MARK: Start: connect, initial copy, first checkpoint

    /// Runs until the standby holds a first checkpoint (status `protected`) or replication
    /// failed to start (`unprotected`, with the reason in `error`). The caller must hold the
    /// machine's transfer claim; it is released when replication ends.
    @discardableResult
    public func start() -> ReplicationFigures {
        var opened: MigrationChannel?
        do {
            let channel = try connect()
            opened = channel
            let compressor = try initialCopy(channel)
            _ = OSThread(name: "repl-listen") { [self] in listenToStandby(channel) }
            _ = OSThread(name: "repl-epochs") { [self] in epochLoop(channel, compressor: compressor) }
        } catch {
            lose(error.description)
            // The first checkpoint may have reached the standby: it must discard it, not read
            // the close as a dead primary.
            if let opened {
                let reason = MigrationReason("the primary could not start replicating (\(error)); it runs the VM on, unprotected")
                opened.transport.setReceiveDeadline(nil)
                try? opened.send(.replicationEnd, reason.encode())
            }
            state.withLock { $0.session }?.close()
            machine.transferClaim.release()
        }
        return figures
    }

    private func connect() throws(MigrationError) -> MigrationChannel {
        guard machine.tracker != nil else {
            throw .machine("this VM was started without dirty tracking; boot it with --track bitmap, ring or quota")
        }
        let started = MonotonicClock.nanoseconds()
        let session: MigrationSession
        do { session = try MigrationSession.connect(to: options.standby, security: options.security, attempt: attempt) } catch {
            if let reason = state.withLock({ $0.stopReason }) { throw .cancelled(reason) }
            throw error
        }
        // The acknowledgements are read on one thread while checkpoints go out on another.
        session.control.allowConcurrentSendAndReceive()
        let stopped = state.withLock { shared -> Bool in
            shared.session = session
            shared.started = started
            shared.figures.channel = session.control.channel
            return shared.stopReason != nil
        }
        if stopped { throw .cancelled(state.withLock { $0.stopReason } ?? "stopped") }
        let channel = session.channel
        var hello = MigrationHello(announcing: machine)
        hello.replicate = true
        hello.pageCodecCode = options.compression.codec.rawValue
        let reply = try session.greet(hello)
        heartbeatNanoseconds.store(UInt64(max(reply.heartbeatMilliseconds, 5)) * 1_000_000, ordering: .relaxed)
        state.withLock { $0.figures.setupSeconds = Double(MonotonicClock.nanoseconds() - started) / 1e9 }
        return channel
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
    private func initialCopy(_ channel: MigrationChannel) throws(MigrationError) -> PageBatchCompressor? {
        let started = MonotonicClock.nanoseconds()
        let passes = try PreCopyPasses(memory: machine.memory, tracker: machine.tracker!, channel: channel,
                                       compression: options.compression)
        var bytes: UInt64 = 0
        defer { state.withLock { $0.figures.ringOverruns += passes.ringOverruns } }
        for _ in 1...Self.maxInitialPasses {
            let outcome = try passes.run(shouldStop: { isStopping })
            bytes += outcome.sent.bytes
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
        state.withLock { $0.figures.checkpointsSent += 1 }
        let ack = try channel.receive(.checkpointAck) { payload throws(MigrationProtocolError) in
            try EpochFrame(decoding: payload, what: "checkpoint ack")
        }
        guard ack.epoch == epoch else {
            throw .protocolError(.unexpected("an acknowledgement of checkpoint \(ack.epoch) after checkpoint \(epoch)"))
        }
        state.withLock { shared in
            shared.figures.initialSeconds = Double(MonotonicClock.nanoseconds() - started) / 1e9
            shared.figures.initialBytes = bytes
            shared.figures.bytesSent = bytes
            shared.figures.status = .protected
            shared.figures.compression = CompressionReport(mode: options.compression, tally: compressor?.tally ?? CompressionTally())
        }
        acknowledged(epoch)
        if let pages = options.checkpointPages, let tracker = machine.tracker, tracker.hasDirtyTrigger {
            let wake = self.wake
            tracker.setDirtyTrigger(pages: pages) { wake.signal() }
        }
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
        if let pages = options.checkpointPages, tracker.hasDirtyTrigger {
            let wake = self.wake
            tracker.setDirtyTrigger(pages: max(pages - staged.pages.count, 1)) { wake.signal() }
        }
    }

    /// Epochs shorter than this are not staged while they run: their pauses copy little, and a
    /// collection more per epoch would lower the highest checkpoint rate.
    static let shortestStagedEpochNanoseconds: UInt64 = 5_000_000
    /// Early stages stop once the epoch has less than this left: the pause copies what the
    /// guest dirties in about this long (1,000 pages at 160 MiB/s took 0.75 ms to copy paused).
    static let lastStageLeadNanoseconds: UInt64 = 2_000_000

    private func epochLoop(_ channel: MigrationChannel, compressor: PageBatchCompressor?) {
        let staged = StagedCheckpoint(preparedPages: Self.preparedPages)
        let interval = UInt64(options.intervalSeconds * 1e9)
        let stagesEarly = options.stagesWhileRunning && interval >= Self.shortestStagedEpochNanoseconds
        var epochStart = MonotonicClock.nanoseconds()
        var lastSend = epochStart
        var lastStats = epochStart
        defer {
            machine.tracker?.setDirtyTrigger(pages: nil, nil)
            machine.transferClaim.release()
            threadsDone.signal()
        }
        do {
            while true {
                staged.begin()
                let end = epochStart + interval
                // The first early stage halfway through the epoch, each next one halfway through
                // what is left, until the lead is reached: each copies about half the one before.
                var nextStage: UInt64? = stagesEarly ? epochStart + interval / 2 : nil
                // Wait for the epoch's end: its interval, the dirty trigger, or a stop. Say we are
                // alive meanwhile when the interval is long.
                while !isStopping {
                    var now = MonotonicClock.nanoseconds()
                    if now - lastStats >= 1_000_000_000 { writeStats(); lastStats = now }
                    if now >= end { break }
                    if let due = nextStage, now >= due {
                        try stageWhileRunning(staged)
                        now = MonotonicClock.nanoseconds()
                        nextStage = end > now && end - now >= 2 * Self.lastStageLeadNanoseconds ? now + (end - now) / 2 : nil
                        continue
                    }
                    let heartbeat = heartbeatNanoseconds.load(ordering: .relaxed)
                    if now - lastSend >= heartbeat {
                        try channel.send(.heartbeat, EpochFrame(epoch: 0).encode())
                        lastSend = now
                    }
                    let until = min(end, lastSend + heartbeat, lastStats + 1_000_000_000, nextStage ?? end)
                    if wake.wait(timeout: .now() + .nanoseconds(Int(until > now ? until - now : 0))) == .success { break }
                }
                if isStopping { break }
                epochStart = MonotonicClock.nanoseconds()
                _ = try checkpoint(into: staged)
                // A stop or a loss abandons the checkpoint between two of its frames: the end of
                // replication must not wait behind megabytes on a slow link.
                guard let bytes = try staged.send(over: channel, compressor: compressor, shouldStop: { isStopping }) else { break }
                lastSend = MonotonicClock.nanoseconds()
                state.withLock { shared in
                    if let compressor { shared.figures.compression.tally = compressor.tally }
                    shared.figures.checkpointsSent += 1
                    shared.figures.bytesSent += bytes
                    shared.bytes.add(Double(bytes), at: lastSend)
                }
            }
            sendEnd(channel)
        } catch {
            lose("the standby is lost: \(error)")
        }
    }

    /// Tells the standby that replication ends, between two frames: stopped on purpose (it
    /// discards its copy and confirms), or given up by this side (it discards its copy rather
    /// than take over a VM that runs on here).
    private func sendEnd(_ channel: MigrationChannel) {
        let (reason, lost) = state.withLock { shared -> (String, Bool) in
            shared.endSent = true
            if shared.lost { return ("the primary gave up on its standby (\(shared.figures.error ?? "lost")); it runs the VM on, unprotected", true) }
            return (shared.stopReason ?? "replication was stopped", false)
        }
        do { try channel.send(.replicationEnd, MigrationReason(reason).encode()) } catch {
            if !lost { lose("the standby could not be told that replication ends: \(error)") }
        }
    }

    // MARK: Listening to the standby

    /// Reads what the standby sends until the connection ends: acknowledgements, the
    /// confirmation of the end, and word that it took over. Decides when it is lost
    /// (StandbyLiveness); once lost, keeps listening for a takeover only.
    private func listenToStandby(_ channel: MigrationChannel) {
        guard let connection = state.withLock({ $0.session?.control }) else { return }
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
                        let watching = state.withLock { $0.lost }
                        channel.transport.setReceiveDeadline(watching ? nil : MonotonicClock.nanoseconds() + max(lossNanoseconds, 5_000_000_000))
                        let (type, payload) = try channel.receive([.checkpointAck, .replicationEnded, .tookOver, .heartbeat])
                        liveness.heard(at: MonotonicClock.nanoseconds())
                        let epoch = try MigrationError.wrap { () throws(MigrationProtocolError) in
                            try EpochFrame(decoding: payload, what: "\(type)").epoch
                        }
                        switch type {
                        case .checkpointAck: acknowledged(epoch)
                        case .replicationEnded:
                            settleEnd(confirmed: true)
                            return
                        case .tookOver:
                            superseded(at: epoch)
                            return
                        default: break
                        }
                        continue
                    }
                    let (lost, awaiting) = state.withLock { shared in
                        (shared.lost, shared.endSent || shared.figures.checkpointsSent > shared.figures.checkpointsAcknowledged)
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
                let (lost, ending) = state.withLock { ($0.lost, $0.endSent) }
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
            shared.figures.lastAcknowledgedEpoch = epoch
            shared.acknowledged.add(1, at: now)
        }
        machine.output.release(through: epoch)
    }

    // MARK: Ending

    private var isStopping: Bool { stopping.load(ordering: .acquiring) }
    private var isSuperseded: Bool { state.withLock { $0.figures.status == .superseded } }
    private var stopReasonText: String { state.withLock { $0.stopReason } ?? "replication was stopped" }

    /// The standby is gone (or never came): the VM runs on here, unprotected; its output flows.
    /// The connection stays open: the epoch thread tells the standby, if it still can, that this
    /// side gave up (so it discards rather than takes over), and the listening thread hears of
    /// a takeover that happened anyway.
    private func lose(_ reason: String) {
        let first = state.withLock { shared -> Bool in
            guard !shared.lost, shared.figures.status != .stopped, shared.figures.status != .superseded else { return false }
            shared.lost = true
            stopping.store(true, ordering: .releasing)
            shared.figures.status = .unprotected
            shared.figures.error = reason
            return true
        }
        guard first else { return }
        log("dirtymig: replication to \(options.standby): \(reason); the VM runs on here, unprotected")
        machine.tracker?.setDirtyTrigger(pages: nil, nil)
        machine.output.stopHolding()
        wake.signal()
        settleEnd(confirmed: false)
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
        let running = state.withLock { shared -> Bool in
            if shared.stopReason == nil { shared.stopReason = reason }
            stopping.store(true, ordering: .releasing)
            return shared.figures.status == .protected
        }
        attempt.cancel()   // still connecting or in the TLS handshake: cut it now
        wake.signal()
        if running {
            endSettled.wait()
            endSettled.signal()
        }
        let session = state.withLock { shared -> MigrationSession? in
            if shared.figures.status == .protected || shared.figures.status == .starting { shared.figures.status = .stopped }
            return shared.figures.status == .stopped ? shared.session : nil
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
