import Foundation
import Synchronization

/// The source side of a live migration, run on its own thread inside the VM's process.
///
/// Pre-copy: pass 1 sends every page that holds data (holes are never read), each later pass
/// sends what the tracker saw dirtied during the previous one. When the expected downtime (dirty
/// bytes ÷ the bandwidth measured on the last pass) is at most `--downtime`, the vCPUs are
/// paused, the last dirty pages and the vCPU/device state are sent, and the destination resumes
/// the VM. If the tracker lost dirty information (a ring overrun), that pass's dirty set is not
/// trusted: every page holding data is sent again. Any failure before the destination says it
/// runs the VM leaves the source running.
public final class MigrationSender: Sendable {
    public let machine: Machine
    /// As asked when the migration started; the bandwidth cap and the downtime limit in force
    /// are `limits`, which may change while it runs.
    public let options: MigrationOptions
    public let limits: MigrationLimits
    private let live = Mutex(MigrationProgress())
    /// When `run` began (monotonic ns; 0 before): elapsed time and when limits changed count from it.
    private let startedAt = Atomic<UInt64>(0)
    private let cancelFlag = Atomic<Bool>(false)
    /// `migrate --start-postcopy`: switch at the end of the pass under way.
    private let postcopyAsked = Atomic<Bool>(false)
    let link = Mutex(Link())
    /// The connection while it is being set up (connect, TLS handshake), for `cancel`.
    private let attempt = ConnectionAttempt()
    /// When and where a paused post-copy tries the destination again (`resumePostCopy`).
    let postcopyReconnect: PostCopyReconnect

    /// The connection as `cancel` sees it from another thread.
    struct Link {
        var session: MigrationSession?
        /// Set when the `complete` frame goes out: from then on the destination may resume the
        /// VM at any moment, so a cancel can no longer take the migration back.
        var committed = false
        /// Set when the post-copy switch goes out: the destination may run the guest from then
        /// on and this copy lacks what it writes there, so this copy is never resumed (unless
        /// the destination says it did not start the guest), whatever fails after.
        var postcopyHeld = false
        var cancelReason: String?
    }

    /// What switching one vCPU over costs while paused: pausing and saving it here, restoring
    /// and starting it at the destination. Measured with 64 idle vCPUs on this machine: pause
    /// 12 ms, save 4, restore 5, start 9 (30 ms, about 0.5 ms a vCPU).
    static let perVCPUSwitchSeconds = 0.0005

    /// --downtime is a limit, not a target: within it, one more live pass is made when it is
    /// cheap and would at least halve the pause. The pages now dirty take `dirtyPages x 4 KiB /
    /// bandwidth` to send live, and the guest dirties about `dirtyPagesPerSecond` times that
    /// meanwhile; that is what the pause would carry after it. A guest rewriting 256 MiB at
    /// 200 MiB/s left 85-95 MiB after pass 1, 48-85 ms of pause against QEMU's 11 ms; a 40 ms
    /// pass more leaves about 9 MiB. Passes shorter than `cheapestPassSeconds` are not worth a
    /// round of collecting and acknowledging.
    static func anotherPassHalvesThePause(dirtyPages: Double, dirtyPagesPerSecond: Double, bandwidth: Double,
                                          expected: Double, passesLeft: Bool) -> Bool {
        guard passesLeft, bandwidth > 0 else { return false }
        let sendSeconds = dirtyPages * 4096 / bandwidth
        guard sendSeconds >= cheapestPassSeconds else { return false }
        let dirtiedMeanwhile = min(dirtyPages, dirtyPagesPerSecond * sendSeconds)
        let expectedAfter = expected - sendSeconds + dirtiedMeanwhile * 4096 / bandwidth
        return expectedAfter <= expected / 2
    }
    static let cheapestPassSeconds = 0.005

    /// What a cancel says when no reason is given.
    public static let cancelledReason = "the migration was cancelled; the VM runs on here"

    public init(machine: Machine, options: MigrationOptions) {
        self.machine = machine
        self.options = options
        limits = MigrationLimits(.init(bandwidth: options.bandwidth, downtimeSeconds: options.downtimeSeconds))
        postcopyReconnect = PostCopyReconnect(endpoint: options.destination, recoverSeconds: options.postcopyRecoverSeconds)
        live.withLock { $0.destination = options.destination.description }
    }

    public var progress: MigrationProgress {
        var progress = live.withLock { $0 }
        progress.limits = limits.current
        progress.limitChanges = limits.changes.kept.count + limits.changes.dropped
        progress.elapsedSeconds = secondsSinceStart
        progress.postcopyLink = machine.postcopyLink.json
        if MigrationProgress.isUnderWay(phase: progress.phase), let session = link.withLock({ $0.session }) {
            progress.queuedWireBytes = session.control.tcp.queuedBytes ?? 0
        }
        return progress
    }

    var secondsSinceStart: Double {
        let started = startedAt.load(ordering: .acquiring)
        return started == 0 ? 0 : Double(MonotonicClock.nanoseconds() - started) / 1e9
    }

    /// Changes the bandwidth cap (`.some(nil)`: none) or the downtime limit of the migration
    /// under way, as `migrate-set` asks: the sender uses them from its next decision on (the
    /// limiter before its next batch, the pre-copy rule and the throttle after the pass under
    /// way). Returns the limits now in force. The values must have been checked
    /// (`MigrationOptions.checkedBandwidth`, `checkedDowntime`).
    @discardableResult
    public func changeLimits(bandwidth: UInt64?? = nil, downtimeSeconds: Double? = nil) -> MigrationLimits.Values {
        limits.change(bandwidth: bandwidth, downtimeSeconds: downtimeSeconds, atSeconds: secondsSinceStart,
                      pass: live.withLock { $0.iteration })
    }

    /// Ends the migration at the next batch (the source VM keeps running, the destination is
    /// told why and discards its copy). A send blocked on a destination that stopped reading
    /// would hold the cancel up to the send timeout, so after `grace` seconds the connection is
    /// cut. After the commit point (everything sent, the destination deciding) a cancel changes
    /// nothing: the migration completes or fails as the destination says. Returns whether the
    /// cancel can still take effect.
    @discardableResult
    public func cancel(reason: String = MigrationSender.cancelledReason, grace: Double = 2) -> Bool {
        let effective = link.withLock { link -> Bool in
            if link.cancelReason == nil { link.cancelReason = reason }
            return !link.committed
        }
        cancelFlag.store(true, ordering: .relaxed)
        guard effective else { return false }
        // Still connecting or in the handshake: nothing is allocated at the destination yet, so
        // the connection is cut at once (a destination trickling its handshake would hold it).
        attempt.cancel()
        DispatchQueue.global().asyncAfter(deadline: .now() + grace) { [self] in
            link.withLock { link in
                if !link.committed { link.session?.close() }
            }
        }
        return true
    }

    var cancelReason: String { link.withLock { $0.cancelReason } ?? MigrationSender.cancelledReason }

    @discardableResult
    func update<T>(_ body: (inout MigrationProgress) -> T) -> T { live.withLock { body(&$0) } }

    /// Asks a running `--postcopy` migration to switch to post-copy at the end of the pass under
    /// way. Returns why not, or nil.
    public func startPostCopy() -> String? {
        guard options.postcopy != nil else { return "this migration was started without --postcopy" }
        let phase = progress.phase
        guard phase == "pre-copy" || phase == "connecting" || phase == "starting" else {
            return "the migration is past pre-copy (\(phase))"
        }
        postcopyAsked.store(true, ordering: .relaxed)
        return nil
    }

    /// Runs the whole migration. On `completed`, the destination runs the VM and the caller
    /// should stop the source; otherwise the source VM is running, as before.
    public func run(passLog: (MigrationPass) -> Void = { _ in }) -> MigrationReport {
        var report = MigrationReport()
        report.track = machine.configuration.tracking
        report.destination = options.destination.description
        report.verify = options.verify ? "failed" : "off"
        report.compression.mode = options.compression
        let throttleMode: ThrottleMode
        // With --postcopy, `auto` throttles nothing: post-copy is the answer to a guest that
        // outruns the link, and slowing it as well would cost the guest its speed for nothing.
        // A throttle asked for by name still applies during pre-copy.
        let asked = options.postcopy != nil && options.throttle == .auto ? ThrottleMode.none : options.throttle
        do { throttleMode = try asked.resolved(for: machine.configuration.tracking) } catch {
            report.error = error.description
            report.throttle.mode = options.throttle
            update { $0.phase = "failed" }
            return report
        }
        let throttle = MigrationThrottle(mode: throttleMode, machine: machine, pooled: options.quotaPool)
        let before = machine.pace.measuredPace()
        update { $0.phase = "connecting" }
        report.guestPagesPerSecondBefore = before ?? machine.guestStats().vcpus.map { _ in 0 }
        report.guestPaceBeforeMeasured = before != nil
        let started = MonotonicClock.nanoseconds()
        startedAt.store(started, ordering: .releasing)
        let guestAtStart = machine.guestStats().vcpus.map(\.pages)
        let machine = self.machine
        let timeline = MigrationTimeline(
            started: started, read: { [self] in progress },
            publish: { [self] throughput, dirty in
                update { progress in
                    progress.throughputBytesPerSecond = throughput
                    if let dirty { progress.dirtyPagesPerSecond = dirty }
                }
            },
            cpuThrottlePercent: { machine.cpuThrottle.percent }, heldNanoseconds: { machine.holds.heldNanoseconds() },
            dirtyPages: { machine.configuration.tracking?.usesDirtyRing == true ? machine.tracker?.counters().totalPages : nil })
        var paused = false
        do {
            try migrate(&report, started: started, paused: &paused, guestAtStart: guestAtStart, throttle: throttle,
                        passLog: passLog)
            report.completed = true
            if options.verify { report.verify = "passed" }
        } catch {
            report.error = error.description
            // What was sent before the failure, the pass in flight included.
            report.transferredBytes = max(report.transferredBytes, progress.sentBytes)
            if case .verifyFailed = error { report.verify = "failed" } else if options.verify { report.verify = "not reached" }
            throttle.remove()   // before the guest runs again at full speed here
            if link.withLock({ $0.postcopyHeld }) {
                report.error = (report.error ?? "") + "; the guest ran at the destination after the post-copy switch, so this copy stays paused and is never resumed here (its pages are the ones the destination still lacks)"
            } else if paused {
                machine.resume()
            }
        }
        throttle.remove()
        report.throttle = throttle.report
        // The limit the pause was held to: the one in force at the end (it may have changed).
        report.downtimeLimitSeconds = limits.downtimeSeconds
        (report.limitChanges, report.limitChangesDropped) = limits.changes
        if report.guestPagesPerSecondDuring.isEmpty {
            let seconds = Double(MonotonicClock.nanoseconds() - started) / 1e9
            report.guestPagesPerSecondDuring = zip(machine.guestStats().vcpus.map(\.pages), guestAtStart).map {
                Double($0 &- $1) / max(seconds, 1e-9)
            }
        }
        report.totalSeconds = Double(MonotonicClock.nanoseconds() - started) / 1e9
        let end = update { progress -> MigrationProgress in
            progress.phase = report.completed ? "completed" : "failed"
            progress.sentBytes = max(progress.sentBytes, report.transferredBytes)
            if report.completed { progress.remainingPages = 0 }
            return progress
        }
        report.timeline = timeline.finish(final: MigrationSample(
            seconds: report.totalSeconds, phase: end.phase, pass: end.iteration, sentBytes: end.sentBytes,
            remainingBytes: end.remainingPages * 4096, throughputMiBPerSecond: 0,
            dirtyPagesPerSecond: nil, expectedDowntimeSeconds: nil, cpuThrottlePercent: 0, heldPercent: [], paused: false))
        return report
    }


    private func migrate(_ report: inout MigrationReport, started: UInt64, paused: inout Bool, guestAtStart: [UInt64],
                         throttle: MigrationThrottle, passLog: (MigrationPass) -> Void) throws(MigrationError) {
        guard let tracker = machine.tracker else {
            throw .machine("this VM was started without dirty tracking; boot it with --track bitmap, ring or quota")
        }
        // Setup: connect. Everything after it runs in `transfer`, so that any failure before the
        // commit point tells the destination why, and it discards its copy at once.
        let session: MigrationSession
        do { session = try MigrationSession.connect(to: options.destination, security: options.security, attempt: attempt) } catch {
            if cancelFlag.load(ordering: .relaxed) { throw .cancelled(cancelReason) }
            throw error
        }
        report.channel = session.control.channel
        link.withLock { $0.session = session }
        defer {
            link.withLock { $0.session = nil }
            session.close()
        }
        // The link rule: a link that carries nothing back for --link-timeout fails the migration
        // (a cut link, a host gone, a destination that stopped reading), a shorter cut is ridden
        // out. The kernel watches the link (unacknowledged data, keepalives while we only wait);
        // the socket timeouts are the same deadline for a peer whose kernel answers but whose
        // process does not. The destination learns the deadline from the hello.
        let linkTimeout = options.linkTimeoutSeconds
        session.control.tcp.watchLink(timeoutSeconds: linkTimeout)
        session.control.setTimeouts(send: linkTimeout, receive: linkTimeout)
        let channel = session.channel
        do {
            try transfer(session, tracker: tracker, report: &report, started: started, paused: &paused,
                         guestAtStart: guestAtStart, throttle: throttle, passLog: passLog)
        } catch {
            guard !link.withLock({ $0.committed }) else { throw error }
            session.control.setTimeouts(send: 1, receive: 0.5)   // a destination that stopped reading does not get to hold us
            // A destination that gave up first said why before it closed: that beats "connection reset".
            if case .connection = error, let reason = Self.pendingAbort(channel) { throw .peerAborted(reason) }
            channel.sendAbort(error.description)
            if case .connection(let system) = error, let words = Self.linkRuleFailure(options, system, socket: session.control.tcp) {
                throw .timedOut(words)
            }
            throw error
        }
    }

    /// A connection that failed under the link rule, in words, or nil if it failed otherwise:
    /// the kernel's "Connection timed out" (or the "Broken pipe" a TLS send saw after the kernel
    /// had given up) did not say which deadline it was, nor what became of the VM.
    static func linkRuleFailure(_ options: MigrationOptions, _ error: SystemError, socket: TCPSocket) -> String? {
        let seconds = options.linkTimeoutSeconds
        let deadline = seconds == seconds.rounded() ? "\(Int(seconds)) s" : "\(seconds) s"
        let outcome = "the migration failed, the VM runs on here and the destination discards its copy"
        // Nothing acknowledged for (nearly) the whole deadline: the link, or the host behind it, went silent.
        if let silent = socket.nanosecondsSinceLastAcknowledgement, Double(silent) >= seconds * 0.9e9,
           [ETIMEDOUT, EPIPE, ECONNRESET].contains(error.errno) {
            return "the link to \(options.destination) carried nothing back for \(deadline) (--link-timeout): \(outcome)"
        }
        // Acknowledged, but nothing taken or answered: the destination's host is there, its process is not.
        if error.errno == ETIMEDOUT {
            return "the destination \(options.destination) took or answered nothing for \(deadline) (--link-timeout; \(error.operation) timed out): \(outcome)"
        }
        return nil
    }

    /// The reason in an abort frame the destination sent before the connection failed, if one
    /// is still to be read (acknowledgements may come before it).
    private static func pendingAbort(_ channel: MigrationChannel) -> String? {
        for _ in 0..<4 {
            do throws(MigrationError) {
                _ = try channel.receive([.iterationAck, .helloReply, .result])
            } catch {
                if case .peerAborted(let reason) = error { return reason }
                return nil
            }
        }
        return nil
    }

    /// The handshake, the pre-copy passes, and stop-and-copy, over a connected session.
    private func transfer(_ session: MigrationSession, tracker: DirtyTracker,
                          report: inout MigrationReport, started: UInt64, paused: inout Bool, guestAtStart: [UInt64],
                          throttle: MigrationThrottle, passLog: (MigrationPass) -> Void) throws(MigrationError) {
        // Validated to at most 30 days (MigrationOptions.timeoutRange); min() keeps the
        // conversion safe for a caller that set the field directly.
        let deadline = options.timeoutSeconds.map { started + UInt64(min(max($0, 0), 1e8) * 1e9) }
        func checkTimeout() throws(MigrationError) {
            if let deadline, MonotonicClock.nanoseconds() > deadline {
                throw .timedOut("the migration did not finish within --timeout \(options.timeoutSeconds!) s; the VM runs on here")
            }
        }

        let faults = try open(session)
        let channel = session.channel
        report.setupSeconds = Double(MonotonicClock.nanoseconds() - started) / 1e9

        // Pass 1: everything that holds data; the tracker's history before now (and any loss
        // in it) is irrelevant.
        let limits = self.limits
        let passes = try PreCopyPasses(memory: machine.memory, tracker: tracker, channel: channel,
                                       bandwidth: { limits.bandwidth }, compression: options.compression)
        report.compression.mode = options.compression
        defer { report.compression = passes.transfer.compressionReport }
        var bandwidth = 0.0
        // --verify hashes all guest memory here while the VM is paused (the destination hashed
        // pages as they landed): part of the downtime, so part of the expected downtime the
        // pre-copy rule compares, for at most half of --downtime (a bigger share would leave the
        // rule no way to be met). Capped anew after each pass: the limit may change.
        let verifyCost = options.verify ? MemoryDigest.estimateSeconds(machine.memory) : 0
        // dirty-limit and dirty-quota judge the guest every second, within passes too, from the
        // harvester's per-vCPU counts (see MigrationThrottle): what went out and what the guest
        // dirtied since the last judgement.
        var period = ThrottlePeriod(time: MonotonicClock.nanoseconds(), vcpuPages: tracker.counters().vcpuPages)
        func judge(pass: Int) {
            let now = MonotonicClock.nanoseconds()
            let seconds = max(Double(now - period.time) / 1e9, 1e-6)
            let vcpuPages = tracker.counters().vcpuPages
            let vcpuDirty = zip(vcpuPages ?? [], period.vcpuPages ?? []).map { Double($0 &- $1) * 4096 }
            var periodBandwidth = Double(period.sentBytes) / seconds
            if let cap = limits.bandwidth { periodBandwidth = min(periodBandwidth, Double(cap)) }
            throttle.observe(pass: pass, sentBytes: period.sentBytes, dirtyBytes: UInt64(vcpuDirty.reduce(0, +)),
                             seconds: seconds, bandwidth: periodBandwidth,
                             vcpuDirtyBytesPerSecond: vcpuDirty.map { $0 / seconds },
                             sinceStart: Double(now - started) / 1e9)
            let level = throttle.level
            update { $0.throttle = level }
            period = ThrottlePeriod(time: now, vcpuPages: vcpuPages)
        }
        var iteration = 0
        while true {
            iteration += 1
            update {
                $0.phase = "pre-copy"; $0.iteration = iteration
                $0.remainingPages = UInt64(passes.pending.count); $0.passPages = $0.remainingPages
                $0.passStartedSeconds = secondsSinceStart
                $0.passStartSentBytes = $0.sentBytes
                if iteration == 1 {   // until pass 1's decision counts the pause's fixed costs
                    $0.stopBelowSeconds = limits.current.downtimeSeconds * 0.85
                    $0.passesLeft = options.maxIterations - 1
                }
            }
            let outcome: PreCopyPasses.Outcome
            var inFlight = PageSendTally()   // what this pass sent so far, for a pass cut mid-way
            do {
                outcome = try passes.run(shouldStop: {
                    cancelFlag.load(ordering: .relaxed) || deadline.map { MonotonicClock.nanoseconds() > $0 } == true
                }, onBatch: { batch in
                    inFlight.add(batch)
                    let pages = batch.normalPages + batch.zeroPages
                    update {
                        $0.sentBytes += batch.bytes; $0.sentPageBytes += batch.normalPages * 4096
                        $0.remainingPages -= min($0.remainingPages, pages)
                    }
                    guard throttle.judgesWithinPasses else { return }
                    period.sentBytes += batch.bytes
                    if MonotonicClock.nanoseconds() - period.time >= ThrottlePeriod.nanoseconds { judge(pass: iteration) }
                })
            } catch {
                // The pages of the batches that went out count, as their bytes do.
                report.tally(inFlight)
                report.passCutShort = iteration
                report.ringOverruns = passes.ringOverruns
                if case .cancelled = error {   // say which: timeout or cancel, and why
                    try checkTimeout()
                    throw .cancelled(cancelReason)
                }
                throw error
            }
            report.tally(outcome.sent)
            report.ringOverruns = passes.ringOverruns
            let assessment = assess(outcome, iteration: iteration, started: started, bandwidth: &bandwidth,
                                    verifyCost: verifyCost, acknowledgementSeconds: passes.transfer.shortestAcknowledgementSeconds)
            report.verifyEstimateSeconds = assessment.verifyEstimateSeconds
            var pass = assessment.pass
            // Post-copy is the other answer to a guest that outruns the link: decided before the
            // throttle would slow the guest down.
            if let switchReason = options.postcopy.flatMap({ policy in
                PostCopyDecision.reason(
                    policy: policy, pass: iteration, expectedSeconds: assessment.lost ? .infinity : assessment.expectedSeconds,
                    targetSeconds: assessment.targetSeconds, dirtyBytesPerSecond: pass.dirtyPagesPerSecond * 4096,
                    bandwidthBytesPerSecond: assessment.pageRate, passesLeft: options.maxIterations - iteration,
                    askedByHand: postcopyAsked.load(ordering: .relaxed))
            }) {
                record(pass, report: &report, passLog: passLog)
                update { $0.sentBytes = report.transferredBytes; $0.remainingPages = assessment.dirtyPages }
                try switchToPostCopy(session, faults: faults!, passes: passes, after: iteration, reason: switchReason,
                                     report: &report, started: started, paused: &paused, guestAtStart: guestAtStart)
                return
            }
            if !assessment.meetsTarget {
                if throttle.judgesWithinPasses {
                    judge(pass: iteration)   // the rest of the pass since the last judgement
                } else {
                    throttle.observe(pass: iteration, sentBytes: outcome.sent.bytes, dirtyBytes: assessment.dirtyPages * 4096,
                                     seconds: outcome.seconds, bandwidth: assessment.pageRate, vcpuDirtyBytesPerSecond: nil,
                                     sinceStart: Double(MonotonicClock.nanoseconds() - started) / 1e9)
                }
            }
            let level = throttle.level
            pass.throttle = level
            update { $0.throttle = level }
            record(pass, report: &report, passLog: passLog)
            update { [tracksRing = machine.configuration.tracking?.usesDirtyRing == true, passesLeft = options.maxIterations - iteration] in
                $0.sentBytes = report.transferredBytes; $0.remainingPages = assessment.dirtyPages
                if !tracksRing { $0.dirtyPagesPerSecond = pass.dirtyPagesPerSecond }
                $0.passPages = assessment.dirtyPages
                $0.expectedDowntimeSeconds = assessment.expectedSeconds
                // What the forecast (eta_s) needs: the rate pages move at, and where pre-copy stops.
                $0.lastPassBandwidthBytesPerSecond = assessment.pageRate
                $0.stopBelowSeconds = assessment.stopBelowSeconds
                $0.passesLeft = passesLeft
            }
            if assessment.meetsTarget && !Self.anotherPassHalvesThePause(
                dirtyPages: Double(assessment.dirtyPages), dirtyPagesPerSecond: pass.dirtyPagesPerSecond,
                bandwidth: assessment.pageRate, expected: assessment.expectedSeconds,
                passesLeft: iteration < options.maxIterations) { break }
            if iteration >= options.maxIterations {
                throw .notConverging("pre-copy did not converge in --max-iterations \(options.maxIterations) passes: the guest dirtied \(Int(pass.dirtyPagesPerSecond)) pages/s against \(String(format: "%.1f", assessment.pageRate / 1_048_576)) MiB/s of pages moved (expected downtime \(Int(assessment.expectedSeconds * 1000)) ms > \(Int(assessment.targetSeconds * 1000)) ms, 85 % of the downtime limit); the VM runs on here")
            }
            try checkTimeout()
            if cancelFlag.load(ordering: .relaxed) { throw .cancelled(cancelReason) }
        }

        try stopAndCopy(channel, socket: session.control, passes: passes, after: iteration, report: &report, started: started,
                        paused: &paused, guestAtStart: guestAtStart, passLog: passLog)
    }

    /// Opens the session at the destination: the hello (what this VM is, and how it will be
    /// sent), and with --postcopy the faults connection. Post-copy's page requests get their own
    /// connection from the start, so that a request never waits behind pages; it carries
    /// nothing until the switch.
    private func open(_ session: MigrationSession) throws(MigrationError) -> (any MigrationConnection)? {
        var hello = MigrationHello(announcing: machine)
        hello.verify = options.verify
        hello.linkTimeoutMilliseconds = UInt32(options.linkTimeoutSeconds * 1000)
        hello.postcopy = options.postcopy != nil
        if hello.postcopy { hello.joins = SessionJoins(pages: 0, faults: 1) }
        hello.pageCodecCode = options.compression.codec.rawValue
        _ = try session.greet(hello)
        guard hello.postcopy else { return nil }
        let faults = try session.join(.faults)
        faults.tcp.watchLink(timeoutSeconds: options.linkTimeoutSeconds)
        faults.setTimeouts(send: options.linkTimeoutSeconds, receive: 0)   // requests come when the guest faults
        return faults
    }

    /// The pre-copy rule's reading of a pass that ended (see PassAssessment). `bandwidth`: the
    /// link's rate, kept from pass to pass (a tiny pass measures latency, not bandwidth: the last
    /// good figure stands then).
    private func assess(_ outcome: PreCopyPasses.Outcome, iteration: Int, started: UInt64, bandwidth: inout Double,
                        verifyCost: Double, acknowledgementSeconds: Double) -> PassAssessment {
        let sent = outcome.sent
        if sent.bytes >= 1 << 20 || bandwidth == 0 { bandwidth = Double(sent.bytes) / outcome.seconds }
        // The decision uses the limits in force now: a cap or a downtime limit changed during
        // the pass counts from this decision on.
        let inForce = limits.current
        if let cap = inForce.bandwidth { bandwidth = min(bandwidth, Double(cap)) }
        // What the rule, the throttle and the forecast weigh pages against: the rate pages move
        // at. Under --compress a page takes fewer bytes on the wire than it holds, so that is the
        // link's rate times the pass's ratio (1 when nothing was compressed: a plain pass's bytes
        // are its pages and their headers).
        let pageRate = bandwidth * max(1, Double(sent.normalPages) * 4096 / Double(max(sent.bytes, 1)))
        let verifyEstimate = min(verifyCost, inForce.downtimeSeconds / 2)
        let dirtyPages = UInt64(outcome.dirty.count)
        // Everything the pause will hold: the last pages, the source's hash, pausing and saving
        // every vCPU here and restoring and starting it there, and two more round trips (the last
        // pass's acknowledgement and the result).
        let fixed = verifyEstimate + Self.perVCPUSwitchSeconds * Double(machine.configuration.vcpuCount)
            + 2 * (acknowledgementSeconds.isFinite ? acknowledgementSeconds : 0)
        let expected = Double(dirtyPages) * 4096 / max(pageRate, 1) + fixed
        let pass = MigrationPass(
            iteration: iteration, timeSeconds: Double(MonotonicClock.nanoseconds() - started) / 1e9,
            bytesSent: sent.bytes, pagesSent: sent.normalPages + sent.zeroPages, pagesDirtied: dirtyPages,
            dirtyPagesPerSecond: Double(dirtyPages) / outcome.seconds, bandwidthBytesPerSecond: bandwidth,
            expectedDowntimeSeconds: expected, trackingLost: outcome.lost)
        // Pre-copy stops when the expected downtime is at most 85 % of --downtime: the rest is
        // kept for what the guest dirties between the last pass and the pause, and for the state.
        return PassAssessment(pass: pass, dirtyPages: dirtyPages, lost: outcome.lost, pageRate: pageRate,
                              expectedSeconds: expected, fixedSeconds: fixed, targetSeconds: inForce.downtimeSeconds * 0.85,
                              verifyEstimateSeconds: verifyEstimate)
    }

    /// A pass that ended, in the report and the pass log.
    private func record(_ pass: MigrationPass, report: inout MigrationReport, passLog: (MigrationPass) -> Void) {
        report.passes.append(pass)
        report.iterations = pass.iteration   // so a migration that fails later reports what it did
        report.dirtyPagesPerSecond = pass.dirtyPagesPerSecond
        passLog(pass)
    }

    /// The end of pre-copy, either way it ends: the guest's pace during the passes, the vCPUs
    /// paused, and the last pages it dirtied (what the last pass left, plus what it wrote between
    /// that collection and the pause) added to `passes.pending`. Returns whether tracking lost
    /// pages in that last collection (all pages holding data are pending then), and when every
    /// vCPU was out of the guest.
    func pauseAndCollect(_ passes: PreCopyPasses, report: inout MigrationReport, started: UInt64, paused: inout Bool,
                         guestAtStart: [UInt64]) throws(MigrationError) -> (lost: Bool, pausedAt: UInt64) {
        let pauseStart = MonotonicClock.nanoseconds()
        report.guestPagesPerSecondDuring = zip(machine.guestStats().vcpus.map(\.pages), guestAtStart).map {
            Double($0 &- $1) / max(Double(pauseStart - started) / 1e9, 1e-9)
        }
        machine.pause()
        paused = true
        let pausedAt = MonotonicClock.nanoseconds()
        let (last, lost) = try passes.collect()
        report.ringOverruns = passes.ringOverruns
        passes.addPending(last)
        update { $0.remainingPages = UInt64(passes.pending.count); $0.passPages = $0.remainingPages }
        return (lost, pausedAt)
    }

    /// Stop and copy, after the pre-copy passes: pause, the last dirty pages, the state and the
    /// digests; then the destination's word. `after`: the passes made so far.
    private func stopAndCopy(_ channel: MigrationChannel, socket: any MigrationConnection, passes: PreCopyPasses,
                             after passesMade: Int, report: inout MigrationReport, started: UInt64, paused: inout Bool,
                             guestAtStart: [UInt64], passLog: (MigrationPass) -> Void) throws(MigrationError) {
        var iteration = passesMade
        // Stop and copy: pause, last dirty pages, state, digests; the destination resumes.
        update { $0.phase = "stop-and-copy" }
        let pauseStart = MonotonicClock.nanoseconds()
        var parts = DowntimeParts()
        var mark = pauseStart
        func lap() -> Double {
            let now = MonotonicClock.nanoseconds()
            defer { mark = now }
            return Double(now - mark) / 1e9
        }
        let (lastLost, pausedAt) = try pauseAndCollect(passes, report: &report, started: started, paused: &paused,
                                                       guestAtStart: guestAtStart)
        parts.pauseSeconds = Double(pausedAt - pauseStart) / 1e9
        mark = pausedAt   // collecting the last dirty pages counts with sending them, as before
        report.downtimeParts = parts
        let finalStart = MonotonicClock.nanoseconds()
        var finalInFlight = PageSendTally()
        let finalSent: PageSendTally
        do {
            finalSent = try passes.transfer.send(passes.pending, shouldStop: { cancelFlag.load(ordering: .relaxed) },
                                                 onBatch: { batch in finalInFlight.add(batch) })
        } catch {
            report.tally(finalInFlight)
            report.passCutShort = iteration + 1
            throw error
        }
        report.tally(finalSent)
        iteration += 1
        try passes.transfer.end(pass: iteration)
        // Until the destination acknowledged the pass: the send calls alone end once the bytes
        // are in the socket buffer, which on a slow link gave rates far above the link's.
        let finalSeconds = Double(MonotonicClock.nanoseconds() - finalStart) / 1e9
        parts.lastPagesSeconds = lap()
        report.downtimeParts = parts
        report.passes.append(MigrationPass(
            iteration: iteration, timeSeconds: Double(MonotonicClock.nanoseconds() - started) / 1e9,
            bytesSent: finalSent.bytes, pagesSent: finalSent.normalPages + finalSent.zeroPages, pagesDirtied: 0,
            dirtyPagesPerSecond: 0, bandwidthBytesPerSecond: Double(finalSent.bytes) / max(finalSeconds, 1e-6),
            expectedDowntimeSeconds: 0, trackingLost: lastLost))
        passLog(report.passes.last!)
        report.iterations = iteration
        let stateBytes: [UInt8]
        do { stateBytes = try machine.saveState().encode() } catch { throw .machine("cannot save the vCPU state: \(error)") }
        try channel.send(.state, stateBytes)
        report.transferredBytes += UInt64(stateBytes.count)
        parts.stateSeconds = lap()
        var complete = MigrationCompletion(verify: options.verify, memoryDigest: 0, stateDigest: 0)
        if options.verify {
            complete.memoryDigest = MemoryDigest.compute(machine.memory)
            complete.stateDigest = MemoryDigest.hash(stateBytes)
            parts.verifySeconds = lap()
            report.verifyPauseSeconds = parts.verifySeconds
            report.verifySeconds += report.verifyPauseSeconds
        }
        report.downtimeParts = parts
        // The commit point: once `complete` is out, the destination may resume the VM at any
        // moment, so a cancel (or SIGTERM) can no longer take it back; before it, one still can.
        let lateCancel = link.withLock { link -> String? in
            if let reason = link.cancelReason { return reason }
            link.committed = true
            return nil
        }
        if let lateCancel { throw .cancelled(lateCancel) }
        try channel.send(.complete, complete.encode())
        // The destination verifies and restores first; a link that goes silent meanwhile is
        // noticed by the kernel at the link deadline.
        socket.setTimeouts(send: options.linkTimeoutSeconds, receive: max(60, options.linkTimeoutSeconds))
        let result = try channel.receive(.result, MigrationResult.init(decoding:))
        report.downtimeSeconds = Double(MonotonicClock.nanoseconds() - pauseStart) / 1e9
        report.downtimeMeasured = true
        report.verifySeconds += Double(result.verifyNanoseconds) / 1e9
        let untilResult = lap()
        parts.destinationSeconds = min(Double(result.resumeNanoseconds) / 1e9, untilResult)
        parts.otherSeconds = untilResult - parts.destinationSeconds
        report.downtimeParts = parts
        switch result.status {
        case .resumed: return
        case .verifyFailed: throw .verifyFailed(result.message + "; the VM runs on here")
        case .failed: throw .peerAborted(result.message)
        }
    }
}

/// dirty-limit and dirty-quota's judging period within a migration: since when, what was sent
/// since, and the harvester's per-vCPU counts then.
private struct ThrottlePeriod {
    static let nanoseconds: UInt64 = 1_000_000_000
    var time: UInt64
    var vcpuPages: [UInt64]?
    var sentBytes: UInt64 = 0
}

extension MigrationReport {
    /// Adds what a pass sent to the totals.
    mutating func tally(_ sent: PageSendTally) {
        transferredBytes += sent.bytes
        zeroPages += sent.zeroPages
        normalPages += sent.normalPages
    }
}
