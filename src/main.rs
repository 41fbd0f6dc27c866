//! Entry point: parse arguments, load the configuration, dispatch; and print the
//! outcome once, as text or (`--json`) as one JSON object, with the exit status
//! of [`vaultguard::exit`].

use std::path::Path;
use std::process::ExitCode;
use vaultguard::audit::export;
use vaultguard::boot::commands;
use vaultguard::cli::{Args, AuditSub, Command};
use vaultguard::config::{self, Config};
use vaultguard::control::client;
use vaultguard::exit::{self as exits, Failure};

fn main() -> ExitCode {
    // Secrets pass through this process: no core dumps, no ptrace by others.
    vaultguard::secret::harden_process();
    // tpm2-tss logs every TPM error response to stderr; vaultguard reports the
    // ones that matter itself, in words.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    let argv: Vec<String> = std::env::args().collect();
    // Installed as /usr/lib/systemd/system-generators/vaultguard-generator: the
    // systemd generator (src/generator.rs), which never fails the boot.
    if argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        == Some(vaultguard::generator::ARGV0)
    {
        vaultguard::generator::main(&argv);
        return ExitCode::SUCCESS;
    }
    vaultguard::luks::init_library();
    if vaultguard::cli::wants_version(&argv) {
        print_version(vaultguard::cli::wants_json(&argv));
        return ExitCode::SUCCESS;
    }
    let args: Args = vaultguard::cli::from_env();
    let json = args.json || command_json(&args.command);
    commands::set_json(json);
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            let exit = exits::classify(e.as_ref());
            if json {
                println!("{}", exits::json_error(&e.to_string(), exit));
            } else {
                vaultguard::log::error(&e.to_string());
            }
            exit.into()
        }
    }
}

/// The subcommand's own `--json`.
fn command_json(c: &Command) -> bool {
    match c {
        Command::Unlock(c) => c.json,
        Command::Attach(c) => c.json,
        Command::Detach(c) => c.json,
        Command::Enroll(c) => c.json,
        Command::Reseal(c) => c.json,
        Command::Status(c) => c.json,
        Command::Lock(c) => c.json,
        Command::Keepalive(c) => c.json,
        Command::Version(c) => c.json,
        Command::Token(t) => matches!(&t.command, vaultguard::cli::TokenSub::List(l) if l.json),
        Command::Policy(p) => match &p.command {
            vaultguard::cli::PolicySub::Predict(c) => c.json,
            vaultguard::cli::PolicySub::Sign(s) => s.json,
            vaultguard::cli::PolicySub::RevokeOlder(r) => r.json,
            vaultguard::cli::PolicySub::Ticket(t) => t.json,
        },
        // config prints JSON already; the others print no JSON of their own.
        _ => false,
    }
}

fn print_version(json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "vaultguard": env!("CARGO_PKG_VERSION"),
                "libcryptsetup": env!("VG_CRYPTSETUP_VERSION"),
                "tpm2-tss": env!("VG_TSS2_VERSION"),
                "libdevmapper": env!("VG_DEVMAPPER_VERSION"),
            })
        );
        return;
    }
    println!("vaultguard {}", env!("CARGO_PKG_VERSION"));
    println!("libcryptsetup {} (static)", env!("VG_CRYPTSETUP_VERSION"));
    println!("tpm2-tss {} (static, no dlopen)", env!("VG_TSS2_VERSION"));
    println!("libdevmapper {} (static)", env!("VG_DEVMAPPER_VERSION"));
}

/// Print a boot-path command's summary when `--json` was asked for (the console
/// lines went to the terminal or stderr).
fn summary(json: bool, s: commands::Summary) -> ExitCode {
    if json && !s.is_null() {
        println!("{s}");
    }
    ExitCode::SUCCESS
}

/// `--unlock-key-file` / `--unlock-passphrase-file` (at most one).
fn provisioned(
    key_file: Option<&Path>,
    passphrase_file: Option<&Path>,
) -> Result<Option<commands::Provisioned>, Box<dyn std::error::Error>> {
    Ok(match (key_file, passphrase_file) {
        (Some(_), Some(_)) => {
            return Err(Failure::usage(
                "give --unlock-key-file or --unlock-passphrase-file, not both",
            )
            .into())
        }
        (Some(k), None) => Some(commands::Provisioned::read(k, false)?),
        (None, Some(p)) => Some(commands::Provisioned::read(p, true)?),
        (None, None) => None,
    })
}

/// `enroll [DEVICE]` as systemd-cryptenroll, or `--device` (not both, unless equal).
fn device_of<'a>(
    option: Option<&'a str>,
    positional: Option<&'a str>,
) -> Result<Option<&'a str>, Failure> {
    match (option, positional) {
        (Some(a), Some(b)) if a != b => Err(Failure::usage(format!(
            "two devices given: --device {a} and {b}; give one"
        ))),
        (a, b) => Ok(a.or(b)),
    }
}

fn load_config(args: &Args) -> Result<Config, Box<dyn std::error::Error>> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.as_path(), true),
        None => (Path::new(config::DEFAULT_PATH), false),
    };
    let (mut cfg, warnings) = Config::load_with_warnings(path, explicit)?;
    for w in warnings {
        vaultguard::log::warn(&format!("warning: {w}"));
    }
    // In the initramfs the kernel command line applies without being asked for.
    let cmdline = args.cmdline.clone().or_else(|| {
        vaultguard::handoff::in_initrd().then(|| std::path::PathBuf::from("/proc/cmdline"))
    });
    if let Some(cmdline) = &cmdline {
        let text = std::fs::read_to_string(cmdline)
            .map_err(|e| format!("cannot read {}: {e}", cmdline.display()))?;
        for w in cfg.apply_cmdline(&text) {
            vaultguard::log::warn(&w.to_string());
        }
    }
    Ok(cfg)
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let json = args.json || command_json(&args.command);
    match &args.command {
        Command::Unlock(c) => {
            let cfg = load_config(&args)?;
            // After boot a running supervisor owns the vault: ask it, so that its
            // lockout, audit and idle timer see the unlock.
            // `--test` never goes to the supervisor: it must not open anything.
            if !c.local
                && !c.test
                && !vaultguard::handoff::in_initrd()
                && client::is_serving(&cfg.control.socket)
            {
                let pass = match (&c.key_file, &c.unlock_passphrase_file) {
                    (Some(path), _) => Some(commands::read_key_file(path)?),
                    (None, Some(path)) => {
                        Some(commands::Provisioned::read(path, true)?.into_secret())
                    }
                    (None, None) => None,
                };
                let reply = client::run_reply(
                    &cfg.control.socket,
                    client::Cmd::Unlock,
                    json,
                    pass.as_ref(),
                )?;
                return Ok(client::exit_of(&reply).into());
            }
            let answer = provisioned(None, c.unlock_passphrase_file.as_deref())?;
            let s = commands::run_unlock(
                &cfg,
                c.device.as_deref(),
                c.no_tpm,
                c.headless,
                c.key_file.clone(),
                answer,
                c.test,
            )?;
            return Ok(summary(json, s));
        }
        Command::Attach(c) => {
            if c.rest.len() > 2 {
                return Err(Failure::usage("attach takes NAME DEVICE [KEYFILE] [OPTIONS]").into());
            }
            let cfg = load_config(&args)?;
            let keyfile = c.rest.first().map(String::as_str);
            let options = c.rest.get(1).map(String::as_str);
            let s = commands::run_attach(&cfg, &c.name, &c.device, keyfile, options, c.test)?;
            return Ok(summary(json, s));
        }
        Command::Detach(c) => {
            let s = commands::run_detach(&load_config(&args)?, &c.name)?;
            return Ok(summary(json, s));
        }
        Command::Enroll(c) => {
            let device = device_of(c.device.as_deref(), c.device_arg.as_deref())?;
            let unlock = provisioned(
                c.unlock_key_file.as_deref(),
                c.unlock_passphrase_file.as_deref(),
            )?;
            let cfg = load_config(&args)?;
            if !c.tang.is_empty() || c.threshold.is_some() || c.tpm2 {
                if c.public_key.is_some() {
                    return Err(Failure::usage(
                        "--public-key (a signed TPM policy) and --tang (a clevis token) are separate enrolments: run enroll once for each",
                    )
                    .into());
                }
                let s = commands::run_enroll_clevis(
                    &cfg,
                    device,
                    &c.tang,
                    &c.tang_thumbprint,
                    c.threshold,
                    c.tpm2.then_some((c.pcrs.as_deref(), c.bank.as_deref())),
                    unlock,
                )?;
                return Ok(summary(json, s));
            }
            let pin = match c.tpm2_with_pin.as_deref() {
                None => c.pin,
                Some("yes" | "true" | "1" | "on") => true,
                Some("no" | "false" | "0" | "off") => c.pin,
                Some(other) => {
                    return Err(Failure::usage(format!(
                        "--tpm2-with-pin takes yes or no, not `{}`",
                        other.escape_default()
                    ))
                    .into())
                }
            };
            let signed = commands::SignedArgs {
                public_key: c.public_key.clone(),
                public_key_pcrs: c.public_key_pcrs.clone(),
                tpm2_pcrs: c.tpm2_pcrs.clone(),
                revocation_counter: c.revocation_counter.clone(),
            };
            // --tpm2-pcrs is the literal PCR list (systemd's name for --pcrs).
            let pcrs = match (&c.public_key, c.tpm2_pcrs.as_deref()) {
                (None, Some(p)) => Some(p),
                _ => c.pcrs.as_deref(),
            };
            let s = commands::run_enroll(
                &cfg,
                device,
                pcrs,
                c.bank.as_deref(),
                pin,
                c.recovery_key,
                unlock,
                &signed,
            )?;
            return Ok(summary(json, s));
        }
        Command::Reseal(c) => {
            let device = device_of(c.device.as_deref(), c.device_arg.as_deref())?;
            let unlock = provisioned(
                c.unlock_key_file.as_deref(),
                c.unlock_passphrase_file.as_deref(),
            )?;
            let cfg = load_config(&args)?;
            let s = commands::run_reseal(
                &cfg,
                device,
                c.pcrs.as_deref(),
                c.bank.as_deref(),
                c.pin,
                unlock,
                c.confirm,
            )?;
            return Ok(summary(json, s));
        }
        Command::Supervise(c) => vaultguard::supervisor::run_system(
            &load_config(&args)?,
            c.auto_lock_seconds.map(std::time::Duration::from_secs),
        )?,
        Command::Status(_) => return client_command(&args, client::Cmd::Status, json),
        Command::Lock(c) => {
            let cfg = load_config(&args)?;
            let reply = client::run_lock(&cfg.control.socket, c.reason.as_deref(), json)?;
            return Ok(client::exit_of(&reply).into());
        }
        Command::Keepalive(_) => return client_command(&args, client::Cmd::Keepalive, json),
        Command::Audit(a) => match &a.command {
            AuditSub::Verify(v) => {
                let path = match &v.path {
                    Some(p) => p.clone(),
                    None if !v.public_key.is_empty() => {
                        return Err(Failure::usage(
                            "audit verify --public-key checks an export: give its path",
                        )
                        .into())
                    }
                    None => load_config(&args)?.audit.path,
                };
                if v.public_key.is_empty() {
                    let log = vaultguard::audit::verify(&path)?;
                    if v.tpm {
                        return anchor_verdict(&load_config(&args)?, &path, &log, json);
                    }
                    say(json, &log.to_string());
                } else {
                    let keys = v
                        .public_key
                        .iter()
                        .map(|p| export::read_verifying_key(p))
                        .collect::<Result<Vec<_>, _>>()?;
                    let text = std::fs::read(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    let ok = export::verify_export(&path, &text, &keys)?;
                    say(json, &format!("{}: {ok}", path.display()));
                }
            }
            AuditSub::Export(x) => {
                let path = match &x.path {
                    Some(p) => p.clone(),
                    None => load_config(&args)?.audit.path,
                };
                let key = export::read_signing_key(&x.key)?;
                let out = export::export(&path, &key, x.key_version, vaultguard::audit::now_ms())?;
                match &x.output {
                    Some(o) => {
                        std::fs::write(o, &out)
                            .map_err(|e| format!("cannot write {}: {e}", o.display()))?;
                        // With --json, stdout gets its one object; without, it
                        // stays empty as before (the export is in the file).
                        if json {
                            say(json, &format!("{}: export written", o.display()));
                        }
                    }
                    // The export itself is the output (JSON lines), --json or not.
                    None => std::io::Write::write_all(&mut std::io::stdout(), &out)?,
                }
            }
            AuditSub::Rotate(r) => {
                let path = match &r.path {
                    Some(p) => p.clone(),
                    None => load_config(&args)?.audit.path,
                };
                match vaultguard::audit::rotate(&path)? {
                    Some(seg) => say(
                        json,
                        &format!(
                            "{}: closed as {}; the new segment chains onto it",
                            path.display(),
                            seg.display()
                        ),
                    ),
                    None => say(
                        json,
                        &format!("{}: empty, nothing to rotate", path.display()),
                    ),
                }
            }
        },
        Command::Config(c) => {
            let cfg = load_config(&args)?;
            match &c.get {
                None => println!("{}", serde_json::to_string_pretty(&cfg)?),
                // Bare for a shell (`$(vaultguard config --get vault.name)`); with
                // --json the JSON value itself, like `config` prints the object.
                Some(key) if json => println!("{}", cfg.get_value(key)?),
                Some(key) => println!("{}", cfg.get(key)?),
            }
        }
        Command::Token(t) => {
            return vaultguard::control::token_cli::run(&load_config(&args)?, t, json)
        }
        Command::Policy(p) => return vaultguard::policy_cli::run(&load_config(&args)?, p, json),
        Command::Metrics(_) => {
            return vaultguard::control::metrics_cli::run(&load_config(&args)?, json)
        }
        Command::Version(_) => print_version(json),
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit verify --tpm`: the log's replay against the TPM's anchor.
fn anchor_verdict(
    cfg: &Config,
    path: &Path,
    log: &vaultguard::audit::VerifiedLog,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use vaultguard::audit::anchor::{judge, Anchor};
    if let Some(m) = &log.missing_predecessor {
        return Err(format!(
            "{}: cannot replay against the TPM: segment {m} is not here (the anchor covers \
             the whole history)",
            path.display()
        )
        .into());
    }
    let mut anchor =
        vaultguard::supervisor::tpm_anchor::TpmAnchor::new(&cfg.tpm.tcti, cfg.audit.tpm_nv_index);
    let value = anchor.read().map_err(|e| e.to_string())?;
    let verdict = judge(log.entry_hashes(), value);
    let text = format!(
        "{log}\n{}: TPM anchor {:#010x}: {verdict}",
        path.display(),
        anchor.handle()
    );
    if verdict.intact() {
        say(json, &text);
        Ok(ExitCode::SUCCESS)
    } else if json {
        println!("{}", exits::json_error(&text, exits::Exit::Error));
        Ok(exits::Exit::Error.into())
    } else {
        println!("{text}");
        Ok(exits::Exit::Error.into())
    }
}

/// A command's text outcome, or with `--json` `{"success":true,"message":TEXT}`.
fn say(json: bool, text: &str) {
    if json {
        println!("{}", serde_json::json!({"success": true, "message": text}));
    } else {
        println!("{text}");
    }
}

fn client_command(
    args: &Args,
    cmd: client::Cmd,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let cfg = load_config(args)?;
    let reply = client::run_reply(&cfg.control.socket, cmd, json, None)?;
    Ok(client::exit_of(&reply).into())
}
