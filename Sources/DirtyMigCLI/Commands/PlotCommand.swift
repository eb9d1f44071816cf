import DirtyMigCore
import Foundation

/// `dirtymig plot`: draw a saved migration as SVG, from a `migrate --json` report (which has the
/// timeline sampled every 100 ms) or a `migrate --stats` file (one line per pass: coarser).
enum PlotCommand {
    static func run(_ arguments: ParsedArguments) throws -> Int32 {
        guard let from = arguments.string("from") else { throw arguments.error("--from FILE is required (a 'migrate --json' report or a 'migrate --stats' file)") }
        let output = arguments.string("output") ?? (from.hasSuffix(".json") ? String(from.dropLast(5)) : from) + ".svg"
        let data = try readFile(from)
        let report = try readReport(String(decoding: data, as: UTF8.self), path: from)
        try write(MigrationPlot.svg(report: report), to: output)
        printError("dirtymig: wrote \(output)")
        return 0
    }

    /// A report object, or stats lines turned into a report with only its passes.
    static func readReport(_ text: String, path: String) throws -> JSONValue {
        if let report = try? JSONValue.parse(text), report["passes"] != nil || report["timeline"] != nil { return report }
        var passes: [JSONValue] = []
        var postcopy: JSONValue = .null
        for (number, line) in text.split(separator: "\n").enumerated() where !line.allSatisfy(\.isWhitespace) {
            let parsed = try? JSONValue.parse(String(line))
            if let parsed, parsed["phase"]?.stringValue == "post-copy" {   // the last line of a --postcopy migration
                postcopy = parsed
                continue
            }
            guard let pass = parsed, pass["iteration"] != nil else {
                throw RuntimeFailure("\(path) line \(number + 1) is neither a 'migrate --json' report nor a 'migrate --stats' line")
            }
            passes.append(pass)
        }
        guard !passes.isEmpty else { throw RuntimeFailure("\(path) holds no migration report or stats lines") }
        return ["passes": .array(passes), "iterations": .number(passes.count), "postcopy": postcopy]
    }

    /// The whole file, or a failure that says why not ("No such file or directory").
    static func readFile(_ path: String) throws -> Data {
        func failure(_ errno: Int32) -> RuntimeFailure { RuntimeFailure("cannot read \(path): \(String(cString: strerror(errno)))") }
        let file: FileDescriptor
        do { file = try FileDescriptor.open(path, flags: O_RDONLY | O_CLOEXEC) } catch { throw failure(error.errno) }
        defer { file.close() }
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let got = read(file.rawValue, &buffer, buffer.count)
            if got == 0 { return data }
            if got < 0 {
                if errno == EINTR { continue }
                throw failure(errno)
            }
            data.append(contentsOf: buffer[..<got])
        }
    }

    static func write(_ svg: String, to path: String) throws {
        do { try Data(svg.utf8).write(to: URL(fileURLWithPath: path)) } catch {
            throw RuntimeFailure("cannot write \(path): \(error.localizedDescription)")
        }
    }
}
