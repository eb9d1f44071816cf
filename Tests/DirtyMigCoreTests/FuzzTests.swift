@testable import DirtyMigCore
import Foundation
import XCTest

/// Thousands of hostile inputs against what reads from outside: the receiver's state machine
/// (driven in process over a `MemoryTransport`, no sockets) and the control protocol's parser
/// and the `migrate` command's argument checks. Every input must end in a refusal with a reason
/// (or, for the rare valid one, a result), never a trap, and memory must stay bounded.
///
/// Seeded: the seed is printed, and `DIRTYMIG_FUZZ_SEED=N` replays a run.
final class FuzzTests: XCTestCase {
    /// SplitMix64 (the page sampler's): the same everywhere, so a seed reproduces a run.
    typealias Generator = SplitMix64

    private var seed: UInt64 = 0
    private var random = Generator(state: 0)

    override func setUp() {
        seed = ProcessInfo.processInfo.environment["DIRTYMIG_FUZZ_SEED"].flatMap { UInt64($0) }
            ?? UInt64(MonotonicClock.nanoseconds() & 0xFFFF_FFFF)
        random = Generator(state: seed)
        print("FuzzTests: seed \(seed) (replay with DIRTYMIG_FUZZ_SEED=\(seed))")
    }

    // MARK: Values

    /// Boundary values for an integer field of `bits` bits: 0, 1, max, max-1, and around
    /// powers of two; otherwise a random value.
    private func boundary(bits: Int) -> UInt64 {
        let max: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        switch Int.random(in: 0..<8, using: &random) {
        case 0: return 0
        case 1: return 1
        case 2: return max
        case 3: return max - 1
        case 4: return (UInt64(1) << UInt64.random(in: 0..<UInt64(bits), using: &random)) & max
        case 5: return ((UInt64(1) << UInt64.random(in: 0..<UInt64(bits), using: &random)) &- 1) & max
        default: return random.next() & max
        }
    }

    private func bytes(_ count: Int) -> [UInt8] {
        (0..<count).map { _ in UInt8(truncatingIfNeeded: random.next()) }
    }

    private static func u32(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: UInt32(truncatingIfNeeded: value).littleEndian, Array.init) }
    private static func u64(_ value: UInt64) -> [UInt8] { withUnsafeBytes(of: value.littleEndian, Array.init) }

    private static let memory: UInt64 = 64 << 20
    private static let pageCount = memory / 4096

    private static func validHello(verify: Bool = false, codec: PageCodec = .none) -> MigrationHello {
        let config = GuestConfig(tscHz: 2_000_000_000, memorySize: memory, vcpus: [VCPUWorkload(kind: .idle, seed: 0)])
        var hello = MigrationHello(name: "fuzz", memorySize: memory, vcpuCount: 1, tracking: .bitmap, ringEntries: 4096,
                                   tscKHz: 2_000_000, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: config.encode())
        hello.verify = verify
        hello.pageCodecCode = codec.rawValue
        return hello
    }

    /// A hello with each field at a boundary value now and then.
    private func mutatedHello() -> [UInt8] {
        var fields: [[UInt8]] = [
            Self.u32(UInt64(MigrationWire.magic)), Self.u32(UInt64(MigrationWire.version)),
            Self.u32(UInt64(ConnectionRole.control.rawValue)), Self.u64(random.next()), Self.u64(random.next()),
            Self.u64(Self.memory), Self.u32(1), Self.u32(1), Self.u32(4096), Self.u64(2_000_000),
            Self.u32(UInt64(CPUFeatureSet.workloadGuest.leaf1EDX)), Self.u32(0), Self.u32(UInt64(CPUFeatureSet.workloadGuest.extendedEDX)),
            Self.u32(0), Self.u32(UInt64(MigrationHello.defaultLinkTimeoutMilliseconds)), Self.u32(0), Self.u32(0),
            Self.u32(UInt64(PageCodec.zstd.rawValue)),
        ]
        let widths = [32, 32, 32, 64, 64, 64, 32, 32, 32, 64, 32, 32, 32, 32, 32, 32, 32, 32]
        for index in fields.indices where Int.random(in: 0..<4, using: &random) == 0 {
            let value = boundary(bits: widths[index])
            fields[index] = widths[index] == 64 ? Self.u64(value) : Self.u32(value)
        }
        let name = Array("fuzz".utf8)
        var config = Self.validHello().bootAnnouncement
        if Int.random(in: 0..<3, using: &random) == 0 {
            // A config block with a random field overwritten (vCPU count, sizes, offsets, kinds).
            let offset = Int.random(in: 0..<config.count - 8, using: &random)
            config.replaceSubrange(offset..<offset + 8, with: Self.u64(boundary(bits: 64)))
        }
        var payload = fields.flatMap { $0 } + Self.u32(UInt64(name.count)) + name
        let bootSource = Int.random(in: 0..<6, using: &random) == 0 ? boundary(bits: 32) : UInt64(BootSourceKind.workloadGuest.rawValue)
        payload += Self.u32(bootSource)
        let configLength = Int.random(in: 0..<6, using: &random) == 0 ? boundary(bits: 32) : UInt64(config.count)
        payload += Self.u32(configLength) + config
        return payload
    }

    /// A frame of a random type (sometimes an unknown one) with a plausible or random payload.
    private func randomFrame() -> [UInt8] {
        let types: [MigrationFrameType] = [.hello, .helloReply, .pages, .iterationEnd, .state, .complete, .result, .abort,
                                           .iterationAck, .passPlan, .compressedPages, .compressedPages]
        let type = types.randomElement(using: &random)!
        var payload: [UInt8]
        switch type {
        case .pages:
            let ranges = Int.random(in: 0..<5, using: &random) == 0 ? Int(boundary(bits: 32)) : Int.random(in: 0...4, using: &random)
            payload = Self.u32(UInt64(ranges))
            var data = 0
            for _ in 0..<min(ranges, 8) {
                let first = Int.random(in: 0..<2, using: &random) == 0 ? boundary(bits: 64) : UInt64.random(in: 0..<Self.pageCount, using: &random)
                let count = Int.random(in: 0..<2, using: &random) == 0 ? boundary(bits: 32) : UInt64.random(in: 1...4, using: &random)
                let kind = Int.random(in: 0..<4, using: &random) == 0 ? boundary(bits: 32) : UInt64.random(in: 0...1, using: &random)
                payload += Self.u64(first) + Self.u32(count) + Self.u32(kind)
                if kind == 0 { data += Int(min(count, 4)) * 4096 }
            }
            payload += bytes(Int.random(in: 0..<2, using: &random) == 0 ? data : Int.random(in: 0..<9000, using: &random))
        case .compressedPages:
            // A table of 1 to 3 ranges, then a zstd frame that tells the truth, declares another
            // size, is cut short, has bytes after it, or is not zstd at all.
            let count = Int.random(in: 1...3, using: &random)
            var ranges: [PageRange] = []
            for _ in 0..<count {
                let pages = UInt32.random(in: 1...4, using: &random)
                let first = Int.random(in: 0..<8, using: &random) == 0 ? boundary(bits: 64) : UInt64.random(in: 0..<Self.pageCount - 4, using: &random)
                ranges.append(PageRange(firstPage: first, count: pages, kind: Int.random(in: 0..<4, using: &random) == 0 ? .zero : .data))
            }
            let dataBytes = PageBatchTable(ranges: ranges).dataBytes
            var frame: [UInt8]
            switch Int.random(in: 0..<6, using: &random) {
            case 0, 1: frame = CompressionTests.zstdFrame(CompressionTests.textLike(dataBytes, seed: random.next()))
            case 2: frame = CompressionTests.zstdFrame(CompressionTests.textLike(max(0, dataBytes + Int.random(in: -8192...8192, using: &random)), seed: random.next()))
            case 3: frame = Array(CompressionTests.zstdFrame(CompressionTests.textLike(dataBytes, seed: random.next())).dropLast(Int.random(in: 1...8, using: &random)))
            case 4: frame = CompressionTests.zstdFrame(CompressionTests.textLike(dataBytes, seed: random.next())) + bytes(Int.random(in: 1...16, using: &random))
            default: frame = bytes(Int.random(in: 1...600, using: &random))
            }
            payload = PageBatchTable(ranges: ranges).encode() + frame
        case .passPlan:
            let words = Int.random(in: 0..<2, using: &random) == 0 ? Int(Self.pageCount / 64) : Int.random(in: 0..<300, using: &random)
            payload = Self.u32(boundary(bits: 32)) + (0..<words).flatMap { _ in Self.u64(boundary(bits: 64)) }
        case .iterationEnd:
            payload = Self.u32(boundary(bits: 32)) + Self.u64(boundary(bits: 64))
            if Int.random(in: 0..<4, using: &random) == 0 { payload = bytes(Int.random(in: 0..<20, using: &random)) }
        case .complete:
            payload = [UInt8(truncatingIfNeeded: boundary(bits: 8))] + Self.u64(boundary(bits: 64)) + Self.u64(boundary(bits: 64))
        case .state:
            payload = bytes(Int.random(in: 0..<4096, using: &random))
        case .hello:
            payload = mutatedHello()
        default:
            payload = bytes(Int.random(in: 0..<64, using: &random))
        }
        var header = Self.u32(Int.random(in: 0..<20, using: &random) == 0 ? boundary(bits: 32) : UInt64(type.rawValue))
        header += Self.u32(Int.random(in: 0..<20, using: &random) == 0 ? boundary(bits: 32) : UInt64(payload.count))
        return header + payload
    }

    /// The header of a frame of any type (or none) with a length at or near its type's largest.
    private func largeHeader() -> [UInt8] {
        let type = UInt64.random(in: 1...20, using: &random)
        let most = MigrationFrameType(rawValue: UInt32(type))?.maxPayload ?? Int(UInt32.max)
        return Self.u32(type) + Self.u32(UInt64(most) - UInt64.random(in: 0...min(UInt64(most), 3), using: &random))
    }

    // MARK: The receiver

    /// A VM with memory and nothing else: what the state machine fills, without KVM.
    final class MemoryOnlyVM: IncomingVM {
        let memory: GuestMemory
        init(memory: GuestMemory) { self.memory = memory }
        func checkRestorable(_ saved: MachineState) throws(MachineError) {}
        func restoreState(_ saved: MachineState) throws(MachineError) {}
        func start() throws(MachineError) {}
        func stop() {}
        var vcpuThreadIDs: [UInt32] { [] }
        let postcopyLink = PostCopyLinkState()
    }

    func testTheReceiverRefusesHostileStreamsWithAReason() throws {
        // The host checks run on KVM where there is one, else on the fake hypervisor: the boot
        // source's checks (the config block) and the limits are the same code either way.
        let hypervisor: any Hypervisor = (try? KVMSystem()) ?? FakeHypervisor()
        let build = { (hello: MigrationHello) throws(MigrationError) -> MemoryOnlyVM in
            // On a host whose TSC ticks like the sender's (else every hello would stop at the
            // TSC check and the frames after it would never be read).
            _ = try MigrationReceiver.configuration(for: hello, hypervisor: hypervisor, name: nil, hostTSCKHz: hello.tscKHz)
            guard hello.memorySize <= 256 << 20, hello.memorySize >= 1 << 20, hello.memorySize % 4096 == 0 else {
                throw .refused("the fuzz host builds VMs of 1 to 256 MiB")
            }
            do { return MemoryOnlyVM(memory: try GuestMemory(size: hello.memorySize)) } catch { throw .machine("\(error)") }
        }
        let before = residentBytes()
        var outcomes: [String: Int] = [:]
        let inputs = 12_000
        for index in 0..<inputs {
            let stream: [UInt8]
            switch index % 4 {
            case 0 where index % 16 == 0:   // a header announcing a large frame, with no payload
                stream = largeHeader() + (Bool.random(using: &random) ? [] : MigrationWire.frame(.hello, Self.validHello().encode()))
            case 0:   // random bytes
                stream = bytes(Int.random(in: 0..<256, using: &random))
            case 1 where index % 16 == 1:   // a joining connection's hello where a migration's belongs
                let join = SessionJoin(session: SessionID(high: random.next(), low: random.next()),
                                       role: Bool.random(using: &random) ? .pages : .faults)
                stream = MigrationWire.frame(.hello, mutated(join.encode()).bytes) + randomFrame()
            case 1:   // a valid header with a random payload, then random frames
                stream = MigrationWire.frame(.hello, mutatedHello()) + (0..<Int.random(in: 0...3, using: &random)).flatMap { _ in randomFrame() }
            default:  // a valid hello (every other one announcing zstd), then random frames
                stream = MigrationWire.frame(.hello, Self.validHello(verify: index % 8 == 2, codec: index % 8 < 4 ? .zstd : .none).encode())
                    + (0..<Int.random(in: 1...6, using: &random)).flatMap { _ in randomFrame() }
            }
            let transport = MemoryTransport(input: stream)
            defer {
                // Nothing before the hello may ask for more than a hello's worth of bytes.
                if index % 16 == 0 {
                    XCTAssertLessThanOrEqual(transport.largestReceive, MigrationFrameType.hello.maxPayload, "input \(index) (seed \(seed))")
                }
            }
            do {
                let vm = try MigrationReceiver.receive(over: transport, build: build)
                vm.stop()
                outcomes["completed", default: 0] += 1
            } catch {
                let reason = error.description
                XCTAssertFalse(reason.isEmpty, "input \(index) (seed \(seed)) was refused without a reason")
                // The reason without its figures: one bucket per kind of refusal.
                outcomes[String(reason.filter { !$0.isNumber }.prefix(60)), default: 0] += 1
            }
        }
        let after = residentBytes()
        print("FuzzTests: \(inputs) receiver inputs; outcomes by reason: \(outcomes.sorted { $0.value > $1.value }.prefix(40).map { "\($0.key)…: \($0.value)" }.joined(separator: "; "))")
        print("FuzzTests: resident memory \(before >> 20) MiB before, \(after >> 20) MiB after")
        XCTAssertLessThan(after, before + (128 << 20), "memory grew by \((after - min(after, before)) >> 20) MiB over \(inputs) inputs (seed \(seed))")
        XCTAssertGreaterThan(outcomes.count, 20, "the inputs reach many different refusals")
    }

    /// The one the hardening issue found: a page range at the top of the address space.
    func testAPageRangeAtTheTopOfTheAddressSpaceIsRefused() throws {
        let build = { (hello: MigrationHello) throws(MigrationError) -> MemoryOnlyVM in
            do { return MemoryOnlyVM(memory: try GuestMemory(size: hello.memorySize)) } catch { throw .machine("\(error)") }
        }
        for first in [UInt64.max, UInt64.max - 1, Self.pageCount, Self.pageCount - 1] {
            let batch = Self.u32(1) + Self.u64(first) + Self.u32(first == Self.pageCount - 1 ? 2 : 1) + Self.u32(1)
            let transport = MemoryTransport(input: MigrationWire.frame(.hello, Self.validHello().encode()) + MigrationWire.frame(.pages, batch))
            XCTAssertThrowsError(try MigrationReceiver.receive(over: transport, build: build)) {
                XCTAssertTrue("\($0)".contains("outside RAM"), "\($0)")
            }
        }
    }

    /// Every frame type, announced with the largest length it may have and no payload, as the
    /// first frame (where only a hello belongs) and after a hello (where only the pre-copy's
    /// frames do): a frame that does not belong is refused from its header, before its payload
    /// is read or allocated (each announced up to 64 MiB: 16 such connections took a receiver's
    /// RSS to 1 GiB).
    func testHeadersOfFramesThatDoNotBelongAreRefusedBeforeTheirPayload() throws {
        let build = { (hello: MigrationHello) throws(MigrationError) -> MemoryOnlyVM in
            do { return MemoryOnlyVM(memory: try GuestMemory(size: hello.memorySize)) } catch { throw .machine("\(error)") }
        }
        let types = (1...64).compactMap { MigrationFrameType(rawValue: UInt32($0)) }
        // Legal while memory is received, and what each may cost there at most.
        let legal: [MigrationFrameType: Int] = [.pages: 16 * MigrationWire.maxRangesPerBatch, .iterationEnd: 12,
                                                .passPlan: 4 + 8 * Int(Self.pageCount / 64), .state: MigrationWire.maxStateBytes,
                                                .abort: MigrationFrameType.abort.maxPayload]
        for type in types {
            let header = Self.u32(UInt64(type.rawValue)) + Self.u32(UInt64(type.maxPayload))
            let first = MemoryTransport(input: header)
            XCTAssertThrowsError(try MigrationReceiver.receive(over: first, build: build), "\(type) first")
            let bound = type == .hello || type == .abort ? type.maxPayload : MigrationWire.frameHeaderSize
            XCTAssertLessThanOrEqual(first.largestReceive, bound, "a \(type) header before the hello: \(first.largestReceive) bytes asked for")

            let later = MemoryTransport(input: MigrationWire.frame(.hello, Self.validHello().encode()) + header)
            XCTAssertThrowsError(try MigrationReceiver.receive(over: later, build: build), "\(type) after the hello")
            let hello = Self.validHello().encode().count
            XCTAssertLessThanOrEqual(later.largestReceive, max(hello, legal[type] ?? MigrationWire.frameHeaderSize),
                                     "a \(type) header after the hello: \(later.largestReceive) bytes asked for")
        }
    }

    // MARK: The frame codecs

    /// `valid`, or (most of the time) a variant of it: a byte flipped, a 4- or 8-byte field
    /// overwritten with a boundary value, cut short, run on, or random bytes instead. `intact`:
    /// it is still `valid`.
    private func mutated(_ valid: [UInt8]) -> (bytes: [UInt8], intact: Bool) {
        var bytes = valid
        switch Int.random(in: 0..<6, using: &random) {
        case 0: return (bytes, true)
        case 1 where !bytes.isEmpty:
            bytes[Int.random(in: 0..<bytes.count, using: &random)] ^= UInt8(truncatingIfNeeded: random.next() | 1)
        case 2 where bytes.count >= 8:
            let width = Bool.random(using: &random) ? 4 : 8
            let offset = Int.random(in: 0...(bytes.count - width) / 4, using: &random) * 4
            bytes.replaceSubrange(offset..<offset + width, with: width == 4 ? Self.u32(boundary(bits: 32)) : Self.u64(boundary(bits: 64)))
        case 3: bytes = Array(bytes.prefix(Int.random(in: 0...bytes.count, using: &random)))
        case 4: bytes += self.bytes(Int.random(in: 1...16, using: &random))
        default: bytes = self.bytes(Int.random(in: 0..<64, using: &random))
        }
        return (bytes, bytes == valid)
    }

    /// A length: the right one most of the time, else a boundary value or one off.
    private func mutatedLength(_ valid: Int) -> Int {
        switch Int.random(in: 0..<6, using: &random) {
        case 0: return Int(boundary(bits: 32))
        case 1: return max(0, valid + Int.random(in: -2...2, using: &random))
        default: return valid
        }
    }

    /// A range table that fits a RAM of `pageCount` pages.
    private func validTable() -> PageBatchTable {
        PageBatchTable(ranges: (0..<Int.random(in: 0...8, using: &random)).map { _ in
            let first = UInt64.random(in: 0..<Self.pageCount, using: &random)
            return PageRange(firstPage: first, count: UInt32.random(in: 1...UInt32(min(Self.pageCount - first, 8)), using: &random),
                             kind: Bool.random(using: &random) ? .data : .zero)
        })
    }

    /// Random and boundary inputs to every frame decoder, one after another: each is refused
    /// with a reason or decodes (an intact input to the value it encodes), never traps, and
    /// memory stays bounded (no decoder allocates what its input only announces).
    func testEveryFrameDecoderRefusesRandomAndBoundaryInputsWithAReason() throws {
        let before = residentBytes()
        var decoded = 0, refused: [String: Int] = [:]
        func check<T: Equatable>(_ valid: T, _ input: (bytes: [UInt8], intact: Bool), intactLength: Bool = true,
                                 _ decode: ([UInt8]) throws(MigrationProtocolError) -> T) {
            do {
                let value = try decode(input.bytes)
                decoded += 1
                if input.intact && intactLength { XCTAssertEqual(value, valid, "seed \(seed)") }
            } catch {
                XCTAssertFalse(error.description.isEmpty, "seed \(seed)")
                refused[String(error.description.filter { !$0.isNumber }.prefix(50)), default: 0] += 1
                XCTAssertFalse(input.intact && intactLength, "an intact input was refused: \(error) (seed \(seed))")
            }
        }
        let pageCount = Int(Self.pageCount)
        for _ in 0..<3000 {
            let type = MigrationFrameType(rawValue: UInt32.random(in: 1...27, using: &random))!
            let header = MigrationFrameHeader(type, payloadLength: Int.random(in: 0...type.maxPayload, using: &random))
            check(header, mutated(header.encode())) { bytes throws(MigrationProtocolError) in try MigrationFrameHeader(decoding: bytes) }

            let table = validTable()
            let tableLength = mutatedLength(table.encodedSize + table.dataBytes)
            check(table, mutated(table.encode()), intactLength: tableLength == table.encodedSize + table.dataBytes) {
                bytes throws(MigrationProtocolError) in try PageBatchTable(decoding: bytes, payloadLength: tableLength, pageCount: Self.pageCount)
            }

            let plan = PassPlan(pass: UInt32(truncatingIfNeeded: boundary(bits: 32)),
                                words: (0..<(pageCount + 63) / 64).map { _ in boundary(bits: 64) })
            check(plan, mutated(plan.encode())) { bytes throws(MigrationProtocolError) in try PassPlan(decoding: bytes, pageCount: pageCount) }

            let count = Int.random(in: 1...CheckpointWire.maxPagesPerFrame, using: &random)
            let pagesHeader = CheckpointPagesHeader(epoch: boundary(bits: 64), count: UInt32(count))
            let framePayload = mutatedLength(CheckpointPagesHeader.payloadLength(pages: count))
            check(pagesHeader, mutated(pagesHeader.encode()), intactLength: framePayload == CheckpointPagesHeader.payloadLength(pages: count)) {
                bytes throws(MigrationProtocolError) in
                try CheckpointPagesHeader.checkFrame(payloadLength: framePayload)
                let decodedHeader = try CheckpointPagesHeader(decoding: bytes)
                _ = try decodedHeader.checkedCount(payloadLength: framePayload)
                return decodedHeader
            }
            let list = (0..<Int.random(in: 0...16, using: &random)).map { _ in UInt32.random(in: 0..<UInt32(pageCount), using: &random) }
            check(list, mutated(CheckpointPageList.encode(list))) { bytes throws(MigrationProtocolError) in
                var pages: [UInt32] = []
                try CheckpointPageList.decode(bytes, count: list.count, pageCount: pageCount, appendingTo: &pages)
                return pages
            }

            let reason = MigrationReason(String(decoding: bytes(Int.random(in: 0..<40, using: &random)).map { $0 % 26 + 0x61 }, as: UTF8.self))
            check(reason, mutated(reason.encode())) { bytes throws(MigrationProtocolError) in try MigrationReason(decoding: bytes) }
            var reply = MigrationHelloReply(accepted: Bool.random(using: &random), reason: reason.text)
            reply.heartbeatMilliseconds = UInt32(truncatingIfNeeded: boundary(bits: 32))
            reply.refusal = [.other, .nothingToResume, .tookOver][Int.random(in: 0...2, using: &random)]
            reply.heldEpoch = Bool.random(using: &random) ? boundary(bits: 64) : nil
            check(reply, mutated(reply.encode())) { bytes throws(MigrationProtocolError) in try MigrationHelloReply(decoding: bytes) }
            let passEnd = MigrationPassEnd(pass: UInt32(truncatingIfNeeded: boundary(bits: 32)))
            check(passEnd, mutated(passEnd.encode())) { bytes throws(MigrationProtocolError) in try MigrationPassEnd(decoding: bytes) }
            check(passEnd, mutated(passEnd.encodeAck())) { bytes throws(MigrationProtocolError) in try MigrationPassEnd(decodingAck: bytes) }
            let completion = MigrationCompletion(verify: Bool.random(using: &random), memoryDigest: boundary(bits: 64), stateDigest: boundary(bits: 64))
            check(completion, mutated(completion.encode())) { bytes throws(MigrationProtocolError) in try MigrationCompletion(decoding: bytes) }
            let result = MigrationResult(status: .failed, verifyNanoseconds: boundary(bits: 64), resumeNanoseconds: boundary(bits: 64),
                                         message: reason.text)
            check(result, mutated(result.encode())) { bytes throws(MigrationProtocolError) in try MigrationResult(decoding: bytes) }
            let end = CheckpointEnd(epoch: boundary(bits: 64), pageCount: UInt32(truncatingIfNeeded: boundary(bits: 32)),
                                    resync: Bool.random(using: &random), digest: boundary(bits: 64), state: bytes(Int.random(in: 0..<64, using: &random)))
            check(end, mutated(end.encode())) { bytes throws(MigrationProtocolError) in try CheckpointEnd(decoding: bytes) }
            let epoch = EpochFrame(epoch: boundary(bits: 64))
            check(epoch, mutated(epoch.encode())) { bytes throws(MigrationProtocolError) in try EpochFrame(decoding: bytes, what: "heartbeat") }

            // Post-copy's frames.
            let lacking = (0..<(pageCount + 63) / 64).map { index -> UInt64 in
                let word = boundary(bits: 64)
                return index == (pageCount - 1) / 64 && pageCount % 64 != 0 ? word & ((1 << UInt64(pageCount % 64)) - 1) : word
            }
            let postcopySwitch = PostCopySwitch(state: bytes(Int.random(in: 0..<64, using: &random)),
                                                lacking: DirtyPageBitmap(pageCount: pageCount, words: lacking))
            check(postcopySwitch, mutated(postcopySwitch.encode())) { bytes throws(MigrationProtocolError) in
                try PostCopySwitch(decoding: bytes, pageCount: pageCount)
            }
            let postcopyResume = PostCopyResume(lacking: DirtyPageBitmap(pageCount: pageCount, words: lacking))
            check(postcopyResume, mutated(postcopyResume.encode())) { bytes throws(MigrationProtocolError) in
                try PostCopyResume(decoding: bytes, pageCount: pageCount)
            }
            let prepare = PostCopyPrepare(stale: DirtyPageBitmap(pageCount: pageCount, words: lacking))
            check(prepare, mutated(prepare.encode())) { bytes throws(MigrationProtocolError) in
                try PostCopyPrepare(decoding: bytes, pageCount: pageCount)
            }
            let prepared = PostCopyPrepared(droppedNanoseconds: boundary(bits: 64))
            check(prepared, mutated(prepared.encode())) { bytes throws(MigrationProtocolError) in try PostCopyPrepared(decoding: bytes) }
            let running = PostCopyRunning(running: Bool.random(using: &random), resumeNanoseconds: boundary(bits: 64), message: reason.text)
            check(running, mutated(running.encode())) { bytes throws(MigrationProtocolError) in try PostCopyRunning(decoding: bytes) }
            let request = PageRequest(pages: (0..<Int.random(in: 1...8, using: &random)).map { _ in UInt64.random(in: 0..<UInt64(pageCount), using: &random) })
            check(request, mutated(request.encode())) { bytes throws(MigrationProtocolError) in try PageRequest(decoding: bytes, pageCount: pageCount) }
            let postcopyEnd = PostCopyEnd(verify: Bool.random(using: &random), memoryDigest: boundary(bits: 64))
            check(postcopyEnd, mutated(postcopyEnd.encode())) { bytes throws(MigrationProtocolError) in try PostCopyEnd(decoding: bytes) }
            var postcopyResult = PostCopyResult(status: .resumed, message: reason.text, verifyNanoseconds: boundary(bits: 64),
                                                vcpuBlockedNanoseconds: (0..<Int.random(in: 0...4, using: &random)).map { _ in boundary(bits: 64) })
            postcopyResult.faults = boundary(bits: 64)
            postcopyResult.latencyP99Microseconds = UInt32(truncatingIfNeeded: boundary(bits: 32))
            check(postcopyResult, mutated(postcopyResult.encode())) { bytes throws(MigrationProtocolError) in try PostCopyResult(decoding: bytes) }

            let session = SessionID(high: boundary(bits: 64), low: boundary(bits: 64))
            var control = Self.validHello(verify: Bool.random(using: &random))
            control.session = session
            control.joins = SessionJoins(pages: Int.random(in: 0...SessionJoins.maxPages, using: &random),
                                         faults: Int.random(in: 0...SessionJoins.maxFaults, using: &random))
            switch Int.random(in: 0...2, using: &random) {
            case 0: control.postcopy = true; control.resume = Bool.random(using: &random)
            case 1: control.replicate = true; control.resume = Bool.random(using: &random)
            default: break
            }
            check(ConnectionHello.control(control), mutated(control.encode())) { bytes throws(MigrationProtocolError) in
                try ConnectionHello(decoding: bytes)
            }
            let join = SessionJoin(session: session, role: Bool.random(using: &random) ? .pages : .faults)
            check(ConnectionHello.join(join), mutated(join.encode())) { bytes throws(MigrationProtocolError) in
                try ConnectionHello(decoding: bytes)
            }
        }
        let after = residentBytes()
        print("FuzzTests: \(decoded) frames decoded; refusals by reason: \(refused.sorted { $0.value > $1.value }.prefix(30).map { "\($0.key)…: \($0.value)" }.joined(separator: "; "))")
        XCTAssertLessThan(after, before + (64 << 20), "memory grew by \((after - min(after, before)) >> 20) MiB (seed \(seed))")
        XCTAssertGreaterThan(refused.count, 20, "the inputs reach many different refusals")
    }

    /// Mutated checkpointPages frames into the standby's staging area, as it reads them off a
    /// connection: each is staged or refused with a reason, no page outside RAM is staged, and
    /// a frame's announced size never makes it read or allocate more than the frame may hold.
    func testTheStandbysStagingRefusesHostileCheckpointFramesWithAReason() throws {
        let memory = try GuestMemory(size: 4 << 20)
        let staging = CheckpointStaging(memory: memory)
        var staged = 0, refused: [String: Int] = [:]
        for index in 0..<2000 {
            let count = Int.random(in: 1...8, using: &random)
            let pages = (0..<count).map { _ in UInt32.random(in: 0..<UInt32(memory.pageCount), using: &random) }
            let head = mutated(CheckpointPagesHeader(epoch: UInt64(index % 3), count: UInt32(count)).encode() + CheckpointPageList.encode(pages))
            let length = mutatedLength(CheckpointPagesHeader.payloadLength(pages: count))
            let transport = MemoryTransport(input: head.bytes + [UInt8](repeating: 0xA5, count: count * 4096))
            do {
                try staging.receivePages(from: MigrationChannel(transport: transport), payloadLength: length)
                staged += 1
            } catch {
                XCTAssertFalse(error.description.isEmpty, "seed \(seed)")
                refused[String(error.description.filter { !$0.isNumber }.prefix(50)), default: 0] += 1
                staging.reset()
            }
            // Never more than the frame announced, nor than a frame may hold.
            XCTAssertLessThanOrEqual(transport.largestReceive, max(CheckpointPagesHeader.size, min(length, CheckpointWire.maxPagesPerFrame * 4096)),
                                     "input \(index) (seed \(seed))")
            if index % 50 == 0 { staging.reset() }
        }
        print("FuzzTests: \(staged) checkpoint frames staged; refusals by reason: \(refused.sorted { $0.value > $1.value }.map { "\($0.key)…: \($0.value)" }.joined(separator: "; "))")
        XCTAssertGreaterThan(staged, 0)
        XCTAssertGreaterThanOrEqual(refused.count, 3, "frames too short, announcing other sizes, pages outside RAM, epochs mixed")
    }

    // MARK: The control protocol

    private func randomJSONNumber() -> String {
        ["0", "1", "-1", "1.5", "2e10", "1e30", "1e308", "1e400", "-1e400", "18446744073709551615", "18446744073709551616",
         "9223372036854775807", "-9223372036854775808", "0.0001", "4096", "4095.5", "600000", "600001", "1e-400",
         String(boundary(bits: 64)), "\(Double(bitPattern: random.next()))"].randomElement(using: &random)!
    }

    private func randomJSONValue(depth: Int = 0) -> String {
        switch Int.random(in: 0..<(depth > 3 ? 4 : 7), using: &random) {
        case 0: return randomJSONNumber()
        case 1: return ["true", "false", "null"].randomElement(using: &random)!
        case 2: return "\"" + ["127.0.0.1:1", ":4444", "x", "", "cpu", "none", "\\u0000", "\\ud800", "[::1]:99999"].randomElement(using: &random)! + "\""
        case 3: return String(decoding: bytes(Int.random(in: 0..<8, using: &random)), as: UTF8.self)
        case 4: return "[" + (0..<Int.random(in: 0...3, using: &random)).map { _ in randomJSONValue(depth: depth + 1) }.joined(separator: ",") + "]"
        default:
            let keys = ["to", "bandwidth", "downtime_ms", "max_iterations", "timeout_s", "verify", "throttle", "x"]
            return "{" + (0..<Int.random(in: 0...4, using: &random)).map { _ in
                "\"\(keys.randomElement(using: &random)!)\":\(randomJSONValue(depth: depth + 1))"
            }.joined(separator: ",") + "}"
        }
    }

    func testTheControlParserAndMigrateArgumentsRefuseWithAReason() {
        var accepted = 0, refused = 0
        for index in 0..<20_000 {
            let line: [UInt8]
            if index % 5 == 0 {
                line = bytes(Int.random(in: 0..<64, using: &random))
            } else {
                line = Array(("{\"execute\":\"migrate\",\"arguments\":{\"to\":\"127.0.0.1:1\"," + [
                    "\"bandwidth\":\(randomJSONNumber())", "\"timeout_s\":\(randomJSONNumber())",
                    "\"downtime_ms\":\(randomJSONNumber())", "\"max_iterations\":\(randomJSONNumber())",
                    "\"verify\":\(randomJSONValue())", "\"throttle\":\(randomJSONValue())",
                ].shuffled(using: &random).prefix(Int.random(in: 1...4, using: &random)).joined(separator: ",") + "}}").utf8)
            }
            let request: ControlRequest
            do { request = try ControlRequest.decode(line) } catch {
                XCTAssertFalse(error.error.desc.isEmpty)
                refused += 1
                continue
            }
            do {
                let options = try MigrationControl.migrationOptions(request.arguments)
                // Whatever is accepted converts without trapping and is inside the documented ranges.
                if let bandwidth = options.bandwidth { XCTAssertTrue(MigrationOptions.bandwidthRange.contains(Double(bandwidth))) }
                if let timeout = options.timeoutSeconds { XCTAssertTrue(MigrationOptions.timeoutRange.contains(timeout)) }
                XCTAssertTrue(MigrationOptions.downtimeRange.contains(options.downtimeSeconds))
                accepted += 1
            } catch {
                XCTAssertFalse(error.desc.isEmpty, "seed \(seed)")
                refused += 1
            }
        }
        print("FuzzTests: 20000 control lines: \(accepted) accepted, \(refused) refused with a reason")
        // The issue's cases, exactly.
        for arguments in ["{\"to\":\"127.0.0.1:1\",\"timeout_s\":2e10}", "{\"to\":\"127.0.0.1:1\",\"timeout_s\":1e30}",
                          "{\"to\":\"127.0.0.1:1\",\"bandwidth\":1e30}", "{\"to\":\"127.0.0.1:1\",\"max_iterations\":1.5}"] {
            let value = try! JSONValue.parse(arguments)
            XCTAssertThrowsError(try MigrationControl.migrationOptions(value), arguments) {
                XCTAssertEqual(($0 as? ControlError)?.errorClass, .invalidArgument, "\($0)")
            }
        }
    }
}
