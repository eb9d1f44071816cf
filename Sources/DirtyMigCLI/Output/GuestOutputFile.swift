import DirtyMigCore
import Foundation
import Synchronization

/// `--guest-output FILE` on `boot` and `receive`: every guest output line the VM releases
/// (GuestOutput), appended to FILE. One write(2) per line on an O_APPEND descriptor (WholeWrite
/// continues a short one, which a regular file gives only when it is full): a released
/// line is in the file whole at once (in the page cache, which outlives the process), so a
/// reader after a SIGKILL finds whole lines only, and another writer cannot interleave with one.
final class GuestOutputFile: Sendable {
    let path: String
    private let descriptor: Int32
    private let failed = Atomic<Bool>(false)

    init(path: String) throws {
        let descriptor = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else {
            throw RuntimeFailure("--guest-output \(path): cannot open it for appending: \(String(cString: strerror(errno))); give a file in a directory you can write")
        }
        self.path = path
        self.descriptor = descriptor
    }

    /// The file of `--guest-output`, if given; opened now, so a bad path is an error before the
    /// VM exists.
    static func requested(by arguments: ParsedArguments) throws -> GuestOutputFile? {
        try arguments.string("guest-output").map { try GuestOutputFile(path: $0) }
    }

    /// The sink for GuestOutput.setSink. A failed write (disk full) is reported once on stderr
    /// and the VM runs on: its output is not worth stopping the guest for.
    var sink: @Sendable (String) -> Void {
        { [self] line in
            do throws(ShortWrite) {
                try WholeWrite.write(descriptor, Array((line + "\n").utf8))
            } catch {
                if !failed.exchange(true, ordering: .relaxed) {
                    printError("dirtymig: cannot append guest output to \(path): \(String(cString: strerror(error.error.errno))); later lines may be missing")
                }
            }
        }
    }

    deinit { close(descriptor) }
}
