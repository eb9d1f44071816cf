@testable import DirtyMigCore
import Foundation
import XCTest

/// The check workload on real KVM: a guest that verifies its own memory (and so can fail when
/// the host corrupts it), keeps verifying after a migration, and emits an output stream whose
/// checksums the host can recompute.
final class CheckWorkloadTests: XCTestCase {
    private static let workingSet: UInt64 = 4 * MiB
    private static var pagesPerPass: UInt64 { workingSet / 4096 }

    private func check(_ pattern: AccessPattern = .sequential, offset: UInt64 = 0, size: UInt64 = workingSet,
                       rate: UInt64 = 0, passes: UInt64 = 0, seed: UInt64, emit: UInt64 = 0) -> VCPUWorkload {
        VCPUWorkload(kind: .check, pattern: pattern, offset: offset, size: size, rateBytesPerSecond: rate, passes: passes,
                     seed: seed, emitMicroseconds: emit)
    }

    private func waitFor(_ machine: Machine, timeout: Double = 20, file: StaticString = #filePath, line: UInt = #line,
                         _ condition: (GuestStats) -> Bool) {
        let deadline = MonotonicClock.seconds() + timeout
        while MonotonicClock.seconds() < deadline {
            if let failure = machine.events.firstFailure { return XCTFail("guest failed: \(failure)", file: file, line: line) }
            if condition(machine.guestStats()) { return }
            usleep(10_000)
        }
        XCTFail("timed out after \(timeout) s; guest stats \(machine.guestStats().vcpus)", file: file, line: line)
    }

    /// The two words the guest checks in page `page` of a working set at `offset`.
    private func words(_ machine: Machine, offset: UInt64, page: UInt64) -> (UInt64, UInt64) {
        let base = machine.memory.hostPointer(ramOffset: GuestLayout.workloadBase + offset + page * 4096)
        return (base.load(as: UInt64.self), base.load(fromByteOffset: 4088, as: UInt64.self))
    }

    /// Both patterns do exactly their passes with no mismatch, and leave every page holding the
    /// value the host computes for it, with the checksum the host computes in the output record.
    func testPassesWithoutErrorsAndMemoryTheHostRecomputes() throws {
        let kvm = try requireKVM()
        let size = Self.workingSet
        let configuration = MachineConfiguration(
            memorySize: 128 * MiB, vcpuCount: 2,
            workloads: [check(.sequential, passes: 3, seed: 11), check(.random, offset: size, passes: 4, seed: 12)],
            tracking: .ring)
        let machine = try Machine(configuration, kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        waitFor(machine) { $0.vcpus.allSatisfy { $0.state == .finished } }

        let stats = machine.guestStats().vcpus
        print("check: passes \(stats.map(\.passes)), pages \(stats.map(\.pages)), errors \(stats.map(\.errors))")
        XCTAssertEqual(stats.map(\.passes), [3, 4])
        XCTAssertEqual(stats.map(\.errors), [0, 0], "a guest whose memory is intact finds no mismatch")
        XCTAssertEqual(stats.map(\.writes), stats.map(\.pages), "a check vCPU writes every page it touches")
        for (vcpu, workload) in configuration.workloads.enumerated() {
            for page in 0..<Self.pagesPerPass {
                let expected = CheckWorkload.value(page: page, pass: workload.passes, seed: workload.seed)
                let (first, last) = words(machine, offset: workload.offset, page: page)
                guard first == expected, last == expected else {
                    return XCTFail("vCPU \(vcpu) page \(page): \(first)/\(last), the host computes \(expected)")
                }
            }
            let record = GuestOutputLine(record: machine.memory.hostPointer(ramOffset: GuestLayout.outputRecordAddress(vcpu: vcpu)))
            XCTAssertEqual(record.vcpu, vcpu)
            XCTAssertEqual(record.sequence, 0, "no emit=, no lines")
            XCTAssertEqual(record.sum, CheckWorkload.checksum(pages: Self.pagesPerPass, passes: workload.passes, seed: workload.seed))
        }
    }

    /// Pages changed behind the guest's back (first word of some, last word of others: lost and
    /// torn pages) are found on the guest's next pass: the check can fail.
    func testCorruptionFromTheHostIsCounted() throws {
        let kvm = try requireKVM()
        let configuration = MachineConfiguration(memorySize: 128 * MiB, vcpuCount: 1,
                                                 workloads: [check(.random, seed: 21)], tracking: nil)
        let machine = try Machine(configuration, kvm: kvm)
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        waitFor(machine) { $0.vcpus[0].passes >= 2 }
        XCTAssertEqual(machine.guestStats().vcpus[0].errors, 0)

        // Paused, so that no visit is half done while the host writes.
        machine.pause()
        let corrupted: [(page: UInt64, byteOffset: Int)] = [(1, 0), (100, 0), (500, 0), (1000, 0),
                                                             (2, 4088), (200, 4088), (600, 4088), (1023, 4088)]
        for (page, byteOffset) in corrupted {
            let base = machine.memory.hostPointer(ramOffset: GuestLayout.workloadBase + page * 4096)
            base.storeBytes(of: base.load(fromByteOffset: byteOffset, as: UInt64.self) ^ 0x10, toByteOffset: byteOffset, as: UInt64.self)
        }
        let passes = machine.guestStats().vcpus[0].passes
        machine.resume()
        waitFor(machine) { $0.vcpus[0].passes >= passes + 2 }
        let errors = machine.guestStats().vcpus[0].errors
        print("corrupted \(corrupted.count) pages: the guest counted \(errors) errors")
        // Each corrupted page is found once, on its next visit (which rewrites it). A pause
        // can land between a visit's read and its write, so one page may escape.
        XCTAssertGreaterThanOrEqual(errors, UInt64(corrupted.count - 1))
        XCTAssertLessThanOrEqual(errors, UInt64(corrupted.count))
        waitFor(machine) { $0.vcpus[0].passes >= passes + 3 }
        XCTAssertEqual(machine.guestStats().vcpus[0].errors, errors, "rewritten pages check out again")
    }

    /// Output lines: seq 1, 2, 3, ... without a gap, about every 10 ms, and each `sum` is the
    /// checksum the host recomputes for the pass count its `pages` implies.
    func testOutputLinesAreConsecutiveTimelyAndCarryTheChecksum() throws {
        let kvm = try requireKVM()
        let workload = check(.random, seed: 31, emit: 10_000)
        let configuration = MachineConfiguration(memorySize: 128 * MiB, vcpuCount: 1, workloads: [workload], tracking: .ring)
        let machine = try Machine(configuration, kvm: kvm)
        let lines = TimedLines()
        machine.output.setSink { lines.append($0) }
        try machine.start()
        defer { machine.stop() }
        machine.waitForGuest()
        Thread.sleep(forTimeInterval: 1.5)
        machine.output.setSink(nil)
        let received = lines.all
        let parsed = received.compactMap { GuestOutputLine(parsing: Substring($0.line)) }
        XCTAssertEqual(parsed.count, received.count, "every line has the documented form: \(received.prefix(3).map(\.line))")
        XCTAssertGreaterThanOrEqual(parsed.count, 50, "1.5 s at one line per 10 ms (on 2 shared cores)")
        XCTAssertEqual(parsed.map(\.sequence), Array(1...UInt64(parsed.count)), "seq starts at 1, no gap, no repeat")
        let gaps = zip(received.dropFirst(), received).map { Double($0.time &- $1.time) / 1e6 }.sorted()
        let median = gaps.isEmpty ? 0 : gaps[gaps.count / 2]
        print("\(parsed.count) lines, median gap \(median) ms, last: \(received.last?.line ?? "-")")
        XCTAssertEqual(median, 10, accuracy: 3, "lines come about every 10 ms")
        var checksums: [UInt64: UInt64] = [:]
        for line in parsed {
            XCTAssertEqual(line.vcpu, 0)
            XCTAssertEqual(line.errors, 0)
            let passes = line.pages / Self.pagesPerPass
            let expected = checksums[passes] ?? CheckWorkload.checksum(pages: Self.pagesPerPass, passes: passes, seed: workload.seed)
            checksums[passes] = expected
            XCTAssertEqual(line.sum, expected, "seq \(line.sequence): the sum of pass \(passes) is what the host recomputes")
        }
        XCTAssertGreaterThan(checksums.keys.max() ?? 0, 1, "lines covered complete passes with a non-trivial checksum")
        XCTAssertEqual(machine.output.refusedCount, 0)
    }

    /// A migration moves a checking guest without corrupting it: on the destination it counts
    /// 0 errors after more passes, and its output stream goes on from the line after the
    /// source's last one.
    func testCheckSurvivesALocalMigration() throws {
        let kvm = try requireKVM()
        let workloads = [check(.sequential, rate: 16 * MiB, seed: 41, emit: 20_000),
                         check(.random, offset: 16 * MiB, size: 16 * MiB, rate: 16 * MiB, seed: 42)]
        let configuration = MachineConfiguration(memorySize: 128 * MiB, vcpuCount: 2, workloads: workloads, tracking: .ring)
        let source = try Machine(configuration, kvm: kvm)
        let sourceLines = TimedLines(), destinationLines = TimedLines()
        source.output.setSink { sourceLines.append($0) }
        try source.start()
        defer { source.stop() }
        source.waitForGuest()
        waitFor(source) { $0.vcpus.allSatisfy { $0.passes >= 1 } }

        let arrival = try Arrival(kvm, guestOutput: { destinationLines.append($0) })
        var options = MigrationOptions(destination: arrival.endpoint)
        options.verify = true
        let report = MigrationSender(machine: source, options: options).run()
        if report.completed { source.stop() }
        XCTAssertTrue(report.completed, "migration failed: \(report.error ?? "?")")
        XCTAssertEqual(report.verify, "passed")
        let destination = try arrival.wait().get()
        defer { destination.stop() }
        let arrived = destination.guestStats().vcpus.map(\.passes)
        waitFor(destination) { stats in zip(stats.vcpus, arrived).allSatisfy { $0.passes >= $1 + 2 } }
        let stats = destination.guestStats().vcpus
        print("migrated in \(Int(report.totalSeconds * 1000)) ms (\(report.iterations) passes); destination passes \(arrived) -> \(stats.map(\.passes)), errors \(stats.map(\.errors))")
        XCTAssertEqual(stats.map(\.errors), [0, 0], "every page arrived intact")

        let before = sourceLines.all.compactMap { GuestOutputLine(parsing: Substring($0.line)) }
        let after = destinationLines.all.compactMap { GuestOutputLine(parsing: Substring($0.line)) }
        XCTAssertFalse(before.isEmpty)
        XCTAssertFalse(after.isEmpty)
        XCTAssertEqual((before + after).map(\.sequence), Array(1...UInt64(before.count + after.count)),
                       "the destination's first line follows the source's last: none lost, none repeated")
    }
}

/// Lines from a GuestOutput sink, with when they arrived.
final class TimedLines: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var items: [(time: UInt64, line: String)] = []
    func append(_ line: String) {
        let now = MonotonicClock.nanoseconds()
        lock.lock(); items.append((now, line)); lock.unlock()
    }
    var all: [(time: UInt64, line: String)] { lock.lock(); defer { lock.unlock() }; return items }
}
