import CKVM
import DirtyMigCore
import Foundation
import XCTest

/// Saved vCPU and device state: its binary form (round trip; malformed input throws, never
/// crashes), and on real KVM a running guest moved to a second VM (and a third) that keeps
/// running at its pace.
final class MachineStateTests: XCTestCase {
    // MARK: - encode / decode

    func testStatesRoundTrip() throws {
        let state = sampleMachineState()
        let bytes = state.encode()
        let decoded = try MachineState(decoding: bytes)
        XCTAssertEqual(decoded, state)
        XCTAssertEqual(decoded.encode(), bytes)
        XCTAssertEqual(decoded.vcpus[1].regs.rip, 0x1234_5678)
        XCTAssertEqual(decoded.vcpus[1].msr(0x10), 0xDEAD_BEEF_0000)
        XCTAssertEqual(decoded.vcpus[0].xcrs?.nr_xcrs, 1)
        XCTAssertNil(decoded.vcpus[0].debugRegisters)
        XCTAssertEqual(decoded.vcpus[1].parked, true)
        XCTAssertEqual(decoded.devices.irqChips.map(\.chip_id), [0, 1, 2])
        XCTAssertEqual(decoded.devices.clock?.clock, 987_654_321)
        XCTAssertEqual(decoded.deviceStates, [DeviceState(id: "console", version: 3, bytes: [1, 2, 3]),
                                              DeviceState(id: "rtc-0", version: 1, bytes: [])])
        let noDevices = MachineState(memorySize: 1 << 30, vcpus: [], devices: VMDeviceState(irqChips: [], clock: nil))
        XCTAssertEqual(try MachineState(decoding: noDevices.encode()), noDevices)
        XCTAssertEqual(try VCPUState(decoding: state.vcpus[0].encode()), state.vcpus[0])
        XCTAssertEqual(try VMDeviceState(decoding: state.devices.encode()), state.devices)
        let noClock = VMDeviceState(irqChips: [], clock: nil)
        XCTAssertEqual(try VMDeviceState(decoding: noClock.encode()), noClock)
    }

    func testTruncatedAndTrailingInputThrows() {
        let bytes = sampleMachineState().encode()
        var lengths = Array(0..<80) + Array(stride(from: 80, to: bytes.count, by: 61)) + Array(bytes.count - 40..<bytes.count)
        lengths = lengths.filter { $0 < bytes.count }
        for length in lengths {
            XCTAssertThrowsError(try MachineState(decoding: Array(bytes.prefix(length))), "\(length) bytes")
        }
        XCTAssertThrowsError(try MachineState(decoding: bytes + [0])) { error in
            XCTAssertEqual(error as? StateDecodingError, .trailingBytes("machine state", count: 1))
        }
    }

    func testWrongVersionAndKindAreNamed() {
        var bytes = sampleMachineState().encode()
        bytes[4] = 7
        XCTAssertThrowsError(try MachineState(decoding: bytes)) { error in
            XCTAssertEqual(error as? StateDecodingError, .unsupportedVersion("machine state", found: 7, supported: 2))
            XCTAssertEqual("\(error)", "machine state version 7 is not supported: this dirtymig reads version 2")
        }
        var vcpu = sampleVCPUState(id: 0).encode()
        vcpu[4] = 2
        XCTAssertThrowsError(try VCPUState(decoding: vcpu)) { error in
            XCTAssertEqual(error as? StateDecodingError, .unsupportedVersion("vCPU state", found: 2, supported: 1))
        }
        XCTAssertThrowsError(try VCPUState(decoding: sampleMachineState().encode())) { error in
            guard case .notThisKind("vCPU state", _)? = error as? StateDecodingError else { return XCTFail("\(error)") }
        }
    }

    func testHugeLengthsAndCountsAreRefusedBeforeAllocating() throws {
        func header(_ magic: String) -> [UInt8] { Array(magic.utf8) + [2, 0, 0, 0] }
        func le32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
        let machine = header("DMMS") + [UInt8](repeating: 0, count: 8)
        // 4 billion vCPUs.
        XCTAssertThrowsError(try MachineState(decoding: machine + le32(.max))) { error in
            XCTAssertEqual(error as? StateDecodingError, .tooMany("machine state", field: "vCPUs", count: Int(UInt32.max), limit: 1024))
        }
        // One vCPU whose encoding claims 4 GiB, and one that claims 1 MiB but is not there.
        XCTAssertThrowsError(try MachineState(decoding: machine + le32(1) + le32(0xFFFF_FFF0)))
        XCTAssertThrowsError(try MachineState(decoding: machine + le32(1) + le32(1 << 20) + [1, 2, 3])) { error in
            guard case .truncated? = error as? StateDecodingError else { return XCTFail("\(error)") }
        }
        // A vCPU state with 5000 MSRs and one with a 2 GiB XSAVE area.
        var vcpu = sampleVCPUState(id: 0).encode()
        let msrCountOffset = try XCTUnwrap(offsetOfMSRCount(in: vcpu))
        vcpu.replaceSubrange(msrCountOffset..<msrCountOffset + 4, with: le32(5000))
        XCTAssertThrowsError(try VCPUState(decoding: vcpu)) { error in
            XCTAssertEqual(error as? StateDecodingError, .tooMany("vCPU state", field: "MSRs", count: 5000, limit: 1024))
        }
        var xsave = sampleVCPUState(id: 0).encode()
        let xsaveOffset = 8 + 4 + 1 + 4 + 4 + MemoryLayout<kvm_regs>.size + 4 + MemoryLayout<kvm_sregs>.size
        XCTAssertEqual(Array(xsave[xsaveOffset..<xsaveOffset + 4]), le32(4096))
        xsave.replaceSubrange(xsaveOffset..<xsaveOffset + 4, with: le32(1 << 31))
        XCTAssertThrowsError(try VCPUState(decoding: xsave)) { error in
            guard case .badLength(_, "XSAVE area", _, _)? = error as? StateDecodingError else { return XCTFail("\(error)") }
        }
        // A KVM struct of the wrong size, a boolean that is neither 0 nor 1.
        var regs = sampleVCPUState(id: 0).encode()
        regs.replaceSubrange(17..<21, with: le32(UInt32(MemoryLayout<kvm_regs>.size - 8)))
        XCTAssertThrowsError(try VCPUState(decoding: regs))
        var parked = sampleVCPUState(id: 0).encode()
        parked[12] = 2
        XCTAssertThrowsError(try VCPUState(decoding: parked)) { error in
            guard case .invalidValue(_, "parked", _)? = error as? StateDecodingError else { return XCTFail("\(error)") }
        }
    }

    /// The userspace devices' list: its count, each id and each state are bounded before anything
    /// is allocated, an id is a printable name, and no id appears twice.
    func testDeviceStateListsAreBoundedAndChecked() throws {
        func le32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
        let empty = MachineState(memorySize: 1 << 30, vcpus: [], devices: VMDeviceState(irqChips: [], clock: nil))
        // Everything up to the device count.
        let head = Array(empty.encode().dropLast(4))
        func device(_ id: [UInt8], version: UInt16 = 1, state: [UInt8] = []) -> [UInt8] {
            le32(UInt32(id.count)) + id + withUnsafeBytes(of: version.littleEndian) { Array($0) } + le32(UInt32(state.count)) + state
        }
        func refusal(_ bytes: [UInt8]) -> StateDecodingError? {
            do { _ = try MachineState(decoding: bytes); return nil } catch { return error }
        }
        XCTAssertEqual(refusal(head + le32(.max)), .tooMany("machine state", field: "userspace devices", count: Int(UInt32.max), limit: 64))
        XCTAssertEqual(refusal(head + le32(1) + le32(1 << 30)),
                       .badLength("machine state", field: "device 0 id", length: 1 << 30, expected: "at most 64"))
        XCTAssertEqual(refusal(head + le32(1) + device(Array("a b".utf8))),
                       .invalidValue("machine state", field: "device 0 id", "not 1 to 64 printable ASCII characters"))
        XCTAssertEqual(refusal(head + le32(1) + device([])),
                       .invalidValue("machine state", field: "device 0 id", "not 1 to 64 printable ASCII characters"))
        XCTAssertEqual(refusal(head + le32(2) + device(Array("uart".utf8)) + device(Array("uart".utf8))),
                       .invalidValue("machine state", field: "device 1 id", "'uart' appears twice"))
        // A state that claims 2 GiB is refused by its length; one that claims 1 MiB is not there.
        XCTAssertEqual(refusal(head + le32(1) + device(Array("uart".utf8)).dropLast(4) + le32(1 << 31)),
                       .badLength("machine state", field: "device 'uart' state", length: 1 << 31, expected: "at most \(1 << 20)"))
        guard case .truncated? = refusal(head + le32(1) + device(Array("uart".utf8)).dropLast(4) + le32(1 << 20) + [1]) else {
            return XCTFail("a state shorter than its length must be refused as truncated")
        }
        let two = head + le32(2) + device(Array("uart".utf8), version: 7, state: [9, 9]) + device(Array("rtc".utf8))
        XCTAssertEqual(try MachineState(decoding: two).deviceStates,
                       [DeviceState(id: "uart", version: 7, bytes: [9, 9]), DeviceState(id: "rtc", version: 1, bytes: [])])
    }

    func testRandomAndCorruptedBytesNeverCrash() {
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<2000 {
            let count = Int.random(in: 0..<600, using: &generator)
            var bytes = (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
            XCTAssertThrowsError(try MachineState(decoding: bytes))
            XCTAssertThrowsError(try VCPUState(decoding: bytes))
            XCTAssertThrowsError(try VMDeviceState(decoding: bytes))
            // With a valid header the decoder goes further into the garbage.
            bytes = Array("DMMS".utf8) + [2, 0, 0, 0] + bytes
            XCTAssertThrowsError(try MachineState(decoding: bytes))
        }
        // Flipped bytes in a valid encoding: decoding throws or succeeds, and never crashes.
        let valid = sampleMachineState().encode()
        var decodedAnyway = 0
        for _ in 0..<2000 {
            var bytes = valid
            for _ in 0..<Int.random(in: 1...4, using: &generator) {
                bytes[Int.random(in: 0..<bytes.count, using: &generator)] = UInt8.random(in: 0...255, using: &generator)
            }
            if (try? MachineState(decoding: bytes)) != nil { decodedAnyway += 1 }
        }
        print("corrupted encodings that still decode (flips inside register values): \(decodedAnyway) of 2000")
    }

    // MARK: - on KVM

    /// The migration this state exists for: A runs, pauses, its state and memory go to an
    /// incoming B, B runs on and A stops. B's vCPUs go on from where A's were, at A's pace.
    func testMovedGuestKeepsRunningAtItsPace() throws {
        let kvm = try requireKVM()
        let a = try runningSource(kvm)
        defer { a.stop() }
        let b = try move(a, kvm: kvm)
        defer { b.stop() }
        try checkRunsAtPace(b, name: "B")
    }

    /// A to B to C: the state of a restored VM is as good as the original's.
    func testStateMovesOnTwice() throws {
        let kvm = try requireKVM()
        let a = try runningSource(kvm)
        defer { a.stop() }
        let b = try move(a, kvm: kvm)
        defer { b.stop() }
        Thread.sleep(forTimeInterval: 0.5)
        let c = try move(b, kvm: kvm)
        defer { c.stop() }
        try checkRunsAtPace(c, name: "C")
    }

    /// A vCPU the guest parked stays parked: saved with its flag, never entered in the new VM,
    /// and its OUT to the park port is complete in the saved state (RIP past it, not on it: PVM
    /// completes an emulated OUT at the exit, hardware KVM in pause()'s completing KVM_RUN).
    func testParkedVCPUStaysParked() throws {
        let kvm = try requireKVM()
        var configuration = Self.configuration
        configuration.workloads[1] = VCPUWorkload(kind: .write, offset: 32 * MiB, size: 2 * MiB, passes: 1, seed: 3)
        let a = try Machine(configuration, kvm: kvm)
        try a.start()
        defer { a.stop() }
        a.waitForGuest()
        let deadline = MonotonicClock.seconds() + 10
        while a.guestStats().vcpus[1].state != .finished && MonotonicClock.seconds() < deadline { usleep(10_000) }
        XCTAssertEqual(a.guestStats().vcpus[1].state, .finished)
        Thread.sleep(forTimeInterval: 0.1)

        a.pause()
        let saved = try a.saveState()
        XCTAssertEqual(saved.vcpus.map(\.parked), [false, true])
        let rip = saved.vcpus[1].regs.rip
        let code = a.memory.read(count: 2, at: rip - 1)
        print("parked vCPU: rip 0x\(String(rip, radix: 16)), bytes at rip-1: \(code.map { String($0, radix: 16) })")
        XCTAssertEqual(code.first, 0xEF, "the instruction before RIP is the park port's OUT (out %eax, %dx)")
        XCTAssertNotEqual(code.last, 0xEF, "RIP is past the OUT: the exit was completed before saving")

        let b = try Machine(configuration, kvm: kvm, boot: .incoming)
        defer { b.stop() }
        copyMemory(from: a, to: b)
        try b.restoreState(MachineState(decoding: saved.encode()))
        try b.start()
        a.stop()
        Thread.sleep(forTimeInterval: 0.3)
        b.pause()
        let after = try b.saveState()
        XCTAssertNil(b.events.firstFailure)
        XCTAssertEqual(after.vcpus[1].parked, true)
        XCTAssertEqual(after.vcpus[1].regs.rip, rip, "the parked vCPU was not entered again")
        XCTAssertEqual(b.guestStats().vcpus[1].state, .finished)
    }

    /// Why pause() completes each vCPU's last exit: KVM finishes an instruction that exited to
    /// userspace only on the next KVM_RUN. A tiny real-mode guest runs `in al, 0x80`: after the
    /// exit, RIP is still on the IN and AL lacks the byte the host supplied, so state saved then
    /// would run the IN again; completePendingExit() finishes it without entering the guest.
    /// (The workload guest's OUTs are complete at the exit already under PVM, which emulates them.)
    func testPendingExitIsCompletedBeforeStateIsRead() throws {
        let kvm = try requireKVM()
        let vm = try kvm.createVM()
        let memory = try GuestMemory(size: 2 * MiB)
        try vm.setMemorySlots(of: memory, logDirtyPages: false)
        memory.write([0xE4, 0x80, 0xEB, 0xFE], at: 0x1000)   // in al, 0x80; jmp $
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(kvm.supportedCPUID())
        var sregs = try vcpu.getSpecialRegisters()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        try vcpu.setSpecialRegisters(sregs)
        var regs = kvm_regs()
        regs.rip = 0x1000
        regs.rflags = 2
        try vcpu.setRegisters(regs)

        guard case .ioIn(0x80, let data) = try vcpu.runOnce(), data.elementSize == 1, data.count == 1 else {
            return XCTFail("expected a one-byte IN exit")
        }
        data.bytes.storeBytes(of: 0x42, as: UInt8.self)
        let pending = try vcpu.getRegisters()
        XCTAssertEqual(pending.rip, 0x1000, "before completion RIP is still on the IN")
        XCTAssertNil(try vcpu.completePendingExit(), "KVM_RUN with immediate_exit returns EINTR")
        let completed = try vcpu.getRegisters()
        print("IN exit: rip 0x\(String(pending.rip, radix: 16)) before completion, 0x\(String(completed.rip, radix: 16)) after, al 0x\(String(completed.rax & 0xFF, radix: 16))")
        XCTAssertEqual(completed.rip, 0x1002)
        XCTAssertEqual(completed.rax & 0xFF, 0x42)
        XCTAssertNil(try vcpu.completePendingExit(), "with nothing pending it does nothing")
        XCTAssertEqual(try vcpu.getRegisters().rip, 0x1002, "and does not enter the guest")
    }

    /// Restoring is for a new incoming VM of the same shape, once; saving is for a paused VM.
    func testMisuseIsRefusedWithAClearError() throws {
        let kvm = try requireKVM()
        let small = MachineConfiguration(memorySize: 64 * MiB, vcpuCount: 2,
                                         workloads: [writer(8 * MiB, rate: 4 * MiB), reader(8 * MiB, offset: 8 * MiB)],
                                         tracking: nil)
        let a = try Machine(small, kvm: kvm)
        try a.start()
        defer { a.stop() }
        a.waitForGuest()
        XCTAssertThrowsError(try a.saveState()) { expect($0, .notPaused) }
        a.pause()
        let saved = try a.saveState()
        XCTAssertThrowsError(try a.restoreState(saved)) { expect($0, .notIncoming) }

        let b = try Machine(small, kvm: kvm, boot: .incoming)
        XCTAssertThrowsError(try b.start()) { expect($0, .notRestored) }
        try b.restoreState(saved)
        XCTAssertThrowsError(try b.restoreState(saved)) { error in
            expect(error, .alreadyRestored)
            print("restored twice: \(error)")
        }

        var one = small
        one.vcpuCount = 1
        one.workloads = [small.workloads[0]]
        let c = try Machine(one, kvm: kvm, boot: .incoming)
        XCTAssertThrowsError(try c.restoreState(saved)) { error in
            expect(error, .vcpuCountMismatch(saved: 2, machine: 1))
            print("different vCPU count: \(error)")
        }
        var bigger = small
        bigger.memorySize = 96 * MiB
        let d = try Machine(bigger, kvm: kvm, boot: .incoming)
        XCTAssertThrowsError(try d.restoreState(saved)) { expect($0, .memorySizeMismatch(saved: 64 * MiB, machine: 96 * MiB)) }
        // A refused restore leaves the VM as it was: one that fits is still taken.
        var other = saved
        other.vcpus.removeLast()
        XCTAssertNoThrow(try c.restoreState(other))
    }

    // MARK: - helpers

    /// 128 MiB, 2 vCPUs: vCPU 0 writes 32 MiB sequentially at 20 MiB/s, vCPU 1 reads 16 MiB.
    static let writeRate: UInt64 = 20 * MiB
    static let configuration = MachineConfiguration(
        memorySize: 128 * MiB, vcpuCount: 2,
        workloads: [writer(32 * MiB, rate: writeRate), reader(16 * MiB, offset: 32 * MiB)], tracking: .ring)

    /// A VM of `configuration` that has run its workloads for half a second.
    private func runningSource(_ kvm: KVMSystem) throws -> Machine {
        let machine = try Machine(Self.configuration, kvm: kvm)
        try machine.start()
        machine.waitForGuest()
        Thread.sleep(forTimeInterval: 0.5)
        return machine
    }

    /// Pauses `source`, moves its state (through its encoded form) and memory into a new
    /// incoming VM, starts that, and stops `source`: the steps a migration's last phase takes.
    private func move(_ source: Machine, kvm: KVMSystem) throws -> Machine {
        source.pause()
        let started = MonotonicClock.nanoseconds()
        let saved = try source.saveState()
        let savedAt = MonotonicClock.nanoseconds()
        let pagesAtPause = source.guestStats().vcpus.map(\.pages)
        let wire = saved.encode()
        let destination = try Machine(source.configuration, kvm: kvm, boot: .incoming)
        copyMemory(from: source, to: destination)
        let copied = MonotonicClock.nanoseconds()
        try destination.restoreState(MachineState(decoding: wire))
        try destination.start()
        let restored = MonotonicClock.nanoseconds()
        source.stop()
        print(String(format: "moved: save %.2f ms, state %d bytes, new VM + memory copy %.1f ms, restore + start %.2f ms; guest pages at pause %@",
                     Double(savedAt - started) / 1e6, wire.count, Double(copied - savedAt) / 1e6,
                     Double(restored - copied) / 1e6, "\(pagesAtPause)"))
        XCTAssertTrue(saved.vcpus.allSatisfy { $0.msr(0x10) != nil }, "MSR_IA32_TSC is saved")
        // The guest goes on where it was: its counters start from the source's, not from 0.
        Thread.sleep(forTimeInterval: 0.05)
        let resumed = destination.guestStats().vcpus.map(\.pages)
        for (vcpu, (before, after)) in zip(pagesAtPause, resumed).enumerated() {
            XCTAssertGreaterThanOrEqual(after, before, "vCPU \(vcpu) continues from its count at the pause")
        }
        return destination
    }

    /// Both vCPUs' counters move over a second, and the paced writer holds its configured rate.
    private func checkRunsAtPace(_ machine: Machine, name: String) throws {
        Thread.sleep(forTimeInterval: 0.1)
        let first = machine.guestStats().vcpus
        let start = MonotonicClock.nanoseconds()
        Thread.sleep(forTimeInterval: 1)
        let last = machine.guestStats().vcpus
        let seconds = Double(MonotonicClock.nanoseconds() - start) / 1e9
        XCTAssertNil(machine.events.firstFailure, "\(machine.events.firstFailure.map { "\($0)" } ?? "")")
        let writerRate = Double(last[0].pages - first[0].pages) * 4096 / seconds
        let ratio = writerRate / Double(Self.writeRate)
        let guestSeconds = Double(last[0].tscNow - first[0].tscNow) / Double(machine.tscHz)
        let guestRatio = Double(last[0].pages - first[0].pages) * 4096 / guestSeconds / Double(Self.writeRate)
        print(String(format: "%@: writer %.2f MiB/s over %.2f s (ratio to configured %.3f; by the guest's TSC %.3f), reader %d pages",
                     name, writerRate / Double(MiB), seconds, ratio, guestRatio, last[1].pages - first[1].pages))
        XCTAssertGreaterThan(last[0].pages, first[0].pages, "\(name)'s writer runs")
        XCTAssertGreaterThan(last[1].pages, first[1].pages, "\(name)'s reader runs")
        XCTAssertEqual(ratio, 1, accuracy: 0.10, "\(name)'s writer keeps its pace")
    }

    private func copyMemory(from source: Machine, to destination: Machine) {
        for range in source.memory.dataRanges() {
            (destination.memory.base + Int(range.lowerBound))
                .copyMemory(from: source.memory.base + Int(range.lowerBound), byteCount: Int(range.upperBound - range.lowerBound))
        }
    }

    private func sampleVCPUState(id: UInt32) -> VCPUState {
        var regs = kvm_regs()
        regs.rip = 0x1234_5678
        regs.rax = UInt64(id)
        var sregs = kvm_sregs()
        sregs.cr0 = 0x8000_0011
        sregs.cs.selector = 0x2B
        var xcrs = kvm_xcrs()
        xcrs.nr_xcrs = 1
        var lapic = kvm_lapic_state()
        lapic.regs.0 = 7
        var events = kvm_vcpu_events()
        events.flags = 13
        let xsave = (0..<4096).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        return VCPUState(id: id, parked: id == 1, mpState: 0, regs: regs, sregs: sregs, xsave: xsave, xcrs: xcrs,
                         debugRegisters: id == 0 ? nil : kvm_debugregs(), lapic: lapic,
                         msrs: [MSREntry(index: 0x10, value: 0xDEAD_BEEF_0000), MSREntry(index: 0xC000_0082, value: 0x100185),
                                MSREntry(index: 0x6E0, value: 0)],
                         events: events, tscKHz: 2_596_134)
    }

    private func sampleMachineState() -> MachineState {
        let chips = (0..<3).map { id -> kvm_irqchip in
            var chip = kvm_irqchip()
            chip.chip_id = UInt32(id)
            return chip
        }
        var clock = kvm_clock_data()
        clock.clock = 987_654_321
        clock.flags = 14
        return MachineState(memorySize: 128 * MiB, vcpus: [sampleVCPUState(id: 0), sampleVCPUState(id: 1)],
                            devices: VMDeviceState(irqChips: chips, clock: clock),
                            deviceStates: [DeviceState(id: "console", version: 3, bytes: [1, 2, 3]),
                                           DeviceState(id: "rtc-0", version: 1, bytes: [])])
    }

    /// Where the MSR count sits in an encoded vCPU state (after the fixed fields before it).
    private func offsetOfMSRCount(in bytes: [UInt8]) -> Int? {
        var offset = 8 + 4 + 1 + 4
        for _ in 0..<6 {   // regs, sregs, xsave, xcrs, debugregs, lapic
            guard offset + 4 <= bytes.count else { return nil }
            let length = bytes[offset..<offset + 4].reversed().reduce(0) { ($0 << 8) | Int($1) }
            offset += 4 + length
        }
        return offset
    }
}

private func expect(_ error: Error, _ expected: MachineStateError, file: StaticString = #filePath, line: UInt = #line) {
    guard case .state(let actual)? = error as? MachineError else {
        return XCTFail("expected \(expected), got \(error)", file: file, line: line)
    }
    XCTAssertEqual(actual, expected, file: file, line: line)
}
