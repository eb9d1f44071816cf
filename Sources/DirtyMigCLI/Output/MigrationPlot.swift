import DirtyMigCore
import Foundation

/// A migration report (what `migrate --json` prints) drawn as one SVG picture, written by hand:
/// no dependency beyond Foundation, only `<svg>`, `<g>`, `<path>`, `<rect>`, `<line>` and `<text>`.
///
/// Four panels share the time axis (seconds since the migration started):
/// 1. the rates, MiB/s: what went on the wire, and what the guest dirtied (pages/s × 4 KiB);
/// 2. what the current pass still has to send, MiB;
/// 3. the expected downtime, ms, with the `--downtime` limit as a dashed line;
/// 4. the throttle, percent.
/// Pass starts are thin dashed vertical lines labelled "pass N" above the panels (as many as
/// fit without overlapping), and the pause (the downtime) is a grey band across all panels,
/// labelled with its length under the time axis. Each panel's unit and legend sit in a header
/// line above it, so no legend covers data.
///
/// The report is read defensively: any field may be missing, null or of the wrong type, and the
/// picture then shows what is there ("no samples" where a panel has nothing).
enum MigrationPlot {
    static func svg(report: JSONValue) -> String {
        Renderer(model: Model(report: report)).document()
    }
}

// MARK: - What is drawn, read from the report

extension MigrationPlot {
    fileprivate static let bytesPerMiB = 1_048_576.0
    fileprivate static let pageBytes = 4096.0

    /// A finite number, or nil (missing, null, not a number).
    fileprivate static func number(_ value: JSONValue?) -> Double? {
        guard let value = value?.doubleValue, value.isFinite else { return nil }
        return value
    }

    /// A value still finite after a unit conversion (1e308 pages/s is not, in MiB/s).
    fileprivate static func finite(_ value: Double?) -> Double? {
        guard let value, value.isFinite else { return nil }
        return value
    }

    /// A number as an Int, or nil; huge values are nil rather than a trap.
    fileprivate static func integer(_ value: JSONValue?) -> Int? {
        guard let value = number(value), abs(value) < 1e15 else { return nil }
        return Int(value.rounded())
    }

    /// One point of a series; a nil value breaks the line there (a null in the report).
    fileprivate struct Point {
        var t: Double
        var value: Double?
    }

    fileprivate struct Series {
        var points: [Point] = []
        /// Small squares at the points: when there are few of them, so that a lone sample (which
        /// makes no line) still shows, and the reader sees how sparse the data is.
        var markers = false
        var hasValues: Bool { points.contains { $0.value != nil } }
        var maxValue: Double? { points.compactMap(\.value).max() }
    }

    /// An interval on the time axis with a label (the pause).
    fileprivate struct Band {
        var start: Double
        var end: Double
        var label: String
    }

    fileprivate struct PassStart {
        var number: Int
        var t: Double
        /// A line that is not a pass's start: the switch to post-copy ("post-copy").
        var label: String? = nil
    }

    /// One `timeline` sample.
    private struct Sample {
        var t: Double
        var pass: Int?
        var throughput: Double?
        var dirtyMiB: Double?
        var remainingMiB: Double?
        var expectedMs: Double?
        var throttle: Double?
        /// Each vCPU's share of the time since the sample before that it was held, percent
        /// (nil in reports from before it was recorded).
        var held: [Double]?
        var paused: Bool
        /// "pre-copy", "post-copy", ... (nil in reports from before it was recorded).
        var phase: String?
    }

    /// One `passes` entry.
    private struct Pass {
        var number: Int
        var end: Double?
        var pagesSent: Double?
        var bandwidth: Double?
        var dirtyMiB: Double?
        var expectedMs: Double?
        var throttle: Double?
    }

    fileprivate struct Model {
        var title = ""
        var details = ""
        var error: String?
        /// Says where the data came from when it is not the timeline.
        var note: String?
        var throughput = Series(), dirty = Series(), remaining = Series(), expectedDowntime = Series(), throttle = Series()
        var passStarts: [PassStart] = []
        var pauses: [Band] = []
        var setupEnd: Double?
        var downtimeLimitMs: Double?
        var throttleKind: String?
        /// What the throttle panel shows, for its legend.
        var throttleMeaning = "how hard the guest is held"
        /// When the throttle first applied (the report's `started_s`).
        var throttleStart: Double?
        /// When the migration switched to post-copy (the report's `postcopy.switched_at_ms`).
        var postcopyStart: Double?
        /// The end of the time axis, seconds (> 0).
        var duration = 1.0

        init(report: JSONValue) {
            let totalS = number(report["total_ms"]).map { $0 / 1000 }
            let setupS = number(report["setup_ms"]).flatMap { $0 >= 0 ? $0 / 1000 : nil }
            let downtimeMs = number(report["downtime_ms"])
            let throttleReport = report["throttle"]
            throttleKind = throttleReport?["kind"]?.stringValue
            downtimeLimitMs = number(report["downtime_limit_ms"]).flatMap { $0 > 0 ? $0 : nil }
            error = report["error"]?.stringValue
            setupEnd = setupS

            var samples = Model.samples(report["timeline"])
            let postcopy = report["postcopy"]
            postcopyStart = number(postcopy?["switched_at_ms"]).flatMap { $0 >= 0 ? $0 / 1000 : nil }
            // After the switch the guest runs at the destination: the source sees none of its
            // writes, and its dirty rate there is unknown, not zero.
            for index in samples.indices where samples[index].phase == "post-copy" { samples[index].dirtyMiB = nil }
            let passes: [Pass] = (report["passes"]?.arrayValue ?? []).enumerated().map { index, pass in
                Pass(number: integer(pass["iteration"]) ?? index + 1,
                     end: number(pass["time_s"]).map { max(0, $0) },
                     pagesSent: number(pass["pages_sent"]),
                     // A pass that moved under 1 MiB measured the round trip, not the link
                     // (one of 2.4 MB read 4,010 MiB/s and squashed every other pass to the floor
                     // of its panel): it draws no rate.
                     bandwidth: (number(pass["bytes_sent"]) ?? number(pass["pages_sent"]).map { $0 * pageBytes }).map { $0 >= bytesPerMiB } == false
                        ? nil : number(pass["bandwidth_mib_s"]),
                     dirtyMiB: finite(number(pass["dirty_pages_s"]).map { $0 * pageBytes / bytesPerMiB }),
                     expectedMs: number(pass["expected_downtime_ms"]),
                     // null is "no throttle yet" (0 %); an object without cpu_percent (dirty-limit,
                     // dirty-quota) has no percentage to draw.
                     throttle: pass["throttle"]?.isNull == true ? 0 : number(pass["throttle"]?["cpu_percent"]))
            }

            // Where each pass starts: the first after setup, each later one where the one before
            // ended (the sender starts the next pass at once). The timeline fills in what is missing.
            var passStartTimes: [Double?] = []
            for (index, pass) in passes.enumerated() {
                let start = index == 0
                    ? setupS ?? Model.timelineStart(of: pass.number, in: samples) ?? (pass.end == nil ? nil : 0)
                    : passes[index - 1].end ?? Model.timelineStart(of: pass.number, in: samples)
                passStartTimes.append(start.map { start in pass.end.map { min(start, $0) } ?? start })
            }
            passStarts = zip(passes, passStartTimes).compactMap { pass, start in start.map { PassStart(number: pass.number, t: $0) } }
            if passes.isEmpty { passStarts = Model.passStarts(in: samples) }
            if let postcopyStart { passStarts.append(PassStart(number: passes.count + 1, t: postcopyStart, label: "post-copy")) }

            if samples.count >= 2 || (samples.count == 1 && passes.isEmpty) {
                throughput.points = samples.map { Point(t: $0.t, value: $0.throughput) }
                dirty.points = samples.map { Point(t: $0.t, value: $0.dirtyMiB) }
                remaining.points = samples.map { Point(t: $0.t, value: $0.remainingMiB) }
                expectedDowntime.points = samples.map { Point(t: $0.t, value: $0.expectedMs) }
                throttle.points = samples.map { Point(t: $0.t, value: $0.throttle) }
                if throttleKind == "dirty-limit" || throttleKind == "dirty-quota",
                   let held = Model.mostHeldVCPU(samples, ceilings: throttleReport?["final"]?["ceiling_mib_s"]?.arrayValue) {
                    throttle.points = held.points
                    throttleMeaning = held.meaning
                } else if throttleKind == "cpu" {
                    throttleMeaning = "share of time every vCPU is held"
                }
                let few = samples.count <= 12
                for keyPath in [\Model.throughput, \.dirty, \.remaining, \.expectedDowntime, \.throttle] as [WritableKeyPath<Model, Series>] {
                    self[keyPath: keyPath].markers = few
                }
            } else if !passes.isEmpty {
                // No timeline (an older or failed migration, or one too short for 2 samples): the
                // passes give averages per pass, drawn as steps over each pass, and values at the
                // end of each pass, drawn as points.
                note = "no timeline: drawn from the \(passes.count) pass\(passes.count == 1 ? "" : "es")"
                for (pass, start) in zip(passes, passStartTimes) {
                    guard let end = pass.end else { continue }
                    let start = start ?? end
                    throughput.points += [Point(t: start, value: pass.bandwidth), Point(t: end, value: pass.bandwidth)]
                    dirty.points += [Point(t: start, value: pass.dirtyMiB), Point(t: end, value: pass.dirtyMiB)]
                    // What the pass had to send at its start, nothing at its end: the sawtooth
                    // the timeline would show, with the pass's send rate taken as steady.
                    let toSend = finite(pass.pagesSent.map { $0 * pageBytes / bytesPerMiB })
                    remaining.points += [Point(t: start, value: toSend), Point(t: end, value: toSend == nil ? nil : 0)]
                    expectedDowntime.points.append(Point(t: end, value: pass.expectedMs))
                    throttle.points.append(Point(t: end, value: pass.throttle))
                }
                expectedDowntime.markers = true
                throttle.markers = true
            }
            // The timeline has an expected downtime only once a pass has ended (the first is
            // null): in a migration shorter than a few samples it has none, though every pass
            // that ended measured one (a 200 ms migration drew "no samples" over two passes'
            // figures). The value at each pass's end goes in at its exact time.
            let passEstimates = zip(passes, passStartTimes).compactMap { pass, _ -> Point? in
                guard let end = pass.end, let value = pass.expectedMs else { return nil }
                return Point(t: end, value: value)
            }
            if !samples.isEmpty, !passEstimates.isEmpty, expectedDowntime.points.filter({ $0.value != nil }).count < 2 {
                expectedDowntime.points = Model.merged(expectedDowntime.points.filter { $0.value != nil }, passEstimates)
                expectedDowntime.markers = true
            }
            throttleStart = number(throttleReport?["started_s"]).flatMap { $0 >= 0 ? $0 : nil }

            pauses = Model.pauses(in: samples)
            if let downtimeMs, downtimeMs > 0, let postcopyStart {
                // Post-copy's pause is at the switch: the guest then runs on at the destination.
                pauses = [Band(start: postcopyStart, end: postcopyStart + downtimeMs / 1000, label: "paused " + Format.milliseconds(downtimeMs))]
            } else if let downtimeMs, downtimeMs > 0 {
                // The sender measures the downtime from the pause to the destination's "resumed"
                // and takes total_ms right after, so the pause ends at total_ms. The timeline's
                // paused samples are 100 ms apart and would only bracket it.
                let end = totalS ?? pauses.last?.end ?? samples.last?.t ?? passes.compactMap(\.end).max() ?? downtimeMs / 1000
                if !pauses.isEmpty { pauses.removeLast() }
                pauses.append(Band(start: max(0, end - downtimeMs / 1000), end: max(0, end),
                                   label: "paused " + Format.milliseconds(downtimeMs)))
            }

            let ends = [totalS, setupS, samples.last?.t, passes.compactMap(\.end).max(), pauses.map(\.end).max()]
            let end = ends.compactMap { $0 }.max() ?? 0
            duration = end > 0 ? end : 1

            title = Model.title(report, passCount: passes.isEmpty ? integer(report["iterations"]) : passes.count,
                                throttleKind: throttleKind)
            details = Model.details(report, setupS: setupS)
            if postcopyStart != nil, let figures = Model.postcopyDetails(postcopy) { details += " · " + figures }
        }

        private static func samples(_ timeline: JSONValue?) -> [Sample] {
            let samples: [Sample] = (timeline?.arrayValue ?? []).compactMap { sample in
                // A sample without a time cannot be placed.
                guard let t = number(sample["t_s"]) else { return nil }
                return Sample(t: max(0, t), pass: integer(sample["pass"]),
                              throughput: number(sample["throughput_mib_s"]),
                              dirtyMiB: finite(number(sample["dirty_pages_s"]).map { $0 * pageBytes / bytesPerMiB }),
                              remainingMiB: number(sample["remaining_bytes"]).map { $0 / bytesPerMiB },
                              expectedMs: number(sample["expected_downtime_ms"]),
                              throttle: number(sample["throttle_percent"]),
                              held: sample["held_percent"]?.arrayValue.map { $0.map { number($0) ?? 0 } },
                              paused: sample["paused"]?.boolValue ?? false,
                              phase: sample["phase"]?.stringValue)
            }
            // In time order, whatever the report's order; equal times keep theirs.
            return samples.enumerated().sorted { ($0.element.t, $0.offset) < ($1.element.t, $1.offset) }.map(\.element)
        }

        /// Two series as one, in time order (at equal times the first's point first).
        private static func merged(_ first: [Point], _ second: [Point]) -> [Point] {
            (first.map { ($0, 0) } + second.map { ($0, 1) }).enumerated()
                .sorted { ($0.element.0.t, $0.element.1, $0.offset) < ($1.element.0.t, $1.element.1, $1.offset) }
                .map(\.element.0)
        }

        /// A dirty-limit or dirty-quota throttle holds each vCPU by what it writes: the panel shows
        /// the vCPU held most (over the whole timeline) and says which it is, with its ceiling at
        /// the pause and how much the others were held, as `limit` lists them. An average over the
        /// vCPUs read 44 % where the writer was held 90 % of the time and the readers never.
        /// nil when the timeline has no per-vCPU figures.
        private static func mostHeldVCPU(_ samples: [Sample], ceilings: [JSONValue]?) -> (points: [Point], meaning: String)? {
            let count = samples.compactMap { $0.held?.count }.max() ?? 0
            guard count > 0 else { return nil }
            var totals = [Double](repeating: 0, count: count), peaks = totals
            for held in samples.compactMap(\.held) {
                for (vcpu, value) in held.enumerated() {
                    totals[vcpu] += value
                    peaks[vcpu] = max(peaks[vcpu], value)
                }
            }
            let vcpu = totals.indices.max { totals[$0] < totals[$1] }!
            // A sample with no figures (the one at the end, once the throttle is off) holds nobody.
            let points = samples.map { sample in
                Point(t: sample.t, value: sample.held.map { vcpu < $0.count ? $0[vcpu] : 0 })
            }
            // Nobody held (a throttle that never started): no vCPU to name.
            guard peaks[vcpu] >= 0.5 else { return (points, "share of time a vCPU was held (none was)") }
            var meaning = "share of time vCPU \(vcpu) was held"
            if let ceiling = ceilings.flatMap({ vcpu < $0.count ? number($0[vcpu]) : nil }) {
                meaning += " (ceiling " + Format.compact(ceiling) + " MiB/s at the pause)"
            }
            let others = peaks.indices.filter { $0 != vcpu }
            if let othersPeak = others.map({ peaks[$0] }).max() {
                let whom = others.count == 1 ? "vCPU \(others[0])" : "the other \(others.count) vCPUs"
                meaning += othersPeak < 0.5 ? "; \(whom) never held" : "; \(whom) at most " + Format.compact(othersPeak) + " %"
            }
            return (points, meaning)
        }

        /// When the timeline first shows pass `number`: halfway between the sample before and the
        /// first with it (samples are ~100 ms apart; the middle is the best guess).
        private static func timelineStart(of number: Int, in samples: [Sample]) -> Double? {
            guard let index = samples.firstIndex(where: { $0.pass == number }) else { return nil }
            return index > 0 ? (samples[index - 1].t + samples[index].t) / 2 : samples[index].t
        }

        /// Pass starts from the timeline alone (a report without `passes`).
        private static func passStarts(in samples: [Sample]) -> [PassStart] {
            var starts: [PassStart] = []
            var current: Int?
            for (index, sample) in samples.enumerated() {
                guard let pass = sample.pass else { continue }
                if pass >= 1, pass != current {
                    starts.append(PassStart(number: pass, t: index > 0 ? (samples[index - 1].t + sample.t) / 2 : sample.t))
                }
                current = pass
            }
            return starts
        }

        /// The runs of paused samples, each from halfway to the sample before to halfway to the one after.
        private static func pauses(in samples: [Sample]) -> [Band] {
            var bands: [Band] = []
            var index = 0
            while index < samples.count {
                guard samples[index].paused else { index += 1; continue }
                var last = index
                while last + 1 < samples.count && samples[last + 1].paused { last += 1 }
                let start = index > 0 ? (samples[index - 1].t + samples[index].t) / 2 : samples[index].t
                let end = last + 1 < samples.count ? (samples[last].t + samples[last + 1].t) / 2 : samples[last].t
                bands.append(Band(start: start, end: end, label: "paused ≈" + Format.milliseconds((end - start) * 1000)))
                index = last + 1
            }
            return bands
        }

        private static func title(_ report: JSONValue, passCount: Int?, throttleKind: String?) -> String {
            var parts = [report["status"]?.stringValue ?? "status unknown"]
            if let total = number(report["total_ms"]) { parts.append("total " + Format.duration(milliseconds: total)) }
            if let downtime = number(report["downtime_ms"]) { parts.append("downtime " + Format.milliseconds(downtime)) }
            if let passCount { parts.append("\(passCount) pass\(passCount == 1 ? "" : "es")") }
            if let after = integer(report["postcopy"]?["after_passes"]) { parts.append("post-copy after pass \(after)") }
            if let bytes = number(report["transferred_bytes"]) { parts.append(Format.compact(bytes / bytesPerMiB) + " MiB sent") }
            if let track = report["track"]?.stringValue { parts.append("track " + track) }
            if let throttleKind { parts.append("throttle " + throttleKind) }
            return parts.joined(separator: " · ")
        }

        /// Post-copy's figures: how the lacking pages went, and what the faults cost.
        private static func postcopyDetails(_ postcopy: JSONValue?) -> String? {
            guard let postcopy else { return nil }
            var parts: [String] = []
            if let lacking = integer(postcopy["lacking_pages"]) {
                var text = "post-copy: \(lacking) pages lacking"
                if let answered = integer(postcopy["answered_pages"]) { text += " (\(answered) sent on request)" }
                parts.append(text)
            }
            if let faults = integer(postcopy["faults"]) {
                var text = "\(faults) faults"
                let latency = postcopy["fault_latency_us"]
                if let p50 = number(latency?["p50"]), let p99 = number(latency?["p99"]) {
                    text += ", p50 " + Format.compact(p50) + " µs, p99 " + Format.compact(p99) + " µs"
                }
                parts.append(text)
            }
            return parts.isEmpty ? nil : parts.joined(separator: ", ")
        }

        private static func details(_ report: JSONValue, setupS: Double?) -> String {
            var parts: [String] = []
            if let destination = report["destination"]?.stringValue, !destination.isEmpty { parts.append("to " + destination) }
            if let average = number(report["throughput_mib_s"]) { parts.append("average " + Format.compact(average) + " MiB/s") }
            if let setupS { parts.append("setup " + Format.duration(milliseconds: setupS * 1000)) }
            let throttle = report["throttle"]
            if let started = number(throttle?["started_s"]) {
                var text = "throttle from " + Format.compact(started) + " s"
                if let pass = integer(throttle?["started_in_pass"]) { text += " (pass \(pass))" }
                if let tightened = integer(throttle?["tightened"]) { text += ", tightened \(tightened)×" }
                if let cpu = number(throttle?["final"]?["cpu_percent"]) { text += ", \(Format.compact(cpu)) % at the pause" }
                parts.append(text)
            }
            return parts.joined(separator: " · ")
        }
    }
}

// MARK: - Numbers as text

extension MigrationPlot {
    /// Numbers as text (internal for the tests).
    enum Format {
        /// About three significant digits, no trailing zeros: 850, 42.5, 1.25, 0.012.
        static func compact(_ value: Double) -> String {
            guard value.isFinite else { return "?" }
            let magnitude = abs(value)
            let text: String
            if magnitude >= 1e9 {
                return String(format: "%.3g", value)
            } else if magnitude >= 100 || magnitude == 0 {
                text = String(format: "%.0f", value)
            } else if magnitude >= 10 {
                text = String(format: "%.1f", value)
            } else if magnitude >= 1 {
                text = String(format: "%.2f", value)
            } else {
                text = String(format: "%.2g", value)
            }
            return trimmed(text)
        }

        static func milliseconds(_ value: Double) -> String { compact(value) + " ms" }

        /// Milliseconds below a second, seconds above: "412 ms", "20.4 s".
        static func duration(milliseconds value: Double) -> String {
            abs(value) < 1000 ? compact(value) + " ms" : compact(value / 1000) + " s"
        }

        /// A tick label: as many decimals as the step needs (step 0.05 → "0.15"), thousands as k
        /// once the numbers get long (step 5000 → "15k").
        static func tick(_ value: Double, step: Double) -> String {
            // Absurd values (a damaged report) in exponent form rather than 300 digits.
            if abs(value) >= 1e9 || (step < 1e-6 && value != 0) { return String(format: "%.3g", value) }
            func decimals(_ step: Double) -> Int { step >= 1 ? 0 : min(6, Int((-log10(step)).rounded(.up))) }
            if abs(value) >= 10_000 && step >= 1000 {
                return trimmed(String(format: "%.\(decimals(step / 1000))f", value / 1000)) + "k"
            }
            return trimmed(String(format: "%.\(decimals(step))f", value))
        }

        private static func trimmed(_ text: String) -> String {
            var text = text
            if text.contains("."), !text.contains("e") {
                while text.hasSuffix("0") { text.removeLast() }
                if text.hasSuffix(".") { text.removeLast() }
            }
            return text == "-0" ? "0" : text
        }

        /// The step nearest above `raw` among 1, 2 and 5 × 10^n.
        static func niceStep(_ raw: Double) -> Double {
            guard raw.isFinite, raw > 0 else { return 1 }
            let magnitude = pow(10, (log10(raw)).rounded(.down))
            let normalized = raw / magnitude
            let factor: Double = normalized <= 1 ? 1 : normalized <= 2 ? 2 : normalized <= 5 ? 5 : 10
            return factor * magnitude
        }
    }
}

// MARK: - Drawing

extension MigrationPlot {
    /// A panel's value axis.
    fileprivate enum Scale {
        /// From 0 to `top`, ticks every `step` up to it.
        case linear(top: Double, step: Double)
        /// Decades from `low` to `high`.
        case log(low: Double, high: Double)

        static func fitting(_ dataMax: Double?, ticks: Int) -> Scale {
            // 5 % headroom so a line at the maximum does not run along the frame. The top is not
            // rounded up to a tick: in a short panel with 1-2-5 steps that could leave a third
            // of it empty (2080 MiB on an axis to 3000).
            let top = finite(dataMax.map { $0 * 1.05 }).flatMap { $0 > 0 ? $0 : nil } ?? 1
            return .linear(top: top, step: Format.niceStep(top / Double(ticks)))
        }

        /// Log when the values span more than a decade and a half; linear otherwise.
        static func forDowntime(values: [Double]) -> Scale {
            let positive = values.filter { $0 > 0 }
            guard let low = positive.min(), let high = positive.max(), high / low > 30 else {
                return fitting(values.max(), ticks: 3)
            }
            let top = pow(10, log10(high).rounded(.up))
            guard top.isFinite else { return fitting(values.max(), ticks: 3) }
            // At most 6 decades: below that, values sit on the bottom edge.
            let bottom = max(pow(10, log10(low).rounded(.down)), top / 1e6)
            return .log(low: bottom, high: max(top, bottom * 10))
        }

        /// 0 at the bottom of the panel, 1 at the top; values outside are clamped to the edge.
        func fraction(_ value: Double) -> Double {
            switch self {
            case .linear(let top, _):
                return min(max(value / top, 0), 1)
            case .log(let low, let high):
                guard value > low else { return 0 }
                return min((log10(value) - log10(low)) / (log10(high) - log10(low)), 1)
            }
        }

        var ticks: [(value: Double, label: String)] {
            switch self {
            case .linear(let top, let step):
                let ratio = (top / step + 1e-9).rounded(.down)
                guard ratio.isFinite, ratio >= 1, ratio <= 50 else { return [(value: 0, label: "0"), (value: top, label: Format.compact(top))] }
                return (0...Int(ratio)).map { index in (value: Double(index) * step, label: Format.tick(Double(index) * step, step: step)) }
            case .log(let low, let high):
                let decades = Int((log10(high) - log10(low)).rounded())
                // Over few decades, 2 and 5 as well, so the axis has more than two or three labels.
                let factors: [Double] = decades <= 2 ? [1, 2, 5] : [1]
                var ticks: [(value: Double, label: String)] = []
                for decade in 0...max(0, decades) {
                    let base = low * pow(10, Double(decade))
                    for factor in factors where base * factor <= high * 1.0001 {
                        let value = base * factor
                        let label = value >= 1e6 || value < 1e-3 ? String(format: "%g", value)
                            : value >= 10_000 ? Format.compact(value / 1000) + "k" : Format.compact(value)
                        ticks.append((value: value, label: label))
                    }
                }
                return ticks
            }
        }

        var isLog: Bool { if case .log = self { return true }; return false }

        /// Whether the axis can show `value`: a log axis has no place for 0 (an expected downtime
        /// of 0 means nothing is left to send; it is left out rather than drawn on the floor).
        func shows(_ value: Double) -> Bool { !isLog || value > 0 }
    }

    /// Okabe & Ito's palette: told apart with the common colour-vision deficiencies.
    fileprivate enum Colour {
        static let throughput = "#0072B2"   // blue
        static let dirty = "#D55E00"        // vermillion
        static let remaining = "#009E73"    // bluish green
        static let downtime = "#CC79A7"     // reddish purple
        static let throttle = "#E69F00"     // orange
        static let limit = "#222222"
        static let pause = "#000000"
        static let pass = "#777777"
        static let grid = "#E4E4E4"
        static let frame = "#9A9A9A"
        static let text = "#222222"
        static let muted = "#666666"
    }

    fileprivate enum Swatch {
        case line(String, dashed: Bool)
        case area(String)
        case pause
        case passLine
    }

    fileprivate struct Panel {
        var headerBaseline: Double
        var top: Double
        var bottom: Double
        var scale: Scale
        /// Bold, at the left above the tick labels: the unit of the axis.
        var unit: String
        var legend: [(Swatch, String)]
        var hasData: Bool
    }

    /// A label in the strip above the panels; a pass label has a line from its row down.
    fileprivate struct StripLabel {
        var row: Int
        var text: String
        var x: Double
        var anchorEnd: Bool
        var lower: Double
        var upper: Double
        var lineX: Double?
        /// The index in `passStarts` of the pass it labels.
        var passIndex: Int?
        var colour: String
    }

    fileprivate struct Renderer {
        let model: Model
        let width = 900.0
        let plotLeft = 62.0
        let plotRight = 882.0
        let fontSize = 12.0
        let stripRows = 2
        let stripRowHeight = 16.0

        init(model: Model) { self.model = model }

        var plotWidth: Double { plotRight - plotLeft }

        func x(_ t: Double) -> Double { plotLeft + min(max(t / model.duration, 0), 1) * plotWidth }

        /// How wide text is, roughly: DejaVu Sans and Helvetica average about 0.6 em a character
        /// in these labels (digits are 0.64 em). Used only to keep labels from overlapping, so
        /// it errs wide.
        func textWidth(_ text: String, size: Double = 12, bold: Bool = false) -> Double {
            Double(text.count) * size * (bold ? 0.66 : 0.61)
        }

        func document() -> String {
            var svg = SVGWriter()
            var y = 22.0
            let titleBaseline = y
            y += 18
            let detailsBaseline = y
            var errorBaseline: Double?
            if model.error != nil { y += 17; errorBaseline = y }
            let noteLine = model.note
            var noteBaseline: Double?
            if noteLine != nil { y += 17; noteBaseline = y }
            let stripTop = y + 8
            y = stripTop + Double(stripRows) * stripRowHeight

            var panels: [Panel] = []
            func addPanel(height: Double, scale: Scale, unit: String, legend: [(Swatch, String)], hasData: Bool) {
                let headerBaseline = y + 16
                let top = y + 22
                panels.append(Panel(headerBaseline: headerBaseline, top: top, bottom: top + height, scale: scale, unit: unit,
                                    legend: legend, hasData: hasData))
                y = top + height + 8
            }
            let rateMax = [model.throughput.maxValue, model.dirty.maxValue].compactMap { $0 }.max()
            addPanel(height: 170, scale: .fitting(rateMax, ticks: 5), unit: "MiB/s",
                     legend: [(.line(Colour.throughput, dashed: false), "throughput"),
                              (.line(Colour.dirty, dashed: false), "guest dirty rate"),
                              (.pause, "vCPUs paused"), (.passLine, "pass start")],
                     hasData: model.throughput.hasValues || model.dirty.hasValues)
            addPanel(height: 96, scale: .fitting(model.remaining.maxValue, ticks: 3), unit: "MiB",
                     legend: [(.area(Colour.remaining), model.postcopyStart == nil ? "remaining to send in the current pass"
                                : "remaining to send in the current pass, then the pages the destination lacks")],
                     hasData: model.remaining.hasValues)
            let downtimeValues = model.expectedDowntime.points.compactMap(\.value) + [model.downtimeLimitMs].compactMap { $0 }
            let downtimeScale = Scale.forDowntime(values: downtimeValues)
            var downtimeLegend: [(Swatch, String)] = [(.line(Colour.downtime, dashed: false), "expected downtime")]
            if let limit = model.downtimeLimitMs {
                downtimeLegend.append((.line(Colour.limit, dashed: true), "downtime limit " + Format.milliseconds(limit)))
            }
            addPanel(height: 110, scale: downtimeScale, unit: downtimeScale.isLog ? "ms (log)" : "ms", legend: downtimeLegend,
                     hasData: model.expectedDowntime.hasValues)
            let throttleName = "throttle" + (model.throttleKind.map { " (\($0))" } ?? "")
                + (model.throttleStart.map { " from " + Format.compact($0) + " s" } ?? "") + ": " + model.throttleMeaning
            addPanel(height: 64, scale: .linear(top: 100, step: 50), unit: "%",
                     legend: [(.area(Colour.throttle), throttleName)], hasData: model.throttle.hasValues)
            let lastBottom = panels.last!.bottom
            let height = lastBottom + 46

            svg.open("svg", [("xmlns", "http://www.w3.org/2000/svg"), ("width", fmt(width)), ("height", fmt(height)),
                             ("viewBox", "0 0 \(fmt(width)) \(fmt(height))"),
                             ("font-family", "Helvetica, Arial, 'DejaVu Sans', sans-serif"), ("font-size", fmt(fontSize)),
                             ("fill", Colour.text)])
            svg.empty("rect", [("width", fmt(width)), ("height", fmt(height)), ("fill", "#FFFFFF")])

            // Header lines, cut to the width (an error message can be long).
            // Cut where the text would really end (DejaVu Sans runs about 0.55 em a character
            // here, bold 0.58), not where textWidth, which errs wide for label spacing, says.
            let maxChars = Int((width - 16) / (fontSize * 0.55))
            svg.text(clip(model.title, Int((width - 16) / (14 * 0.58))), x: 8, y: titleBaseline,
                     [("font-size", "14"), ("font-weight", "bold")])
            svg.text(clip(model.details, maxChars), x: 8, y: detailsBaseline, [("fill", Colour.muted)])
            if let error = model.error, let errorBaseline {
                svg.text(clip("error: " + error, maxChars), x: 8, y: errorBaseline, [("fill", Colour.dirty)])
            }
            if let noteLine, let noteBaseline {
                svg.text(clip(noteLine, maxChars), x: 8, y: noteBaseline, [("fill", Colour.muted), ("font-style", "italic")])
            }

            let xStep = Format.niceStep(model.duration / 10)
            let xTicks = (0...max(0, min(100, Int((model.duration / xStep + 1e-9).rounded(.down))))).map { Double($0) * xStep }

            // Grids, frames and value axes.
            svg.open("g", [("class", "axes")])
            for panel in panels {
                for tick in xTicks {
                    svg.line(x(tick), panel.top, x(tick), panel.bottom, [("stroke", Colour.grid)])
                }
                for tick in panel.scale.ticks {
                    let y = panel.bottom - panel.scale.fraction(tick.value) * (panel.bottom - panel.top)
                    svg.line(plotLeft, y, plotRight, y, [("stroke", Colour.grid)])
                    svg.line(plotLeft - 4, y, plotLeft, y, [("stroke", Colour.frame)])
                    svg.text(tick.label, x: plotLeft - 7, y: y + 4, [("text-anchor", "end"), ("fill", Colour.muted)])
                }
                svg.empty("rect", [("x", fmt(plotLeft)), ("y", fmt(panel.top)), ("width", fmt(plotWidth)),
                                   ("height", fmt(panel.bottom - panel.top)), ("fill", "none"), ("stroke", Colour.frame)])
            }
            svg.close("g")

            // The pause: one band through all panels, at least 3 px wide so a 10 ms pause in a
            // 20 s migration still shows.
            for band in model.pauses {
                var left = x(band.start), right = x(band.end)
                if right - left < 3 {
                    right = min(plotRight, max(right, left + 3))
                    left = right - 3
                }
                let d = panels.map { "M\(fmt(left)) \(fmt($0.top))H\(fmt(right))V\(fmt($0.bottom))H\(fmt(left))Z" }.joined()
                svg.empty("path", [("class", "pause"), ("d", d), ("fill", Colour.pause), ("fill-opacity", "0.14")])
            }

            // Labels above the panels, placed so none overlaps another or crosses a pass line.
            // The pause's label goes under the time axis, at the band's foot, unless it would
            // cover the axis title there: the strip above the panels is crowded just where
            // pauses usually are, at the end, with the short last passes.
            let axisTitle = "seconds since the migration started"
            let axisTitleWidth = textWidth(axisTitle)
            var bottomSpans = [(plotLeft + plotWidth / 2 - axisTitleWidth / 2, plotLeft + plotWidth / 2 + axisTitleWidth / 2)]
            var bottomLabels: [(text: String, x: Double, anchorEnd: Bool)] = []
            var stripPauses: [Band] = []
            for band in model.pauses {
                let label = pauseLabel(band)
                let free = label.lower >= 4 && label.upper <= width - 4
                    && !bottomSpans.contains { label.lower < $0.1 + 12 && $0.0 < label.upper + 12 }
                if free {
                    bottomSpans.append((label.lower, label.upper))
                    bottomLabels.append((band.label, label.x, label.anchorEnd))
                } else {
                    stripPauses.append(band)
                }
            }
            let labels = placeStripLabels(stripTop: stripTop, pauses: stripPauses)
            let stripBottom = stripTop + Double(stripRows) * stripRowHeight
            for (index, pass) in model.passStarts.enumerated() {
                let px = x(pass.t)
                var d = panels.map { "M\(fmt(px)) \(fmt($0.top))V\(fmt($0.bottom))" }.joined()
                if let label = labels.first(where: { $0.passIndex == index }) {
                    // A labelled pass: its line also runs up to its label.
                    d = "M\(fmt(px)) \(fmt(stripTop + Double(label.row) * stripRowHeight + 2))V\(fmt(stripBottom + 2))" + d
                }
                if pass.label == nil {
                    svg.empty("path", [("class", "pass-line"), ("d", d), ("stroke", Colour.pass), ("stroke-width", "1"),
                                       ("stroke-dasharray", "3 3"), ("fill", "none")])
                } else {   // the switch to post-copy: solid, the phase changes there
                    svg.empty("path", [("class", "postcopy-line"), ("d", d), ("stroke", Colour.pass), ("stroke-width", "1.5"),
                                       ("fill", "none")])
                }
            }

            // The downtime limit.
            if let limit = model.downtimeLimitMs {
                let panel = panels[2]
                let y = panel.bottom - panel.scale.fraction(limit) * (panel.bottom - panel.top)
                svg.line(plotLeft, y, plotRight, y, [("class", "downtime-limit"), ("stroke", Colour.limit),
                                                      ("stroke-width", "1.5"), ("stroke-dasharray", "7 4")])
            }

            // The data.
            drawArea(&svg, model.remaining, panel: panels[1], colour: Colour.remaining, name: "remaining")
            drawArea(&svg, model.throttle, panel: panels[3], colour: Colour.throttle, name: "throttle")
            if let start = model.throttleStart, model.throttle.hasValues {
                // Where the throttle first applied: the samples around it bracket it 100 ms apart.
                let px = x(start), panel = panels[3]
                svg.line(px, panel.top, px, panel.bottom, [("class", "throttle-start"), ("stroke", Colour.throttle),
                                                          ("stroke-width", "1.5")])
            }
            drawLine(&svg, model.dirty, panel: panels[0], colour: Colour.dirty, width: 1.8, name: "dirty-rate")
            drawLine(&svg, model.throughput, panel: panels[0], colour: Colour.throughput, width: 2, name: "throughput")
            drawLine(&svg, model.expectedDowntime, panel: panels[2], colour: Colour.downtime, width: 2, name: "expected-downtime")

            for panel in panels where !panel.hasData {
                svg.text("no samples", x: plotLeft + plotWidth / 2, y: (panel.top + panel.bottom) / 2 + 5,
                         [("text-anchor", "middle"), ("fill", Colour.muted), ("font-size", "14")])
            }

            // Strip labels.
            svg.open("g", [("class", "strip")])
            for label in labels {
                svg.text(label.text, x: label.x, y: stripTop + Double(label.row) * stripRowHeight + 12,
                         [("text-anchor", label.anchorEnd ? "end" : "start"), ("fill", label.colour)])
            }
            svg.close("g")

            // Panel headers: the unit, then the legend, above the panel so it covers no data.
            svg.open("g", [("class", "legend")])
            for panel in panels {
                svg.text(panel.unit, x: 8, y: panel.headerBaseline, [("font-weight", "bold")])
                var cursor = max(plotLeft, 8 + textWidth(panel.unit, bold: true) + 14)
                for (swatch, label) in panel.legend {
                    drawSwatch(&svg, swatch, x: cursor, baseline: panel.headerBaseline)
                    svg.text(label, x: cursor + 27, y: panel.headerBaseline)
                    cursor += 27 + textWidth(label) + 18
                }
            }
            svg.close("g")

            // Time axis, under the last panel.
            for tick in xTicks {
                svg.line(x(tick), lastBottom, x(tick), lastBottom + 4, [("stroke", Colour.frame)])
                svg.text(Format.tick(tick, step: xStep), x: x(tick), y: lastBottom + 17,
                         [("text-anchor", "middle"), ("fill", Colour.muted)])
            }
            svg.text(axisTitle, x: plotLeft + plotWidth / 2, y: lastBottom + 36, [("text-anchor", "middle")])
            for label in bottomLabels {
                svg.text(label.text, x: label.x, y: lastBottom + 36, [("text-anchor", label.anchorEnd ? "end" : "start")])
            }

            svg.close("svg")
            return svg.output
        }

        private func clip(_ text: String, _ limit: Int) -> String {
            text.count <= limit ? text : String(text.prefix(max(0, limit - 1))) + "…"
        }

        /// Where a pause's label goes: at the band's edge on the side with room (a pause is
        /// usually at the end of the migration, so its label then reads leftwards from there).
        private func pauseLabel(_ band: Band) -> (x: Double, anchorEnd: Bool, lower: Double, upper: Double) {
            let textSpan = textWidth(band.label)
            if x((band.start + band.end) / 2) > plotLeft + plotWidth / 2 {
                let end = min(plotRight, x(band.end))
                return (end, true, end - textSpan, end)
            }
            let start = max(plotLeft, x(band.start))
            return (start, false, start, start + textSpan)
        }

        /// Pass labels ("pass N", or just "N" where that does not fit), the pause's length and
        /// "setup", in `stripRows` rows above the panels. Greedy, the pause first: a label goes in
        /// the first row where it overlaps no other label and crosses no pass line (a labelled
        /// pass's line runs from its label's row down, so labels in lower rows must stay clear of
        /// it). Every label lies within the plot's width. What does not fit is left out; the pass
        /// lines themselves are always drawn.
        private func placeStripLabels(stripTop: Double, pauses: [Band]) -> [StripLabel] {
            var placed: [StripLabel] = []
            func conflicts(_ label: StripLabel) -> Bool {
                placed.contains { other in
                    if other.row == label.row && label.lower < other.upper + 6 && other.lower < label.upper + 6 { return true }
                    if let line = other.lineX, other.row <= label.row, line > label.lower - 2, line < label.upper + 2 { return true }
                    if let line = label.lineX, label.row <= other.row, line > other.lower - 2, line < other.upper + 2 { return true }
                    return false
                }
            }
            /// Places the first candidate that fits; each candidate is (text, anchored at its end).
            func place(_ candidates: [(String, Bool)], at px: Double, passIndex: Int? = nil, colour: String, rows: [Int]) {
                for (text, anchorEnd) in candidates {
                    let textSpan = textWidth(text)
                    let lower = anchorEnd ? px - 4 - textSpan : px
                    let upper = anchorEnd ? px : px + 4 + textSpan
                    // Within the plot's width: past its right edge a label ran into the picture's
                    // edge ("5" cut), and beside the frame it reads as an axis label.
                    guard lower >= plotLeft, upper <= plotRight else { continue }
                    for row in rows {
                        let label = StripLabel(row: row, text: text, x: anchorEnd ? px - 4 : px + 4, anchorEnd: anchorEnd,
                                               lower: lower, upper: upper, lineX: passIndex == nil ? nil : px,
                                               passIndex: passIndex, colour: colour)
                        if !conflicts(label) { placed.append(label); return }
                    }
                }
            }

            for band in pauses {
                let label = pauseLabel(band)
                place([(band.label, label.anchorEnd)], at: label.anchorEnd ? label.x + 4 : label.x - 4, colour: Colour.text, rows: [0, 1])
            }
            let rows = Array(0..<stripRows)
            for (index, pass) in model.passStarts.enumerated() {
                let px = x(pass.t)
                // Right of the line; left of it only where the right runs off the plot.
                let full = pass.label ?? "pass \(pass.number)", short = pass.label ?? "\(pass.number)"
                let fitsRight = { (text: String) in px + 4 + textWidth(text) <= plotRight }
                var candidates: [(String, Bool)] = []
                for text in [full, short] { candidates.append((text, !fitsRight(text))) }
                place(candidates, at: px, passIndex: index, colour: Colour.muted, rows: rows)
            }
            // "setup" only where it fits before the first pass: after it, it would read as a pass's label.
            if let setupEnd = model.setupEnd, x(setupEnd) - plotLeft >= textWidth("setup") + 8 {
                place([("setup", false)], at: plotLeft, colour: Colour.muted, rows: rows)
            }
            return placed
        }

        private func points(_ series: Series, panel: Panel) -> [(Double, Double)?] {
            let height = panel.bottom - panel.top
            let columns = Int(plotWidth)
            var result: [(Double, Double)?] = []
            // A long migration has more samples than the plot has pixels: keep the first, lowest,
            // highest and last point of each pixel column, so spikes survive and the file stays small.
            if series.points.count > columns * 4 {
                var column = Int.min
                var group: [(Double, Double)] = []
                func flush() {
                    guard !group.isEmpty else { return }
                    let low = group.indices.min { group[$0].1 < group[$1].1 }!
                    let high = group.indices.max { group[$0].1 < group[$1].1 }!
                    for index in Set([0, low, high, group.count - 1]).sorted() { result.append(group[index]) }
                    group = []
                }
                for point in series.points {
                    guard let value = point.value, panel.scale.shows(value) else { flush(); result.append(nil); continue }
                    let px = x(point.t)
                    if Int(px) != column { flush(); column = Int(px) }
                    group.append((px, panel.bottom - panel.scale.fraction(value) * height))
                }
                flush()
                return result
            }
            return series.points.map { point in
                point.value.flatMap { panel.scale.shows($0) ? (x(point.t), panel.bottom - panel.scale.fraction($0) * height) : nil }
            }
        }

        /// The runs of non-null points, each a list of pixel positions.
        private func runs(_ points: [(Double, Double)?]) -> [[(Double, Double)]] {
            var runs: [[(Double, Double)]] = []
            var current: [(Double, Double)] = []
            for point in points {
                if let point { current.append(point) } else if !current.isEmpty { runs.append(current); current = [] }
            }
            if !current.isEmpty { runs.append(current) }
            return runs
        }

        private func drawLine(_ svg: inout SVGWriter, _ series: Series, panel: Panel, colour: String, width: Double, name: String) {
            let runs = runs(points(series, panel: panel))
            guard !runs.isEmpty else { return }
            let d = runs.map { run in
                run.enumerated().map { ($0.offset == 0 ? "M" : "L") + fmt($0.element.0) + " " + fmt($0.element.1) }.joined()
            }.joined()
            svg.open("g", [("class", name)])
            svg.empty("path", [("d", d), ("fill", "none"), ("stroke", colour), ("stroke-width", fmt(width)),
                               ("stroke-linejoin", "round"), ("stroke-linecap", "round")])
            drawMarkers(&svg, series.markers ? runs.flatMap { $0 } : runs.filter { $0.count == 1 }.flatMap { $0 }, colour: colour)
            svg.close("g")
        }

        private func drawArea(_ svg: inout SVGWriter, _ series: Series, panel: Panel, colour: String, name: String) {
            let runs = runs(points(series, panel: panel))
            guard !runs.isEmpty else { return }
            let base = fmt(panel.bottom)
            let fill = runs.filter { $0.count > 1 }.map { run in
                "M\(fmt(run[0].0)) \(base)" + run.map { "L" + fmt($0.0) + " " + fmt($0.1) }.joined() + "L\(fmt(run.last!.0)) \(base)Z"
            }.joined()
            let line = runs.map { run in
                run.enumerated().map { ($0.offset == 0 ? "M" : "L") + fmt($0.element.0) + " " + fmt($0.element.1) }.joined()
            }.joined()
            svg.open("g", [("class", name)])
            if !fill.isEmpty { svg.empty("path", [("d", fill), ("fill", colour), ("fill-opacity", "0.3"), ("stroke", "none")]) }
            svg.empty("path", [("d", line), ("fill", "none"), ("stroke", colour), ("stroke-width", "1.5"), ("stroke-linejoin", "round")])
            drawMarkers(&svg, series.markers ? runs.flatMap { $0 } : runs.filter { $0.count == 1 }.flatMap { $0 }, colour: colour)
            svg.close("g")
        }

        private func drawMarkers(_ svg: inout SVGWriter, _ points: [(Double, Double)], colour: String) {
            guard !points.isEmpty else { return }
            let d = points.map { "M\(fmt($0.0 - 3)) \(fmt($0.1 - 3))h6v6h-6Z" }.joined()
            svg.empty("path", [("d", d), ("fill", colour), ("stroke", "#FFFFFF"), ("stroke-width", "0.8")])
        }

        private func drawSwatch(_ svg: inout SVGWriter, _ swatch: Swatch, x: Double, baseline: Double) {
            let middle = baseline - 4
            switch swatch {
            case .line(let colour, let dashed):
                var attributes = [("stroke", colour), ("stroke-width", "2.5")]
                if dashed { attributes.append(("stroke-dasharray", "6 3")) }
                svg.line(x, middle, x + 22, middle, attributes)
            case .area(let colour):
                svg.empty("rect", [("x", fmt(x)), ("y", fmt(middle - 6)), ("width", "22"), ("height", "12"),
                                   ("fill", colour), ("fill-opacity", "0.3"), ("stroke", colour), ("stroke-width", "1.5")])
            case .pause:
                svg.empty("rect", [("x", fmt(x + 4)), ("y", fmt(middle - 7)), ("width", "14"), ("height", "14"),
                                   ("fill", Colour.pause), ("fill-opacity", "0.14")])
            case .passLine:
                svg.line(x + 11, middle - 7, x + 11, middle + 7, [("stroke", Colour.pass), ("stroke-dasharray", "3 3")])
            }
        }
    }

    /// Coordinates with at most one decimal: a tenth of a pixel is finer than any screen.
    fileprivate static func fmt(_ value: Double) -> String {
        guard value.isFinite else { return "0" }
        let rounded = (value * 10).rounded() / 10
        return rounded == rounded.rounded() ? String(Int(rounded)) : String(rounded)
    }

    /// Builds the SVG text, escaping text and attribute values for XML.
    fileprivate struct SVGWriter {
        var output = ""
        private var depth = 0

        static func escape(_ text: String) -> String {
            var out = ""
            out.reserveCapacity(text.count)
            for scalar in text.unicodeScalars {
                switch scalar {
                case "&": out += "&amp;"
                case "<": out += "&lt;"
                case ">": out += "&gt;"
                case "\"": out += "&quot;"
                case "'": out += "&apos;"
                // Control characters other than tab and newline are not allowed in XML 1.0 at
                // all, escaped or not: an error message could carry one.
                case "\u{0}"..."\u{8}", "\u{B}", "\u{C}", "\u{E}"..."\u{1F}", "\u{FFFE}", "\u{FFFF}": out += "?"
                default: out.unicodeScalars.append(scalar)
                }
            }
            return out
        }

        private static func attributes(_ pairs: [(String, String)]) -> String {
            pairs.map { " \($0.0)=\"\(escape($0.1))\"" }.joined()
        }

        private mutating func indent() { output += String(repeating: " ", count: depth) }

        mutating func open(_ name: String, _ pairs: [(String, String)] = []) {
            indent()
            output += "<\(name)\(Self.attributes(pairs))>\n"
            depth += 1
        }

        mutating func close(_ name: String) {
            depth -= 1
            indent()
            output += "</\(name)>\n"
        }

        mutating func empty(_ name: String, _ pairs: [(String, String)]) {
            indent()
            output += "<\(name)\(Self.attributes(pairs))/>\n"
        }

        mutating func line(_ x1: Double, _ y1: Double, _ x2: Double, _ y2: Double, _ pairs: [(String, String)]) {
            empty("line", [("x1", fmt(x1)), ("y1", fmt(y1)), ("x2", fmt(x2)), ("y2", fmt(y2))] + pairs)
        }

        mutating func text(_ text: String, x: Double, y: Double, _ pairs: [(String, String)] = []) {
            indent()
            output += "<text x=\"\(fmt(x))\" y=\"\(fmt(y))\"\(Self.attributes(pairs))>\(Self.escape(text))</text>\n"
        }
    }
}
