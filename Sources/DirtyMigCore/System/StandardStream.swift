import Glibc
import Synchronization

/// Standard output or standard error, the streams every log line of this program goes to (a
/// detached command's log file is both). Written through WholeWrite, so a stream that cannot
/// take a line (a full disk under the log, a reader that went away, a revoked terminal) costs
/// that line and never the process: peers decide how much a receiver logs (one line per refused
/// connection, a received guest's console lines), and a trap there let a connection flood kill
/// a standby. Lines that could not be written are counted and said once, in front of the next
/// line the stream takes ("dirtymig: 12 lines (1190 bytes) of standard error could not be
/// written: No space left on device"). Each line goes out whole, under the stream's lock.
public final class StandardStream: Sendable {
    public static let output = StandardStream(STDOUT_FILENO, name: "standard output")
    public static let error = StandardStream(STDERR_FILENO, name: "standard error")

    /// What could not be written since the stream last took a line.
    public struct Losses: Sendable, Equatable {
        public var lines = 0
        public var bytes = 0
        /// Why the last of them failed.
        public var errno: Int32 = 0
        /// The stream ends in the middle of a line (a write stopped part-way).
        var torn = false
    }

    public let name: String
    private let descriptor: Int32
    private let losses = Mutex(Losses())

    private init(_ descriptor: Int32, name: String) {
        self.descriptor = descriptor
        self.name = name
    }

    /// SIGPIPE ignored process-wide, so a write to a pipe nobody reads any more fails with EPIPE
    /// (a loss like any other) instead of ending the process. Called first thing in main: the
    /// disposition is the whole process's, and programs it starts inherit it.
    public static func ignoreBrokenPipes() {
        _ = signal(SIGPIPE, SIG_IGN)
    }

    /// Writes `text` and a newline (unless it ends with one). False if it could not (counted).
    @discardableResult
    public func writeLine(_ text: String) -> Bool {
        write(text.hasSuffix("\n") ? text : text + "\n")
    }

    /// Writes `text` as it is (help text, a progress line's redraw). False if it could not
    /// (counted as a line).
    @discardableResult
    public func write(_ text: String) -> Bool {
        let bytes = Array(text.utf8)
        return losses.withLock { lost in
            // After a torn line, the note starts a line of its own.
            let note = lost.lines > 0 ? Array(((lost.torn ? "\n" : "") + Self.note(lost, of: name)).utf8) : []
            let buffer = note + bytes
            do throws(ShortWrite) {
                try WholeWrite.write(descriptor, buffer)
                lost = Losses()
                return true
            } catch {
                let torn = error.written > 0 ? buffer[error.written - 1] != UInt8(ascii: "\n") : lost.torn
                if error.written >= note.count { lost = Losses() }   // the note went out, the line did not
                lost.lines += 1
                lost.bytes += bytes.count - max(0, error.written - note.count)
                lost.errno = error.error.errno
                lost.torn = torn
                return false
            }
        }
    }

    /// The losses not said yet, which are then the caller's to say (at exit, on the other stream).
    public func takeLosses() -> Losses? {
        losses.withLock { lost in
            defer { lost = Losses() }
            return lost.lines > 0 ? lost : nil
        }
    }

    /// The last chance, before the process exits, to say what could not be written: standard
    /// output's losses on standard error, standard error's on itself if it takes a line now.
    /// Returns standard output's losses (its reader missed part of the result).
    @discardableResult
    public static func reportLossesAtExit() -> Losses? {
        let outputLost = output.takeLosses()
        if let errorLost = error.takeLosses() { error.writeLine((errorLost.torn ? "\n" : "") + note(errorLost, of: error.name)) }
        if let outputLost { error.writeLine(note(outputLost, of: output.name)) }
        return outputLost
    }

    private static let program = CommandLine.arguments.first.flatMap { $0.split(separator: "/").last.map(String.init) } ?? "dirtymig"

    static func note(_ lost: Losses, of name: String) -> String {
        "\(program): \(lost.lines) line\(lost.lines == 1 ? "" : "s") (\(lost.bytes) bytes) of \(name) could not be written: \(String(cString: strerror(lost.errno)))\n"
    }
}
