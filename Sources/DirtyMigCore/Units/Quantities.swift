import Foundation

/// SIZE, RATE and DURATION as users type them. One documented meaning per suffix:
///   SIZE      4096, 512B, 4K = 4KiB = 4096, 1M = 1MiB, 1G = 1GiB, 1T = 1TiB (powers of 1024);
///             1KB = 1000, 1MB, 1GB, 1TB (powers of 1000); decimals when the result is whole bytes.
///   RATE      a SIZE per second: 100M, 100M/s, 100MiB/s, 100MB/s; or bits per second in decimal
///             units: 800Mbit, 1Gbit/s, 1Gb/s (1Gbit = 10^9 bits = 125,000,000 bytes per second).
///   DURATION  500ms, 1s, 1.5s, 2m (a bare number is refused: say which unit).
public struct QuantityError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

public enum ByteSize {
    static let binary: [String: UInt64] = ["": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
                                           "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40,
                                           "kb": 1_000, "mb": 1_000_000, "gb": 1_000_000_000, "tb": 1_000_000_000_000]
    static let validSuffixes = "B, K/KiB, M/MiB, G/GiB, T/TiB (powers of 1024), KB, MB, GB, TB (powers of 1000)"

    public static func parse(_ text: String) throws(QuantityError) -> UInt64 {
        let (number, suffix) = try splitNumber(text, what: "size")
        guard let multiplier = binary[suffix.lowercased()] else {
            throw QuantityError("invalid size '\(text)': unknown suffix '\(suffix)'; use \(validSuffixes)")
        }
        return try scale(number, multiplier, text: text, what: "size")
    }

    /// 1 GiB, 512 MiB, 4 KiB, 100 B: the largest binary unit that keeps one decimal.
    public static func format(_ bytes: UInt64) -> String {
        let units: [(UInt64, String)] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        for (size, name) in units where bytes >= size {
            let value = Double(bytes) / Double(size)
            return value == value.rounded() ? "\(Int(value)) \(name)" : String(format: "%.1f %@", value, name)
        }
        return "\(bytes) B"
    }
}

public enum ByteRate {
    /// Bytes per second.
    public static func parse(_ text: String) throws(QuantityError) -> UInt64 {
        var body = text
        for tail in ["/s", "ps"] where body.lowercased().hasSuffix(tail) && body.count > tail.count {
            body = String(body.dropLast(tail.count))
            break
        }
        let (number, suffix) = try splitNumber(body, what: "rate")
        let lower = suffix.lowercased()
        let bits: [String: UInt64] = ["bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000,
                                      "tbit": 1_000_000_000_000]
        if let multiplier = bits[lower] {
            return try scale(number, multiplier, text: text, what: "rate") / 8
        }
        // "1Gb" (lower-case b after a prefix) means bits; "1GB" bytes.
        if suffix.count == 2, suffix.hasSuffix("b"), let prefix = ["k": 1_000, "m": 1_000_000, "g": 1_000_000_000,
                                                                    "t": 1_000_000_000_000][String(lower.prefix(1))] {
            return try scale(number, UInt64(prefix), text: text, what: "rate") / 8
        }
        guard let multiplier = ByteSize.binary[lower] else {
            throw QuantityError("invalid rate '\(text)': unknown unit '\(suffix)'; use a size per second (100M, 100MiB/s, 100MB/s) or bits (800Mbit, 1Gbit/s)")
        }
        return try scale(number, multiplier, text: text, what: "rate")
    }

    /// 100 MiB/s.
    public static func format(_ bytesPerSecond: UInt64) -> String { ByteSize.format(bytesPerSecond) + "/s" }
}

public enum DurationValue {
    /// Seconds.
    public static func parse(_ text: String) throws(QuantityError) -> Double {
        let (number, suffix) = try splitNumber(text, what: "duration")
        let units: [String: Double] = ["ms": 0.001, "s": 1, "m": 60]
        guard !suffix.isEmpty else {
            // 300 is more likely 300 ms than five minutes; 5 more likely 5 s than 5 ms.
            let likely = number >= 50 ? ["ms", "s"] : ["s", "ms"]
            throw QuantityError("invalid duration '\(text)': add a unit (ms, s or m), e.g. '\(text)\(likely[0])' or '\(text)\(likely[1])'")
        }
        guard let unit = units[suffix.lowercased()] else {
            throw QuantityError("invalid duration '\(text)': unknown unit '\(suffix)'; use ms, s or m")
        }
        return number * unit
    }

    /// As `parse` reads it back: "10ms", "2s", "1.5ms".
    public static func format(microseconds: UInt64) -> String {
        if microseconds % 1_000_000 == 0 { return "\(microseconds / 1_000_000)s" }
        if microseconds % 1000 == 0 { return "\(microseconds / 1000)ms" }
        return "\(Double(microseconds) / 1000)ms"
    }
}

/// A positive whole number (vCPU counts, ring entries, passes).
public enum Count {
    public static func parse(_ text: String, what: String, allowZero: Bool = false) throws(QuantityError) -> Int {
        guard let value = Int(text), value >= (allowZero ? 0 : 1) else {
            throw QuantityError("invalid \(what) '\(text)': expected a \(allowZero ? "non-negative" : "positive") whole number")
        }
        return value
    }
}

private func splitNumber(_ text: String, what: String) throws(QuantityError) -> (Double, String) {
    let trimmed = text.trimmingCharacters(in: .whitespaces)
    guard !trimmed.isEmpty else { throw QuantityError("empty \(what)") }
    guard !trimmed.hasPrefix("-") else { throw QuantityError("invalid \(what) '\(text)': must not be negative") }
    let digits = trimmed.prefix { $0.isNumber || $0 == "." }
    guard !digits.isEmpty, let number = Double(digits) else {
        throw QuantityError("invalid \(what) '\(text)': expected a number followed by a unit")
    }
    return (number, String(trimmed.dropFirst(digits.count)))
}

private func scale(_ number: Double, _ multiplier: UInt64, text: String, what: String) throws(QuantityError) -> UInt64 {
    let value = number * Double(multiplier)
    guard value.isFinite, value < 1.8e19 else { throw QuantityError("invalid \(what) '\(text)': too large") }
    guard value == value.rounded(.down) else {
        throw QuantityError("invalid \(what) '\(text)': not a whole number of bytes")
    }
    return UInt64(value)
}
