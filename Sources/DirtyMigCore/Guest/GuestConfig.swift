/// The config block the host writes at GuestLayout.configAddress (and that QEMU's
/// `-device loader` can load): the whole description of what the guest does.
public struct GuestConfig: Sendable, Equatable {
    public var tscHz: UInt64
    public var memorySize: UInt64
    public var vcpus: [VCPUWorkload]

    public init(tscHz: UInt64, memorySize: UInt64, vcpus: [VCPUWorkload]) {
        self.tscHz = tscHz
        self.memorySize = memorySize
        self.vcpus = vcpus
    }

    public enum DecodeError: Error, CustomStringConvertible {
        case tooShort, badMagic, unsupportedVersion(UInt32), badValue(String)
        public var description: String {
            switch self {
            case .tooShort: return "config block too short"
            case .badMagic: return "not a dirtymig config block (magic missing)"
            case .unsupportedVersion(let v): return "config block version \(v) not supported"
            case .badValue(let what): return "config block has an invalid \(what)"
            }
        }
    }

    /// A hot fraction in millionths, as the config block stores it (clamped to 0...1).
    public static func hotFractionPPM(_ fraction: Double) -> UInt32 {
        guard fraction.isFinite else { return fraction > 0 ? 1_000_000 : 0 }
        return UInt32((min(max(fraction, 0), 1) * 1_000_000).rounded())
    }

    /// The exact bytes of the block (layout in GuestLayout.swift and the man page).
    public func encode() -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(GuestLayout.configHeaderSize + GuestLayout.configEntrySize * vcpus.count)
        func u32(_ value: UInt32) { withUnsafeBytes(of: value.littleEndian) { out.append(contentsOf: $0) } }
        func u64(_ value: UInt64) { withUnsafeBytes(of: value.littleEndian) { out.append(contentsOf: $0) } }
        u32(GuestLayout.configMagic); u32(GuestLayout.configVersion)
        u32(UInt32(GuestLayout.configHeaderSize)); u32(UInt32(GuestLayout.configEntrySize))
        u32(UInt32(vcpus.count)); u32(0)
        u64(tscHz); u64(memorySize); u64(GuestLayout.lowMemorySize(forTotal: memorySize))
        u64(GuestLayout.workloadBase); u64(0)
        for workload in vcpus {
            u32(workload.kind.rawValue)
            u32(workload.pattern.rawValue | UInt32(workload.content.rawValue) << 16)   // u16 pattern, u16 content
            u32(workload.writePercent)
            u32(GuestConfig.hotFractionPPM(workload.hotFraction))
            u64(workload.offset); u64(workload.size); u64(workload.rateBytesPerSecond)
            u64(workload.passes); u64(workload.seed); u64(workload.emitMicroseconds)
        }
        return out
    }

    public init(decoding bytes: [UInt8]) throws(DecodeError) {
        guard bytes.count >= GuestLayout.configHeaderSize else { throw .tooShort }
        func u32(_ offset: Int) -> UInt32 {
            (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
        }
        func u64(_ offset: Int) -> UInt64 {
            (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
        }
        guard u32(0) == GuestLayout.configMagic else { throw .badMagic }
        guard u32(4) == GuestLayout.configVersion else { throw .unsupportedVersion(u32(4)) }
        let count = Int(u32(16))
        guard bytes.count >= GuestLayout.configHeaderSize + GuestLayout.configEntrySize * count else { throw .tooShort }
        tscHz = u64(24)
        memorySize = u64(32)
        var vcpus: [VCPUWorkload] = []
        for index in 0..<count {
            let base = GuestLayout.configHeaderSize + GuestLayout.configEntrySize * index
            guard let kind = WorkloadKind(rawValue: u32(base)) else { throw .badValue("workload kind") }
            guard let pattern = AccessPattern(rawValue: u32(base + 4) & 0xFFFF) else { throw .badValue("access pattern") }
            guard let content = PageContent(rawValue: UInt16(u32(base + 4) >> 16)) else { throw .badValue("page content") }
            var workload = VCPUWorkload(kind: kind, pattern: pattern, hotFraction: Double(u32(base + 12)) / 1_000_000,
                                        writePercent: u32(base + 8), offset: u64(base + 16), size: u64(base + 24),
                                        rateBytesPerSecond: u64(base + 32), passes: u64(base + 40), seed: u64(base + 48),
                                        emitMicroseconds: u64(base + 56))
            workload.content = content
            vcpus.append(workload)
        }
        self.vcpus = vcpus
    }
}
