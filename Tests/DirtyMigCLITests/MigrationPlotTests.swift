@testable import DirtyMigCLI
import DirtyMigCore
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import XCTest

/// The SVG plot of a migration report: synthetic reports, no VM. Set MIGRATION_PLOT_DIR to a
/// directory to have the pictures written there to look at (plot-short.svg, plot-long.svg, and
/// the odd cases: plot-failed.svg, plot-passes.svg, plot-nulls-N.svg); rsvg-convert makes PNGs.
final class MigrationPlotTests: XCTestCase {
    // MARK: - Synthetic reports

    private static let mib = 1_048_576.0

    /// An idle 512 MiB guest: setup, one pre-copy pass, a 12 ms stop-and-copy; 0.4 s, 6 samples.
    static func shortReport() -> JSONValue {
        let times: [Double] = [0, 0.08, 0.16, 0.24, 0.32, 0.4]
        let passEnds = [0.388, 0.4]
        let timeline: [JSONValue] = times.enumerated().map { index, t in
            let setup = t < 0.05
            let done = index == times.count - 1
            let remaining = setup || done ? JSONValue.null : .number(512 * mib * (passEnds[0] - t) / (passEnds[0] - 0.05))
            return [
                "t_s": .number(t), "phase": .string(setup ? "setup" : done ? "completed" : "pre-copy"),
                "pass": .number(setup ? 0 : done ? 2 : 1), "sent_bytes": .number(setup ? 0 : (t - 0.05) * 1500 * mib),
                "remaining_bytes": remaining,
                "throughput_mib_s": .number(setup ? 0 : done ? 1320 : 1500 - 40 * Double(index)),
                "dirty_pages_s": setup ? .null : .number(180 + 20 * Double(index)),
                "expected_downtime_ms": index < 2 || done ? .null : .number(2.1 + 0.4 * Double(index)),
                "throttle_percent": 0, "paused": false,
            ]
        }
        let passes: [JSONValue] = [
            ["iteration": 1, "time_s": .number(passEnds[0]), "bytes_sent": .number(512 * mib), "pages_sent": 131_072,
             "pages_dirtied": 70, "dirty_pages_s": 207.1, "bandwidth_mib_s": 1514.8, "expected_downtime_ms": 3.4,
             "tracking_lost": false, "throttle": nil],
            ["iteration": 2, "time_s": .number(passEnds[1]), "bytes_sent": 286_720, "pages_sent": 70, "pages_dirtied": 0,
             "dirty_pages_s": 0, "bandwidth_mib_s": 1210.0, "expected_downtime_ms": 0, "tracking_lost": false, "throttle": nil],
        ]
        return [
            "status": "completed", "error": nil, "destination": "127.0.0.1:4444",
            "total_ms": 400.0, "setup_ms": 50.0, "downtime_ms": 12.0, "iterations": 2,
            "transferred_bytes": .number(512 * mib + 286_720), "throughput_mib_s": 1280.7,
            "track": "ring", "downtime_limit_ms": 300.0,
            "throttle": ["kind": "dirty-limit", "started_s": nil, "started_in_pass": nil, "tightened": 0, "final": nil],
            "passes": .array(passes), "timeline": .array(timeline),
        ]
    }

    /// A 2 GiB guest that dirties 620 MiB/s over a 400 MiB/s link: 12 passes over 20 s, 200
    /// samples; the cpu throttle starts after pass 2 and rises to 80 %, after which the dirty
    /// rate falls below the throughput and the passes shrink; a 120 ms pause at the end.
    static func longReport() -> JSONValue {
        let setup = 0.15
        let passEnds = [5.2, 9.0, 11.8, 13.9, 15.5, 16.8, 17.8, 18.6, 19.2, 19.6, 19.88, 20.0]
        let passStarts = [setup] + passEnds.dropLast()
        // The throttle during each pass: decided at the end of the one before.
        let throttles: [Double] = [0, 0, 20, 30, 40, 50, 60, 70, 80, 80, 80, 80]
        let bandwidth = 400.0, guestRate = 620.0, workingSet = 1536.0
        func passIndex(_ t: Double) -> Int? { t < setup ? nil : passEnds.firstIndex { t <= $0 + 1e-9 } }
        func wobble(_ t: Double) -> Double { sin(t * 3.1) * 0.05 + sin(t * 17.3) * 0.03 }

        var timeline: [JSONValue] = []
        var sent = 0.0
        for index in 1...200 {
            let t = Double(index) / 10
            let done = index == 200
            guard let k = passIndex(t), !done else {
                let isSetup = t < setup
                timeline.append([
                    "t_s": .number(t), "phase": .string(isSetup ? "setup" : "completed"), "pass": .number(isSetup ? 0 : 12),
                    "sent_bytes": .number(sent * mib), "remaining_bytes": isSetup ? nil : 0,
                    "throughput_mib_s": .number(isSetup ? 0 : bandwidth), "dirty_pages_s": nil,
                    "expected_downtime_ms": nil, "throttle_percent": 0, "paused": false,
                ])
                continue
            }
            let paused = k == passEnds.count - 1
            let throughput = bandwidth * (1 + wobble(t))
            sent += throughput * 0.1
            let dirty = paused ? 0 : guestRate * (1 - throttles[k] / 100) * (1 + wobble(t * 1.7))
            let length = passEnds[k] - passStarts[k]
            let remaining = bandwidth * length * (passEnds[k] - t) / length
            let dirtied = min(dirty * (t - passStarts[k]), workingSet)
            let expected: JSONValue = k == 0 && t < 0.7 ? .null : .number(dirtied / bandwidth * 1000)
            timeline.append([
                "t_s": .number(t), "phase": .string(paused ? "stop-and-copy" : "pre-copy"), "pass": .number(k + 1),
                "sent_bytes": .number(sent * mib), "remaining_bytes": .number(max(0, remaining) * mib),
                "throughput_mib_s": .number(throughput), "dirty_pages_s": .number(dirty * mib / 4096),
                "expected_downtime_ms": paused ? .number(0) : expected, "throttle_percent": .number(throttles[k]),
                "paused": .bool(paused),
            ])
        }
        let passes: [JSONValue] = passEnds.indices.map { k in
            let length = passEnds[k] - passStarts[k]
            let last = k == passEnds.count - 1
            let dirty = last ? 0 : guestRate * (1 - throttles[k] / 100)
            let dirtied = min(dirty * length, workingSet)
            return [
                "iteration": .number(k + 1), "time_s": .number(passEnds[k]), "bytes_sent": .number(bandwidth * length * mib),
                "pages_sent": .number(bandwidth * length * 256), "pages_dirtied": .number(dirtied * 256),
                "dirty_pages_s": .number(dirty * 256), "bandwidth_mib_s": .number(bandwidth),
                "expected_downtime_ms": .number(last ? 0 : dirtied / bandwidth * 1000), "tracking_lost": false,
                "throttle": throttles[k] > 0 ? ["kind": "cpu", "active": true, "cpu_percent": .number(throttles[k])] : nil,
            ]
        }
        return [
            "status": "completed", "error": nil, "destination": "10.0.0.2:4444",
            "total_ms": 20000.0, "setup_ms": .number(setup * 1000), "downtime_ms": 120.0, "iterations": 12,
            "transferred_bytes": .number(sent * mib), "throughput_mib_s": .number(sent / 20),
            "track": "bitmap", "downtime_limit_ms": 300.0,
            "throttle": ["kind": "cpu", "started_s": 9.0, "started_in_pass": 2, "tightened": 6,
                         "final": ["kind": "cpu", "active": true, "cpu_percent": 80]],
            "passes": .array(passes), "timeline": .array(timeline),
        ]
    }

    // MARK: - Reading the SVG back

    /// What an XML parse of the SVG found.
    private final class Parsed: NSObject, XMLParserDelegate {
        var elements: [String: Int] = [:]
        var classes: [String: Int] = [:]
        var texts: [String] = []
        private var text: String?

        func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?,
                    attributes: [String: String]) {
            elements[name, default: 0] += 1
            if let name = attributes["class"] { classes[name, default: 0] += 1 }
            if name == "text" { text = "" }
        }

        func parser(_ parser: XMLParser, foundCharacters string: String) { text? += string }

        func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
            if name == "text", let text { texts.append(text); self.text = nil }
        }

        func contains(_ fragment: String) -> Bool { texts.contains { $0.contains(fragment) } }
    }

    private func parse(_ svg: String, file: StaticString = #filePath, line: UInt = #line) throws -> Parsed {
        let parser = XMLParser(data: Data(svg.utf8))
        let parsed = Parsed()
        parser.delegate = parsed
        let ok = parser.parse()
        XCTAssertTrue(ok, "not well-formed XML: \(String(describing: parser.parserError))", file: file, line: line)
        XCTAssertEqual(parsed.elements["svg"], 1, file: file, line: line)
        // Only the elements the renderer is meant to use.
        XCTAssertEqual(Set(parsed.elements.keys).subtracting(["svg", "g", "path", "polyline", "rect", "line", "text"]), [],
                       file: file, line: line)
        return parsed
    }

    private func write(_ svg: String, name: String) throws {
        guard let directory = ProcessInfo.processInfo.environment["MIGRATION_PLOT_DIR"], !directory.isEmpty else { return }
        try Data(svg.utf8).write(to: URL(fileURLWithPath: directory).appendingPathComponent(name))
    }

    // MARK: - Tests

    func testShortIdleMigration() throws {
        let svg = MigrationPlot.svg(report: Self.shortReport())
        try write(svg, name: "plot-short.svg")
        let parsed = try parse(svg)
        XCTAssertTrue(parsed.texts.first?.hasPrefix("completed · total 400 ms · downtime 12 ms · 2 passes") == true,
                      parsed.texts.first ?? "no text")
        for entry in ["throughput", "guest dirty rate", "remaining to send", "expected downtime", "downtime limit 300 ms",
                      "throttle (dirty-limit)", "vCPUs paused", "pass start", "seconds since the migration started"] {
            XCTAssertTrue(parsed.contains(entry), "no '\(entry)' in the picture")
        }
        XCTAssertEqual(parsed.classes["pass-line"], 2)
        XCTAssertEqual(parsed.classes["pause"], 1)
        XCTAssertTrue(parsed.contains("paused 12 ms"))
        XCTAssertTrue(parsed.contains("pass 1"))
        XCTAssertEqual(parsed.classes["downtime-limit"], 1)
        XCTAssertFalse(parsed.contains("no samples"))
    }

    func testLongThrottledMigration() throws {
        let report = Self.longReport()
        XCTAssertEqual(report["timeline"]?.arrayValue?.count, 200)
        let svg = MigrationPlot.svg(report: report)
        try write(svg, name: "plot-long.svg")
        let parsed = try parse(svg)
        let title = try XCTUnwrap(parsed.texts.first)
        for part in ["completed", "total 20 s", "downtime 120 ms", "12 passes", "MiB sent", "track bitmap", "throttle cpu"] {
            XCTAssertTrue(title.contains(part), "title '\(title)' lacks '\(part)'")
        }
        for entry in ["throughput", "guest dirty rate", "remaining to send", "expected downtime", "downtime limit 300 ms",
                      "throttle (cpu)", "vCPUs paused", "pass start"] {
            XCTAssertTrue(parsed.contains(entry), "no '\(entry)' in the picture")
        }
        XCTAssertEqual(parsed.classes["pass-line"], 12)
        XCTAssertEqual(parsed.classes["pause"], 1)
        XCTAssertTrue(parsed.contains("paused 120 ms"))
        XCTAssertTrue(parsed.contains("ms (log)"), "expected downtime from ~90 ms to ~3.8 s wants a log axis")
        XCTAssertTrue(parsed.contains("throttle from 9 s (pass 2), tightened 6×, 80 % at the pause"))
    }

    func testFailedMigrationWithoutTimeline() throws {
        let report: JSONValue = [
            "status": "failed", "error": "cannot connect to 10.0.0.9:4444 <refused> & \"gone\"", "destination": "10.0.0.9:4444",
            "total_ms": 3.2, "setup_ms": 0, "downtime_ms": 0, "iterations": 0, "transferred_bytes": 0,
            "throughput_mib_s": 0, "track": "quota", "throttle": ["kind": "dirty-quota"], "passes": [],
        ]
        let svg = MigrationPlot.svg(report: report)
        try write(svg, name: "plot-failed.svg")
        let parsed = try parse(svg)
        XCTAssertTrue(parsed.texts.first?.hasPrefix("failed · total 3.2 ms") == true)
        XCTAssertTrue(parsed.contains("error: cannot connect to 10.0.0.9:4444 <refused> & \"gone\""))
        XCTAssertTrue(svg.contains("&lt;refused&gt; &amp; &quot;gone&quot;"))
        XCTAssertTrue(parsed.contains("no samples"))
        XCTAssertNil(parsed.classes["pass-line"])
        XCTAssertNil(parsed.classes["pause"])
    }

    func testPassesWithoutTimeline() throws {
        var report = Self.longReport()
        report["timeline"] = nil
        let svg = MigrationPlot.svg(report: report)
        try write(svg, name: "plot-passes.svg")
        let parsed = try parse(svg)
        XCTAssertTrue(parsed.contains("no timeline: drawn from the 12 passes"))
        XCTAssertEqual(parsed.classes["pass-line"], 12)
        XCTAssertEqual(parsed.classes["pause"], 1)
        XCTAssertFalse(parsed.contains("no samples"))
    }

    /// A pass that moved under 1 MiB measured a round trip, not the link: its absurd rate does
    /// not stretch the rate panel (a 2.4 MB pass at 4,010 MiB/s did).
    func testATinyPassDoesNotStretchTheRatePanel() throws {
        var report = Self.longReport()
        report["timeline"] = nil
        var passes = report["passes"]?.arrayValue ?? []
        var tiny = passes[passes.count - 1]
        tiny["bytes_sent"] = .number(600_000); tiny["pages_sent"] = .number(146); tiny["bandwidth_mib_s"] = .number(4010)
        passes[passes.count - 1] = tiny
        report["passes"] = .array(passes)
        let parsed = try parse(MigrationPlot.svg(report: report))
        XCTAssertFalse(parsed.texts.contains { $0.hasPrefix("4k") || $0.hasPrefix("4,0") || $0 == "4000" }, "\(parsed.texts)")
    }

    func testNullsEverywhere() throws {
        let keys = ["status", "error", "total_ms", "setup_ms", "downtime_ms", "iterations", "transferred_bytes",
                    "throughput_mib_s", "track", "destination", "throttle", "passes", "timeline", "downtime_limit_ms"]
        let allNull = JSONValue.object(keys.map { ($0, JSONValue.null) })
        let sampleKeys = ["t_s", "phase", "pass", "sent_bytes", "remaining_bytes", "throughput_mib_s", "dirty_pages_s",
                          "expected_downtime_ms", "throttle_percent", "paused"]
        let passKeys = ["iteration", "time_s", "bytes_sent", "pages_sent", "pages_dirtied", "dirty_pages_s", "bandwidth_mib_s",
                        "expected_downtime_ms", "tracking_lost", "throttle"]
        var nullInside = allNull
        nullInside["throttle"] = ["kind": nil, "started_s": nil, "final": nil]
        nullInside["timeline"] = [nil, .object(sampleKeys.map { ($0, .null) }), ["t_s": 1.5], ["t_s": 0.5, "paused": true]]
        nullInside["passes"] = [nil, .object(passKeys.map { ($0, .null) }), ["time_s": 2]]
        // Wrong types and extreme numbers.
        let odd: JSONValue = [
            "status": 7, "total_ms": "long", "downtime_ms": -5, "iterations": 1e300, "passes": "none",
            "timeline": [["t_s": 1e300, "throughput_mib_s": -1, "remaining_bytes": 1e300, "expected_downtime_ms": 1e-300,
                          "throttle_percent": 250, "paused": "yes"],
                         ["t_s": -4, "dirty_pages_s": 1e308, "expected_downtime_ms": 0]],
            "downtime_limit_ms": 1e-9,
        ]
        for (index, report) in ([allNull, nullInside, odd, .null, "report", [1, 2], [:]] as [JSONValue]).enumerated() {
            let svg = MigrationPlot.svg(report: report)
            try write(svg, name: "plot-nulls-\(index).svg")
            let parsed = try parse(svg)
            XCTAssertFalse(parsed.texts.isEmpty)
        }
        XCTAssertTrue(try parse(MigrationPlot.svg(report: .null)).contains("no samples"))
    }

    // MARK: - Reading positions back

    /// The text elements of one group (`<g class="NAME">`): their x, anchor and text.
    private func texts(inGroup name: String, of svg: String) -> [(x: Double, anchorEnd: Bool, text: String)] {
        guard let start = svg.range(of: "<g class=\"\(name)\">"),
              let end = svg.range(of: "</g>", range: start.upperBound..<svg.endIndex) else { return [] }
        let pattern = try! NSRegularExpression(pattern: #"<text x="([-0-9.]+)" y="[-0-9.]+" text-anchor="(start|end)"[^>]*>([^<]*)</text>"#)
        let group = String(svg[start.upperBound..<end.lowerBound])
        return pattern.matches(in: group, range: NSRange(group.startIndex..., in: group)).map { match in
            func part(_ index: Int) -> String { String(group[Range(match.range(at: index), in: group)!]) }
            return (Double(part(1))!, part(2) == "end", part(3))
        }
    }

    /// The points of the line drawn in group `name` (its last path: an area's outline, or a line).
    private func linePoints(inGroup name: String, of svg: String) -> [(x: Double, y: Double)] {
        guard let start = svg.range(of: "<g class=\"\(name)\">"),
              let end = svg.range(of: "</g>", range: start.upperBound..<svg.endIndex) else { return [] }
        let group = String(svg[start.upperBound..<end.lowerBound])
        let paths = try! NSRegularExpression(pattern: #"<path d="([^"]*)" fill="none""#)
        guard let last = paths.matches(in: group, range: NSRange(group.startIndex..., in: group)).last else { return [] }
        let d = String(group[Range(last.range(at: 1), in: group)!])
        let point = try! NSRegularExpression(pattern: #"[ML]([-0-9.]+) ([-0-9.]+)"#)
        return point.matches(in: d, range: NSRange(d.startIndex..., in: d)).map { match in
            (Double(String(d[Range(match.range(at: 1), in: d)!]))!, Double(String(d[Range(match.range(at: 2), in: d)!]))!)
        }
    }

    /// The plot's frame: x from 62 to 882 in a 900 px picture (MigrationPlot.Renderer).
    private static let plotLeft = 62.0, plotRight = 882.0

    /// Passes that crowd the end of a migration (five in the last 0.45 s of 3.35, as a 1 Gbit/s
    /// migration of a writing guest had them) are labelled where their labels fit: no two
    /// overlap, none leaves the plot; the others keep their lines without a label.
    func testCrowdedPassLabelsNeitherOverlapNorLeaveThePlot() throws {
        let passEnds = [1.9, 3.0, 3.25, 3.3, 3.33, 3.345, 3.35]
        for total in [3.35, 3.36, 3.4] {
            let passes: [JSONValue] = passEnds.enumerated().map { index, end in
                ["iteration": .number(index + 1), "time_s": .number(end), "bytes_sent": .number(8 * Self.mib),
                 "pages_sent": 2048, "bandwidth_mib_s": 120, "expected_downtime_ms": 100]
            }
            let report: JSONValue = ["status": "completed", "total_ms": .number(total * 1000), "setup_ms": 10,
                                     "downtime_ms": 6.4, "passes": .array(passes)]
            let svg = MigrationPlot.svg(report: report)
            try write(svg, name: "plot-crowded.svg")
            _ = try parse(svg)
            let labels = texts(inGroup: "strip", of: svg)
            XCTAssertTrue(labels.contains { $0.text == "pass 1" }, "\(labels)")
            // The renderer's own estimate of a label's width (12 px font, 0.61 em a character):
            // the test holds it to what it promised itself.
            let boxes = labels.map { label -> (lower: Double, upper: Double, text: String) in
                let width = Double(label.text.count) * 12 * 0.61
                return label.anchorEnd ? (label.x - width, label.x, label.text) : (label.x, label.x + width, label.text)
            }
            for box in boxes {
                XCTAssertGreaterThanOrEqual(box.lower, Self.plotLeft, "'\(box.text)' starts left of the plot (total \(total) s)")
                XCTAssertLessThanOrEqual(box.upper, Self.plotRight, "'\(box.text)' runs past the plot's right edge (total \(total) s)")
            }
            for (index, box) in boxes.enumerated() {
                for other in boxes[(index + 1)...] {
                    let sameRow = svg.contains(">\(box.text)</text>") && rowOf(box.text, svg) == rowOf(other.text, svg)
                    XCTAssertFalse(sameRow && box.lower < other.upper && other.lower < box.upper,
                                   "'\(box.text)' and '\(other.text)' overlap (total \(total) s)")
                }
            }
        }
    }

    /// The baseline (y) of the strip label `text`.
    private func rowOf(_ text: String, _ svg: String) -> String? {
        let pattern = try! NSRegularExpression(pattern: #"<text x="[-0-9.]+" y="([-0-9.]+)"[^>]*>"# + NSRegularExpression.escapedPattern(for: text) + "</text>")
        guard let match = pattern.firstMatch(in: svg, range: NSRange(svg.startIndex..., in: svg)) else { return nil }
        return String(svg[Range(match.range(at: 1), in: svg)!])
    }

    /// A dirty-limit throttle that started at 1.04 s, as the timeline recorded it: the writer
    /// (vCPU 0) held from the sample after the start, the reader never. The panel shows the
    /// writer's share from that sample on (not the average over vCPUs, nor a figure refreshed
    /// only at pass ends, which read 0 until 2.0 s and 44 % after) and says whose it is.
    func testThrottlePanelShowsTheHeldVCPUFromItsStart() throws {
        let times = (1...30).map { Double($0) / 10 }
        let timeline: [JSONValue] = times.map { t in
            let writer = t < 1.04 ? 0.0 : t < 1.15 ? 59.0 : 94.0
            return ["t_s": .number(t), "phase": "pre-copy", "pass": .number(t <= 1.9 ? 1 : 2),
                    "remaining_bytes": .number(100 * Self.mib), "throughput_mib_s": 120, "dirty_pages_s": 25_000,
                    "expected_downtime_ms": t <= 1.9 ? nil : 900,
                    // What the recorder used to write: an average refreshed at pass ends.
                    "throttle_percent": .number(t < 2 ? 0 : 44),
                    "cpu_throttle_percent": 0, "held_percent": [.number(writer), 0], "paused": false]
        }
        let report: JSONValue = [
            "status": "completed", "total_ms": 3000, "setup_ms": 10, "downtime_ms": 6, "track": "ring",
            "throttle": ["kind": "dirty-limit", "started_s": 1.04, "started_in_pass": 1, "tightened": 0,
                         "final": ["kind": "dirty-limit", "active": true, "ceiling_mib_s": [29.7, 14.9]]],
            "passes": [["iteration": 1, "time_s": 1.9, "bytes_sent": .number(220 * Self.mib)],
                       ["iteration": 2, "time_s": 3.0, "bytes_sent": .number(130 * Self.mib)]],
            "timeline": .array(timeline),
        ]
        let svg = MigrationPlot.svg(report: report)
        try write(svg, name: "plot-held.svg")
        let parsed = try parse(svg)
        XCTAssertTrue(parsed.contains("throttle (dirty-limit) from 1.04 s: share of time vCPU 0 was held (ceiling 29.7 MiB/s at the pause); vCPU 1 never held"),
                      "\(parsed.texts)")
        XCTAssertEqual(parsed.classes["throttle-start"], 1)
        let points = linePoints(inGroup: "throttle", of: svg)
        XCTAssertEqual(points.count, times.count)
        // x of each sample: 3 s over the plot's 820 px.
        func y(at t: Double) throws -> Double {
            let x = Self.plotLeft + t / 3 * (Self.plotRight - Self.plotLeft)
            return try XCTUnwrap(points.first { abs($0.x - x) < 0.2 }, "no point at \(t) s").y
        }
        let floor = try y(at: 1.0)
        XCTAssertLessThan(try y(at: 1.1), floor - 10, "the throttle shows from the first sample after it started")
        XCTAssertLessThan(try y(at: 1.5), try y(at: 1.1), "94 % held is drawn above 59 %")
        XCTAssertEqual(try y(at: 0.5), floor, "nothing held before the start")
    }

    /// A migration too short for its timeline to hold an expected downtime (the first pass has
    /// none until it ends; 2 samples in 200 ms) draws the figure each pass measured.
    func testShortMigrationDrawsEachPassesExpectedDowntime() throws {
        let report: JSONValue = [
            "status": "completed", "total_ms": 201, "setup_ms": 8, "downtime_ms": 58.4, "downtime_limit_ms": 300,
            "throttle": ["kind": "dirty-limit", "started_s": nil],
            "passes": [["iteration": 1, "time_s": 0.143, "bytes_sent": 25_227_772, "pages_sent": 12303,
                        "bandwidth_mib_s": 190, "expected_downtime_ms": 68.97],
                       ["iteration": 2, "time_s": 0.199, "bytes_sent": 11_000_000, "pages_sent": 2700,
                        "bandwidth_mib_s": 200, "expected_downtime_ms": 0]],
            "timeline": [["t_s": 0.101, "phase": "pre-copy", "pass": 1, "remaining_bytes": 33_615_872, "throughput_mib_s": 158,
                          "expected_downtime_ms": nil, "throttle_percent": 0, "held_percent": [0, 0], "paused": false],
                         ["t_s": 0.201, "phase": "completed", "pass": 1, "remaining_bytes": 0, "throughput_mib_s": 0,
                          "expected_downtime_ms": nil, "throttle_percent": 0, "held_percent": [], "paused": false]],
        ]
        let svg = MigrationPlot.svg(report: report)
        try write(svg, name: "plot-short-passes.svg")
        let parsed = try parse(svg)
        XCTAssertFalse(parsed.contains("no samples"), "\(parsed.texts)")
        XCTAssertTrue(parsed.contains("share of time a vCPU was held (none was)"), "no vCPU named when none was held: \(parsed.texts)")
        let points = linePoints(inGroup: "expected-downtime", of: svg)
        XCTAssertEqual(points.count, 2, "one point at each pass's end")
        XCTAssertEqual(points.first?.x ?? 0, Self.plotLeft + 0.143 / 0.201 * (Self.plotRight - Self.plotLeft), accuracy: 0.2)
    }

    /// Post-copy after pass 1 at 2.15 s of 4.3: the pause is drawn at the switch (where the
    /// guest stopped), the switch has its own labelled line, the dirty rate stops there (the
    /// source no longer sees the guest's writes), and the header gives post-copy's figures.
    func testPostCopyShowsTheSwitchItsPauseAndItsFigures() throws {
        let times = stride(from: 0.1, through: 4.2, by: 0.1).map { $0 }
        let timeline: [JSONValue] = times.map { t in
            let post = t > 2.15
            return ["t_s": .number(t), "phase": .string(post ? "post-copy" : "pre-copy"), "pass": 1,
                    "remaining_bytes": .number(post ? (4.3 - t) / 2.15 * 128 * Self.mib : (2.15 - t) / 2.15 * 128 * Self.mib),
                    "throughput_mib_s": 60, "dirty_pages_s": .number(post ? 0 : 76_800), "expected_downtime_ms": nil,
                    "throttle_percent": 0, "paused": false]
        } + [["t_s": 4.3, "phase": "completed", "pass": 1, "remaining_bytes": 0, "throughput_mib_s": 0, "paused": false]]
        let report: JSONValue = [
            "status": "completed", "total_ms": 4300, "setup_ms": 12.9, "downtime_ms": 21.4, "downtime_limit_ms": 300,
            "iterations": 1, "transferred_bytes": .number(256 * Self.mib),
            "passes": [["iteration": 1, "time_s": 2.15, "bytes_sent": .number(128 * Self.mib), "pages_sent": 32768,
                        "bandwidth_mib_s": 60, "dirty_pages_s": 76_800, "expected_downtime_ms": 2130]],
            "postcopy": ["reason": "the guest dirtied 59.9 MiB/s against 60.0 MiB/s of bandwidth", "after_passes": 1,
                         "switched_at_ms": 2153.2, "lacking_pages": 32769, "requested_pages": 588, "answered_pages": 76,
                         "pushed_pages": 32693, "faults": 588, "fault_latency_us": ["p50": 3452, "p99": 4832, "max": 6060]],
            "timeline": .array(timeline),
        ]
        let svg = MigrationPlot.svg(report: report)
        try write(svg, name: "plot-postcopy.svg")
        let parsed = try parse(svg)
        XCTAssertTrue(parsed.contains("post-copy after pass 1"), "\(parsed.texts)")
        XCTAssertTrue(parsed.contains("post-copy: 32769 pages lacking (76 sent on request)"), "\(parsed.texts)")
        XCTAssertTrue(parsed.contains("588 faults, p50 3452 µs, p99 4832 µs"), "\(parsed.texts)")
        XCTAssertTrue(parsed.texts.contains("post-copy"), "the switch's line is labelled: \(parsed.texts)")
        XCTAssertEqual(parsed.classes["postcopy-line"], 1)
        XCTAssertTrue(parsed.contains("then the pages the destination lacks"))
        // The pause band starts at the switch, not at the end.
        let band = try XCTUnwrap(svg.range(of: #"class="pause" d="M([0-9.]+)"#, options: .regularExpression))
        let left = Double(svg[band].split(separator: "M").last!)!
        let switchX = Self.plotLeft + 2.1532 / 4.3 * (Self.plotRight - Self.plotLeft)
        XCTAssertEqual(left, switchX, accuracy: 3, "the pause is at the switch")
        // The dirty rate ends at the switch.
        let dirty = linePoints(inGroup: "dirty-rate", of: svg)
        XCTAssertFalse(dirty.isEmpty)
        XCTAssertLessThanOrEqual(dirty.map(\.x).max() ?? 0, switchX + 1, "no dirty rate after the switch")
    }

    /// A --stats file of a post-copy migration ends with its post-copy line: the plot reads it
    /// as the report's post-copy figures, not as a pass.
    func testAStatsFileWithAPostCopyLineIsDrawnWithItsSwitch() throws {
        let stats = """
        {"iteration":1,"time_s":2.15,"bytes_sent":134217728,"pages_sent":32768,"bandwidth_mib_s":60,"expected_downtime_ms":2130}
        {"phase":"post-copy","after_passes":1,"switched_at_ms":2153.2,"lacking_pages":32769,"answered_pages":76,"faults":588}

        """
        let report = try PlotCommand.readReport(stats, path: "stats.jsonl")
        XCTAssertEqual(report["passes"]?.arrayValue?.count, 1)
        XCTAssertEqual(report["postcopy"]?["switched_at_ms"]?.doubleValue, 2153.2)
        let parsed = try parse(MigrationPlot.svg(report: report))
        XCTAssertTrue(parsed.texts.contains("post-copy"), "\(parsed.texts)")
        XCTAssertTrue(parsed.contains("post-copy after pass 1"))
        XCTAssertThrowsError(try PlotCommand.readReport("{\"phase\":\"post-copy\"}\n", path: "x"), "a post-copy line alone is no migration")
    }

    func testNiceStepsAndNumbers() {
        typealias Format = MigrationPlot.Format
        for (raw, nice) in zip([0.04, 0.3, 1, 1.2, 2.5, 7, 40, 3000], [0.05, 0.5, 1, 2, 5, 10, 50, 5000]) {
            XCTAssertEqual(Format.niceStep(raw), nice, accuracy: nice * 1e-12)
        }
        XCTAssertEqual([850, 42.5, 1.25, 0.012, 0, 1200].map(Format.compact), ["850", "42.5", "1.25", "0.012", "0", "1200"])
        XCTAssertEqual(Format.duration(milliseconds: 412), "412 ms")
        XCTAssertEqual(Format.duration(milliseconds: 1234), "1.23 s")
        XCTAssertEqual(Format.tick(0.15, step: 0.05), "0.15")
        XCTAssertEqual(Format.tick(15000, step: 5000), "15k")
    }
}
