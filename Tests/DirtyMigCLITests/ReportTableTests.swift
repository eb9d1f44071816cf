@testable import DirtyMigCLI
@testable import DirtyMigCore
import XCTest

/// The report as people read it: grouped digits and units, a compact form for many vCPUs, and a
/// downtime over the limit said plainly.
final class ReportTableTests: XCTestCase {
    func testNumbersReadEasily() {
        XCTAssertEqual(HumanNumber.rate(181_265_311), "181.3 M")
        XCTAssertEqual(HumanNumber.rate(25_676), "25,676")
        XCTAssertEqual(HumanNumber.rate(181_265_311, unit: "pages/s"), "181.3 M pages/s")
        XCTAssertEqual(HumanNumber.grouped(1_234_567), "1,234,567")
        XCTAssertEqual(HumanNumber.grouped(-4_096), "-4,096")
        XCTAssertEqual(HumanNumber.grouped(.nan), "-")
        XCTAssertEqual(HumanNumber.milliseconds(300), "300 ms")
        XCTAssertEqual(HumanNumber.milliseconds(2000), "2 s")
    }

    func testAnExceededDowntimeIsSaidPlainlyAndManyVCPUsAreCompact() {
        let vcpus: [JSONValue] = (0..<64).map { ["id": .number($0), "guest_pages_s_before": .number(Double($0) * 1e6),
                                                  "guest_pages_s_during": .number(Double($0) * 5e5)] }
        let report: JSONValue = [
            "status": "completed", "error": .null, "destination": "10.0.0.2:4444", "track": "ring",
            "total_ms": 1200.0, "setup_ms": 3.0, "downtime_ms": 381.0, "downtime_limit_ms": 300.0,
            "downtime_exceeded_ms": 81.0,
            "downtime_parts": ["pause_ms": 1.0, "last_pages_ms": 250.0, "state_ms": 5.0, "verify_ms": 100.0,
                               "destination_ms": 20.0, "other_ms": 5.0],
            "iterations": 9, "transferred_bytes": 1_048_576.0, "normal_pages": 123_456, "zero_pages": 7,
            "throughput_mib_s": 80.0, "dirty_pages_s": 181_265_311.0, "verify": "passed", "verify_ms": 120.0,
            "verify_pause_ms": 100.0, "ring_overruns": 0, "vcpus": .array(vcpus),
            "throttle": ["kind": "cpu", "started_s": .null],
        ]
        let table = ReportTable.render(report)
        XCTAssertTrue(table.contains("381.0 ms (limit 300 ms): EXCEEDED by 81.0 ms"), table)
        XCTAssertTrue(table.contains("pause 1.0, last pages 250.0, state 5.0, verify 100.0, destination 20.0, other 5.0 ms"), table)
        XCTAssertTrue(table.contains("123,456 normal"), table)
        XCTAssertTrue(table.contains("181.3 M pages/s"), table)
        XCTAssertFalse(table.contains("vCPU 63"), "64 vCPUs are summarised, not listed")
        XCTAssertTrue(table.contains("(min / median / max of 64 vCPUs)"), table)
        XCTAssertLessThan(table.split(separator: "\n").count, 30)
    }

    /// A throttle that started says when and why, and its final ceilings say whose they are.
    func testTheThrottleSaysWhyItStartedAndWhoseCeilingsAreWhose() {
        let report: JSONValue = [
            "status": "completed", "error": .null, "destination": "10.0.0.2:4444", "track": "ring", "total_ms": 5000.0,
            "iterations": 4, "transferred_bytes": 1_048_576.0, "vcpus": [],
            "throttle": ["kind": "dirty-limit", "started_s": 1.06, "started_in_pass": 1, "tightened": 2,
                         "started_because": ["dirty_mib_s": 180.0, "sent_mib_s": 119.2],
                         "final": ["kind": "dirty-limit", "active": true, "ceiling_mib_s": [29.8, 14.9]]],
        ]
        let table = ReportTable.render(report)
        XCTAssertTrue(table.contains("from 1.1 s (in pass 1) because the guest dirtied 180.0 MiB/s while 119.2 MiB/s went out, tightened 2 times"), table)
        XCTAssertTrue(table.contains("final ceilings vCPU 0 29.8, vCPU 1 14.9 MiB/s"), table)
    }

    /// A migration that failed before its handshake (a wrong key, nothing listening) measured
    /// no setup, downtime, pass, page count or pace during: the JSON has nulls, the table says so.
    func testAFailureBeforeTheHandshakePrintsNoUnmeasuredZeros() {
        var report = MigrationReport()
        report.error = "the destination refused our pre-shared key"
        report.destination = "127.0.0.1:4444"
        report.track = .ring
        report.totalSeconds = 0.002
        report.downtimeLimitSeconds = 0.3
        report.guestPagesPerSecondBefore = [25_640, 0]
        report.guestPagesPerSecondDuring = [0, 0]
        report.throttle.mode = .dirtyLimit
        let json = report.json
        for key in ["setup_ms", "downtime_ms", "iterations", "normal_pages", "zero_pages", "throughput_mib_s",
                    "dirty_pages_s", "ring_overruns", "downtime_exceeded_ms", "pass_cut_short"] {
            XCTAssertEqual(json[key], .null, key)
        }
        XCTAssertEqual(json["transferred_bytes"]?.doubleValue, 0, "nothing was sent: a count, measured")
        XCTAssertEqual(json["vcpus"]?.arrayValue?.first?["guest_pages_s_before"]?.doubleValue, 25_640)
        XCTAssertEqual(json["vcpus"]?.arrayValue?.first?["guest_pages_s_during"], .null)
        XCTAssertEqual(json["throttle"]?["periods_judged"]?.doubleValue, 0)
        let table = ReportTable.render(json)
        XCTAssertFalse(table.contains("0.0 ms (limit"), table)
        XCTAssertTrue(table.contains("none: the VM was not paused (limit 300 ms)"), table)
        XCTAssertFalse(table.contains("0 during"), "the pace during was not measured: \(table)")
        XCTAssertFalse(table.contains("not needed"), table)
        XCTAssertTrue(table.contains("dirty-limit, not judged"), table)
        XCTAssertFalse(table.contains("pages  "), "no page counts: \(table)")
        XCTAssertFalse(table.contains("throughput"), table)
        XCTAssertTrue(table.contains("none: pre-copy did not begin"), table)
        XCTAssertTrue(table.contains("25,640 before, - during"), table)
    }

    /// A pass cut mid-way: its pages count, as its bytes do, and the table says it was cut.
    func testAPassCutShortIsCountedAndSaid() {
        var report = MigrationReport()
        report.error = "the migration was cancelled"
        report.totalSeconds = 1.2
        report.setupSeconds = 0.012
        report.transferredBytes = 5 << 20
        report.normalPages = 1_279
        report.zeroPages = 1
        report.passCutShort = 1
        report.guestPaceBeforeMeasured = false
        report.guestPagesPerSecondBefore = [0]
        report.guestPagesPerSecondDuring = [5_000]
        let json = report.json
        XCTAssertEqual(json["iterations"]?.doubleValue, 0)
        XCTAssertEqual(json["pass_cut_short"]?.doubleValue, 1)
        XCTAssertEqual(json["dirty_pages_s"], .null, "no pass completed")
        XCTAssertEqual(json["vcpus"]?.arrayValue?.first?["guest_pages_s_before"], .null)
        let table = ReportTable.render(json)
        XCTAssertTrue(table.contains("0 completed, pass 1 cut short"), table)
        XCTAssertTrue(table.contains("1,279 normal, 1 zero"), table)
        XCTAssertTrue(table.contains("- before, 5,000 during"), table)
        XCTAssertTrue(table.contains("not measured (no pass completed)"), table)
    }

    /// A replication that never reached its standby: no rows of zeros.
    func testAReplicationThatNeverStartedHasNoRowsOfZeros() {
        var figures = ReplicationFigures(standby: "127.0.0.1:1", track: .ring, intervalSeconds: 0.025, checkpointPages: nil)
        figures.status = .unprotected
        figures.error = "nothing listens at the destination"
        let json = figures.json
        for key in ["setup_ms", "initial_copy_ms", "initial_copy_bytes", "checkpoints_per_s", "bytes_per_s"] {
            XCTAssertEqual(json[key], .null, key)
        }
        XCTAssertEqual(json["pause_ms"]?["median"], .null)
        XCTAssertEqual(json["dirty_pages"]?["max"], .null)
        XCTAssertEqual(json["output_delay_ms"]?["p99"], .null)
        let table = ReplicationTable.render(json)
        XCTAssertTrue(table.contains("not done: no checkpoint was taken"), table)
        for row in ["pause per checkpoint", "bandwidth", "output delay", "0.00"] {
            XCTAssertFalse(table.contains(row), "\(row): \(table)")
        }
        XCTAssertLessThanOrEqual(table.split(separator: "\n").count, 7, table)
    }

    /// What `migrate --set` changed, and when, as the report table says it.
    func testLimitChangesSayWhatChangedAndWhen() {
        func limits(_ bandwidth: JSONValue, _ downtime: Double) -> JSONValue { ["bandwidth": bandwidth, "downtime_ms": .number(downtime)] }
        let report: JSONValue = [
            "status": "completed", "destination": "10.0.0.2:4444", "total_ms": 9000.0, "transferred_bytes": 1_048_576.0,
            "limit_changes": [
                ["t_s": 2.14, "pass": 1, "before": limits(.number(4 * 1_048_576), 300), "after": limits(.number(16 * 1_048_576), 300)],
                ["t_s": 5.0, "pass": 3, "before": limits(.number(16 * 1_048_576), 300), "after": limits(.null, 1000)],
                ["t_s": 6.0, "pass": 4, "before": limits(.null, 1000), "after": limits(.null, 1000)],
            ],
            "limit_changes_dropped": 2,
        ]
        let table = ReportTable.render(report)
        XCTAssertTrue(table.contains("limits changed        at 2.1 s (pass 1): bandwidth 4.0 MiB/s -> 16.0 MiB/s\n"), table)
        XCTAssertTrue(table.contains("at 5.0 s (pass 3): bandwidth 16.0 MiB/s -> unlimited, downtime limit 300 ms -> 1 s"), table)
        XCTAssertTrue(table.contains("at 6.0 s (pass 4): set again, unchanged: bandwidth unlimited, downtime limit 1 s"), table)
        XCTAssertTrue(table.contains("and 2 more changes, not kept"), table)
        XCTAssertFalse(ReportTable.render(["status": "completed", "limit_changes": []]).contains("limits changed"))
    }

    /// `migrate --status` as people read it: what was not measured yet says so, never 0.
    func testStatusSaysWhatIsNotMeasuredYet() {
        var progress = MigrationProgress()
        progress.phase = "pre-copy"
        progress.destination = "10.0.0.2:4444"
        progress.iteration = 1
        progress.sentBytes = 12 << 20
        progress.passPages = 16384
        progress.remainingPages = 12288
        progress.limits = .init(bandwidth: 4 << 20, downtimeSeconds: 0.3)
        progress.elapsedSeconds = 3.04
        var text = MigrationStatusText.render(progress.json, vm: "src")
        XCTAssertTrue(text.hasPrefix("migration of 'src' to 10.0.0.2:4444: pre-copy, pass 1\n"), text)
        XCTAssertTrue(text.contains("48.0 MiB left in this pass (25 % of its 64.0 MiB sent)"), text)
        XCTAssertTrue(text.contains("rate                not measured yet (limit 4.0 MiB/s)"), text)
        XCTAssertTrue(text.contains("expected downtime   not measured yet (known once pass 1 ends) (limit 300 ms)"), text)
        XCTAssertTrue(text.contains("throttle            not judged yet"), text)
        XCTAssertTrue(text.contains("elapsed             3.0 s"), text)
        XCTAssertFalse(text.contains("limits changed"), text)
        progress.iteration = 4
        progress.throughputBytesPerSecond = 16 * 1_048_576
        progress.dirtyPagesPerSecond = 25_600
        progress.expectedDowntimeSeconds = 0.0421
        progress.limitChanges = 1
        progress.throttle = ThrottleLevel(mode: .cpu, active: true, cpuPercent: 40)
        text = MigrationStatusText.render(progress.json, vm: "src")
        XCTAssertTrue(text.contains("16.0 MiB/s over the last second (limit 4.0 MiB/s)"), text)
        XCTAssertTrue(text.contains("25,600 pages/s"), text)
        XCTAssertTrue(text.contains("expected downtime   42.1 ms (limit 300 ms)"), text)
        XCTAssertTrue(text.contains("cpu: every vCPU held 40 % of the time"), text)
        XCTAssertTrue(text.contains("limits changed      1 time"), text)
    }
}
