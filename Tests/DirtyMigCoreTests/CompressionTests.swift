@testable import DirtyMigCore
import Foundation
import Synchronization
import XCTest

/// Page compression (`--compress`): the zstd codec's round trip and its bounds against lying
/// frames, compressed page batches and checkpoints through the receiver, the hello's codec,
/// the `auto` rule, and real migrations of text-like, random and mostly-zero guests.
final class CompressionTests: XCTestCase {
    /// Text-like bytes as the guest writes them (content=text): words from a small vocabulary.
    static func textLike(_ count: Int, seed: UInt64 = 1) -> [UInt8] {
        let words = ["the ", "of ", "memory ", "page ", "host ", "and ", "migration ", "is ", "a ", "dirty ", "link. "]
        var generator = SplitMix64(state: seed)
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count + 16)
        while bytes.count < count { bytes += Array(words[Int(generator.next() % UInt64(words.count))].utf8) }
        return Array(bytes.prefix(count))
    }

    static func randomBytes(_ count: Int, seed: UInt64 = 2) -> [UInt8] {
        var generator = SplitMix64(state: seed)
        return (0..<count).map { _ in UInt8(truncatingIfNeeded: generator.next()) }
    }

    static func zstdFrame(_ data: [UInt8]) -> [UInt8] {
        let compressor = ZstdCompressor()!
        var output = [UInt8](repeating: 0, count: data.count + 1024)
        let length = data.withUnsafeBytes { source in
            output.withUnsafeMutableBytes { compressor.compress(source, into: $0) }
        }
        return Array(output.prefix(length!))
    }

    // MARK: The codec

    func testZstdRoundTripAndIncompressibleData() throws {
        let text = Self.textLike(2 << 20)
        let frame = Self.zstdFrame(text)
        let ratio = Double(text.count) / Double(frame.count)
        print("CompressionTests: text-like 2 MiB -> \(frame.count) bytes (ratio \(String(format: "%.2f", ratio)))")
        XCTAssertGreaterThan(ratio, 2, "text-like pages compress")
        let decompressor = try XCTUnwrap(ZstdDecompressor(windowLog: PageBatchDecompressor.windowLog))
        var back = [UInt8](repeating: 0, count: text.count)
        let failure: MigrationProtocolError? = frame.withUnsafeBytes { source in
            back.withUnsafeMutableBytes { target in
                do throws(MigrationProtocolError) { try decompressor.decompress(source, into: target); return nil } catch { return error }
            }
        }
        XCTAssertNil(failure)
        XCTAssertEqual(back, text)

        // Random bytes do not fit in 15/16 of their size: the batch goes out as it is.
        let random = Self.randomBytes(1 << 20)
        var output = [UInt8](repeating: 0, count: random.count - random.count / 16)
        let length = random.withUnsafeBytes { source in
            output.withUnsafeMutableBytes { ZstdCompressor()!.compress(source, into: $0) }
        }
        XCTAssertNil(length)
    }

    /// Every lie a frame can tell about its size is refused with a reason, and nothing is
    /// written past the buffer of the size the batch announced.
    func testTheDecompressorRefusesLyingFramesAndNeverWritesPastItsBuffer() throws {
        let decompressor = try XCTUnwrap(ZstdDecompressor(windowLog: PageBatchDecompressor.windowLog))
        let pages = Self.textLike(8 * 4096)
        let honest = Self.zstdFrame(pages)
        let cases: [(String, [UInt8], Int, String)] = [
            ("declares more than the batch", Self.zstdFrame(Self.textLike(9 * 4096)), 8 * 4096, "declaring 36864 bytes in a batch of 32768"),
            ("declares less than the batch", Self.zstdFrame(Self.textLike(7 * 4096)), 8 * 4096, "declaring 28672 bytes in a batch of 32768"),
            ("not zstd", Self.textLike(4096), 8 * 4096, "not a zstd frame"),
            ("truncated", Array(honest.prefix(honest.count - 5)), 8 * 4096, "truncated or corrupt zstd frame"),
            ("bytes after the frame", honest + [1, 2, 3], 8 * 4096, "3 bytes after the zstd frame"),
            ("two frames", honest + honest, 8 * 4096, "bytes after the zstd frame"),
            ("empty", [], 8 * 4096, "an empty zstd frame"),
        ]
        for (name, frame, size, expected) in cases {
            // The target with guard bytes after it, which must stay as they are.
            var target = [UInt8](repeating: 0xA5, count: size + 4096)
            let error: MigrationProtocolError? = frame.withUnsafeBytes { source in
                target.withUnsafeMutableBytes { buffer in
                    do throws(MigrationProtocolError) {
                        try decompressor.decompress(source, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size]))
                        return nil
                    } catch { return error }
                }
            }
            XCTAssertTrue(error?.description.contains(expected) == true, "\(name): \(error.map { "\($0)" } ?? "accepted")")
            XCTAssertTrue(target[size...].allSatisfy { $0 == 0xA5 }, "\(name): wrote past the batch's buffer")
        }
        // A frame whose header lies about its size is caught before decompression; one whose
        // body holds more than it declares is caught by zstd's bounded output.
        var forged = Self.zstdFrame(Self.textLike(9 * 4096))
        // Frame header descriptor (byte 4): content size field of 2 bytes (value - 256) for
        // frames up to 64 KiB + 255; rewrite it to claim 8 pages.
        if forged[4] & 0xC0 == 0x40 {
            let claim = 8 * 4096 - 256
            let at = forged[4] & 0x20 != 0 ? 5 : 6
            forged[at] = UInt8(claim & 0xFF); forged[at + 1] = UInt8(claim >> 8)
            var target = [UInt8](repeating: 0xA5, count: 8 * 4096 + 4096)
            let error: MigrationProtocolError? = forged.withUnsafeBytes { source in
                target.withUnsafeMutableBytes { buffer in
                    do throws(MigrationProtocolError) {
                        try decompressor.decompress(source, into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<8 * 4096]))
                        return nil
                    } catch { return error }
                }
            }
            XCTAssertNotNil(error, "a frame holding 9 pages that declares 8 is refused")
            print("CompressionTests: a frame declaring 8 pages and holding 9: \(error.map { "\($0)" } ?? "accepted")")
            XCTAssertTrue(target[(8 * 4096)...].allSatisfy { $0 == 0xA5 }, "wrote past the batch's buffer")
        }
    }

    // MARK: Frames through the receiver

    private static let pageCount: UInt64 = 1024

    /// A compressedPages frame: a table of `ranges`, then `frame`.
    static func compressedBatch(_ ranges: [PageRange], frame: [UInt8]) -> [UInt8] {
        let table = PageBatchTable(ranges: ranges)
        return MigrationWire.frame(.compressedPages, table.encode() + frame)
    }

    func testACompressedBatchLandsItsPagesAndALyingOneIsRefused() throws {
        let memory = try GuestMemory(size: Self.pageCount * 4096)
        let ranges = [PageRange(firstPage: 10, count: 3, kind: .data), PageRange(firstPage: 13, count: 2, kind: .zero),
                      PageRange(firstPage: 100, count: 5, kind: .data)]
        let data = Self.textLike(8 * 4096, seed: 7)
        let stream = Self.compressedBatch(ranges, frame: Self.zstdFrame(data))
        let receiver = try PageReceiver(memory: memory, verifying: true, codec: .zstd)
        let channel = MigrationChannel(transport: MemoryTransport(input: stream))
        let (type, length) = try channel.receiveHeader()
        XCTAssertEqual(type, .compressedPages)
        try receiver.receiveCompressed(from: channel, payloadLength: length)
        try receiver.settle()
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: memory.base + 10 * 4096, count: 3 * 4096)), Array(data[0..<3 * 4096]))
        XCTAssertEqual(Array(UnsafeRawBufferPointer(start: memory.base + 100 * 4096, count: 5 * 4096)), Array(data[(3 * 4096)...]))
        XCTAssertEqual(receiver.pagesReceived, 10)

        func refusal(_ stream: [UInt8], codec: PageCodec = .zstd) throws -> String {
            let receiver = try PageReceiver(memory: memory, verifying: false, codec: codec)
            let channel = MigrationChannel(transport: MemoryTransport(input: stream))
            let (_, length) = try channel.receiveHeader()
            do { try receiver.receiveCompressed(from: channel, payloadLength: length) } catch { return error.description }
            return "accepted"
        }
        // Announced no compression.
        XCTAssertTrue(try refusal(stream, codec: .none).contains("a compressed page batch from a source that announced no compression"))
        // The table announces 8 pages, the frame holds 7.
        XCTAssertTrue(try refusal(Self.compressedBatch(ranges, frame: Self.zstdFrame(Array(data.prefix(7 * 4096)))))
            .contains("declaring 28672 bytes in a batch of 32768"))
        // "Compressed" bytes as many as the pages: sent as they are would have been smaller.
        XCTAssertTrue(try refusal(Self.compressedBatch(ranges, frame: data)).contains("a compressed page batch of 32768 bytes for 32768 data bytes"))
        // More than the receiver decompresses into at most.
        let huge = [PageRange(firstPage: 0, count: UInt32(Self.pageCount), kind: .data), PageRange(firstPage: 0, count: UInt32(Self.pageCount), kind: .data),
                    PageRange(firstPage: 0, count: UInt32(Self.pageCount), kind: .data)]
        XCTAssertTrue(try refusal(Self.compressedBatch(huge, frame: [1, 2, 3])).contains("announcing 12582912 data bytes (1 to 8388608)"))
        // Only zero pages: nothing to decompress.
        XCTAssertTrue(try refusal(Self.compressedBatch([PageRange(firstPage: 0, count: 4, kind: .zero)], frame: [1]))
            .contains("announcing 0 data bytes"))
    }

    func testTheSenderCompressesTextSendsRandomAsItIsAndTheReceiverGetsBoth() throws {
        // A batch of text pages, 256 zero pages, two batches of random pages.
        let pageCount = 2048
        let memory = try GuestMemory(size: UInt64(pageCount) * 4096)
        let text = Self.textLike(512 * 4096, seed: 3), random = Self.randomBytes(1024 * 4096, seed: 4)
        text.withUnsafeBytes { memory.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        random.withUnsafeBytes { (memory.base + 768 * 4096).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let transport = CapturingTransport()
        var sender = PageSender(channel: MigrationChannel(transport: transport), memory: memory,
                                limiter: BandwidthLimiter(bytesPerSecond: nil))
        sender.compressor = PageBatchCompressor(mode: .zstd)
        var pages = DirtyPageBitmap(pageCount: pageCount)
        pages.set(0..<1792)
        let tally = try sender.send(pages)
        let compression = sender.compressor!.tally
        print("CompressionTests: \(compression.pageBytes) page bytes in \(compression.pageWireBytes) on the wire (ratio \(String(format: "%.2f", compression.ratio))), \(compression.compressedBatches) of \(compression.batches) batches compressed")
        XCTAssertEqual(compression.pageBytes, 1536 * 4096)
        XCTAssertEqual(compression.compressedBatches, 1)
        XCTAssertEqual(compression.incompressibleBatches, 2, "the random pages do not shrink: sent as they are")
        XCTAssertLessThan(tally.bytes, UInt64(1024 * 4096 + 512 * 4096 / 2), "the text travels in less than half its size")
        XCTAssertEqual(tally.bytes, UInt64(transport.bytes.count))

        // The receiver gets the same memory.
        let target = try GuestMemory(size: UInt64(pageCount) * 4096)
        let receiver = try PageReceiver(memory: target, verifying: false, codec: .zstd)
        let channel = MigrationChannel(transport: MemoryTransport(input: transport.bytes))
        var frames: [MigrationFrameType] = []
        while frames.count < 10 {
            guard let (type, length) = try? channel.receiveHeader() else { break }
            frames.append(type)
            XCTAssertTrue(try IncomingMigration.receivePassFrame(type, length: length, into: receiver, channel: channel))
        }
        try receiver.settle()
        XCTAssertTrue(frames.contains(.compressedPages) && frames.contains(.pages), "\(frames)")
        XCTAssertEqual(memcmp(memory.base, target.base, 1792 * 4096), 0)
    }

    /// A checkpoint's pages compressed by the primary, staged by the standby, same digest.
    func testCompressedCheckpointsRoundTripThroughTheStaging() throws {
        let memory = try GuestMemory(size: Self.pageCount * 4096)
        Self.textLike(600 * 4096, seed: 9).withUnsafeBytes { memory.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let staged = StagedCheckpoint(preparedPages: 1024)
        staged.begin()
        staged.setEpoch(3)
        staged.stage((0..<600).map { UInt32($0) }, from: memory, paused: true)
        staged.setState([1, 2, 3])
        let transport = CapturingTransport()
        let compressor = try XCTUnwrap(PageBatchCompressor(mode: .zstd))
        let sent = try XCTUnwrap(try staged.send(over: MigrationChannel(transport: transport), compressor: compressor))
        XCTAssertEqual(compressor.tally.compressedBatches, 2, "600 pages: frames of 512 and 88, both compressed")
        XCTAssertLessThan(sent, UInt64(600 * 4096 / 2))

        let standby = try GuestMemory(size: Self.pageCount * 4096)
        let staging = CheckpointStaging(memory: standby, decompressor: PageBatchDecompressor())
        let channel = MigrationChannel(transport: MemoryTransport(input: transport.bytes))
        while true {
            let (type, length) = try channel.receiveHeader()
            if type == .checkpointCompressedPages { try staging.receiveCompressedPages(from: channel, payloadLength: length); continue }
            XCTAssertEqual(type, .checkpointEnd)
            let end = try CheckpointEnd(decoding: try channel.receivePayload(length))
            XCTAssertEqual(try staging.apply(end), [1, 2, 3])
            break
        }
        XCTAssertEqual(memcmp(memory.base, standby.base, 600 * 4096), 0)

        // Without the codec announced, such a frame is refused.
        let plain = CheckpointStaging(memory: standby)
        let again = MigrationChannel(transport: MemoryTransport(input: transport.bytes))
        let (_, length) = try again.receiveHeader()
        XCTAssertThrowsError(try plain.receiveCompressedPages(from: again, payloadLength: length)) {
            XCTAssertTrue("\($0)".contains("a compressed checkpoint from a primary that announced no compression"))
        }
        XCTAssertThrowsError(try CheckpointPagesHeader(epoch: 1, count: 2).checkedCompressed(payloadLength: 12 + 8 + 8192)) {
            XCTAssertEqual("\($0)", "malformed migration stream: a compressed checkpoint pages frame announcing 2 pages in 8212 bytes")
        }
    }

    // MARK: The hello

    func testTheHelloCarriesTheCodecAndAnUnknownOneIsRefusedBeforeAnythingIsBuilt() throws {
        var hello = MigrationHello(name: "z", memorySize: 64 << 20, vcpuCount: 1, tracking: .bitmap, ringEntries: 4096,
                                   tscKHz: 2_000_000, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: [])
        hello.pageCodecCode = PageCodec.zstd.rawValue
        XCTAssertEqual(try MigrationHello(decoding: hello.encode()).pageCodec, .zstd)
        XCTAssertLessThanOrEqual(hello.encode().count, MigrationFrameType.hello.maxPayload)
        hello.pageCodecCode = 7
        let transport = MemoryTransport(input: MigrationWire.frame(.hello, hello.encode()))
        var built = false
        XCTAssertThrowsError(try MigrationReceiver.receive(over: transport) { _ throws(MigrationError) -> FuzzTests.MemoryOnlyVM in
            built = true
            throw .machine("not reached")
        }) { error in
            XCTAssertEqual("\(error)", "the destination refused the migration: " + PageCodec.unknown(7))
        }
        XCTAssertFalse(built, "nothing is built for a codec the receiver does not know")
        let output = transport.output
        let length = Int(output[4]) | Int(output[5]) << 8 | Int(output[6]) << 16 | Int(output[7]) << 24
        let reply = try MigrationHelloReply(decoding: Array(output[8..<8 + length]))
        XCTAssertFalse(reply.accepted)
        XCTAssertTrue(reply.reason.contains("codec 7, which this dirtymig does not know"))
    }

    // MARK: auto

    func testAutoCompressesOnASlowLinkAndNotOnAFastOneAndSamplesWithinItsShare() {
        // This host compresses at 250 MB/s (zstd -1 on text here) with a ratio of 3, on its own
        // thread: a compressed batch takes the longer of compressing it and sending it.
        func run(linkBytesPerSecond: Double, ratio: Double, batches: Int) -> (compressed: Int, sampleSeconds: Double, seconds: Double) {
            var chooser = CompressionChooser()
            var now: UInt64 = 1
            var compressed = 0
            var sampleSeconds = 0.0
            let batch = 2 << 20
            for _ in 0..<batches {
                switch chooser.plan(now: now) {
                case .compressed:
                    let compressNs = UInt64(Double(batch) / 250e6 * 1e9)
                    let wire = ratio > 1 ? Int(Double(batch) / ratio) : nil
                    let sendNs = UInt64(Double(wire ?? batch) / linkBytesPerSecond * 1e9)
                    chooser.compressed(pageBytes: batch, compressedBytes: wire, nanoseconds: compressNs, now: now + compressNs)
                    chooser.sent(wireBytes: wire ?? batch, nanoseconds: sendNs)
                    now += max(compressNs, sendNs)
                    if wire != nil { compressed += 1 }
                case .plainWithSample, .plain:
                    let sample = chooser.plan(now: now) == .plainWithSample
                    let sendNs = UInt64(Double(batch) / linkBytesPerSecond * 1e9)
                    if sample {   // on the worker, while the batch goes out plain
                        let sampleBytes = CompressionChooser.sampleBytes
                        let compressNs = UInt64(Double(sampleBytes) / 250e6 * 1e9)
                        chooser.compressed(pageBytes: sampleBytes, compressedBytes: ratio > 1 ? Int(Double(sampleBytes) / ratio) : nil,
                                           nanoseconds: compressNs, now: now + compressNs)
                        sampleSeconds += Double(compressNs) / 1e9
                    }
                    chooser.sent(wireBytes: batch, nanoseconds: sendNs)
                    now += sendNs
                }
            }
            return (compressed, sampleSeconds, Double(now) / 1e9)
        }
        let slow = run(linkBytesPerSecond: 12.5e6, ratio: 3, batches: 200)        // 100 Mbit
        let gigabit = run(linkBytesPerSecond: 125e6, ratio: 3, batches: 200)
        let fast = run(linkBytesPerSecond: 1.25e9, ratio: 3, batches: 2000)       // 10 Gbit
        let random = run(linkBytesPerSecond: 12.5e6, ratio: 1, batches: 200)      // nothing compresses
        print("CompressionTests: auto compressed \(slow.compressed)/200 at 100 Mbit, \(gigabit.compressed)/200 at 1 Gbit, \(fast.compressed)/2000 at 10 Gbit (samples \(String(format: "%.2f", fast.sampleSeconds / fast.seconds * 100)) % of the time), \(random.compressed)/200 of random pages")
        XCTAssertGreaterThanOrEqual(slow.compressed, 198, "the first batch measures; every other is compressed")
        XCTAssertGreaterThanOrEqual(gigabit.compressed, 195)
        XCTAssertEqual(fast.compressed, 0, "at 10 Gbit the link outruns zstd here: never compressed, not even the first batch")
        XCTAssertLessThanOrEqual(fast.sampleSeconds / fast.seconds, CompressionChooser.probeShare * 1.5, "samples stay within their share of the time")
        XCTAssertLessThanOrEqual(random.sampleSeconds / random.seconds, CompressionChooser.probeShare * 1.5)
        XCTAssertEqual(random.compressed, 0)
        // Just below the crossover (the link 95 % of zstd's rate) the margin keeps it plain.
        XCTAssertEqual(run(linkBytesPerSecond: 250e6 * 0.95, ratio: 3, batches: 200).compressed, 0)
        XCTAssertGreaterThanOrEqual(run(linkBytesPerSecond: 250e6 * 0.8, ratio: 3, batches: 200).compressed, 195)
    }

    /// A batch the sender had to wait for went into a socket buffer the link had drained: its
    /// send does not measure the link. Batches it did not wait for (and plain ones) do.
    func testOnlySendsTheLinkPacedMeasureIt() throws {
        let memory = try GuestMemory(size: 1024 * 4096)
        let text = Self.textLike(1024 * 4096, seed: 6)
        text.withUnsafeBytes { memory.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        let table = PageBatchTable(ranges: [PageRange(firstPage: 0, count: 512, kind: .data)])
        // A clock that moves 1 ms at every reading: every collect looks like a wait.
        final class SteppingClock: Sendable {
            let reading = Mutex<UInt64>(0)
            func next() -> UInt64 { reading.withLock { $0 += 1_000_000; return $0 } }
        }
        let slowClock = SteppingClock()
        let waited = try XCTUnwrap(PageBatchCompressor(mode: .zstd, now: { slowClock.next() }))
        let compressed = try XCTUnwrap(waited.submit(table, dataBytes: 512 * 4096, from: memory))
        XCTAssertNotNil(waited.collect(compressed))
        waited.sent(pageBytes: 512 * 4096, pageWireBytes: 100_000, compressed: true, frameBytes: 100_100, sendNanoseconds: 1000)
        XCTAssertNil(waited.chooser.linkBytesPerSecond, "a send the sender waited for says nothing of the link")
        // A plain batch (auto, nothing to wait for) measures it.
        waited.sent(pageBytes: 512 * 4096, pageWireBytes: 512 * 4096, compressed: false, frameBytes: 512 * 4096 + 100, sendNanoseconds: 1_000_000)
        XCTAssertNotNil(waited.chooser.linkBytesPerSecond)
        // A clock that stands still: the compression was done before the sender asked.
        let ready = try XCTUnwrap(PageBatchCompressor(mode: .zstd, now: { 1 }))
        let done = try XCTUnwrap(ready.submit(table, dataBytes: 512 * 4096, from: memory))
        XCTAssertNotNil(ready.collect(done))
        ready.sent(pageBytes: 512 * 4096, pageWireBytes: 100_000, compressed: true, frameBytes: 100_100, sendNanoseconds: 1000)
        XCTAssertNotNil(ready.chooser.linkBytesPerSecond)
    }

    /// The sender compresses the next batch while this one is on the wire: on a slow transport,
    /// the whole send takes about the wire time, not wire time plus compressing.
    func testTheSenderCompressesTheNextBatchWhileThisOneIsOnTheWire() throws {
        let pageCount = 8192   // 32 MiB of text: 16 batches
        let memory = try GuestMemory(size: UInt64(pageCount) * 4096)
        let text = Self.textLike(pageCount * 4096, seed: 5)
        text.withUnsafeBytes { memory.base.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        var pages = DirtyPageBitmap(pageCount: pageCount)
        pages.set(0..<pageCount)
        // Measure this host's compression time of the whole, on one thread.
        guard let zstd = ZstdCompressor() else { return XCTFail("no zstd context") }
        let output = UnsafeMutableRawPointer.allocate(byteCount: PageSender.batchDataBytes, alignment: 4096)
        defer { output.deallocate() }
        let compressStart = MonotonicClock.nanoseconds()
        for batch in 0..<pageCount / 512 {
            _ = zstd.compress(UnsafeRawBufferPointer(start: memory.base + batch * 512 * 4096, count: 512 * 4096),
                              into: UnsafeMutableRawBufferPointer(start: output, count: PageSender.batchDataBytes))
        }
        let compressSeconds = Double(MonotonicClock.nanoseconds() - compressStart) / 1e9
        // A transport that takes as long per wire byte as compressing takes per page byte, times
        // the ratio: each compressed batch's wire time equals its compression time.
        let ratio = 3.0
        let transport = SlowTransport(secondsPerByte: compressSeconds / Double(pageCount * 4096) * ratio)
        var sender = PageSender(channel: MigrationChannel(transport: transport), memory: memory,
                                limiter: BandwidthLimiter(bytesPerSecond: nil))
        sender.compressor = PageBatchCompressor(mode: .zstd)
        let started = MonotonicClock.nanoseconds()
        _ = try sender.send(pages)
        let seconds = Double(MonotonicClock.nanoseconds() - started) / 1e9
        let wireSeconds = transport.sleptSeconds
        print("CompressionTests: compressing alone \(String(format: "%.3f", compressSeconds)) s, the wire alone \(String(format: "%.3f", wireSeconds)) s, the send \(String(format: "%.3f", seconds)) s")
        // In sequence it would take their sum; overlapped, near the longer of the two.
        XCTAssertLessThan(seconds, (compressSeconds + wireSeconds) * 0.85, "compression overlaps the wire")
    }

    // MARK: Real migrations

    private func migrate(content: PageContent, compression: PageCompression) throws -> MigrationReport {
        let kvm = try requireKVM()
        var writer = writer(64 * MiB, rate: 0, pattern: .sequential)
        writer.content = content
        writer.passes = 1   // fills its working set once, then idles: a fixed amount to move
        let source = try Machine(MachineConfiguration(memorySize: 256 * MiB, vcpuCount: 1, workloads: [writer], tracking: .ring), kvm: kvm)
        try source.start()
        defer { source.stop() }
        source.waitForGuest()
        let deadline = Date().addingTimeInterval(20)
        while source.guestStats().vcpus[0].passes < 1 && Date() < deadline { Thread.sleep(forTimeInterval: 0.05) }
        let arrival = try Arrival(kvm)
        var options = MigrationOptions(destination: arrival.endpoint)
        options.verify = true
        options.compression = compression
        let report = MigrationSender(machine: source, options: options).run()
        if report.completed { source.stop() }
        let outcome = arrival.wait()
        XCTAssertTrue(report.completed, "migration failed: \(report.error ?? "?")")
        XCTAssertEqual(report.verify, "passed")
        if let destination = try? outcome.get() { destination.stop() }
        let tally = report.compression.tally
        print("CompressionTests: \(content.name) with --compress \(compression): \(tally.pageBytes) page bytes, \(tally.pageWireBytes) on the wire, ratio \(String(format: "%.2f", tally.ratio)), \(tally.compressedBatches)/\(tally.batches) batches compressed, \(report.transferredBytes) bytes transferred")
        XCTAssertEqual(report.json["compression"]?["mode"]?.stringValue, compression.rawValue)
        return report
    }

    func testZstdOnTextLikeMemoryVerifiesAndPutsFewerBytesOnTheWire() throws {
        let report = try migrate(content: .text, compression: .zstd)
        let tally = report.compression.tally
        XCTAssertGreaterThan(tally.pageBytes, 60 * MiB, "the written working set travels")
        XCTAssertGreaterThan(tally.ratio, 2, "text-like pages: fewer than half the bytes on the wire")
        XCTAssertLessThan(report.transferredBytes, tally.pageBytes / 2)
    }

    func testZstdOnRandomMemorySendsItAsItIs() throws {
        let report = try migrate(content: .random, compression: .zstd)
        let tally = report.compression.tally
        XCTAssertGreaterThan(tally.pageBytes, 60 * MiB)
        XCTAssertEqual(tally.compressedBatches, 0, "random pages never shrink by 1/16")
        XCTAssertEqual(tally.pageWireBytes, tally.pageBytes)
    }

    /// On loopback the link is faster than zstd compresses here: auto sends most batches plain.
    func testAutoOnLoopbackLeavesMostBatchesPlain() throws {
        let report = try migrate(content: .text, compression: .auto)
        let tally = report.compression.tally
        XCTAssertGreaterThan(tally.batches, 20)
        XCTAssertLessThan(Double(tally.compressedBatches), Double(tally.batches) * 0.5,
                          "\(tally.compressedBatches) of \(tally.batches) batches compressed on loopback")
    }
}

/// Keeps every byte sent (a sender's whole output, for a receiver to read back).
final class CapturingTransport: MigrationTransport, @unchecked Sendable {
    // @unchecked: one test thread.
    private(set) var bytes: [UInt8] = []
    func send(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError) { for buffer in buffers { bytes += buffer } }
    func receive(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        throw SystemError("receive", errno: ECONNRESET)
    }
    func setReceiveDeadline(_ deadline: UInt64?) {}
    func shutdown() {}
}

/// Takes `secondsPerByte` per byte sent (sleeping, as a slow link's sender waits), keeps nothing.
final class SlowTransport: MigrationTransport, @unchecked Sendable {
    // @unchecked: one test thread.
    let secondsPerByte: Double
    private(set) var sleptSeconds = 0.0
    init(secondsPerByte: Double) { self.secondsPerByte = secondsPerByte }
    func send(_ buffers: [UnsafeRawBufferPointer]) throws(SystemError) {
        let seconds = Double(buffers.reduce(0) { $0 + $1.count }) * secondsPerByte
        sleptSeconds += seconds
        Thread.sleep(forTimeInterval: seconds)
    }
    func receive(into destination: UnsafeMutableRawPointer, count: Int) throws(SystemError) {
        throw SystemError("receive", errno: ECONNRESET)
    }
    func setReceiveDeadline(_ deadline: UInt64?) {}
    func shutdown() {}
}

/// The guest fills written pages itself (content=text, random): what lands in memory.
final class PageContentTests: XCTestCase {
    private func filledPage(_ content: PageContent) throws -> [UInt8] {
        let kvm = try requireKVM()
        var workload = writer(1 * MiB, rate: 0)
        workload.content = content
        workload.passes = 1
        let machine = try Machine(MachineConfiguration(memorySize: 64 * MiB, vcpuCount: 1, workloads: [workload], tracking: nil), kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        let deadline = Date().addingTimeInterval(10)
        while machine.guestStats().vcpus[0].passes < 1 && Date() < deadline { Thread.sleep(forTimeInterval: 0.02) }
        XCTAssertEqual(machine.guestStats().vcpus[0].passes, 1)
        // Page 100 of the working set (the workload area starts at 16 MiB).
        return Array(UnsafeRawBufferPointer(start: machine.memory.base + Int(GuestLayout.workloadBase) + 100 * 4096, count: 4096))
    }

    func testTextPagesHoldWordsAndCompress() throws {
        let page = try filledPage(.text)
        let text = page.dropFirst(8)   // the first word is the touch counter, as with sparse
        XCTAssertTrue(text.allSatisfy { $0 == 0x20 || $0 == 0x2E || (0x61...0x7A).contains($0) }, "lower-case words, spaces, full stops")
        XCTAssertGreaterThan(text.filter { $0 == 0x20 }.count, 400, "words, not one long run")
        let ratio = Double(page.count) / Double(CompressionTests.zstdFrame(page).count)
        XCTAssertGreaterThan(ratio, 2, "a text page compresses (ratio \(ratio))")
    }

    func testRandomPagesDoNotCompressAndSparsePagesAreMostlyZero() throws {
        let random = try filledPage(.random)
        XCTAssertGreaterThan(Set(random).count, 200, "every byte value, about")
        XCTAssertGreaterThan(CompressionTests.zstdFrame(random).count, 4000)
        let sparse = try filledPage(.sparse)
        XCTAssertEqual(sparse.dropFirst(8).filter { $0 != 0 }.count, 0, "one word written, the rest zero")
        XCTAssertNotEqual(sparse.prefix(8).filter { $0 != 0 }.count, 0)
    }
}
