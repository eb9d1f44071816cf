import DirtyMigCore

/// Every subcommand and option, declared once. The parser, `--help`, the man page test and the
/// completion test all read this table, so they cannot drift apart.
struct OptionSpec {
    enum Completion { case none, file, vm, choices([String]) }
    let name: String
    /// Placeholder for the value (SIZE, RATE ...); nil for a flag.
    let value: String?
    let help: String
    var repeatable = false
    var completion = Completion.none
}

struct CommandSpec {
    let name: String
    let summary: String
    let synopsis: String
    let options: [OptionSpec]

    func option(_ name: String) -> OptionSpec? { options.first { $0.name == name } }
}

enum OptionTable {
    static let trackChoices = TrackingMode.allCases.map(\.rawValue)
    static let modeChoices = DirtyRateMode.allCases.map(\.rawValue)
    static let throttleChoices = ThrottleMode.allCases.map(\.rawValue)
    static let compressChoices = PageCompression.allCases.map(\.rawValue)

    static let vm = OptionSpec(name: "vm", value: "NAME|PATH", help: "the VM's name or control socket path (default: vm)", completion: .vm)
    static let json = OptionSpec(name: "json", value: nil, help: "print JSON (one object per line) instead of a table")
    static let memory = OptionSpec(name: "memory", value: "SIZE", help: "guest RAM (default 1G)")
    static let vcpus = OptionSpec(name: "vcpus", value: "N", help: "number of vCPUs (default 2)")
    static let workload = OptionSpec(name: "workload", value: "SPEC", help: "what vCPUs do: [VCPUS:]KIND[,key=value...] (repeatable)", repeatable: true)
    static let track = OptionSpec(name: "track", value: "MODE", help: "dirty tracking: bitmap, ring or quota (default ring)", completion: .choices(trackChoices))
    static let ringEntries = OptionSpec(name: "ring-entries", value: "N", help: "dirty ring size per vCPU, a power of two 256-65536 (default 4096)")
    static let control = OptionSpec(name: "control", value: "PATH", help: "control socket path (default: per-user runtime directory, NAME.sock)", completion: .file)
    static let name = OptionSpec(name: "name", value: "NAME", help: "the VM's name, used for its control socket (default vm)")
    static let detach = OptionSpec(name: "detach", value: nil, help: "run in the background: return once the socket serves, printing where (log next to the socket)")
    static let guestOutput = OptionSpec(name: "guest-output", value: "FILE", help: "append the guest's output lines (check workloads with emit=) to FILE; without it they are not shown", completion: .file)
    static let pskFile = OptionSpec(name: "psk-file", value: "FILE", help: "encrypt and authenticate with TLS 1.3 and this pre-shared key (the same file on both hosts, mode 0600)", completion: .file)
    static let tlsDir = OptionSpec(name: "tls-dir", value: "DIR", help: "encrypt with TLS 1.3 and mutual certificates: DIR holds ca.pem, cert.pem, key.pem", completion: .file)
    static let tlsPeer = OptionSpec(name: "tls-peer", value: "NAME", help: "the name the peer's certificate must carry (migrate: default the host in --to)")
    static let insecure = OptionSpec(name: "insecure", value: nil, help: "allow plaintext, unauthenticated migration to or from another host")
    static let channel = [pskFile, tlsDir, tlsPeer, insecure]
    static let plot = OptionSpec(name: "plot", value: "FILE", help: "draw the migration over time as an SVG picture", completion: .file)

    static let commands: [CommandSpec] = [
        CommandSpec(name: "boot", summary: "boot a VM running the workload guest and serve its control socket",
                    synopsis: "dirtymig boot [--memory SIZE] [--vcpus N] [--workload SPEC]... [--track bitmap|ring|quota] [--ring-entries N] [--control PATH] [--name NAME] [--guest-output FILE] [--detach] [--export-image FILE [--export-config FILE]]",
                    options: [memory, vcpus, workload, track, ringEntries, control, name, guestOutput, detach,
                              OptionSpec(name: "export-image", value: "FILE", help: "write the guest image (and with --export-config its config block), print the QEMU options that run it, and exit", completion: .file),
                              OptionSpec(name: "export-config", value: "FILE", help: "with --export-image: where to write the config block", completion: .file)]),
        CommandSpec(name: "migrate", summary: "live-migrate a running VM to a receiver, or (with neither --vm nor --to) run a whole local migration",
                    synopsis: "dirtymig migrate [--vm NAME|PATH] --to HOST:PORT [--bandwidth RATE] [--downtime DURATION] [--max-iterations N] [--timeout DURATION] [--link-timeout DURATION] [--verify] [--json] [--stats FILE] [--plot FILE] [--throttle MODE] [--compress MODE] [--postcopy [--postcopy-after N] [--postcopy-recover-for DURATION]] [--psk-file FILE | --tls-dir DIR [--tls-peer NAME] | --insecure]\n       dirtymig migrate [--memory SIZE] [--vcpus N] [--workload SPEC]... [--track MODE] [--bandwidth RATE] [--downtime DURATION] [--throttle MODE] [--compress MODE] [--postcopy [--postcopy-after N]] [--verify] [--json] [--stats FILE] [--plot FILE]   (a local migration)\n       dirtymig migrate [--vm NAME|PATH] --continuous --to HOST:PORT [--checkpoint-interval DURATION] [--checkpoint-pages N] [--reprotect-for DURATION] [--compress MODE] [--stats FILE] [--json] [--psk-file FILE | --tls-dir DIR [--tls-peer NAME] | --insecure]   (replication)\n       dirtymig migrate [--vm NAME|PATH] --replication | --stop-replication [--json]\n       dirtymig migrate [--vm NAME|PATH] --status [--json]   (the migration under way)\n       dirtymig migrate [--vm NAME|PATH] --set LIMIT=VALUE... [--json]   (change its limits: bandwidth=RATE|unlimited, downtime=DURATION)\n       dirtymig migrate [--vm NAME|PATH] --start-postcopy [--json]   (switch a --postcopy migration to post-copy now)\n       dirtymig migrate [--vm NAME|PATH] --resume [--to HOST:PORT] [--json]   (a paused post-copy tries the destination now)",
                    options: [vm, OptionSpec(name: "to", value: "HOST:PORT", help: "where a 'dirtymig receive' listens"),
                              OptionSpec(name: "bandwidth", value: "RATE", help: "cap on bytes sent per second (default unlimited)"),
                              OptionSpec(name: "downtime", value: "DURATION", help: "largest acceptable pause (default 300ms)"),
                              OptionSpec(name: "max-iterations", value: "N", help: "give up after N pre-copy passes (default 30)"),
                              OptionSpec(name: "timeout", value: "DURATION", help: "give up after this long (default: no limit)"),
                              OptionSpec(name: "link-timeout", value: "DURATION", help: "fail once the link has carried nothing for this long, on both sides; shorter cuts are ridden out (default 30s)"),
                              OptionSpec(name: "verify", value: nil, help: "prove the destination equals the source at the pause"),
                              json,
                              OptionSpec(name: "stats", value: "FILE", help: "write one JSON line per pass", completion: .file),
                              plot,
                              OptionSpec(name: "throttle", value: "MODE", help: "slow a guest that dirties faster than the link: auto (by --track), none, cpu, dirty-limit (ring), dirty-quota (quota)", completion: .choices(throttleChoices)),
                              OptionSpec(name: "compress", value: "MODE", help: "compress page batches with zstd: none (default), zstd (every batch that shrinks), auto (only while the link is slower than compressing here)", completion: .choices(compressChoices)),
                              OptionSpec(name: "postcopy", value: nil, help: "switch to post-copy when pre-copy cannot meet --downtime: the VM runs at the destination at once and fetches the pages it lacks on demand"),
                              OptionSpec(name: "postcopy-after", value: "N", help: "with --postcopy: switch after N pre-copy passes instead (unless pre-copy met --downtime first)"),
                              OptionSpec(name: "postcopy-recover-for", value: "DURATION", help: "with --postcopy: a link that fails after the switch pauses post-copy, and the source tries the destination again for this long (default 10m; then only --resume does; it keeps its pages meanwhile)"),
                              memory, vcpus, workload, track,
                              OptionSpec(name: "continuous", value: nil, help: "replicate to a standby ('receive --standby') until stopped: return once it holds a first checkpoint"),
                              OptionSpec(name: "checkpoint-interval", value: "DURATION", help: "with --continuous: end an epoch after this long (default 25ms)"),
                              OptionSpec(name: "checkpoint-pages", value: "N", help: "with --continuous: or as soon as the guest dirtied N pages (ring and quota tracking)"),
                              OptionSpec(name: "reprotect-for", value: "DURATION", help: "with --continuous: a standby lost is sought again for this long, and protects the VM again once it answers (default 5m; 0s: never)"),
                              OptionSpec(name: "replication", value: nil, help: "show the VM's replication: status and figures"),
                              OptionSpec(name: "stop-replication", value: nil, help: "end the VM's replication (the standby discards its copy)"),
                              OptionSpec(name: "status", value: nil, help: "show the migration under way: phase, pass, sent and left, rate, dirty rate, expected downtime, limits, throttle, elapsed"),
                              OptionSpec(name: "set", value: "LIMIT=VALUE", help: "change the migration under way from its next decision on: bandwidth=RATE (or unlimited), downtime=DURATION (repeatable)", repeatable: true),
                              OptionSpec(name: "start-postcopy", value: nil, help: "switch the --postcopy migration under way to post-copy at the end of its current pass"),
                              OptionSpec(name: "resume", value: nil, help: "a paused post-copy tries the destination now, also after --postcopy-recover-for (with --to: at this new address)")] + channel),
        CommandSpec(name: "receive", summary: "accept an incoming migration, then run and serve the VM",
                    synopsis: "dirtymig receive --listen HOST:PORT [--memory SIZE] [--standby [--failover auto|manual] [--failover-after DURATION]] [--psk-file FILE | --tls-dir DIR [--tls-peer NAME] | --insecure] [--control PATH] [--name NAME] [--guest-output FILE] [--once] [--detach]",
                    options: [OptionSpec(name: "listen", value: "HOST:PORT", help: "address to listen on (:PORT for all addresses)"),
                              OptionSpec(name: "memory", value: "SIZE", help: "allocate guest RAM for a VM of SIZE before listening, as QEMU's -mem-prealloc does (a VM of another size gets fresh memory)"),
                              control, name, guestOutput,
                              OptionSpec(name: "once", value: nil, help: "exit after one migration that took the slot (non-zero if it failed); refused connections are only logged"), detach,
                              OptionSpec(name: "standby", value: nil, help: "be a standby for 'migrate --continuous': keep the last checkpoint, take over when the primary is gone"),
                              OptionSpec(name: "failover", value: "MODE", help: "with --standby: auto (resume when the primary is gone, the default) or manual (wait for 'dirtymig failover')", completion: .choices(StandbyOptions.Failover.allCases.map(\.rawValue))),
                              OptionSpec(name: "failover-after", value: "DURATION", help: "with --standby: the primary is gone after this long with no byte from it (default 500ms)")] + channel),
        CommandSpec(name: "dirtyrate", summary: "measure a running VM's dirty rate, per vCPU where the tracking mode allows",
                    synopsis: "dirtymig dirtyrate [--vm NAME|PATH] [--mode ring|bitmap|sample] [--interval DURATION] [--count N] [--json]",
                    options: [vm, OptionSpec(name: "mode", value: "MODE", help: "ring (per vCPU), bitmap (VM-wide) or sample (page hashing, any VM); default: the best the VM has", completion: .choices(modeChoices)),
                              OptionSpec(name: "interval", value: "DURATION", help: "length of one measurement (default 1s)"),
                              OptionSpec(name: "count", value: "N", help: "stop after N intervals (default: until interrupted)"),
                              json]),
        CommandSpec(name: "limit", summary: "set, change, cancel or list per-vCPU dirty-rate limits on a running VM",
                    synopsis: "dirtymig limit [--vm NAME|PATH] [--vcpu N|all] [--rate RATE | --cancel | --show] [--json]",
                    options: [vm, OptionSpec(name: "vcpu", value: "N|all", help: "which vCPU (default all)"),
                              OptionSpec(name: "rate", value: "RATE", help: "the dirty-rate ceiling (ring: dirty limit; quota: dirty-quota exits)"),
                              OptionSpec(name: "cancel", value: nil, help: "remove the limit"),
                              OptionSpec(name: "show", value: nil, help: "list limit, current rate and throttle state per vCPU (the default)"), json]),
        CommandSpec(name: "list", summary: "list the VMs (and receivers) running for this user, with their state",
                    synopsis: "dirtymig list [--json]",
                    options: [json]),
        CommandSpec(name: "stop", summary: "stop a running VM or receiver (as SIGTERM would: a migration under way is cancelled first)",
                    synopsis: "dirtymig stop [--vm NAME|PATH] [--timeout DURATION]",
                    options: [vm, OptionSpec(name: "timeout", value: "DURATION", help: "how long to wait for it to end (default 10s)")]),
        CommandSpec(name: "failover", summary: "make a standby resume the VM from its last checkpoint now (manual failover)",
                    synopsis: "dirtymig failover [--vm NAME|PATH] [--force] [--json]",
                    options: [vm, OptionSpec(name: "force", value: nil, help: "take over even though the primary is still heard from (two copies of the VM then run; the primary is told and stops its output)"), json]),
        CommandSpec(name: "plot", summary: "draw a migration from its saved report (migrate --json) or stats file (migrate --stats) as SVG",
                    synopsis: "dirtymig plot --from FILE [--output FILE]",
                    options: [OptionSpec(name: "from", value: "FILE", help: "a 'migrate --json' report, or a 'migrate --stats' file", completion: .file),
                              OptionSpec(name: "output", value: "FILE", help: "where to write the SVG (default: FILE with .svg)", completion: .file)]),
    ]

    static func command(_ name: String) -> CommandSpec? { commands.first { $0.name == name } }
}
