import DirtyMigCore
import Foundation

/// `dirtymig migrate`: ask a running VM to migrate itself to a receiver (`--vm`, `--to`), show
/// progress, print the report. With neither, run a whole local migration in this process: boot
/// a VM, receive it on a loopback port, migrate, report.
enum MigrateCommand {
    struct Options {
        var to: HostPort?
        /// What the migration is asked to do: checked by the same rules the VM's `migrate`
        /// command applies (the destination is filled in when it is known).
        var migration = MigrationOptions(destination: HostPort(host: "127.0.0.1", port: 0))
        var json = false
        var stats: String?
        var plot: String?
        var bandwidth: UInt64? { migration.bandwidth }
        var downtime: Double { migration.downtimeSeconds }
        var maxIterations: Int { migration.maxIterations }
        var timeout: Double? { migration.timeoutSeconds }
        var verify: Bool { migration.verify }
        var throttle: ThrottleMode { migration.throttle }
    }

    static func options(_ arguments: ParsedArguments) throws(UsageError) -> Options {
        var options = Options()
        if let to = arguments.string("to") {
            guard let endpoint = HostPort.parse(to), endpoint.port != 0, !endpoint.host.isEmpty else {
                throw arguments.error("--to \(to): expected HOST:PORT, for example 10.0.0.2:4444")
            }
            options.to = endpoint
        }
        let bandwidth = try arguments.rate("bandwidth").map { Double($0) }   // not map(Double.init): that picks init(bitPattern:)
        let downtime = try arguments.duration("downtime")
        let iterations = try arguments.count("max-iterations").map { Double($0) }
        let timeout = try arguments.duration("timeout")
        let linkTimeout = try arguments.duration("link-timeout")
        do throws(MigrationOptions.Invalid) {
            try options.migration.set(bandwidth: bandwidth, downtimeSeconds: downtime, maxIterations: iterations,
                                      timeoutSeconds: timeout, linkTimeoutSeconds: linkTimeout)
        } catch {
            throw arguments.error(error.description)
        }
        if let throttle = try arguments.choice("throttle") { options.migration.throttle = ThrottleMode(rawValue: throttle)! }
        if let compress = try arguments.choice("compress") { options.migration.compression = PageCompression(rawValue: compress)! }
        if arguments.has("postcopy") || arguments.has("postcopy-after") || arguments.has("postcopy-recover-for") {
            guard arguments.has("postcopy") else {
                throw arguments.error("--\(arguments.has("postcopy-after") ? "postcopy-after" : "postcopy-recover-for") applies with --postcopy")
            }
            if let recover = try arguments.duration("postcopy-recover-for") {
                do throws(MigrationOptions.Invalid) { try options.migration.set(postcopyRecoverSeconds: recover) } catch {
                    throw arguments.error(error.description)
                }
            }
            var policy = PostCopyPolicy()
            if let after = try arguments.count("postcopy-after") {
                guard PostCopyPolicy.afterPassesRange.contains(after) else {
                    throw arguments.error("--postcopy-after \(after): expected \(PostCopyPolicy.afterPassesRange.lowerBound) to \(PostCopyPolicy.afterPassesRange.upperBound) passes")
                }
                policy.afterPasses = after
            }
            options.migration.postcopy = policy
        }
        options.migration.verify = arguments.has("verify")
        options.json = arguments.has("json")
        options.stats = arguments.string("stats")
        options.plot = arguments.string("plot")
        for option in ["checkpoint-interval", "checkpoint-pages", "reprotect-for"] where arguments.has(option) {
            throw arguments.error("--\(option) applies to --continuous (replication), not to a migration")
        }
        options.migration.security = try ChannelOptions.security(arguments)
        let embedded = options.to == nil && arguments.string("vm") == nil
        if options.to == nil && !embedded {
            throw arguments.error("--vm needs --to HOST:PORT (where 'dirtymig receive' listens)")
        }
        if !embedded {
            for local in ["memory", "vcpus", "workload", "track"] where arguments.has(local) {
                throw arguments.error("--\(local) applies to the local migration (no --vm, no --to); a running VM keeps its own")
            }
        }
        if embedded, arguments.has("insecure") {
            throw arguments.error("--insecure applies to a migration to another host (--to); the local one runs on loopback")
        }
        if let to = options.to {
            do { try options.migration.security.checkConnecting(to: to) } catch { throw arguments.error(error.description) }
        }
        return options
    }

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        if MigrateSteering.applies(arguments) { return try MigrateSteering.run(arguments) }
        if MigrateReplication.applies(arguments) { return try MigrateReplication.run(arguments) }
        let options = try options(arguments)
        // Ctrl-C (SIGINT), SIGTERM or SIGHUP cancel the migration: the source runs on, the
        // destination discards its copy, the report says so and the exit status is 130.
        let stop = StopSignals()   // before any other thread exists
        let interrupted = StopFlagBox()
        let report: JSONValue
        if let to = options.to {
            report = try migrateRunningVM(vm: arguments.string("vm"), to: to, options: options, stop: stop, interrupted: interrupted)
        } else {
            report = try migrateLocally(BootCommand.options(arguments), options: options, stop: stop, interrupted: interrupted)
        }
        if let stats = options.stats { try writeStats(report, to: stats) }
        if let plot = options.plot { try PlotCommand.write(MigrationPlot.svg(report: report), to: plot) }
        emit(options.json ? report.serialized() : ReportTable.render(report))
        if let over = report["downtime_exceeded_ms"]?.doubleValue {
            // The limit in force at the pause: `migrate --set downtime=` may have changed --downtime.
            let limit = report["downtime_limit_ms"]?.doubleValue ?? options.downtime * 1000
            printError(String(format: "dirtymig migrate: warning: the downtime was %.1f ms, %.1f ms over the downtime limit %@ (downtime_parts says where it went)",
                              report["downtime_ms"]?.doubleValue ?? 0, over, HumanNumber.milliseconds(limit)))
        }
        if report["status"]?.stringValue == "completed" { return 0 }
        return interrupted.isRaised ? 130 : 1
    }

    static func cancelReason(_ stop: StopSignals) -> String {
        "the migration was cancelled (\(stop.name) to 'dirtymig migrate'); the VM runs on at the source"
    }

    static func arguments(_ options: Options, to: HostPort) -> JSONValue {
        var pairs: [(String, JSONValue)] = [("to", .string(to.description)), ("downtime_ms", .number(options.downtime * 1000)),
                                            ("max_iterations", .number(options.maxIterations)), ("verify", .bool(options.verify)),
                                            ("throttle", .string(options.throttle.rawValue)),
                                            ("compress", .string(options.migration.compression.rawValue))]
        if let bandwidth = options.bandwidth { pairs.append(("bandwidth", .number(bandwidth))) }
        if let timeout = options.timeout { pairs.append(("timeout_s", .number(timeout))) }
        pairs.append(("link_timeout_s", .number(options.migration.linkTimeoutSeconds)))
        if let postcopy = options.migration.postcopy {
            pairs.append(("postcopy", .bool(true)))
            if let after = postcopy.afterPasses { pairs.append(("postcopy_after", .number(after))) }
            pairs.append(("postcopy_recover_s", .number(options.migration.postcopyRecoverSeconds)))
        }
        pairs += ChannelOptions.controlArguments(options.migration.security)
        return .object(pairs)
    }

    /// The VM migrates itself; we watch through a second connection.
    static func migrateRunningVM(vm: String?, to: HostPort, options: Options, stop: StopSignals,
                                 interrupted: StopFlagBox) throws -> JSONValue {
        let path = try ControlSocketPath.resolve(vm: vm)
        let client = try ControlClient(path: path)
        defer { client.close() }
        // The migration runs in the VM's process; a second connection asks it to cancel.
        stop.onSignal {
            interrupted.raise()
            let cancelled = (try? ControlClient(path: path).call("migrate-cancel", arguments: ["reason": .string(cancelReason(stop))], timeout: 5))
            if cancelled?["cancelled"]?.boolValue == false {
                printError("dirtymig migrate: \(stop.name): too late to cancel, the destination is already taking the VM over")
            } else {
                printError("dirtymig migrate: \(stop.name): cancelling the migration; the VM runs on at the source")
            }
        }
        let progress = ProgressLine.start { (try? ControlClient(path: path)).map { watcher in
            { try? watcher.call("query-migrate", timeout: 2) }
        } }
        defer { progress?.finish() }
        return try client.call("migrate", arguments: arguments(options, to: to), timeout: nil)
    }

    /// Boots a VM here, receives it here on a loopback port, migrates, reports.
    static func migrateLocally(_ boot: BootCommand.Options, options: Options, stop: StopSignals,
                               interrupted: StopFlagBox) throws -> JSONValue {
        let kvm: KVMSystem
        do { kvm = try KVMSystem() } catch { throw RuntimeFailure("\(error)") }
        let configuration = MachineConfiguration(name: boot.name, memorySize: boot.memory, vcpuCount: boot.vcpus,
                                                 workloads: boot.workloads, tracking: boot.track, ringEntries: boot.ringEntries)
        do { try configuration.validate(against: kvm) } catch {
            throw UsageError(message: error.description, command: "migrate")
        }
        do { _ = try options.throttle.resolved(for: configuration.tracking) } catch {
            throw UsageError(message: error.description, command: "migrate")
        }
        let receiver: MigrationReceiver
        do {
            receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm,
                                                    security: options.migration.security)
        } catch {
            throw RuntimeFailure("cannot listen on loopback: \(error)")
        }
        let source: Machine
        do {
            source = try Machine(configuration, kvm: kvm)
            try source.start()
        } catch { throw RuntimeFailure("cannot boot the VM: \(error)") }
        let arrived = ReceivedMachine()
        let receiving = OSThread(name: "receiver") { arrived.set(Result { try receiver.receiveOne() }) }
        // Let the guest reach its pace first, so "before" measures its steady state.
        Thread.sleep(forTimeInterval: 1.0)

        var migration = MigrationOptions(destination: HostPort(host: "127.0.0.1", port: receiver.port))
        migration.bandwidth = options.bandwidth
        migration.downtimeSeconds = options.downtime
        migration.maxIterations = options.maxIterations
        migration.timeoutSeconds = options.timeout
        migration.linkTimeoutSeconds = options.migration.linkTimeoutSeconds
        migration.verify = options.verify
        migration.throttle = options.throttle
        migration.compression = options.migration.compression
        migration.postcopy = options.migration.postcopy
        migration.postcopyRecoverSeconds = options.migration.postcopyRecoverSeconds
        migration.security = options.migration.security
        let sender = MigrationSender(machine: source, options: migration)
        stop.onSignal {
            interrupted.raise()
            printError("dirtymig migrate: \(stop.name): cancelling the migration")
            sender.cancel(reason: cancelReason(stop))
        }
        let progress = ProgressLine.start { { sender.progress.json } }
        let report = sender.run()
        progress?.finish()
        if report.completed { source.stop() } else { receiver.stop() }
        receiving.join()
        var json = report.json
        if let destination = arrived.machine {
            // Show the VM running at the destination: its counters keep increasing.
            let before = destination.guestStats().vcpus.map(\.pages)
            Thread.sleep(forTimeInterval: 0.5)
            let after = destination.guestStats().vcpus.map(\.pages)
            json["destination_guest_pages_s"] = .array(zip(after, before).map { .number(Double($0 &- $1) / 0.5) })
            destination.stop()
        }
        source.stop()
        return json
    }

    static func writeStats(_ report: JSONValue, to path: String) throws {
        var lines = (report["passes"]?.arrayValue ?? []).map { $0.serialized() + "\n" }.joined()
        if let postcopy = report["postcopy"], case .object(var fields) = postcopy {
            // The phase after the passes, as one more line: the report's post-copy object.
            fields.insert(("phase", "post-copy"), at: 0)
            lines += JSONValue.object(fields).serialized() + "\n"
        }
        do { try Data(lines.utf8).write(to: URL(fileURLWithPath: path)) } catch {
            throw RuntimeFailure("cannot write --stats \(path): \(error.localizedDescription)")
        }
    }
}

/// The receiving thread's outcome, handed to the main thread.
final class ReceivedMachine: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var result: Result<Machine, Error>?
    func set(_ value: Result<Machine, Error>) { lock.lock(); result = value; lock.unlock() }
    var machine: Machine? { lock.lock(); defer { lock.unlock() }; return try? result?.get() }
}
