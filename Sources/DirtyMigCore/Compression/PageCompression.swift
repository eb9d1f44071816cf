/// What `--compress` asks of a migration or replication: how page batches may travel.
public enum PageCompression: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Every batch as it is.
    case none
    /// Every batch compressed with zstd, except a batch that does not get smaller (sent as it is).
    case zstd
    /// zstd while the link is slower than this host compresses, batch by batch (CompressionChooser).
    case auto

    public var description: String { rawValue }

    /// What the hello announces: the codec the sender may use (`auto` may use zstd at any batch).
    var codec: PageCodec { self == .none ? .none : .zstd }
}

/// The codec of compressed page batches, as the hello names it (u32). A receiver refuses a
/// codec it does not know before anything is allocated, rather than fail at the first batch.
public enum PageCodec: UInt32, Sendable, CustomStringConvertible {
    case none = 0
    case zstd = 1

    public var description: String {
        switch self {
        case .none: return "none"
        case .zstd: return "zstd"
        }
    }

    /// The refusal of a codec this build does not know.
    static func unknown(_ code: UInt32) -> String {
        "the source compresses pages with codec \(code), which this dirtymig does not know: run the same dirtymig release on both hosts, or migrate with --compress none"
    }
}

/// What a migration's or replication's report says of compression (`compression` in its JSON).
public struct CompressionReport: Sendable, Equatable {
    public var mode: PageCompression
    public var tally: CompressionTally

    public init(mode: PageCompression, tally: CompressionTally = CompressionTally()) {
        self.mode = mode
        self.tally = tally
    }

    public var json: JSONValue {
        [
            "mode": .string(mode.rawValue), "codec": .string(mode.codec.description),
            "batches": .number(tally.batches), "compressed_batches": .number(tally.compressedBatches),
            "incompressible_batches": .number(tally.incompressibleBatches),
            "page_bytes": .number(tally.pageBytes), "page_wire_bytes": .number(tally.pageWireBytes),
            "ratio": .number(tally.ratio), "compress_ms": .number(Double(tally.compressNanoseconds) / 1e6),
        ]
    }
}
