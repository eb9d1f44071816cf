@testable import DirtyMigCore
import Foundation
import XCTest

/// The workload guest's ports as one device, without /dev/kvm: console lines per vCPU, the
/// error, park and output ports, reached through the bus as a vCPU's exits reach them.
final class WorkloadGuestPortsTests: XCTestCase {
    /// What the device reported, in order.
    final class Reports: WorkloadGuestReports, @unchecked Sendable {
        // @unchecked: `log` is guarded by `lock`.
        private let lock = NSLock()
        private var log: [String] = []

        private func add(_ entry: String) { lock.lock(); log.append(entry); lock.unlock() }
        func consoleLine(vcpu: Int, _ line: String) { add("console \(vcpu): \(line)") }
        func guestReportedError(vcpu: Int, code: UInt32) { add("error \(vcpu): \(code)") }
        func emitOutput(vcpu: Int, line: String) { add("output \(vcpu): \(line)") }
        func refuseOutput() { add("refused") }

        var entries: [String] { lock.lock(); defer { lock.unlock() }; return log }
    }

    private var memory: GuestMemory!
    private var reports: Reports!
    private var bus = DeviceBus()

    override func setUpWithError() throws {
        memory = try GuestMemory(size: 4 * MiB)
        reports = Reports()
        bus = DeviceBus()
        try WorkloadGuestPorts(vcpuCount: 2, memory: memory, reports: reports).machineDevice.register(on: &bus)
    }

    private func out(_ port: UInt16, _ bytes: [UInt8], size: Int = 1, vcpu: Int = 0) -> DeviceBus.Dispatch {
        bus.write(.port, at: UInt64(port), ExitBytes(bytes, elementSize: size).data, vcpu: vcpu)
    }

    private func dword(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }

    func testItHoldsTheFourPortsAndNothingBetween() {
        for port in [GuestLayout.consolePort, GuestLayout.errorPort, GuestLayout.parkPort, GuestLayout.outputPort] {
            XCTAssertTrue(bus.device(.port, at: UInt64(port))?.device is WorkloadGuestPorts, "port \(port)")
        }
        for port: UInt64 in [0xE8, 0xEA, 0x5CF, 0x5D1, 0x5D2, 0x5D3, 0x5D5, 0x5D7, 0x5D9, 0x5DC] {
            XCTAssertNil(bus.device(.port, at: port), "port \(port)")
        }
        XCTAssertNil(bus.device(.mmio, at: 0xE9))
    }

    func testConsoleBytesBecomeLinesPerVCPU() {
        // Interleaved, a byte at a time: each vCPU's line is its own.
        for (byte0, byte1) in zip(Array("hi\n".utf8), Array("yo!\n".utf8)) {
            XCTAssertEqual(out(GuestLayout.consolePort, [byte0], vcpu: 0), .handled(.none))
            XCTAssertEqual(out(GuestLayout.consolePort, [byte1], vcpu: 1), .handled(.none))
        }
        XCTAssertEqual(out(GuestLayout.consolePort, Array("\n".utf8), vcpu: 1), .handled(.none))
        XCTAssertEqual(reports.entries, ["console 0: hi", "console 1: yo!"])
        // A string OUT (rep outsb): every byte; wider elements: every byte of each.
        _ = out(GuestLayout.consolePort, Array("two\nlines\n".utf8))
        _ = out(GuestLayout.consolePort, Array("wide\n\0".utf8), size: 2)
        XCTAssertEqual(reports.entries.suffix(3), ["console 0: two", "console 0: lines", "console 0: wide"])
        // Escaped, as a peer's text.
        _ = out(GuestLayout.consolePort, Array("\u{1b}[2J\n".utf8), vcpu: 1)
        XCTAssertEqual(reports.entries.last, "console 1: \\x1b[2J")
    }

    func testTheErrorPortReportsADwordOnly() {
        XCTAssertEqual(out(GuestLayout.errorPort, dword(GuestError.noLongMode.rawValue), size: 4, vcpu: 1), .handled(.none))
        XCTAssertEqual(out(GuestLayout.errorPort, [6], size: 1), .handled(.none))
        XCTAssertEqual(out(GuestLayout.errorPort, [6, 0], size: 2), .handled(.none))
        // A string OUT of dwords counts once, its first element.
        XCTAssertEqual(out(GuestLayout.errorPort, dword(3) + dword(4), size: 4), .handled(.none))
        XCTAssertEqual(reports.entries, ["error 1: 6", "error 0: 3"])
    }

    func testTheParkPortAsksToParkTheVCPU() {
        XCTAssertEqual(out(GuestLayout.parkPort, dword(1), size: 4, vcpu: 1), .handled(.parkVCPU))
        XCTAssertEqual(out(GuestLayout.parkPort, [0]), .handled(.parkVCPU))
        XCTAssertEqual(reports.entries, [])
    }

    func testTheOutputPortEmitsTheAnnouncingVCPUsOwnRecordOnly() {
        let line = GuestOutputLine(vcpu: 1, sequence: 7, pages: 4096, errors: 0, sum: 0xABCDEF)
        writeRecord(line, at: 1)
        XCTAssertEqual(out(GuestLayout.outputPort, dword(1), size: 4, vcpu: 1), .handled(.none))
        XCTAssertEqual(reports.entries, ["output 1: \(line.text)"])
        // Another vCPU's id announced, a record that names another vCPU, a byte-wide OUT.
        XCTAssertEqual(out(GuestLayout.outputPort, dword(1), size: 4, vcpu: 0), .handled(.none))
        writeRecord(GuestOutputLine(vcpu: 1, sequence: 1, pages: 0, errors: 0, sum: 0), at: 0)
        XCTAssertEqual(out(GuestLayout.outputPort, dword(0), size: 4, vcpu: 0), .handled(.none))
        XCTAssertEqual(out(GuestLayout.outputPort, [1], size: 1, vcpu: 1), .handled(.none))
        XCTAssertEqual(reports.entries, ["output 1: \(line.text)", "refused", "refused"])
    }

    func testReadsLeaveTheDataAsItIs() {
        for port in WorkloadGuestPorts.ports {
            let data = ExitBytes([0x12, 0x34, 0x56, 0x78], elementSize: 4)
            XCTAssertEqual(bus.read(.port, at: UInt64(port), into: data.data, vcpu: 0), .handled(.none))
            XCTAssertEqual(data.bytes, [0x12, 0x34, 0x56, 0x78])
        }
        XCTAssertEqual(reports.entries, [])
    }

    /// As the guest writes it (GuestLayout's output records).
    private func writeRecord(_ line: GuestOutputLine, at vcpu: Int) {
        var record = [UInt8](repeating: 0, count: GuestLayout.outputRecordSize)
        func put(_ value: UInt64, _ offset: Int) { withUnsafeBytes(of: value.littleEndian) { record.replaceSubrange(offset..<offset + 8, with: $0) } }
        put(line.sequence, 0)
        put(line.pages, 8)
        put(line.errors, 16)
        put(line.sum, 24)
        withUnsafeBytes(of: UInt32(line.vcpu).littleEndian) { record.replaceSubrange(48..<52, with: $0) }
        memory.write(record, at: GuestLayout.outputRecordAddress(vcpu: vcpu))
    }
}
