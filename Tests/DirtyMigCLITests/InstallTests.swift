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
        // `make` builds in release mode; `make install` too, where the binaries are missing.
        let build = try make(["-n", "build"])
        XCTAssertEqual(build.status, 0, build.stderr)
        XCTAssertTrue(build.stdout.contains("swift build -c release"), build.stdout)
        let nowhere = try privateTemporaryDirectory("dmn")
        defer { try? FileManager.default.removeItem(atPath: nowhere) }
        let plan = try make(["-n", "install", "BUILDDIR=\(nowhere)"])
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

    /// `make` as you, then `sudo make install`: sudo resets PATH to its secure_path, where a
    /// Swift toolchain in /opt or a home directory is not. An install over binaries newer than
    /// the sources must not need `swift` (it ran `swift build` and failed: "make: swift: No such
    /// file or directory"); one that has to build says what to do.
    func testInstallUnderSudosPathUsesTheBuiltBinaries() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/make") else {
            print("skipped: make is not installed in /usr/bin (apt-get install make)")
            throw XCTSkip("make is not installed in /usr/bin")
        }
        let sudoPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        var environment = ProcessInfo.processInfo.environment
        environment["PATH"] = sudoPath
        let swiftOnSudoPath = sudoPath.split(separator: ":").contains { FileManager.default.isExecutableFile(atPath: "\($0)/swift") }
        if swiftOnSudoPath {
            print("note: swift is on sudo's default PATH here; the build-needed case is not checked")
        }
        // The built binaries, copied and made newer than every source.
        let builddir = try privateTemporaryDirectory("dmb")
        let destdir = try privateTemporaryDirectory("dmi")
        defer {
            try? FileManager.default.removeItem(atPath: builddir)
            try? FileManager.default.removeItem(atPath: destdir)
        }
        for program in ["dirtymig", "dirtymig-bench"] {
            try FileManager.default.copyItem(atPath: CLI.binary.deletingLastPathComponent().path + "/" + program,
                                             toPath: builddir + "/" + program)
            try FileManager.default.setAttributes([.modificationDate: Date().addingTimeInterval(3600)],
                                                  ofItemAtPath: builddir + "/" + program)
        }
        let installed = try make(["install", "DESTDIR=\(destdir)", "BUILDDIR=\(builddir)"], environment: environment)
        XCTAssertEqual(installed.status, 0, installed.stdout + installed.stderr)
        XCTAssertFalse(installed.stdout.contains("swift build"), installed.stdout)
        XCTAssertTrue(FileManager.default.isExecutableFile(atPath: destdir + "/usr/local/bin/dirtymig"))

        guard !swiftOnSudoPath else { return }
        // Older than the sources: it would have to build, and says how instead.
        for program in ["dirtymig", "dirtymig-bench"] {
            try FileManager.default.setAttributes([.modificationDate: Date(timeIntervalSince1970: 1_000_000_000)],
                                                  ofItemAtPath: builddir + "/" + program)
        }
        let stale = try make(["install", "DESTDIR=\(destdir)", "BUILDDIR=\(builddir)"], environment: environment)
        XCTAssertNotEqual(stale.status, 0)
        XCTAssertTrue(stale.stderr.contains("build first as yourself with 'make', then run 'sudo make install'"), stale.stderr)
    }
}
