/// The values a `check` vCPU writes (workload.c's check_value; layout.h gives the rule), so the
/// host can say what the guest's memory and its output checksums must be.
///
/// Each pass visits every page of the working set once; a visit reads the page's first and last
/// 8-byte words, counts a mismatch if either is not the page's value of the previous pass (0
/// before the first pass: fresh guest memory is zero), then writes this pass's value to both.
/// A value depends on the page, the pass and the vCPU's seed, so a page that was lost (still
/// 0), stale (an older pass's value, or another page's) or torn (one end new, the other old) is
/// a mismatch.
public enum CheckWorkload {
    /// The one multiplier of the mix (odd, so every step is a bijection).
    public static let multiplier: UInt64 = 0x9E37_79B9_7F4A_7C15

    /// The value of page `page` (0-based within the working set) written in pass `pass`
    /// (1-based); pass 0 is the zero of fresh memory. Never 0 after pass 0.
    public static func value(page: UInt64, pass: UInt64, seed: UInt64) -> UInt64 {
        guard pass > 0 else { return 0 }
        return mix((page &* multiplier) ^ mix(seed &+ pass &* multiplier)) | 1
    }

    /// xorshift-multiply rounds, each a bijection.
    static func mix(_ value: UInt64) -> UInt64 {
        var x = value
        x ^= x >> 32
        x = x &* multiplier
        x ^= x >> 29
        x = x &* multiplier
        x ^= x >> 32
        return x
    }

    /// The checksum a vCPU reports once `passes` passes are complete: the wrapping sum of the
    /// first words it read in the last of them, which are the values of the pass before (0
    /// while no pass is complete, and after the first one, which read fresh memory).
    public static func checksum(pages: UInt64, passes: UInt64, seed: UInt64) -> UInt64 {
        guard passes > 1 else { return 0 }
        var sum: UInt64 = 0
        for page in 0..<pages { sum &+= value(page: page, pass: passes - 1, seed: seed) }
        return sum
    }
}
