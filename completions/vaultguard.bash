# bash completion for vaultguard(8). To add a command or option, extend the
# tables below (keep them in step with src/cli.rs).
_vaultguard() {
    local cur prev words cword
    _init_completion || return

    local global_opts="-c --config --cmdline --help"
    local commands="unlock attach detach enroll reseal supervise status lock keepalive audit config version"
    local -A opts=(
        [unlock]="--device --no-tpm --headless --key-file --local --json --help"
        [attach]="--help"
        [detach]="--help"
        [enroll]="--device --pcrs --bank --pin --recovery-key --help"
        [reseal]="--device --pcrs --bank --pin --help"
        [supervise]="--auto-lock-seconds --help"
        [status]="--json --help"
        [lock]="--json --help"
        [keepalive]="--json --help"
        [audit]="export rotate verify --help"
        [config]="--get --help"
        [version]="--help"
        [audit export]="--key --key-version -o --output --help"
        [audit rotate]="--help"
        [audit verify]="--public-key --tpm --help"
    )

    case $prev in
        -c | --config | --cmdline | --key-file | --key | -o | --output | --public-key)
            _filedir
            return
            ;;
        --device)
            _filedir
            return
            ;;
        --bank)
            COMPREPLY=($(compgen -W "sha256 sha1" -- "$cur"))
            return
            ;;
        --pcrs | --auto-lock-seconds | --key-version | --get)
            return
            ;;
    esac

    # The command (and the audit subcommand) typed so far, skipping global options.
    local cmd="" i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -c | --config | --cmdline) ((i++)) ;;
            -*) ;;
            *)
                if [[ -z $cmd ]]; then
                    cmd=${words[i]}
                elif [[ $cmd == audit ]]; then
                    cmd="audit ${words[i]}"
                    break
                else
                    break
                fi
                ;;
        esac
    done

    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "$global_opts $commands" -- "$cur"))
    elif [[ -n ${opts[$cmd]+set} ]]; then
        COMPREPLY=($(compgen -W "${opts[$cmd]}" -- "$cur"))
        [[ $cmd == "audit rotate" || $cmd == "audit verify" || $cmd == "audit export" ]] &&
            [[ $cur != -* ]] && _filedir
    fi
}
complete -F _vaultguard vaultguard
