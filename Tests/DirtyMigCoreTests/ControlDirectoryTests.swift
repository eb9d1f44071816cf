@testable import DirtyMigCore
import Foundation
import Synchronization
import XCTest

/// The control socket directory is created private, and nothing else ever has its mode changed:
/// a symbolic link another user plants at the directory's path, even between our look and our
/// mkdir, is refused, and the directory it points to keeps its mode.
final class ControlDirectoryTests: XCTestCase {
    private var base = ""

    override func setUpWithError() throws { base = try privateTemporaryDirectory("dmd") }
    override func tearDown() { try? FileManager.default.removeItem(atPath: base) }

    private func mode(_ path: String) -> mode_t {
        var info = stat()
        XCTAssertEqual(lstat(path, &info), 0, path)
        return info.st_mode & 0o7777
    }

    /// Another thread plants and removes a link to a 0755 directory at the path as fast as it
    /// can while the directory is prepared again and again: the look-then-mkdir-then-chmod
    /// sequence chmodded the link's target whenever the link arrived after the look.
    func testALinkPlantedWhileTheDirectoryIsCreatedNeverHasItsTargetChmodded() throws {
        let target = base + "/target", path = base + "/dirtymig"
        XCTAssertEqual(mkdir(target, 0o755), 0)
        XCTAssertEqual(chmod(target, 0o755), 0)
        let stop = Atomic<Bool>(false)
        let planterDone = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            while !stop.load(ordering: .relaxed) {
                _ = symlink(target, path)
                _ = unlink(path)   // fails (EISDIR) on the real directory the test created
            }
            planterDone.signal()
        }
        var created = 0, refused = 0, attempts = 0
        var reasons: Set<String> = []
        let deadline = Date().addingTimeInterval(2)   // the old sequence lost the race within 0.05 s here
        while Date() < deadline && mode(target) == 0o755 {
            attempts += 1
            do {
                try ControlServer.preparePrivateDirectory(path, isDefault: true)
                XCTAssertEqual(mode(path), 0o700)
                XCTAssertEqual(rmdir(path), 0)
                created += 1
            } catch {
                refused += 1
                reasons.insert(String("\(error)".prefix(120)))
            }
        }
        stop.store(true, ordering: .relaxed)
        planterDone.wait()
        print("ControlDirectoryTests: \(attempts) attempts: \(created) created, \(refused) refused; reasons: \(reasons.sorted())")
        XCTAssertEqual(String(mode(target), radix: 8), "755", "the link's target kept its mode (after \(attempts) attempts)")
        XCTAssertGreaterThan(refused, 0, "the link was met")
        XCTAssertTrue(reasons.allSatisfy { $0.contains("symbolic link") || $0.contains("was replaced while") }, "\(reasons)")
    }

    /// A directory that exists already is checked through the descriptor we opened, and refused
    /// (never chmodded) unless it is ours and closed to others.
    func testAnExistingDirectoryIsCheckedNotChanged() throws {
        let loose = base + "/loose"
        XCTAssertEqual(mkdir(loose, 0o755), 0)
        XCTAssertEqual(chmod(loose, 0o755), 0)
        XCTAssertThrowsError(try ControlServer.preparePrivateDirectory(loose, isDefault: false)) {
            XCTAssertTrue("\($0)".contains("has mode 0755 but must be private"), "\($0)")
        }
        XCTAssertEqual(mode(loose), 0o755)

        let file = base + "/file"
        XCTAssertTrue(FileManager.default.createFile(atPath: file, contents: nil))
        XCTAssertThrowsError(try ControlServer.preparePrivateDirectory(file, isDefault: true)) {
            XCTAssertTrue("\($0)".contains("exists but is not a directory"), "\($0)")
        }

        let link = base + "/link"
        XCTAssertEqual(symlink(loose, link), 0)
        XCTAssertThrowsError(try ControlServer.preparePrivateDirectory(link, isDefault: true)) {
            XCTAssertTrue("\($0)".contains("is a symbolic link"), "\($0)")
        }
        XCTAssertEqual(mode(loose), 0o755)

        let mine = base + "/mine"
        XCTAssertEqual(mkdir(mine, 0o700), 0)
        XCTAssertNoThrow(try ControlServer.preparePrivateDirectory(mine, isDefault: false))
        XCTAssertEqual(mode(mine), 0o700)
    }
}
