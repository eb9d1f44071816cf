@testable import DirtyMigCore
import Foundation
import Synchronization
import XCTest

/// A whole migration, sender to receiver over loopback TCP, of a Machine on the fake hypervisor:
/// the test decides which pages the guest dirties during each pass, and checks that each pass
/// carried exactly what the one before left dirty and that the destination's memory is the
/// source's. No /dev/kvm.
final class PreCopyOnFakeHypervisorTests: XCTestCase {
    /// Writes `pass`'s mark into each page: a page sent again arrives with new bytes.
    static func write(_ pages: [Int], pass: UInt8, into memory: GuestMemory) {
        for page in pages {
            memory.hostPointer(ramOffset: UInt64(page) * 4096).initializeMemory(as: UInt8.self, repeating: pass &+ UInt8(page % 200) &+ 1, count: 4096)
        }
    }

    func testEachPassCarriesExactlyWhatTheGuestDirtiedAndTheDestinationEndsEqual() throws {
        let sourceHypervisor = FakeHypervisor(), destinationHypervisor = FakeHypervisor()
        let source = try Machine.onFake(sourceHypervisor)
        defer { source.stop() }
        let tracker = try XCTUnwrap(sourceHypervisor.vms.first?.tracker)
        let memory = source.memory
        // The guest's working set: pages it wrote before the migration (data for pass 1), and
        // what it dirties during each pass: many pages during pass 1 (so that pre-copy cannot
        // stop there), a few after; the last set is what it writes between the last collection
        // and the pause.
        let base = Int(GuestLayout.workloadBase / 4096)
        let workingSet = Array(base..<base + 2048)
        Self.write(workingSet, pass: 0, into: memory)
        let script: [[Int]] = [
            [base + 7],                                                  // before pass 1: ignored
            Array(workingSet.prefix(1024)) + [base + 4096, base + 4097], // during pass 1
            [base, base + 1, base + 100, base + 1000, base + 2047],      // during pass 2
            [base + 3, base + 2000, base + 5000],                        // up to the pause
        ]
        tracker.onCollect = { index in
            guard index < script.count else { return [] }
            Self.write(script[index], pass: UInt8(index), into: memory)
            return script[index]
        }
        try source.start()
        // Reading the guest's stats (the machine's pace sampler, the sender) allocates their
        // page of the memfd, which then holds data: read it now, so that it is counted here.
        _ = source.guestStats()
        let dataPagesAtStart = memory.dataPages().count

        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), hypervisor: destinationHypervisor)
        defer { receiver.stop() }
        let arrived = Mutex<Result<Machine, MigrationError>?>(nil)
        let receiving = OSThread(name: "fake-receive") {
            let outcome: Result<Machine, MigrationError>
            do throws(MigrationError) { outcome = .success(try receiver.receiveOne()) } catch { outcome = .failure(error) }
            arrived.withLock { $0 = outcome }
        }
        var options = MigrationOptions(destination: HostPort(host: "127.0.0.1", port: receiver.port))
        // A cap keeps pass 2 (4 MiB) long against the downtime limit: the pages dirtied during
        // pass 1 cannot go in the pause, a few dozen can.
        options.bandwidth = 16 * MiB
        options.downtimeSeconds = 0.05
        options.verify = true
        let report = MigrationSender(machine: source, options: options).run()
        receiving.join()
        XCTAssertTrue(report.completed, report.error ?? "")
        guard case .success(let destination)? = arrived.withLock({ $0 }) else {
            return XCTFail("the destination did not take the VM: \(String(describing: arrived.withLock { $0 }))")
        }
        defer { destination.stop() }
        source.stop()

        let collections = tracker.collections
        let passes = report.passes
        print("fake pre-copy: passes carried \(passes.map(\.pagesSent)); collections \(collections.map(\.count))")
        XCTAssertGreaterThanOrEqual(passes.count, 3, "pass 1, the pages dirtied during it, and the pause")
        XCTAssertEqual(collections.count, passes.count + 1, "one collection before pass 1 and one after each pass")
        XCTAssertEqual(passes[0].pagesSent, UInt64(dataPagesAtStart), "pass 1 carries every page that holds data")
        for pass in 1..<passes.count - 1 {
            XCTAssertEqual(passes[pass].pagesSent, UInt64(collections[pass].count), "pass \(pass + 1) carries what pass \(pass) left dirty")
            XCTAssertEqual(passes[pass - 1].pagesDirtied, UInt64(collections[pass].count))
        }
        let last = passes.count - 1
        XCTAssertEqual(passes[last].pagesSent, UInt64(Set(collections[last] + collections[last + 1]).count),
                       "the pause carries what the last pass left dirty and what was written up to the pause")
        XCTAssertEqual(Array(collections[1].prefix(3)), [base, base + 1, base + 2], "the scripted pages were the dirty ones")
        XCTAssertEqual(memcmp(source.memory.base, destination.memory.base, Int(source.memory.size)), 0,
                       "the destination's memory is the source's")
        let sourceVCPUs = try XCTUnwrap(sourceHypervisor.vms.first).vcpus
        let destinationVCPUs = try XCTUnwrap(destinationHypervisor.vms.first).vcpus
        for (left, arrivedVCPU) in zip(sourceVCPUs, destinationVCPUs) {
            XCTAssertEqual(arrivedVCPU.events.first, "restored")
            XCTAssertGreaterThanOrEqual(arrivedVCPU.registers.regs.rip, left.registers.regs.rip, "vCPU \(left.id) goes on from where it was")
        }
    }
}
