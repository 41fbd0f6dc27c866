//! Boot-path flows that tie the edges together: unlock (TPM first, passphrase
//! fallback, then the phase-PCR latch), enroll, reseal, recovery keys.
//!
//! The order of steps is the security argument, so it lives here in one place:
//! the volume key is obtained once, the mapping is created, and the phase PCR is
//! extended before anything else runs; if the extend fails the mapping is closed
//! again (fail closed). Enrolment and reseal write the new keyslot and token before
//! touching anything old, and never remove the passphrase. Every outcome is
//! reported through [`Events`]; no event carries a secret.

pub mod commands;

use crate::encoding::base64_encode_secret;
use crate::luks::token::{PrimaryAlg, Tpm2Token};
use crate::luks::{self, ActivateFlags, LuksError, Vault};
use crate::prompt::{PromptError, Prompter};
use crate::secret::SecretBytes;
use crate::tpm::policy::{self, Bank};
use crate::tpm::{SealRequest, Sealed, Tpm, TpmError};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Where unlock outcomes go (the audit log, in the binary). Fields are plain,
/// non-secret data.
pub trait Events {
    fn event(&mut self, name: &str, fields: &[(&str, &str)]);
}

/// Discards events.
pub struct NoEvents;

impl Events for NoEvents {
    fn event(&mut self, _name: &str, _fields: &[(&str, &str)]) {}
}

#[derive(Debug)]
pub enum BootError {
    Luks(LuksError),
    Tpm(TpmError),
    Prompt(PromptError),
    /// Every allowed try failed.
    TriesExhausted {
        what: &'static str,
        tries: u32,
    },
    AlreadyEnrolled {
        token: u32,
    },
    NotEnrolled,
    BrokenToken {
        token: u32,
        why: String,
    },
    PinMismatch,
    EmptyPin,
    /// The phase-PCR latch failed; the mapping was closed again.
    LatchFailed {
        why: String,
        closed: bool,
    },
    Verify(String),
    KeyFile(String),
    /// The kernel's random number generator failed.
    Random(std::io::Error),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Luks(e) => e.fmt(f),
            BootError::Tpm(e) => e.fmt(f),
            BootError::Prompt(e) => e.fmt(f),
            BootError::TriesExhausted { what, tries } => write!(f, "{what}: all {tries} tries failed"),
            BootError::AlreadyEnrolled { token } => write!(
                f,
                "a TPM2 enrolment already exists (token {token}); use `vaultguard reseal` to replace it"
            ),
            BootError::NotEnrolled => write!(f, "no TPM2 enrolment in the LUKS header; run `vaultguard enroll` first"),
            BootError::BrokenToken { token, why } => write!(
                f,
                "LUKS2 token {token} is a damaged systemd-tpm2 token ({why}); remove it with `cryptsetup token remove --token-id {token}` and enroll again"
            ),
            BootError::PinMismatch => write!(f, "the two PINs differ"),
            BootError::EmptyPin => write!(f, "an empty PIN is not a PIN"),
            BootError::LatchFailed { why, closed } => write!(
                f,
                "{why}; {}",
                if *closed {
                    "the vault was closed again (fail closed)"
                } else {
                    "closing the vault again ALSO failed: close it by hand"
                }
            ),
            BootError::Verify(why) => write!(f, "enrolment check failed, nothing was written: {why}"),
            BootError::KeyFile(why) => write!(f, "key file: {why}"),
            BootError::Random(e) => write!(
                f,
                "the kernel random number generator failed (getrandom: {e}); no key was made"
            ),
        }
    }
}

impl std::error::Error for BootError {}

impl From<LuksError> for BootError {
    fn from(e: LuksError) -> Self {
        BootError::Luks(e)
    }
}
impl From<TpmError> for BootError {
    fn from(e: TpmError) -> Self {
        BootError::Tpm(e)
    }
}
impl From<PromptError> for BootError {
    fn from(e: PromptError) -> Self {
        BootError::Prompt(e)
    }
}

/// Where the TPM is and how to use it.
#[derive(Debug, Clone)]
pub struct TpmOptions {
    pub tcti: String,
    pub timeout: Duration,
    /// PCR extended after unlock and bound to zeros at enrolment.
    pub phase_pcr: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct UnlockOptions {
    pub name: String,
    pub device: String,
    /// `None`: do not use the TPM at all (passphrase only).
    pub tpm: Option<TpmOptions>,
    /// Passphrase prompts (and PIN prompts) allowed.
    pub tries: u32,
    /// A key file tried before prompting (crypttab's third field).
    pub keyfile: Option<PathBuf>,
    pub flags: ActivateFlags,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Tpm2,
    Tpm2Pin,
    KeyFile,
    Passphrase,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Tpm2 => "tpm2_unseal",
            Method::Tpm2Pin => "tpm2_pin",
            Method::KeyFile => "keyfile",
            Method::Passphrase => "passphrase",
        }
    }
}

#[derive(Debug)]
pub struct Unlocked {
    pub method: Method,
    /// Why the TPM was not used, when it was not.
    pub fallback_reason: Option<String>,
    /// Whether the phase PCR was extended.
    pub latched: bool,
    pub already_active: bool,
}

/// Why the TPM is not used for a volume that has no TPM2 token.
const NO_ENROLMENT: &str = "no TPM2 enrolment in the LUKS header";

/// Fetch the volume key through a usable TPM2 token, or say in one line why not.
fn volume_key_via_tpm(
    vault: &mut Vault,
    tpm: &mut Tpm,
    opts: &TpmOptions,
    name: &str,
    tries: u32,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<(SecretBytes, Method), String> {
    let tokens = vault.tpm2_tokens();
    if tokens.is_empty() {
        return Err(NO_ENROLMENT.into());
    }
    let mut reason = String::new();
    for (id, parsed) in tokens {
        let token = match parsed {
            Ok(t) => t,
            Err(e) => {
                reason = format!("token {id} is unusable: {e}");
                continue;
            }
        };
        let secret = if token.pin {
            // Nobody is asked for a PIN the TPM would refuse anyway.
            if let Some(why) = refusal(tpm, &token, opts.phase_pcr) {
                reason = why;
                continue;
            }
            match unseal_with_pin(tpm, &token, name, tries, prompter, events) {
                Ok(s) => s,
                Err(why) => {
                    reason = why;
                    continue;
                }
            }
        } else {
            // Just try: checking the PCRs first would cost every boot a PCR read;
            // they are read only to explain a refusal.
            match tpm.unseal(&token, None) {
                Ok(s) => s,
                Err(e) => {
                    reason = refusal(tpm, &token, opts.phase_pcr).unwrap_or_else(|| e.to_string());
                    continue;
                }
            }
        };
        let passphrase = base64_encode_secret(secret.as_bytes());
        for &slot in &token.keyslots {
            match vault.volume_key(Some(slot), passphrase.as_bytes()) {
                Ok((vk, _)) => {
                    return Ok((
                        vk,
                        if token.pin {
                            Method::Tpm2Pin
                        } else {
                            Method::Tpm2
                        },
                    ))
                }
                Err(e) => reason = format!("the TPM secret does not open keyslot {slot}: {e}"),
            }
        }
    }
    Err(reason)
}

/// Why the TPM refuses `token` now, where that can be told without trying it: a
/// cleared or replaced TPM (missing or foreign SRK) is named before the PCRs (a
/// latched phase PCR would otherwise hide it), then the PCRs that changed.
fn refusal(tpm: &mut Tpm, token: &Tpm2Token, phase_pcr: Option<u32>) -> Option<String> {
    let pcrs = tpm.check_policy(token, phase_pcr).err()?;
    Some(match tpm.check_parent(token) {
        Err(srk) => srk.to_string(),
        Ok(()) => pcrs.to_string(),
    })
}

/// PIN prompts, bounded by `tries` and by the TPM's own dictionary-attack budget:
/// we stop while the TPM still has a try in reserve, so a mistyped PIN can never
/// push it into lockout (the passphrase is asked instead).
fn unseal_with_pin(
    tpm: &mut Tpm,
    token: &Tpm2Token,
    name: &str,
    tries: u32,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<SecretBytes, String> {
    for _ in 0..tries {
        if tpm.in_lockout().unwrap_or(false) {
            return Err(TpmError::Lockout {
                recovery_seconds: None,
            }
            .to_string());
        }
        let left = tpm.da_tries_left().map_err(|e| e.to_string())?;
        if left <= 1 {
            return Err(format!(
                "the TPM allows only {left} more wrong PIN(s) before it locks out; not risking it"
            ));
        }
        let pin = prompter
            .ask(
                &format!("cryptsetup-tpm2:{name}"),
                &format!("TPM2 PIN for {name}: "),
            )
            .map_err(|e| e.to_string())?;
        match tpm.unseal(token, Some(pin.as_bytes())) {
            Ok(s) => return Ok(s),
            Err(TpmError::WrongPin { tries_left }) => {
                events.event("tpm_pin_wrong", &[("name", name)]);
                let msg = TpmError::WrongPin { tries_left }.to_string();
                prompter.say(&format!("vaultguard: {msg}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("wrong TPM PIN {tries} times"))
}

/// Ask for the passphrase (or recovery key) until one opens a keyslot.
pub fn volume_key_via_passphrase(
    vault: &mut Vault,
    name: &str,
    tries: u32,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<SecretBytes, BootError> {
    let device = vault.device().to_string();
    for attempt in 1..=tries {
        let pass = prompter.ask(
            &format!("cryptsetup:{name}"),
            &format!("Passphrase for {name} ({device}): "),
        )?;
        match vault.volume_key(None, pass.as_bytes()) {
            Ok((vk, _)) => return Ok(vk),
            Err(e) if e.is_wrong_passphrase() => {
                events.event("passphrase_wrong", &[("name", name)]);
                let left = tries - attempt;
                prompter.say(&format!("vaultguard: wrong passphrase ({left} tries left)"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(BootError::TriesExhausted {
        what: "passphrase",
        tries,
    })
}

pub fn read_keyfile(path: &std::path::Path) -> Result<SecretBytes, BootError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .map_err(|e| BootError::KeyFile(format!("{}: {e}", path.display())))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > 8 << 20 {
        return Err(BootError::KeyFile(format!(
            "{} is larger than 8 MiB",
            path.display()
        )));
    }
    let mut buf = SecretBytes::zeroed(len as usize);
    f.read_exact(buf.as_mut_bytes())
        .map_err(|e| BootError::KeyFile(format!("{}: {e}", path.display())))?;
    Ok(buf)
}

/// A volume key and how it was obtained. `tpm` is kept open for the latch.
pub struct Acquired {
    pub vk: SecretBytes,
    pub method: Method,
    pub fallback_reason: Option<String>,
    pub tpm: Option<Tpm>,
}

/// TPM first, then the key file, then the passphrase: the volume key, without
/// activating anything (host-testable on a LUKS2 image in a file).
pub fn acquire_volume_key(
    vault: &mut Vault,
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<Acquired, BootError> {
    let name = opts.name.as_str();
    let mut tpm = None;
    let tpm_result = match &opts.tpm {
        None => Err("TPM use disabled".to_string()),
        // Nothing to unseal: do not wait for the TPM (the latch opens it later).
        Some(_) if vault.tpm2_tokens().is_empty() => Err(NO_ENROLMENT.to_string()),
        Some(t) => match Tpm::open(&t.tcti, t.timeout) {
            Ok(mut handle) => {
                let r =
                    volume_key_via_tpm(vault, &mut handle, t, name, opts.tries, prompter, events);
                tpm = Some(handle);
                r
            }
            Err(e) => Err(e.to_string()),
        },
    };
    let reason = match tpm_result {
        Ok((vk, method)) => {
            return Ok(Acquired {
                vk,
                method,
                fallback_reason: None,
                tpm,
            })
        }
        Err(reason) => reason,
    };
    prompter.say(&format!(
        "vaultguard: TPM unlock of {name} not possible: {reason}"
    ));
    events.event("tpm_refused", &[("name", name), ("reason", &reason)]);
    if let Some(path) = &opts.keyfile {
        let key = read_keyfile(path)?;
        match vault.volume_key(None, key.as_bytes()) {
            Ok((vk, _)) => {
                return Ok(Acquired {
                    vk,
                    method: Method::KeyFile,
                    fallback_reason: Some(reason),
                    tpm,
                })
            }
            Err(e) if e.is_wrong_passphrase() => {
                prompter.say(&format!(
                    "vaultguard: key file {} opens no keyslot",
                    path.display()
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    match volume_key_via_passphrase(vault, name, opts.tries, prompter, events) {
        Ok(vk) => Ok(Acquired {
            vk,
            method: Method::Passphrase,
            fallback_reason: Some(reason),
            tpm,
        }),
        Err(e) => {
            events.event(
                "unlock_failed",
                &[("name", name), ("error", &e.to_string())],
            );
            Err(e)
        }
    }
}

/// Open the vault: TPM first, then key file, then passphrase; create the mapping
/// and latch the phase PCR.
pub fn unlock(
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<Unlocked, BootError> {
    let name = opts.name.as_str();
    if luks::is_active(name)? {
        prompter.say(&format!("vaultguard: {name} is already open"));
        return Ok(Unlocked {
            method: Method::Passphrase,
            fallback_reason: None,
            latched: false,
            already_active: true,
        });
    }
    let mut vault = Vault::open(&opts.device)?;
    let uuid = vault.uuid()?;
    let Acquired {
        vk,
        method,
        fallback_reason,
        mut tpm,
    } = acquire_volume_key(&mut vault, opts, prompter, events)?;

    vault.activate(name, &vk, opts.flags)?;

    let mut latched = false;
    if let (None, Some(t)) = (&tpm, &opts.tpm) {
        // Unlocked without the TPM (no enrolment): the phase still ends here, if
        // there is a TPM now; no waiting for one to appear.
        if t.phase_pcr.is_some() {
            tpm = Tpm::open(&t.tcti, std::time::Duration::ZERO).ok();
        }
    }
    if let (Some(handle), Some(t)) = (tpm.as_mut(), &opts.tpm) {
        if let Some(pcr) = t.phase_pcr {
            if let Err(e) = handle.latch(pcr, vk.as_bytes(), name, &uuid) {
                let closed = luks::close(name).is_ok();
                events.event("latch_failed", &[("name", name), ("error", &e.to_string())]);
                return Err(BootError::LatchFailed {
                    why: e.to_string(),
                    closed,
                });
            }
            latched = true;
        }
    } else if opts.tpm.is_some() {
        prompter.say("vaultguard: no TPM, the phase PCR could not be extended");
    }
    events.event(
        "unlocked",
        &[
            ("name", name),
            ("method", method.as_str()),
            ("latched", if latched { "yes" } else { "no" }),
        ],
    );
    Ok(Unlocked {
        method,
        fallback_reason,
        latched,
        already_active: false,
    })
}

/// Close the mapping and sweep the keyring for its volume keys.
pub fn detach(name: &str, events: &mut dyn Events) -> Result<(), BootError> {
    if !luks::is_active(name)? {
        return Ok(());
    }
    let uuid = luks_uuid_of_mapping(name);
    luks::close(name)?;
    if let Some(uuid) = uuid {
        let _ = crate::keyring::revoke_volume_keys(&uuid);
    }
    events.event("detached", &[("name", name)]);
    Ok(())
}

/// The LUKS UUID of an active mapping, from its dm UUID (`CRYPT-LUKS2-<hex>-<name>`).
fn luks_uuid_of_mapping(name: &str) -> Option<String> {
    let dm = std::fs::read_dir("/sys/block")
        .ok()?
        .filter_map(Result::ok)
        .find(|e| {
            std::fs::read_to_string(e.path().join("dm/name")).is_ok_and(|n| n.trim() == name)
        })?;
    let uuid = std::fs::read_to_string(dm.path().join("dm/uuid")).ok()?;
    let hex = uuid
        .trim()
        .strip_prefix("CRYPT-LUKS2-")?
        .split('-')
        .next()?
        .to_string();
    (hex.len() == 32).then(|| {
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    })
}

#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub device: String,
    pub name: String,
    pub tpm: TpmOptions,
    pub bank: Bank,
    pub pcrs: Vec<u32>,
    pub pin: bool,
    pub recovery_key: bool,
    pub tries: u32,
}

#[derive(Debug)]
pub enum Verification {
    /// The new object was unsealed and gave back the secret.
    Unsealed,
    /// The phase PCR is already extended in this boot, so only the policy could be
    /// checked (against the TPM's own computation).
    PolicyOnly,
}

#[derive(Debug)]
pub struct EnrollReport {
    pub keyslot: u32,
    pub token: u32,
    pub pcrs: Vec<u32>,
    pub verification: Verification,
    pub recovery_key: Option<SecretBytes>,
    pub recovery_keyslot: Option<u32>,
    pub removed: Vec<(u32, u32)>,
}

fn ask_new_pin(prompter: &mut dyn Prompter, name: &str) -> Result<SecretBytes, BootError> {
    let a = prompter.ask(&format!("cryptenroll-pin:{name}"), "New TPM2 PIN: ")?;
    let b = prompter.ask(&format!("cryptenroll-pin:{name}"), "Repeat the TPM2 PIN: ")?;
    if a.is_empty() {
        return Err(BootError::EmptyPin);
    }
    if !a.ct_eq(b.as_bytes()) {
        return Err(BootError::PinMismatch);
    }
    Ok(a)
}

/// Seal, then check the result before anything is written to the header.
fn seal_and_verify(
    tpm: &mut Tpm,
    opts: &EnrollOptions,
    pin: Option<&SecretBytes>,
) -> Result<(Sealed, Tpm2Token, Verification), BootError> {
    let sealed = tpm.seal(&SealRequest {
        bank: opts.bank,
        pcrs: &opts.pcrs,
        phase_pcr: opts.tpm.phase_pcr,
        pin: pin.map(SecretBytes::as_bytes),
    })?;
    let token = Tpm2Token {
        keyslots: vec![0], // set once the keyslot exists
        blob: sealed.blob.clone(),
        pcrs: sealed.pcr_values.iter().map(|(p, _)| *p).collect(),
        bank: opts.bank,
        primary_alg: PrimaryAlg::Ecc,
        policy_hash: sealed.policy_hash.clone(),
        pin: pin.is_some(),
        salt: sealed.salt.clone(),
        srk: Some(sealed.srk.clone()),
        pcr_values: Some(sealed.pcr_values.iter().cloned().collect()),
    };
    let verification = match tpm.check_policy(&token, opts.tpm.phase_pcr) {
        Ok(()) => {
            let back = tpm.unseal(&token, pin.map(SecretBytes::as_bytes))?;
            if !back.ct_eq(sealed.secret.as_bytes()) {
                return Err(BootError::Verify(
                    "the TPM returned a different secret".into(),
                ));
            }
            Verification::Unsealed
        }
        Err(TpmError::PcrMismatch { changed, .. })
            if changed.len() == 1 && Some(changed[0]) == opts.tpm.phase_pcr =>
        {
            // Our arithmetic must agree with the TPM's on the live values; the
            // sealed policy differs from them only in the phase PCR being zero.
            let live = tpm.read_pcrs(opts.bank, &token.pcrs)?;
            let ours = policy::sealing_policy(opts.bank, &live, pin.is_some());
            let theirs = tpm.trial_policy(opts.bank, &token.pcrs, pin.is_some())?;
            if ours != theirs {
                return Err(BootError::Verify(
                    "policy computation disagrees with the TPM".into(),
                ));
            }
            Verification::PolicyOnly
        }
        Err(e) => return Err(BootError::Verify(e.to_string())),
    };
    Ok((sealed, token, verification))
}

/// Add the TPM keyslot and token; roll the keyslot back if the token cannot be
/// written, so no orphan slot is left.
fn write_enrolment(
    vault: &mut Vault,
    vk: &SecretBytes,
    sealed: &Sealed,
    mut token: Tpm2Token,
) -> Result<(u32, u32), BootError> {
    let passphrase = base64_encode_secret(sealed.secret.as_bytes());
    let keyslot = vault.add_keyslot(vk, passphrase.as_bytes(), true)?;
    token.keyslots = vec![keyslot];
    match vault.add_token(&token.to_json()) {
        Ok(id) => Ok((keyslot, id)),
        Err(e) => {
            let _ = vault.destroy_keyslot(keyslot);
            Err(e.into())
        }
    }
}

/// A recovery key as systemd formats them: 32 random bytes in modhex, dashed into
/// eight groups of eight (easy to type, no ambiguous letters). An RNG failure is
/// an error: a key made of the zeroed buffer would be the same on every machine.
pub fn make_recovery_key() -> Result<SecretBytes, BootError> {
    make_recovery_key_with(crate::secret::fill_random)
}

fn make_recovery_key_with(
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> Result<SecretBytes, BootError> {
    const MODHEX: &[u8; 16] = b"cbdefghijklnrtuv";
    let mut raw = SecretBytes::zeroed(32);
    fill(raw.as_mut_bytes()).map_err(BootError::Random)?;
    let mut out = SecretBytes::with_capacity(71);
    for (i, b) in raw.as_bytes().iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(b'-');
        }
        out.push(MODHEX[(b >> 4) as usize]);
        out.push(MODHEX[(b & 15) as usize]);
    }
    Ok(out)
}

fn add_recovery_key(vault: &mut Vault, vk: &SecretBytes) -> Result<(SecretBytes, u32), BootError> {
    let key = make_recovery_key()?;
    let slot = vault.add_keyslot(vk, key.as_bytes(), true)?;
    let token = serde_json::json!({"type": "systemd-recovery", "keyslots": [slot.to_string()]});
    if let Err(e) = vault.add_token(&token) {
        let _ = vault.destroy_keyslot(slot);
        return Err(e.into());
    }
    Ok((key, slot))
}

/// Enrol the TPM: needs the existing passphrase, never removes it.
pub fn enroll(
    opts: &EnrollOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<EnrollReport, BootError> {
    let mut vault = Vault::open(&opts.device)?;
    if let Some((id, t)) = vault.tpm2_tokens().into_iter().next() {
        return Err(match t {
            Ok(_) => BootError::AlreadyEnrolled { token: id },
            Err(e) => BootError::BrokenToken {
                token: id,
                why: e.to_string(),
            },
        });
    }
    let vk = volume_key_via_passphrase(&mut vault, &opts.name, opts.tries, prompter, events)?;
    let pin = if opts.pin {
        Some(ask_new_pin(prompter, &opts.name)?)
    } else {
        None
    };
    let mut tpm = Tpm::open(&opts.tpm.tcti, opts.tpm.timeout)?;
    let (sealed, token, verification) = seal_and_verify(&mut tpm, opts, pin.as_ref())?;
    let pcrs = token.pcrs.clone();
    let (keyslot, token_id) = write_enrolment(&mut vault, &vk, &sealed, token)?;
    let (recovery_key, recovery_keyslot) = if opts.recovery_key {
        let (k, s) = add_recovery_key(&mut vault, &vk)?;
        (Some(k), Some(s))
    } else {
        (None, None)
    };
    events.event(
        "enrolled",
        &[("device", &opts.device), ("keyslot", &keyslot.to_string())],
    );
    Ok(EnrollReport {
        keyslot,
        token: token_id,
        pcrs,
        verification,
        recovery_key,
        recovery_keyslot,
        removed: Vec::new(),
    })
}

/// Seal to the current PCR values. The new token and keyslot are written first;
/// only then are the old ones removed, so a crash in between leaves two working
/// enrolments, never none.
pub fn reseal(
    opts: &EnrollOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<EnrollReport, BootError> {
    let mut vault = Vault::open(&opts.device)?;
    let old: Vec<(u32, Tpm2Token)> = vault
        .tpm2_tokens()
        .into_iter()
        .filter_map(|(id, t)| t.ok().map(|t| (id, t)))
        .collect();
    if old.is_empty() {
        return Err(BootError::NotEnrolled);
    }
    let mut tpm = Tpm::open(&opts.tpm.tcti, opts.tpm.timeout)?;
    // The old enrolment may still open the vault (reseal from the initrd before the
    // latch); otherwise the passphrase or recovery key is needed.
    let vk = match volume_key_via_tpm(
        &mut vault, &mut tpm, &opts.tpm, &opts.name, opts.tries, prompter, events,
    ) {
        Ok((vk, _)) => vk,
        Err(reason) => {
            prompter.say(&format!("vaultguard: the current enrolment cannot unseal ({reason}); the passphrase or recovery key is needed"));
            volume_key_via_passphrase(&mut vault, &opts.name, opts.tries, prompter, events)?
        }
    };
    let pin = if opts.pin || old.iter().any(|(_, t)| t.pin) {
        Some(ask_new_pin(prompter, &opts.name)?)
    } else {
        None
    };
    let (sealed, token, verification) = seal_and_verify(&mut tpm, opts, pin.as_ref())?;
    let pcrs = token.pcrs.clone();
    let (keyslot, token_id) = write_enrolment(&mut vault, &vk, &sealed, token)?;
    let mut removed = Vec::new();
    for (id, t) in old {
        vault.remove_token(id)?;
        for slot in t.keyslots {
            if slot != keyslot {
                vault.destroy_keyslot(slot)?;
            }
            removed.push((id, slot));
        }
    }
    events.event(
        "resealed",
        &[("device", &opts.device), ("keyslot", &keyslot.to_string())],
    );
    Ok(EnrollReport {
        keyslot,
        token: token_id,
        pcrs,
        verification,
        recovery_key: None,
        recovery_keyslot: None,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_key_is_never_made_from_a_failed_rng() {
        // The kernel RNG failing (e.g. interrupted while it blocks in an early
        // initramfs, and the retry failing too) is an error, not a zero key.
        let e = make_recovery_key_with(|b| {
            crate::secret::fill_random_with(b, |_| Err(std::io::Error::from_raw_os_error(38)))
        })
        .err()
        .expect("a recovery key from a failed RNG");
        assert!(matches!(e, BootError::Random(_)), "{e}");
        assert!(e.to_string().contains("random number generator"), "{e}");
        // An interruption is retried: the key is made of the bytes that came.
        let mut first = true;
        let k = make_recovery_key_with(|b| {
            crate::secret::fill_random_with(b, |b| {
                if std::mem::take(&mut first) {
                    return Err(std::io::Error::from_raw_os_error(4)); // EINTR
                }
                b.fill(0xff);
                Ok(b.len())
            })
        })
        .unwrap();
        assert_eq!(
            k.as_bytes(),
            "vvvvvvvv-".repeat(8).trim_end_matches('-').as_bytes()
        );
    }

    #[test]
    fn recovery_key_shape() {
        let k = make_recovery_key().unwrap();
        let s = std::str::from_utf8(k.as_bytes()).unwrap();
        let groups: Vec<&str> = s.split('-').collect();
        assert_eq!(groups.len(), 8);
        assert!(groups.iter().all(|g| g.len() == 8));
        assert!(s
            .bytes()
            .all(|b| b == b'-' || b"cbdefghijklnrtuv".contains(&b)));
        assert_ne!(k.as_bytes(), make_recovery_key().unwrap().as_bytes());
    }
}
