/// The dirtymig control protocol, version 1.
///
/// Transport: a Unix stream socket (`ControlSocketPath`: `$XDG_RUNTIME_DIR/dirtymig/NAME.sock`, or
/// `/tmp/dirtymig-UID/NAME.sock`), mode 0600 in a directory of mode 0700. Each way the stream is
/// UTF-8 text, one JSON object per line, each line ended by `\n`.
///
/// 1. On connect the server sends a greeting:
///        {"dirtymig":{"version":"0.1.0","protocol":1},"vm":"NAME"}
///    `protocol` changes only when a change would break existing clients; a client refuses a
///    server whose `protocol` differs from its own.
/// 2. The client sends requests, one per line:
///        {"execute":"COMMAND","arguments":{...},"id":ANY}
///    `arguments` (an object) and `id` (any JSON value) are optional; no other members are allowed.
/// 3. For each request, in order, the server sends one reply line:
///        {"return":VALUE,"id":ANY}                                   on success
///        {"error":{"class":"CLASS","desc":"TEXT"},"id":ANY}          on failure
///    `id` is echoed exactly when the request had one (and was an object). `desc` is a sentence for
///    people; `class` is for programs:
///        ParseError       the line is not JSON, or is longer than 1 MiB (then it is discarded
///                         up to its newline)
///        BadRequest       JSON, but not an object, no string "execute", "arguments" not an
///                         object, or an unknown member
///        UnknownCommand   no such command; desc lists the commands and suggests the nearest
///        InvalidArgument  a missing, unknown or out-of-range argument
///        Unsupported      valid, but this VM cannot do it (e.g. a tracking mode it was not
///                         booted with)
///        Failed           the command ran and failed
///
/// Empty (or all-whitespace) lines are ignored. A malformed line never closes the connection.
/// Requests on one connection are answered one at a time, in order; a command may take a while
/// (query-dirty-rate measures for its interval), and other connections are served meanwhile.
/// The server closes connections when the VM stops; a client sees end of stream.
///
/// Commands served by a VM (see MachineControl): query-status, query-dirty-counters,
/// query-dirty-rate {"mode":"ring|bitmap|sample","interval":SECONDS}, quit (replies, then stops
/// the VM).
public enum ControlProtocol {
    /// The wire protocol's version (the greeting's `dirtymig.protocol`).
    public static let version: Int64 = 1
    /// dirtymig's version (the greeting's `dirtymig.version`).
    public static let softwareVersion = "0.1.0"
    /// The longest line either side accepts, without its newline.
    public static let maxLineBytes = 1 << 20

    /// The greeting line the server sends first.
    public static func greeting(vmName: String) -> JSONValue {
        ["dirtymig": ["version": .string(softwareVersion), "protocol": .int(version)], "vm": .string(vmName)]
    }

    /// The command in `names` nearest to `name` (edit distance, or a prefix), if any is near enough
    /// to be a likely typo.
    public static func suggestion(for name: String, among names: [String]) -> String? {
        let typed = Array(name.lowercased().unicodeScalars)
        var best: (name: String, distance: Int)? = nil
        for candidate in names {
            let lowered = candidate.lowercased()
            let distance = lowered.hasPrefix(name.lowercased()) && !name.isEmpty
                ? 1 : editDistance(typed, Array(lowered.unicodeScalars))
            if distance < (best?.distance ?? Int.max) { best = (candidate, distance) }
        }
        guard let best, best.distance <= max(2, typed.count / 3) else { return nil }
        return best.name
    }

    /// Levenshtein distance with adjacent transpositions counting as one edit.
    static func editDistance(_ a: [Unicode.Scalar], _ b: [Unicode.Scalar]) -> Int {
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        var before = [Int](repeating: 0, count: b.count + 1)
        var previous = Array(0...b.count)
        var current = [Int](repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            current[0] = i
            for j in 1...b.count {
                let cost = a[i - 1] == b[j - 1] ? 0 : 1
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
                if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] {
                    current[j] = min(current[j], before[j - 2] + 1)
                }
            }
            (before, previous, current) = (previous, current, before)
        }
        return previous[b.count]
    }
}

/// Why a request failed: `errorClass` and `desc` are what go on the wire.
public struct ControlError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Class: String, Sendable, CaseIterable {
        case parseError = "ParseError"
        case badRequest = "BadRequest"
        case unknownCommand = "UnknownCommand"
        case invalidArgument = "InvalidArgument"
        case unsupported = "Unsupported"
        case failed = "Failed"
    }

    public let errorClass: Class
    public let desc: String

    public init(_ errorClass: Class, _ desc: String) {
        self.errorClass = errorClass
        self.desc = desc
    }

    public var description: String { desc }

    /// `{"class":"…","desc":"…"}`
    public var json: JSONValue { ["class": .string(errorClass.rawValue), "desc": .string(desc)] }

    /// Reads the `error` member of a reply; an unknown class (from a newer server) becomes `Failed`.
    public init?(json: JSONValue) {
        guard let desc = json["desc"]?.stringValue else { return nil }
        self.init(Class(rawValue: json["class"]?.stringValue ?? "") ?? .failed, desc)
    }
}

/// One request: `{"execute":COMMAND,"arguments":{...},"id":ANY}`.
public struct ControlRequest: Sendable, Equatable {
    public var command: String
    /// Always an object (empty when the request had none).
    public var arguments: JSONValue
    public var id: JSONValue?

    public init(command: String, arguments: JSONValue = .object([]), id: JSONValue? = nil) {
        self.command = command
        self.arguments = arguments
        self.id = id
    }

    /// The request line's JSON (`arguments` left out when empty, `id` when nil).
    public var json: JSONValue {
        var pairs: [(String, JSONValue)] = [("execute", .string(command))]
        if arguments != .object([]) { pairs.append(("arguments", arguments)) }
        if let id { pairs.append(("id", id)) }
        return .object(pairs)
    }

    /// A request the server cannot run, with the `id` to echo when the request had one.
    public struct Rejection: Error, Sendable, Equatable {
        public let error: ControlError
        public let id: JSONValue?
    }

    static let members: Set<String> = ["execute", "arguments", "id"]

    /// Decodes one request line (without its newline).
    public static func decode(_ line: [UInt8]) throws(Rejection) -> ControlRequest {
        let value: JSONValue
        do { value = try JSONValue.parse(bytes: line) } catch {
            throw Rejection(error: ControlError(.parseError, "the request is not JSON: \(error)"), id: nil)
        }
        guard case .object(let pairs) = value else {
            throw Rejection(error: ControlError(.badRequest, "a request must be a JSON object such as {\"execute\":\"query-status\"}, not \(value.typeName)"), id: nil)
        }
        let id = value["id"]
        if let unknown = pairs.first(where: { !members.contains($0.0) }) {
            throw Rejection(error: ControlError(.badRequest, "unknown request member \"\(unknown.0)\": a request has \"execute\", \"arguments\" and \"id\""), id: id)
        }
        guard let execute = value["execute"] else {
            throw Rejection(error: ControlError(.badRequest, "the request has no \"execute\": send {\"execute\":\"COMMAND\"}"), id: id)
        }
        guard let command = execute.stringValue else {
            throw Rejection(error: ControlError(.badRequest, "\"execute\" must be a string (the command's name), not \(execute.typeName)"), id: id)
        }
        let arguments = value["arguments"] ?? .object([])
        guard case .object = arguments else {
            throw Rejection(error: ControlError(.badRequest, "\"arguments\" must be an object, not \(arguments.typeName)"), id: id)
        }
        return ControlRequest(command: command, arguments: arguments, id: id)
    }
}

/// One reply: `{"return":VALUE,"id":ANY}` or `{"error":{"class":…,"desc":…},"id":ANY}`.
public enum ControlReply: Sendable, Equatable {
    case success(JSONValue, id: JSONValue?)
    case failure(ControlError, id: JSONValue?)

    public var id: JSONValue? {
        switch self {
        case .success(_, let id), .failure(_, let id): return id
        }
    }

    public var json: JSONValue {
        var pairs: [(String, JSONValue)]
        switch self {
        case .success(let value, _): pairs = [("return", value)]
        case .failure(let error, _): pairs = [("error", error.json)]
        }
        if let id { pairs.append(("id", id)) }
        return .object(pairs)
    }

    /// Reads a reply line's JSON; nil when it is neither kind of reply.
    public init?(json: JSONValue) {
        if let value = json["return"] {
            self = .success(value, id: json["id"])
        } else if let error = json["error"].flatMap(ControlError.init(json:)) {
            self = .failure(error, id: json["id"])
        } else {
            return nil
        }
    }
}

/// A command handler: takes the request's `arguments` (always an object, possibly empty) and
/// returns the reply's `return` value, or throws the error to reply with. Runs on the requesting
/// client's own thread (never Swift concurrency's pool) and may block; other clients are served
/// meanwhile.
public typealias ControlCommand = @Sendable (JSONValue) throws(ControlError) -> JSONValue

/// A command handler that also gets its call's context (client id, after-reply actions,
/// an interruptible sleep).
public typealias ControlContextCommand = @Sendable (JSONValue, ControlContext) throws(ControlError) -> JSONValue

// MARK: - Reading arguments in handlers

extension JSONValue {
    /// Throws InvalidArgument naming the first argument not in `allowed`.
    public func checkArguments(allowed: [String]) throws(ControlError) {
        for key in keys where !allowed.contains(key) {
            let valid = allowed.isEmpty ? "this command takes no arguments" : "valid: \(allowed.joined(separator: ", "))"
            throw ControlError(.invalidArgument, "unknown argument '\(key)' (\(valid))")
        }
    }

    /// The number under `key`, nil when absent or null; InvalidArgument when it is another type.
    public func doubleArgument(_ key: String) throws(ControlError) -> Double? {
        guard let value = self[key], !value.isNull else { return nil }
        guard let number = value.doubleValue else { throw ControlError(.invalidArgument, "'\(key)' must be a number, not \(value.typeName)") }
        return number
    }

    /// The whole number under `key`, nil when absent or null; InvalidArgument otherwise.
    public func intArgument(_ key: String) throws(ControlError) -> Int? {
        guard let value = self[key], !value.isNull else { return nil }
        guard let number = value.intValue else { throw ControlError(.invalidArgument, "'\(key)' must be a whole number, not \(value.isNumber ? value.description : value.typeName)") }
        return number
    }

    /// The string under `key`, nil when absent or null; InvalidArgument otherwise.
    public func stringArgument(_ key: String) throws(ControlError) -> String? {
        guard let value = self[key], !value.isNull else { return nil }
        guard let string = value.stringValue else { throw ControlError(.invalidArgument, "'\(key)' must be a string, not \(value.typeName)") }
        return string
    }

    /// The boolean under `key`, nil when absent or null; InvalidArgument otherwise.
    public func boolArgument(_ key: String) throws(ControlError) -> Bool? {
        guard let value = self[key], !value.isNull else { return nil }
        guard let flag = value.boolValue else { throw ControlError(.invalidArgument, "'\(key)' must be true or false, not \(value.typeName)") }
        return flag
    }
}
