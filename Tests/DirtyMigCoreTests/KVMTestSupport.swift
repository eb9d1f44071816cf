import DirtyMigCore
import Foundation
import XCTest

/// Tests that need a working /dev/kvm call this first: where KVM is missing it skips the test
/// and prints why, so a green run on a machine without KVM is visibly not a KVM run.
func requireKVM(file: StaticString = #filePath, line: UInt = #line) throws -> KVMSystem {
    do {
        return try KVMSystem()
    } catch {
        let reason = "skipped: needs a working /dev/kvm (\(error))"
        FileHandle.standardError.write(Data((reason + "\n").utf8))
        throw XCTSkip(reason, file: file, line: line)
    }
}

/// Tests of post-copy's demand faults call this: where userfaultfd cannot report missing pages
/// of shared memory (guest RAM is a memfd), it skips the test and prints why.
func requireUserfaultfd(file: StaticString = #filePath, line: UInt = #line) throws {
    if let reason = UserFaultFD.unavailableReason() {
        let message = "skipped: needs userfaultfd with missing faults on shared memory (\(reason))"
        FileHandle.standardError.write(Data((message + "\n").utf8))
        throw XCTSkip(message, file: file, line: line)
    }
}

extension Machine {
    /// Waits until every vCPU has reached its workload loop (or fails the test).
    func waitForGuest(timeout: Double = 10, file: StaticString = #filePath, line: UInt = #line) {
        let deadline = MonotonicClock.seconds() + timeout
        while MonotonicClock.seconds() < deadline {
            if let failure = events.firstFailure {
                XCTFail("guest failed: \(failure)", file: file, line: line)
                return
            }
            if guestStats().bootedVCPUs >= configuration.vcpuCount { return }
            usleep(10_000)
        }
        XCTFail("guest did not start all \(configuration.vcpuCount) vCPUs within \(timeout) s", file: file, line: line)
    }

    /// A snapshot of the tracker's counters (after a sync) and the guest's page counters.
    func counterSnapshot() throws -> DirtyCounterSnapshot {
        try tracker?.sync()
        let counters = tracker?.counters()
        return DirtyCounterSnapshot(timeNanoseconds: counters?.timeNanoseconds ?? MonotonicClock.nanoseconds(),
                                    unixTime: WallClock.unixSeconds(), totalDirtyPages: counters?.totalPages,
                                    vcpuDirtyPages: counters?.vcpuPages,
                                    guestPages: guestStats().vcpus.map(\.pages))
    }
}

let MiB: UInt64 = 1 << 20
let GiB: UInt64 = 1 << 30

func writer(_ size: UInt64, rate: UInt64, pattern: AccessPattern = .sequential, offset: UInt64 = 0) -> VCPUWorkload {
    VCPUWorkload(kind: .write, pattern: pattern, offset: offset, size: size, rateBytesPerSecond: rate, seed: 1)
}

func reader(_ size: UInt64, offset: UInt64) -> VCPUWorkload {
    VCPUWorkload(kind: .read, offset: offset, size: size, seed: 2)
}

/// A thread's scheduling counters from `/proc/self/task/TID/schedstat`: nanoseconds on a CPU,
/// nanoseconds runnable but waiting for one.
enum ThreadSchedule {
    struct Counters {
        var onCPUSeconds: Double
        var waitingSeconds: Double
        /// Of the time the thread wanted a CPU, the share it had one.
        var onCPUShare: Double { onCPUSeconds / max(onCPUSeconds + waitingSeconds, 1e-9) }
        static func - (end: Counters, start: Counters) -> Counters {
            Counters(onCPUSeconds: end.onCPUSeconds - start.onCPUSeconds, waitingSeconds: end.waitingSeconds - start.waitingSeconds)
        }
    }

    /// The ids of this process's threads with that name.
    static func threads(named name: String) -> Set<Int> {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return Set(tasks.filter {
            (try? String(contentsOfFile: "/proc/self/task/\($0)/comm", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines) == name
        }.compactMap { Int($0) })
    }

    static func counters(_ thread: Int) -> Counters? {
        guard let text = try? String(contentsOfFile: "/proc/self/task/\(thread)/schedstat", encoding: .utf8) else { return nil }
        let fields = text.split(separator: " ").compactMap { Double($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        guard fields.count >= 2 else { return nil }
        return Counters(onCPUSeconds: fields[0] / 1e9, waitingSeconds: fields[1] / 1e9)
    }

    /// Samples a thread every 50 ms until stopped, so that a thread that ends (a migrated VM's
    /// vCPU) still has its last counters: `stop()` gives what it used since the start.
    final class Sampler: @unchecked Sendable {
        // @unchecked: `first`, `last` and `running` are used under `lock`.
        private let lock = NSLock()
        private var first: Counters?
        private var last: Counters?
        private var running = true

        init(thread id: Int) {
            first = ThreadSchedule.counters(id)
            last = first
            Thread { [self] in
                while lock.withLock({ running }) {
                    if let now = ThreadSchedule.counters(id) { lock.withLock { last = now } }
                    Thread.sleep(forTimeInterval: 0.05)
                }
            }.start()
        }

        func stop() -> Counters {
            lock.withLock {
                running = false
                guard let first, let last else { return Counters(onCPUSeconds: 0, waitingSeconds: 0) }
                return last - first
            }
        }
    }
}

/// This process's resident memory (VmRSS), in bytes; 0 if /proc does not say.
func residentBytes() -> UInt64 {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }),
          let kib = UInt64(line.split(separator: " ").dropFirst().first ?? "") else { return 0 }
    return kib * 1024
}
