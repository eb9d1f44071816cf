import Foundation
import Glibc

/// A 64-bit digest of all of guest RAM, for `migrate --verify`: both sides compute it at the
/// pause point and must agree. Each page's hash is mixed with its index and the results summed,
/// so the order of work does not matter and two threads share it. Never-written ranges (memfd
/// holes) are hashed as zero pages without reading them, so they cost no page faults.
public enum MemoryDigest {
    public static func compute(_ memory: GuestMemory, threads: Int = 2) -> UInt64 {
        let pageCount = memory.pageCount
        let flags = memory.dataPages()
        let zeroHash = PageSampler.hashPage(nil)
        let base = UInt(bitPattern: memory.base)   // an address, to share with the worker threads
        let parts = max(1, threads)
        let sums = Mutex([UInt64](repeating: 0, count: parts))
        DispatchQueue.concurrentPerform(iterations: parts) { part in
            var sum: UInt64 = 0
            let start = pageCount * part / parts, end = pageCount * (part + 1) / parts
            for page in start..<end {
                let hash = flags.contains(page) ? PageSampler.hashPage(UnsafeRawPointer(bitPattern: base + UInt(page) * 4096)) : zeroHash
                sum &+= contribution(page: page, hash: hash)
            }
            sums.withLock { $0[part] = sum }
        }
        return sums.withLock { $0.reduce(0, &+) }
    }

    /// How long `compute` will take for `memory`, estimated by timing the hash over samples of
    /// its data pages: 24 spans of 64 consecutive pages spread over all of them, in three rounds
    /// of 8 spans. Each round reads other pages: rounds that re-read the same pages time the
    /// cache, not memory (that estimated 18 ms for a hash that took 41). Spans, not single
    /// pages, because compute streams through memory and the prefetcher helps it: single pages
    /// estimated twice what it took. The fastest round counts, so that one preempted by a busy
    /// vCPU does not. One thread's rate, not two: hashing is bound by memory bandwidth, and a
    /// second thread gained 15 % (768 MiB of data: 36 ms with one thread, 31 with two; the
    /// estimate said 35).
    public static func estimateSeconds(_ memory: GuestMemory) -> Double {
        let flags = memory.dataPages()
        let total = flags.count
        guard total > 0 else { return 0 }
        let spans = 24, spanPages = 64
        var samples: [[Int]] = [[], [], []]
        var seen = 0
        for run in flags.runs() {
            for page in run {
                let span = seen * spans / total
                if seen - (span * total + spans - 1) / spans < spanPages { samples[span % 3].append(page) }
                seen += 1
            }
        }
        var fastest = Double.infinity
        var sum: UInt64 = 0
        for sample in samples where !sample.isEmpty {
            let start = MonotonicClock.nanoseconds()
            for page in sample { sum &+= PageSampler.hashPage(UnsafeRawPointer(memory.base + page * 4096)) }
            fastest = min(fastest, Double(MonotonicClock.nanoseconds() - start) / 1e9 / Double(sample.count))
        }
        hashSink.store(sum, ordering: .relaxed)   // so the optimizer cannot drop the hashing
        return fastest * Double(total)
    }

    /// What one page adds to the digest: its hash mixed with its index, so that the same bytes
    /// at another page count differently.
    @inline(__always)
    static func contribution(page: Int, hash: UInt64) -> UInt64 {
        mix(hash ^ UInt64(page) &* 0x9E37_79B9_7F4A_7C15)
    }

    /// A 64-bit hash of a byte string (the saved vCPU and device state).
    public static func hash(_ bytes: [UInt8]) -> UInt64 {
        var state: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in bytes { state = (state ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return mix(state ^ UInt64(bytes.count))
    }

    @inline(__always)
    static func mix(_ value: UInt64) -> UInt64 {
        var z = value
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

import Synchronization

/// Where the hashing speed estimate stores its result, so that the timed work is not optimized away.
private let hashSink = Atomic<UInt64>(0)
