import Synchronization

/// Until when each vCPU must stay out of the guest: the one place every throttle writes its
/// penalty (a dirty-limit sleep, a quota exit, an auto-converge timeslice) and the vCPU thread
/// reads before each KVM_RUN. A throttle sets a deadline, then kicks the vCPU; the vCPU thread
/// waits out the latest deadline anyone set (a pause or a stop still ends the wait at once).
public final class VCPUHolds: Sendable {
    private struct Slot {
        var until: UInt64 = 0
        /// Nanoseconds this vCPU actually spent held (accounted by its thread).
        var heldNanoseconds: UInt64 = 0
        /// Under a dirty-rate ceiling: its thread runs it in short slices (see VCPURunner).
        var paced = false
    }
    private let slots: Mutex<[Slot]>

    public init(vcpuCount: Int) {
        slots = Mutex([Slot](repeating: Slot(), count: vcpuCount))
    }

    /// Keeps `vcpu` out of the guest until `deadline` (monotonic ns), or longer if another
    /// throttle already asked for longer.
    public func hold(_ vcpu: Int, until deadline: UInt64) {
        slots.withLock { $0[vcpu].until = max($0[vcpu].until, deadline) }
    }

    /// Lets a held vCPU go at once (its throttle was removed).
    public func release(_ vcpu: Int) {
        slots.withLock { $0[vcpu].until = 0 }
    }

    /// The deadline if it is still in the future, else nil.
    public func deadline(_ vcpu: Int, now: UInt64) -> UInt64? {
        slots.withLock { $0[vcpu].until > now ? $0[vcpu].until : nil }
    }

    /// Marks a vCPU as under (or no longer under) a dirty-rate ceiling.
    func setPaced(_ vcpu: Int, _ paced: Bool) {
        slots.withLock { $0[vcpu].paced = paced }
    }

    func isPaced(_ vcpu: Int) -> Bool {
        slots.withLock { $0[vcpu].paced }
    }

    func accountHeld(_ vcpu: Int, nanoseconds: UInt64) {
        slots.withLock { $0[vcpu].heldNanoseconds &+= nanoseconds }
    }

    /// Cumulative time each vCPU spent held, in nanoseconds.
    public func heldNanoseconds() -> [UInt64] {
        slots.withLock { $0.map(\.heldNanoseconds) }
    }
}
