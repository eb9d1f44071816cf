import Glibc

/// `dirtyrate --mode sample`: QEMU's page-sampling idea, for any VM. Hash a random sample of
/// pages, wait, hash them again: the share that changed, times RAM, over the interval, is the
/// dirty rate. Nothing is write-protected, so the guest pays nothing. It sees contents, not
/// writes: a page rewritten with the same bytes is not counted, and a page written twice counts
/// once (like every tracker, per interval).
///
/// Pages that were never populated (memfd holes) are not read: mincore says so, and they hash as
/// a zero page would.
public struct PageSampler: Sendable {
    /// Sampled pages per GiB of RAM. QEMU defaults to 512 (at most 16384); we take 32768 because
    /// the estimate's relative error is about 1/sqrt(dirty samples): a writer dirtying 3 % of RAM
    /// per second gives ~1000 hits, about 3 % error, and hashing 128 MiB per GiB is cheap next to
    /// a one-second interval.
    public var pagesPerGiB: Int
    public var seed: UInt64

    public init(pagesPerGiB: Int = 32768, seed: UInt64 = 0x5EED) {
        self.pagesPerGiB = pagesPerGiB
        self.seed = seed
    }

    /// A sample's hashes, each with the time its page was read.
    public struct Sample: Sendable {
        public var pages: [Int]
        public var hashes: [UInt64]
        /// When each page was read (CLOCK_MONOTONIC ns). Per page, because the hashing thread
        /// can be preempted in the middle of a pass and pages' windows then differ.
        public var times: [UInt64]
        /// The mean of `times`: when, on average, the sample looked at memory.
        public var timeNanoseconds: UInt64
        public var startNanoseconds: UInt64
        public var endNanoseconds: UInt64
    }

    /// The pages to sample, in the order to hash them: a random order, not address order. A pass
    /// takes tens of milliseconds, and a guest that writes sequentially crosses the sampled
    /// addresses in order too; hashed in address order, the pages at the writer's head would all
    /// be read at the same point of the pass (early or late, wherever the head happens to be),
    /// which shifts the measured window by up to half a pass (±5-10 % of a 1 s interval, measured).
    /// In random order each page's read time is independent of its address, so per-page windows
    /// average out whatever the access pattern.
    public func choosePages(pageCount: Int) -> [Int] {
        let count = min(pageCount, max(1, Int((Double(pageCount) * 4096 / Double(1 << 30)) * Double(pagesPerGiB))))
        var generator = SplitMix64(state: seed ^ UInt64(pageCount))
        var chosen = Set<Int>()
        while chosen.count < count { chosen.insert(Int(generator.next() % UInt64(pageCount))) }
        return chosen.sorted().shuffled(using: &generator)
    }

    /// Hashes the pages, noting when each was read.
    public func hash(_ memory: GuestMemory, pages: [Int]) -> Sample {
        let started = MonotonicClock.nanoseconds()
        let resident = residency(memory)
        var hashes = [UInt64](repeating: 0, count: pages.count)
        var times = [UInt64](repeating: 0, count: pages.count)
        let zeroHash = PageSampler.hashPage(nil)
        var sum: Double = 0
        for (index, page) in pages.enumerated() {
            if let resident, resident[page] & 1 == 0 {
                hashes[index] = zeroHash
            } else {
                hashes[index] = PageSampler.hashPage(UnsafeRawPointer(memory.base + page * 4096))
            }
            times[index] = MonotonicClock.nanoseconds()
            sum += Double(times[index] - started)
        }
        let mean = started + UInt64(sum / Double(max(pages.count, 1)))
        return Sample(pages: pages, hashes: hashes, times: times, timeNanoseconds: mean, startNanoseconds: started,
                      endNanoseconds: MonotonicClock.nanoseconds())
    }

    /// Dirty pages per second of all RAM, estimated from two samples of the same pages: the share
    /// that changed, over the mean of the pages' own windows.
    public static func dirtyPagesPerSecond(from start: Sample, to end: Sample, pageCount: Int) -> Double {
        var changed = 0
        var window: Double = 0
        for index in start.hashes.indices {
            if start.hashes[index] != end.hashes[index] { changed += 1 }
            window += Double(end.times[index] &- start.times[index])
        }
        let count = Double(max(start.pages.count, 1))
        let seconds = max(window / count / 1e9, 1e-9)
        return Double(changed) / count * Double(pageCount) / seconds
    }

    /// 64-bit hash of one 4 KiB page (nil = an all-zero page), four independent lanes so the
    /// multiply latency overlaps.
    static func hashPage(_ page: UnsafeRawPointer?) -> UInt64 {
        var lanes: (UInt64, UInt64, UInt64, UInt64) = (0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F,
                                                      0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5)
        let prime: UInt64 = 0x9FB2_1C65_1E98_DF25
        for word in stride(from: 0, to: 512, by: 4) {
            let w0 = page?.load(fromByteOffset: word * 8, as: UInt64.self) ?? 0
            let w1 = page?.load(fromByteOffset: word * 8 + 8, as: UInt64.self) ?? 0
            let w2 = page?.load(fromByteOffset: word * 8 + 16, as: UInt64.self) ?? 0
            let w3 = page?.load(fromByteOffset: word * 8 + 24, as: UInt64.self) ?? 0
            lanes.0 = (lanes.0 ^ w0) &* prime
            lanes.1 = (lanes.1 ^ w1) &* prime
            lanes.2 = (lanes.2 ^ w2) &* prime
            lanes.3 = (lanes.3 ^ w3) &* prime
        }
        return lanes.0 ^ (lanes.1 >> 7) ^ (lanes.2 << 11) ^ (lanes.3 >> 17)
    }

    /// mincore over all of RAM: bit 0 of each byte says whether the page is populated.
    private func residency(_ memory: GuestMemory) -> [UInt8]? {
        var vector = [UInt8](repeating: 0, count: memory.pageCount)
        let result = vector.withUnsafeMutableBufferPointer {
            mincore(memory.base, Int(memory.size), $0.baseAddress)
        }
        return result == 0 ? vector : nil
    }
}

/// A small, fast, seedable generator (for choosing sample pages reproducibly).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
