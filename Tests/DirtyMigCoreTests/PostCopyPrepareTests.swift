@testable import DirtyMigCore
import Foundation
import XCTest

/// `postcopyPrepare`, through a real receiver: the destination drops the stale pages it names and
/// answers, and after it accepts only the switch (or an abort): a page that arrived then would
/// fill a dropped page's hole with a stale copy that no fault would ever replace.
final class PostCopyPrepareTests: XCTestCase {
    private static let memory: UInt64 = 64 << 20

    func testAfterThePrepareOnlyTheSwitchIsAccepted() throws {
        let kvm = try requireKVM()
        try requireUserfaultfd()
        let log = Lines(), outcomes = Lines()
        let receiver = try MigrationReceiver.listen(on: HostPort(host: "127.0.0.1", port: 0), kvm: kvm, security: .plain) { log.append($0) }
        let serving = OSThread(name: "test-receiver") {
            do throws(MigrationError) { try receiver.receiveOne().stop() } catch { outcomes.append("\(error)") }
        }
        defer {
            receiver.stop()
            serving.join()
        }
        let tsc = ((try? HostTSC.frequency(kvm: kvm)) ?? 2_000_000_000) / 1000
        let config = GuestConfig(tscHz: tsc * 1000, memorySize: Self.memory, vcpus: [VCPUWorkload(kind: .idle, seed: 0)])
        var hello = MigrationHello(name: "t", memorySize: Self.memory, vcpuCount: 1, tracking: .bitmap, ringEntries: 4096,
                                   tscKHz: tsc, requiredFeatures: .workloadGuest, bootSource: .workloadGuest, bootAnnouncement: config.encode())
        hello.postcopy = true
        hello.joins = SessionJoins(pages: 0, faults: 1)
        let session = try MigrationSession.connect(to: HostPort(host: "127.0.0.1", port: receiver.port), security: .plain)
        defer { session.close() }
        _ = try session.greet(hello)
        let pageCount = Int(Self.memory / 4096)
        var stale = DirtyPageBitmap(pageCount: pageCount)
        stale.set(100..<200)
        try session.channel.send(.postcopyPrepare, PostCopyPrepare(stale: stale).encode())
        let prepared = try session.channel.receive(.postcopyPrepared, PostCopyPrepared.init(decoding:))
        print("PostCopyPrepareTests: 100 stale pages dropped in \(prepared.droppedNanoseconds) ns")
        // A pages frame now is refused, and the migration fails at the destination.
        let table = PageBatchTable(ranges: [PageRange(firstPage: 150, count: 1, kind: .data)])
        var frame = WireWriter()
        MigrationFrameHeader(.pages, payloadLength: table.encodedSize + 4096).encode(into: &frame)
        table.encode(into: &frame)
        let page = [UInt8](repeating: 0xAB, count: 4096)
        try frame.bytes.withUnsafeBytes { head in
            try page.withUnsafeBytes { data in try session.control.send([head, data]) }
        }
        let deadline = Date().addingTimeInterval(10)
        while outcomes.all.isEmpty && Date() < deadline { usleep(10_000) }
        XCTAssertTrue(outcomes.all.contains { $0.contains("a pages frame after postcopyPrepare") }, "\(outcomes.all)")
    }
}
