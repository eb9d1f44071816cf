import Dispatch
import Synchronization

/// The guest's pace (pages per second, per vCPU) over about the last half second, at hand
/// without waiting. A migration's report compares the guest's pace during the migration with
/// its pace before; measured on demand, that cost every `dirtymig migrate` half a second of
/// sleeping before it began (an idle 4 GiB VM: 18 ms of migration, 630 ms from the command to
/// its reply). A timer reads the guest's counters every 125 ms instead (a few words of guest
/// memory per vCPU; no thread of its own).
public final class GuestPaceHistory: Sendable {
    static let periodMilliseconds = 125
    static let windowNanoseconds: UInt64 = 500_000_000
    /// The shortest window `recentPace` accepts when the VM has only just started.
    static let shortestWindowNanoseconds: UInt64 = 50_000_000

    private struct Sample { var time: UInt64; var pages: [UInt64] }
    private let samples = Mutex<[Sample]>([])
    private let read: @Sendable () -> [UInt64]
    private let timer = Mutex<RunningTimer?>(nil)

    /// A started timer source. @unchecked: a dispatch source is thread-safe but not marked
    /// Sendable; it is only cancelled, under `timer`.
    private final class RunningTimer: @unchecked Sendable {
        let source: DispatchSourceTimer
        init(_ source: DispatchSourceTimer) { self.source = source }
    }

    /// `read`: each vCPU's guest page count now.
    init(read: @escaping @Sendable () -> [UInt64]) { self.read = read }

    func start() {
        let source = DispatchSource.makeTimerSource(queue: .global(qos: .utility))
        source.schedule(deadline: .now(), repeating: .milliseconds(Self.periodMilliseconds))
        source.setEventHandler { [self] in record() }
        source.resume()
        let running = RunningTimer(source)
        timer.withLock { $0?.source.cancel(); $0 = running }
    }

    /// Stops the timer (the last samples stay).
    func stop() {
        timer.withLock { $0?.source.cancel(); $0 = nil }
    }

    private func record() {
        let sample = Sample(time: MonotonicClock.nanoseconds(), pages: read())
        samples.withLock { samples in
            samples.append(sample)
            // Enough for the window and one period beyond it.
            if samples.count > 6 { samples.removeFirst(samples.count - 6) }
        }
    }

    /// Each vCPU's pages per second from the newest sample at least half a second old (or, in a
    /// VM that started less than that ago, the oldest one at least 50 ms old) until now. Waits
    /// for such a sample only in a VM that has only just started.
    public func recentPace() -> [Double] { measuredPace() ?? read().map { _ in 0 } }

    /// The pace per vCPU over the recent window; nil when there is no history to measure it by.
    public func measuredPace() -> [Double]? {
        let deadline = MonotonicClock.nanoseconds() + 2 * Self.windowNanoseconds
        while true {
            let now = MonotonicClock.nanoseconds()
            let current = read()
            let base = samples.withLock { samples in
                samples.last { now - $0.time >= Self.windowNanoseconds }
                    ?? samples.first { now - $0.time >= Self.shortestWindowNanoseconds }
            }
            if let base {
                let seconds = Double(now - base.time) / 1e9
                return zip(current, base.pages).map { Double($0 &- $1) / seconds }
            }
            guard now < deadline else { return nil }
            MonotonicClock.sleep(nanoseconds: 10_000_000)
        }
    }
}
