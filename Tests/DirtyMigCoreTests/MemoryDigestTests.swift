@testable import DirtyMigCore
import Foundation
import XCTest

/// `--verify`'s digests: the destination's, kept as pages land (LandedPagesDigest), must equal
/// what hashing all of its memory at the pause point gives (MemoryDigest.compute), whatever
/// order pages came in, came again, or were zeroed; and a single differing byte must show.
final class MemoryDigestTests: XCTestCase {
    private func fill(_ memory: GuestMemory, pages: Range<Int>, seed: UInt64) {
        var generator = SplitMix64(state: seed)
        for page in pages {
            for word in 0..<512 {
                memory.base.storeBytes(of: generator.next(), toByteOffset: page * 4096 + word * 8, as: UInt64.self)
            }
        }
    }

    func testTheLandedDigestEqualsHashingAllOfMemory() throws {
        let memory = try GuestMemory(size: 16 * MiB)
        var digest = LandedPagesDigest(pageCount: memory.pageCount)
        XCTAssertEqual(digest.value, MemoryDigest.compute(memory), "a fresh destination: all holes")
        // Pass 1, out of order; pass 2 rewrites some pages and zeroes others (as PageReceiver does).
        fill(memory, pages: 3000..<4096, seed: 1); digest.landed(3000..<4096, in: memory)
        fill(memory, pages: 0..<100, seed: 2); digest.landed(0..<100, in: memory)
        fill(memory, pages: 50..<60, seed: 3); digest.landed(50..<60, in: memory)
        for page in 3500..<3510 {
            memset(memory.base + page * 4096, 0, 4096)
            digest.zeroed(page)
        }
        XCTAssertEqual(digest.value, MemoryDigest.compute(memory))
        XCTAssertEqual(digest.value, MemoryDigest.compute(memory, threads: 1))

        // A byte the digest did not see (a page that changed behind its back) shows.
        memory.base.storeBytes(of: 0xFF, toByteOffset: 70 * 4096 + 17, as: UInt8.self)
        XCTAssertNotEqual(digest.value, MemoryDigest.compute(memory))
    }

    /// The same bytes at another page are another memory.
    func testPagesCountByWhereTheyAre() throws {
        let memory = try GuestMemory(size: 4 * MiB)
        fill(memory, pages: 10..<11, seed: 9)
        let here = MemoryDigest.compute(memory)
        memcpy(memory.base + 11 * 4096, memory.base + 10 * 4096, 4096)
        memset(memory.base + 10 * 4096, 0, 4096)
        XCTAssertNotEqual(MemoryDigest.compute(memory), here)
    }
}
