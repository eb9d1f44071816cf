import DirtyMigCore

/// `dirtymig migrate --status | --set LIMIT=VALUE | --start-postcopy | --resume [--to HOST:PORT]`:
/// watch and steer the migration under way from another shell, as `virsh domjobinfo`, `virsh
/// migrate-setspeed` / `migrate-setmaxdowntime`, `virsh migrate-postcopy`, QMP's
/// `migrate-set-parameters` and `migrate-recover`/`migrate -r` do. The migration runs in the VM's
/// process; these ask it through its control socket (`query-migrate`, `migrate-set`,
/// `migrate-start-postcopy`, `migrate-resume`).
enum MigrateSteering {
    static func applies(_ arguments: ParsedArguments) -> Bool {
        actions.contains(where: arguments.has)
    }

    static let actions = ["status", "set", "start-postcopy", "resume"]

    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        let given = actions.filter(arguments.has)
        if given.count > 1 {
            throw arguments.error("--\(given[0]) and --\(given[1]) cannot be combined: each acts on the migration under way by itself")
        }
        let action = given[0]
        // --resume may name the destination's new address (--to); nothing else goes with an action.
        let allowed = ["vm", "json"] + actions + (action == "resume" ? ["to"] : [])
        for option in arguments.command.options.map(\.name) where arguments.has(option) && !allowed.contains(option) {
            let hint = ["bandwidth", "downtime"].contains(option) ? "; change the running migration's with --set \(option)=VALUE" : ""
            throw arguments.error("--\(option) does not go with --\(action), which acts on the migration under way\(hint)")
        }
        var request: JSONValue = action == "set" ? try limits(arguments) : .object([])
        if action == "resume", let to = arguments.string("to") {
            guard let endpoint = HostPort.parse(to), endpoint.port != 0, !endpoint.host.isEmpty else {
                throw arguments.error("--to \(to): expected HOST:PORT, for example 10.0.0.2:4444")
            }
            request = ["to": .string(endpoint.description)]
        }
        let path = try ControlSocketPath.resolve(vm: arguments.string("vm"))
        let name = ControlSocketPath.name(forPath: path)
        let client = try ControlClient(path: path)
        defer { client.close() }
        let reply: JSONValue
        do throws(ControlClient.ClientError) {
            let command = ["status": "query-migrate", "set": "migrate-set", "start-postcopy": "migrate-start-postcopy",
                           "resume": "migrate-resume"][action]!
            reply = try client.call(command, arguments: request, timeout: 5)
        } catch {
            switch error.controlError?.errorClass {
            case .unknownCommand?: throw RuntimeFailure("'\(name)' is a receiver, not a running VM: nothing migrates from it")
            case .failed?: throw RuntimeFailure("migrate --\(action): \(error.controlError?.desc ?? "")")
            default: throw error
            }
        }
        if action == "set" {
            emit(arguments.has("json") ? reply.serialized() : MigrationStatusText.limitsSet(reply, vm: name))
            return 0
        }
        if action == "resume" {
            emit(arguments.has("json") ? reply.serialized()
                 : "'\(name)' tries the destination \(reply["to"]?.stringValue ?? "-") now to resume its paused post-copy (watch it with 'dirtymig migrate --status' or 'dirtymig list')\n")
            return 0
        }
        if action == "start-postcopy" {
            emit(arguments.has("json") ? reply.serialized()
                 : "'\(name)' switches to post-copy at the end of pass \(Int(reply["iteration"]?.doubleValue ?? 0)) (now \(reply["phase"]?.stringValue ?? "-"))\n")
            return 0
        }
        guard MigrationProgress.isUnderWay(phase: reply["phase"]?.stringValue) else {
            if arguments.has("json") { emit(reply.serialized()) }
            printError("dirtymig migrate: no migration of '\(name)' is under way (start one with 'dirtymig migrate --vm \(name) --to HOST:PORT')")
            return 1
        }
        emit(arguments.has("json") ? reply.serialized() : MigrationStatusText.render(reply, vm: name))
        return 0
    }

    /// `--set`'s values as `migrate-set` takes them, checked here by the ranges the VM applies,
    /// so that a bad one is a usage error before the VM is asked.
    static func limits(_ arguments: ParsedArguments) throws(UsageError) -> JSONValue {
        let names = ["bandwidth", "downtime"]
        var pairs: [(String, JSONValue)] = []
        for item in arguments.strings("set") {
            guard let equals = item.firstIndex(of: "=") else {
                throw arguments.error("--set '\(item)': expected LIMIT=VALUE: bandwidth=RATE (or unlimited), downtime=DURATION")
            }
            let name = String(item[..<equals]), value = String(item[item.index(after: equals)...])
            guard names.contains(name) else {
                let hint = nearest(name, names).map { "; did you mean '\($0)'?" } ?? ""
                throw arguments.error("--set: '\(name)' is not a limit that can change\(hint) (bandwidth=RATE or downtime=DURATION)")
            }
            let key = name == "bandwidth" ? "bandwidth" : "downtime_ms"
            guard !pairs.contains(where: { $0.0 == key }) else { throw arguments.error("--set \(name) given twice") }
            if name == "bandwidth" && value == "unlimited" {
                pairs.append((key, .string("unlimited")))
                continue
            }
            let number: Double
            do throws(QuantityError) {
                number = name == "bandwidth" ? Double(try ByteRate.parse(value)) : try DurationValue.parse(value)
            } catch {
                throw arguments.error("--set \(item): \(error.message)")
            }
            do throws(MigrationOptions.Invalid) {
                pairs.append((key, name == "bandwidth" ? .number(try MigrationOptions.checkedBandwidth(number))
                                                       : .number(try MigrationOptions.checkedDowntime(number) * 1000)))
            } catch {
                throw arguments.error("--set \(item): \(error.description)")
            }
        }
        return .object(pairs)
    }
}
