# fish completion for dirtymig: copy to ~/.config/fish/completions/dirtymig.fish

function __dirtymig_vms
    set -l dir $XDG_RUNTIME_DIR/dirtymig
    test -n "$XDG_RUNTIME_DIR"; and test -d $dir; or set dir /tmp/dirtymig-(id -u)
    for f in $dir/*.sock; basename $f .sock; end
end

complete -c dirtymig -f
complete -c dirtymig -n __fish_use_subcommand -l help -d "show help"
complete -c dirtymig -n __fish_use_subcommand -l version -d "show the version"
complete -c dirtymig -n __fish_use_subcommand -a boot -d "boot a VM running the workload guest"
complete -c dirtymig -n __fish_use_subcommand -a migrate -d "live-migrate a VM, or run a local migration"
complete -c dirtymig -n __fish_use_subcommand -a receive -d "accept an incoming migration, then run the VM"
complete -c dirtymig -n __fish_use_subcommand -a dirtyrate -d "measure a VM's dirty rate"
complete -c dirtymig -n __fish_use_subcommand -a limit -d "per-vCPU dirty-rate limits"
complete -c dirtymig -n __fish_use_subcommand -a list -d "list the running VMs and receivers"
complete -c dirtymig -n __fish_use_subcommand -a stop -d "stop a running VM or receiver"
complete -c dirtymig -n __fish_use_subcommand -a failover -d "make a standby resume the VM now"
complete -c dirtymig -n __fish_use_subcommand -a plot -d "draw a saved migration as SVG"
complete -c dirtymig -n __fish_use_subcommand -a help -d "show help for a command"
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l memory -x
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l vcpus -x
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l workload -x
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l track -x -a 'bitmap ring quota'
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l ring-entries -x
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l control -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l name -x
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l guest-output -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l detach
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l export-image -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from boot" -l export-config -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l vm -x -a '(__dirtymig_vms)'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l to -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l bandwidth -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l downtime -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l max-iterations -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l timeout -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l link-timeout -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l verify
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l json
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l stats -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l plot -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l continuous
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l checkpoint-interval -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l checkpoint-pages -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l reprotect-for -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l replication
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l stop-replication
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l status -d "show the migration under way"
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l set -x -a "bandwidth= downtime=" -d "change the running migration's limits"
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l throttle -x -a 'auto none cpu dirty-limit dirty-quota'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l compress -x -a 'none zstd auto' -d 'compress page batches with zstd'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l postcopy -d 'switch to post-copy when pre-copy cannot meet --downtime'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l postcopy-after -x -d 'with --postcopy: switch after N pre-copy passes'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l postcopy-recover-for -x -d 'with --postcopy: how long a paused post-copy retries by itself'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l start-postcopy -d 'switch the migration under way to post-copy'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l resume -d 'a paused post-copy tries the destination now'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l memory -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l vcpus -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l workload -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l track -x -a 'bitmap ring quota'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l psk-file -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l tls-dir -x -a '(__fish_complete_directories)'
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l tls-peer -x
complete -c dirtymig -n "__fish_seen_subcommand_from migrate" -l insecure
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l listen -x
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l memory -x -d "allocate guest RAM for a VM of SIZE before listening"
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l control -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l name -x
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l guest-output -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l once
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l detach
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l psk-file -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l tls-dir -x -a '(__fish_complete_directories)'
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l tls-peer -x
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l insecure
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l standby
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l failover -x -a "auto manual"
complete -c dirtymig -n "__fish_seen_subcommand_from receive" -l failover-after -x
complete -c dirtymig -n "__fish_seen_subcommand_from failover" -l vm -x -a "(__dirtymig_vms)"
complete -c dirtymig -n "__fish_seen_subcommand_from failover" -l force -d "take over though the primary is heard from"
complete -c dirtymig -n "__fish_seen_subcommand_from failover" -l json
complete -c dirtymig -n "__fish_seen_subcommand_from dirtyrate" -l vm -x -a '(__dirtymig_vms)'
complete -c dirtymig -n "__fish_seen_subcommand_from dirtyrate" -l mode -x -a 'ring bitmap sample'
complete -c dirtymig -n "__fish_seen_subcommand_from dirtyrate" -l interval -x
complete -c dirtymig -n "__fish_seen_subcommand_from dirtyrate" -l count -x
complete -c dirtymig -n "__fish_seen_subcommand_from dirtyrate" -l json
complete -c dirtymig -n "__fish_seen_subcommand_from limit" -l vm -x -a '(__dirtymig_vms)'
complete -c dirtymig -n "__fish_seen_subcommand_from limit" -l vcpu -x
complete -c dirtymig -n "__fish_seen_subcommand_from limit" -l rate -x
complete -c dirtymig -n "__fish_seen_subcommand_from limit" -l cancel
complete -c dirtymig -n "__fish_seen_subcommand_from limit" -l show
complete -c dirtymig -n "__fish_seen_subcommand_from limit" -l json
complete -c dirtymig -n "__fish_seen_subcommand_from list" -l json
complete -c dirtymig -n "__fish_seen_subcommand_from stop" -l vm -x -a '(__dirtymig_vms)'
complete -c dirtymig -n "__fish_seen_subcommand_from stop" -l timeout -x
complete -c dirtymig -n "__fish_seen_subcommand_from plot" -l from -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from plot" -l output -r -F
complete -c dirtymig -n "__fish_seen_subcommand_from help" -a "boot migrate receive dirtyrate limit list stop failover plot"
