@testable import DirtyMigCore
import Foundation
import XCTest

/// The check workload and the guest output stream without KVM: `--workload` parsing, the config
/// block, the values the host recomputes, the line format, and GuestOutput's order and drops.
final class CheckWorkloadSpecTests: XCTestCase {
    func testCheckSpecs() throws {
        let spec = try WorkloadSpec.parse("0:check,ws=64M,pattern=random,rate=20M,passes=3,emit=10ms")
        XCTAssertEqual(spec.kind, .check)
        XCTAssertEqual(spec.pattern, .random)
        XCTAssertEqual(spec.passes, 3)
        XCTAssertEqual(spec.emitMicroseconds, 10_000)
        XCTAssertEqual(try WorkloadSpec.parse("check,emit=1ms").emitMicroseconds, 1_000)
        XCTAssertEqual(try WorkloadSpec.parse("check,emit=10s").emitMicroseconds, 10_000_000)
        XCTAssertEqual(try WorkloadSpec.parse("check,emit=2.5ms").emitMicroseconds, 2_500)
        XCTAssertEqual(try WorkloadSpec.parse("check").emitMicroseconds, 0, "no output unless asked")
        XCTAssertEqual(try WorkloadSpec.parse("check").pattern, .sequential)
        for (bad, words) in [("0:check,pattern=hot:0.1", "check needs pattern=seq or pattern=random"),
                             ("0:write,emit=10ms", "emit= only applies to check"),
                             ("0:check,emit=500us", "unknown unit"), ("0:check,emit=10", "add a unit"),
                             ("0:check,emit=0.5ms", "between 1ms and 10s"), ("0:check,emit=11s", "between 1ms and 10s"),
                             ("0:chek", "did you mean 'check'"), ("0:check,emti=1s", "did you mean 'emit'")] {
            do { _ = try WorkloadSpec.parse(bad); XCTFail(bad) } catch {
                XCTAssertTrue(error.message.contains(words), "\(bad): \(error.message)")
            }
        }
        let resolved = try WorkloadPlan.resolve(specs: [try WorkloadSpec.parse("0:check,ws=16M,emit=20ms")], vcpuCount: 2,
                                                memorySize: 128 << 20)
        XCTAssertEqual(resolved[0].kind, .check)
        XCTAssertEqual(resolved[0].emitMicroseconds, 20_000)
        XCTAssertEqual(MachineControl.describe(resolved[0]), "check,ws=16MiB,offset=0B,pattern=seq,emit=20ms")
    }

    func testConfigBlockCarriesCheckAndEmit() throws {
        let workload = VCPUWorkload(kind: .check, pattern: .random, offset: 0, size: 1 << 20, seed: 5, emitMicroseconds: 2_500)
        let bytes = GuestConfig(tscHz: 2_000_000_000, memorySize: 64 << 20, vcpus: [workload]).encode()
        XCTAssertEqual(bytes[64], 4, "kind check")
        XCTAssertEqual(bytes[64 + 56], 0xC4, "emit interval in microseconds at entry offset 56 (2500 = 0x9C4)")
        XCTAssertEqual(bytes[64 + 57], 0x09)
        XCTAssertEqual(try GuestConfig(decoding: bytes).vcpus, [workload])
    }

    func testStatsRecordErrorsField() {
        var area = [UInt8](repeating: 0, count: GuestLayout.statsHeaderSize + GuestLayout.statsRecordSize)
        area.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(7), toByteOffset: GuestLayout.statsHeaderSize + 48, as: UInt64.self) }
        XCTAssertEqual(GuestStats(bytes: area, vcpuCount: 1).vcpus[0].errors, 7)
    }

    func testCheckValues() {
        XCTAssertEqual(CheckWorkload.value(page: 3, pass: 0, seed: 1), 0, "before its first pass a page holds fresh zeroes")
        var seen = Set<UInt64>()
        for pass in 1...4 as ClosedRange<UInt64> {
            for page in 0..<256 as Range<UInt64> {
                let value = CheckWorkload.value(page: page, pass: pass, seed: 42)
                XCTAssertNotEqual(value, 0)
                seen.insert(value)
            }
        }
        XCTAssertEqual(seen.count, 4 * 256, "every page and pass has its own value: a stale or misplaced page is a mismatch")
        XCTAssertNotEqual(CheckWorkload.value(page: 1, pass: 1, seed: 1), CheckWorkload.value(page: 1, pass: 1, seed: 2))
        XCTAssertEqual(CheckWorkload.checksum(pages: 8, passes: 1, seed: 9), 0, "pass 1 read zeroes")
        XCTAssertEqual(CheckWorkload.checksum(pages: 8, passes: 3, seed: 9),
                       (0..<8).reduce(UInt64(0)) { $0 &+ CheckWorkload.value(page: $1, pass: 2, seed: 9) })
    }

    func testLineFormat() {
        let line = GuestOutputLine(vcpu: 1, sequence: 12, pages: 40_960, errors: 0, sum: 0xAB)
        XCTAssertEqual(line.text, "vcpu=1 seq=12 pages=40960 errors=0 sum=00000000000000ab")
        XCTAssertEqual(GuestOutputLine(parsing: Substring(line.text)), line)
        for bad in ["", "vcpu=1 seq=12 pages=40960 errors=0", "vcpu=1 seq=12 pages=40960 errors=0 sum=ab",
                    "vcpu=1 seq=12 pages=40960 errors=0 sum=00000000000000a", "seq=12 vcpu=1 pages=1 errors=0 sum=00000000000000ab"] {
            XCTAssertNil(GuestOutputLine(parsing: Substring(bad)), bad)
        }
    }

    func testOutputReleasesInOrderAndCountsDrops() {
        let output = GuestOutput()
        output.emit(vcpu: 0, line: "early")
        XCTAssertEqual(output.droppedCount, 1, "a line with no sink is dropped and counted")
        let received = Outcomes()
        output.setSink { received.append($0) }
        let threads = (0..<4).map { vcpu in
            OSThread(name: "emit-\(vcpu)") { for n in 1...500 { output.emit(vcpu: vcpu, line: "\(vcpu) \(n)") } }
        }
        for thread in threads { thread.join() }
        output.setSink(nil)
        output.emit(vcpu: 0, line: "late")
        XCTAssertEqual(output.releasedCount, 2000)
        XCTAssertEqual(output.droppedCount, 2)
        let lines = received.all
        XCTAssertEqual(lines.count, 2000)
        for vcpu in 0..<4 {
            let mine = lines.filter { $0.hasPrefix("\(vcpu) ") }.map { Int($0.split(separator: " ")[1])! }
            XCTAssertEqual(mine, Array(1...500), "each vCPU's lines arrive in the order it emitted them")
        }
    }
}
