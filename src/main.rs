//! Entry point: parse arguments, load the configuration, dispatch.

use std::path::Path;
use std::process::ExitCode;
use vaultguard::audit::export;
use vaultguard::boot::commands;
use vaultguard::cli::{Args, AuditSub, Command};
use vaultguard::config::{self, Config};
use vaultguard::control::client;

fn main() -> ExitCode {
    // Secrets pass through this process: no core dumps, no ptrace by others.
    vaultguard::secret::harden_process();
    // tpm2-tss logs every TPM error response to stderr; vaultguard reports the
    // ones that matter itself, in words.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+NONE");
    }
    vaultguard::luks::init_library();
    let args: Args = vaultguard::cli::from_env();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vaultguard: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(args: &Args) -> Result<Config, Box<dyn std::error::Error>> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.as_path(), true),
        None => (Path::new(config::DEFAULT_PATH), false),
    };
    let mut cfg = Config::load(path, explicit)?;
    // In the initramfs the kernel command line applies without being asked for.
    let cmdline = args.cmdline.clone().or_else(|| {
        vaultguard::handoff::in_initrd().then(|| std::path::PathBuf::from("/proc/cmdline"))
    });
    if let Some(cmdline) = &cmdline {
        let text = std::fs::read_to_string(cmdline)
            .map_err(|e| format!("cannot read {}: {e}", cmdline.display()))?;
        for w in cfg.apply_cmdline(&text) {
            eprintln!("vaultguard: {w}");
        }
    }
    Ok(cfg)
}

fn run(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match &args.command {
        Command::Unlock(c) => {
            let cfg = load_config(&args)?;
            // After boot a running supervisor owns the vault: ask it, so that its
            // lockout, audit and idle timer see the unlock.
            if !c.local
                && !vaultguard::handoff::in_initrd()
                && client::is_serving(&cfg.control.socket)
            {
                let pass = match &c.key_file {
                    Some(path) => Some(commands::read_key_file(path)?),
                    None => None,
                };
                let ok = client::run(
                    &cfg.control.socket,
                    client::Cmd::Unlock,
                    c.json,
                    pass.as_ref(),
                )?;
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            commands::run_unlock(
                &cfg,
                c.device.as_deref(),
                c.no_tpm,
                c.headless,
                c.key_file.clone(),
            )?;
        }
        Command::Attach(c) => {
            if c.rest.len() > 2 {
                return Err("attach takes NAME DEVICE [KEYFILE] [OPTIONS]".into());
            }
            let cfg = load_config(&args)?;
            let keyfile = c.rest.first().map(String::as_str);
            let options = c.rest.get(1).map(String::as_str);
            commands::run_attach(&cfg, &c.name, &c.device, keyfile, options)?;
        }
        Command::Detach(c) => commands::run_detach(&load_config(&args)?, &c.name)?,
        Command::Enroll(c) => {
            let cfg = load_config(&args)?;
            commands::run_enroll(
                &cfg,
                c.device.as_deref(),
                c.pcrs.as_deref(),
                c.bank.as_deref(),
                c.pin,
                c.recovery_key,
            )?;
        }
        Command::Reseal(c) => {
            let cfg = load_config(&args)?;
            commands::run_reseal(
                &cfg,
                c.device.as_deref(),
                c.pcrs.as_deref(),
                c.bank.as_deref(),
                c.pin,
            )?;
        }
        Command::Supervise(c) => vaultguard::supervisor::run_system(
            &load_config(&args)?,
            c.auto_lock_seconds.map(std::time::Duration::from_secs),
        )?,
        Command::Status(c) => return client_command(&args, client::Cmd::Status, c.json),
        Command::Lock(c) => {
            let cfg = load_config(&args)?;
            let ok = client::run_lock(&cfg.control.socket, c.reason.as_deref(), c.json)?;
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Command::Keepalive(c) => return client_command(&args, client::Cmd::Keepalive, c.json),
        Command::Audit(a) => match &a.command {
            AuditSub::Verify(v) => {
                let path = match &v.path {
                    Some(p) => p.clone(),
                    None if !v.public_key.is_empty() => {
                        return Err(
                            "audit verify --public-key checks an export: give its path".into()
                        )
                    }
                    None => load_config(&args)?.audit.path,
                };
                if v.public_key.is_empty() {
                    let log = vaultguard::audit::verify(&path)?;
                    println!("{log}");
                    if v.tpm {
                        return anchor_verdict(&load_config(&args)?, &path, &log);
                    }
                } else {
                    let keys = v
                        .public_key
                        .iter()
                        .map(|p| export::read_verifying_key(p))
                        .collect::<Result<Vec<_>, _>>()?;
                    let text = std::fs::read(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                    let ok = export::verify_export(&path, &text, &keys)?;
                    println!("{}: {ok}", path.display());
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
                    Some(o) => std::fs::write(o, &out)
                        .map_err(|e| format!("cannot write {}: {e}", o.display()))?,
                    None => std::io::Write::write_all(&mut std::io::stdout(), &out)?,
                }
            }
            AuditSub::Rotate(r) => {
                let path = match &r.path {
                    Some(p) => p.clone(),
                    None => load_config(&args)?.audit.path,
                };
                match vaultguard::audit::rotate(&path)? {
                    Some(seg) => println!(
                        "{}: closed as {}; the new segment chains onto it",
                        path.display(),
                        seg.display()
                    ),
                    None => println!("{}: empty, nothing to rotate", path.display()),
                }
            }
        },
        Command::Config(c) => {
            let cfg = load_config(&args)?;
            match &c.get {
                None => println!("{}", serde_json::to_string_pretty(&cfg)?),
                Some(key) => println!("{}", cfg.get(key)?),
            }
        }
        Command::Version(_) => {
            println!("vaultguard {}", env!("CARGO_PKG_VERSION"));
            println!("libcryptsetup {} (static)", env!("VG_CRYPTSETUP_VERSION"));
            println!("tpm2-tss {} (static, no dlopen)", env!("VG_TSS2_VERSION"));
            println!("libdevmapper {} (static)", env!("VG_DEVMAPPER_VERSION"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit verify --tpm`: the log's replay against the TPM's anchor.
fn anchor_verdict(
    cfg: &Config,
    path: &Path,
    log: &vaultguard::audit::VerifiedLog,
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
    println!(
        "{}: TPM anchor {:#010x}: {verdict}",
        path.display(),
        anchor.handle()
    );
    Ok(if verdict.intact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn client_command(
    args: &Args,
    cmd: client::Cmd,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let cfg = load_config(args)?;
    Ok(match client::run(&cfg.control.socket, cmd, json, None)? {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(1),
    })
}
