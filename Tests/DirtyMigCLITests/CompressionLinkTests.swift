import DirtyMigCore
import DirtyMigTestSupport
import Foundation
import XCTest

/// `--compress auto` between two hosts on a link slower than this host compresses (20 Mbit/s,
/// TwoHostTestCase): auto compresses (the loopback case, where it does not, is in
/// CompressionTests), the migration verifies, and the text-like pages take a fraction of their
/// size on the wire. And a replication's checkpoints travel compressed across the same link.
final class CompressionLinkTests: TwoHostTestCase {
    override class var directoryPrefix: String { "dmz" }

    private func bootSource(_ name: String, workload: String) throws {
        let (_, out, errors) = try start(["boot", "--memory", "128M", "--vcpus", "1", "--track", "ring",
                                          "--control", socket(name), "--workload", workload],
                                         prefix: link.inside(link.left))
        let ready = try XCTUnwrap(CLI.readLine(out), "boot printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("running"), ready)
    }

    func testAutoCompressesOnASlowLink() throws {
        let key = try makePSKFile("key.psk")
        try startDestination(key: key)
        // 48 MiB of text, written once: about 20 s plain at 20 Mbit/s. (The first few batches go
        // into empty socket buffers, megabytes of them, as fast as memory: auto cannot tell the
        // link's rate until they are full, and sends those plain.)
        try bootSource("source", workload: "0:write,ws=48M,content=text,passes=1")
        Thread.sleep(forTimeInterval: 0.5)
        let result = try CLI.run(["migrate", "--vm", socket("source"), "--to", "\(link.rightAddress):\(port)", "--psk-file", key,
                                  "--compress", "auto", "--verify", "--json"])
        XCTAssertEqual(result.status, 0, result.stderr)
        let report = try JSONValue.parse(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines))
        XCTAssertEqual(report["verify"]?.stringValue, "passed", result.stdout)
        let compression = try XCTUnwrap(report["compression"])
        let batches = compression["batches"]?.doubleValue ?? 0
        let compressed = compression["compressed_batches"]?.doubleValue ?? 0
        let ratio = compression["ratio"]?.doubleValue ?? 0
        print("CompressionLinkTests: 20 Mbit/s, --compress auto: \(Int(compressed)) of \(Int(batches)) batches compressed, \(Int(compression["page_bytes"]?.doubleValue ?? 0)) page bytes in \(Int(compression["page_wire_bytes"]?.doubleValue ?? 0)) (ratio \(String(format: "%.2f", ratio))), \(Int(report["total_ms"]?.doubleValue ?? 0)) ms")
        XCTAssertGreaterThan(batches, 5)
        XCTAssertGreaterThanOrEqual(compressed, batches * 0.7, "on a link slower than compression, auto compresses")
        XCTAssertGreaterThan(ratio, 2, "text-like pages travel in less than half their size")
    }

    func testAReplicationsCheckpointsTravelCompressed() throws {
        let key = try makePSKFile("key.psk")
        let (_, out, errors) = try start(["receive", "--listen", "\(link.rightAddress):\(port)", "--standby", "--psk-file", key,
                                          "--control", socket("standby")], prefix: link.inside(link.right))
        let ready = try XCTUnwrap(CLI.readLine(out), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening for a replication"), ready)
        try bootSource("primary", workload: "0:write,ws=4M,content=text,rate=1M")
        let result = try CLI.run(["migrate", "--vm", socket("primary"), "--continuous", "--to", "\(link.rightAddress):\(port)",
                                  "--psk-file", key, "--compress", "zstd", "--checkpoint-interval", "200ms", "--json"])
        XCTAssertEqual(result.status, 0, result.stderr)
        Thread.sleep(forTimeInterval: 2)
        let client = try ControlClient(path: socket("primary"), callTimeout: 5)
        defer { client.close() }
        let figures = try client.call("query-replication")
        XCTAssertEqual(figures["status"]?.stringValue, "protected", "\(figures)")
        let compression = try XCTUnwrap(figures["compression"])
        print("CompressionLinkTests: replication, --compress zstd: \(compression)")
        XCTAssertEqual(compression["mode"]?.stringValue, "zstd")
        XCTAssertGreaterThan(compression["compressed_batches"]?.doubleValue ?? 0, 3, "the initial copy and the checkpoints compress")
        XCTAssertGreaterThan(compression["ratio"]?.doubleValue ?? 0, 2)
        _ = try? client.call("replicate-stop", timeout: 10)
    }
}
