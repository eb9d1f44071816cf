/// The control commands behind `dirtymig limit`: `set-dirty-limit` (`rate` in bytes/s, `vcpu`
/// or every vCPU), `cancel-dirty-limit` (`vcpu` or every vCPU) and `query-dirty-limit`.
public enum LimitControl {
    public static func register(on server: ControlServer, machine: Machine) {
        server.register("set-dirty-limit") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: ["vcpu", "rate"])
            guard let rate = try arguments.doubleArgument("rate") else {
                throw ControlError(.invalidArgument, "set-dirty-limit needs 'rate': the ceiling in bytes per second")
            }
            try apply(machine, rate: rate, vcpus: try vcpus(arguments, machine))
            return query(machine)
        }
        server.register("cancel-dirty-limit") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: ["vcpu"])
            try apply(machine, rate: nil, vcpus: try vcpus(arguments, machine))
            return query(machine)
        }
        server.register("query-dirty-limit") { (arguments: JSONValue) throws(ControlError) in
            try arguments.checkArguments(allowed: [])
            return query(machine)
        }
    }

    private static func vcpus(_ arguments: JSONValue, _ machine: Machine) throws(ControlError) -> [Int] {
        guard let vcpu = try arguments.intArgument("vcpu") else { return Array(0..<machine.configuration.vcpuCount) }
        return [vcpu]
    }

    private static func apply(_ machine: Machine, rate: Double?, vcpus: [Int]) throws(ControlError) {
        do {
            try machine.setDirtyLimit(bytesPerSecond: rate, vcpus: vcpus)
        } catch {
            switch error {
            case .needsPerVCPUTracking: throw ControlError(.unsupported, error.description)
            case .noSuchVCPU, .rateOutOfRange: throw ControlError(.invalidArgument, error.description)
            }
        }
    }

    static func query(_ machine: Machine) -> JSONValue {
        let vcpus: [JSONValue] = machine.throttleStatus().map { status in
            [
                "id": .number(status.id),
                "limit_bytes_s": status.limitBytesPerSecond.map { .double($0) } ?? .null,
                "migration_limit_bytes_s": status.migrationLimitBytesPerSecond.map { .double($0) } ?? .null,
                "current_bytes_s": status.currentBytesPerSecond.map { .double($0) } ?? .null,
                "held_fraction": .double(status.heldFraction),
                "exits": .number(status.exits),
                "last_hold_ms": .double(status.lastHoldSeconds * 1000),
                "quota_pages_per_interval": status.quotaPagesPerInterval.map { .double($0) } ?? .null,
            ]
        }
        let tracking = machine.configuration.tracking
        return [
            "track": tracking.map { .string($0.rawValue) } ?? .null,
            "mechanism": .string(tracking == .quota ? "dirty-quota" : tracking == .ring ? "dirty-limit" : "none"),
            "quota_interval_ms": tracking == .quota ? .double(Double(machine.ringTracker?.quotaIntervalNanoseconds ?? 0) / 1e6) : .null,
            "cpu_throttle_percent": .number(machine.cpuThrottle.percent),
            "vcpus": .array(vcpus),
        ]
    }
}
