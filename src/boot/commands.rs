//! The boot-path commands as the CLI runs them: configuration and arguments in,
//! options for the flows out, one plain sentence per outcome on the console.
//!
//! The console lines starting with `vaultguard:` are stable: the boot-path tests and
//! operators' scripts match on them.

use super::{
    detach, enroll, reseal, test_unlock, unlock, ArgError, AuditAnchor, BootError, CrypttabUnlock,
    EnrollOptions, EnrollReport, Events, KeepReason, Method, TpmOptions, UnlockOptions,
    Verification,
};
use crate::audit;
use crate::config::{parse_pcr_list, Config};
use crate::log::Priority;
use crate::luks;
use crate::prompt::{system_prompter, Ask, PromptError, Prompter, SecretKind};
use crate::secret::SecretBytes;
use crate::tpm::policy::Bank;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Boot events go to the audit chain. In the initramfs the real log is not
/// mounted yet, so they go to /run, which survives switch_root; the supervisor
/// takes them over.
pub struct AuditEvents {
    path: PathBuf,
}

impl AuditEvents {
    pub fn for_config(cfg: &Config) -> AuditEvents {
        AuditEvents {
            path: crate::handoff::boot_audit_path(&cfg.audit.path),
        }
    }
}

impl Events for AuditEvents {
    fn event(&mut self, name: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(&str, audit::Value<'_>)> = fields
            .iter()
            .map(|(k, v)| (*k, audit::Value::Str(v)))
            .collect();
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = audit::append(&self.path, name, &fields) {
            // Losing an audit line must not stop the boot; say so where it is seen.
            crate::log::warn(&format!("audit log {}: {e}", self.path.display()));
        }
    }
}

fn tpm_options(cfg: &Config) -> TpmOptions {
    TpmOptions {
        tcti: cfg.tpm.tcti.clone(),
        timeout: Duration::from_secs(cfg.tpm.timeout),
        phase_pcr: Some(cfg.tpm.phase_pcr),
        signature: cfg.tpm.signature.clone(),
    }
}

pub fn device(cfg: &Config, arg: Option<&str>) -> Result<String, BootError> {
    let spec = arg
        .map(str::to_string)
        .or_else(|| cfg.vault.device.clone())
        .ok_or(BootError::NoDevice)?;
    Ok(luks::resolve_device(
        &spec,
        Duration::from_secs(cfg.tpm.timeout.max(5)),
    )?)
}

/// What a boot-path command did, for `--json` (the console lines say it in words).
pub type Summary = serde_json::Value;

/// `vaultguard unlock` (boot path): the configuration's device and name, with
/// `vault.options` (`rd.vaultguard.options=`) read through the crypttab option
/// table. With `test`, only says which keyslot would open.
#[allow(clippy::too_many_arguments)]
pub fn run_unlock(
    cfg: &Config,
    device_arg: Option<&str>,
    no_tpm: bool,
    headless: bool,
    keyfile: Option<PathBuf>,
    passphrase: Option<Provisioned>,
    test: bool,
) -> Result<Summary, BootError> {
    let spec = device_arg
        .map(str::to_string)
        .or_else(|| cfg.vault.device.clone())
        .ok_or(BootError::NoDevice)?;
    let (mut opts, opt_headless, warnings) =
        attach_options(cfg, &cfg.vault.name, &spec, None, Some(&cfg.vault.options))?;
    if no_tpm {
        opts.tpm = None;
    }
    if keyfile.is_some() {
        opts.keyfile = keyfile;
    }
    let headless = headless || opt_headless;
    let mut prompter = with_answer(system_prompter(headless), passphrase);
    for w in &warnings {
        prompter.say_at(
            Priority::Warning,
            &format!("vaultguard: vault.options: {w}"),
        );
    }
    if test {
        return report_test(opts, headless, prompter.as_mut());
    }
    let mut events = AuditEvents::for_config(cfg);
    report_unlock(cfg, &opts, prompter.as_mut(), &mut events)
}

/// A prompter whose passphrase prompts are answered by `answer` when given.
fn with_answer(inner: Box<dyn Prompter>, answer: Option<Provisioned>) -> Box<dyn Prompter> {
    match answer {
        Some(mut a) => {
            a.inner = Some(inner);
            Box::new(a)
        }
        None => inner,
    }
}

/// `unlock --test`, `attach --test`: which keyslot the first key that works opens.
fn report_test(
    mut opts: UnlockOptions,
    headless: bool,
    prompter: &mut dyn Prompter,
) -> Result<Summary, BootError> {
    // Nothing but the TPM can answer without a prompt: say why it refused rather
    // than that nobody could be asked.
    let tpm_alone = headless && opts.keyfile.is_none() && opts.tpm.is_some();
    if tpm_alone {
        opts.crypttab.token_only = true;
    }
    let t = match test_unlock(&opts, prompter, &mut super::NoEvents) {
        Ok(t) => t,
        Err(BootError::TokenOnly(why)) if tpm_alone => return Err(BootError::TestRefused(why)),
        Err(e) => return Err(e),
    };
    let what = match (t.method, t.token_type.as_deref()) {
        (Method::Tpm2 | Method::Tpm2Pin, _) => "the TPM2 token",
        (Method::KeyFile, _) => "the key file",
        (Method::Passphrase, Some("systemd-recovery")) => "the recovery key",
        (Method::Passphrase, _) => "the passphrase",
        (Method::Clevis, _) => "the clevis token",
    };
    println_unless_json(
        Priority::Info,
        &format!(
            "vaultguard: {what} opens keyslot {} of {}; activation was not tried (test only)",
            t.slot, opts.device
        ),
    );
    if let (Some(r), false) = (
        &t.fallback_reason,
        matches!(t.method, Method::Tpm2 | Method::Tpm2Pin),
    ) {
        println_unless_json(
            Priority::Warning,
            &format!("vaultguard: the TPM would not: {r}"),
        );
    }
    Ok(serde_json::json!({
        "success": true,
        "test": true,
        "device": opts.device,
        "method": t.method.as_str(),
        "keyslot": t.slot,
        "token_type": t.token_type,
        "tpm_refused": t.fallback_reason.as_ref().map(ToString::to_string),
        "activated": false,
    }))
}

/// Whether the command prints JSON (then the human lines stay off stdout).
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--json`: stdout carries one JSON object, the human lines go to stderr.
pub fn set_json(on: bool) {
    JSON.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn println_unless_json(priority: Priority, line: &str) {
    if JSON.load(std::sync::atomic::Ordering::Relaxed) {
        crate::log::say(priority, line);
    } else {
        crate::log::say_stdout(priority, line);
    }
}

/// A secret given on the command line for provisioning without a terminal
/// (`--unlock-key-file`, `--unlock-passphrase-file`): it answers the passphrase
/// prompt once; a second prompt means it opened nothing, and is refused.
pub struct Provisioned {
    answer: SecretBytes,
    source: String,
    used: bool,
    inner: Option<Box<dyn Prompter>>,
}

impl Provisioned {
    /// Read `path` (`-`: standard input). A key file is taken byte for byte; a
    /// passphrase file loses its trailing newlines, as systemd reads passphrases.
    pub fn read(path: &Path, passphrase: bool) -> Result<Provisioned, BootError> {
        let mut secret = if path == Path::new("-") {
            read_stdin_secret()?
        } else {
            super::read_keyfile(path)?
        };
        if passphrase {
            let b = secret.as_bytes();
            let keep = b.len()
                - b.iter()
                    .rev()
                    .take_while(|c| matches!(c, b'\n' | b'\r'))
                    .count();
            secret.truncate(keep);
        }
        let source = if path == Path::new("-") {
            "standard input".to_string()
        } else {
            path.display().to_string()
        };
        Ok(Provisioned {
            answer: secret,
            source,
            used: false,
            inner: None,
        })
    }
}

impl Provisioned {
    /// The secret itself (for the supervisor's unlock request).
    pub fn into_secret(self) -> SecretBytes {
        self.answer
    }
}

fn read_stdin_secret() -> Result<SecretBytes, BootError> {
    use std::io::Read;
    let err = |err| BootError::KeyFile {
        path: PathBuf::from("-"),
        err,
    };
    let mut buf = SecretBytes::with_capacity(4096);
    let mut chunk = SecretBytes::zeroed(4096);
    let mut stdin = std::io::stdin().lock();
    loop {
        let n = stdin.read(chunk.as_mut_bytes()).map_err(err)?;
        if n == 0 {
            break;
        }
        if buf.len() + n > 8 << 20 {
            return Err(BootError::KeyFileTooLarge {
                path: PathBuf::from("-"),
            });
        }
        // Grown by copying into a larger locked buffer, so that no reallocation
        // leaves an unwiped copy behind.
        if buf.len() + n > buf.capacity() {
            let mut grown = SecretBytes::with_capacity((buf.len() + n).max(2 * buf.capacity()));
            for &c in buf.as_bytes() {
                grown.push(c);
            }
            buf = grown;
        }
        for &c in &chunk.as_bytes()[..n] {
            buf.push(c);
        }
    }
    Ok(buf)
}

impl Prompter for Provisioned {
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
        if !matches!(
            req.kind,
            SecretKind::Passphrase | SecretKind::CurrentPassphrase
        ) {
            return match &mut self.inner {
                Some(p) => p.ask(req),
                None => Err(PromptError::NoTerminal("no prompt in this run".into())),
            };
        }
        if self.used {
            return Err(PromptError::NoTerminal(format!(
                "the key from {} opens no keyslot",
                self.source
            )));
        }
        self.used = true;
        Ok(self.answer.clone())
    }
    fn say(&mut self, line: &str) {
        match &mut self.inner {
            Some(p) => p.say(line),
            None => crate::log::say(Priority::Info, line),
        }
    }
    fn say_at(&mut self, priority: Priority, line: &str) {
        match &mut self.inner {
            Some(p) => p.say_at(priority, line),
            None => crate::log::say(priority, line),
        }
    }
    // The key given on the command line is the only answer: no credential, no
    // cached passphrase, and nothing of it is added to the cache.
    fn unattended(&mut self, _req: &Ask) -> Vec<SecretBytes> {
        Vec::new()
    }
    fn remember(&mut self, _req: &Ask, _answer: &SecretBytes) {}
}

/// A key file's contents as a secret (for the supervisor client as well).
pub fn read_key_file(path: &Path) -> Result<crate::secret::SecretBytes, BootError> {
    super::read_keyfile(path)
}

fn report_unlock(
    cfg: &Config,
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<Summary, BootError> {
    let done = unlock(opts, prompter, events)?;
    // Opt-in self-healing: only on a PCR change, only with the operator's "yes".
    if let Some(reason) = done
        .fallback_reason
        .as_ref()
        .filter(|r| cfg.tpm.reseal_after_recovery && super::self_heal::is_pcr_change(r))
    {
        let healed = enroll_options(cfg, Some(&opts.device), None, None, false, false)
            .and_then(|eo| super::self_heal::offer_reseal(&eo, reason, prompter, events));
        if let Err(e) = healed {
            prompter.say_at(
                Priority::Warning,
                &format!("vaultguard: reseal after recovery failed: {e}"),
            );
        }
    }
    let summary = serde_json::json!({
        "success": true,
        "name": opts.name,
        "device": opts.device,
        "already_open": done.already_active,
        "method": (!done.already_active).then(|| done.method.as_str()),
        "phase_pcr_extended": done.latched,
    });
    if done.already_active {
        return Ok(summary);
    }
    // Tell the supervisor, once it starts, how the vault was opened; it trusts this
    // only if the mapping is really there.
    let refusal: Vec<String> = done
        .fallback_reason
        .iter()
        .map(ToString::to_string)
        .chain(done.refusal_explained.iter().cloned())
        .collect();
    let _ = crate::handoff::write_boot_hint_with_refusal(
        &cfg.vault.state_path,
        "unlocked",
        done.method.as_str(),
        done.tpm_seconds,
        &refusal,
    );
    let how = match done.method {
        Method::Tpm2 => "with the TPM",
        Method::Tpm2Pin => "with the TPM and PIN",
        Method::KeyFile => "with the key file",
        Method::Passphrase => "with the passphrase",
        Method::Clevis => "with a clevis token",
    };
    let latch = if done.latched {
        ", phase PCR extended"
    } else {
        ""
    };
    prompter.say_at(
        Priority::Info,
        &format!("vaultguard: {} unlocked {how}{latch}", opts.name),
    );
    Ok(summary)
}

/// `vaultguard attach NAME DEVICE [KEYFILE] [OPTIONS]` (systemd-cryptsetup's syntax).
pub fn run_attach(
    cfg: &Config,
    name: &str,
    device_arg: &str,
    keyfile: Option<&str>,
    options: Option<&str>,
    test: bool,
) -> Result<Summary, BootError> {
    let (opts, headless, warnings) = attach_options(cfg, name, device_arg, keyfile, options)?;
    let mut prompter = system_prompter(headless);
    for w in &warnings {
        prompter.say_at(Priority::Warning, &format!("vaultguard: {w}"));
    }
    if test {
        return report_test(opts, headless, prompter.as_mut());
    }
    let mut events = AuditEvents::for_config(cfg);
    report_unlock(cfg, &opts, prompter.as_mut(), &mut events)
}

/// The unlock an `attach` line asks for: the option table applied over the
/// configuration. Returns the options, `headless`, and the console warnings.
pub fn attach_options(
    cfg: &Config,
    name: &str,
    device_arg: &str,
    keyfile: Option<&str>,
    options: Option<&str>,
) -> Result<(UnlockOptions, bool, Vec<String>), BootError> {
    let o = super::options::parse(options.unwrap_or("")).map_err(BootError::Option)?;
    super::options::check_header(&o).map_err(BootError::Option)?;
    let mut tpm = tpm_options(cfg);
    if let Some(t) = &o.tcti {
        tpm.tcti = t.clone();
    }
    // `tpm2-measure-pcr=N` moves the phase PCR; `=no` only skips the extend
    // (the enrolment still binds the configured one to zeros).
    if let Some(Some(p)) = o.phase_pcr {
        tpm.phase_pcr = Some(p);
    }
    if let Some(s) = &o.signature {
        tpm.signature = Some(s.clone());
    }
    if let Some(t) = o.token_timeout {
        tpm.timeout = t;
    }
    let device = luks::resolve_device(device_arg, tpm.timeout.max(Duration::from_secs(5)))?;
    let keyfile = keyfile
        .filter(|k| !matches!(*k, "-" | "none" | ""))
        .map(PathBuf::from);
    let opts = UnlockOptions {
        name: name.to_string(),
        device,
        tpm: (!o.no_tpm).then_some(tpm),
        tries: match o.tries {
            // systemd: 0 is unlimited.
            Some(0) => u32::MAX,
            Some(n) => n,
            None => cfg.auth.boot_tries,
        },
        keyfile,
        flags: o.flags,
        crypttab: CrypttabUnlock {
            token_only: o.token_only,
            keyfile_offset: o.keyfile_offset,
            keyfile_size: o.keyfile_size,
            header: o.header.clone(),
            prompt: o.prompt(),
            network: super::NetworkUnlock {
                deadline: Duration::from_secs(cfg.clevis.deadline),
                tang_thumbprints: cfg.clevis.tang_thumbprints.clone(),
            },
            no_measure: o.phase_pcr == Some(None),
        },
    };
    Ok((opts, o.headless, o.warnings))
}

/// `vaultguard detach NAME`.
/// Not open is not an error (systemd-cryptsetup: "already inactive", status 0),
/// but it is said as such.
pub fn run_detach(cfg: &Config, name: &str) -> Result<Summary, BootError> {
    let was_open = match luks::is_active(name) {
        // No device-mapper: nothing can be open.
        Err(luks::LuksError::NoDeviceMapper { .. }) => false,
        other => other?,
    };
    if was_open {
        let mut events = AuditEvents::for_config(cfg);
        detach(name, &mut events)?;
        println_unless_json(Priority::Info, &format!("vaultguard: {name} closed"));
    } else {
        println_unless_json(
            Priority::Info,
            &format!("vaultguard: {name} is not open; nothing was closed"),
        );
    }
    Ok(serde_json::json!({"success": true, "name": name, "was_open": was_open}))
}

fn enroll_options(
    cfg: &Config,
    device_arg: Option<&str>,
    pcrs: Option<&str>,
    bank: Option<&str>,
    pin: bool,
    recovery_key: bool,
) -> Result<EnrollOptions, BootError> {
    let bad = BootError::BadArgument;
    let pcrs = match pcrs {
        Some(p) => parse_pcr_list(p).map_err(|e| bad(ArgError::PcrList(e)))?,
        None => cfg.tpm.pcrs.clone(),
    };
    if pcrs.contains(&cfg.tpm.phase_pcr) {
        return Err(bad(ArgError::PhasePcrListed {
            pcr: cfg.tpm.phase_pcr,
        }));
    }
    let bank_name = bank.unwrap_or(&cfg.tpm.bank);
    let bank = Bank::from_name(bank_name).ok_or_else(|| {
        bad(ArgError::UnknownBank {
            name: bank_name.to_string(),
        })
    })?;
    Ok(EnrollOptions {
        device: device(cfg, device_arg)?,
        name: cfg.vault.name.clone(),
        tpm: tpm_options(cfg),
        bank,
        pcrs,
        pin,
        recovery_key,
        tries: cfg.auth.boot_tries,
        audit_nv_index: cfg.audit.tpm_anchor.then_some(cfg.audit.tpm_nv_index),
        signed: None,
    })
}

/// `enroll --public-key FILE --public-key-pcrs LIST [--tpm2-pcrs LIST]`: a signed
/// PCR policy, as systemd-cryptenroll --tpm2-public-key takes it.
#[derive(Debug, Clone, Default)]
pub struct SignedArgs {
    pub public_key: Option<PathBuf>,
    pub public_key_pcrs: Option<String>,
    /// The literal PCRs beside the signed ones (default: none, as systemd).
    pub tpm2_pcrs: Option<String>,
    /// `--revocation-counter HANDLE`: a revocable signed policy.
    pub revocation_counter: Option<String>,
}

/// Apply `args` to `opts`: read and check the key, the PCR lists.
fn apply_signed(
    cfg: &Config,
    opts: &mut EnrollOptions,
    args: &SignedArgs,
) -> Result<(), BootError> {
    let bad = BootError::BadArgument;
    let Some(path) = &args.public_key else {
        if args.revocation_counter.is_some() {
            return Err(bad(ArgError::PublicKey(
                "--revocation-counter needs --public-key (it revokes signed policies)".into(),
            )));
        }
        if args.public_key_pcrs.is_some() {
            return Err(bad(ArgError::PublicKey(
                "--public-key-pcrs needs --public-key".into(),
            )));
        }
        return Ok(());
    };
    let shown = path.display();
    let pem = crate::tpm::signed::read_key_file(path)
        .map_err(|e| bad(ArgError::PublicKey(format!("{shown}: {e}"))))?;
    crate::tpm::signed::PolicyKey::from_pem(&pem)
        .map_err(|e| bad(ArgError::PublicKey(format!("{shown}: {e}"))))?;
    let pcrs = parse_pcr_list(args.public_key_pcrs.as_deref().unwrap_or("11"))
        .map_err(|e| bad(ArgError::PcrList(format!("--public-key-pcrs: {e}"))))?;
    if pcrs.is_empty() {
        return Err(bad(ArgError::PcrList("--public-key-pcrs is empty".into())));
    }
    let literal = match &args.tpm2_pcrs {
        Some(p) => parse_pcr_list(p).map_err(|e| bad(ArgError::PcrList(e)))?,
        None => Vec::new(),
    };
    if literal.contains(&cfg.tpm.phase_pcr) || pcrs.contains(&cfg.tpm.phase_pcr) {
        return Err(bad(ArgError::PhasePcrListed {
            pcr: cfg.tpm.phase_pcr,
        }));
    }
    let revocation_counter = match &args.revocation_counter {
        Some(h) => Some(
            crate::tpm::counter::parse_handle(h)
                .map_err(|e| bad(ArgError::PublicKey(format!("--revocation-counter: {e}"))))?,
        ),
        None => None,
    };
    opts.pcrs = literal;
    opts.signed = Some(crate::boot::SignedEnrolment {
        public_key_pem: pem.to_vec(),
        pcrs,
        revocation_counter,
    });
    Ok(())
}

/// The console lines that report an enrolment or reseal (the recovery key, shown
/// once, is written separately by `print_enrolment`).
pub fn enrolment_lines(what: &str, r: &EnrollReport) -> Vec<String> {
    let pcrs = r
        .pcrs
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut lines = vec![format!(
        "vaultguard: {what} TPM2 keyslot {} (token {}), bound to PCRs {pcrs}",
        r.keyslot, r.token
    )];
    lines.push(match r.verification {
        Verification::Unsealed => "vaultguard: verified: the TPM unsealed the new secret".into(),
        Verification::PolicyOnly => {
            "vaultguard: verified the policy against the TPM; a full unseal check is impossible \
             in this boot because the phase PCR is already extended (the next boot will use it)"
                .into()
        }
        Verification::Unsigned(ref why) => format!(
            "vaultguard: signed policy enrolled; not unsealed yet ({why}). Sign the PCR values \
             the next boot will have with `vaultguard policy sign` before rebooting"
        ),
    });
    match &r.audit_anchor {
        AuditAnchor::Skipped => {}
        AuditAnchor::Created { handle } => lines.push(format!(
            "vaultguard: defined the audit log's TPM anchor (NV index {handle:#010x})"
        )),
        AuditAnchor::AlreadyThere { handle } => lines.push(format!(
            "vaultguard: the audit log's TPM anchor (NV index {handle:#010x}) is already defined; kept"
        )),
        AuditAnchor::Failed { error, .. } => lines.push(format!(
            "vaultguard: warning: the audit log's TPM anchor was not defined: {error}. \
             The enrolment is complete; the audit log is kept without its TPM anchor"
        )),
    }
    for token in &r.removed_tokens {
        let slots: Vec<u32> = r
            .removed
            .iter()
            .filter(|(t, _)| t == token)
            .map(|(_, s)| *s)
            .collect();
        if slots.is_empty() {
            lines.push(format!(
                "vaultguard: removed old token {token}; none of its keyslots was removed"
            ));
        }
        for slot in slots {
            lines.push(format!(
                "vaultguard: removed old token {token} and keyslot {slot}"
            ));
        }
    }
    for k in &r.kept {
        let why = k
            .reasons
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        // Only a keyslot nothing is known against may be the operator's to remove;
        // never suggest removing one a key or token is known to use.
        let hint = if k.reasons == [KeepReason::Unproven] {
            format!(
                "; if it is the old TPM keyslot, remove it with `cryptsetup luksKillSlot {} {}`",
                r.device, k.slot
            )
        } else {
            String::new()
        };
        lines.push(format!(
            "vaultguard: kept keyslot {} (listed by old token {}): {why}{hint}",
            k.slot, k.token
        ));
    }
    lines
}

fn print_enrolment(what: &str, r: &EnrollReport) -> Summary {
    let json = JSON.load(std::sync::atomic::Ordering::Relaxed);
    for line in enrolment_lines(what, r) {
        println_unless_json(Priority::Info, &line);
    }
    let mut summary = serde_json::json!({
        "success": true,
        "device": r.device,
        "keyslot": r.keyslot,
        "token": r.token,
        "pcrs": r.pcrs,
        "recovery_keyslot": r.recovery_keyslot,
    });
    if let (Some(key), Some(slot)) = (&r.recovery_key, r.recovery_keyslot) {
        if json {
            // Shown once, as in text mode, and written straight from its locked
            // buffer (no String copy); its alphabet needs no JSON escaping.
            summary["recovery_keyslot"] = slot.into();
            let text = summary.to_string();
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&text.as_bytes()[..text.len() - 1]);
            let _ = out.write_all(b",\"recovery_key\":\"");
            let _ = out.write_all(key.as_bytes());
            let _ = out.write_all(b"\"}\n");
            let _ = out.flush();
            // Printed here: nothing more for the caller to print.
            return Summary::Null;
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "vaultguard: recovery key in keyslot {slot}; it is shown once, write it down now:"
            );
            let _ = out.write_all(key.as_bytes());
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
    summary
}

/// `vaultguard enroll`. `unlock` answers the passphrase prompt (provisioning
/// without a terminal); it gets one try, a wrong key costs no further KDF runs.
#[allow(clippy::too_many_arguments)]
pub fn run_enroll(
    cfg: &Config,
    device_arg: Option<&str>,
    pcrs: Option<&str>,
    bank: Option<&str>,
    pin: bool,
    recovery_key: bool,
    unlock: Option<Provisioned>,
    signed: &SignedArgs,
) -> Result<Summary, BootError> {
    let mut opts = enroll_options(cfg, device_arg, pcrs, bank, pin, recovery_key)?;
    apply_signed(cfg, &mut opts, signed)?;
    if unlock.is_some() {
        opts.tries = 1;
    }
    let mut prompter = with_answer(system_prompter(false), unlock);
    let mut events = AuditEvents::for_config(cfg);
    let report = enroll(&opts, prompter.as_mut(), &mut events)?;
    Ok(print_enrolment("enrolled", &report))
}

/// `vaultguard enroll --tang URL [--tang-thumbprint THP] [--threshold N]`.
pub fn run_enroll_clevis(
    cfg: &Config,
    device_arg: Option<&str>,
    tang: &[String],
    thumbprints: &[String],
    threshold: Option<usize>,
    tpm2: Option<(Option<&str>, Option<&str>)>,
    unlock: Option<Provisioned>,
) -> Result<Summary, BootError> {
    let tpm2 = match tpm2 {
        Some((pcrs, bank)) => {
            // The same PCR/bank choice as a systemd-tpm2 enrolment, minus the
            // phase PCR (clevis' pin has no latch).
            let e = enroll_options(cfg, device_arg, pcrs, bank, false, false)?;
            Some((e.tpm, e.bank, e.pcrs))
        }
        None => None,
    };
    let opts = super::ClevisEnrollOptions {
        device: device(cfg, device_arg)?,
        name: cfg.vault.name.clone(),
        tang: tang.to_vec(),
        thumbprints: thumbprints.to_vec(),
        threshold,
        tpm2,
        tries: if unlock.is_some() {
            1
        } else {
            cfg.auth.boot_tries
        },
        timeout: Duration::from_secs(cfg.clevis.deadline.max(1)),
    };
    let mut prompter = with_answer(system_prompter(false), unlock);
    let mut events = AuditEvents::for_config(cfg);
    // clevis luks bind's question, asked only of a person at a terminal.
    let mut confirm = |adv: &crate::clevis::enroll::Advertisement| -> bool {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            return false;
        }
        let mut err = std::io::stderr();
        let _ = writeln!(
            err,
            "The advertisement of {} contains the following signing keys:\n",
            adv.url
        );
        for t in &adv.signing_thumbprints {
            let _ = writeln!(err, "{t}");
        }
        let _ = write!(err, "\nDo you wish to trust these keys? [ynYN] ");
        let _ = err.flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        matches!(line.trim(), "y" | "Y")
    };
    let r = super::enroll_clevis(&opts, prompter.as_mut(), &mut events, &mut confirm)?;
    println_unless_json(
        Priority::Info,
        &format!(
            "vaultguard: bound {} to {} ({}): keyslot {}, clevis token {}",
            opts.device,
            opts.tang
                .iter()
                .cloned()
                .chain(opts.tpm2.is_some().then(|| "the TPM".to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            r.pin,
            r.keyslot,
            r.token
        ),
    );
    Ok(serde_json::json!({
        "enrolled": "clevis",
        "pin": r.pin,
        "keyslot": r.keyslot,
        "token": r.token,
        "tang": opts.tang,
    }))
}

/// `vaultguard reseal`.
pub fn run_reseal(
    cfg: &Config,
    device_arg: Option<&str>,
    pcrs: Option<&str>,
    bank: Option<&str>,
    pin: bool,
    unlock: Option<Provisioned>,
    confirm: bool,
) -> Result<Summary, BootError> {
    let mut opts = enroll_options(cfg, device_arg, pcrs, bank, pin, false)?;
    if unlock.is_some() {
        opts.tries = 1;
    }
    let mut prompter = with_answer(system_prompter(false), unlock);
    let mut events = AuditEvents::for_config(cfg);
    // --confirm: the operator verified the change; what changed is shown and
    // audited with the reseal.
    let diff = if confirm {
        let mut vault = luks::Vault::open(&opts.device)?;
        let mut tpm = crate::tpm::Tpm::open(&opts.tpm.tcti, opts.tpm.timeout)?;
        super::explain::current_diff(&mut vault, &mut tpm)
    } else {
        Vec::new()
    };
    for line in &diff {
        prompter.say_at(Priority::Info, &format!("vaultguard:   {line}"));
    }
    let report = reseal(&opts, prompter.as_mut(), &mut events)?;
    if confirm {
        events.event(
            "reseal_confirmed",
            &[
                ("device", &opts.device),
                ("keyslot", &report.keyslot.to_string()),
                ("eventlog_diff", &diff.join("\n")),
            ],
        );
    }
    Ok(print_enrolment("resealed into", &report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_arguments_are_refused_as_what_they_are() {
        let mut cfg = Config::default();
        // No device anywhere: that is not a key-file problem.
        assert!(matches!(
            enroll_options(&cfg, None, None, None, false, false),
            Err(BootError::NoDevice)
        ));
        cfg.vault.device = Some("/nonexistent/vault.img".into());
        let phase = cfg.tpm.phase_pcr;
        match enroll_options(&cfg, None, Some(&format!("7,{phase}")), None, false, false) {
            Err(BootError::BadArgument(ArgError::PhasePcrListed { pcr })) => assert_eq!(pcr, phase),
            other => panic!("{other:?}"),
        }
        match enroll_options(&cfg, None, Some("7"), Some("md5"), false, false) {
            Err(BootError::BadArgument(ArgError::UnknownBank { name })) => assert_eq!(name, "md5"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            enroll_options(&cfg, None, Some("7,x"), None, false, false),
            Err(BootError::BadArgument(ArgError::PcrList(_)))
        ));
    }

    #[test]
    fn a_missing_key_file_names_the_file_and_the_os_error() {
        let err = crate::boot::read_keyfile(Path::new("/nonexistent/key")).unwrap_err();
        match &err {
            BootError::KeyFile { path, err } => {
                assert_eq!(path, Path::new("/nonexistent/key"));
                assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().starts_with("key file /nonexistent/key: "),
            "{err}"
        );
    }
}
