import DirtyMigCore
import Foundation

// dirtymig: parse, dispatch to one file per subcommand, map failures to exit statuses
// (0 success, 1 runtime failure, 2 usage error or impossible request).

/// A failure at run time (exit status 1) with a message that says what to do.
struct RuntimeFailure: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

/// One line to standard output, written at once (scripts read dirtyrate's lines as they come).
/// A line that cannot be written is counted, never fatal (StandardStream).
func emit(_ line: String) {
    StandardStream.output.writeLine(line)
}

/// One line to standard error, the log of `boot` and `receive`: counted, never fatal, when it
/// cannot be written (a full disk under a detached command's log must not stop its VM).
func printError(_ text: String) {
    StandardStream.error.writeLine(text)
}

StandardStream.ignoreBrokenPipes()   // before any thread: a reader that went away is an EPIPE, counted
Detach.leaveSessionIfDetached()
let status: Int32
do {
    switch try ArgumentParser.parse(Array(CommandLine.arguments.dropFirst())) {
    case .help(let text):
        StandardStream.output.write(text)
        status = 0
    case .usage(let text):
        StandardStream.error.write(text)
        status = UsageError.exitStatus
    case .version:
        emit("dirtymig \(dirtymigVersion)")
        status = 0
    case .run(let arguments):
        switch arguments.command.name {
        case "boot": status = try BootCommand.run(arguments)
        case "dirtyrate": status = try DirtyRateCommand.run(arguments)
        case "migrate": status = try MigrateCommand.run(arguments)
        case "receive": status = try ReceiveCommand.run(arguments)
        case "limit": status = try LimitCommand.run(arguments)
        case "list": status = try ListCommand.run(arguments)
        case "stop": status = try StopCommand.run(arguments)
        case "plot": status = try PlotCommand.run(arguments)
        case "failover": status = try FailoverCommand.run(arguments)
        default: fatalError("no implementation for \(arguments.command.name)")
        }
    }
} catch let error as UsageError {
    printError(error.description)
    status = UsageError.exitStatus
} catch let error as ControlClient.ClientError where error.controlError?.errorClass == .invalidArgument {
    // The VM refused an impossible request (a vCPU it does not have, a rate out of range): a
    // usage error, exit 2, as the man page says.
    let command = CommandLine.arguments.dropFirst().first.map { " " + $0 } ?? ""
    printError("dirtymig\(command): \(error)")
    status = UsageError.exitStatus
} catch {
    printError("dirtymig: \(error)")
    status = 1
}
// What could not be written is said now if it was not yet; a result that did not all reach
// standard output is a failure (a script reading it got part of it, or nothing).
let outputLost = StandardStream.reportLossesAtExit() != nil
exit(status == 0 && outputLost ? 1 : status)
