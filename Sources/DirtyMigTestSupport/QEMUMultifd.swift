import DirtyMigCore
import Foundation

/// QEMU's multifd migration: the `multifd` capability and its parameters, set alike on both
/// QEMU processes before either end starts (QEMU checks at the destination that its capabilities
/// match what the source announces; the destination must therefore start with `-incoming defer`
/// and be given its URI by `migrate-incoming` after this). For the benchmarks that compare
/// dirtymig's `--compress zstd` with QEMU's `multifd-compression zstd`.
public struct QEMUMultifd: Sendable, Equatable {
    /// `multifd-compression`: "none", "zlib" or "zstd" (QEMU 7.2's choices).
    public var compression: String
    /// `multifd-channels`: connections and threads per side, each compressing its own pages.
    public var channels: Int
    /// `multifd-zstd-level` (QEMU's default is 1, as dirtymig's zstd level); nil leaves QEMU's.
    public var zstdLevel: Int?

    public init(compression: String, channels: Int, zstdLevel: Int? = nil) {
        self.compression = compression
        self.channels = channels
        self.zstdLevel = zstdLevel
    }

    /// The QMP commands, in order, that give one QEMU process this setting.
    public var commands: [(command: String, arguments: JSONValue)] {
        var parameters: [(String, JSONValue)] = [("multifd-compression", .string(compression)),
                                                 ("multifd-channels", .number(channels))]
        if let zstdLevel { parameters.append(("multifd-zstd-level", .number(zstdLevel))) }
        return [("migrate-set-capabilities", ["capabilities": .array([["capability": "multifd", "state": true]])]),
                ("migrate-set-parameters", .object(parameters))]
    }

    /// Runs `commands` on one QEMU and reads the parameters back: a QEMU that takes the commands
    /// but runs with other values (or without the capability) is refused with what it reports,
    /// rather than measured as if it were this setting.
    public func apply(to qmp: QMPClient) throws {
        for step in commands { try qmp.execute(step.command, step.arguments) }
        let capability = try qmp.execute("query-migrate-capabilities").arrayValue?
            .first { $0["capability"]?.stringValue == "multifd" }?["state"]?.boolValue
        let parameters = try qmp.execute("query-migrate-parameters")
        let took = capability == true
            && parameters["multifd-compression"]?.stringValue == compression
            && parameters["multifd-channels"]?.doubleValue == Double(channels)
            && (zstdLevel.map { parameters["multifd-zstd-level"]?.doubleValue == Double($0) } ?? true)
        guard took else {
            throw QMPClient.Failure(description: "QEMU did not take multifd (\(compression), \(channels) channels): capability \(capability.map(String.init) ?? "absent"), parameters \(parameters.serialized())")
        }
    }
}
