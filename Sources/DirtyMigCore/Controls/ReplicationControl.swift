import Synchronization

/// The control commands of continuous replication, served by the primary's process:
/// `replicate` (connects, copies, and replies once the standby holds a first checkpoint),
/// `query-replication` (its figures) and `replicate-stop` (the standby discards its copy).
/// Replication then runs inside this process, on its own threads, until stopped or lost.
public enum ReplicationControl {
    public final class Slot: Sendable {
        let current = Mutex<Replicator?>(nil)

        /// Stops the replication under way, if any (the standby discards its copy). A VM asked
        /// to stop ends its replication this way: its standby must not take over a VM that
        /// was stopped on purpose.
        @discardableResult
        public func stop(reason: String) -> ReplicationFigures? {
            guard let replicator = current.withLock({ $0 }), !replicator.isFinished else { return nil }
            return replicator.stop(reason: reason)
        }
    }

    /// `log`: where the replication's events go (the standby lost, or taking over), in the
    /// VM's own log.
    @discardableResult
    public static func register(on server: ControlServer, machine: Machine,
                                log: @escaping @Sendable (String) -> Void = { _ in }) -> Slot {
        let slot = Slot()
        server.register("replicate") { (arguments: JSONValue) throws(ControlError) in
            let options = try replicationOptions(arguments, machine: machine)
            if let superseded = machine.supersededRefusal { throw ControlError(.failed, superseded) }
            if let other = machine.transferClaim.claim("replication to \(options.standby)") {
                throw ControlError(.failed, "\(other) is under way; one at a time")
            }
            let replicator = Replicator(machine: machine, options: options, log: log)
            slot.current.withLock { $0 = replicator }
            return replicator.start().json
        }
        server.register("query-replication") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: [])
            guard let replicator = slot.current.withLock({ $0 }) else { return ["status": "none"] }
            return replicator.figures.json
        }
        server.register("replicate-stop") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: ["reason"])
            let reason = try arguments.stringArgument("reason").map { String($0.prefix(1024)) } ?? "the primary stopped replicating"
            guard let replicator = slot.current.withLock({ $0 }) else {
                throw ControlError(.failed, "this VM is not replicating")
            }
            return replicator.stop(reason: reason).json
        }
        return slot
    }

    /// The `replicate` command's arguments: `to` (HOST:PORT, required), `checkpoint_interval_ms`,
    /// `checkpoint_pages`, `compress`, `stats` (a file path), and the channel's as for `migrate`.
    static func replicationOptions(_ arguments: JSONValue, machine: Machine) throws(ControlError) -> ReplicationOptions {
        try arguments.checkArguments(allowed: ["to", "checkpoint_interval_ms", "checkpoint_pages", "compress", "stats",
                                               "psk_file", "tls_dir", "tls_peer", "insecure"])
        let standby = try MigrationControl.target(arguments, command: "replicate", listener: "'dirtymig receive --standby'")
        var options = ReplicationOptions(standby: standby)
        let interval = try arguments.doubleArgument("checkpoint_interval_ms").map { $0 / 1000 }
        let pages = try arguments.doubleArgument("checkpoint_pages")
        do throws(ReplicationOptions.Invalid) {
            try options.set(intervalSeconds: interval, checkpointPages: pages)
            if options.checkpointPages != nil, machine.tracker?.hasDirtyTrigger != true { throw .pagesNeedRing }
        } catch {
            throw ControlError(.invalidArgument, error.description)
        }
        options.compression = try MigrationControl.compression(arguments)
        options.statsPath = try arguments.stringArgument("stats")
        options.security = try MigrationControl.channelSecurity(arguments, connectingTo: standby)
        return options
    }
}
