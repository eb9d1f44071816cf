import Dispatch
import Synchronization

/// The primary's heartbeats, from a thread of their own.
///
/// A standby takes over after --failover-after without a byte from its primary, so the primary
/// must send something at least every fifth of that, whatever it is doing. The epoch thread
/// used to send the heartbeats itself, between epochs; but it spends part of every epoch in a
/// checkpoint's pause (stopping the vCPUs, collecting the dirty list, copying), and that pause
/// has no upper bound: on a loaded two-core host a first checkpoint once spent 516 ms stopping
/// its vCPUs, and a resync after a ring overrun copies every data page with the vCPUs stopped.
/// Longer than --failover-after (500 ms there), the standby took over from a primary that
/// lived: two VMs. Here, heartbeats go out whenever nothing else has for an interval, and
/// never in the middle of another frame: the epoch thread's sends hold `line`, and a heartbeat
/// that finds it held is not needed (bytes are on their way).
final class PrimaryHeartbeat: Sendable {
    private let channel: MigrationChannel
    /// How often the standby wants to hear from us, read at every beat (its hello reply sets it).
    private let interval: @Sendable () -> UInt64
    /// Held for every send on the connection: the epoch thread's frames and a heartbeat.
    /// Holds when the last send ended (monotonic ns).
    private let line: Mutex<UInt64>
    private let ended = Atomic<Bool>(false)
    private let wake = DispatchSemaphore(value: 0)

    /// Starts the heartbeats of one connection; they go on until `end`.
    static func start(channel: MigrationChannel, interval: @escaping @Sendable () -> UInt64) -> PrimaryHeartbeat {
        let heartbeat = PrimaryHeartbeat(channel: channel, interval: interval)
        _ = OSThread(name: "repl-heartbeat") { heartbeat.run() }
        return heartbeat
    }

    private init(channel: MigrationChannel, interval: @escaping @Sendable () -> UInt64) {
        self.channel = channel
        self.interval = interval
        line = Mutex(MonotonicClock.nanoseconds())
    }

    /// One send of the epoch thread's (a whole checkpoint, or the end of replication): no
    /// heartbeat goes out in its middle, and the next one is due an interval after its end.
    func sending<Sent>(_ body: () throws(MigrationError) -> Sent) throws(MigrationError) -> Sent where Sent: Sendable {
        try line.withLock { lastSend throws(MigrationError) -> Sent in
            defer { lastSend = MonotonicClock.nanoseconds() }
            return try body()
        }
    }

    /// No heartbeat starts after this. One under way may finish; a send through `sending`
    /// after `end` waits for it, so that nothing follows the end of replication. Does not wait
    /// itself: on a cut link a heartbeat can sit in a full socket buffer for the send timeout.
    func end() {
        ended.store(true, ordering: .releasing)
        wake.signal()
    }

    private func run() {
        while !ended.load(ordering: .acquiring) {
            let period = interval()
            // nil: the epoch thread is sending; its bytes say we live, so look again later.
            let due = line.withLockIfAvailable { lastSend -> UInt64? in
                guard !ended.load(ordering: .acquiring) else { return nil }
                let now = MonotonicClock.nanoseconds()
                if now >= lastSend + period {
                    // A failed send leaves it to the epoch and listening threads to find the
                    // connection broken: they decide what a loss means.
                    guard (try? channel.send(.heartbeat, EpochFrame(epoch: 0).encode())) != nil else {
                        ended.store(true, ordering: .releasing)
                        return nil
                    }
                    lastSend = MonotonicClock.nanoseconds()
                }
                return lastSend + period
            } ?? nil
            let now = MonotonicClock.nanoseconds()
            let sleep = due.map { $0 > now ? $0 - now : 0 } ?? period / 4
            _ = wake.wait(timeout: .now() + .nanoseconds(Int(max(sleep, 1_000_000))))
        }
    }
}
