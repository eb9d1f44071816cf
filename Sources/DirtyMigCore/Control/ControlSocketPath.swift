import Foundation
import Glibc

/// Where control sockets live: `$XDG_RUNTIME_DIR/dirtymig/NAME.sock`, or `/tmp/dirtymig-UID/NAME.sock`
/// when XDG_RUNTIME_DIR is unset. `--vm` takes a NAME or a PATH (anything with a '/').
public enum ControlSocketPath {
    public static let defaultName = "vm"

    public static func defaultDirectory() -> String {
        if let runtime = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !runtime.isEmpty,
           access(runtime, W_OK) == 0 {
            return runtime + "/dirtymig"
        }
        return "/tmp/dirtymig-\(getuid())"
    }

    public static func path(forName name: String) -> String { defaultDirectory() + "/" + name + ".sock" }

    /// A `--vm` value (or nil) as a socket path.
    public static func resolve(vm: String?) -> String {
        guard let vm else { return path(forName: defaultName) }
        return vm.contains("/") ? vm : path(forName: vm)
    }

    public static func validate(name: String) throws(ControlError) {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        guard !name.isEmpty, name.count <= 64, name.allSatisfy({ allowed.contains($0) }), !name.hasPrefix(".") else {
            throw ControlError(.invalidArgument, "invalid VM name '\(name)': use 1-64 letters, digits, '.', '_' or '-'")
        }
    }

    /// Names of VMs with a socket in the default directory.
    public static func running() -> [String] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: defaultDirectory())) ?? []
        return entries.filter { $0.hasSuffix(".sock") }.map { String($0.dropLast(5)) }.sorted()
    }
}
