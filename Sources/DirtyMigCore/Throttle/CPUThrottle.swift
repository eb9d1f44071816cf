import Synchronization

/// Auto-converge, as QEMU does it (its `cpu-throttle.c`): at a throttle of p %, every vCPU runs
/// a 10 ms timeslice and then sleeps p / (100 - p) timeslices, whether it writes or only reads.
/// A timer thread ticks every timeslice / (1 - p), holds every vCPU for its sleep and kicks it.
/// This is the baseline the dirty limit and dirty quota are measured against.
public final class CPUThrottle: @unchecked Sendable {
    // @unchecked: `percent` is atomic; `thread` is touched only under `lock`.
    public static let timesliceNanoseconds: UInt64 = 10_000_000
    private let holds: VCPUHolds
    private let vcpuCount: Int
    private let kick: @Sendable (Int) -> Void
    private let percentage = Atomic<Int>(0)
    private let lock = Mutex<OSThread?>(nil)

    init(holds: VCPUHolds, vcpuCount: Int, kick: @escaping @Sendable (Int) -> Void) {
        self.holds = holds
        self.vcpuCount = vcpuCount
        self.kick = kick
    }

    /// The throttle in percent (0 = off).
    public var percent: Int { percentage.load(ordering: .relaxed) }

    /// Sets the throttle to `percent` (clamped to 0...99; 0 turns it off and releases the vCPUs).
    public func set(percent: Int) {
        let value = min(max(percent, 0), 99)
        percentage.store(value, ordering: .relaxed)
        lock.withLock { thread in
            if value > 0 && thread == nil {
                thread = OSThread(name: "cpu-throttle") { [self] in tickLoop() }
            } else if value == 0, let running = thread {
                running.join()
                thread = nil
                for vcpu in 0..<vcpuCount { holds.release(vcpu) }
            }
        }
    }

    private func tickLoop() {
        while true {
            let pct = percentage.load(ordering: .relaxed)
            guard pct > 0 else { return }
            let share = Double(pct) / 100
            let now = MonotonicClock.nanoseconds()
            let sleep = UInt64(Double(Self.timesliceNanoseconds) * share / (1 - share))
            for vcpu in 0..<vcpuCount {
                holds.hold(vcpu, until: now + sleep)
                kick(vcpu)
            }
            // Wake at least every 10 ms so that turning the throttle off takes effect promptly.
            let period = UInt64(Double(Self.timesliceNanoseconds) / (1 - share))
            var slept: UInt64 = 0
            while slept < period && percentage.load(ordering: .relaxed) > 0 {
                let step = min(period - slept, Self.timesliceNanoseconds)
                MonotonicClock.sleep(nanoseconds: step)
                slept += step
            }
        }
    }
}
