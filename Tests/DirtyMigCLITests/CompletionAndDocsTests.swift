@testable import DirtyMigCLI
import Foundation
import XCTest

/// The completions and the man page say the same as the option table the parser uses.
final class CompletionAndDocsTests: XCTestCase {
    private func file(_ path: String) throws -> String {
        try String(contentsOf: CLI.packageRoot.appendingPathComponent(path), encoding: .utf8)
    }

    private func bashComplete(_ words: [String]) throws -> [String] {
        let script = "source completions/dirtymig.bash; COMP_WORDS=(\(words.map { "'\($0)'" }.joined(separator: " "))); COMP_CWORD=\(words.count - 1); _dirtymig; printf '%s\\n' \"${COMPREPLY[@]}\""
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = ["-c", script]
        process.currentDirectoryURL = CLI.packageRoot
        let out = Pipe()
        process.standardOutput = out
        try process.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
    }

    func testBashCompletes() throws {
        XCTAssertEqual(try bashComplete(["dirtymig", "bo"]), ["boot"])
        XCTAssertEqual(try bashComplete(["dirtymig", "boot", "--tr"]), ["--track"])
        XCTAssertEqual(Set(try bashComplete(["dirtymig", "boot", "--track", ""])), ["bitmap", "ring", "quota"])
        XCTAssertEqual(try bashComplete(["dirtymig", "dirtyrate", "--mode", "s"]), ["sample"])
        XCTAssertEqual(Set(try bashComplete(["dirtymig", "migrate", "--throttle", "dirty-"])), ["dirty-limit", "dirty-quota"])
    }

    func testEveryOptionIsCompletedAndDocumented() throws {
        let bash = try file("completions/dirtymig.bash")
        let zsh = try file("completions/_dirtymig")
        let fish = try file("completions/dirtymig.fish")
        let man = try file("man/dirtymig.1").replacingOccurrences(of: "\\-", with: "-")
        for command in OptionTable.commands {
            XCTAssertTrue(man.contains("dirtymig \(command.name)"), "man page lacks \(command.name)")
            for option in command.options {
                XCTAssertTrue(bash.contains("--\(option.name)"), "bash lacks \(command.name) --\(option.name)")
                XCTAssertTrue(zsh.contains("--\(option.name)"), "zsh lacks \(command.name) --\(option.name)")
                XCTAssertTrue(fish.contains("from \(command.name)\" -l \(option.name)"), "fish lacks \(command.name) --\(option.name)")
                XCTAssertTrue(man.contains("--\(option.name)"), "man page lacks --\(option.name)")
                if case .choices(let choices) = option.completion {
                    for choice in choices { XCTAssertTrue(bash.contains(choice) && zsh.contains(choice) && fish.contains(choice), choice) }
                }
                // zsh shows a description beside each option: the option table's help, as --help
                // prints it, not the option's name again.
                let line = zsh.split(separator: "\n").first { $0.hasPrefix("        \(command.name))") }.map(String.init) ?? ""
                let described = zshDescription(option.help)
                XCTAssertTrue(line.contains("'--\(option.name)=[\(described)]") || line.contains("'--\(option.name)[\(described)]"),
                              "zsh describes \(command.name) --\(option.name) otherwise than its help: \(option.help)")
            }
        }
    }

    /// A description as a zsh _arguments spec holds it: brackets and colons escaped, single
    /// quotes closed and reopened.
    private func zshDescription(_ help: String) -> String {
        help.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "[", with: "\\[")
            .replacingOccurrences(of: "]", with: "\\]").replacingOccurrences(of: ":", with: "\\:")
            .replacingOccurrences(of: "'", with: "'\\''")
    }
}
