@testable import DirtyMigCore
import Foundation
import XCTest

/// Every frame codec of the migration wire protocol: what one end encodes, the other decodes to
/// the same value; every malformed variant is refused with the error the receiver has always
/// given (the decoders are the receiver's own: the same variants fed to PageReceiver and
/// CheckpointStaging give the same errors).
final class FrameCodecTests: XCTestCase {
    private static let pageCount: UInt64 = 1024   // a 4 MiB RAM

    private static func u32(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, Array.init) }
    private static func u64(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value.littleEndian, Array.init) }

    private func refusal<T>(_ body: () throws(MigrationProtocolError) -> T) -> MigrationProtocolError? {
        do { _ = try body(); return nil } catch { return error }
    }

    // MARK: Frame header

    func testFrameHeaderRoundTripAndRefusals() {
        for raw in UInt32(1)...17 {
            let type = MigrationFrameType(rawValue: raw)!
            for length in [0, 1, type.maxPayload] {
                let header = MigrationFrameHeader(type, payloadLength: length)
                XCTAssertEqual(header.encode().count, MigrationWire.frameHeaderSize)
                XCTAssertEqual(try MigrationFrameHeader(decoding: header.encode()), header)
            }
        }
        XCTAssertEqual(MigrationWire.frame(.abort, [1, 2]), MigrationFrameHeader(.abort, payloadLength: 2).encode() + [1, 2])
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try MigrationFrameHeader(decoding: Self.u32(99) + Self.u32(0)) },
                       .notDirtymig("frame type 0x63"))
        let most = MigrationFrameType.iterationEnd.maxPayload
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in
            try MigrationFrameHeader(decoding: Self.u32(4) + Self.u32(UInt64(most + 1)))
        }, .malformed("a iterationEnd frame of \(most + 1) bytes (at most \(most))"))
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try MigrationFrameHeader(decoding: Self.u32(4)) },
                       .malformed("frame header is truncated (needs 4 more bytes at offset 4, has 0)"))
    }

    // MARK: Page batch

    private let sampleTable = PageBatchTable(ranges: [
        PageRange(firstPage: 0, count: 3, kind: .data), PageRange(firstPage: 3, count: 100, kind: .zero),
        PageRange(firstPage: 1023, count: 1, kind: .data),
    ])

    func testPageBatchTableRoundTrip() throws {
        let table = sampleTable
        XCTAssertEqual(table.encodedSize, 4 + 16 * 3)
        XCTAssertEqual(table.dataBytes, 4 * 4096)
        let payloadLength = table.encodedSize + table.dataBytes
        XCTAssertEqual(try PageBatchTable(decoding: table.encode(), payloadLength: payloadLength, pageCount: Self.pageCount), table)
        // Into a caller's buffer, after what it holds (the frame header), and again after a reset.
        var writer = WireWriter()
        MigrationFrameHeader(.pages, payloadLength: payloadLength).encode(into: &writer)
        table.encode(into: &writer)
        XCTAssertEqual(writer.bytes, MigrationFrameHeader(.pages, payloadLength: payloadLength).encode() + table.encode())
        writer.removeAll()
        table.encode(into: &writer)
        XCTAssertEqual(writer.bytes, table.encode())
        // The steps the receiver takes, one read each.
        let bytes = table.encode()
        try PageBatchTable.checkFrame(payloadLength: payloadLength)
        let count = try PageBatchTable.rangeCount(decoding: Array(bytes.prefix(4)), payloadLength: payloadLength)
        XCTAssertEqual(count, 3)
        XCTAssertEqual(try PageBatchTable(decoding: Array(bytes.dropFirst(4)), count: count, payloadLength: payloadLength,
                                          pageCount: Self.pageCount), table)
        let empty = PageBatchTable()
        XCTAssertEqual(try PageBatchTable(decoding: empty.encode(), payloadLength: 4, pageCount: Self.pageCount), empty)
    }

    /// A table of one range, as raw fields.
    private func oneRange(first: UInt64, count: UInt64, kind: UInt64) -> [UInt8] {
        Self.u32(1) + Self.u64(first) + Self.u32(count) + Self.u32(kind)
    }

    /// The malformed tables and the error each has always been refused with.
    private var malformedTables: [(bytes: [UInt8], payloadLength: Int, error: MigrationProtocolError)] {
        let pages = Self.pageCount
        return [
            ([0, 0, 0], 3, .malformed("a pages frame of 3 bytes")),
            (Self.u32(4097), 4 + 16 * 4097, .malformed("a page batch of 4097 ranges in \(4 + 16 * 4097) bytes")),
            (Self.u32(UInt64(UInt32.max)), 64, .malformed("a page batch of \(UInt32.max) ranges in 64 bytes")),
            (Self.u32(2) + Self.u64(0) + Self.u32(1) + Self.u32(1), 20, .malformed("a page batch of 2 ranges in 20 bytes")),
            (oneRange(first: 0, count: 1, kind: 2), 20, .malformed("page range kind 2")),
            (oneRange(first: 0, count: 0, kind: 1), 20, .malformed("0 pages from page 0 lie outside RAM (\(pages) pages)")),
            (oneRange(first: pages, count: 1, kind: 1), 20, .malformed("1 pages from page \(pages) lie outside RAM (\(pages) pages)")),
            (oneRange(first: pages - 1, count: 2, kind: 1), 20,
             .malformed("2 pages from page \(pages - 1) lie outside RAM (\(pages) pages)")),
            (oneRange(first: .max, count: 1, kind: 0), 20 + 4096,
             .malformed("1 pages from page \(UInt64.max) lie outside RAM (\(pages) pages)")),
            (oneRange(first: 1, count: UInt64(UInt32.max), kind: 0), 20,
             .malformed("\(UInt32.max) pages from page 1 lie outside RAM (\(pages) pages)")),
            (oneRange(first: 0, count: 2, kind: 0), 20 + 4096, .malformed("a page batch announcing 8192 data bytes in a 4116-byte frame")),
            (oneRange(first: 0, count: 2, kind: 1), 21, .malformed("a page batch announcing 0 data bytes in a 21-byte frame")),
            (Self.u32(1) + Self.u64(0), 20 + 4096,
             .malformed("page range table is truncated (needs 4 more bytes at offset 8, has 0)")),
        ]
    }

    func testMalformedPageBatchesAreRefusedAsBefore() throws {
        for (index, variant) in malformedTables.enumerated() {
            XCTAssertEqual(refusal { () throws(MigrationProtocolError) in
                try PageBatchTable(decoding: variant.bytes, payloadLength: variant.payloadLength, pageCount: Self.pageCount)
            }, variant.error, "variant \(index)")
        }
    }

    /// The same variants through the receiver itself (the frame header already read): the same
    /// errors, before any page byte is read. (The truncated table is the stream's end there.)
    func testThePageReceiverRefusesTheSameVariants() throws {
        let memory = try GuestMemory(size: Self.pageCount * 4096)
        for (index, variant) in malformedTables.enumerated() where index != malformedTables.count - 1 {
            let transport = MemoryTransport(input: variant.bytes + [UInt8](repeating: 0, count: 8192))
            let receiver = try PageReceiver(memory: memory, verifying: false)
            do {
                try receiver.receive(from: MigrationChannel(transport: transport), payloadLength: variant.payloadLength)
                XCTFail("variant \(index) was accepted")
            } catch {
                XCTAssertEqual(error.description, MigrationError.protocolError(variant.error).description, "variant \(index)")
            }
            XCTAssertLessThanOrEqual(transport.largestReceive, 16 * 2, "variant \(index) read page bytes")
        }
    }

    // MARK: Pass plan

    func testPassPlanRoundTripAndRefusals() throws {
        let words: [UInt64] = (0..<16).map { $0 &* 0x9E37_79B9_7F4A_7C15 }
        let plan = PassPlan(pass: 1, words: words)
        XCTAssertEqual(plan.encode().count, PassPlan.payloadLength(pageCount: 1024))
        XCTAssertEqual(try PassPlan(decoding: plan.encode(), pageCount: 1024), plan)
        XCTAssertEqual(try PassPlan(decoding: PassPlan(pass: 7, words: [0, 1]).encode(), pageCount: 65), PassPlan(pass: 7, words: [0, 1]))
        XCTAssertEqual(PassPlan.payloadLength(pageCount: 1025), 4 + 8 * 17)
        for wrong in [0, 3, 4, plan.encode().count - 1, plan.encode().count + 8] {
            let bytes = Array((plan.encode() + [UInt8](repeating: 0, count: 8)).prefix(wrong))
            XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try PassPlan(decoding: bytes, pageCount: 1024) },
                           .malformed("a pass plan of \(wrong) bytes for 1024 pages of RAM"))
            XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try PassPlan.checkFrame(payloadLength: wrong, pageCount: 1024) },
                           .malformed("a pass plan of \(wrong) bytes for 1024 pages of RAM"))
        }
        // Through the receiver: refused from the length alone, before the payload is read.
        let memory = try GuestMemory(size: 1024 * 4096)
        let transport = MemoryTransport(input: [])
        XCTAssertThrowsError(try PageReceiver(memory: memory, verifying: false)
            .receivePlan(from: MigrationChannel(transport: transport), payloadLength: 12)) {
            XCTAssertEqual("\($0)", MigrationError.protocolError(.malformed("a pass plan of 12 bytes for 1024 pages of RAM")).description)
        }
        XCTAssertEqual(transport.largestReceive, 0)
    }

    // MARK: Checkpoint pages

    func testCheckpointPagesRoundTrip() throws {
        let header = CheckpointPagesHeader(epoch: 0x0102_0304_0506_0708, count: 3)
        XCTAssertEqual(header.encode().count, CheckpointPagesHeader.size)
        XCTAssertEqual(try CheckpointPagesHeader(decoding: header.encode()), header)
        XCTAssertEqual(try header.checkedCount(payloadLength: CheckpointPagesHeader.payloadLength(pages: 3)), 3)
        var writer = WireWriter()
        writer.u8(9)
        header.encode(into: &writer)
        XCTAssertEqual(writer.bytes, [9] + header.encode())

        let pages: [UInt32] = [0, 1023, 7, 0x0102_0304 % 1024]
        let encoded = CheckpointPageList.encode(pages)
        XCTAssertEqual(encoded, pages.flatMap { Self.u32(UInt64($0)) })
        XCTAssertEqual(CheckpointPageList.withEncoded(pages, 1..<3) { Array($0) }, Self.u32(1023) + Self.u32(7))
        var decoded: [UInt32] = [5]
        try CheckpointPageList.decode(encoded, count: pages.count, pageCount: 1024, appendingTo: &decoded)
        XCTAssertEqual(decoded, [5] + pages)
    }

    func testMalformedCheckpointPagesAreRefusedAsBefore() throws {
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try CheckpointPagesHeader.checkFrame(payloadLength: 11) },
                       .malformed("a checkpoint pages frame of 11 bytes"))
        for (count, length) in [(0, 12), (513, CheckpointPagesHeader.payloadLength(pages: 513)), (512, 12 + 4 + 4096),
                                (1, CheckpointPagesHeader.payloadLength(pages: 1) + 1), (Int(UInt32.max), 12)] {
            XCTAssertEqual(refusal { () throws(MigrationProtocolError) in
                try CheckpointPagesHeader(epoch: 1, count: UInt32(count)).checkedCount(payloadLength: length)
            }, .malformed("a checkpoint pages frame announcing \(count) pages in \(length) bytes"))
        }
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try CheckpointPagesHeader(decoding: Self.u64(1)) },
                       .malformed("checkpoint pages header is truncated (needs 4 more bytes at offset 8, has 0)"))
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try CheckpointPagesHeader(decoding: Self.u64(1) + Self.u32(1) + [0]) },
                       .malformed("checkpoint pages header has 1 unexpected trailing bytes"))
        var pages: [UInt32] = []
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in
            try CheckpointPageList.decode(Self.u32(3) + Self.u32(1024) + Self.u32(4), count: 3, pageCount: 1024, appendingTo: &pages)
        }, .malformed("checkpoint page 1024 lies outside RAM (1024 pages)"))
        XCTAssertEqual(pages, [3], "the pages before the one outside RAM are appended, as before")
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in
            try CheckpointPageList.decode(Self.u32(UInt64(UInt32.max)), count: 1, pageCount: 1024, appendingTo: &pages)
        }, .malformed("checkpoint page \(UInt32.max) lies outside RAM (1024 pages)"))

        // Through the standby's staging area (the frame header already read): the same errors.
        let memory = try GuestMemory(size: 1024 * 4096)
        let variants: [(bytes: [UInt8], length: Int, error: MigrationProtocolError)] = [
            ([], 11, .malformed("a checkpoint pages frame of 11 bytes")),
            (Self.u64(1) + Self.u32(2), 12 + 4 + 4096, .malformed("a checkpoint pages frame announcing 2 pages in 4112 bytes")),
            (Self.u64(1) + Self.u32(1) + Self.u32(1024), 12 + 4 + 4096, .malformed("checkpoint page 1024 lies outside RAM (1024 pages)")),
        ]
        for (index, variant) in variants.enumerated() {
            let transport = MemoryTransport(input: variant.bytes + [UInt8](repeating: 0, count: 4096))
            XCTAssertThrowsError(try CheckpointStaging(memory: memory).receivePages(from: MigrationChannel(transport: transport),
                                                                                    payloadLength: variant.length)) {
                XCTAssertEqual("\($0)", MigrationError.protocolError(variant.error).description, "variant \(index)")
            }
            XCTAssertLessThanOrEqual(transport.largestReceive, CheckpointPagesHeader.size, "variant \(index) read page bytes")
        }
    }

    // MARK: Connection opening (every connection's hello)

    private static func controlHello() -> MigrationHello {
        var hello = MigrationHello(name: "vm", memorySize: 64 << 20, vcpuCount: 1, tracking: .ring, ringEntries: 4096,
                                   tscKHz: 2_000_000, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: [1, 2, 3])
        hello.session = SessionID(high: 0x0123_4567_89AB_CDEF, low: .max)
        hello.joins = SessionJoins(pages: SessionJoins.maxPages, faults: 1)
        hello.verify = true
        return hello
    }

    func testConnectionHellosRoundTrip() throws {
        let hello = Self.controlHello()
        XCTAssertEqual(try ConnectionHello(decoding: hello.encode()), .control(hello))
        XCTAssertEqual(try MigrationHello(decoding: hello.encode()), hello)
        // A replication resuming, and a post-copy resuming; never both, never neither.
        var resuming = hello
        resuming.replicate = true
        resuming.resume = true
        XCTAssertEqual(try MigrationHello(decoding: resuming.encode()), resuming)
        resuming.postcopy = true
        XCTAssertThrowsError(try MigrationHello(decoding: resuming.encode()))
        resuming.replicate = false
        XCTAssertEqual(try MigrationHello(decoding: resuming.encode()), resuming)
        resuming.postcopy = false
        XCTAssertThrowsError(try MigrationHello(decoding: resuming.encode()))
        // The opening: magic, version, role, then the session id, little-endian.
        let encoded = hello.encode()
        XCTAssertEqual(Array(encoded[0..<12]), Self.u32(UInt64(MigrationWire.magic)) + Self.u32(UInt64(MigrationWire.version)) + Self.u32(0))
        XCTAssertEqual(Array(encoded[12..<28]), Self.u64(0x0123_4567_89AB_CDEF) + Self.u64(.max))
        for role in [ConnectionRole.pages, .faults] {
            let join = SessionJoin(session: hello.session, role: role)
            XCTAssertEqual(join.encode(), Self.u32(UInt64(MigrationWire.magic)) + Self.u32(UInt64(MigrationWire.version))
                                          + Self.u32(UInt64(role.rawValue)) + Array(encoded[12..<28]))
            XCTAssertEqual(try ConnectionHello(decoding: join.encode()), .join(join))
        }
        XCTAssertEqual(try ConnectionHello(decoding: MigrationHello(decoding: hello.encode()).encode()), .control(hello))
        XCTAssertEqual(hello.session.description, "0123456789abcdefffffffffffffffff")
        XCTAssertEqual(SessionJoins.none.summary, "no other connection")
        XCTAssertEqual(hello.joins.summary, "16 pages and 1 faults")
        // Fresh ids from the system's random source: 2,000 of them, all different.
        XCTAssertEqual(Set((0..<2000).map { _ in SessionID.random() }).count, 2000)
    }

    func testConnectionHellosThatCannotBeRightAreRefused() {
        let hello = Self.controlHello()
        let join = SessionJoin(session: hello.session, role: .faults)
        func decoding(_ bytes: [UInt8]) -> MigrationProtocolError? {
            refusal { () throws(MigrationProtocolError) in try ConnectionHello(decoding: bytes) }
        }
        var role = join.encode()
        role.replaceSubrange(8..<12, with: Self.u32(3))
        XCTAssertEqual(decoding(role), .malformed("connection role 3"))
        XCTAssertEqual(decoding(join.encode() + [0]), .malformed("hello has 1 unexpected trailing bytes"))
        XCTAssertEqual(decoding(Array(join.encode().prefix(27))),
                       .malformed("hello is truncated (needs 8 more bytes at offset 20, has 7)"))
        var other = join
        other.version = MigrationWire.version + 1
        XCTAssertEqual(decoding(other.encode()), .versionMismatch(peer: MigrationWire.version + 1, ours: MigrationWire.version))
        other.version = 6   // the release before sessions: its hello has no role, and is refused by version first
        XCTAssertEqual(decoding(other.encode()), .versionMismatch(peer: 6, ours: MigrationWire.version))
        XCTAssertEqual(decoding(Array("GET / HTTP/1.1\r\n".utf8)), .notDirtymig("magic 0x20544547"))
        XCTAssertEqual(decoding([1, 2, 3]), .notDirtymig("a 3-byte hello"))
        // A control hello that is only an opening, and one announcing too many joins.
        XCTAssertEqual(decoding(Array(hello.encode().prefix(28))), .malformed("hello is truncated (needs 8 more bytes at offset 28, has 0)"))
        var joins = hello.encode()
        let joinsOffset = 28 + 8 + 4 + 4 + 4 + 8 + 12 + 4 + 4   // after the flags and the link timeout
        XCTAssertEqual(Array(joins[joinsOffset..<joinsOffset + 8]), Self.u32(16) + Self.u32(1))
        joins.replaceSubrange(joinsOffset..<joinsOffset + 4, with: Self.u32(17))
        XCTAssertEqual(decoding(joins), .malformed("a hello announcing 17 pages and 1 faults connections (at most 16 and 1)"))
        joins.replaceSubrange(joinsOffset..<joinsOffset + 8, with: Self.u32(0) + Self.u32(2))
        XCTAssertEqual(decoding(joins), .malformed("a hello announcing 0 pages and 2 faults connections (at most 16 and 1)"))
        // A migration's first hello must be a control hello.
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try MigrationHello(decoding: join.encode()) },
                       .unexpected("the hello of a faults connection joining session \(join.session), where a migration's first hello belongs"))
        // The hello's bound holds the largest control hello.
        var largest = hello
        largest.name = String(repeating: "n", count: MigrationWire.maxStringBytes)
        largest.bootAnnouncement = [UInt8](repeating: 0, count: MigrationHello.maxBootAnnouncementBytes)
        XCTAssertLessThanOrEqual(largest.encode().count, MigrationFrameType.hello.maxPayload)
        XCTAssertNoThrow(try ConnectionHello(decoding: largest.encode()))
        // The boot source: one this dirtymig knows, with an announcement of bounded size.
        var unknown = hello.encode()
        let kindOffset = unknown.count - 4 - hello.bootAnnouncement.count - 4
        XCTAssertEqual(Array(unknown[kindOffset..<kindOffset + 4]), Self.u32(UInt64(BootSourceKind.workloadGuest.rawValue)))
        unknown.replaceSubrange(kindOffset..<kindOffset + 4, with: Self.u32(7))
        XCTAssertEqual(decoding(unknown), .malformed("boot source 7"))
        var oversized = hello.encode()
        oversized.replaceSubrange(kindOffset + 4..<kindOffset + 8, with: Self.u32(UInt64(MigrationHello.maxBootAnnouncementBytes + 1)))
        XCTAssertEqual(decoding(oversized), .malformed("hello carries \(MigrationHello.maxBootAnnouncementBytes + 1) bytes where at most \(MigrationHello.maxBootAnnouncementBytes) are allowed"))
    }

    // MARK: The small frames

    func testReasonRoundTripAndBounds() throws {
        XCTAssertEqual(try MigrationReason(decoding: MigrationReason("the standby went away").encode()), MigrationReason("the standby went away"))
        XCTAssertEqual(MigrationChannel.abortReason(MigrationReason("why").encode() + [1, 2, 3]), "why", "trailing bytes are ignored, as before")
        XCTAssertEqual(MigrationChannel.abortReason([1, 0]), "no reason given")
        let long = String(repeating: "x", count: MigrationWire.maxStringBytes + 10)
        XCTAssertEqual(MigrationReason(long).encode().count, 4 + MigrationWire.maxStringBytes, "bounded on the wire")
        XCTAssertTrue(try MigrationReason(decoding: MigrationReason(long).encode()).text.hasSuffix("more bytes)"), "and where it enters")
        XCTAssertEqual(refusal { () throws(MigrationProtocolError) in try MigrationReason(decoding: Self.u32(5000) + [UInt8](repeating: 0x41, count: 5000)) },
                       .malformed("abort carries 5000 bytes where at most 4096 are allowed"))
        XCTAssertEqual(MigrationReason("line\u{7}").encode().count, 4 + 5)
    }

    /// The frames that were typed already, round-tripped here too so that every frame is.
    func testEveryOtherFrameRoundTrips() throws {
        var reply = MigrationHelloReply.refuse("no room")
        reply.heartbeatMilliseconds = 200
        XCTAssertEqual(try MigrationHelloReply(decoding: reply.encode()), reply)
        XCTAssertEqual(try MigrationHelloReply(decoding: reply.encode()).heldEpoch, nil)
        // A standby's answer to a replication that resumes: the checkpoint it holds, or why not.
        var held = MigrationHelloReply.accept
        held.heartbeatMilliseconds = 100
        held.heldEpoch = 0
        XCTAssertEqual(try MigrationHelloReply(decoding: held.encode()), held, "epoch 0 is an epoch, not none")
        held.heldEpoch = .max
        XCTAssertEqual(try MigrationHelloReply(decoding: held.encode()), held)
        for refusal in [MigrationHelloReply.HelloRefusal.nothingToResume, .tookOver] {
            let refused = MigrationHelloReply.refuse("why", refusal, epoch: refusal == .tookOver ? 41 : nil)
            XCTAssertEqual(try MigrationHelloReply(decoding: refused.encode()), refused)
        }
        var badKind = held.encode()
        badKind[badKind.count - 10] = 9
        XCTAssertThrowsError(try MigrationHelloReply(decoding: badKind), "an unknown kind of refusal")
        var badFlag = held.encode()
        badFlag[badFlag.count - 9] = 2
        XCTAssertThrowsError(try MigrationHelloReply(decoding: badFlag), "an epoch flag that is neither 0 nor 1")
        // An older receiver's reply (up to the heartbeat) still reads: a refusal of its version.
        let older = Array(MigrationHelloReply.refuse("old").encode().dropLast(10))
        XCTAssertEqual(try MigrationHelloReply(decoding: older).reason, "old")
        XCTAssertLessThanOrEqual(MigrationHelloReply.refuse(String(repeating: "x", count: 5000), .tookOver, epoch: 1).encode().count,
                                 MigrationFrameType.helloReply.maxPayload, "the longest reply fits its frame")
        let end = MigrationPassEnd(pass: 9)
        XCTAssertEqual(try MigrationPassEnd(decoding: end.encode()), end)
        XCTAssertEqual(try MigrationPassEnd(decodingAck: end.encodeAck()), end)
        let completion = MigrationCompletion(verify: true, memoryDigest: 1, stateDigest: .max)
        XCTAssertEqual(try MigrationCompletion(decoding: completion.encode()), completion)
        let result = MigrationResult(status: .verifyFailed, verifyNanoseconds: 3, resumeNanoseconds: 4, message: "m")
        XCTAssertEqual(try MigrationResult(decoding: result.encode()), result)
        let checkpointEnd = CheckpointEnd(epoch: 5, pageCount: 6, resync: true, digest: 7, state: [1, 2])
        XCTAssertEqual(try CheckpointEnd(decoding: checkpointEnd.encode()), checkpointEnd)
        XCTAssertEqual(try EpochFrame(decoding: EpochFrame(epoch: 8).encode(), what: "heartbeat"), EpochFrame(epoch: 8))
    }

    // MARK: Post-copy

    func testPostCopyFramesRoundTripAndRefusals() throws {
        var lacking = DirtyPageBitmap(pageCount: 100)
        lacking.set(3); lacking.set(99)
        let switchFrame = PostCopySwitch(state: [1, 2, 3], lacking: lacking)
        let decoded = try PostCopySwitch(decoding: switchFrame.encode(), pageCount: 100)
        XCTAssertEqual(decoded, switchFrame)
        XCTAssertEqual(decoded.lacking(pageCount: 100).pageList(), [3, 99])
        XCTAssertThrowsError(try PostCopySwitch(decoding: switchFrame.encode(), pageCount: 200), "a bitmap for another RAM size")
        var pastTheEnd = switchFrame
        pastTheEnd.lackingWords[1] |= 1 << 40   // page 104 of a 100-page RAM
        XCTAssertThrowsError(try PostCopySwitch(decoding: pastTheEnd.encode(), pageCount: 100)) {
            XCTAssertTrue("\($0)".contains("past the end of RAM"), "\($0)")
        }

        let prepare = PostCopyPrepare(stale: lacking)
        XCTAssertEqual(try PostCopyPrepare(decoding: prepare.encode(), pageCount: 100).stale(pageCount: 100).pageList(), [3, 99])
        XCTAssertThrowsError(try PostCopyPrepare(decoding: prepare.encode(), pageCount: 64), "a bitmap for another RAM size")
        let prepared = PostCopyPrepared(droppedNanoseconds: 84_000_000)
        XCTAssertEqual(try PostCopyPrepared(decoding: prepared.encode()), prepared)
        XCTAssertThrowsError(try PostCopyPrepared(decoding: prepared.encode() + [0]), "a byte too many")
        let resume = PostCopyResume(lacking: lacking)
        XCTAssertEqual(try PostCopyResume(decoding: resume.encode(), pageCount: 100), resume)
        XCTAssertEqual(try PostCopyResume(decoding: resume.encode(), pageCount: 100).lacking(pageCount: 100).pageList(), [3, 99])
        XCTAssertThrowsError(try PostCopyResume(decoding: resume.encode(), pageCount: 64), "a bitmap for another RAM size")
        XCTAssertThrowsError(try PostCopyResume(decoding: resume.encode() + [0], pageCount: 100), "a byte too many")
        var resumePastTheEnd = resume
        resumePastTheEnd.words[1] |= 1 << 40
        XCTAssertThrowsError(try PostCopyResume(decoding: resumePastTheEnd.encode(), pageCount: 100)) {
            XCTAssertTrue("\($0)".contains("past the end of RAM"), "\($0)")
        }
        let largest = GuestLayout.maxAddressableBytes / GuestLayout.pageSize
        XCTAssertLessThanOrEqual(PostCopyResume(lacking: DirtyPageBitmap(pageCount: Int(largest))).encode().count,
                                 MigrationFrameType.postcopyResume.maxPayload)

        let running = PostCopyRunning(running: true, resumeNanoseconds: 7, message: "")
        XCTAssertEqual(try PostCopyRunning(decoding: running.encode()), running)
        var badFlag = running.encode(); badFlag[0] = 2
        XCTAssertThrowsError(try PostCopyRunning(decoding: badFlag))

        let request = PageRequest(pages: [0, 99, 5])
        XCTAssertEqual(try PageRequest(decoding: request.encode(), pageCount: 100), request)
        XCTAssertThrowsError(try PageRequest(decoding: PageRequest(pages: [100]).encode(), pageCount: 100)) {
            XCTAssertTrue("\($0)".contains("outside RAM"), "\($0)")
        }
        XCTAssertThrowsError(try PageRequest(decoding: PageRequest(pages: []).encode(), pageCount: 100), "an empty request")
        XCTAssertThrowsError(try PageRequest(decoding: WireWriter.encoding { $0.u32(UInt32(PageRequest.maxPages + 1)) }, pageCount: 100))
        XCTAssertLessThanOrEqual(PageRequest(pages: Array(repeating: 1, count: PageRequest.maxPages)).encode().count,
                                 MigrationFrameType.pageRequest.maxPayload)

        let end = PostCopyEnd(verify: true, memoryDigest: .max)
        XCTAssertEqual(try PostCopyEnd(decoding: end.encode()), end)

        var result = PostCopyResult(status: .verifyFailed, message: "differs", verifyNanoseconds: 3, vcpuBlockedNanoseconds: [1, 2])
        result.faults = 10; result.requested = 9; result.latencyP50Microseconds = 20; result.latencyMaxMicroseconds = 900
        XCTAssertEqual(try PostCopyResult(decoding: result.encode()), result)
        result.vcpuBlockedNanoseconds = Array(repeating: 0, count: PostCopyResult.maxVCPUs)
        XCTAssertLessThanOrEqual(result.encode().count, MigrationFrameType.postcopyResult.maxPayload)
        XCTAssertLessThanOrEqual(PostCopyRunning(running: false, message: String(repeating: "x", count: 5000)).encode().count,
                                 MigrationFrameType.postcopyRunning.maxPayload)
    }
}
