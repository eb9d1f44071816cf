# bash completion for dirtymig. Source it, or install it as
# /usr/share/bash-completion/completions/dirtymig.
_dirtymig_vms() {
    local dir="${XDG_RUNTIME_DIR:+$XDG_RUNTIME_DIR/dirtymig}"
    [ -n "$dir" ] && [ -d "$dir" ] || dir="/tmp/dirtymig-$(id -u)"
    local f; for f in "$dir"/*.sock; do [ -e "$f" ] && basename "$f" .sock; done
}
_dirtymig() {
    local cur prev words cword
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    local commands="boot migrate receive dirtyrate limit list stop failover plot help"
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "$commands --help --version" -- "$cur"))
        return
    fi
    local command="${COMP_WORDS[1]}" options=""
    case "$command" in
        boot) options="--memory --vcpus --workload --track --ring-entries --control --name --guest-output --detach --export-image --export-config --help" ;;
        migrate) options="--vm --to --bandwidth --downtime --max-iterations --timeout --link-timeout --verify --json --stats --plot --throttle --compress --postcopy --postcopy-after --postcopy-recover-for --memory --vcpus --workload --track --continuous --checkpoint-interval --checkpoint-pages --reprotect-for --replication --stop-replication --status --set --start-postcopy --resume --psk-file --tls-dir --tls-peer --insecure --help" ;;
        receive) options="--listen --memory --control --name --guest-output --once --detach --standby --failover --failover-after --psk-file --tls-dir --tls-peer --insecure --help" ;;
        dirtyrate) options="--vm --mode --interval --count --json --help" ;;
        limit) options="--vm --vcpu --rate --cancel --show --json --help" ;;
        list) options="--json --help" ;;
        stop) options="--vm --timeout --help" ;;
        failover) options="--vm --force --json --help" ;;
        plot) options="--from --output --help" ;;
        help) COMPREPLY=($(compgen -W "boot migrate receive dirtyrate limit list stop failover plot" -- "$cur")); return ;;
    esac
    case "$prev" in
        --track) COMPREPLY=($(compgen -W "bitmap ring quota" -- "$cur")); return ;;
        --control) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --guest-output) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --export-image) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --export-config) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --vm) COMPREPLY=($(compgen -W "$(_dirtymig_vms)" -- "$cur")); return ;;
        --stats) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --plot) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --throttle) COMPREPLY=($(compgen -W "auto none cpu dirty-limit dirty-quota" -- "$cur")); return ;;
        --compress) COMPREPLY=($(compgen -W "none zstd auto" -- "$cur")); return ;;
        --failover) COMPREPLY=($(compgen -W "auto manual" -- "$cur")); return ;;
        --set) compopt -o nospace 2>/dev/null; COMPREPLY=($(compgen -W "bandwidth= downtime=" -- "$cur")); return ;;
        --mode) COMPREPLY=($(compgen -W "ring bitmap sample" -- "$cur")); return ;;
        --from) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --output) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --psk-file) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --tls-dir) COMPREPLY=($(compgen -d -- "$cur")); return ;;
    esac
    COMPREPLY=($(compgen -W "$options" -- "$cur"))
}
complete -F _dirtymig dirtymig
