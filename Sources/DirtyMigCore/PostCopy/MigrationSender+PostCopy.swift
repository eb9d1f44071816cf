extension MigrationSender {
    /// The switch and the post-copy phase, after `passesMade` pre-copy passes: pause, send the
    /// state and the list of pages the destination lacks, and once it says the guest runs there,
    /// serve its faults and push the rest (`PostCopySource`) until every page has landed.
    ///
    /// The VM exists in one place at every moment: until the destination's `postcopyRunning`,
    /// only here (a refusal resumes it here); from the switch frame on, this copy is never
    /// resumed, because the destination may be running the guest (`Link.postcopyHeld`).
    func switchToPostCopy(_ session: MigrationSession, faults: any MigrationConnection, passes: PreCopyPasses,
                          after passesMade: Int, reason: String, report: inout MigrationReport, started: UInt64,
                          paused: inout Bool, guestAtStart: [UInt64]) throws(MigrationError) {
        update { $0.phase = "switching to post-copy" }
        // The destination drops its stale copies of the pages dirtied so far while the guest
        // still runs here; only those dirtied from now to the pause are left for the pause.
        let channel = session.channel
        let prepareStart = MonotonicClock.nanoseconds()
        try channel.send(.postcopyPrepare, PostCopyPrepare(stale: passes.pending).encode())
        _ = try channel.receive(.postcopyPrepared, PostCopyPrepared.init(decoding:))
        let pauseStart = MonotonicClock.nanoseconds()
        let (lost, pausedAt) = try pauseAndCollect(passes, report: &report, started: started, paused: &paused,
                                                   guestAtStart: guestAtStart)
        let lacking = passes.pending
        var postcopy = PostCopyReport(reason: reason, afterPasses: passesMade,
                                      switchedAtSeconds: Double(pauseStart - started) / 1e9, lackingPages: lacking.count)
        postcopy.prepareSeconds = Double(pauseStart - prepareStart) / 1e9
        report.postcopy = postcopy
        var parts = DowntimeParts()
        parts.pauseSeconds = Double(pausedAt - pauseStart) / 1e9
        _ = lost   // a lost collection made every page holding data lacking: nothing to add

        let stateBytes: [UInt8]
        do { stateBytes = try machine.saveState().encode() } catch { throw .machine("cannot save the vCPU state: \(error)") }
        parts.stateSeconds = Double(MonotonicClock.nanoseconds() - pausedAt) / 1e9
        // The commit point of post-copy: once the switch is out, the destination may run the
        // guest at any moment, so a cancel can no longer take it back, and this copy is held.
        let lateCancel = link.withLock { link -> String? in
            if let reason = link.cancelReason { return reason }
            link.committed = true
            link.postcopyHeld = true
            return nil
        }
        if let lateCancel { throw .cancelled(lateCancel) }
        let frame = PostCopySwitch(state: stateBytes, lacking: lacking).encode()
        try channel.send(.postcopySwitch, frame)
        report.transferredBytes += UInt64(frame.count)
        session.control.setTimeouts(send: options.linkTimeoutSeconds, receive: max(60, options.linkTimeoutSeconds))
        // A link that fails before the destination's answer leaves it unknown whether the guest
        // runs there: this copy stays held, and post-copy resumes (or stays paused) as after
        // any link failure; the destination accepts a resume only if it runs the guest.
        var running: PostCopyRunning?
        do {
            running = try channel.receive(.postcopyRunning, PostCopyRunning.init(decoding:))
        } catch {
            guard error.pausesPostCopy else { throw error }
        }
        if let running, !running.running {
            // The destination did not start the guest: the VM is whole here, and runs on here.
            link.withLock { $0.postcopyHeld = false }
            throw .peerAborted(running.message)
        }
        let runningAt = MonotonicClock.nanoseconds()
        if let running {
            report.downtimeSeconds = Double(runningAt - pauseStart) / 1e9
            report.downtimeMeasured = true
            parts.destinationSeconds = min(Double(running.resumeNanoseconds) / 1e9, Double(runningAt - pausedAt) / 1e9 - parts.stateSeconds)
            parts.otherSeconds = max(0, report.downtimeSeconds - parts.pauseSeconds - parts.stateSeconds - parts.destinationSeconds)
            report.downtimeParts = parts
        }

        update { [secondsSinceStart] in
            $0.phase = "post-copy"; $0.remainingPages = UInt64(lacking.count); $0.passPages = $0.remainingPages
            $0.passStartedSeconds = secondsSinceStart; $0.passStartSentBytes = $0.sentBytes
        }
        let source = PostCopySource(memory: machine.memory, lacking: lacking, bandwidth: { [limits] in limits.bandwidth })
        func figures(_ tally: PostCopyPushQueue.Tally) {
            postcopy.requestedPages = tally.requested
            postcopy.answeredPages = tally.answered
            postcopy.pushedPages = tally.pushed
            postcopy.resentPages = tally.resent
            postcopy.recoveries = machine.postcopyLink.recoveries
            postcopy.pausedSeconds = machine.postcopyLink.pausedSeconds()
            postcopy.seconds = Double(MonotonicClock.nanoseconds() - runningAt) / 1e9
            report.postcopy = postcopy
        }
        let outcome: PostCopySource.Outcome
        do {
            outcome = try runPostCopy(source, over: PostCopySource.Link(control: channel, faults: faults), session: session.id)
        } catch {
            figures(source.queue.tally)
            throw error
        }
        figures(outcome.tally)
        postcopy.bytes = outcome.pushedBytes + outcome.answeredBytes
        postcopy.destination = PostCopyDestinationFigures(outcome.result)
        report.postcopy = postcopy
        report.transferredBytes += postcopy.bytes
        report.verifySeconds += Double(outcome.verifyNanoseconds + outcome.result.verifyNanoseconds) / 1e9
        switch outcome.result.status {
        case .resumed: return
        case .verifyFailed: throw .verifyFailed(outcome.result.message + "; the guest runs on at the destination")
        case .failed: throw .peerAborted(outcome.result.message)
        }
    }
}

extension MigrationSender {
    /// The post-copy phase from the switch to the destination's word, over `first` and, each
    /// time a link fails, over the link the source makes again: one run of `source` per link,
    /// the same steps each time. A failed link pauses post-copy (this copy stays paused and
    /// keeps every page; the destination's vCPUs that touch a missing page wait) until a new
    /// link is up; other failures end it.
    func runPostCopy(_ source: PostCopySource, over first: PostCopySource.Link,
                     session id: SessionID) throws(MigrationError) -> PostCopySource.Outcome {
        var link = first
        var resumed: MigrationSession?
        defer { resumed?.close() }
        while true {
            do {
                return try source.run(over: link, verify: options.verify) { [self] batch in
                    let left = UInt64(source.queue.tally.remaining)
                    update { $0.sentBytes += batch.bytes; $0.sentPageBytes += batch.normalPages * 4096; $0.remainingPages = left }
                }
            } catch {
                guard error.pausesPostCopy else { throw error }
                link.faults.shutdown()
                link.control.transport.shutdown()
                let reason = "the link to \(postcopyReconnect.endpoint) failed: \(error)"
                machine.postcopyLink.paused(reason)
                postcopyReconnect.linkFailed()
                update { $0.phase = PostCopyLinkState.pausedStateName }
                let (session, faults, lacking) = reconnectPostCopy(session: id)
                resumed?.close()
                resumed = session
                // Pages in flight when the link failed go again (counted as resent in the tally).
                source.queue.resume(lacking: lacking)
                machine.postcopyLink.resumed()
                let left = UInt64(source.queue.tally.remaining)
                update { $0.phase = "post-copy"; $0.remainingPages = left }
                link = PostCopySource.Link(control: session.channel, faults: faults)
            }
        }
    }

    /// Tries the destination until a resume succeeds (see `PostCopyReconnect` for when): a new
    /// session connection that greets it as session `id` resuming, a faults connection, and the
    /// destination's list of the pages it still lacks. Never gives up: once the automatic window
    /// has closed it waits for a by-hand request, holding every page.
    private func reconnectPostCopy(session id: SessionID) -> (MigrationSession, any MigrationConnection, DirtyPageBitmap) {
        let window = DurationValue.format(microseconds: UInt64(postcopyReconnect.recoverSeconds * 1e6))
        var byHandOnly = false
        while true {
            let (endpoint, timeout) = postcopyReconnect.waitForAttempt { [machine] lastError in
                byHandOnly = true
                machine.postcopyLink.explain("the destination did not come back within --postcopy-recover-for \(window) (last attempt: \(lastError ?? "none")); this copy keeps its pages: resume by hand with 'dirtymig migrate --resume'")
            }
            do {
                return try attemptResume(at: endpoint, session: id, timeout: timeout)
            } catch {
                var slow = false
                if case .channel(.handshake(let why)) = error { slow = why.hasSuffix(TLSConnection.lateHandshake) }
                postcopyReconnect.attemptFailed("\(error)", slowHandshake: slow)
                if byHandOnly {
                    machine.postcopyLink.explain("resuming by hand failed: \(error); this copy keeps its pages: try again with 'dirtymig migrate --resume'")
                }
            }
        }
    }

    /// One attempt: the control connection as session `id` resuming, the faults connection
    /// joined, and the pages the destination lacks (checked against this VM's RAM).
    private func attemptResume(at endpoint: HostPort, session id: SessionID,
                               timeout: Double) throws(MigrationError) -> (MigrationSession, any MigrationConnection, DirtyPageBitmap) {
        let session = try MigrationSession.connect(to: endpoint, security: options.security, id: id, timeout: timeout)
        do {
            let linkTimeout = options.linkTimeoutSeconds
            session.control.tcp.watchLink(timeoutSeconds: linkTimeout)
            // The handshake's answers come at once from a destination that holds the session.
            session.control.setTimeouts(send: linkTimeout, receive: min(linkTimeout, MigrationSession.stallSeconds))
            var hello = MigrationHello(announcing: machine)
            hello.verify = options.verify
            hello.linkTimeoutMilliseconds = UInt32(linkTimeout * 1000)
            hello.postcopy = true
            hello.resume = true
            hello.joins = SessionJoins(pages: 0, faults: 1)
            hello.pageCodecCode = options.compression.codec.rawValue
            _ = try session.greet(hello)
            let faults = try session.join(.faults, timeout: timeout)
            faults.tcp.watchLink(timeoutSeconds: linkTimeout)
            faults.setTimeouts(send: linkTimeout, receive: 0)   // requests come when the guest faults
            let pageCount = machine.memory.pageCount
            let resume = try session.channel.receive(.postcopyResume) { payload throws(MigrationProtocolError) in
                try PostCopyResume(decoding: payload, pageCount: pageCount)
            }
            // As after the switch: the destination's word comes once every page has landed.
            session.control.setTimeouts(send: linkTimeout, receive: max(60, linkTimeout))
            return (session, faults, resume.lacking(pageCount: pageCount))
        } catch {
            session.close()
            throw error
        }
    }

    /// Asks a paused post-copy to try the destination now (`to`: at a new address from here
    /// on), also after its automatic window has closed. Returns why not, or nil.
    public func resumePostCopy(to endpoint: HostPort? = nil) -> String? {
        guard link.withLock({ $0.postcopyHeld }) else {
            return "this migration has not switched to post-copy (phase \(progress.phase)): there is nothing to resume"
        }
        guard machine.postcopyLink.isPaused else { return "post-copy is not paused: its link is up" }
        postcopyReconnect.askNow(endpoint: endpoint)
        return nil
    }
}

extension MigrationError {
    /// A failure of the link (or of what came over it) after the switch: post-copy pauses and
    /// the source makes a new link. The destination's own failures (it aborted, its VM failed,
    /// verification) end it.
    var pausesPostCopy: Bool {
        switch self {
        case .connection, .timedOut, .protocolError: return true
        default: return false
        }
    }
}
