import CZstd

/// One zstd compression context, reused from batch to batch (a fresh context per batch costs
/// its allocation and first-touch every time). Level 1 by default: page batches are compressed
/// on the sending thread, and at level 1 zstd runs at hundreds of MB/s per core.
final class ZstdCompressor {
    private let context: OpaquePointer

    init?(level: Int32 = ZstdCompressor.defaultLevel) {
        guard let context = czstd_cctx_new(level) else { return nil }
        self.context = context
    }

    deinit { ZSTD_freeCCtx(context) }

    static let defaultLevel: Int32 = 1

    /// Compresses `source` into `destination` as one zstd frame that declares its size, and
    /// returns the frame's length; nil if it does not fit in `destination` (a caller that makes
    /// `destination` smaller than `source` learns so that the data does not compress enough).
    func compress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) -> Int? {
        guard let input = source.baseAddress, let output = destination.baseAddress else { return nil }
        let result = ZSTD_compress2(context, output, destination.count, input, source.count)
        return ZSTD_isError(result) != 0 ? nil : result
    }
}

/// One zstd decompression context, whose output is always bounded by its caller: a frame is
/// decompressed only into a buffer of exactly the size the batch announced (itself bounded),
/// and only if the frame declares that size, is one frame and nothing else, and fills the
/// buffer exactly. Its window (what zstd may hold back) is bounded too.
final class ZstdDecompressor {
    private let context: OpaquePointer

    /// `windowLog`: the largest window a frame may ask for (2^windowLog bytes).
    init?(windowLog: Int32) {
        guard let context = czstd_dctx_new(windowLog) else { return nil }
        self.context = context
    }

    deinit { ZSTD_freeDCtx(context) }

    /// Decompresses the frame in `source` into all of `destination`.
    func decompress(_ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer) throws(MigrationProtocolError) {
        guard let input = source.baseAddress, let output = destination.baseAddress, source.count > 0 else {
            throw .malformed("an empty zstd frame")
        }
        let declared = czstd_frame_content_size(input, source.count)
        guard declared >= 0 else {
            throw .malformed(declared == -2 ? "a zstd frame that does not declare its size" : "compressed page data that is not a zstd frame")
        }
        guard declared == destination.count else {
            throw .malformed("a zstd frame declaring \(declared) bytes in a batch of \(destination.count) bytes of pages")
        }
        let frameLength = ZSTD_findFrameCompressedSize(input, source.count)
        guard ZSTD_isError(frameLength) == 0, frameLength == source.count else {
            throw .malformed(ZSTD_isError(frameLength) != 0
                ? "a truncated or corrupt zstd frame (\(Self.errorName(frameLength)))"
                : "\(source.count - frameLength) bytes after the zstd frame of a compressed page batch")
        }
        let produced = ZSTD_decompressDCtx(context, output, destination.count, input, source.count)
        guard ZSTD_isError(produced) == 0 else {
            throw .malformed("a corrupt zstd frame in a compressed page batch (\(Self.errorName(produced)))")
        }
        guard produced == destination.count else {
            throw .malformed("a zstd frame that decompressed to \(produced) bytes where it declared \(destination.count)")
        }
    }

    private static func errorName(_ code: Int) -> String { String(cString: ZSTD_getErrorName(code)) }
}
