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

/// A test case between two hosts: a 20 Mbit/s TwoHostLink made before each test (or the test
/// skipped, with the reason printed) and removed after it, with whatever still runs in it.
class TwoHostTestCase: ReplicationProcessTestCase {
    var link: TwoHostLink!
    /// Where the destination listens in the right namespace (no one else's port there).
    let port: UInt16 = 4455

    override func setUpWithError() throws {
        try super.setUpWithError()
        link = try skippingWithoutTwoHosts { try TwoHostLink(rateMbit: 20) }
    }

    override func tearDown() {
        super.tearDown()   // the processes first, then the namespaces
        link?.remove()
    }

    /// `dirtymig receive` in the right namespace, with the PSK file `key`, serving one migration
    /// (control socket "destination"), once it says it listens.
    func startDestination(key: String) throws {
        let (_, out, errors) = try start(["receive", "--listen", "\(link.rightAddress):\(port)", "--psk-file", key, "--once",
                                          "--control", socket("destination")], prefix: link.inside(link.right))
        let ready = try XCTUnwrap(CLI.readLine(out), "receive printed nothing: \(stderrText(errors))")
        XCTAssertTrue(ready.contains("listening"), ready)
    }
}
