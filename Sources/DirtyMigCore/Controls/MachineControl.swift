import Foundation

/// The control commands a running VM answers (see ControlProtocol for the framing).
public enum MachineControl {
    /// Registers query-status, query-dirty-counters, query-dirty-rate and quit on `server`.
    /// `quit` replies first, then calls `onQuit` (which stops the VM) from another thread.
    public static func register(on server: ControlServer, machine: Machine, onQuit: @escaping @Sendable () -> Void) {
        server.register("query-status") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: [])
            return status(machine)
        }
        server.register("query-dirty-counters") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: [])
            return try counters(machine).json
        }
        server.register("query-dirty-rate") { (arguments: JSONValue, context: ControlContext) throws(ControlError) in
            try dirtyRate(machine, arguments, context: context)
        }
        server.register("quit") { (_: JSONValue, context: ControlContext) throws(ControlError) in
            context.afterReply { onQuit() }
            return ["stopping": true]
        }
    }

    static func status(_ machine: Machine) -> JSONValue {
        let configuration = machine.configuration
        let stats = machine.guestStats()
        let counters = machine.tracker?.counters()
        let vcpus: [JSONValue] = stats.vcpus.enumerated().map { index, vcpu in
            var pairs: [(String, JSONValue)] = [
                ("id", .number(index)), ("state", .string(stateName(vcpu.state))),
                ("workload", .string(describe(configuration.workloads[index]))),
                ("pages", .number(vcpu.pages)), ("passes", .number(vcpu.passes)), ("writes", .number(vcpu.writes)),
                ("guest_errors", .number(vcpu.errors)),
            ]
            if let dirty = counters?.vcpuPages { pairs.append(("dirty_pages", .number(dirty[index]))) }
            if let full = counters?.ringFullExits { pairs.append(("ring_full_exits", .number(full[index]))) }
            if let overruns = counters?.ringOverruns { pairs.append(("ring_overruns", .number(overruns[index]))) }
            if let quota = counters?.quotaExits { pairs.append(("quota_exits", .number(quota[index]))) }
            return .object(pairs)
        }
        let failure = machine.events.firstFailure.map { JSONValue.string("\($0)") } ?? .null
        return [
            "name": .string(configuration.name),
            // Superseded: its standby took over and runs the VM; this copy's output is stopped.
            // Post-copy paused: its link failed after the switch, on either side; the guest runs at
            // the destination (its vCPUs wait for missing pages), the source holds those pages.
            "state": .string(machine.events.firstFailure != nil ? "failed" : machine.output.isFenced ? "superseded"
                             : machine.postcopyLink.isPaused ? PostCopyLinkState.pausedStateName : "running"),
            "postcopy": machine.postcopyLink.json,
            // Superseded, in words: who took over, from which checkpoint, and what to do.
            "superseded": machine.output.fenceReason.map { .string($0) } ?? .null,
            "pid": .number(Int(getpid())),
            "error": failure,
            "memory_bytes": .number(configuration.memorySize),
            "vcpus": .number(configuration.vcpuCount),
            "track": configuration.tracking.map { .string($0.rawValue) } ?? .null,
            "ring_entries": configuration.tracking?.usesDirtyRing == true ? .number(configuration.ringEntries) : .null,
            "tsc_hz": .number(machine.tscHz),
            "uptime_s": .number(machine.uptimeSeconds),
            "guest_booted_vcpus": .number(stats.bootedVCPUs),
            "ring_overruns": .number(counters?.ringOverruns?.reduce(0, +) ?? 0),
            "ring_full_exits": .number(counters?.ringFullExits?.reduce(0, +) ?? 0),
            "quota_exits": .number(counters?.quotaExits?.reduce(0, +) ?? 0),
            "guest_output_lines": .number(machine.output.releasedCount),
            "guest_output_dropped": .number(machine.output.droppedCount),
            "vcpu_stats": .array(vcpus),
        ]
    }

    /// Syncs the tracker, then returns its cumulative counts with the guest's.
    public static func counters(_ machine: Machine) throws(ControlError) -> DirtyCounterSnapshot {
        do { try machine.tracker?.sync() } catch { throw ControlError(.failed, "dirty log sync failed: \(error)") }
        let counters = machine.tracker?.counters()
        let guest = machine.guestStats().vcpus
        return DirtyCounterSnapshot(timeNanoseconds: counters?.timeNanoseconds ?? MonotonicClock.nanoseconds(),
                                    unixTime: WallClock.unixSeconds(), totalDirtyPages: counters?.totalPages,
                                    vcpuDirtyPages: counters?.vcpuPages, guestPages: guest.map(\.pages),
                                    guestErrors: guest.map(\.errors))
    }

    static func dirtyRate(_ machine: Machine, _ arguments: JSONValue, context: ControlContext) throws(ControlError) -> JSONValue {
        try arguments.checkArguments(allowed: ["mode", "interval"])
        let tracking = machine.configuration.tracking
        var mode = DirtyRateMode.best(for: tracking)
        if let name = try arguments.stringArgument("mode") {
            guard let chosen = DirtyRateMode(rawValue: name) else {
                throw ControlError(.invalidArgument, "mode must be ring, bitmap or sample, not '\(name)'")
            }
            mode = chosen
        }
        guard mode.isServed(by: tracking) else {
            throw ControlError(.unsupported, "mode \(mode.rawValue) needs a VM booted with \(mode.requiredTracking); this VM was booted with --track \(tracking?.rawValue ?? "none")")
        }
        let interval = try arguments.doubleArgument("interval") ?? 1.0
        guard interval >= 0.05, interval <= 3600 else {
            throw ControlError(.invalidArgument, "interval must be between 0.05 and 3600 seconds")
        }
        return try measure(machine, mode: mode, interval: interval) { seconds in context.sleep(seconds: seconds) }.json
    }

    /// Measures one interval in the given mode. `wait` sleeps for the interval and returns false
    /// if the VM is stopping meanwhile (the control server wakes it), which ends the measurement.
    public static func measure(_ machine: Machine, mode: DirtyRateMode, interval: Double,
                               wait: (Double) -> Bool = { Thread.sleep(forTimeInterval: $0); return true })
        throws(ControlError) -> DirtyRateReport {
        let stopping = ControlError(.failed, "the VM is stopping")
        if mode == .sample {
            let sampler = PageSampler(seed: UInt64(MonotonicClock.nanoseconds()))
            let pages = sampler.choosePages(pageCount: machine.memory.pageCount)
            let (start, guestBefore) = sampleWithGuestCounters(machine, sampler: sampler, pages: pages)
            guard wait(interval) else { throw stopping }
            let (end, guestAfter) = sampleWithGuestCounters(machine, sampler: sampler, pages: pages)
            let seconds = Double(end.timeNanoseconds - start.timeNanoseconds) / 1e9
            let total = PageSampler.dirtyPagesPerSecond(from: start, to: end, pageCount: machine.memory.pageCount)
            let errors = machine.guestStats().vcpus.map(\.errors)
            let vcpus = guestBefore.indices.map {
                DirtyRateReport.VCPURate(id: $0, dirtyPagesPerSecond: nil,
                                         guestPagesPerSecond: (guestAfter[$0] - guestBefore[$0]) / seconds,
                                         guestErrors: errors[$0])
            }
            return DirtyRateReport(unixTime: WallClock.unixSeconds(), mode: .sample, intervalSeconds: seconds,
                                   totalPagesPerSecond: total, vcpus: vcpus)
        }
        let start = try counters(machine)
        guard wait(interval) else { throw stopping }
        let end = try counters(machine)
        return DirtyRateReport.between(start, end, mode: mode)
    }

    /// Hashes the sample and reads the guest's counters as they stood at the sample's mean
    /// reading time (interpolated between reads before and after the pass, which takes tens of
    /// milliseconds), so the guest's own rate covers the same window as the sampled one.
    public static func sampleWithGuestCounters(_ machine: Machine, sampler: PageSampler, pages: [Int])
        -> (PageSampler.Sample, [Double]) {
        let before = machine.guestStats().vcpus.map(\.pages)
        let sample = sampler.hash(machine.memory, pages: pages)
        let after = machine.guestStats().vcpus.map(\.pages)
        let span = Double(max(sample.endNanoseconds - sample.startNanoseconds, 1))
        let share = Double(sample.timeNanoseconds - sample.startNanoseconds) / span
        let counters = before.indices.map { Double(before[$0]) + Double(after[$0] &- before[$0]) * share }
        return (sample, counters)
    }

    static func stateName(_ state: GuestVCPUState) -> String {
        switch state {
        case .notStarted: return "starting"
        case .running: return "running"
        case .finished: return "finished"
        case .idle: return "idle"
        case .failed: return "failed"
        }
    }

    static func describe(_ workload: VCPUWorkload) -> String {
        guard workload.kind != .idle else { return "idle" }
        var text = "\(workload.kind),ws=\(ByteSize.format(workload.size)),offset=\(ByteSize.format(workload.offset))"
        switch workload.pattern {
        case .sequential: text += ",pattern=seq"
        case .random: text += ",pattern=random"
        case .hot: text += ",pattern=hot:\(workload.hotFraction)"
        }
        if workload.rateBytesPerSecond > 0 { text += ",rate=\(ByteRate.format(workload.rateBytesPerSecond))" }
        if workload.kind == .mix { text += ",writes=\(workload.writePercent)" }
        if workload.passes > 0 { text += ",passes=\(workload.passes)" }
        if workload.emitMicroseconds > 0 { text += ",emit=\(DurationValue.format(microseconds: workload.emitMicroseconds))" }
        return text.replacingOccurrences(of: " ", with: "")
    }
}
