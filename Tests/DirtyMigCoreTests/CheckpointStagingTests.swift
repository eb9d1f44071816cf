@testable import DirtyMigCore
import Foundation
import XCTest

/// The standby applies a checkpoint whole or not at all: torn, corrupted, oversized or
/// out-of-range checkpoints never reach guest memory. Frames are made by the primary's own code
/// (StagedCheckpoint) and fed to the standby's (CheckpointStaging) through memory transports.
final class CheckpointStagingTests: XCTestCase {
    private let size: UInt64 = 4 << 20

    private func fill(_ memory: GuestMemory, page: Int, with byte: UInt8) {
        memset(memory.base + page * 4096, Int32(byte), 4096)
    }

    /// The bytes of one checkpoint of `pages` of `memory`, as the primary sends it.
    private func checkpointBytes(_ memory: GuestMemory, epoch: UInt64, pages: [UInt32], state: [UInt8] = [1, 2, 3]) throws -> [UInt8] {
        let staged = StagedCheckpoint()
        staged.begin()
        staged.stage(pages, from: memory, paused: true)
        staged.setState(state)
        staged.setEpoch(epoch)
        let wire = MemoryTransport(input: [], keptBytes: 64 << 20)
        _ = try staged.send(over: MigrationChannel(transport: wire))
        return wire.output
    }

    /// Feeds `bytes` to a staging area over `memory`: the applied state, or the error.
    private func apply(_ bytes: [UInt8], to memory: GuestMemory) -> Result<[UInt8], MigrationError> {
        let channel = MigrationChannel(transport: MemoryTransport(input: bytes))
        let staging = CheckpointStaging(memory: memory)
        do throws(MigrationError) {
            while true {
                let (type, length) = try channel.receiveHeader()
                switch type {
                case .checkpointPages: try staging.receivePages(from: channel, payloadLength: length)
                case .checkpointEnd:
                    let payload = try channel.receivePayload(length)
                    let end = try MigrationError.wrap { () throws(MigrationProtocolError) in try CheckpointEnd(decoding: payload) }
                    return .success(try staging.apply(end))
                default: return .failure(.protocolError(.unexpected("\(type)")))
                }
            }
        } catch { return .failure(error) }
    }

    func testAWholeCheckpointIsAppliedAndAnythingLessIsNot() throws {
        let primary = try GuestMemory(size: size)
        for page in 0..<600 { fill(primary, page: page, with: UInt8(page % 251) | 1) }
        // 600 pages: two checkpointPages frames.
        let bytes = try checkpointBytes(primary, epoch: 7, pages: (0..<600).map(UInt32.init))

        let standby = try GuestMemory(size: size)
        XCTAssertEqual(try apply(bytes, to: standby).get(), [1, 2, 3])
        for page in [0, 511, 512, 599] {
            XCTAssertEqual(memcmp(standby.base + page * 4096, primary.base + page * 4096, 4096), 0, "page \(page)")
        }

        // Torn anywhere (in the first frame, between frames, in the end): nothing applied.
        for cut in [100, bytes.count / 2, bytes.count - 10] {
            let fresh = try GuestMemory(size: size)
            XCTAssertThrowsError(try apply(Array(bytes.prefix(cut)), to: fresh).get(), "cut at \(cut)")
            XCTAssertEqual(fresh.dataPages().count, 0, "a checkpoint torn at byte \(cut) must not reach guest memory")
        }
    }

    /// An epoch staged in three lists (two while it runs, the last in its pause), the guest
    /// writing pages between them: every page goes out once, with its bytes as of the last list
    /// that named it, and the page count is the epoch's distinct pages.
    func testPagesStagedInSeveralListsGoOutOnceWithTheirLatestBytes() throws {
        let primary = try GuestMemory(size: size)
        let staged = StagedCheckpoint(preparedPages: 256)
        staged.begin()
        for page in 0..<300 { fill(primary, page: page, with: 1) }
        staged.stage((0..<300).map(UInt32.init), from: primary, paused: false)
        // Written again (so named again), and new pages; the buffer grows past its 256 pages.
        for page in 100..<400 { fill(primary, page: page, with: 2) }
        staged.stage((100..<400).map(UInt32.init), from: primary, paused: false)
        for page in [5, 150, 350, 500] { fill(primary, page: page, with: 3) }
        staged.stage([500, 350, 5, 150], from: primary, paused: true)
        XCTAssertEqual(staged.pages.count, 401)
        XCTAssertEqual(Set(staged.pages).count, 401, "a page staged twice must go out once")
        XCTAssertEqual(staged.pagesCopiedPaused, 4)
        staged.setState([9])
        staged.setEpoch(3)
        let wire = MemoryTransport(input: [], keptBytes: 64 << 20)
        _ = try staged.send(over: MigrationChannel(transport: wire))

        let standby = try GuestMemory(size: size)
        XCTAssertEqual(try apply(wire.output, to: standby).get(), [9])
        for page in [0, 5, 99, 100, 150, 299, 300, 350, 399, 500] {
            XCTAssertEqual(memcmp(standby.base + page * 4096, primary.base + page * 4096, 4096), 0, "page \(page)")
        }
        XCTAssertEqual(standby.dataPages().count, 401)

        // The next epoch starts empty.
        staged.begin()
        XCTAssertTrue(staged.isEmpty)
        XCTAssertEqual(staged.pagesCopiedPaused, 0)
    }

    func testACorruptedCheckpointIsRefusedWhole() throws {
        let primary = try GuestMemory(size: size)
        for page in 0..<10 { fill(primary, page: page, with: 0xAB) }
        var bytes = try checkpointBytes(primary, epoch: 3, pages: Array(0..<10))
        bytes[8 + 12 + 40 + 5000] ^= 0x01   // one bit of page data
        let standby = try GuestMemory(size: size)
        guard case .failure(let error) = apply(bytes, to: standby) else { return XCTFail("a flipped bit must be refused") }
        XCTAssertTrue("\(error)".contains("digest"), "\(error)")
        XCTAssertEqual(standby.dataPages().count, 0)
    }

    func testPagesOutsideRAMAndEpochsThatDoNotMatchAreRefused() throws {
        let primary = try GuestMemory(size: size)
        var bytes = try checkpointBytes(primary, epoch: 1, pages: [1])
        // The page number (after the frame header and the 12-byte checkpoint header).
        bytes.replaceSubrange(20..<24, with: [0xFF, 0xFF, 0xFF, 0xFF])
        guard case .failure(let error) = apply(bytes, to: try GuestMemory(size: size)) else { return XCTFail() }
        XCTAssertTrue("\(error)".contains("outside RAM"), "\(error)")

        let one = try checkpointBytes(primary, epoch: 1, pages: [1])
        let two = try checkpointBytes(primary, epoch: 2, pages: [2])
        // Pages of epoch 1 (without its end), then epoch 2's: an unfinished epoch is not mixed in.
        let pagesOfOne = Array(one.prefix(8 + 12 + 4 + 4096))
        guard case .failure(let mixed) = apply(pagesOfOne + two, to: try GuestMemory(size: size)) else { return XCTFail() }
        XCTAssertTrue("\(mixed)".contains("unfinished"), "\(mixed)")
    }

    func testAFrameAnnouncingMorePagesThanItCarriesIsRefusedBeforeReading() throws {
        var writer = WireWriter()
        writer.u32(MigrationFrameType.checkpointPages.rawValue)
        writer.u32(UInt32(12 + 4 + 4096))
        writer.u64(1); writer.u32(512)   // 512 pages announced in a one-page frame
        guard case .failure(let error) = apply(writer.bytes + [UInt8](repeating: 0, count: 4 + 4096), to: try GuestMemory(size: size)) else {
            return XCTFail()
        }
        XCTAssertTrue("\(error)".contains("announcing 512 pages"), "\(error)")
    }
}
