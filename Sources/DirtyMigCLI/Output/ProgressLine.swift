import DirtyMigCore
import Foundation

/// One progress line on a terminal, redrawn four times a second, on standard error (standard
/// output carries the report, which scripts read); nothing when standard error is not a terminal.
final class ProgressLine: @unchecked Sendable {
    // @unchecked: `running` is guarded by `lock`.
    private let lock = NSLock()
    private var running = true
    private var thread: OSThread?

    static func start(_ makeSource: () -> (@Sendable () -> JSONValue?)?) -> ProgressLine? {
        guard isatty(STDERR_FILENO) == 1, let source = makeSource() else { return nil }
        let line = ProgressLine()
        line.thread = OSThread(name: "progress") { [line] in
            while line.isRunning {
                if let progress = source(), let text = render(progress) {
                    StandardStream.error.write("\r\u{1B}[K" + text)
                }
                usleep(250_000)
            }
            StandardStream.error.write("\r\u{1B}[K")
        }
        return line
    }

    private var isRunning: Bool { lock.lock(); defer { lock.unlock() }; return running }

    func finish() {
        lock.lock(); running = false; lock.unlock()
        thread?.join()
    }

    static func render(_ progress: JSONValue) -> String? {
        guard let phase = progress["phase"]?.stringValue, phase != "none" else { return nil }
        let sent = (progress["sent_bytes"]?.doubleValue ?? 0) / 1_048_576
        let remaining = (progress["remaining_pages"]?.doubleValue ?? 0) * 4096 / 1_048_576
        if phase == "post-copy" {   // the guest runs at the destination; these are the pages it still lacks
            var text = String(format: "post-copy  sent %.0f MiB  still at the source %.0f MiB", sent, remaining)
            if let throughput = progress["throughput_mib_s"]?.doubleValue { text += String(format: "  %.0f MiB/s", throughput) }
            if let eta = progress["eta_s"]?.doubleValue { text += String(format: "  ETA %.1f s", eta) }
            return text
        }
        if phase == "post-copy paused", let link = progress["postcopy_link"] {
            // The guest runs at the destination, its vCPUs wait for missing pages; the source retries.
            return String(format: "post-copy paused  %.0f s  still at the source %.0f MiB  (%@)",
                          link["paused_s"]?.doubleValue ?? 0, remaining, link["reason"]?.stringValue ?? "-")
        }
        guard phase == "pre-copy" || phase == "stop-and-copy" else { return phase }
        var text = String(format: "%@  pass %d  sent %.0f MiB  remaining %.0f MiB", phase,
                          Int(progress["iteration"]?.doubleValue ?? 0), sent, remaining)
        if let throughput = progress["throughput_mib_s"]?.doubleValue { text += String(format: "  %.0f MiB/s", throughput) }
        if let dirty = progress["dirty_pages_s"]?.doubleValue { text += "  dirty " + HumanNumber.rate(dirty, unit: "pages/s") }
        if let expected = progress["expected_downtime_ms"]?.doubleValue, expected > 0 {
            text += String(format: "  expected downtime %.0f ms", expected)
        }
        if let eta = progress["eta_s"]?.doubleValue { text += String(format: "  ETA %.1f s", eta) }
        return text
    }
}
