import DirtyMigCore
import XCTest
final class TmpTiming: XCTestCase {
    func testTiming() throws {
        let kvm = try KVMSystem()
        let n = 64
        let c = MachineConfiguration(memorySize: 256 << 20, vcpuCount: n, workloads: (0..<n).map { _ in VCPUWorkload(kind: .idle) }, tracking: .ring)
        let a = try Machine(c, kvm: kvm)
        try a.start()
        a.waitForGuest(timeout: 60)
        func t(_ label: String, _ body: () throws -> Void) rethrows {
            let s = MonotonicClock.nanoseconds(); try body(); print(label, Double(MonotonicClock.nanoseconds() - s) / 1e6, "ms")
        }
        try t("pause") { a.pause() }
        var state: MachineState!
        try t("save") { state = try a.saveState() }
        var b: Machine!
        try t("build incoming") { b = try Machine(c, kvm: kvm, boot: .incoming) }
        try t("restore") { try b.restoreState(state) }
        try t("start") { try b.start() }
        try t("stop b") { b.stop() }
        try t("stop a") { a.stop() }
    }
}
