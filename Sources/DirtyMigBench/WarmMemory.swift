import DirtyMigCore
import Foundation
import Glibc

/// `--warm`: the destination's memory made warm just before a migration, the same way for every
/// migrator.
///
/// This machine is itself a guest (Firecracker, nested KVM) with free page reporting: memory the
/// kernel freed more than about 2 s ago has been handed back to the outer host, and the first
/// write to it costs an outer fault (machine notes: 0.4 GB/s on a just-booted machine, 1.5-1.9
/// GB/s warm). A receiver writes every page into fresh memory, so the same migration takes one
/// time or twice that depending on what the machine did seconds before. Warming touches and
/// frees the scenario's data size in the benchmark's own process, right before `dirtymig
/// migrate` is started or QEMU's pace window and `migrate` begin (both then wait 0.5 s before
/// their clock starts), so both destinations find the same pool of pages still backed, as a
/// host whose memory was not given away would have them.
enum WarmMemory {
    /// Touches `bytes` of anonymous memory and frees it. Returns how long that took (not part of
    /// any migration time).
    @discardableResult
    static func touchAndFree(_ bytes: UInt64) -> Double {
        guard bytes > 0 else { return 0 }
        let start = MonotonicClock.seconds()
        let size = Int(bytes)
        guard let base = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              base != MAP_FAILED else { return 0 }
        // MADV_POPULATE_WRITE (Linux 5.14) faults it all in one call; a store per page otherwise.
        if madvise(base, size, 23) != 0 {
            for offset in stride(from: 0, to: size, by: 4096) { base.storeBytes(of: 1, toByteOffset: offset, as: UInt8.self) }
        }
        munmap(base, size)
        return MonotonicClock.seconds() - start
    }
}
