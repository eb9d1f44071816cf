@testable import DirtyMigCLI
import DirtyMigCore
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
}
