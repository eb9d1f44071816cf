/// The destination's half of `--verify`, kept up to date as pages land in its guest memory, so
/// that at the pause point only the source has to hash all of RAM.
///
/// It is `MemoryDigest.compute` of the destination's memory, summed page by page: each page is
/// hashed from guest memory right after the socket wrote it there (still in cache), and a page
/// that comes again replaces its earlier contribution. Nothing else writes the destination's
/// guest memory before it resumes, so the sum is the digest of that memory at the pause point.
/// Measured on the 1 GiB throttle test (768 MiB of data): hashing it all at the pause took
/// 61 ms at the destination, after 41 ms at the source, both inside the downtime.
struct LandedPagesDigest {
    /// Each page's current contribution to the digest.
    private var contributions: [UInt64]
    /// Their sum: the digest of the destination's memory now.
    private(set) var value: UInt64 = 0
    /// Time spent hashing landed pages, for the report's verify_ms.
    private(set) var nanoseconds: UInt64 = 0
    private let zeroHash = PageSampler.hashPage(nil)

    /// A fresh destination: every page a hole, hence zero.
    init(pageCount: Int) {
        let zeroHash = self.zeroHash
        contributions = (0..<pageCount).map { MemoryDigest.contribution(page: $0, hash: zeroHash) }
        value = contributions.reduce(0, &+)
    }

    /// Pages `pages` of `memory` were just written with what the source sent.
    mutating func landed(_ pages: Range<Int>, in memory: GuestMemory) {
        landed(pages, from: UnsafeRawPointer(memory.base + pages.lowerBound * 4096))
    }

    /// Pages `pages` were just written with the bytes at `source` (still in cache).
    mutating func landed(_ pages: Range<Int>, from source: UnsafeRawPointer) {
        let start = MonotonicClock.nanoseconds()
        for (index, page) in pages.enumerated() {
            let hash = PageSampler.hashPage(source + index * 4096)
            replace(page, with: MemoryDigest.contribution(page: page, hash: hash))
        }
        nanoseconds += MonotonicClock.nanoseconds() - start
    }

    /// Page `page` is all zero now.
    mutating func zeroed(_ page: Int) {
        replace(page, with: MemoryDigest.contribution(page: page, hash: zeroHash))
    }

    @inline(__always)
    private mutating func replace(_ page: Int, with contribution: UInt64) {
        value = value &- contributions[page] &+ contribution
        contributions[page] = contribution
    }
}
