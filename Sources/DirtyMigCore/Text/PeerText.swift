/// Text from outside this process (a peer's abort, refusal or result message, which may be 4 KiB
/// of any bytes and on a plaintext receiver comes from whoever connects; a guest's console
/// line), made fit for a log line where it enters: one line, with no control character that a
/// terminal would act on (a peer's "\e[2J\nFAKE LINE" would clear the operator's screen and
/// forge a log line), printable Unicode kept, and at most `maxCharacters` long.
///
/// - `\n`, `\r`, `\t` and `\\` (a backslash is doubled, so every escape in the result is ours);
/// - other C0 controls, DEL, and bytes that are not UTF-8 as `\xNN`;
/// - C1 controls, format characters (bidirectional overrides among them), line and paragraph
///   separators, private-use and unassigned code points as `\u{NNNN}`;
/// - past `maxCharacters`: "… (N more bytes)", N counting the input left out.
public enum PeerText {
    public static let maxCharacters = 512

    public static func escaped(_ text: String) -> String {
        escaped(Array(text.utf8))
    }

    /// `moreBytes`: input dropped before it got here (a console line's bytes past its buffer),
    /// counted in the "more bytes" too.
    public static func escaped(_ bytes: [UInt8], moreBytes: Int = 0) -> String {
        var result = ""
        var length = 0
        var index = 0
        while index < bytes.count {
            var parser = Unicode.UTF8.ForwardParser()
            var iterator = bytes[index...].makeIterator()
            let piece: String
            let consumed: Int
            switch parser.parseScalar(from: &iterator) {
            case .valid(let encoded):
                piece = escaped(Unicode.UTF8.decode(encoded))
                consumed = encoded.count
            case .error(let errorLength):
                piece = bytes[index..<index + errorLength].map(hexEscape).joined()
                consumed = errorLength
            case .emptyInput:
                piece = ""
                consumed = bytes.count - index
            }
            let pieceLength = piece.unicodeScalars.count
            guard length + pieceLength <= maxCharacters else { break }
            result += piece
            length += pieceLength
            index += consumed
        }
        let left = bytes.count - index + moreBytes
        return left > 0 ? result + "… (\(left) more bytes)" : result
    }

    private static func escaped(_ scalar: Unicode.Scalar) -> String {
        switch scalar {
        case "\n": return "\\n"
        case "\r": return "\\r"
        case "\t": return "\\t"
        case "\\": return "\\\\"
        default: break
        }
        if scalar.value < 0x20 || scalar.value == 0x7F { return hexEscape(UInt8(scalar.value)) }
        switch scalar.properties.generalCategory {
        case .control, .format, .lineSeparator, .paragraphSeparator, .privateUse, .surrogate, .unassigned:
            return "\\u{\(String(scalar.value, radix: 16))}"
        default:
            return String(scalar)
        }
    }

    private static func hexEscape(_ byte: UInt8) -> String {
        "\\x" + (byte < 0x10 ? "0" : "") + String(byte, radix: 16)
    }
}
