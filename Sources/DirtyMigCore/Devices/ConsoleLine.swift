/// The guest's console (port 0xE9), a byte at a time, as lines for the log. A received guest is
/// a peer's program, so its lines are escaped and bounded (PeerText) before anyone prints them;
/// a line that never ends costs at most `keptBytes` of memory, the rest only counted.
struct ConsoleLine {
    /// Enough for PeerText's `maxCharacters` even were every one of them 4 bytes of UTF-8.
    static let keptBytes = PeerText.maxCharacters * 4

    private var bytes: [UInt8] = []
    private var dropped = 0

    /// Takes one byte of console output; at a newline, returns the line it ended.
    mutating func take(_ byte: UInt8) -> String? {
        guard byte == UInt8(ascii: "\n") else {
            if bytes.count < Self.keptBytes { bytes.append(byte) } else { dropped += 1 }
            return nil
        }
        defer {
            bytes.removeAll(keepingCapacity: true)
            dropped = 0
        }
        return PeerText.escaped(bytes, moreBytes: dropped)
    }
}
