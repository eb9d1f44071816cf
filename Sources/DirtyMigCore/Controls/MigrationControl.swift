import Synchronization

/// The control commands that migrate a running VM: `migrate` (runs the whole migration and
/// replies with the report), `query-migrate` (progress of the one under way), `migrate-set`
/// (changes its bandwidth cap and downtime limit), `migrate-start-postcopy` (switches a
/// `--postcopy` migration to post-copy at the end of its pass), `migrate-resume` (a paused
/// post-copy tries the destination now, at a new address if given) and `migrate-cancel`. The migration runs
/// inside the VM's process, on the thread serving the `migrate` command; other clients are
/// served meanwhile.
public enum MigrationControl {
    /// At most one migration per VM at a time.
    public final class Slot: Sendable {
        let current = Mutex<MigrationSender?>(nil)
        /// What runs once the migration under way has ended (`whenIdle`). Locked after `current`.
        private let idleActions = Mutex<[@Sendable () -> Void]>([])

        /// Whether the migration under way has switched to post-copy: this copy is held (never
        /// resumed here) and its pages are the only copy of what the destination lacks, so the
        /// VM must not stop before post-copy ends, also while it is paused.
        public var holdsPostCopy: Bool {
            current.withLock { $0 }?.link.withLock { $0.postcopyHeld } ?? false
        }

        /// Runs `action` once no migration is under way: now if none is, else when it ends.
        public func whenIdle(_ action: @escaping @Sendable () -> Void) {
            let now = current.withLock { sender -> Bool in
                guard sender != nil else { return true }
                idleActions.withLock { $0.append(action) }
                return false
            }
            if now { action() }
        }

        /// The migration ended: the slot is free, and what waited for it runs.
        func release() {
            let actions = current.withLock { sender -> [@Sendable () -> Void] in
                sender = nil
                return idleActions.withLock { actions in
                    defer { actions = [] }
                    return actions
                }
            }
            for action in actions { action() }
        }

        /// Cancels the migration under way, if any, and says whether one could still be
        /// cancelled (false: none, or it is past its commit point and ends as the destination says).
        @discardableResult
        public func cancel(reason: String) -> Bool {
            guard let sender = current.withLock({ $0 }) else { return false }
            return sender.cancel(reason: reason)
        }
    }

    /// `onMigrated` runs after the reply of a migration that completed: the VM runs at the
    /// destination now, so this process must stop its copy. The returned slot lets the process
    /// cancel a migration when it is asked to stop.
    @discardableResult
    public static func register(on server: ControlServer, machine: Machine, onMigrated: @escaping @Sendable () -> Void) -> Slot {
        let slot = Slot()
        server.register("migrate") { (arguments: JSONValue, context: ControlContext) throws(ControlError) in
            let options = try migrationOptions(arguments)
            do throws(ThrottleModeError) { _ = try options.throttle.resolved(for: machine.configuration.tracking) } catch {
                throw ControlError(.unsupported, error.description)
            }
            let sender = MigrationSender(machine: machine, options: options)
            let busy = slot.current.withLock { current -> Bool in
                if current != nil { return true }
                current = sender
                return false
            }
            if busy { throw ControlError(.failed, "a migration of this VM is already under way") }
            defer { slot.release() }
            if let superseded = machine.supersededRefusal { throw ControlError(.failed, superseded) }
            if let other = machine.transferClaim.claim("a migration to \(options.destination)") {
                throw ControlError(.failed, "\(other) is under way; stop it first (migrate --stop-replication)")
            }
            defer { machine.transferClaim.release() }
            let report = sender.run()
            if report.completed { context.afterReply { onMigrated() } }
            return report.json
        }
        server.register("query-migrate") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: [])
            guard let sender = slot.current.withLock({ $0 }) else { return ["phase": "none"] }
            return sender.progress.json
        }
        server.register("migrate-set") { (arguments: JSONValue) throws(ControlError) in
            let (bandwidth, downtime) = try newLimits(arguments)
            guard let sender = slot.current.withLock({ $0 }) else {
                throw ControlError(.failed, "no migration of this VM is under way: there are no limits to change (they are set when one starts: migrate --bandwidth, --downtime)")
            }
            let values = sender.changeLimits(bandwidth: bandwidth, downtimeSeconds: downtime)
            let progress = sender.progress
            return ["bandwidth": values.bandwidth.map { .number($0) } ?? .null, "downtime_ms": .number(values.downtimeSeconds * 1000),
                    "phase": .string(progress.phase), "iteration": .number(progress.iteration),
                    "t_s": .number(progress.elapsedSeconds)]
        }
        server.register("migrate-start-postcopy") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: [])
            guard let sender = slot.current.withLock({ $0 }) else {
                throw ControlError(.failed, "no migration of this VM is under way")
            }
            if let refusal = sender.startPostCopy() { throw ControlError(.failed, refusal) }
            let progress = sender.progress
            return ["switching": true, "phase": .string(progress.phase), "iteration": .number(progress.iteration),
                    "t_s": .number(progress.elapsedSeconds)]
        }
        server.register("migrate-resume") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: ["to"])
            guard let sender = slot.current.withLock({ $0 }) else {
                throw ControlError(.failed, "no migration of this VM is under way")
            }
            var endpoint: HostPort?
            if arguments["to"] != nil {
                let to = try target(arguments, command: "migrate-resume", listener: "'dirtymig receive'")
                do { try sender.options.security.checkConnecting(to: to) } catch {
                    throw ControlError(.invalidArgument, "\(error)")
                }
                endpoint = to
            }
            if let refusal = sender.resumePostCopy(to: endpoint) { throw ControlError(.failed, refusal) }
            let progress = sender.progress
            return ["resuming": true, "to": .string((endpoint ?? sender.postcopyReconnect.endpoint).description),
                    "phase": .string(progress.phase), "postcopy_link": progress.postcopyLink]
        }
        server.register("migrate-cancel") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: ["reason"])
            let reason = try arguments.stringArgument("reason").map { String($0.prefix(1024)) } ?? MigrationSender.cancelledReason
            guard let sender = slot.current.withLock({ $0 }) else { return ["cancelled": false] }
            return ["cancelled": .bool(sender.cancel(reason: reason))]
        }
        return slot
    }

    /// The `migrate` command's arguments: `to` (HOST:PORT, required), `bandwidth` (bytes/s),
    /// `downtime_ms`, `max_iterations`, `timeout_s`, `link_timeout_s`, `verify`, `throttle`, `compress`, `postcopy`
    /// (true: the migration may switch to post-copy), `postcopy_after` (passes), `postcopy_recover_s`
    /// (how long a paused post-copy retries by itself), and the channel's:
    /// `psk_file`, `tls_dir`, `tls_peer` (absolute paths, read by this process), `insecure`.
    static func migrationOptions(_ arguments: JSONValue) throws(ControlError) -> MigrationOptions {
        try arguments.checkArguments(allowed: ["to", "bandwidth", "downtime_ms", "max_iterations", "timeout_s", "link_timeout_s", "verify", "throttle",
                                               "compress", "postcopy", "postcopy_after", "postcopy_recover_s", "psk_file", "tls_dir", "tls_peer",
                                               "insecure"])
        let destination = try target(arguments, command: "migrate", listener: "'dirtymig receive'")
        var options = MigrationOptions(destination: destination)
        let bandwidth = try arguments.doubleArgument("bandwidth")
        let downtime = try arguments.doubleArgument("downtime_ms").map { $0 / 1000 }
        let iterations = try arguments.doubleArgument("max_iterations")
        let timeout = try arguments.doubleArgument("timeout_s")
        let linkTimeout = try arguments.doubleArgument("link_timeout_s")
        let recover = try arguments.doubleArgument("postcopy_recover_s")
        if recover != nil && arguments["postcopy"]?.boolValue != true {
            throw ControlError(.invalidArgument, "postcopy_recover_s applies with postcopy: true")
        }
        do throws(MigrationOptions.Invalid) {
            try options.set(bandwidth: bandwidth, downtimeSeconds: downtime, maxIterations: iterations, timeoutSeconds: timeout,
                            linkTimeoutSeconds: linkTimeout, postcopyRecoverSeconds: recover)
        } catch {
            throw ControlError(.invalidArgument, error.description)
        }
        if let name = try arguments.stringArgument("throttle") {
            guard let mode = ThrottleMode(rawValue: name) else {
                throw ControlError(.invalidArgument, "throttle must be one of \(ThrottleMode.allCases.map(\.rawValue).joined(separator: ", ")), not '\(name)'")
            }
            options.throttle = mode
        }
        if let verify = arguments["verify"] {
            guard let flag = verify.boolValue else { throw ControlError(.invalidArgument, "verify must be true or false") }
            options.verify = flag
        }
        options.compression = try compression(arguments)
        options.postcopy = try postcopy(arguments)
        options.security = try channelSecurity(arguments, connectingTo: destination)
        return options
    }

    /// `postcopy` (bool) and `postcopy_after` (passes, which needs `postcopy`).
    static func postcopy(_ arguments: JSONValue) throws(ControlError) -> PostCopyPolicy? {
        let after = try arguments.doubleArgument("postcopy_after")
        var enabled = false
        if let flag = arguments["postcopy"] {
            guard let value = flag.boolValue else { throw ControlError(.invalidArgument, "postcopy must be true or false") }
            enabled = value
        }
        guard enabled else {
            if after != nil { throw ControlError(.invalidArgument, "postcopy_after applies with postcopy: true") }
            return nil
        }
        guard let after else { return PostCopyPolicy() }
        let range = PostCopyPolicy.afterPassesRange
        guard after == after.rounded(), after >= Double(range.lowerBound), after <= Double(range.upperBound) else {
            throw ControlError(.invalidArgument, "postcopy_after must be a whole number of passes from \(range.lowerBound) to \(range.upperBound)")
        }
        return PostCopyPolicy(afterPasses: Int(after))
    }

    /// `migrate-set`'s arguments, checked by the ranges `migrate` applies: `bandwidth` (bytes/s,
    /// or "unlimited" to remove the cap) and `downtime_ms`; at least one.
    static func newLimits(_ arguments: JSONValue) throws(ControlError) -> (bandwidth: UInt64??, downtimeSeconds: Double?) {
        try arguments.checkArguments(allowed: ["bandwidth", "downtime_ms"])
        var bandwidth: UInt64?? = nil
        if arguments["bandwidth"]?.stringValue == "unlimited" {
            bandwidth = .some(nil)
        } else if let rate = try arguments.doubleArgument("bandwidth") {
            do throws(MigrationOptions.Invalid) { bandwidth = try MigrationOptions.checkedBandwidth(rate) } catch {
                throw ControlError(.invalidArgument, error.description + " (or \"unlimited\")")
            }
        }
        var downtime: Double? = nil
        if let milliseconds = try arguments.doubleArgument("downtime_ms") {
            do throws(MigrationOptions.Invalid) { downtime = try MigrationOptions.checkedDowntime(milliseconds / 1000) } catch {
                throw ControlError(.invalidArgument, error.description)
            }
        }
        guard bandwidth != nil || downtime != nil else {
            throw ControlError(.invalidArgument, "migrate-set needs 'bandwidth' (bytes/s, or \"unlimited\") or 'downtime_ms', or both")
        }
        return (bandwidth, downtime)
    }

    /// The `compress` argument of `migrate` and `replicate` (default none).
    static func compression(_ arguments: JSONValue) throws(ControlError) -> PageCompression {
        guard let name = try arguments.stringArgument("compress") else { return .none }
        guard let mode = PageCompression(rawValue: name) else {
            throw ControlError(.invalidArgument, "compress must be one of \(PageCompression.allCases.map(\.rawValue).joined(separator: ", ")), not '\(name)'")
        }
        return mode
    }

    /// The `to` argument (HOST:PORT) of `migrate` and `replicate`, which must be there.
    static func target(_ arguments: JSONValue, command: String, listener: String) throws(ControlError) -> HostPort {
        guard let to = try arguments.stringArgument("to") else {
            throw ControlError(.invalidArgument, "\(command) needs 'to': the HOST:PORT a \(listener) listens on")
        }
        guard let endpoint = HostPort.parse(to), endpoint.port != 0 else {
            throw ControlError(.invalidArgument, "'to' must be HOST:PORT with a port from 1 to 65535, not '\(to)'")
        }
        return endpoint
    }

    /// The channel's arguments (`psk_file`, `tls_dir`, `tls_peer`, `insecure`), loaded and
    /// checked against where the connection goes: the same for `migrate` and `replicate`.
    static func channelSecurity(_ arguments: JSONValue, connectingTo destination: HostPort) throws(ControlError) -> ChannelSecurity {
        let insecure = try arguments.boolArgument("insecure") ?? false
        let pskFile = try arguments.stringArgument("psk_file")
        let tlsDirectory = try arguments.stringArgument("tls_dir")
        let peerName = try arguments.stringArgument("tls_peer")
        do {
            let security = try ChannelSecurity.load(pskFile: pskFile, tlsDirectory: tlsDirectory, peerName: peerName,
                                                    insecure: insecure)
            try security.checkConnecting(to: destination)
            return security
        } catch {
            throw ControlError(.invalidArgument, error.description)
        }
    }
}
