@testable import DirtyMigCore
import Foundation
import Synchronization
import XCTest

/// The destination's demand faults on this host's userfaultfd: a thread (or a vCPU inside
/// KVM_RUN) that touches a lacking page waits until the page is placed, a page the source never
/// wrote reads as zero, a stale copy is dropped before the guest can read it, and no page is
/// placed twice.
final class DemandFaultTests: XCTestCase {
    private func page(_ value: UInt8) -> [UInt8] { [UInt8](repeating: value, count: 4096) }

    /// A plain thread reads lacking pages: each read waits for its page, served from a second
    /// thread as requests come in; a hole outside the lacking set reads as zero; a stale copy of
    /// a lacking page is never seen.
    func testAThreadTouchingALackingPageWaitsForItsContents() throws {
        try requireUserfaultfd()
        let memory = try GuestMemory(size: 4 * MiB)
        memory.write(page(0xEE), at: 7 * 4096)          // a stale copy of lacking page 7
        memory.write(page(0x11), at: 9 * 4096)          // present and final (not lacking)
        var lacking = DirtyPageBitmap(pageCount: memory.pageCount)
        for lackingPage in [3, 7, 8, 900] { lacking.set(lackingPage) }

        let requests = Mutex<[UInt64]>([])
        let answered = DispatchSemaphore(value: 0)
        let box = ResolverBox()
        let resolver = try DemandFaultResolver(memory: memory, lacking: lacking) { pages in
            requests.withLock { $0 += pages }
            // The answer comes from another thread, as from the network.
            DispatchQueue.global().async {
                for wanted in pages {
                    let bytes = [UInt8](repeating: UInt8(wanted % 200 + 1), count: 4096)
                    _ = bytes.withUnsafeBytes { try? box.resolver?.place(firstPage: Int(wanted), count: 1, bytes: $0.baseAddress!) }
                }
                answered.signal()
            }
        }
        box.resolver = resolver
        try resolver.start()
        defer { resolver.finish() }

        XCTAssertEqual(memory.hostPointer(ramOffset: 7 * 4096).load(as: UInt8.self), 8, "the stale copy was dropped; the answer read")
        XCTAssertEqual(memory.hostPointer(ramOffset: 3 * 4096 + 100).load(as: UInt8.self), 4)
        XCTAssertEqual(memory.hostPointer(ramOffset: 9 * 4096).load(as: UInt8.self), 0x11, "a present page does not fault")
        XCTAssertEqual(memory.hostPointer(ramOffset: 20 * 4096).load(as: UInt8.self), 0, "a page never written reads as zero")
        XCTAssertEqual(requests.withLock { $0 }.sorted(), [3, 7], "only lacking pages that were touched were asked for")

        // The background stream brings the rest; a late answer for a landed page changes nothing.
        let rest = page(0x55)
        try rest.withUnsafeBytes {
            XCTAssertEqual(try resolver.place(firstPage: 8, count: 1, bytes: $0.baseAddress!), 1)
            XCTAssertEqual(try resolver.place(firstPage: 900, count: 1, bytes: $0.baseAddress!), 1)
            XCTAssertEqual(try resolver.place(firstPage: 7, count: 1, bytes: $0.baseAddress!), 0, "page 7 landed already")
        }
        XCTAssertTrue(resolver.map.isComplete)
        XCTAssertEqual(memory.hostPointer(ramOffset: 7 * 4096).load(as: UInt8.self), 8, "never overwritten")
        XCTAssertEqual(memory.hostPointer(ramOffset: 900 * 4096 + 4095).load(as: UInt8.self), 0x55)
        let figures = resolver.map.figures
        XCTAssertEqual(figures.requested, 2)
        XCTAssertEqual(figures.latenciesMicroseconds.count, 2)
        XCTAssertNil(resolver.threadFailure)
    }

    /// A guest runs at the destination while most of its working set is still at the source: its
    /// vCPUs fault inside KVM_RUN, requests are answered ahead of a background stream that moves
    /// to the faults' neighbourhood, every page lands once, and the guest's own check of its
    /// memory finds nothing lost, stale or torn.
    func testAGuestRunsOnWhileItsPagesArriveOnDemand() throws {
        let kvm = try requireKVM()
        try requireUserfaultfd()
        let workingSet: UInt64 = 8 * MiB
        let configuration = MachineConfiguration(
            memorySize: 64 * MiB, vcpuCount: 2,
            workloads: [VCPUWorkload(kind: .check, pattern: .random, offset: 0, size: workingSet, rateBytesPerSecond: 40 * MiB, seed: 31),
                        VCPUWorkload(kind: .check, pattern: .sequential, offset: workingSet, size: workingSet, rateBytesPerSecond: 40 * MiB, seed: 32)],
            tracking: .ring)
        let source = try Machine(configuration, kvm: kvm)
        try source.start()
        source.waitForGuest()
        let deadline = MonotonicClock.seconds() + 20
        while source.guestStats().vcpus.contains(where: { $0.passes < 2 }) && MonotonicClock.seconds() < deadline { usleep(10_000) }
        source.pause()
        let state = try source.saveState()
        let passesAtSwitch = source.guestStats().vcpus.map(\.passes)

        // The destination has all of RAM from an earlier pass, but the working sets are stale
        // there (the guest wrote them since): they lack, and are at the source only.
        let destination = try Machine(configuration, kvm: kvm, boot: .incoming)
        defer { destination.stop() }
        destination.memory.write(Array(UnsafeRawBufferPointer(start: source.memory.base, count: Int(configuration.memorySize))), at: 0)
        var lacking = DirtyPageBitmap(pageCount: destination.memory.pageCount)
        let firstWorkingPage = Int(GuestLayout.workloadBase / 4096)
        lacking.set(firstWorkingPage..<firstWorkingPage + Int(2 * workingSet / 4096))
        for run in lacking.runs() {   // stale: what an earlier pass left
            destination.memory.write([UInt8](repeating: 0xA5, count: run.count * 4096), at: UInt64(run.lowerBound) * 4096)
        }

        let queue = PostCopyPushQueue(missing: lacking)
        let box = ResolverBox()
        let sourceMemory = source.memory
        let pending = Mutex<[UInt64]>([])
        let resolver = try DemandFaultResolver(memory: destination.memory, lacking: lacking) { pages in
            pending.withLock { $0 += pages }
        }
        box.resolver = resolver
        try resolver.start()
        defer { resolver.finish() }
        try destination.restoreState(state)
        try destination.start()

        // The source's two senders: requests first, then a run of the background stream (slow
        // on purpose, so that most pages are fetched on demand or pre-paged).
        let placedTwice = Mutex(0)
        let server = OSThread(name: "test-source") {
            while !queue.isDrained {
                for page in queue.claimRequested(pending.withLock { let p = $0; $0 = []; return p }) {
                    if (try? resolver.place(firstPage: Int(page), count: 1, bytes: sourceMemory.base + Int(page) * 4096)) != 1 {
                        placedTwice.withLock { $0 += 1 }
                    }
                }
                if let run = queue.claimNextRun(maxPages: 16) {
                    if (try? resolver.place(firstPage: run.lowerBound, count: run.count,
                                            bytes: sourceMemory.base + run.lowerBound * 4096)) != run.count {
                        placedTwice.withLock { $0 += 1 }
                    }
                }
                usleep(200)
            }
        }
        server.join()
        XCTAssertTrue(resolver.map.isComplete)
        XCTAssertEqual(placedTwice.withLock { $0 }, 0, "every page landed exactly once")
        XCTAssertNil(resolver.threadFailure)
        source.stop()

        // The guest goes on for two more passes over its whole working set and finds every page
        // as it left it at the source.
        let after = MonotonicClock.seconds() + 20
        while destination.guestStats().vcpus.enumerated().contains(where: { $1.passes < passesAtSwitch[$0] + 2 })
                && MonotonicClock.seconds() < after {
            if let failure = destination.events.firstFailure { return XCTFail("guest failed: \(failure)") }
            usleep(10_000)
        }
        let stats = destination.guestStats().vcpus
        let figures = resolver.map.figures
        let tally = queue.tally
        print("post-copy local: \(lacking.count) pages lacking, \(figures.faults) faults, \(tally.requested) requested, \(tally.answered) answered, \(tally.pushed) pushed; latency p50 \(figures.latencyMicroseconds(percentile: 0.5) ?? 0) µs p99 \(figures.latencyMicroseconds(percentile: 0.99) ?? 0) µs; passes \(passesAtSwitch) -> \(stats.map(\.passes)), errors \(stats.map(\.errors))")
        XCTAssertEqual(stats.map(\.errors), [0, 0], "the guest found no lost, stale or torn page")
        XCTAssertTrue(stats.enumerated().allSatisfy { $1.passes >= passesAtSwitch[$0] + 2 }, "the guest ran on")
        XCTAssertGreaterThan(figures.requested, 0, "the guest faulted on pages it lacked")
        XCTAssertEqual(tally.answered + tally.pushed, lacking.count)
    }
}

/// Lets a request closure reach the resolver it is given to (built after the closure).
private final class ResolverBox: @unchecked Sendable {
    var resolver: DemandFaultResolver?
}
