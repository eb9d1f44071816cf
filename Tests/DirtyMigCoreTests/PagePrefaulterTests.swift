@testable import DirtyMigCore
import Foundation
import XCTest

/// The receiver's pass-1 prefaulter allocates exactly the planned pages: what the sender will
/// bring. Everything else stays a hole (never-written memory is never allocated).
final class PagePrefaulterTests: XCTestCase {
    func testItAllocatesThePlannedPagesAndNothingElse() throws {
        let memory = try GuestMemory(size: 64 * MiB)
        var plan = DirtyPageBitmap(pageCount: memory.pageCount)
        plan.set(100..<1000)
        plan.set(5000..<9000)
        plan.set(16000..<16384)
        let prefaulter = PagePrefaulter(memory: memory, plan: plan)
        let deadline = Date().addingTimeInterval(20)
        while prefaulter.pagesPopulated < plan.count && Date() < deadline { usleep(5_000) }
        XCTAssertEqual(prefaulter.pagesPopulated, plan.count)
        XCTAssertEqual(memory.dataPages(), plan, "only the planned pages hold data")
    }

    func testItStopsWhereTheReceiverAlreadyIs() throws {
        let memory = try GuestMemory(size: 64 * MiB)
        var plan = DirtyPageBitmap(pageCount: memory.pageCount)
        plan.set(0..<16384)
        let prefaulter = PagePrefaulter(memory: memory, plan: plan)
        prefaulter.received(upTo: 16384)   // the receiver wrote it all: nothing is left to win
        usleep(200_000)
        XCTAssertLessThanOrEqual(prefaulter.pagesPopulated, 16384)
        let settled = prefaulter.pagesPopulated
        usleep(100_000)
        XCTAssertEqual(prefaulter.pagesPopulated, settled, "the thread has ended")
    }
}
