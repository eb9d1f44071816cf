import DirtyMigCore
import Foundation
import XCTest

/// The embedded workload guest's multiboot header, the config block's exact byte layout, and the
/// stats area's decoding: the host side of the guest ABI in GuestLayout.swift.
final class GuestImageTests: XCTestCase {
    private func u32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
    }

    private func u64(_ bytes: [UInt8], _ offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }

    private func put(_ value: UInt64, _ size: Int, into bytes: inout [UInt8], at offset: Int) {
        for index in 0..<size { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(index))) }
    }

    // MARK: image

    func testWorkloadImageHeaderParses() throws {
        let image = GuestImage.workload
        XCTAssertEqual(image.loadAddress, GuestLayout.imageAddress)
        XCTAssertEqual(UInt64(image.bytes.count), image.loadEndAddress - image.loadAddress)
        XCTAssertGreaterThanOrEqual(image.bssEndAddress, image.loadEndAddress)
        XCTAssertGreaterThanOrEqual(image.entryAddress, image.loadAddress)
        XCTAssertLessThan(image.entryAddress, image.loadEndAddress)
        // Image and bss must stay clear of the config block, and the trampoline must fit below it.
        XCTAssertLessThanOrEqual(image.bssEndAddress, GuestLayout.configAddress)
        XCTAssertLessThan(GuestLayout.trampolineAddress + 0x1000, GuestLayout.imageAddress)
        // Parsing the bytes again gives the same image (the header sits in the first 8 KiB).
        let again = try GuestImage(bytes: image.bytes)
        XCTAssertEqual(again.entryAddress, image.entryAddress)
        XCTAssertEqual(again.bssEndAddress, image.bssEndAddress)
        XCTAssertEqual(u32(image.bytes, 0), GuestImage.multibootMagic)
        XCTAssertNotEqual(u32(image.bytes, 4) & GuestImage.addressFieldsFlag, 0)
    }

    func testImageParseErrors() {
        XCTAssertThrowsError(try GuestImage(bytes: [])) {
            XCTAssertEqual($0 as? GuestImage.ImageError, .noMultibootHeader)
        }
        XCTAssertThrowsError(try GuestImage(bytes: [UInt8](repeating: 0, count: 9000))) {
            XCTAssertEqual($0 as? GuestImage.ImageError, .noMultibootHeader)
        }
        // A valid header without the address fields (an ELF kernel's header).
        var elfStyle = [UInt8](repeating: 0, count: 64)
        put(UInt64(GuestImage.multibootMagic), 4, into: &elfStyle, at: 0)
        put(0, 4, into: &elfStyle, at: 4)
        put(UInt64(UInt32(0) &- GuestImage.multibootMagic), 4, into: &elfStyle, at: 8)
        XCTAssertThrowsError(try GuestImage(bytes: elfStyle)) {
            XCTAssertEqual($0 as? GuestImage.ImageError, .notAnAoutKludge)
        }
        // header_addr below load_addr, and an entry point outside the image.
        var bytes = GuestImage.workload.bytes
        put(0x1000, 4, into: &bytes, at: 12)
        XCTAssertThrowsError(try GuestImage(bytes: bytes)) {
            guard case .inconsistentAddresses? = $0 as? GuestImage.ImageError else { return XCTFail("\($0)") }
        }
        bytes = GuestImage.workload.bytes
        put(0x5000_0000, 4, into: &bytes, at: 28)
        XCTAssertThrowsError(try GuestImage(bytes: bytes)) {
            guard case .inconsistentAddresses? = $0 as? GuestImage.ImageError else { return XCTFail("\($0)") }
        }
    }

    // MARK: config block

    private let sample = GuestConfig(tscHz: 2_596_134_000, memorySize: 4 << 30, vcpus: [
        VCPUWorkload(kind: .write, pattern: .sequential, offset: 0, size: 64 << 20,
                     rateBytesPerSecond: 20 << 20, passes: 0, seed: 1),
        VCPUWorkload(kind: .mix, pattern: .hot, hotFraction: 0.25, writePercent: 30, offset: 0x1234_5000,
                     size: 1 << 30, rateBytesPerSecond: 0, passes: 7, seed: 0xDEAD_BEEF_0123_4567),
        .idle,
    ])

    func testConfigEncodingByteOffsets() {
        let bytes = sample.encode()
        XCTAssertEqual(bytes.count, GuestLayout.configHeaderSize + 3 * GuestLayout.configEntrySize)
        XCTAssertEqual(Array(bytes[0..<4]), Array("DMCF".utf8))
        XCTAssertEqual(u32(bytes, 0), GuestLayout.configMagic)
        XCTAssertEqual(u32(bytes, 4), 1)
        XCTAssertEqual(u32(bytes, 8), 64)
        XCTAssertEqual(u32(bytes, 12), 64)
        XCTAssertEqual(u32(bytes, 16), 3)
        XCTAssertEqual(u32(bytes, 20), 0)
        XCTAssertEqual(u64(bytes, 24), 2_596_134_000)
        XCTAssertEqual(u64(bytes, 32), 4 << 30)
        XCTAssertEqual(u64(bytes, 40), 3 << 30, "4 GiB splits like QEMU's pc machine: 3 GiB low")
        XCTAssertEqual(u64(bytes, 48), GuestLayout.workloadBase)
        XCTAssertEqual(u64(bytes, 56), 0)
        // vCPU 0 at 64, vCPU 1 at 128.
        XCTAssertEqual(u32(bytes, 64), WorkloadKind.write.rawValue)
        XCTAssertEqual(u64(bytes, 64 + 24), 64 << 20)
        XCTAssertEqual(u64(bytes, 64 + 32), 20 << 20)
        let entry = 128
        XCTAssertEqual(u32(bytes, entry), WorkloadKind.mix.rawValue)
        XCTAssertEqual(u32(bytes, entry + 4), AccessPattern.hot.rawValue)
        XCTAssertEqual(u32(bytes, entry + 8), 30)
        XCTAssertEqual(u32(bytes, entry + 12), 250_000, "hot fraction in millionths")
        XCTAssertEqual(u64(bytes, entry + 16), 0x1234_5000)
        XCTAssertEqual(u64(bytes, entry + 24), 1 << 30)
        XCTAssertEqual(u64(bytes, entry + 32), 0)
        XCTAssertEqual(u64(bytes, entry + 40), 7)
        XCTAssertEqual(u64(bytes, entry + 48), 0xDEAD_BEEF_0123_4567)
        XCTAssertEqual(u64(bytes, entry + 56), 0)
        XCTAssertEqual(u32(bytes, 192), WorkloadKind.idle.rawValue)
        // Small RAM is all below 4 GiB.
        let small = GuestConfig(tscHz: 1, memorySize: 256 << 20, vcpus: []).encode()
        XCTAssertEqual(u64(small, 40), 256 << 20)
    }

    func testConfigRoundTrip() throws {
        XCTAssertEqual(try GuestConfig(decoding: sample.encode()), sample)
    }

    func testConfigDecodeErrors() {
        var bytes = sample.encode()
        XCTAssertThrowsError(try GuestConfig(decoding: Array(bytes.prefix(63))))
        XCTAssertThrowsError(try GuestConfig(decoding: Array(bytes.prefix(64 + 64))), "entries cut off")
        bytes[0] = 0
        XCTAssertThrowsError(try GuestConfig(decoding: bytes))
    }

    func testHotFractionClamps() {
        XCTAssertEqual(GuestConfig.hotFractionPPM(0.1), 100_000)
        XCTAssertEqual(GuestConfig.hotFractionPPM(-1), 0)
        XCTAssertEqual(GuestConfig.hotFractionPPM(7), 1_000_000)
        XCTAssertEqual(GuestConfig.hotFractionPPM(.nan), 0)
        XCTAssertEqual(GuestConfig.hotFractionPPM(.infinity), 1_000_000)
    }

    // MARK: stats area

    func testStatsDecoding() {
        var area = [UInt8](repeating: 0, count: GuestLayout.statsHeaderSize + 2 * GuestLayout.statsRecordSize)
        put(UInt64(GuestLayout.statsMagic), 4, into: &area, at: 0)
        put(1, 4, into: &area, at: 4)
        put(2, 4, into: &area, at: 8)
        let record = GuestLayout.statsHeaderSize + GuestLayout.statsRecordSize   // vCPU 1
        put(123_456, 8, into: &area, at: record)
        put(3, 8, into: &area, at: record + 8)
        put(UInt64(GuestVCPUState.finished.rawValue), 4, into: &area, at: record + 16)
        put(1, 4, into: &area, at: record + 20)
        put(100_000, 8, into: &area, at: record + 24)
        put(1_000, 8, into: &area, at: record + 32)
        put(9_000, 8, into: &area, at: record + 40)
        let stats = GuestStats(bytes: area, vcpuCount: 2)
        XCTAssertEqual(stats.bootedVCPUs, 2)
        XCTAssertNil(stats.error)
        XCTAssertEqual(stats.vcpus.count, 2)
        XCTAssertEqual(stats.vcpus[0].state, .notStarted)
        XCTAssertEqual(stats.vcpus[1], VCPUGuestStats(pages: 123_456, passes: 3, writes: 100_000, state: .finished,
                                                      apicID: 1, tscStart: 1_000, tscNow: 9_000))
        XCTAssertEqual(GuestLayout.statsRecordAddress(vcpu: 1), GuestLayout.statsAddress + UInt64(record))

        put(UInt64(GuestError.workingSetOutOfRange.rawValue), 4, into: &area, at: 12)
        XCTAssertEqual(GuestStats(bytes: area, vcpuCount: 2).error, .workingSetOutOfRange)
        // A short dump (or a guest that has not started: no magic) decodes as nothing booted.
        XCTAssertEqual(GuestStats(bytes: [], vcpuCount: 1).bootedVCPUs, 0)
    }

    // MARK: QEMU export

    func testQEMUArguments() throws {
        let export = QEMUExport(imagePath: "/tmp/g.bin", configPath: "/tmp/my config", memorySize: 256 << 20,
                                vcpuCount: 2, qmpSocketPath: "/tmp/q.sock", debugconPath: "/tmp/con.log")
        let args = export.arguments
        func value(after flag: String) -> String? {
            args.firstIndex(of: flag).flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil }
        }
        XCTAssertEqual(value(after: "-accel"), "kvm")
        XCTAssertEqual(value(after: "-m"), "256M")
        XCTAssertEqual(value(after: "-smp"), "2")
        XCTAssertEqual(value(after: "-kernel"), "/tmp/g.bin")
        XCTAssertEqual(value(after: "-device"), "loader,file=/tmp/my config,addr=0x200000")
        XCTAssertEqual(value(after: "-qmp"), "unix:/tmp/q.sock,server=on,wait=off")
        XCTAssertEqual(value(after: "-debugcon"), "file:/tmp/con.log")
        XCTAssertFalse(args.contains("host"), "no -cpu host")
        XCTAssertTrue(export.commandLine.hasPrefix("qemu-system-x86_64 -accel kvm -m 256M"))
        XCTAssertTrue(export.commandLine.contains("'loader,file=/tmp/my config,addr=0x200000'"))
        XCTAssertEqual(QEMUExport.memoryArgument(3 << 30), "3072M")
        XCTAssertEqual(QEMUExport.memoryArgument((1 << 20) + 4096), "1052672B")
        XCTAssertEqual(QEMUCommand.arguments(image: "i", config: "c", memory: 1 << 30, vcpus: 1).first,
                       "qemu-system-x86_64")

        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("guest-export-\(getpid())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let files = QEMUExport(imagePath: directory.appendingPathComponent("guest.bin").path,
                               configPath: directory.appendingPathComponent("guest.config").path,
                               memorySize: sample.memorySize, vcpuCount: sample.vcpus.count)
        try files.writeFiles(config: sample)
        XCTAssertEqual([UInt8](try Data(contentsOf: URL(fileURLWithPath: files.imagePath))), GuestImage.workload.bytes)
        XCTAssertEqual(try GuestConfig(decoding: [UInt8](Data(contentsOf: URL(fileURLWithPath: files.configPath)))),
                       sample)
    }
}
