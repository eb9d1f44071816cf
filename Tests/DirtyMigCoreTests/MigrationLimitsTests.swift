@testable import DirtyMigCore
import XCTest

/// The limits a running migration takes from `migrate-set` (`migrate --set`): what the control
/// command accepts, what it refuses and why, and how each change is kept for the report.
final class MigrationLimitsTests: XCTestCase {
    func testEachChangeIsKeptWithWhenAndWhatItWasBefore() {
        let limits = MigrationLimits(.init(bandwidth: 4 << 20, downtimeSeconds: 0.3))
        let first = limits.change(bandwidth: .some(16 << 20), atSeconds: 1.5, pass: 1)
        XCTAssertEqual(first, .init(bandwidth: 16 << 20, downtimeSeconds: 0.3), "the downtime limit is left as it was")
        let second = limits.change(bandwidth: .some(nil), downtimeSeconds: 2, atSeconds: 3.25, pass: 4)
        XCTAssertEqual(second, .init(bandwidth: nil, downtimeSeconds: 2))
        XCTAssertEqual(limits.current, second)
        let changes = limits.changes
        XCTAssertEqual(changes.dropped, 0)
        XCTAssertEqual(changes.kept.map(\.pass), [1, 4])
        XCTAssertEqual(changes.kept[0].before, .init(bandwidth: 4 << 20, downtimeSeconds: 0.3))
        XCTAssertEqual(changes.kept[1].before, first)
        XCTAssertEqual(changes.kept[1].json["after"]?["bandwidth"], .null, "unlimited is null")
        XCTAssertEqual(changes.kept[1].json["t_s"]?.doubleValue, 3.25)
    }

    func testChangesAreBoundedKeepingTheFirstAndTheLatest() {
        let limits = MigrationLimits(.init(bandwidth: nil, downtimeSeconds: 0.3))
        let total = MigrationLimits.maxChanges + 100
        for index in 0..<total { limits.change(downtimeSeconds: 0.001 * Double(index + 1), atSeconds: Double(index), pass: index) }
        let changes = limits.changes
        XCTAssertEqual(changes.kept.count, MigrationLimits.maxChanges)
        XCTAssertEqual(changes.dropped, 100)
        XCTAssertEqual(changes.kept.first?.pass, 0, "how it began")
        XCTAssertEqual(changes.kept.last?.pass, total - 1, "how it stands")
        XCTAssertEqual(changes.kept[MigrationLimits.maxChanges / 2 - 1].pass, MigrationLimits.maxChanges / 2 - 1)
    }

    func testMigrateSetTakesABandwidthADowntimeOrBoth() throws {
        let both = try MigrationControl.newLimits(["bandwidth": 8_388_608, "downtime_ms": 1500])
        XCTAssertEqual(both.bandwidth, .some(.some(8_388_608)))
        XCTAssertEqual(both.downtimeSeconds, 1.5)
        let unlimited = try MigrationControl.newLimits(["bandwidth": "unlimited"])
        XCTAssertEqual(unlimited.bandwidth, .some(.none))
        XCTAssertNil(unlimited.downtimeSeconds)
        let downtime = try MigrationControl.newLimits(["downtime_ms": 50])
        XCTAssertTrue(downtime.bandwidth == nil, "the cap is left as it is")
        XCTAssertEqual(downtime.downtimeSeconds, 0.05)
    }

    func testMigrateSetRefusesWhatMigrateWouldRefuseSayingWhy() {
        let cases: [(JSONValue, String)] = [
            (.object([]), "needs 'bandwidth'"),
            (["bandwidth": 100], "from 4096 bytes/s"),
            (["bandwidth": 4096.5], "from 4096 bytes/s"),
            (["bandwidth": "fast"], "'bandwidth' must be a number"),
            (["downtime_ms": 0], "downtime must be from 1 ms to 600 s"),
            (["downtime_ms": 600_001], "downtime must be from 1 ms to 600 s"),
            (["max_iterations": 3], "unknown argument 'max_iterations'"),
        ]
        for (arguments, words) in cases {
            XCTAssertThrowsError(try MigrationControl.newLimits(arguments), arguments.serialized()) { error in
                let control = error as? ControlError
                XCTAssertEqual(control?.errorClass, .invalidArgument, arguments.serialized())
                XCTAssertTrue(control?.desc.contains(words) == true, "\(arguments.serialized()): \(control?.desc ?? "\(error)")")
            }
        }
    }

    /// What `query-migrate` says of a figure not measured yet: null, never 0 (the expected
    /// downtime is known only once pass 1 has ended).
    func testProgressLeavesWhatWasNotMeasuredNull() {
        var progress = MigrationProgress()
        progress.phase = "pre-copy"
        progress.iteration = 1
        progress.passPages = 1000
        progress.remainingPages = 750
        let json = progress.json
        XCTAssertEqual(json["expected_downtime_ms"], .null)
        XCTAssertEqual(json["throughput_mib_s"], .null)
        XCTAssertEqual(json["dirty_pages_s"], .null)
        XCTAssertEqual(json["pass_percent"]?.doubleValue, 25)
        progress.expectedDowntimeSeconds = 0.0123
        XCTAssertEqual(progress.json["expected_downtime_ms"]?.doubleValue ?? 0, 12.3, accuracy: 1e-9)
        XCTAssertTrue(MigrationProgress.isUnderWay(phase: "connecting"))
        XCTAssertFalse(MigrationProgress.isUnderWay(phase: "none"))
        XCTAssertFalse(MigrationProgress.isUnderWay(phase: "completed"))
        XCTAssertFalse(MigrationProgress.isUnderWay(phase: nil))
    }
}
