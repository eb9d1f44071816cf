@testable import DirtyMigCore
import Foundation
import XCTest

/// A device that records every access and answers with a set request; a read fills the data
/// with `fill`.
final class RecordingDevice: BusDevice, @unchecked Sendable {
    // @unchecked: `log` is guarded by `lock`.
    let name: String
    let request: DeviceRequest
    let fill: UInt8?
    private let lock = NSLock()
    private var log: [(String, DeviceAccess, [UInt8])] = []

    init(_ name: String, request: DeviceRequest = .none, fill: UInt8? = nil) {
        self.name = name
        self.request = request
        self.fill = fill
    }

    func read(_ access: DeviceAccess, into data: IOData) -> DeviceRequest {
        if let fill { for index in data.bytes.indices { data.bytes[index] = fill } }
        lock.lock(); log.append(("read", access, Array(data.bytes))); lock.unlock()
        return request
    }

    func write(_ access: DeviceAccess, _ data: IOData) -> DeviceRequest {
        lock.lock(); log.append(("write", access, Array(data.bytes))); lock.unlock()
        return request
    }

    var accesses: [(String, DeviceAccess, [UInt8])] { lock.lock(); defer { lock.unlock() }; return log }
}

/// The device bus without /dev/kvm: registration, overlaps refused, lookups at the edges of a
/// range, what an access nobody claims does.
final class DeviceBusTests: XCTestCase {
    private func name(_ bus: DeviceBus, _ space: DeviceBus.Space, _ address: UInt64) -> String? {
        (bus.device(space, at: address)?.device as? RecordingDevice)?.name
    }

    func testLookupsFindTheDeviceOnEveryAddressOfItsRangeAndNoneOutside() throws {
        var bus = DeviceBus()
        try bus.register(RecordingDevice("serial"), ports: 0x3F8...0x3FF)
        try bus.register(RecordingDevice("debugcon"), ports: 0xE9...0xE9)
        try bus.register(RecordingDevice("hpet"), mmio: 0xFED0_0000...0xFED0_03FF)
        for port: UInt64 in [0x3F8, 0x3FB, 0x3FF] { XCTAssertEqual(name(bus, .port, port), "serial") }
        XCTAssertNil(name(bus, .port, 0x3F7))
        XCTAssertNil(name(bus, .port, 0x400))
        XCTAssertEqual(name(bus, .port, 0xE9), "debugcon")
        XCTAssertNil(name(bus, .port, 0xE8))
        XCTAssertNil(name(bus, .port, 0xEA))
        XCTAssertEqual(name(bus, .mmio, 0xFED0_0000), "hpet")
        XCTAssertEqual(name(bus, .mmio, 0xFED0_03FF), "hpet")
        XCTAssertNil(name(bus, .mmio, 0xFECF_FFFF))
        XCTAssertNil(name(bus, .mmio, 0xFED0_0400))
        XCTAssertEqual(bus.device(.mmio, at: 0xFED0_0010)?.range, 0xFED0_0000...0xFED0_03FF)
        // The two spaces are apart: port 0xE9 is not MMIO address 0xE9.
        XCTAssertNil(name(bus, .mmio, 0xE9))
        XCTAssertNil(name(bus, .port, 0xFED0_0000))
        XCTAssertNil(DeviceBus().device(.port, at: 0))
    }

    func testRangesThatTouchAreAcceptedAndTheWholeSpaceWorks() throws {
        var bus = DeviceBus()
        try bus.register(RecordingDevice("low"), ports: 0...0x7FFF)
        try bus.register(RecordingDevice("high"), ports: 0x8000...0xFFFF)
        XCTAssertEqual(name(bus, .port, 0), "low")
        XCTAssertEqual(name(bus, .port, 0x7FFF), "low")
        XCTAssertEqual(name(bus, .port, 0x8000), "high")
        XCTAssertEqual(name(bus, .port, 0xFFFF), "high")
        try bus.register(RecordingDevice("all"), mmio: 0...UInt64.max)
        XCTAssertEqual(name(bus, .mmio, 0), "all")
        XCTAssertEqual(name(bus, .mmio, UInt64.max), "all")
        // One device may hold several ranges, registered in any order.
        var ports = DeviceBus()
        let device = RecordingDevice("guest")
        for port: UInt16 in [0x5D8, 0xE9, 0x5D0, 0x5D4] { try ports.register(device, ports: port...port) }
        for port: UInt64 in [0xE9, 0x5D0, 0x5D4, 0x5D8] { XCTAssertEqual(name(ports, .port, port), "guest") }
        for port: UInt64 in [0xE8, 0xEA, 0x5CF, 0x5D1, 0x5D3, 0x5D5, 0x5D9] { XCTAssertNil(name(ports, .port, port)) }
    }

    func testOverlappingRangesAreRefusedWithATypedError() throws {
        var bus = DeviceBus()
        try bus.register(RecordingDevice("a"), ports: 0x60...0x64)
        try bus.register(RecordingDevice("b"), ports: 0x70...0x71)
        try bus.register(RecordingDevice("m"), mmio: 0x1000...0x1FFF)
        let taken: [(ClosedRange<UInt16>, ClosedRange<UInt64>)] = [
            (0x60...0x64, 0x60...0x64),   // the same
            (0x5F...0x60, 0x60...0x64),   // its first port
            (0x64...0x65, 0x60...0x64),   // its last port
            (0x61...0x62, 0x60...0x64),   // inside
            (0x50...0x70, 0x60...0x64),   // around two: the first met is named
            (0x65...0x70, 0x70...0x71),   // the next one's first port
        ]
        for (requested, registered) in taken {
            XCTAssertThrowsError(try bus.register(RecordingDevice("x"), ports: requested)) { error in
                XCTAssertEqual(error as? DeviceBusError,
                               .overlap(space: .port, requested: UInt64(requested.lowerBound)...UInt64(requested.upperBound),
                                        registered: registered))
            }
        }
        XCTAssertThrowsError(try bus.register(RecordingDevice("x"), mmio: 0x1FFF...0x2FFF)) { error in
            XCTAssertEqual(error as? DeviceBusError, .overlap(space: .mmio, requested: 0x1FFF...0x2FFF, registered: 0x1000...0x1FFF))
            XCTAssertEqual("\(error)", "cannot register a device on MMIO addresses 0x1fff-0x2fff: they overlap 0x1000-0x1fff, which a device holds already")
        }
        // A refused registration changes nothing; the gaps are still free.
        XCTAssertEqual(name(bus, .port, 0x5F), nil)
        XCTAssertEqual(name(bus, .port, 0x60), "a")
        try bus.register(RecordingDevice("gap"), ports: 0x65...0x6F)
        XCTAssertEqual(name(bus, .port, 0x6F), "gap")
        XCTAssertEqual(name(bus, .port, 0x70), "b")
    }

    func testAccessesReachTheDeviceWithTheirVCPUAddressOffsetAndData() throws {
        var bus = DeviceBus()
        let device = RecordingDevice("d", request: .parkVCPU, fill: 0x5A)
        try bus.register(device, ports: 0x3F8...0x3FF)
        let out = ExitBytes([0x41, 0x42, 0x43])   // a string OUT of three bytes
        XCTAssertEqual(bus.write(.port, at: 0x3FA, out.data, vcpu: 3), .handled(.parkVCPU))
        let into = ExitBytes([0, 0], elementSize: 2)
        XCTAssertEqual(bus.read(.port, at: 0x3F8, into: into.data, vcpu: 1), .handled(.parkVCPU))
        XCTAssertEqual(into.bytes, [0x5A, 0x5A])
        let accesses = device.accesses
        XCTAssertEqual(accesses.count, 2)
        XCTAssertEqual(accesses[0].0, "write")
        XCTAssertEqual(accesses[0].1, DeviceAccess(vcpu: 3, address: 0x3FA, offset: 2))
        XCTAssertEqual(accesses[0].2, [0x41, 0x42, 0x43])
        XCTAssertEqual(accesses[1].0, "read")
        XCTAssertEqual(accesses[1].1, DeviceAccess(vcpu: 1, address: 0x3F8, offset: 0))
    }

    /// Nobody claims it: the bus says so and leaves a read's data as it is (the vCPU decides:
    /// port I/O goes on, MMIO ends the vCPU; see VCPUStateMachineTests).
    func testAnAccessNobodyClaimsIsUnclaimedAndItsDataLeftAsItIs() throws {
        var bus = DeviceBus()
        try bus.register(RecordingDevice("d", fill: 0), ports: 0x60...0x60)
        let data = ExitBytes([0x12, 0x34, 0x56, 0x78], elementSize: 4)
        XCTAssertEqual(bus.read(.port, at: 0x61, into: data.data, vcpu: 0), .unclaimed)
        XCTAssertEqual(data.bytes, [0x12, 0x34, 0x56, 0x78])
        XCTAssertEqual(bus.write(.port, at: 0x5F, data.data, vcpu: 0), .unclaimed)
        XCTAssertEqual(bus.read(.mmio, at: 0x60, into: data.data, vcpu: 0), .unclaimed)
        XCTAssertEqual(bus.write(.mmio, at: 0xFEE0_0000, data.data, vcpu: 0), .unclaimed)
        XCTAssertEqual(data.bytes, [0x12, 0x34, 0x56, 0x78])
    }

    func testExitDataCountsElementsAndComparesByContent() {
        let string = ExitBytes([1, 0, 2, 0, 3, 0], elementSize: 2)
        XCTAssertEqual(string.data.count, 3)
        XCTAssertNil(string.data.firstDoubleWord)
        let dword = ExitBytes([0x78, 0x56, 0x34, 0x12], elementSize: 4)
        XCTAssertEqual(dword.data.firstDoubleWord, 0x1234_5678)
        XCTAssertEqual(VCPUExit.ioOut(port: 1, data: ExitBytes([1, 0, 2, 0, 3, 0], elementSize: 2).data),
                       .ioOut(port: 1, data: string.data))
        XCTAssertNotEqual(VCPUExit.ioOut(port: 1, data: ExitBytes([1, 0, 2, 0, 3, 0]).data), .ioOut(port: 1, data: string.data))
    }
}
