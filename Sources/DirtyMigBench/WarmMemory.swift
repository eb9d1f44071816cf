import DirtyMigCore
import Foundation
import Glibc

/// The destination's memory temperature, a condition of the migration benchmark.
///
/// This machine is itself a guest (Firecracker, nested KVM) with free page reporting: memory the
/// kernel freed more than about 2 s ago has been handed back to the outer host, and the first
/// write to it costs an outer fault (machine notes: 0.4 GB/s on a just-booted machine, 1.5-1.9
/// GB/s warm). A receiver writes every page into fresh memory, so the same migration takes one
/// time or twice that depending on what the machine did seconds before. `.warmed` touches and
/// frees the scenario's data size just before the migration starts (for dirtymig and QEMU
/// alike), as a host whose memory was not given away would have it; `.asGiven` does nothing.
enum DestinationMemory: String, CaseIterable {
    case asGiven = "as given"
    case warmed = "warmed"

    /// Touches `bytes` of anonymous memory and frees it, so that the next allocations get pages
    /// the outer host still backs. Returns how long that took (not part of any migration time).
    @discardableResult
    static func warm(_ bytes: UInt64) -> Double {
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
