@testable import DirtyMigCLI
import DirtyMigCore
import XCTest

/// `list`'s STATE column from the replies a VM or a receiver gives (no VM: the replies are
/// written out here; the process tests check them against real ones).
final class ListCommandTests: XCTestCase {
    private func label(status: JSONValue, migration: JSONValue? = nil, replication: JSONValue? = nil) -> String {
        ListCommand.stateLabel(ListCommand.row(name: "vm", socket: "/run/vm.sock", status: status, migration: migration,
                                               replication: replication))
    }

    func testAMigratingVMShowsItsPass() {
        XCTAssertEqual(label(status: ["state": "running"],
                             migration: ["phase": "pre-copy", "iteration": 2, "pass_percent": 41.6, "sent_bytes": 17_616_076]),
                       "migrating (pass 2 at 42 %, 16.8 MiB sent)")
    }

    func testAReplicatingVMShowsWhereItsReplicationStands() {
        let running: JSONValue = ["state": "running"]
        XCTAssertEqual(label(status: running, replication: ["status": "starting", "bytes_sent": 12_582_912, "checkpoints": 0]),
                       "replicating (initial copy, 12.0 MiB sent)")
        XCTAssertEqual(label(status: running, replication: ["status": "protected", "last_epoch": 41, "lag_checkpoints": 1,
                                                             "checkpoints": 41]),
                       "replicating (protected, epoch 41, 1 behind)")
        XCTAssertEqual(label(status: running, replication: ["status": "unprotected", "checkpoints": 1]),
                       "replicating (unprotected: standby lost, 1 checkpoint)")
        // A replication that ended leaves the VM running as before.
        for ended in ["stopped", "superseded", "none"] {
            let row = ListCommand.row(name: "vm", socket: "/s", status: running, migration: nil, replication: ["status": .string(ended)])
            XCTAssertEqual(row["state"], "running", ended)
            XCTAssertNil(row["replication"], ended)
        }
    }

    func testAReceiverShowsWhatItReceives() {
        XCTAssertEqual(label(status: ["state": "receiving", "from": "10.0.0.1:50312", "received_bytes": 13_107_200]),
                       "receiving (from 10.0.0.1:50312, 12.5 MiB received)")
        XCTAssertEqual(label(status: ["state": "receiving", "from": "10.0.0.1:50312", "received_bytes": nil]),
                       "receiving (from 10.0.0.1:50312)")
        XCTAssertEqual(label(status: ["state": "listening", "from": nil]), "listening")
    }

    func testAStandbyShowsItsPhaseAndEpoch() {
        XCTAssertEqual(label(status: ["state": "standby", "received_bytes": 5_242_880,
                                      "standby": ["phase": "initial copy", "committed_epoch": nil]]),
                       "standby (initial copy, 5.0 MiB received)")
        XCTAssertEqual(label(status: ["state": "standby", "received_bytes": 99_000_000,
                                      "standby": ["phase": "protecting", "committed_epoch": 7]]),
                       "standby (protecting, epoch 7)")
        XCTAssertEqual(label(status: ["state": "standby", "standby": ["phase": "primary lost, awaiting failover", "committed_epoch": 7]]),
                       "standby (primary lost, awaiting failover, epoch 7)")
    }
}
