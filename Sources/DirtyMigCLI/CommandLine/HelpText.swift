/// `--help` text, generated from the option table.
enum HelpText {
    static var overview: String {
        var text = """
        dirtymig \(dirtymigVersion): live migration and dirty-page measurement for KVM virtual machines

        Usage: dirtymig COMMAND [OPTIONS]

        Commands:

        """
        for command in OptionTable.commands {
            text += "  " + command.name.padding(toLength: 11, withPad: " ", startingAt: 0) + command.summary + "\n"
        }
        text += """

        Run 'dirtymig COMMAND --help' (or 'dirtymig help COMMAND') for a command's options,
        'dirtymig --version' for the version, and 'man dirtymig' for the full manual.
        SIZE: 4096, 512M, 1G (K/M/G/T = KiB/MiB/GiB/TiB; KB/MB/GB = powers of 1000).
        RATE: a SIZE per second (100M, 100MiB/s) or bits (800Mbit). DURATION: 500ms, 1s, 2m.

        """
        return text
    }

    static func help(for command: CommandSpec) -> String {
        var text = "Usage: \(command.synopsis)\n\n\(command.summary.prefix(1).uppercased() + command.summary.dropFirst()).\n"
        text += "\nOptions:\n"
        for option in command.options {
            text += optionLine("--\(option.name)" + (option.value.map { " \($0)" } ?? ""), option.help)
        }
        text += optionLine("-h, --help", "show this help")
        if command.name == "boot" {
            text += """

            Workload SPEC: [VCPUS:]KIND[,key=value...]  VCPUS: N or N-M (default: all)
              KIND: idle | write | read | mix | check (verifies its own memory, counts guest_errors)
              keys: ws=SIZE offset=SIZE pattern=seq|random|hot:F rate=RATE writes=PCT (mix) passes=N
                    emit=DURATION (check: an output line this often, 1ms-10s; see --guest-output)
                    content=sparse|text|random (write: what written pages hold; default sparse, mostly zero)
              e.g. --workload 0:write,ws=512M,pattern=random,rate=100M --workload 1:read,ws=256M
            Default: vCPU 0 writes 256 MiB sequentially at 100 MiB/s, the other vCPUs read 128 MiB.

            """
        }
        return text
    }

    /// Where an option's description starts.
    static let helpColumn = 28

    /// "  --name VALUE  description", the description in its column; an option too long for the
    /// column has its description on the next line, in the column, as GNU tools do.
    static func optionLine(_ option: String, _ help: String) -> String {
        let left = "  " + option
        if left.count + 2 <= helpColumn { return left.padding(toLength: helpColumn, withPad: " ", startingAt: 0) + help + "\n" }
        return left + "\n" + String(repeating: " ", count: helpColumn) + help + "\n"
    }
}
