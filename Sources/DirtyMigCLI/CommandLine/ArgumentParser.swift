import DirtyMigCore

let dirtymigVersion = ControlProtocol.softwareVersion

/// Bad command-line input: exit status 2, with the offending word named and, where one is close,
/// the valid word suggested.
struct UsageError: Error, CustomStringConvertible {
    let message: String
    let command: String?
    static let exitStatus: Int32 = 2

    var description: String {
        let hint = command.map { "Run 'dirtymig \($0) --help'." } ?? "Run 'dirtymig --help'."
        return "dirtymig\(command.map { " " + $0 } ?? ""): \(message)\n\(hint)"
    }
}

/// What the user asked for.
enum Invocation {
    case help(String)
    /// No command: the overview, on standard error, and exit status 2.
    case usage(String)
    case version
    case run(ParsedArguments)
}

/// A subcommand's options as given, with typed accessors that turn bad values into UsageErrors.
struct ParsedArguments {
    let command: CommandSpec
    private(set) var values: [String: [String]] = [:]

    init(command: CommandSpec) { self.command = command }

    mutating func add(_ option: String, _ value: String) { values[option, default: []].append(value) }

    func has(_ option: String) -> Bool { values[option] != nil }
    func string(_ option: String) -> String? { values[option]?.last }
    func strings(_ option: String) -> [String] { values[option] ?? [] }

    func error(_ message: String) -> UsageError { UsageError(message: message, command: command.name) }

    func parse<T>(_ option: String, _ parser: (String) throws(QuantityError) -> T) throws(UsageError) -> T? {
        guard let text = string(option) else { return nil }
        do { return try parser(text) } catch { throw self.error("--\(option): \(error.message)") }
    }

    func size(_ option: String) throws(UsageError) -> UInt64? { try parse(option) { (t) throws(QuantityError) in try ByteSize.parse(t) } }
    func rate(_ option: String) throws(UsageError) -> UInt64? { try parse(option) { (t) throws(QuantityError) in try ByteRate.parse(t) } }
    func duration(_ option: String) throws(UsageError) -> Double? { try parse(option) { (t) throws(QuantityError) in try DurationValue.parse(t) } }
    func count(_ option: String) throws(UsageError) -> Int? {
        try parse(option) { (t) throws(QuantityError) in try Count.parse(t, what: "number") }
    }
    /// Checks every value against its kind (SIZE, RATE, DURATION, N, a choice), for every
    /// command, so even commands that are not implemented yet reject bad input the same way.
    func validateValues() throws(UsageError) {
        for option in command.options where has(option.name) {
            switch option.value {
            case "SIZE": _ = try size(option.name)
            case "RATE": _ = try rate(option.name)
            case "DURATION": _ = try duration(option.name)
            case "N": _ = try count(option.name)
            case "HOST:PORT":
                let value = string(option.name) ?? ""
                if let colon = value.lastIndex(of: ":"), let port = Int(value[value.index(after: colon)...]), port > 65535 {
                    throw error("--\(option.name) '\(value)': port \(port) is above 65535")
                }
                // An empty host (":4444") means every address; only --listen accepts it, and
                // `migrate` checks --to for a host itself.
                guard let colon = value.lastIndex(of: ":"), let port = Int(value[value.index(after: colon)...]),
                      (1...65535).contains(port), colon != value.startIndex || option.name == "listen" else {
                    throw error("--\(option.name) '\(value)': expected HOST:PORT, e.g. 127.0.0.1:4444\(option.name == "listen" ? " or :4444" : "")")
                }
            default: _ = try choice(option.name)
            }
        }
    }

    func choice(_ option: String) throws(UsageError) -> String? {
        guard let value = string(option) else { return nil }
        if case .choices(let choices)? = command.option(option)?.completion, !choices.contains(value) {
            throw error("--\(option): '\(value)' is not one of \(choices.joined(separator: ", "))\(suggestion(value, choices))")
        }
        return value
    }
}

enum ArgumentParser {
    static func parse(_ arguments: [String]) throws(UsageError) -> Invocation {
        guard let first = arguments.first else { return .usage(HelpText.overview) }
        switch first {
        case "-h", "--help": return .help(HelpText.overview)
        case "--version", "-V": return .version
        case "help":
            guard arguments.count > 1 else { return .help(HelpText.overview) }
            guard let command = OptionTable.command(arguments[1]) else { throw unknownCommand(arguments[1]) }
            return .help(HelpText.help(for: command))
        default: break
        }
        guard let command = OptionTable.command(first) else {
            if first.hasPrefix("-") {
                throw UsageError(message: "unknown option '\(first)'; options come after a command (boot, migrate, receive, dirtyrate, limit)", command: nil)
            }
            throw unknownCommand(first)
        }
        var parsed = ParsedArguments(command: command)
        var index = 1
        while index < arguments.count {
            let word = arguments[index]
            index += 1
            if word == "-h" || word == "--help" { return .help(HelpText.help(for: command)) }
            guard word.hasPrefix("--"), word.count > 2 else {
                throw parsed.error("unexpected argument '\(word)'; options start with --")
            }
            var name = String(word.dropFirst(2))
            var inlineValue: String? = nil
            if let equals = name.firstIndex(of: "=") {
                inlineValue = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            guard let spec = command.option(name) else {
                let names = command.options.map(\.name)
                let hint = nearest(name, names).map { "; did you mean '--\($0)'?" } ?? ""
                throw parsed.error("unknown option '--\(name)'\(hint)")
            }
            if parsed.has(name) && !spec.repeatable {
                throw parsed.error("--\(name) given twice")
            }
            if spec.value == nil {
                if inlineValue != nil { throw parsed.error("--\(name) takes no value") }
                parsed.add(name, "")
                continue
            }
            if let inlineValue {
                parsed.add(name, inlineValue)
            } else {
                guard index < arguments.count, !arguments[index].hasPrefix("--") else {
                    throw parsed.error("--\(name) needs a value (\(spec.value!))")
                }
                parsed.add(name, arguments[index])
                index += 1
            }
        }
        try parsed.validateValues()
        return .run(parsed)
    }

    static func unknownCommand(_ word: String) -> UsageError {
        let names = OptionTable.commands.map(\.name) + ["help"]
        let hint = nearest(word, names).map { "; did you mean '\($0)'?" } ?? ""
        return UsageError(message: "unknown command '\(word)'\(hint)", command: nil)
    }
}
