/// The JSON forms of dirty-rate data, shared by the control protocol and `dirtyrate --json`.
extension DirtyRateReport {
    /// One `dirtyrate --json` line.
    public var json: JSONValue {
        let vcpuList: [JSONValue] = vcpus.map { rate in
            ["id": .number(rate.id), "dirty_mib_s": .number(rate.dirtyMiBPerSecond.map(round3)),
             "dirty_pages_s": .number(rate.dirtyPagesPerSecond.map(round3)),
             "guest_pages_s": .number(round3(rate.guestPagesPerSecond)),
             "guest_errors": .number(rate.guestErrors)]
        }
        return ["time": .number(round3(unixTime)), "mode": .string(mode.rawValue),
                "interval_s": .number(round3(intervalSeconds)), "total_mib_s": .number(round3(totalMiBPerSecond)),
                "vcpus": .array(vcpuList)]
    }
}

extension DirtyCounterSnapshot {
    public var json: JSONValue {
        ["time_ns": .number(timeNanoseconds), "unix_time": .number(unixTime),
         "total_dirty_pages": totalDirtyPages.map { .number($0) } ?? .null,
         "vcpu_dirty_pages": vcpuDirtyPages.map { .array($0.map { .number($0) }) } ?? .null,
         "guest_pages": .array(guestPages.map { .number($0) }),
         "guest_errors": guestErrors.map { .array($0.map { .number($0) }) } ?? .null]
    }

    public init?(json: JSONValue) {
        guard let time = json["time_ns"]?.uint64Value, let guest = json["guest_pages"]?.arrayValue else { return nil }
        self.init(timeNanoseconds: time, unixTime: json["unix_time"]?.doubleValue ?? 0,
                  totalDirtyPages: json["total_dirty_pages"]?.uint64Value,
                  vcpuDirtyPages: json["vcpu_dirty_pages"]?.arrayValue?.compactMap(\.uint64Value),
                  guestPages: guest.compactMap(\.uint64Value),
                  guestErrors: json["guest_errors"]?.arrayValue?.compactMap(\.uint64Value))
    }
}

private func round3(_ value: Double) -> Double { (value * 1000).rounded() / 1000 }

extension DirtyRateReport {
    /// Reads back a `json` line (what `query-dirty-rate` returns).
    public init?(json: JSONValue) {
        guard let modeName = json["mode"]?.stringValue, let mode = DirtyRateMode(rawValue: modeName),
              let total = json["total_mib_s"]?.doubleValue, let vcpus = json["vcpus"]?.arrayValue else { return nil }
        self.init(unixTime: json["time"]?.doubleValue ?? 0, mode: mode, intervalSeconds: json["interval_s"]?.doubleValue ?? 0,
                  totalPagesPerSecond: total * 256,
                  vcpus: vcpus.map { VCPURate(id: Int($0["id"]?.intValue ?? 0), dirtyPagesPerSecond: $0["dirty_pages_s"]?.doubleValue,
                                              guestPagesPerSecond: $0["guest_pages_s"]?.doubleValue ?? 0,
                                              guestErrors: $0["guest_errors"]?.uint64Value) })
    }
}
