import DirtyMigCore
import Foundation
import XCTest

/// `make install` puts what a user needs where Linux looks for it, under DESTDIR, and
/// `make uninstall` takes it away again.
final class InstallTests: XCTestCase {
    private func make(_ arguments: [String], environment: [String: String]? = nil) throws -> CLI.Result {
        try CLI.run(["make", "-C", CLI.packageRoot.path] + arguments, environment: environment,
                    program: URL(fileURLWithPath: "/usr/bin/env"))
    }

    func testMakeInstallAndUninstallUnderDestdir() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/make") || FileManager.default.isExecutableFile(atPath: "/bin/make") else {
            print("skipped: make is not installed (apt-get install make)")
            throw XCTSkip("make is not installed")
        }
        // `make install` builds in release mode first.
        let plan = try make(["-n", "install"])
        XCTAssertEqual(plan.status, 0, plan.stderr)
        XCTAssertTrue(plan.stdout.contains("swift build -c release"), plan.stdout)
        XCTAssertTrue(plan.stdout.contains("/usr/local/bin"), "PREFIX defaults to /usr/local: \(plan.stdout)")

        let destdir = try privateTemporaryDirectory("dmi")
        defer { try? FileManager.default.removeItem(atPath: destdir) }
        // The binaries under test are built already (and `swift test` holds the build
        // directory's lock): the build step is skipped with SWIFT=true.
        let variables = ["DESTDIR=\(destdir)", "PREFIX=/usr", "SWIFT=true", "BUILDDIR=\(CLI.binary.deletingLastPathComponent().path)"]
        let installed = try make(["install"] + variables)
        XCTAssertEqual(installed.status, 0, installed.stderr)
        let files = ["bin/dirtymig": 0o755, "bin/dirtymig-bench": 0o755, "share/man/man1/dirtymig.1": 0o644,
                     "share/bash-completion/completions/dirtymig": 0o644, "share/zsh/site-functions/_dirtymig": 0o644,
                     "share/fish/vendor_completions.d/dirtymig.fish": 0o644]
        for (file, mode) in files {
            let attributes = try FileManager.default.attributesOfItem(atPath: destdir + "/usr/" + file)
            XCTAssertEqual((attributes[.posixPermissions] as? NSNumber)?.intValue, mode, file)
        }
        let version = try CLI.run(["--version"], program: URL(fileURLWithPath: destdir + "/usr/bin/dirtymig"))
        XCTAssertEqual(version.stdout, "dirtymig \(ControlProtocol.softwareVersion)\n")

        if FileManager.default.isExecutableFile(atPath: "/usr/bin/man") {
            var environment = ProcessInfo.processInfo.environment
            environment["MANPATH"] = destdir + "/usr/share/man"
            let found = try CLI.run(["man", "-w", "dirtymig"], environment: environment, program: URL(fileURLWithPath: "/usr/bin/env"))
            XCTAssertEqual(found.status, 0, found.stderr)
            XCTAssertEqual(found.stdout.trimmingCharacters(in: .whitespacesAndNewlines), destdir + "/usr/share/man/man1/dirtymig.1")
            environment["MANWIDTH"] = "80"
            let page = try CLI.run(["man", "-P", "cat", "dirtymig"], environment: environment, program: URL(fileURLWithPath: "/usr/bin/env"))
            XCTAssertEqual(page.status, 0, page.stderr)
            XCTAssertTrue(page.stdout.contains("SYNOPSIS") && page.stdout.contains("EXIT STATUS"), page.stdout.prefix(500) + "")
        } else {
            print("skipped the man lookup: man is not installed (apt-get install man-db)")
        }

        let removed = try make(["uninstall"] + variables)
        XCTAssertEqual(removed.status, 0, removed.stderr)
        for file in files.keys {
            XCTAssertFalse(FileManager.default.fileExists(atPath: destdir + "/usr/" + file), "\(file) is removed")
        }
    }
}
