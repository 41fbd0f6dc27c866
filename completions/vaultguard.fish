# fish completion for vaultguard(8). To add a command or option, add a line
# below (keep them in step with src/cli.rs).
set -l commands unlock attach detach enroll reseal supervise status lock keepalive audit config version token metrics
function __vaultguard_no_command
    not __fish_seen_subcommand_from unlock attach detach enroll reseal supervise status lock keepalive audit config version token metrics
end

complete -c vaultguard -f
complete -c vaultguard -n __vaultguard_no_command -s c -l config -r -F -d 'configuration file'
complete -c vaultguard -n __vaultguard_no_command -l cmdline -r -F -d 'kernel command line file'
complete -c vaultguard -n __vaultguard_no_command -l json -d 'print one JSON object, errors included'
complete -c vaultguard -n __vaultguard_no_command -s V -l version -d 'print the version'
complete -c vaultguard -l help -d 'show help'

complete -c vaultguard -n __vaultguard_no_command -a unlock -d 'open the vault (TPM2, key file, passphrase)'
complete -c vaultguard -n __vaultguard_no_command -a attach -d 'systemd-cryptsetup compatible attach'
complete -c vaultguard -n __vaultguard_no_command -a detach -d 'close a mapping and revoke its keys'
complete -c vaultguard -n __vaultguard_no_command -a enroll -d 'seal a new secret to the TPM'
complete -c vaultguard -n __vaultguard_no_command -a reseal -d 'seal to the current PCRs'
complete -c vaultguard -n __vaultguard_no_command -a supervise -d 'run the after-boot supervisor'
complete -c vaultguard -n __vaultguard_no_command -a status -d 'show the vault state'
complete -c vaultguard -n __vaultguard_no_command -a lock -d 'lock the vault now'
complete -c vaultguard -n __vaultguard_no_command -a keepalive -d 'postpone the idle auto-lock'
complete -c vaultguard -n __vaultguard_no_command -a audit -d 'audit log tools'
complete -c vaultguard -n __vaultguard_no_command -a config -d 'print the effective settings'
complete -c vaultguard -n __vaultguard_no_command -a version -d 'print the versions'
complete -c vaultguard -n __vaultguard_no_command -a token -d 'manage the control socket tokens'
complete -c vaultguard -n __vaultguard_no_command -a metrics -d 'print the supervisor metrics'

complete -c vaultguard -n '__fish_seen_subcommand_from unlock enroll reseal' -l device -r -F -d 'LUKS2 device'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock' -l no-tpm -d 'do not use the TPM'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock' -l headless -d 'never prompt'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock' -l key-file -r -F -d 'key file'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock' -l local -d 'open here even if a supervisor runs'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock status lock keepalive' -l json -d 'raw JSON response'
complete -c vaultguard -n '__fish_seen_subcommand_from attach detach enroll reseal version' -l json -d 'print one JSON object'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock attach' -l test -d 'only say which keyslot would open'
complete -c vaultguard -n '__fish_seen_subcommand_from unlock enroll reseal' -l unlock-passphrase-file -r -F -d 'passphrase from this file (- for stdin)'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll reseal' -l unlock-key-file -r -F -d 'unlock with this key file (- for stdin)'
complete -c vaultguard -n '__fish_seen_subcommand_from lock' -l reason -x -a 'operator_request suspend incident:' -d 'why (state, audit, events)'
complete -c vaultguard -n '__fish_seen_subcommand_from attach enroll reseal' -F
complete -c vaultguard -n '__fish_seen_subcommand_from enroll reseal' -l pcrs -x -d 'PCRs to bind'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll reseal' -l bank -x -a 'sha256 sha1' -d 'PCR bank'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll reseal' -l pin -d 'require a PIN'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll' -l recovery-key -d 'also add a recovery key'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll' -l tang -r -d 'bind to this Tang server (repeatable)'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll' -l tang-thumbprint -r -d 'trust this Tang signing key'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll' -l threshold -r -d 'how many pins must answer (sss t)'
complete -c vaultguard -n '__fish_seen_subcommand_from enroll' -l tpm2 -d 'add the TPM as a clevis tpm2 pin'
complete -c vaultguard -n '__fish_seen_subcommand_from supervise' -l auto-lock-seconds -x -d 'idle seconds'
complete -c vaultguard -n '__fish_seen_subcommand_from config' -l get -x -d 'print one dotted key'

complete -c vaultguard -n '__fish_seen_subcommand_from audit; and not __fish_seen_subcommand_from export rotate verify' -a export -d 'write every entry, signed'
complete -c vaultguard -n '__fish_seen_subcommand_from audit; and not __fish_seen_subcommand_from export rotate verify' -a rotate -d 'start a new segment'
complete -c vaultguard -n '__fish_seen_subcommand_from audit; and not __fish_seen_subcommand_from export rotate verify' -a verify -d 'check the hash chain'
complete -c vaultguard -n '__fish_seen_subcommand_from export' -l key -r -F -d 'Ed25519 private key'
complete -c vaultguard -n '__fish_seen_subcommand_from export' -l key-version -x -d 'key version'
complete -c vaultguard -n '__fish_seen_subcommand_from export' -s o -l output -r -F -d 'output file'
complete -c vaultguard -n '__fish_seen_subcommand_from verify' -l public-key -r -F -d 'public key (SPKI PEM)'
complete -c vaultguard -n '__fish_seen_subcommand_from verify' -l tpm -d 'replay against the TPM anchor'
complete -c vaultguard -n '__fish_seen_subcommand_from rotate verify export' -F

complete -c vaultguard -n '__fish_seen_subcommand_from token; and not __fish_seen_subcommand_from issue list revoke' -a issue -d 'issue a token and print it once'
complete -c vaultguard -n '__fish_seen_subcommand_from token; and not __fish_seen_subcommand_from issue list revoke' -a list -d 'list the tokens'
complete -c vaultguard -n '__fish_seen_subcommand_from token; and not __fish_seen_subcommand_from issue list revoke' -a revoke -d 'revoke a token by name'
complete -c vaultguard -n '__fish_seen_subcommand_from token; and __fish_seen_subcommand_from issue' -l name -x -d 'token name (a-z, 0-9, _ and -)'
complete -c vaultguard -n '__fish_seen_subcommand_from token; and __fish_seen_subcommand_from issue' -l role -x -a 'admin operator viewer agent' -d 'role it carries'
complete -c vaultguard -n '__fish_seen_subcommand_from token; and __fish_seen_subcommand_from issue' -l expires -x -a '90d 30d 12h 30min' -d 'valid for (systemd time span)'
complete -c vaultguard -n '__fish_seen_subcommand_from token; and __fish_seen_subcommand_from list' -l json -d 'print JSON instead of a table'
