import DirtyMigCore
import Foundation
import XCTest

/// PreparedMemory on its own: resident after prepare(), given out once and only for its size,
/// prepared anew (different memory, all zero again) after a VM built on it failed.
final class PreparedMemoryTests: XCTestCase {
    func testGivenOnceForItsSizeAndPreparedAgainAfterAFailure() throws {
        let prepared = PreparedMemory(size: 64 << 20)
        XCTAssertNil(prepared.take(size: 64 << 20), "nothing before prepare()")
        XCTAssertEqual(prepared.availability, .preparing)
        try prepared.prepare()
        XCTAssertEqual(prepared.availability, .ready)
        XCTAssertNil(prepared.take(size: 32 << 20), "another size gets nothing")
        let memory = try XCTUnwrap(prepared.take(size: 64 << 20))
        XCTAssertEqual(prepared.availability, .inUse)
        XCTAssertTrue(memory.allocatedAhead)
        XCTAssertEqual(memory.dataPages().runs(), [0..<memory.pageCount], "every page is allocated (not a hole)")
        XCTAssertNil(prepared.take(size: 64 << 20), "given out once")

        // A failed VM wrote into it: the replacement is new memory, all zero.
        memset(memory.base, 0xA5, 4096)
        prepared.replaceIfTaken()
        XCTAssertNotEqual(prepared.availability, .inUse, "being prepared again (or ready already)")
        var again: GuestMemory?
        let deadline = Date().addingTimeInterval(20)
        while again == nil && Date() < deadline {
            again = prepared.take(size: 64 << 20)
            if again == nil { Thread.sleep(forTimeInterval: 0.01) }
        }
        let fresh = try XCTUnwrap(again, "prepared again within 20 s")
        XCTAssertFalse(fresh === memory)
        XCTAssertEqual(fresh.base.load(as: UInt64.self), 0)
        XCTAssertEqual(fresh.dataPages().runs(), [0..<fresh.pageCount])
    }

    func testReplaceDoesNothingUntilTaken() throws {
        let prepared = PreparedMemory(size: 32 << 20)
        try prepared.prepare()
        prepared.replaceIfTaken()
        let memory = try XCTUnwrap(prepared.take(size: 32 << 20), "still the first memory")
        XCTAssertEqual(memory.size, 32 << 20)
    }
}
