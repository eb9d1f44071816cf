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
