import DirtyMigTestSupport
import Foundation
import XCTest

/// Runs `body`, which makes or changes a TwoHostLink; where two hosts cannot be made here (not
/// root, no iproute2 or nftables), the test is skipped with the reason printed.
func skippingWithoutTwoHosts<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let unavailable as TwoHostLink.Unavailable {
        FileHandle.standardError.write(Data("skipped: \(unavailable)\n".utf8))
        throw XCTSkip(unavailable.description)
    }
}
