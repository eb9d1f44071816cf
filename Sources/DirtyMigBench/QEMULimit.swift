import DirtyMigCore
import DirtyMigTestSupport
import Foundation

/// QEMU 7.2's `set-vcpu-dirty-limit` on the same guest: what `query-vcpu-dirty-limit` reports
/// each second, whether the guest's own counter keeps moving, and the reader's pace.
struct QEMULimitResult {
    /// current-rate per second, in MiB/s.
    var samples: [Double]
    /// vCPU 0's own counter moved in every second.
    var running: Bool
    /// The reader's pages/s during the limit over before.
    var reader: Double
}

func runQEMULimit(workloads: [VCPUWorkload], mbPerSecond: Int, seconds: Int = 8) throws -> QEMULimitResult {
    let guest = try QEMUGuest(memory: 1 << 30, workloads: workloads, dirtyRingSize: 4096)
    let qmp = try guest.launch("vm")
    try guest.waitForWorkload(qmp, finishedPasses: false, warmupSeconds: 1.5)
    func pages() throws -> (UInt64, UInt64, Double) {
        let vcpus = try guest.stats(qmp).vcpus
        return (vcpus[0].pages, vcpus[1].pages, MonotonicClock.seconds())
    }
    let first = try pages()
    Thread.sleep(forTimeInterval: 1)
    var last = try pages()
    let readerBefore = Double(last.1 &- first.1) / (last.2 - first.2)
    try qmp.execute("set-vcpu-dirty-limit", ["cpu-index": 0, "dirty-rate": .number(mbPerSecond)])
    var samples: [Double] = [], running = true, readers: [Double] = []
    for _ in 0..<seconds {
        Thread.sleep(forTimeInterval: 1)
        let now = try pages()
        let limits = try qmp.execute("query-vcpu-dirty-limit")
        let current = limits.arrayValue?.first { $0["cpu-index"]?.intValue == 0 }?["current-rate"]?.doubleValue ?? 0
        samples.append(current * 1e6 / 1_048_576)
        if now.0 == last.0 { running = false }
        readers.append(Double(now.1 &- last.1) / (now.2 - last.2))
        last = now
    }
    _ = try? qmp.execute("cancel-vcpu-dirty-limit", ["cpu-index": 0])
    return QEMULimitResult(samples: samples, running: running, reader: median(readers) / max(readerBefore, 1))
}
