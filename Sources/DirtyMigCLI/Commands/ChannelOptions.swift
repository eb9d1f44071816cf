import DirtyMigCore
import Foundation

/// `--psk-file`, `--tls-dir`, `--tls-peer`, `--insecure`: the same options on `migrate` and
/// `receive`, loaded (and key files checked) before anything starts.
enum ChannelOptions {
    static func security(_ arguments: ParsedArguments) throws(UsageError) -> ChannelSecurity {
        do {
            return try ChannelSecurity.load(pskFile: arguments.string("psk-file").map(absolute),
                                            tlsDirectory: arguments.string("tls-dir").map(absolute),
                                            peerName: arguments.string("tls-peer"), insecure: arguments.has("insecure"))
        } catch {
            throw arguments.error(error.description)
        }
    }

    /// The `migrate` control command's arguments for them (paths made absolute: the VM's process
    /// may run elsewhere, and reads the files itself).
    static func controlArguments(_ security: ChannelSecurity) -> [(String, JSONValue)] {
        var pairs: [(String, JSONValue)] = []
        switch security.credentials {
        case .none: if security.insecure { pairs.append(("insecure", .bool(true))) }
        case .psk(let key): pairs.append(("psk_file", .string(key.path)))
        case .certificates(let files): pairs.append(("tls_dir", .string(files.directory)))
        }
        if let peer = security.peerName { pairs.append(("tls_peer", .string(peer))) }
        return pairs
    }

    static func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }
}
