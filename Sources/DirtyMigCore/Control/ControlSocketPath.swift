import Foundation
import Glibc

/// Where control sockets live, and how `--vm NAME|PATH` and `boot --name NAME` map to them.
///
/// - Directory: `$XDG_RUNTIME_DIR/dirtymig` when XDG_RUNTIME_DIR is set to an absolute, writable
///   directory; otherwise `/tmp/dirtymig-UID`. Created with mode 0700 by the server.
/// - A VM named NAME listens on `DIRECTORY/NAME.sock`; the default name is `vm`.
/// - `--vm` takes a path when the value contains `/` or ends with `.sock`, else a name.
/// - Names: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
public enum ControlSocketPath {
    public static let defaultName = "vm"
    public static let suffix = ".sock"
    public static let maxNameLength = 64

    /// The directory for control sockets (see the type's comment). Nothing is created here.
    public static func defaultDirectory(environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        if let runtime = environment["XDG_RUNTIME_DIR"], runtime.hasPrefix("/") {
            var info = stat()
            if stat(runtime, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, access(runtime, W_OK | X_OK) == 0 {
                return (runtime.hasSuffix("/") ? String(runtime.dropLast()) : runtime) + "/dirtymig"
            }
        }
        return "/tmp/dirtymig-\(getuid())"
    }

    /// `DIRECTORY/NAME.sock` (the name is not checked: see `validate(name:)`).
    public static func path(forName name: String, directory: String? = nil) -> String {
        (directory ?? defaultDirectory()) + "/" + name + suffix
    }

    /// Whether a `--vm` value is a path rather than a name.
    public static func isPath(_ value: String) -> Bool {
        value.contains("/") || value.hasSuffix(suffix)
    }

    /// A `--vm` value (nil: the default VM) as a socket path. Throws InvalidArgument for a bad name.
    public static func resolve(vm: String?) throws(ControlError) -> String {
        guard let vm else { return path(forName: defaultName) }
        if isPath(vm) { return vm }
        try validate(name: vm)
        return path(forName: vm)
    }

    /// The VM name a socket path stands for: its file name without `.sock`.
    public static func name(forPath path: String) -> String {
        let file = path.split(separator: "/", omittingEmptySubsequences: true).last.map(String.init) ?? path
        return file.hasSuffix(suffix) && file.count > suffix.count ? String(file.dropLast(suffix.count)) : file
    }

    /// Whether `path` is in the default directory (so a name alone would have found it).
    public static func isDefaultLocation(_ path: String) -> Bool {
        path == self.path(forName: name(forPath: path))
    }

    public static func isValid(name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= maxNameLength,
              let first = name.utf8.first, first != UInt8(ascii: "."), first != UInt8(ascii: "-") else { return false }
        return name.utf8.allSatisfy { byte in
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
                return true
            default:
                return false
            }
        }
    }

    /// Throws InvalidArgument, saying what a name may contain, when `name` is not a valid VM name.
    public static func validate(name: String) throws(ControlError) {
        guard !isValid(name: name) else { return }
        let why: String
        if name.isEmpty { why = "it is empty" }
        else if name.utf8.count > maxNameLength { why = "it is longer than \(maxNameLength) characters" }
        else if name.hasPrefix(".") || name.hasPrefix("-") { why = "it starts with '\(name.first!)'" }
        else { why = "it contains '\(name.first { !isValid(name: "a" + String($0)) }.map(String.init) ?? "?")'" }
        throw ControlError(.invalidArgument, "invalid VM name '\(name)' (\(why)): use 1 to \(maxNameLength) letters, digits, '.', '_' or '-', not starting with '.' or '-'")
    }

    /// Names of the VMs with a socket in `directory` (default: the default directory), sorted.
    /// With `probe` (the default) only sockets that answer count, so stale ones left by a crash
    /// are not listed.
    public static func listRunning(directory: String? = nil, probe: Bool = true) -> [String] {
        let directory = directory ?? defaultDirectory()
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return entries.filter { entry in
            guard entry.hasSuffix(suffix), entry.count > suffix.count else { return false }
            let path = directory + "/" + entry
            var info = stat()
            guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return false }
            guard probe else { return true }
            guard let socket = try? UnixSocket.connect(path: path) else { return false }
            socket.close()
            return true
        }.map { String($0.dropLast(suffix.count)) }.sorted()
    }
}
