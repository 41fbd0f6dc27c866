//! Command-line types (argh), and the one piece of argument handling argh cannot
//! do itself: systemd-cryptsetup's `attach NAME DEVICE - OPTIONS`, whose lone `-`
//! ([`argh_argv`]) argh would take for an option. Nothing else happens here:
//! `main.rs` dispatches each command to the module that owns it.

use argh::FromArgs;
use std::path::PathBuf;

/// vaultguard: unlock the encrypted AI vault at boot (TPM2, passphrase fallback) and
/// lock it again when idle.
#[derive(FromArgs, Debug)]
pub struct Args {
    /// configuration file (default /etc/vaultguard/config.json)
    #[argh(option, short = 'c')]
    pub config: Option<PathBuf>,

    /// apply rd.vaultguard.* options from this kernel command line file
    /// (default: /proc/cmdline when running in the initramfs)
    #[argh(option)]
    pub cmdline: Option<PathBuf>,

    /// print one JSON object on standard output, errors included
    /// ({"success":false,"error":"...","exit":N})
    #[argh(switch)]
    pub json: bool,

    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Unlock(UnlockCmd),
    Attach(AttachCmd),
    Detach(DetachCmd),
    Enroll(EnrollCmd),
    Reseal(ResealCmd),
    Supervise(SuperviseCmd),
    Status(StatusCmd),
    Lock(LockCmd),
    Keepalive(KeepaliveCmd),
    Audit(AuditCmd),
    Config(ConfigCmd),
    Version(VersionCmd),
    Token(TokenCmd),
    Metrics(MetricsCmd),
    Policy(PolicyCmd),
}

/// Arguments as argh should see them. systemd-cryptsetup's `attach NAME DEVICE -
/// OPTIONS` passes `-` for "no key file", which argh would take for an option:
/// an `attach` whose arguments contain a lone `-` gets a `--` after the subcommand.
/// `attach`'s own switches stay before that `--`. `-h` becomes `--help` (argh
/// knows only the long form) wherever an option could stand.
pub fn argh_argv(argv: &[String]) -> Vec<String> {
    let mut out: Vec<String> = argv
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let after_value_option = i > 0 && OPTIONS_WITH_VALUES.contains(&argv[i - 1].as_str());
            if a == "-h" && !after_value_option && !argv[..i].iter().any(|x| x == "--") {
                "--help".to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "-c" | "--config" | "--cmdline" => i += 2,
            "--json" => i += 1,
            "--" => return out,
            "attach" => {
                let mut at = i + 1;
                while at < argv.len() && ATTACH_SWITCHES.contains(&argv[at].as_str()) {
                    at += 1;
                }
                if argv[at..].iter().any(|a| a == "-") && !argv[at..].iter().any(|a| a == "--") {
                    out.insert(at, "--".into());
                }
                return out;
            }
            _ => return out,
        }
    }
    out
}

/// Options whose next argument is their value (never rewritten).
const OPTIONS_WITH_VALUES: &[&str] = &[
    "-c",
    "--config",
    "--cmdline",
    "--device",
    "--key-file",
    "--unlock-key-file",
    "--unlock-passphrase-file",
    "--pcrs",
    "--bank",
    "--get",
    "--key",
    "-o",
    "--output",
    "--public-key",
    "--public-key-pcrs",
    "--tpm2-pcrs",
    "--tpm2-with-pin",
    "--private-key",
    "--predicted",
    "--signature",
    "--key-version",
    "--initrd",
    "--kernel",
    "--event-log",
    "--auto-lock-seconds",
];

/// The switches of `attach` (before its positionals).
const ATTACH_SWITCHES: &[&str] = &["--test", "--json", "--help"];

/// `-V`/`--version` before any subcommand: the version, as `vaultguard version`.
pub fn wants_version(argv: &[String]) -> bool {
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "--version" | "-V" => return true,
            "-c" | "--config" | "--cmdline" => i += 2,
            "--json" => i += 1,
            _ => return false,
        }
    }
    false
}

/// Whether `--json` was asked for anywhere before a `--` (so that even an
/// argument error is printed as JSON).
pub fn wants_json(argv: &[String]) -> bool {
    argv.iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// Parse the command line (argh's `from_env`, with [`argh_argv`] applied).
pub fn from_env() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let argv = argh_argv(&argv);
    let cmd = std::path::Path::new(&argv[0])
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("vaultguard");
    let rest: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    match Args::from_args(&[cmd], &rest) {
        Ok(a) => a,
        Err(argh::EarlyExit { output, status }) => match status {
            Ok(()) => {
                println!("{output}");
                std::process::exit(0)
            }
            Err(()) => {
                let usage = crate::exit::Exit::Usage;
                if wants_json(&argv) {
                    println!("{}", crate::exit::json_error(output.trim(), usage));
                } else {
                    eprintln!("{output}\nRun {cmd} --help for more information.");
                }
                std::process::exit(usage.code().into())
            }
        },
    }
}

/// run the after-boot supervisor: idle auto-lock and the control socket
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "supervise")]
pub struct SuperviseCmd {
    /// auto-lock after this many idle seconds instead of
    /// vault.auto_lock_timeout minutes (for demos and tests; 0 disables)
    #[argh(option)]
    pub auto_lock_seconds: Option<u64>,
}

/// show the vault's state as the supervisor sees it
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusCmd {
    /// print the supervisor's JSON response line as is
    #[argh(switch)]
    pub json: bool,
}

/// lock the vault now: stop services, unmount, close, revoke keys
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "lock")]
pub struct LockCmd {
    /// print the supervisor's JSON response line as is
    #[argh(switch)]
    pub json: bool,
    /// why: operator_request, suspend, or incident:<id> (recorded in the state,
    /// the audit log and the events)
    #[argh(option)]
    pub reason: Option<String>,
}

/// record activity so that the idle auto-lock is postponed
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "keepalive")]
pub struct KeepaliveCmd {
    /// print the supervisor's JSON response line as is
    #[argh(switch)]
    pub json: bool,
}

/// audit log tools
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "audit")]
pub struct AuditCmd {
    #[argh(subcommand)]
    pub command: AuditSub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum AuditSub {
    Verify(AuditVerifyCmd),
    Rotate(AuditRotateCmd),
    Export(AuditExportCmd),
}

/// write every entry of every segment, signed (Ed25519), for verification elsewhere
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "export")]
pub struct AuditExportCmd {
    /// the signing key: Ed25519 private key, PKCS#8 PEM (`openssl genpkey -algorithm ed25519`)
    #[argh(option)]
    pub key: PathBuf,
    /// the operator's version number of that key, recorded in the export (default 1)
    #[argh(option, default = "1")]
    pub key_version: u64,
    /// write the export here (default: standard output)
    #[argh(option, short = 'o')]
    pub output: Option<PathBuf>,
    /// the live log (default: audit.path from the configuration)
    #[argh(positional)]
    pub path: Option<PathBuf>,
}

/// close the current audit segment and start a new one chained onto it
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rotate")]
pub struct AuditRotateCmd {
    /// the live log (default: audit.path from the configuration)
    #[argh(positional)]
    pub path: Option<PathBuf>,
}

/// check the audit log's hash chain through every segment; names the first broken line
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "verify")]
pub struct AuditVerifyCmd {
    /// check PATH as a signed export with these public keys (SPKI PEM; repeat for
    /// rotated keys), without the appliance
    #[argh(option)]
    pub public_key: Vec<PathBuf>,
    /// also replay the log against the TPM's audit anchor (audit.tpm_nv_index) and
    /// say whether anything anchored was rewritten
    #[argh(switch)]
    pub tpm: bool,
    /// the log to check (default: audit.path from the configuration), or the export
    #[argh(positional)]
    pub path: Option<PathBuf>,
}

/// check the configuration and print the effective settings as JSON
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config")]
pub struct ConfigCmd {
    /// print only this key (dotted, e.g. vault.name); strings are printed bare
    #[argh(option)]
    pub get: Option<String>,
}

/// manage the control socket's bearer tokens (root; works with the supervisor stopped)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "token")]
pub struct TokenCmd {
    #[argh(subcommand)]
    pub command: TokenSub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum TokenSub {
    Issue(TokenIssueCmd),
    List(TokenListCmd),
    Revoke(TokenRevokeCmd),
}

/// issue a token for a client and print it once
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "issue")]
pub struct TokenIssueCmd {
    /// the token's name, as audit entries and metrics show it (a-z, 0-9, _ and -)
    #[argh(option)]
    pub name: String,
    /// the role it carries: admin, operator, viewer, agent or one of control.roles
    #[argh(option)]
    pub role: String,
    /// valid for this long (systemd time span: 90d, 12h, 30min); default: no expiry
    #[argh(option)]
    pub expires: Option<String>,
}

/// list the tokens: name, role, created, expires, revoked (never the token)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct TokenListCmd {
    /// print JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// revoke a token by name; the supervisor refuses it from its next request
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "revoke")]
pub struct TokenRevokeCmd {
    /// the token's name
    #[argh(positional)]
    pub name: String,
}

/// print the supervisor's metrics in the Prometheus text format
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "metrics")]
pub struct MetricsCmd {}

/// print the version and the versions of the linked C libraries
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "version")]
pub struct VersionCmd {
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
}

/// open the vault: TPM2 unseal, else key file, else passphrase; in the initramfs
/// this is the boot unlock, after boot it asks the running supervisor
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "unlock")]
pub struct UnlockCmd {
    /// LUKS2 device (path or UUID=...), overrides vault.device
    #[argh(option)]
    pub device: Option<String>,
    /// do not use the TPM; ask for the passphrase
    #[argh(switch)]
    pub no_tpm: bool,
    /// never prompt (fail instead)
    #[argh(switch)]
    pub headless: bool,
    /// try this key file before prompting
    #[argh(option)]
    pub key_file: Option<PathBuf>,
    /// open locally even if a supervisor is running
    #[argh(switch)]
    pub local: bool,
    /// print the supervisor's raw JSON response (client mode), or one JSON object
    #[argh(switch)]
    pub json: bool,
    /// only say which keyslot the TPM token, --key-file or passphrase would open;
    /// activate nothing ("will this unlock at the next boot?")
    #[argh(switch)]
    pub test: bool,
    /// answer the passphrase prompt from this file (- for standard input;
    /// trailing newlines are dropped)
    #[argh(option)]
    pub unlock_passphrase_file: Option<PathBuf>,
}

/// systemd-cryptsetup compatible: attach NAME DEVICE [KEYFILE] [OPTIONS]
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "attach")]
pub struct AttachCmd {
    /// only say which keyslot would open; activate nothing
    #[argh(switch)]
    pub test: bool,
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
    /// mapping name
    #[argh(positional)]
    pub name: String,
    /// LUKS2 device
    #[argh(positional)]
    pub device: String,
    /// [KEYFILE] [OPTIONS]: key file (or - / none), then crypttab options
    #[argh(positional)]
    pub rest: Vec<String>,
}

/// systemd-cryptsetup compatible: detach NAME (close the mapping, revoke its keys)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "detach")]
pub struct DetachCmd {
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
    /// mapping name
    #[argh(positional)]
    pub name: String,
}

/// seal a new secret to the TPM's current PCRs and add it as a LUKS2 keyslot with a
/// systemd-tpm2 token (needs the existing passphrase, never removes it)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "enroll")]
pub struct EnrollCmd {
    /// LUKS2 device (path or UUID=...), overrides vault.device
    #[argh(option)]
    pub device: Option<String>,
    /// PCRs to bind, e.g. 0,2,4,7 (default tpm.pcrs); the phase PCR is added
    #[argh(option)]
    pub pcrs: Option<String>,
    /// PCR bank: sha256 (default) or sha1
    #[argh(option)]
    pub bank: Option<String>,
    /// also require a PIN (protected by the TPM's dictionary-attack lockout)
    #[argh(switch)]
    pub pin: bool,
    /// also add a high-entropy recovery key and print it once
    #[argh(switch)]
    pub recovery_key: bool,
    /// unlock the volume with this key file (- for standard input), no prompt
    #[argh(option)]
    pub unlock_key_file: Option<PathBuf>,
    /// unlock the volume with the passphrase in this file (- for standard input;
    /// trailing newlines are dropped), no prompt
    #[argh(option)]
    pub unlock_passphrase_file: Option<PathBuf>,
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
    /// a signed PCR policy: the PEM public key (RSA-2048 or ECC P-256) whose
    /// signatures approve PCR values (as systemd-cryptenroll --tpm2-public-key)
    #[argh(option)]
    pub public_key: Option<PathBuf>,
    /// the PCRs the signatures approve, e.g. 9 or 4,9,11 (default 11)
    #[argh(option)]
    pub public_key_pcrs: Option<String>,
    /// with --public-key: PCRs bound to their current values beside the signed
    /// ones (default none, as systemd-cryptenroll); the phase PCR is added
    #[argh(option)]
    pub tpm2_pcrs: Option<String>,
    /// yes/no: also require a PIN (as --pin; systemd-cryptenroll's spelling)
    #[argh(option)]
    pub tpm2_with_pin: Option<String>,
    /// with --public-key: bind the signatures to this TPM NV counter (e.g.
    /// 0x013fa0d2; defined if absent) so that `policy revoke-older` withdraws
    /// them; such an enrolment is vaultguard's only (systemd cannot open it)
    #[argh(option)]
    pub revocation_counter: Option<String>,
    /// bind to this Tang server instead of the TPM, as a clevis token
    /// (repeatable: sss over the servers)
    #[argh(option)]
    pub tang: Vec<String>,
    /// trust the Tang signing key with this (S256) thumbprint without asking
    /// (repeatable; check it with tang-show-keys on the server)
    #[argh(option)]
    pub tang_thumbprint: Vec<String>,
    /// with several --tang (and --tpm2): how many must answer (clevis sss "t";
    /// default 1)
    #[argh(option)]
    pub threshold: Option<usize>,
    /// add the TPM as a clevis tpm2 pin (sealed to --pcrs/--bank): with --tang
    /// inside the sss (--tpm2 --tang URL --threshold 2: TPM and Tang), alone a
    /// clevis tpm2 token
    #[argh(switch)]
    pub tpm2: bool,
    /// LUKS2 device (path or UUID=...), as systemd-cryptenroll takes it
    #[argh(positional, arg_name = "device")]
    pub device_arg: Option<String>,
}

/// signed PCR policies: sign the PCR values of a boot (systemd-measure's format)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "policy")]
pub struct PolicyCmd {
    #[argh(subcommand)]
    pub command: PolicySub,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum PolicySub {
    Sign(PolicySignCmd),
    Predict(PolicyPredictCmd),
    RevokeOlder(PolicyRevokeOlderCmd),
    Ticket(PolicyTicketCmd),
}

/// on the appliance: have this TPM verify the signature file's signatures for
/// the vault's signed enrolments once and keep its tickets in the file, so that
/// each unlock sends PolicyAuthorize with the ticket instead of verifying again
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ticket")]
pub struct PolicyTicketCmd {
    /// LUKS2 device (path or UUID=...) whose signed enrolments' signatures get
    /// tickets, overrides vault.device
    #[argh(option)]
    pub device: Option<String>,
    /// the signature file (default: tpm.signature, else the first that exists
    /// where systemd-cryptsetup looks)
    #[argh(option)]
    pub signature: Option<PathBuf>,
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
}

/// withdraw every signature of a revocable enrolment made so far: increment
/// its TPM revocation counter (owner authorisation); sign the boots you still
/// trust for the new value first
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "revoke-older")]
pub struct PolicyRevokeOlderCmd {
    /// the revocation counter (NV index, e.g. 0x013fa0d2); default: the one
    /// the vault's enrolment names
    #[argh(option)]
    pub revocation_counter: Option<String>,
    /// LUKS2 device (path or UUID=...) whose enrolment names the counter,
    /// overrides vault.device
    #[argh(option)]
    pub device: Option<String>,
    /// the signature file to check for a signature of the new value (default:
    /// tpm.signature, else where systemd-cryptsetup looks)
    #[argh(option)]
    pub signature: Option<PathBuf>,
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
}

/// sign the PolicyPCR digest of PCR values (predicted, or the live ones) and
/// write or extend the systemd-measure signature file
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "sign")]
pub struct PolicySignCmd {
    /// PEM private key (RSA-2048 or ECC P-256; unencrypted)
    #[argh(option)]
    pub private_key: PathBuf,
    /// PEM public key: checked to be the private key's (default: derived from it)
    #[argh(option)]
    pub public_key: Option<PathBuf>,
    /// the PCRs to sign (default: those in --predicted, else 11)
    #[argh(option)]
    pub public_key_pcrs: Option<String>,
    /// PCR values as `policy predict --json` prints them ({"bank":"sha256",
    /// "pcrs":{"9":"<hex>"}}), `-` for standard input; PCRs it lacks are read live
    #[argh(option)]
    pub predicted: Option<String>,
    /// the signature file (default /etc/systemd/tpm2-pcr-signature.json)
    #[argh(option)]
    pub signature: Option<PathBuf>,
    /// add to the signature file instead of replacing it
    #[argh(switch)]
    pub append: bool,
    /// sign for a revocable enrolment (enroll --revocation-counter): its
    /// revocation counter, e.g. 0x013fa0d2
    #[argh(option)]
    pub revocation_counter: Option<String>,
    /// with --revocation-counter: the counter value to sign for (default: the
    /// TPM's current value; give it when signing away from the appliance)
    #[argh(option)]
    pub counter_value: Option<u64>,
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
}

/// after a verified firmware/boot change: seal to the current PCRs; the new
/// keyslot and token are written before the old ones are removed
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "reseal")]
pub struct ResealCmd {
    /// LUKS2 device (path or UUID=...), overrides vault.device
    #[argh(option)]
    pub device: Option<String>,
    /// PCRs to bind (default tpm.pcrs); the phase PCR is added
    #[argh(option)]
    pub pcrs: Option<String>,
    /// PCR bank: sha256 (default) or sha1
    #[argh(option)]
    pub bank: Option<String>,
    /// require a PIN on the new enrolment
    #[argh(switch)]
    pub pin: bool,
    /// the change was verified: print the event-log records that changed since
    /// enrolment and audit them with the reseal (tpm.reseal_after_recovery)
    #[argh(switch)]
    pub confirm: bool,
    /// unlock the volume with this key file (- for standard input), no prompt
    #[argh(option)]
    pub unlock_key_file: Option<PathBuf>,
    /// unlock the volume with the passphrase in this file (- for standard input;
    /// trailing newlines are dropped), no prompt
    #[argh(option)]
    pub unlock_passphrase_file: Option<PathBuf>,
    /// print one JSON object on standard output
    #[argh(switch)]
    pub json: bool,
    /// LUKS2 device (path or UUID=...)
    #[argh(positional, arg_name = "device")]
    pub device_arg: Option<String>,
}

/// print the PCR values the next boot will have after a staged initrd/kernel/
/// command line: replays this boot's TPM event log (refused if it does not match
/// the live PCRs) with the staged components' digests
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "predict")]
pub struct PolicyPredictCmd {
    /// the staged initrd, as the kernel's EFI stub measures it into PCR 9
    #[argh(option)]
    pub initrd: Option<PathBuf>,
    /// the staged kernel image (EFI/PE), as UEFI firmware measures it into PCR 4
    #[argh(option)]
    pub kernel: Option<PathBuf>,
    /// the kernel command line the boot loader will pass (LoadOptions, PCR 9)
    #[argh(option)]
    pub cmdline: Option<String>,
    /// PCRs to predict (default: 4,7,9,11, those the event log has)
    #[argh(option)]
    pub pcrs: Option<String>,
    /// PCR bank: sha256 (default) or sha1
    #[argh(option)]
    pub bank: Option<String>,
    /// the TCG event log (default /sys/kernel/security/tpm0/binary_bios_measurements)
    #[argh(option)]
    pub event_log: Option<PathBuf>,
    /// print one JSON object: {"bank":"sha256","pcrs":{"9":"<hex>"}}
    #[argh(switch)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn systemd_attach_syntax_with_a_dash_key_file_parses() {
        for argv in [
            v(&[
                "vaultguard",
                "attach",
                "vault",
                "/dev/vda",
                "-",
                "tpm2-device=auto",
            ]),
            v(&[
                "vaultguard",
                "-c",
                "/x.json",
                "attach",
                "vault",
                "/dev/vda",
                "-",
            ]),
        ] {
            let fixed = argh_argv(&argv);
            let rest: Vec<&str> = fixed[1..].iter().map(String::as_str).collect();
            let args = Args::from_args(&["vaultguard"], &rest).unwrap();
            match args.command {
                Command::Attach(a) => {
                    assert_eq!((a.name.as_str(), a.device.as_str()), ("vault", "/dev/vda"));
                    assert_eq!(a.rest[0], "-");
                }
                other => panic!("{other:?}"),
            }
        }
        // Without the fix argh refuses it: the test above proves the rewrite matters.
        let raw = ["attach", "vault", "/dev/vda", "-"];
        assert!(Args::from_args(&["vaultguard"], &raw).is_err());
        // Other commands are left alone.
        let argv = v(&["vaultguard", "unlock", "-"]);
        assert_eq!(argh_argv(&argv), argv);
        let argv = v(&["vaultguard", "attach", "a", "b", "--", "-"]);
        assert_eq!(argh_argv(&argv), argv);
        // attach's own switches stay switches.
        let fixed = argh_argv(&v(&[
            "vaultguard",
            "attach",
            "--test",
            "--json",
            "a",
            "b",
            "-",
        ]));
        let rest: Vec<&str> = fixed[1..].iter().map(String::as_str).collect();
        match Args::from_args(&["vaultguard"], &rest).unwrap().command {
            Command::Attach(a) => {
                assert!(a.test && a.json);
                assert_eq!(a.rest, ["-"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_help_and_version_are_understood() {
        assert_eq!(argh_argv(&v(&["vg", "-h"])), v(&["vg", "--help"]));
        assert_eq!(
            argh_argv(&v(&["vg", "enroll", "-h"])),
            v(&["vg", "enroll", "--help"])
        );
        // A value that happens to be `-h` is left alone.
        assert_eq!(argh_argv(&v(&["vg", "-c", "-h", "status"]))[2], "-h");
        assert!(wants_version(&v(&["vg", "--version"])));
        assert!(wants_version(&v(&[
            "vg",
            "-c",
            "/x",
            "--json",
            "--version"
        ])));
        assert!(!wants_version(&v(&["vg", "status", "--version"])));
        assert!(wants_json(&v(&["vg", "status", "--json"])));
        assert!(!wants_json(&v(&["vg", "attach", "a", "b", "--", "--json"])));
    }
}
