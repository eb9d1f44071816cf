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
        let pauseStart = MonotonicClock.nanoseconds()
        let (lost, pausedAt) = try pauseAndCollect(passes, report: &report, started: started, paused: &paused,
                                                   guestAtStart: guestAtStart)
        let lacking = passes.pending
        var postcopy = PostCopyReport(reason: reason, afterPasses: passesMade,
                                      switchedAtSeconds: Double(pauseStart - started) / 1e9, lackingPages: lacking.count)
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
        let channel = session.channel
        let frame = PostCopySwitch(state: stateBytes, lacking: lacking).encode()
        try channel.send(.postcopySwitch, frame)
        report.transferredBytes += UInt64(frame.count)
        session.control.setTimeouts(send: options.linkTimeoutSeconds, receive: max(60, options.linkTimeoutSeconds))
        let running = try channel.receive(.postcopyRunning, PostCopyRunning.init(decoding:))
        guard running.running else {
            // The destination did not start the guest: the VM is whole here, and runs on here.
            link.withLock { $0.postcopyHeld = false }
            throw .peerAborted(running.message)
        }
        let runningAt = MonotonicClock.nanoseconds()
        report.downtimeSeconds = Double(runningAt - pauseStart) / 1e9
        report.downtimeMeasured = true
        parts.destinationSeconds = min(Double(running.resumeNanoseconds) / 1e9, Double(runningAt - pausedAt) / 1e9 - parts.stateSeconds)
        parts.otherSeconds = max(0, report.downtimeSeconds - parts.pauseSeconds - parts.stateSeconds - parts.destinationSeconds)
        report.downtimeParts = parts

        update { $0.phase = "post-copy"; $0.remainingPages = UInt64(lacking.count); $0.passPages = $0.remainingPages }
        let source = PostCopySource(memory: machine.memory, lacking: lacking, control: channel, faults: faults,
                                    bandwidth: { [limits] in limits.bandwidth })
        let outcome: PostCopySource.Outcome
        do {
            outcome = try source.run(verify: options.verify, linkTimeoutSeconds: options.linkTimeoutSeconds) { batch in
                let left = UInt64(source.queue.tally.remaining)
                update { $0.sentBytes += batch.bytes; $0.sentPageBytes += batch.normalPages * 4096; $0.remainingPages = left }
            }
        } catch {
            let tally = source.queue.tally
            postcopy.requestedPages = tally.requested
            postcopy.answeredPages = tally.answered
            postcopy.pushedPages = tally.pushed
            postcopy.seconds = Double(MonotonicClock.nanoseconds() - runningAt) / 1e9
            report.postcopy = postcopy
            throw error
        }
        postcopy.requestedPages = outcome.tally.requested
        postcopy.answeredPages = outcome.tally.answered
        postcopy.pushedPages = outcome.tally.pushed
        postcopy.bytes = outcome.pushedBytes + outcome.answeredBytes
        postcopy.seconds = Double(MonotonicClock.nanoseconds() - runningAt) / 1e9
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
