/// The control protocol, version 1: a Unix stream socket, one JSON object per line each way.
///   server → {"dirtymig": {"version": "0.1.0", "protocol": 1}, "vm": "NAME"}      (greeting)
///   client → {"execute": "COMMAND", "arguments": {...}, "id": ANY}              (args, id optional)
///   server → {"return": {...}, "id": ANY}  or  {"error": {"class": "…", "desc": "…"}, "id": ANY}
/// A malformed line gets an error reply and the connection stays usable.
public enum ControlProtocol {
    public static let version: Int64 = 1
    public static let softwareVersion = "0.1.0"
    public static let maxLineBytes = 1 << 20

    public static func greeting(vmName: String) -> JSONValue {
        ["dirtymig": ["version": .string(softwareVersion), "protocol": .int(version)], "vm": .string(vmName)]
    }
}

/// Why a command failed; `errorClass` is what goes on the wire.
public struct ControlError: Error, CustomStringConvertible, Equatable {
    public enum Class: String, Sendable {
        case parseError = "ParseError", badRequest = "BadRequest", unknownCommand = "UnknownCommand"
        case invalidArgument = "InvalidArgument", unsupported = "Unsupported", failed = "Failed"
    }

    public let errorClass: Class
    public let desc: String

    public init(_ errorClass: Class, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { desc }

    public var json: JSONValue { ["class": .string(errorClass.rawValue), "desc": .string(desc)] }
}

/// A command handler: takes the request's arguments (an object, possibly empty), returns the
/// reply's `return` value. Runs on the client's own thread and may block (rate measurements do).
public typealias ControlCommand = @Sendable (JSONValue) throws(ControlError) -> JSONValue
