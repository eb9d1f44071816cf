/// /proc/net/dev read as the benchmark between two hosts needs it (`dirtymig-bench link` counts
/// what the source's namespace put on the wire).
public enum NetDevCounters {
    /// The sum of the transmitted bytes (the ninth number after an interface's colon) of every
    /// interface but `lo`; nil when there is none.
    public static func transmittedBytes(procNetDev text: String) -> UInt64? {
        var total: UInt64?
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].filter { $0 != " " }
            let numbers = line[line.index(after: colon)...].split(separator: " ").compactMap { UInt64($0) }
            guard name != "lo", numbers.count >= 9 else { continue }
            total = (total ?? 0) + numbers[8]
        }
        return total
    }
}
