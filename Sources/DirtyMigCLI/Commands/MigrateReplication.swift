import DirtyMigCore
import Foundation

/// `dirtymig migrate --continuous | --replication | --stop-replication`: continuous replication
/// of a running VM to a standby (`dirtymig receive --standby`). The replication runs inside the
/// VM's process; these only start it, look at it and stop it.
enum MigrateReplication {
    /// Whether the arguments ask for replication rather than a migration.
    static func applies(_ arguments: ParsedArguments) -> Bool {
        arguments.has("continuous") || arguments.has("replication") || arguments.has("stop-replication")
    }

    /// Migration-only options make no sense with these.
    static let migrationOnly = ["bandwidth", "downtime", "max-iterations", "timeout", "link-timeout", "verify", "throttle", "plot",
                                "memory", "vcpus", "workload", "track"]

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let actions = ["continuous", "replication", "stop-replication"].filter { arguments.has($0) }
        guard actions.count == 1 else {
            throw arguments.error("--\(actions[0]) and --\(actions[1]) cannot be combined: start, show or stop, one at a time")
        }
        if arguments.has("postcopy") || arguments.has("postcopy-after") {
            throw arguments.error("a replicated VM cannot switch to post-copy: its standby keeps whole checkpoints, never a VM whose memory is still arriving (stop the replication and migrate with --postcopy)")
        }
        for option in migrationOnly where arguments.has(option) {
            throw arguments.error("--\(option) applies to a migration, not to --\(actions[0])")
        }
        if !arguments.has("continuous") {
            for option in ["to", "checkpoint-interval", "checkpoint-pages", "reprotect-for", "compress", "stats", "psk-file", "tls-dir", "tls-peer", "insecure"]
                where arguments.has(option) {
                throw arguments.error("--\(option) applies to --continuous (starting a replication)")
            }
        }
        let json = arguments.has("json")
        let path = try ControlSocketPath.resolve(vm: arguments.string("vm"))
        let client = try ControlClient(path: path)
        defer { client.close() }
        let figures: JSONValue
        switch actions[0] {
        case "continuous":
            figures = try client.call("replicate", arguments: try replicateArguments(arguments), timeout: nil)
        case "replication":
            figures = try client.call("query-replication", timeout: 5)
        default:
            figures = try client.call("replicate-stop", timeout: 10)
        }
        emit(json ? figures.serialized() : ReplicationTable.render(figures))
        if actions[0] == "continuous" {
            guard figures["status"]?.stringValue == "protected" else {
                printError("dirtymig migrate: the VM is not protected: \(figures["error"]?.stringValue ?? "replication did not start")")
                return 1
            }
        }
        return 0
    }

    /// `replicate`'s arguments, checked here by the same rules the VM applies.
    static func replicateArguments(_ arguments: ParsedArguments) throws(UsageError) -> JSONValue {
        guard let to = arguments.string("to") else {
            throw arguments.error("--continuous needs --to HOST:PORT (where 'dirtymig receive --standby' listens)")
        }
        guard let standby = HostPort.parse(to), standby.port != 0, !standby.host.isEmpty else {
            throw arguments.error("--to \(to): expected HOST:PORT, for example 10.0.0.2:4444")
        }
        var options = ReplicationOptions(standby: standby)
        let interval = try arguments.duration("checkpoint-interval")
        let pages = try arguments.count("checkpoint-pages").map { Double($0) }
        let reprotectFor = try arguments.duration("reprotect-for")
        do throws(ReplicationOptions.Invalid) {
            try options.set(intervalSeconds: interval, checkpointPages: pages, reprotectForSeconds: reprotectFor)
        } catch {
            throw arguments.error(error.description)
        }
        var pairs: [(String, JSONValue)] = [("to", .string(standby.description)),
                                            ("checkpoint_interval_ms", .number(options.intervalSeconds * 1000))]
        if let pages = options.checkpointPages { pairs.append(("checkpoint_pages", .number(pages))) }
        if reprotectFor != nil { pairs.append(("reprotect_for_ms", .number(options.reprotectForSeconds * 1000))) }
        if let compress = try arguments.choice("compress") { pairs.append(("compress", .string(compress))) }
        // Checked here too, so a wrong key file or a plaintext standby on another host is a
        // usage error before the VM is asked.
        let security = try ChannelOptions.security(arguments)
        do { try security.checkConnecting(to: standby) } catch { throw arguments.error(error.description) }
        pairs += ChannelOptions.controlArguments(security)
        if let stats = arguments.string("stats") {
            // The VM's process writes it, and its working directory is not ours.
            let absolute = stats.hasPrefix("/") ? stats : FileManager.default.currentDirectoryPath + "/" + stats
            pairs.append(("stats", .string(absolute)))
        }
        return .object(pairs)
    }
}

/// `dirtymig failover`: a standby in manual mode (or any standby, by an operator's decision)
/// resumes the VM from its last committed checkpoint. Refused while the standby still hears its
/// primary, unless `--force`: then the primary is told that its standby took over.
enum FailoverCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let path = try ControlSocketPath.resolve(vm: arguments.string("vm"))
        let client = try ControlClient(path: path)
        defer { client.close() }
        let reply: JSONValue
        do throws(ControlClient.ClientError) {
            reply = try client.call("failover", arguments: arguments.has("force") ? ["force": true] : .object([]), timeout: 10)
        } catch {
            guard let refusal = error.controlError, refusal.errorClass == .failed else { throw error }
            throw RuntimeFailure("failover: \(refusal.desc)")
        }
        if arguments.has("json") { emit(reply.serialized()) } else {
            var text = "failover: the standby resumes the VM from checkpoint \(Int(reply["epoch"]?.doubleValue ?? 0))"
            if let heard = reply["primary_heard_ms_ago"]?.doubleValue {
                text += String(format: "; the primary, heard from %.0f ms before, is told that its standby took over (its output stops; stop it with 'dirtymig stop')", heard)
            }
            emit(text)
        }
        return 0
    }
}
