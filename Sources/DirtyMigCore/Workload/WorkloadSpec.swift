/// One `--workload` option: `[VCPUS:]KIND[,key=value…]`.
///   VCPUS   N or N-M (absent: every vCPU)
///   KIND    idle | write | read | mix | check
///   keys    ws=SIZE, offset=SIZE, pattern=seq|random|hot:F, rate=RATE, writes=PCT (mix), passes=N,
///           emit=DURATION (check), content=sparse|text|random (write)
public struct WorkloadSpec: Sendable, Equatable {
    public var vcpus: ClosedRange<Int>?
    public var kind: WorkloadKind
    public var workingSet: UInt64?
    public var offset: UInt64?
    public var pattern: AccessPattern = .sequential
    public var hotFraction: Double = 0.1
    public var rate: UInt64 = 0
    public var writePercent: UInt32?
    public var passes: UInt64 = 0
    /// check: an output line this often (0 = none).
    public var emitMicroseconds: UInt64 = 0
    /// write: what the written pages hold.
    public var content: PageContent = .sparse

    public static let keys = ["ws", "offset", "pattern", "rate", "writes", "passes", "emit", "content"]
    /// In WorkloadKind's order.
    public static let kinds = ["idle", "write", "read", "mix", "check"]
    /// emit=: 1 ms to 10 s. Every line costs an exit to the host and a write(2) to the output
    /// file, so not more often than once a millisecond.
    public static let emitRange: ClosedRange<UInt64> = 1_000...10_000_000

    public static func parse(_ text: String) throws(QuantityError) -> WorkloadSpec {
        var body = Substring(text)
        var vcpus: ClosedRange<Int>? = nil
        if let colon = body.firstIndex(of: ":") {
            let range = body[..<colon]
            body = body[body.index(after: colon)...]
            let bounds = range.split(separator: "-", omittingEmptySubsequences: false)
            guard (1...2).contains(bounds.count), let low = Int(bounds[0]), low >= 0,
                  let high = Int(bounds.last!), high >= low else {
                throw QuantityError("invalid workload '\(text)': vCPUs must be N or N-M (e.g. 0 or 1-3), not '\(range)'")
            }
            vcpus = low...high
        }
        var parts = body.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let kindName = parts.isEmpty ? "" : parts.removeFirst()
        guard let index = kinds.firstIndex(of: kindName.lowercased()) else {
            throw QuantityError("invalid workload '\(text)': unknown kind '\(kindName)'\(suggestion(kindName, kinds)); kinds are \(kinds.joined(separator: ", "))")
        }
        var spec = WorkloadSpec(vcpus: vcpus, kind: WorkloadKind.allCases[index])
        for part in parts {
            let pieces = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard pieces.count == 2, !pieces[1].isEmpty else {
                throw QuantityError("invalid workload '\(text)': '\(part)' is not key=value")
            }
            let (key, value) = (pieces[0].lowercased(), pieces[1])
            switch key {
            case "ws": spec.workingSet = try ByteSize.parse(value)
            case "offset": spec.offset = try ByteSize.parse(value)
            case "rate": spec.rate = try ByteRate.parse(value)
            case "passes": spec.passes = UInt64(try Count.parse(value, what: "passes"))
            case "writes":
                guard spec.kind == .mix else {
                    throw QuantityError("invalid workload '\(text)': writes= only applies to mix workloads")
                }
                guard let percent = UInt32(value), percent <= 100 else {
                    throw QuantityError("invalid workload '\(text)': writes=\(value) must be a percentage 0-100")
                }
                spec.writePercent = percent
            case "emit":
                guard spec.kind == .check else {
                    throw QuantityError("invalid workload '\(text)': emit= only applies to check workloads (their output lines carry a checksum of the working set)")
                }
                let seconds = try DurationValue.parse(value)
                let microseconds = (seconds * 1e6).rounded()
                guard microseconds >= Double(emitRange.lowerBound), microseconds <= Double(emitRange.upperBound) else {
                    throw QuantityError("invalid workload '\(text)': emit=\(value) must be between 1ms and 10s")
                }
                spec.emitMicroseconds = UInt64(microseconds)
            case "content":
                guard spec.kind == .write else {
                    throw QuantityError("invalid workload '\(text)': content= only applies to write workloads")
                }
                let names = PageContent.allCases.map(\.name)
                guard let content = PageContent.allCases.first(where: { $0.name == value.lowercased() }) else {
                    throw QuantityError("invalid workload '\(text)': content must be \(names.joined(separator: ", ")), not '\(value)'\(suggestion(value, names))")
                }
                spec.content = content
            case "pattern":
                switch value.lowercased() {
                case "seq": spec.pattern = .sequential
                case "random": spec.pattern = .random
                case let hot where hot.hasPrefix("hot:"):
                    guard let fraction = Double(hot.dropFirst(4)), fraction > 0, fraction < 1 else {
                        throw QuantityError("invalid workload '\(text)': hot:F needs a fraction between 0 and 1, e.g. hot:0.1")
                    }
                    spec.pattern = .hot
                    spec.hotFraction = fraction
                default:
                    throw QuantityError("invalid workload '\(text)': pattern must be seq, random or hot:F")
                }
            default:
                throw QuantityError("invalid workload '\(text)': unknown key '\(key)'\(suggestion(key, keys)); keys are \(keys.joined(separator: ", "))")
            }
        }
        if spec.kind == .check && spec.pattern == .hot {
            throw QuantityError("invalid workload '\(text)': check needs pattern=seq or pattern=random: hot does not visit every page once per pass, so the check could not know what each page must hold")
        }
        return spec
    }
}

/// Turns the specs into one concrete workload per vCPU.
public enum WorkloadPlan {
    public static let defaultWorkingSet: UInt64 = 64 << 20

    /// What `boot` runs when the user gives no `--workload`: one paced writer, the others reading.
    public static func defaultSpecs(vcpuCount: Int, memorySize: UInt64) -> [WorkloadSpec] {
        let area = memorySize - GuestLayout.workloadBase
        let writerSet = min(256 << 20, area / 2) & ~(GuestLayout.pageSize - 1)
        var specs = [WorkloadSpec(vcpus: 0...0, kind: .write, workingSet: writerSet, rate: 100 << 20)]
        if vcpuCount > 1 {
            let readerSet = min(128 << 20, (area - writerSet) / UInt64(vcpuCount - 1)) & ~(GuestLayout.pageSize - 1)
            specs.append(WorkloadSpec(vcpus: 1...(vcpuCount - 1), kind: .read, workingSet: readerSet))
        }
        return specs
    }

    /// Later specs override earlier ones for the same vCPU; vCPUs without a spec idle. Without
    /// `offset`, vCPUs get their own regions one after the other from the workload area's start.
    public static func resolve(specs: [WorkloadSpec], vcpuCount: Int, memorySize: UInt64) throws(QuantityError) -> [VCPUWorkload] {
        var chosen = [WorkloadSpec?](repeating: nil, count: vcpuCount)
        for spec in specs {
            let range = spec.vcpus ?? 0...(vcpuCount - 1)
            guard range.upperBound < vcpuCount else {
                throw QuantityError("workload for vCPU \(range.upperBound) but the VM has \(vcpuCount) vCPU\(vcpuCount == 1 ? "" : "s") (0-\(vcpuCount - 1))")
            }
            for vcpu in range { chosen[vcpu] = spec }
        }
        let area = memorySize > GuestLayout.workloadBase ? memorySize - GuestLayout.workloadBase : 0
        var next: UInt64 = 0
        var result: [VCPUWorkload] = []
        for (vcpu, spec) in chosen.enumerated() {
            guard let spec, spec.kind != .idle else { result.append(.idle); continue }
            let size = spec.workingSet ?? min(defaultWorkingSet, area)
            guard size > 0, size % GuestLayout.pageSize == 0 else {
                throw QuantityError("vCPU \(vcpu): working set \(size) bytes is not a positive multiple of 4 KiB")
            }
            let offset = spec.offset ?? next
            guard offset % GuestLayout.pageSize == 0 else {
                throw QuantityError("vCPU \(vcpu): offset \(offset) is not a multiple of 4 KiB")
            }
            guard offset + size <= area else {
                throw QuantityError("vCPU \(vcpu): working set [\(ByteSize.format(offset)), \(ByteSize.format(offset + size))) lies outside the \(ByteSize.format(area)) workload area of a \(ByteSize.format(memorySize)) VM (the first 16 MiB are the guest's own)")
            }
            if spec.offset == nil { next = offset + size }
            var workload = VCPUWorkload(kind: spec.kind, pattern: spec.pattern, hotFraction: spec.hotFraction,
                                        writePercent: spec.writePercent ?? 50, offset: offset, size: size,
                                        rateBytesPerSecond: spec.rate, passes: spec.passes,
                                        seed: 0x9E37_79B9_7F4A_7C15 &* UInt64(vcpu + 1),
                                        emitMicroseconds: spec.emitMicroseconds)
            workload.content = spec.content
            result.append(workload)
        }
        return result
    }
}

/// ", did you mean 'x'?" when a close match exists (edit distance at most 2, or a prefix).
public func suggestion(_ word: String, _ candidates: [String]) -> String {
    guard let best = nearest(word, candidates) else { return "" }
    return "; did you mean '\(best)'?"
}

public func nearest(_ word: String, _ candidates: [String]) -> String? {
    func distance(_ a: [Character], _ b: [Character]) -> Int {
        var row = Array(0...b.count)
        for (i, ca) in a.enumerated() {
            var previous = row[0]
            row[0] = i + 1
            for (j, cb) in b.enumerated() {
                let current = row[j + 1]
                row[j + 1] = min(row[j + 1] + 1, row[j] + 1, previous + (ca == cb ? 0 : 1))
                previous = current
            }
        }
        return row[b.count]
    }
    let lowered = word.lowercased()
    let scored = candidates.map { ($0, distance(Array(lowered), Array($0.lowercased()))) }
    if let best = scored.min(by: { $0.1 < $1.1 }), best.1 <= max(1, min(2, word.count / 2)) { return best.0 }
    if !lowered.isEmpty, let prefix = candidates.first(where: { $0.lowercased().hasPrefix(lowered) }) { return prefix }
    return nil
}
