import DirtyMigCore
import Foundation
import XCTest

/// `dirtymig migrate` with neither --vm nor --to: a whole local migration, as the README's first
/// command runs it, with the report's fields and the --stats lines.
final class LocalMigrationTests: XCTestCase {
    func testLocalMigrationReportsAndWritesStats() throws {
        try requireKVMDevice()
        let stats = NSTemporaryDirectory() + "dirtymig-stats-\(getpid()).jsonl"
        defer { unlink(stats) }
        let result = try CLI.run(["migrate", "--memory", "256M", "--vcpus", "2", "--track", "quota",
                                  "--workload", "0:write,ws=32M,rate=20M", "--workload", "1:read,ws=32M",
                                  // Capped so that pass 1 lasts long enough for timeline samples.
                                  "--bandwidth", "64M", "--verify", "--json", "--stats", stats])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        let report = try JSONValue.parse(result.stdout)
        XCTAssertEqual(report["status"], "completed")
        XCTAssertEqual(report["verify"], "passed")
        XCTAssertEqual(report["track"], "quota")
        for key in ["error", "total_ms", "setup_ms", "downtime_ms", "iterations", "transferred_bytes", "zero_pages",
                    "normal_pages", "throughput_mib_s", "dirty_pages_s", "ring_overruns"] {
            XCTAssertNotNil(report[key], "report field \(key)")
        }
        // The destination hashed pages as they landed: only the source's hash is in the downtime.
        let verifyPause = try XCTUnwrap(report["verify_pause_ms"]?.doubleValue)
        XCTAssertGreaterThan(verifyPause, 0)
        XCTAssertGreaterThan(report["verify_ms"]?.doubleValue ?? 0, verifyPause)
        XCTAssertLessThan(verifyPause, report["downtime_ms"]?.doubleValue ?? 0)
        let vcpus = try XCTUnwrap(report["vcpus"]?.arrayValue)
        XCTAssertEqual(vcpus.count, 2)
        for vcpu in vcpus {
            XCTAssertGreaterThan(vcpu["guest_pages_s_before"]?.doubleValue ?? 0, 0)
            XCTAssertGreaterThan(vcpu["guest_pages_s_during"]?.doubleValue ?? 0, 0)
        }
        let after = try XCTUnwrap(report["destination_guest_pages_s"]?.arrayValue)
        XCTAssertTrue(after.allSatisfy { ($0.doubleValue ?? 0) > 0 }, "the VM runs at the destination")
        // Where the downtime went: the parts add up to it; within the limit, nothing exceeded.
        let parts = try XCTUnwrap(report["downtime_parts"])
        let sum = ["pause_ms", "last_pages_ms", "state_ms", "verify_ms", "destination_ms", "other_ms"]
            .map { parts[$0]?.doubleValue ?? .nan }.reduce(0, +)
        XCTAssertEqual(sum, report["downtime_ms"]?.doubleValue ?? 0, accuracy: 0.5, "\(parts)")
        XCTAssertEqual(report["downtime_limit_ms"]?.doubleValue, 300)
        if (report["downtime_ms"]?.doubleValue ?? 0) <= 300 { XCTAssertEqual(report["downtime_exceeded_ms"], .null) }
        // The timeline: samples in time order, ending completed with nothing left.
        let timeline = try XCTUnwrap(report["timeline"]?.arrayValue)
        XCTAssertGreaterThan(timeline.count, 1)
        let times = timeline.compactMap { $0["t_s"]?.doubleValue }
        XCTAssertEqual(times, times.sorted())
        XCTAssertEqual(timeline.last?["phase"], "completed")
        XCTAssertEqual(timeline.last?["remaining_bytes"]?.doubleValue, 0)
        XCTAssertTrue(timeline.contains { ($0["throughput_mib_s"]?.doubleValue ?? 0) > 0 && $0["pass"]?.doubleValue == 1 },
                      "throughput shows during pass 1")
        // The same run drawn from its stats file and from its report.
        let svg = stats + ".svg"
        defer { unlink(svg) }
        let drawn = try CLI.run(["plot", "--from", stats, "--output", svg])
        XCTAssertEqual(drawn.status, 0, drawn.stderr)
        XCTAssertTrue(try String(contentsOfFile: svg, encoding: .utf8).hasPrefix("<svg") || (try String(contentsOfFile: svg, encoding: .utf8)).contains("<svg"))
        let lines = try String(contentsOfFile: stats, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(lines.count, Int(report["iterations"]?.doubleValue ?? -1), "one --stats line per pass")
        for line in lines {
            let pass = try JSONValue.parse(String(line))
            for key in ["iteration", "time_s", "bytes_sent", "pages_dirtied", "dirty_pages_s", "bandwidth_mib_s", "expected_downtime_ms"] {
                XCTAssertNotNil(pass[key], "stats field \(key)")
            }
        }
    }

    /// The timeline records each vCPU's share of time held per sample, measured over that
    /// sample's interval: a dirty-limit throttle shows from the sample after it started (the
    /// figure it used to carry was refreshed only at pass ends, and read 0 for most of a second
    /// after the start), on the vCPU that writes, not on the one that does not.
    func testTimelineShowsTheThrottleFromItsStart() throws {
        try requireKVMDevice()
        let result = try CLI.run(["migrate", "--memory", "256M", "--vcpus", "2", "--track", "ring",
                                  "--workload", "0:write,ws=64M", "--workload", "1:read,ws=32M",
                                  "--bandwidth", "1Gbit", "--throttle", "dirty-limit", "--json"])
        XCTAssertEqual(result.status, 0, result.stdout + result.stderr)
        let report = try JSONValue.parse(result.stdout)
        guard let started = report["throttle"]?["started_s"]?.doubleValue else {
            throw XCTSkip("the throttle did not start in this run (the guest wrote slower than half the link): \(report["throttle"] ?? .null)")
        }
        let timeline = try XCTUnwrap(report["timeline"]?.arrayValue)
        func held(_ sample: JSONValue) -> [Double] { sample["held_percent"]?.arrayValue?.compactMap(\.doubleValue) ?? [] }
        let before = timeline.filter { ($0["t_s"]?.doubleValue ?? 0) < started }
        XCTAssertTrue(before.allSatisfy { held($0).allSatisfy { $0 < 1 } }, "held before the throttle started: \(before.map(held))")
        // The first two samples after the start (100 ms apart): the writer is held in them.
        let after = timeline.filter { ($0["t_s"]?.doubleValue ?? 0) > started && $0["phase"]?.stringValue == "pre-copy" }.prefix(2)
        XCTAssertFalse(after.isEmpty, "no pre-copy sample after the throttle started at \(started) s")
        XCTAssertTrue(after.contains { (held($0).first ?? 0) > 5 }, "the writer is not shown held after the start: \(after.map(held))")
        XCTAssertTrue(timeline.allSatisfy { held($0).count < 2 || held($0)[1] < 5 }, "the reader is never held")
        XCTAssertTrue(after.allSatisfy { ($0["throttle_percent"]?.doubleValue ?? 0) == (held($0).max() ?? 0) })
    }
}
