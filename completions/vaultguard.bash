# bash completion for vaultguard(8). To add a command or option, extend the
# tables below (keep them in step with src/cli.rs).
_vaultguard() {
    local cur prev words cword
    _init_completion || return

    local global_opts="-c --config --cmdline --json -V --version --help"
    local commands="unlock attach detach enroll reseal supervise status lock keepalive audit config version token metrics policy"
    local -A opts=(
        [unlock]="--device --no-tpm --headless --key-file --local --json --test --unlock-passphrase-file --help"
        [attach]="--test --json --help"
        [detach]="--json --help"
        [enroll]="--device --pcrs --bank --pin --recovery-key --unlock-key-file --unlock-passphrase-file --json --public-key --public-key-pcrs --tpm2-pcrs --tpm2-with-pin --revocation-counter --tang --tang-thumbprint --threshold --tpm2 --help"
        [reseal]="--device --pcrs --bank --pin --confirm --unlock-key-file --unlock-passphrase-file --json --help"
        [supervise]="--auto-lock-seconds --help"
        [status]="--json --help"
        [lock]="--json --reason --help"
        [keepalive]="--json --help"
        [audit]="export rotate verify --help"
        [config]="--get --help"
        [version]="--json --help"
        [metrics]="--help"
        [token]="issue list revoke --help"
        [policy]="predict sign revoke-older ticket --help"
        [policy sign]="--private-key --public-key --public-key-pcrs --predicted --signature --append --revocation-counter --counter-value --json --help"
        [policy revoke-older]="--revocation-counter --device --signature --json --help"
        [policy ticket]="--device --signature --json --help"
        [policy predict]="--initrd --kernel --cmdline --pcrs --bank --event-log --json --help"
        [audit export]="--key --key-version -o --output --help"
        [audit rotate]="--help"
        [audit verify]="--public-key --tpm --help"
        [token issue]="--name --role --expires --help"
        [token list]="--json --help"
        [token revoke]="--help"
    )

    case $prev in
        -c | --config | --cmdline | --key-file | --key | -o | --output | --public-key | \
            --unlock-key-file | --unlock-passphrase-file | --initrd | --kernel | --event-log)
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
        --reason)
            # incident:<id> takes the operator's own id after the colon.
            COMPREPLY=($(compgen -W "operator_request suspend incident:" -- "$cur"))
            [[ ${COMPREPLY[0]} == incident: ]] && compopt -o nospace
            return
            ;;
        --role)
            # The built-in roles; custom ones are the keys of control.roles.
            COMPREPLY=($(compgen -W "admin operator viewer agent" -- "$cur"))
            return
            ;;
        --pcrs | --auto-lock-seconds | --key-version | --get | --name | --expires)
            return
            ;;
    esac

    # The command (and the audit or token subcommand) typed so far, skipping global options.
    local cmd="" i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -c | --config | --cmdline) ((i++)) ;;
            -*) ;;
            *)
                if [[ -z $cmd ]]; then
                    cmd=${words[i]}
                elif [[ $cmd == audit || $cmd == token || $cmd == policy ]]; then
                    cmd="$cmd ${words[i]}"
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
