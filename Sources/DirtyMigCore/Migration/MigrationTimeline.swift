import Foundation
import Synchronization

/// Samples a migration's progress about every 100 ms on its own thread: the report's
/// `timeline` (what `--plot` draws) and the live throughput `query-migrate` shows from the first
/// batch on (a per-pass figure stayed 0 for all of pass 1). The live figure is over the last
/// second: under a low --bandwidth a batch is a quarter second's worth, so 100 ms windows read
/// 0 and 10 MiB/s by turns at a 4 MiB/s cap.
///
/// Bounded: past `maxSamples` every other sample is dropped and the interval doubles, so a
/// migration of a day keeps a few thousand points, not 864,000.
final class MigrationTimeline: Sendable {
    static let maxSamples = 4000
    private let samples = Mutex<[MigrationSample]>([])
    private let running = Atomic<Bool>(true)
    private let finished = DispatchSemaphore(value: 0)
    /// Ends the thread's wait for its next sample at once: `finish` must not wait out an
    /// interval (an idle 4 GiB VM's 18 ms migration replied 104 ms after it began).
    private let wake = DispatchSemaphore(value: 0)

    /// `read` gives the live progress; `cpuThrottlePercent` auto-converge's setting (0 off);
    /// `heldNanoseconds` each vCPU's cumulative time held by a throttle; `dirtyPages` the
    /// tracker's cumulative count (nil where it only counts at collections).
    ///
    /// Each sample's `held_percent` is the share of the time since the sample before that each
    /// vCPU spent held, measured here from the cumulative counts: the ring tracker's own
    /// "last whole second" figure (what `limit` shows) is refreshed only when it harvests for a
    /// collection, so it lagged the throttle by up to a pass (a throttle that started at 1.04 s
    /// read 0 until the pass ended at 1.9 s, then held the same value for the whole next pass).
    init(started: UInt64, read: @escaping @Sendable () -> MigrationProgress,
         publish: @escaping @Sendable (_ throughputBytesPerSecond: Double, _ dirtyPagesPerSecond: Double?) -> Void,
         cpuThrottlePercent: @escaping @Sendable () -> Int, heldNanoseconds: @escaping @Sendable () -> [UInt64],
         dirtyPages: @escaping @Sendable () -> UInt64?) {
        _ = OSThread(name: "migr-timeline") { [self] in
            var interval: UInt64 = 100_000_000
            var last = (time: started, sent: UInt64(0), dirty: dirtyPages(), held: heldNanoseconds())
            var recent: [(time: UInt64, sent: UInt64)] = [(started, 0)]   // the last second's samples
            while running.load(ordering: .relaxed) {
                _ = wake.wait(timeout: .now() + .nanoseconds(Int(interval)))
                guard running.load(ordering: .relaxed) else { break }
                let now = MonotonicClock.nanoseconds()
                let progress = read()
                let dirty = dirtyPages()
                let held = heldNanoseconds()
                let seconds = max(Double(now - last.time) / 1e9, 1e-6)
                let throughput = Double(progress.sentBytes &- last.sent) / seconds
                let dirtyRate = dirty.flatMap { now in last.dirty.map { Double(now &- $0) / seconds } }
                while recent.count > 1, now - recent[1].time >= 1_000_000_000 { recent.removeFirst() }
                let window = max(Double(now - recent[0].time) / 1e9, 1e-6)
                publish(Double(progress.sentBytes &- recent[0].sent) / window, dirtyRate)
                recent.append((now, progress.sentBytes))
                let sample = MigrationSample(
                    seconds: Double(now - started) / 1e9, phase: progress.phase, pass: progress.iteration,
                    sentBytes: progress.sentBytes, remainingBytes: progress.remainingPages * 4096,
                    throughputMiBPerSecond: throughput / 1_048_576,
                    dirtyPagesPerSecond: dirtyRate,
                    expectedDowntimeSeconds: progress.expectedDowntimeSeconds,
                    cpuThrottlePercent: cpuThrottlePercent(),
                    heldPercent: Self.heldPercent(now: held, before: last.held, nanoseconds: now - last.time),
                    paused: progress.phase == "stop-and-copy" || progress.phase == "switching to post-copy")
                samples.withLock { samples in
                    samples.append(sample)
                    if samples.count > Self.maxSamples {
                        samples = samples.enumerated().filter { $0.offset % 2 == 0 }.map(\.element)
                        interval *= 2
                    }
                }
                last = (now, progress.sentBytes, dirty, held)
            }
            finished.signal()
        }
    }

    /// Each vCPU's share of `nanoseconds` spent held, in percent, from two cumulative readings.
    static func heldPercent(now: [UInt64], before: [UInt64], nanoseconds: UInt64) -> [Double] {
        guard now.count == before.count, nanoseconds > 0 else { return [] }
        return zip(now, before).map { min(100, Double($0 &- $1) / Double(nanoseconds) * 100) }
    }

    /// Stops sampling and returns the samples, with `final` (the state at the end) last.
    func finish(final: MigrationSample) -> [MigrationSample] {
        running.store(false, ordering: .relaxed)
        wake.signal()
        finished.wait()
        // A sample the thread took after the end (while the report was being finished) is dropped.
        return samples.withLock { $0 }.filter { $0.seconds < final.seconds } + [final]
    }
}
