//! Boot-path flows that tie the edges together: unlock (TPM first, passphrase
//! fallback, then the phase-PCR latch), enroll, reseal, recovery keys.
//!
//! The order of steps is the security argument, so it lives here in one place:
//! the volume key is obtained once, the mapping is created, and the phase PCR is
//! extended before anything else runs; if the extend fails the mapping is closed
//! again (fail closed). Enrolment and reseal write the new keyslot and token before
//! touching anything old, and never remove the passphrase. Every outcome is
//! reported through [`Events`]; no event carries a secret.
//!
//! The header is not trusted to say which keyslot is whose: anyone who can write
//! it offline can make a TPM token list the passphrase's keyslot. A keyslot is
//! destroyed only when it is proven to be the one being replaced (see
//! [`keep_reasons`]), and a failed write is rolled back from the header as it is
//! on disk, verified, never from libcryptsetup's memory of what it meant to write.

pub mod commands;
pub mod explain;
pub mod net;
pub mod options;
pub mod self_heal;

use crate::encoding::base64_encode_secret;
use crate::log::Priority;
use crate::luks::token::{self, PcrBank, Tpm2Token};
use crate::luks::{self, ActivateFlags, LuksError, Vault};
use crate::prompt::{Ask, PromptError, Prompter, SecretKind};
use crate::secret::SecretBytes;
use crate::tpm::policy::{self, Bank};
use crate::tpm::{PrimaryAlg, SealRequest, Sealed, SealedObject, Tpm, TpmError};
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
    /// `token-only`: the TPM did not open the volume and nothing else may be tried.
    TokenOnly(TpmRefusal),
    /// `unlock --test`: the TPM would not open the volume (and nothing else was
    /// given to try).
    TestRefused(TpmRefusal),
    /// A crypttab option vaultguard will not run with.
    Option(options::OptionError),
    /// Enrolment's own check of what it sealed failed; nothing was written.
    Verify(VerifyFailure),
    /// An argument or configuration value enrolment cannot use.
    BadArgument(ArgError),
    /// No vault device is configured or given.
    NoDevice,
    /// The key file could not be read.
    KeyFile {
        path: PathBuf,
        err: std::io::Error,
    },
    /// The key file is larger than a key file can be (8 MiB, as cryptsetup).
    KeyFileTooLarge {
        path: PathBuf,
    },
    /// The kernel's random number generator failed.
    Random(std::io::Error),
    /// A header write failed part-way through an enrolment; what it had written
    /// was taken back, except `left` (what could not be, and how to remove it).
    PartlyWritten {
        error: Box<BootError>,
        left: Option<String>,
    },
    /// A clevis (Tang/sss) enrolment step failed.
    Clevis(crate::clevis::ClevisError),
    /// `reseal` after a passphrase unlock: the header's signed policy (public
    /// key, revocation counter) is not proven to be the sealed object's, so it
    /// is not carried into the new enrolment.
    UnprovenSignedPolicy {
        token: u32,
        why: String,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Luks(e) => e.fmt(f),
            BootError::Clevis(e) => write!(f, "clevis: {e}"),
            BootError::Tpm(e) => e.fmt(f),
            BootError::Prompt(e) => e.fmt(f),
            BootError::TriesExhausted { what, tries } => write!(f, "{what}: all {tries} tries failed"),
            BootError::AlreadyEnrolled { token } => write!(
                f,
                "a TPM2 enrolment already exists (token {token}); use `vaultguard reseal` to replace it"
            ),
            BootError::UnprovenSignedPolicy { token, why } => write!(
                f,
                "LUKS2 token {token}'s signed policy (tpm2_pubkey, tpm2_pubkey_pcrs, \
                 vaultguard_revocation_counter) is not proven to be the one its sealed object \
                 was made for ({why}); nothing was resealed. If the header was not edited \
                 (or the token is systemd-cryptenroll's, which has no binding), remove it \
                 (`cryptsetup token remove --token-id {token}`) and enrol again with \
                 `vaultguard enroll --public-key FILE --public-key-pcrs …`"
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
            BootError::TokenOnly(why) => write!(
                f,
                "the TPM2 token did not open the volume ({why}) and `token-only` allows nothing else"
            ),
            BootError::Option(e) => e.fmt(f),
            BootError::TestRefused(why) => write!(
                f,
                "the TPM2 token would not unlock the volume: {why} (test only, nothing was activated)"
            ),
            BootError::Verify(why) => write!(f, "enrolment check failed, nothing was written: {why}"),
            BootError::BadArgument(why) => why.fmt(f),
            BootError::NoDevice => write!(
                f,
                "no vault device: set vault.device, rd.vaultguard.device= or --device"
            ),
            BootError::KeyFile { path, err } => write!(f, "key file {}: {err}", path.display()),
            BootError::KeyFileTooLarge { path } => {
                write!(f, "key file {} is larger than 8 MiB", path.display())
            }
            BootError::Random(e) => write!(
                f,
                "the kernel random number generator failed (getrandom: {e}); no key was made"
            ),
            BootError::PartlyWritten { error, left: None } => write!(
                f,
                "{error}; what this enrolment had written was removed again, the header is as it was"
            ),
            BootError::PartlyWritten {
                error,
                left: Some(left),
            } => write!(f, "{error}; removing what it had written ALSO failed: {left}"),
        }
    }
}

impl std::error::Error for BootError {}

/// How enrolment's check of a fresh seal failed.
#[derive(Debug)]
pub enum VerifyFailure {
    /// The TPM unsealed, but not the secret that was sealed.
    DifferentSecret,
    /// This crate's policy arithmetic and the TPM's trial session disagree.
    PolicyDisagrees,
    /// The TPM refused the fresh object's policy for another reason.
    Refused(TpmError),
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyFailure::DifferentSecret => f.write_str("the TPM returned a different secret"),
            VerifyFailure::PolicyDisagrees => {
                f.write_str("policy computation disagrees with the TPM")
            }
            VerifyFailure::Refused(e) => e.fmt(f),
        }
    }
}

/// An enrolment argument that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    /// `--pcrs` does not parse (the parser's message).
    PcrList(String),
    /// The phase PCR was listed: it is bound to zeros automatically.
    PhasePcrListed {
        pcr: u32,
    },
    UnknownBank {
        name: String,
    },
    /// `--public-key` is not a usable policy key (the key parser's line).
    PublicKey(String),
    /// `--revocation-counter` names the audit anchor's NV index.
    CounterIsAuditIndex {
        handle: u32,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgError::PcrList(why) => write!(f, "--pcrs: {why}"),
            ArgError::PhasePcrListed { pcr } => write!(
                f,
                "PCR {pcr} is the phase PCR; it is bound to zeros automatically"
            ),
            ArgError::UnknownBank { name } => write!(f, "unknown PCR bank `{name}`"),
            ArgError::PublicKey(why) => write!(f, "--public-key: {why}"),
            ArgError::CounterIsAuditIndex { handle } => write!(
                f,
                "--revocation-counter {handle:#010x} is the audit log's TPM anchor \
                 (audit.tpm_nv_index); choose another index (suggested: {:#010x})",
                crate::tpm::counter::DEFAULT_REVOCATION_COUNTER
            ),
        }
    }
}

/// Why the TPM did not give the volume key (the passphrase is asked instead).
#[derive(Debug)]
pub enum TpmRefusal {
    /// TPM use is switched off for this unlock.
    Disabled,
    NoEnrolment,
    /// The TPM could not be opened.
    Unavailable(TpmError),
    /// The token does not parse.
    TokenUnusable {
        token: u32,
        err: crate::luks::token::TokenError,
    },
    /// The token's record contradicts itself or is malformed (see
    /// [`crate::tpm::check_sealed`]).
    TokenAltered {
        token: u32,
        err: TpmError,
    },
    /// The TPM refused (PCRs, SRK, PIN, lockout, ...).
    Tpm(TpmError),
    /// The TPM gave a secret, and it opens none of the token's keyslots.
    SecretOpensNoKeyslot {
        token: u32,
        slot: u32,
    },
    /// Trying the TPM's secret on a keyslot failed for another reason.
    Keyslot {
        token: u32,
        slot: u32,
        err: LuksError,
    },
    /// Asking once more could push the TPM into lockout.
    PinBudget {
        left: u32,
    },
    /// Every PIN try was wrong.
    PinTries {
        tries: u32,
    },
    /// The PIN prompt failed.
    Prompt(PromptError),
}

impl fmt::Display for TpmRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TpmRefusal::Disabled => f.write_str("TPM use disabled"),
            TpmRefusal::NoEnrolment => f.write_str("no TPM2 enrolment in the LUKS header"),
            TpmRefusal::Unavailable(e) | TpmRefusal::Tpm(e) => e.fmt(f),
            TpmRefusal::TokenUnusable { token, err } => {
                write!(f, "token {token} is unusable: {err}")
            }
            TpmRefusal::TokenAltered { token, err } => write!(f, "token {token}: {err}"),
            TpmRefusal::SecretOpensNoKeyslot { token, slot } => write!(
                f,
                "the TPM secret of token {token} does not open keyslot {slot}"
            ),
            TpmRefusal::Keyslot { token, slot, err } => {
                write!(f, "the TPM secret of token {token}, keyslot {slot}: {err}")
            }
            TpmRefusal::PinBudget { left } => write!(
                f,
                "the TPM allows only {left} more wrong PIN(s) before it locks out; not risking it"
            ),
            TpmRefusal::PinTries { tries } => write!(f, "wrong TPM PIN {tries} times"),
            TpmRefusal::Prompt(e) => e.fmt(f),
        }
    }
}

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
    /// The signed-policy signature file (config `tpm.signature`, crypttab
    /// `tpm2-signature=`); `None`: where systemd-cryptsetup looks.
    pub signature: Option<PathBuf>,
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
    /// What crypttab's options change (the default: none given).
    pub crypttab: CrypttabUnlock,
}

/// What crypttab's options change in an unlock, beyond the activation flags (see
/// [`options`]); the default is systemd-cryptsetup's behaviour without options.
#[derive(Debug, Clone, Default)]
pub struct CrypttabUnlock {
    /// `token-only`: no key file, no prompt.
    pub token_only: bool,
    /// `keyfile-offset=`, `keyfile-size=`.
    pub keyfile_offset: u64,
    pub keyfile_size: Option<u64>,
    /// `header=`: a detached LUKS2 header.
    pub header: Option<PathBuf>,
    /// `timeout=`, `password-echo=`, `password-cache=`.
    pub prompt: options::PromptTuning,
    /// clevis tokens (Tang, sss): the network wait and trusted Tang keys.
    pub network: NetworkUnlock,
    /// `tpm2-measure-pcr=no`: do not extend the phase PCR after this unlock. The
    /// enrolment still binds it to zeros, so a refusal is still explained with it
    /// (a phase PCR another volume's unlock already extended is not "run reseal").
    pub no_measure: bool,
}

/// How long clevis pins may take and which Tang keys are trusted besides the
/// tokens' own (`clevis.deadline`, `clevis.tang_thumbprints`).
#[derive(Debug, Clone)]
pub struct NetworkUnlock {
    pub deadline: Duration,
    pub tang_thumbprints: Vec<String>,
}

impl Default for NetworkUnlock {
    fn default() -> Self {
        NetworkUnlock {
            deadline: Duration::from_secs(crate::clevis::DEFAULT_DEADLINE_SECS),
            tang_thumbprints: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Tpm2,
    Tpm2Pin,
    KeyFile,
    Passphrase,
    /// A clevis token (Tang, sss, tpm2 pins).
    Clevis,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Tpm2 => "tpm2_unseal",
            Method::Tpm2Pin => "tpm2_pin",
            Method::KeyFile => "keyfile",
            Method::Passphrase => "passphrase",
            Method::Clevis => "clevis",
        }
    }
}

#[derive(Debug)]
pub struct Unlocked {
    pub method: Method,
    /// How long the TPM path took when it opened the vault (seconds).
    pub tpm_seconds: Option<f64>,
    /// Why the TPM was not used, when it was not.
    pub fallback_reason: Option<TpmRefusal>,
    /// Whether the phase PCR was extended.
    pub latched: bool,
    pub already_active: bool,
    /// See [`Acquired::refusal_explained`].
    pub refusal_explained: Vec<String>,
}

/// Which secrets have been tried on which keyslots in this operation: a keyslot's
/// KDF runs at most once per secret, however often the header lists it (in one
/// token or in copies of it).
#[derive(Default)]
struct Trials {
    done: Vec<(u32, SecretBytes, bool)>,
}

impl Trials {
    /// Try `passphrase` on `slot`: the volume key if it opens it (first try
    /// only), and whether it opens it.
    fn try_slot(
        &mut self,
        vault: &mut Vault,
        slot: u32,
        passphrase: &SecretBytes,
    ) -> (Option<SecretBytes>, Result<bool, LuksError>) {
        if let Some((_, _, opened)) = self
            .done
            .iter()
            .find(|(s, p, _)| *s == slot && p.ct_eq(passphrase.as_bytes()))
        {
            return (None, Ok(*opened));
        }
        match vault.volume_key(Some(slot), passphrase.as_bytes()) {
            Ok((vk, _)) => {
                self.done.push((slot, passphrase.clone(), true));
                (Some(vk), Ok(true))
            }
            Err(e) if e.is_wrong_passphrase() => {
                self.done.push((slot, passphrase.clone(), false));
                (None, Ok(false))
            }
            Err(e) => (None, Err(e)),
        }
    }

    /// Whether `passphrase` was found to open `slot` in this operation.
    fn opened(&self, slot: u32, passphrase: &SecretBytes) -> bool {
        self.done
            .iter()
            .any(|(s, p, ok)| *s == slot && *ok && p.ct_eq(passphrase.as_bytes()))
    }
}

/// What a TPM2 token opened: the volume key, through which token and keyslot,
/// and that token's unsealed secret (as the keyslot passphrase).
struct TpmOpened {
    vk: SecretBytes,
    method: Method,
    token: u32,
    slot: u32,
    passphrase: SecretBytes,
}

/// Fetch the volume key through a usable TPM2 token, or say in one line why not.
#[allow(clippy::too_many_arguments)]
fn volume_key_via_tpm(
    vault: &mut Vault,
    tpm: &mut Tpm,
    opts: &TpmOptions,
    name: &str,
    tries: u32,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
    trials: &mut Trials,
) -> Result<TpmOpened, TpmRefusal> {
    let tokens = vault.tpm2_tokens();
    if tokens.is_empty() {
        return Err(TpmRefusal::NoEnrolment);
    }
    let device = vault.device().to_string();
    let mut reason = TpmRefusal::NoEnrolment;
    for (id, parsed) in tokens {
        let token = match parsed {
            Ok(t) => t,
            Err(err) => {
                reason = TpmRefusal::TokenUnusable { token: id, err };
                continue;
            }
        };
        let object = match sealed_object_with(&token, opts.signature.as_deref()) {
            Ok(o) => o,
            Err(err) => {
                reason = TpmRefusal::TokenUnusable { token: id, err };
                continue;
            }
        };
        let secret = if token.pin {
            // Nobody is asked for a PIN the TPM would refuse anyway.
            if let Some(why) = refusal(tpm, id, &object, opts.phase_pcr) {
                reason = why;
                continue;
            }
            match unseal_with_pin(tpm, &object, name, &device, tries, prompter, events) {
                Ok(s) => s,
                Err(why) => {
                    reason = why;
                    continue;
                }
            }
        } else {
            // Just try: checking the PCRs first would cost every boot a PCR read;
            // they are read only to explain a refusal.
            match tpm.unseal(&object, None) {
                Ok(s) => s,
                Err(e) => {
                    reason =
                        refusal(tpm, id, &object, opts.phase_pcr).unwrap_or(TpmRefusal::Tpm(e));
                    continue;
                }
            }
        };
        let passphrase = base64_encode_secret(secret.as_bytes());
        for &slot in &token.keyslots {
            match trials.try_slot(vault, slot, &passphrase) {
                (Some(vk), _) => {
                    return Ok(TpmOpened {
                        vk,
                        method: if token.pin {
                            Method::Tpm2Pin
                        } else {
                            Method::Tpm2
                        },
                        token: id,
                        slot,
                        passphrase,
                    })
                }
                (None, Ok(_)) => reason = TpmRefusal::SecretOpensNoKeyslot { token: id, slot },
                (None, Err(err)) => {
                    reason = TpmRefusal::Keyslot {
                        token: id,
                        slot,
                        err,
                    }
                }
            }
        }
    }
    Err(reason)
}

/// Why the TPM refuses token `id` now, where that can be told without trying it:
/// a token that contradicts itself (altered or damaged) first, in software; then
/// a cleared or replaced TPM (missing or foreign SRK), before the PCRs (a latched
/// phase PCR would otherwise hide it); then the PCRs that changed.
fn refusal(
    tpm: &mut Tpm,
    id: u32,
    object: &SealedObject,
    phase_pcr: Option<u32>,
) -> Option<TpmRefusal> {
    if let Err(err) = crate::tpm::check_sealed(object) {
        return Some(TpmRefusal::TokenAltered { token: id, err });
    }
    let pcrs = tpm.check_policy(object, phase_pcr).err()?;
    Some(TpmRefusal::Tpm(match tpm.check_parent(object) {
        Err(srk) => srk,
        Ok(()) => pcrs,
    }))
}

/// PIN prompts, bounded by `tries` and by the TPM's own dictionary-attack budget:
/// we stop while the TPM still has a try in reserve, so a mistyped PIN can never
/// push it into lockout (the passphrase is asked instead).
fn unseal_with_pin(
    tpm: &mut Tpm,
    object: &SealedObject,
    name: &str,
    device: &str,
    tries: u32,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<SecretBytes, TpmRefusal> {
    let device = device.to_string();
    // PINs are never cached (a stale one would spend a TPM try): only the credential.
    let mut credential = prompter
        .unattended(&Ask::new(SecretKind::Pin, "", ""))
        .into_iter()
        .next();
    for _ in 0..tries {
        if tpm.in_lockout().unwrap_or(false) {
            return Err(TpmRefusal::Tpm(TpmError::Lockout {
                recovery_seconds: None,
            }));
        }
        let left = tpm.da_tries_left().map_err(TpmRefusal::Tpm)?;
        if left <= 1 {
            return Err(TpmRefusal::PinBudget { left });
        }
        // The TPM's own count, so the operator knows what a wrong PIN costs.
        // No Id, as systemd asks for a PIN: agents that answer `cryptsetup:<device>`
        // with a passphrase (clevis-luks-askpass) must not spend a TPM try.
        let req = Ask::new(
            SecretKind::Pin,
            "",
            format!("TPM2 PIN for {name} ({device}, {left} TPM tries left): "),
        );
        // systemd's credential `cryptsetup.tpm2-pin` first, on the first round only:
        // a wrong one is not offered to the TPM again.
        let pin = match credential.take() {
            Some(pin) => pin,
            None => prompter.ask(&req).map_err(TpmRefusal::Prompt)?,
        };
        match tpm.unseal(object, Some(pin.as_bytes())) {
            Ok(s) => return Ok(s),
            Err(TpmError::WrongPin { tries_left }) => {
                events.event("tpm_pin_wrong", &[("name", name)]);
                // The TPM's own count when the response did not carry it.
                let tries_left = tries_left.or_else(|| tpm.da_tries_left().ok());
                let msg = TpmError::WrongPin { tries_left }.to_string();
                prompter.say_at(Priority::Warning, &format!("vaultguard: {msg}"));
            }
            Err(e) => return Err(TpmRefusal::Tpm(e)),
        }
    }
    Err(TpmRefusal::PinTries { tries })
}

/// Ask for the current passphrase (or recovery key) an enrolment needs until one
/// opens a keyslot.
pub fn volume_key_via_passphrase(
    vault: &mut Vault,
    name: &str,
    tries: u32,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<SecretBytes, BootError> {
    passphrase_and_slot(
        vault,
        name,
        tries,
        SecretKind::CurrentPassphrase,
        prompter,
        events,
    )
    .map(|(vk, _)| vk)
}

/// The volume key and the keyslot the passphrase opened. `kind`: `Passphrase`
/// to unlock, `CurrentPassphrase` to enrol or reseal.
fn passphrase_and_slot(
    vault: &mut Vault,
    name: &str,
    tries: u32,
    kind: SecretKind,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<(SecretBytes, u32), BootError> {
    let device = vault.device().to_string();
    // As systemd asks: Id names the device, the answer is cached in a user key so
    // the next volume with the same passphrase opens without a prompt; the
    // unlock's key is `cryptsetup` (systemd-cryptsetup), an enrolment's
    // `cryptenroll` (systemd-cryptenroll), so a reseal right after a passphrase
    // boot still asks for the passphrase rather than reusing the boot's.
    let mut req = Ask::new(
        kind,
        format!("cryptsetup:{device}"),
        format!("Passphrase for {name} ({device}): "),
    );
    req.keyname = Some(
        match kind {
            SecretKind::CurrentPassphrase => "cryptenroll",
            _ => "cryptsetup",
        }
        .into(),
    );
    req.accept_cached = true;
    // The credential `cryptsetup.passphrase` and the cache first; a wrong one is
    // no error and costs no try: the prompt follows.
    for pass in prompter.unattended(&req) {
        match vault.volume_key(None, pass.as_bytes()) {
            Ok(opened) => return Ok(opened),
            Err(e) if e.is_wrong_passphrase() => {}
            Err(e) => return Err(e.into()),
        }
    }
    // An agent must not answer from its cache what just failed from ours.
    req.accept_cached = false;
    for attempt in 1..=tries {
        let pass = prompter.ask(&req)?;
        match vault.volume_key(None, pass.as_bytes()) {
            Ok(opened) => {
                prompter.remember(&req, &pass);
                return Ok(opened);
            }
            Err(e) if e.is_wrong_passphrase() => {
                events.event("passphrase_wrong", &[("name", name)]);
                prompter.say_at(
                    Priority::Warning,
                    &match tries.checked_sub(attempt) {
                        // tries=0 (unlimited) arrives as u32::MAX: no count to give.
                        Some(left) if tries != u32::MAX => {
                            format!("vaultguard: wrong passphrase ({left} tries left)")
                        }
                        _ => "vaultguard: wrong passphrase".to_string(),
                    },
                );
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
    read_keyfile_part(path, 0, None)
}

/// The key as crypttab's `keyfile-offset=` and `keyfile-size=` cut it from the
/// file: `size` bytes (or all) from `offset` on. A file shorter than that is an
/// error, as in cryptsetup, not a shorter key.
pub fn read_keyfile_part(
    path: &std::path::Path,
    offset: u64,
    size: Option<u64>,
) -> Result<SecretBytes, BootError> {
    let whole = read_keyfile_whole(path)?;
    let len = whole.as_bytes().len() as u64;
    let end = match size {
        Some(n) => offset.checked_add(n),
        None => Some(len),
    };
    match end {
        Some(end) if offset <= end && end <= len => Ok(SecretBytes::from_slice(
            &whole.as_bytes()[offset as usize..end as usize],
        )),
        _ => Err(BootError::KeyFile {
            path: path.to_path_buf(),
            err: std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes, shorter than keyfile-offset={offset}{}",
                    size.map(|n| format!(" plus keyfile-size={n}"))
                        .unwrap_or_default()
                ),
            ),
        }),
    }
}

fn read_keyfile_whole(path: &std::path::Path) -> Result<SecretBytes, BootError> {
    use std::io::Read;
    let key_file = |err| BootError::KeyFile {
        path: path.to_path_buf(),
        err,
    };
    let mut f = std::fs::File::open(path).map_err(key_file)?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > 8 << 20 {
        return Err(BootError::KeyFileTooLarge {
            path: path.to_path_buf(),
        });
    }
    let mut buf = SecretBytes::zeroed(len as usize);
    f.read_exact(buf.as_mut_bytes()).map_err(key_file)?;
    Ok(buf)
}

/// A volume key and how it was obtained. `tpm` is kept open for the latch.
pub struct Acquired {
    pub vk: SecretBytes,
    pub method: Method,
    /// The keyslot that opened (what `unlock --test` reports).
    pub slot: u32,
    pub fallback_reason: Option<TpmRefusal>,
    pub tpm: Option<Tpm>,
    /// How long the TPM path took when it opened the vault (seconds).
    pub tpm_seconds: Option<f64>,
    /// The event-log records that changed since enrolment, when the TPM refused
    /// because PCRs changed (one line each).
    pub refusal_explained: Vec<String>,
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
    // crypttab's timeout=/password-echo=/password-cache= reach every prompt.
    let mut tuned = options::Tuned::new(prompter, opts.crypttab.prompt);
    let prompter: &mut dyn Prompter = &mut tuned;
    let mut tpm = None;
    let mut tpm_started = None;
    let has_tpm_token = opts.tpm.is_some() && !vault.tpm2_tokens().is_empty();
    // Clevis (Tang) tokens start now, beside the TPM token, not after it.
    let early = if has_tpm_token {
        clevis_start_early(vault, opts)
    } else {
        None
    };
    let clevis_opened = || {
        early
            .as_ref()
            .is_some_and(|e| e.opened.load(std::sync::atomic::Ordering::SeqCst))
    };
    let tpm_result = match &opts.tpm {
        None => Err(TpmRefusal::Disabled),
        // Nothing to unseal: do not wait for the TPM (the latch opens it later).
        Some(_) if !has_tpm_token => Err(TpmRefusal::NoEnrolment),
        Some(t) => match Tpm::open_unless(&t.tcti, t.timeout, &clevis_opened) {
            Ok(mut handle) => {
                // From the TPM device open (its wait, if it only now appeared,
                // is not counted) to the keyslot opened with the unsealed key.
                tpm_started = Some(std::time::Instant::now());
                let r = volume_key_via_tpm(
                    vault,
                    &mut handle,
                    t,
                    name,
                    opts.tries,
                    prompter,
                    events,
                    &mut Trials::default(),
                )
                .map(|o| (o.vk, o.method, o.slot));
                tpm = Some(handle);
                r
            }
            Err(e) => Err(TpmRefusal::Unavailable(e)),
        },
    };
    let reason = match tpm_result {
        Ok((vk, method, slot)) => {
            return Ok(Acquired {
                vk,
                method,
                slot,
                fallback_reason: None,
                tpm,
                tpm_seconds: tpm_started.map(|t| t.elapsed().as_secs_f64()),
                refusal_explained: Vec::new(),
            })
        }
        Err(reason) => reason,
    };
    // A clevis token that opened the volume first is no failure of the boot.
    let prio = if clevis_opened() {
        Priority::Info
    } else {
        Priority::Warning
    };
    prompter.say_at(
        prio,
        &format!("vaultguard: TPM unlock of {name} not possible: {reason}"),
    );
    // Which event-log records differ from enrolment, one line each.
    let explained = explain::explain(vault, tpm.as_mut(), &reason);
    for line in &explained {
        prompter.say_at(Priority::Warning, &format!("vaultguard:   {line}"));
    }
    let diff = explained.join("\n");
    let mut fields = vec![("name", name.to_string()), ("reason", reason.to_string())];
    if !explained.is_empty() {
        fields.push(("eventlog_diff", diff));
    }
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    events.event("tpm_refused", &fields);
    let via_clevis = match early {
        Some(e) => clevis_finish_early(e, opts, prompter, events),
        None => volume_key_via_clevis(vault, opts, prompter, events),
    };
    if let Some((vk, slot)) = via_clevis {
        return Ok(Acquired {
            vk,
            method: Method::Clevis,
            slot,
            fallback_reason: Some(reason),
            tpm,
            tpm_seconds: None,
            refusal_explained: explained,
        });
    }
    if opts.crypttab.token_only {
        return Err(BootError::TokenOnly(reason));
    }
    if let Some(path) = &opts.keyfile {
        let key = read_keyfile_part(
            path,
            opts.crypttab.keyfile_offset,
            opts.crypttab.keyfile_size,
        )?;
        match vault.volume_key(None, key.as_bytes()) {
            Ok((vk, slot)) => {
                return Ok(Acquired {
                    vk,
                    method: Method::KeyFile,
                    slot,
                    fallback_reason: Some(reason),
                    tpm,
                    tpm_seconds: None,
                    refusal_explained: explained,
                })
            }
            Err(e) if e.is_wrong_passphrase() => {
                prompter.say_at(
                    Priority::Warning,
                    &format!("vaultguard: key file {} opens no keyslot", path.display()),
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    match passphrase_and_slot(
        vault,
        name,
        opts.tries,
        SecretKind::Passphrase,
        prompter,
        events,
    ) {
        Ok((vk, slot)) => Ok(Acquired {
            vk,
            method: Method::Passphrase,
            slot,
            fallback_reason: Some(reason),
            tpm,
            tpm_seconds: None,
            refusal_explained: explained,
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

/// clevis tokens: every pin of every token at once, until one opens a keyslot or
/// `clevis.deadline` passes; one line per pin says what happened (shown before
/// any passphrase prompt). `None` when there are no clevis tokens or none opened.
fn volume_key_via_clevis(
    vault: &mut Vault,
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Option<(SecretBytes, u32)> {
    let (notes, plan) = clevis_plan(vault, opts);
    for n in &notes {
        prompter.say_at(Priority::Warning, n);
    }
    let mut plan = plan?;
    // The network may still be coming up (a lease a moment after vaultguard starts):
    // wait for a route within the same deadline, so the total stays bounded.
    if let Some(why) = net::wait_before_clevis(&plan.tokens, plan.eopts.deadline) {
        plan.notes.push(format!("vaultguard: {}: {why}", opts.name));
    }
    let out = crate::clevis::open_tokens(plan.tokens, &plan.eopts, |tok, pass| {
        clevis_try_keyslots(vault, tok, pass)
    });
    clevis_report(&plan.notes, out, opts, prompter, events)
}

/// The volume's clevis tokens, parsed, and the engine's options for them.
struct ClevisPlan {
    tokens: Vec<crate::clevis::ClevisToken>,
    eopts: crate::clevis::EngineOptions,
    /// Lines for the operator from the engine's start (a route that never came).
    notes: Vec<String>,
}

/// Read and parse the clevis tokens (warnings for those that cannot be used) and
/// set the engine up: deadline from now, trusted thumbprints, the per-pin route
/// wait and the TPM for tpm2 pins. `None` when there is no usable token.
fn clevis_plan(vault: &mut Vault, opts: &UnlockOptions) -> (Vec<String>, Option<ClevisPlan>) {
    use crate::clevis::{self, ClevisToken};
    let name = opts.name.as_str();
    let mut notes = Vec::new();
    let raw = match vault.tokens_of_type(clevis::TOKEN_TYPE) {
        Ok(r) => r,
        Err(e) => {
            notes.push(format!(
                "vaultguard: cannot read the clevis tokens of {name}: {e}"
            ));
            return (notes, None);
        }
    };
    let mut tokens = Vec::new();
    for (id, v) in raw {
        match ClevisToken::from_json(id, &v) {
            Ok(t) => tokens.push(t),
            Err(e) => notes.push(format!(
                "vaultguard: clevis token {id} of {name} cannot be used: {e}"
            )),
        }
    }
    if tokens.is_empty() {
        return (notes, None);
    }
    let mut eopts = clevis::EngineOptions::new(opts.crypttab.network.deadline);
    eopts.trusted_thumbprints = opts.crypttab.network.tang_thumbprints.clone();
    // With a tpm2 pin among them the engine starts at once (the TPM must not wait
    // for the network): each tang pin then waits for its own route on its thread.
    eopts.route_wait = Some(std::sync::Arc::new(|url: &str, deadline| {
        net::wait_for_urls(&[url], deadline)
            .map(drop)
            .map_err(|e| e.to_string())
    }));
    if let Some(t) = opts.tpm.clone() {
        eopts.tpm = Some(std::sync::Arc::new(move |jwe: &clevis::jwe::Jwe| {
            clevis_tpm2_pin(&t, jwe)
        }));
    }
    let plan = ClevisPlan {
        tokens,
        eopts,
        notes: Vec::new(),
    };
    (notes, Some(plan))
}

/// The keyslots a clevis token names, tried with the passphrase its pins recovered.
fn clevis_try_keyslots(
    vault: &mut Vault,
    tok: &crate::clevis::ClevisToken,
    pass: &SecretBytes,
) -> Result<Option<(SecretBytes, u32)>, String> {
    for &slot in &tok.keyslots {
        match vault.volume_key(Some(slot), pass.as_bytes()) {
            Ok(got) => return Ok(Some(got)),
            Err(e) if e.is_wrong_passphrase() => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(None)
}

/// The clevis engine, started before the systemd-tpm2 token is tried and run beside
/// it: every token at once (issue 15), so a Tang answer does not wait for the TPM
/// (nor for a TPM device that never appears). On its own thread with its own
/// libcryptsetup context; `opened` is set as soon as a token opened a keyslot.
struct EarlyClevis {
    notes: Vec<String>,
    opened: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<ClevisRun>,
}

type ClevisRun = Result<(Vec<String>, crate::clevis::Outcome<(SecretBytes, u32)>), String>;

/// Start the engine early when the volume has clevis tokens without a tpm2 pin
/// (those share the TPM with the systemd-tpm2 token and run after it, as before).
fn clevis_start_early(vault: &mut Vault, opts: &UnlockOptions) -> Option<EarlyClevis> {
    let (notes, plan) = clevis_plan(vault, opts);
    let mut plan = plan?;
    if net::pin_needs(&plan.tokens).has_tpm2 {
        return None;
    }
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = opened.clone();
    let device = opts.device.clone();
    let header = opts.crypttab.header.clone();
    let name = opts.name.clone();
    let handle = std::thread::spawn(move || {
        let mut own = Vault::open_with_header(&device, header.as_deref())
            .map_err(|e| format!("cannot open {device} for the clevis tokens: {e}"))?;
        if let Some(why) = net::wait_before_clevis(&plan.tokens, plan.eopts.deadline) {
            plan.notes.push(format!("vaultguard: {name}: {why}"));
        }
        let out = crate::clevis::open_tokens(plan.tokens, &plan.eopts, |tok, pass| {
            let r = clevis_try_keyslots(&mut own, tok, pass);
            if matches!(r, Ok(Some(_))) {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            r
        });
        Ok((plan.notes, out))
    });
    Some(EarlyClevis {
        notes,
        opened,
        handle,
    })
}

/// Wait for the early engine and report it as [`volume_key_via_clevis`] does.
fn clevis_finish_early(
    early: EarlyClevis,
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Option<(SecretBytes, u32)> {
    for n in &early.notes {
        prompter.say_at(Priority::Warning, n);
    }
    match early.handle.join() {
        Ok(Ok((notes, out))) => clevis_report(&notes, out, opts, prompter, events),
        Ok(Err(e)) => {
            prompter.say_at(Priority::Warning, &format!("vaultguard: {e}"));
            None
        }
        Err(_) => {
            prompter.say_at(
                Priority::Error,
                "vaultguard: the clevis engine stopped unexpectedly",
            );
            None
        }
    }
}

/// One line per pin (info when the volume opened, else warnings) and the audit.
fn clevis_report(
    notes: &[String],
    out: crate::clevis::Outcome<(SecretBytes, u32)>,
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Option<(SecretBytes, u32)> {
    let name = opts.name.as_str();
    for n in notes {
        prompter.say_at(Priority::Warning, n);
    }
    for line in &out.lines {
        let prio = if line.outcome.is_ok() || out.opened.is_some() {
            Priority::Info
        } else {
            Priority::Warning
        };
        prompter.say_at(prio, &format!("vaultguard: {name}: {line}"));
    }
    match out.opened {
        Some((id, got)) => {
            events.event(
                "clevis_unlocked",
                &[
                    ("name", name),
                    ("token", &id.to_string()),
                    ("seconds", &format!("{:.3}", out.elapsed.as_secs_f64())),
                ],
            );
            Some(got)
        }
        None => {
            let reasons: Vec<String> = out.lines.iter().map(|l| l.to_string()).collect();
            events.event(
                "clevis_failed",
                &[("name", name), ("pins", &reasons.join("; "))],
            );
            None
        }
    }
}

/// A clevis `tpm2` pin: its sealed object under tpm2-tools' default primary (the
/// template systemd < 254 used, which `tpm` derives for legacy tokens), unsealed
/// through a salted PCR policy session on its own TPM connection.
fn clevis_tpm2_pin(
    t: &TpmOptions,
    jwe: &crate::clevis::jwe::Jwe,
) -> Result<SecretBytes, crate::clevis::ClevisError> {
    use crate::clevis::{tpm2pin, ClevisError};
    let cfg = tpm2pin::Tpm2PinConfig::from_jwe(jwe)?;
    let bank = Bank::from_name(&cfg.pcr_bank)
        .ok_or_else(|| ClevisError::Unsupported(format!("tpm2 pin PCR bank {:?}", cfg.pcr_bank)))?;
    let mut pcrs = cfg.pcr_ids.clone();
    pcrs.sort_unstable();
    pcrs.dedup();
    let sealed = SealedObject {
        blob: cfg.blob,
        pcrs,
        bank,
        primary_alg: if cfg.key == "rsa" {
            PrimaryAlg::Rsa
        } else {
            PrimaryAlg::Ecc
        },
        policy_hash: Vec::new(),
        pin: false,
        salt: None,
        srk: None,
        pcr_values: None,
        signed: None,
    };
    let mut tpm =
        Tpm::open(&t.tcti, t.timeout).map_err(|e| ClevisError::Tpm(format!("TPM: {e}")))?;
    let unsealed = tpm
        .unseal(&sealed, None)
        .map_err(|e| ClevisError::Tpm(format!("TPM refused: {e}")))?;
    tpm2pin::finish(jwe, &unsealed)
}

/// `vaultguard enroll --tang URL …`: what to bind.
#[derive(Debug, Clone)]
pub struct ClevisEnrollOptions {
    pub device: String,
    pub name: String,
    pub tang: Vec<String>,
    /// Signing-key thumbprints the operator vouches for (`--tang-thumbprint`).
    pub thumbprints: Vec<String>,
    /// sss `t` over the pins (`--threshold`); `None`: 1.
    pub threshold: Option<usize>,
    /// Also a clevis `tpm2` pin (`--tpm2`), sealed to these PCRs of `bank`.
    pub tpm2: Option<(TpmOptions, Bank, Vec<u32>)>,
    pub tries: u32,
    /// Per advertisement fetch.
    pub timeout: Duration,
}

/// What `enroll --tang` wrote.
#[derive(Debug)]
pub struct ClevisEnrolled {
    pub keyslot: u32,
    pub token: u32,
    /// "tang" or "sss t=N of M".
    pub pin: String,
}

/// Bind the volume to Tang (one server: a `tang` pin; several or `--threshold`:
/// `sss` over `tang` pins) as a clevis token with its own keyslot. Every server's
/// signing keys must be trusted — by `--tang-thumbprint`, or by `confirm` (the
/// operator's yes after seeing the thumbprints, as `clevis luks bind` asks) —
/// before the existing passphrase is even asked for.
pub fn enroll_clevis(
    opts: &ClevisEnrollOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
    confirm: &mut dyn FnMut(&crate::clevis::enroll::Advertisement) -> bool,
) -> Result<ClevisEnrolled, BootError> {
    use crate::clevis::{enroll as ce, ClevisError};
    if opts.tang.is_empty() && opts.tpm2.is_none() {
        return Err(BootError::Clevis(ClevisError::Malformed(
            "no --tang server (or --tpm2) given".into(),
        )));
    }
    let mut advs = Vec::new();
    for url in &opts.tang {
        let adv = ce::fetch_advertisement(url, std::time::Instant::now() + opts.timeout)
            .map_err(BootError::Clevis)?;
        if !adv.trusted_by(&opts.thumbprints) && !confirm(&adv) {
            return Err(BootError::Clevis(ClevisError::Untrusted(format!(
                "{url}: its signing keys ({}) were not confirmed: check them on the server (`tang-show-keys`) and pass --tang-thumbprint",
                adv.signing_thumbprints.join(", ")
            ))));
        }
        advs.push(adv);
    }
    let t = opts.threshold.unwrap_or(1);
    let mut vault = Vault::open(&opts.device)?;
    let vk = volume_key_via_passphrase(&mut vault, &opts.name, opts.tries, prompter, events)?;
    // What clevis luks bind makes: 32 random bytes, base64url, as the passphrase.
    let mut raw = SecretBytes::zeroed(32);
    crate::secret::fill_random(raw.as_mut_bytes())
        .map_err(|e| BootError::Clevis(ClevisError::Crypto(format!("no randomness: {e}"))))?;
    let pass = SecretBytes::from_vec(crate::clevis::b64::encode(raw.as_bytes()).into_bytes());
    let mut tpm = match &opts.tpm2 {
        Some((t, bank, pcrs)) => Some((Tpm::open(&t.tcti, t.timeout)?, *bank, pcrs.clone())),
        None => None,
    };
    let n = advs.len() + usize::from(tpm.is_some());
    let mut tpm2_pin = |pt: &[u8]| -> Result<ce::Encrypted, ClevisError> {
        let Some((handle, bank, pcrs)) = tpm.as_mut() else {
            return Err(ClevisError::Tpm("no TPM".into()));
        };
        ce::tpm2_encrypt(pt, bank.name(), pcrs, |jwk| {
            handle
                .seal_data_legacy_primary(*bank, pcrs, jwk)
                .map_err(|e| ClevisError::Tpm(format!("sealing to the TPM: {e}")))
        })
    };
    let (jwe, pin) = if n == 1 && t == 1 {
        if advs.is_empty() {
            (tpm2_pin(pass.as_bytes()), "tpm2".to_string())
        } else {
            (advs[0].encrypt(pass.as_bytes()), "tang".to_string())
        }
    } else {
        (
            ce::sss_encrypt(t, n, pass.as_bytes(), |i, pt| {
                if i < advs.len() {
                    Ok(advs[i].encrypt(pt)?.compact())
                } else {
                    Ok(tpm2_pin(pt)?.compact())
                }
            }),
            format!("sss t={t} of {n}"),
        )
    };
    let jwe = jwe.map_err(BootError::Clevis)?;
    let keyslot = vault.add_keyslot(&vk, pass.as_bytes(), true)?;
    let token = match vault.add_token(&serde_json::json!({
        "type": crate::clevis::TOKEN_TYPE,
        "keyslots": [keyslot.to_string()],
        "jwe": jwe.flattened(),
    })) {
        Ok(t) => t,
        Err(e) => {
            // No keyslot without its token: nothing could ever open it.
            let left = vault.destroy_keyslot(keyslot).err().map(|_| {
                format!(
                    "keyslot {keyslot}: cryptsetup luksKillSlot {} {keyslot}",
                    opts.device
                )
            });
            return Err(BootError::PartlyWritten {
                error: Box::new(e.into()),
                left,
            });
        }
    };
    events.event(
        "clevis_enrolled",
        &[
            ("name", opts.name.as_str()),
            ("keyslot", &keyslot.to_string()),
            ("token", &token.to_string()),
            ("pin", &pin),
        ],
    );
    Ok(ClevisEnrolled {
        keyslot,
        token,
        pin,
    })
}

/// What `unlock --test` found: which keyslot the first key that works opens,
/// with nothing activated and no PCR extended.
#[derive(Debug)]
pub struct Tested {
    pub method: Method,
    pub slot: u32,
    /// The type of the LUKS2 token that lists the keyslot (`systemd-tpm2`,
    /// `systemd-recovery`), if one does.
    pub token_type: Option<String>,
    /// Why the TPM was not used, when it was not.
    pub fallback_reason: Option<TpmRefusal>,
}

/// "Will this unlock at the next boot?": the unlock up to the volume key, which
/// is then dropped. Works without device-mapper: activation is never tried.
pub fn test_unlock(
    opts: &UnlockOptions,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<Tested, BootError> {
    let mut vault = Vault::open_with_header(&opts.device, opts.crypttab.header.as_deref())?;
    let got = acquire_volume_key(&mut vault, opts, &mut NothingCached(prompter), events)?;
    drop(got.vk);
    let token_type = vault
        .token_refs()?
        .into_iter()
        .find(|t| t.keyslots.contains(&got.slot))
        .map(|t| t.kind);
    Ok(Tested {
        method: got.method,
        slot: got.slot,
        token_type,
        fallback_reason: got.fallback_reason,
    })
}

/// A check leaves nothing behind: a passphrase typed for `--test` is not added to
/// the keyring cache (a cached one may still answer, as it would at boot).
struct NothingCached<'a>(&'a mut dyn Prompter);

impl Prompter for NothingCached<'_> {
    fn ask(&mut self, req: &crate::prompt::Ask) -> Result<SecretBytes, PromptError> {
        self.0.ask(req)
    }
    fn say(&mut self, line: &str) {
        self.0.say(line)
    }
    fn say_at(&mut self, priority: Priority, line: &str) {
        self.0.say_at(priority, line)
    }
    fn unattended(&mut self, req: &crate::prompt::Ask) -> Vec<SecretBytes> {
        self.0.unattended(req)
    }
    fn remember(&mut self, _req: &crate::prompt::Ask, _answer: &SecretBytes) {}
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
        prompter.say_at(
            Priority::Info,
            &format!("vaultguard: {name} is already open"),
        );
        return Ok(Unlocked {
            method: Method::Passphrase,
            tpm_seconds: None,
            fallback_reason: None,
            latched: false,
            already_active: true,
            refusal_explained: Vec::new(),
        });
    }
    let mut vault = Vault::open_with_header(&opts.device, opts.crypttab.header.as_deref())?;
    let uuid = vault.uuid()?;
    let Acquired {
        vk,
        method,
        fallback_reason,
        mut tpm,
        tpm_seconds,
        refusal_explained,
        ..
    } = acquire_volume_key(&mut vault, opts, prompter, events)?;

    vault.activate(name, &vk, opts.flags)?;

    let mut latched = false;
    if let (None, Some(t)) = (&tpm, &opts.tpm) {
        // Unlocked without the TPM (no enrolment): the phase still ends here, if
        // there is a TPM now; no waiting for one to appear.
        if t.phase_pcr.is_some() && !opts.crypttab.no_measure {
            tpm = Tpm::open(&t.tcti, std::time::Duration::ZERO).ok();
        }
    }
    if let (Some(handle), Some(t)) = (tpm.as_mut(), &opts.tpm) {
        if let Some(pcr) = t.phase_pcr.filter(|_| !opts.crypttab.no_measure) {
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
        prompter.say_at(
            Priority::Warning,
            "vaultguard: no TPM, the phase PCR could not be extended",
        );
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
        tpm_seconds,
        fallback_reason,
        latched,
        already_active: false,
        refusal_explained,
    })
}

/// Close the mapping and sweep the keyring for its volume keys.
pub fn detach(name: &str, events: &mut dyn Events) -> Result<(), BootError> {
    if !luks::is_active(name)? {
        return Ok(());
    }
    let uuid = crate::handoff::mapping_luks_uuid(name);
    luks::close(name)?;
    if let Some(uuid) = uuid {
        let _ = crate::keyring::revoke_volume_keys(&uuid);
    }
    events.event("detached", &[("name", name)]);
    Ok(())
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
    /// The NV index to define as the audit log's TPM anchor
    /// ([`crate::tpm::nv::DEFAULT_AUDIT_NV_INDEX`] by default); `None` skips it.
    pub audit_nv_index: Option<u32>,
    /// A signed PCR policy (`--public-key`, `--public-key-pcrs`): `pcrs` then are
    /// the literal PCRs beside it (`--tpm2-pcrs`, may be empty).
    pub signed: Option<SignedEnrolment>,
}

/// The signed half of an enrolment: the PEM public key (stored in the token as
/// systemd-cryptenroll stores it) and the PCRs its signatures approve.
#[derive(Debug, Clone)]
pub struct SignedEnrolment {
    pub public_key_pem: Vec<u8>,
    pub pcrs: Vec<u32>,
    /// `--revocation-counter`: bind the signatures to this TPM NV counter
    /// (defined at enrolment if absent), so `policy revoke-older` can withdraw them.
    pub revocation_counter: Option<u32>,
}

/// What enrolment did about the audit log's TPM anchor (an NV extend index).
#[derive(Debug)]
pub enum AuditAnchor {
    /// Not asked for.
    Skipped,
    Created {
        handle: u32,
    },
    /// Already defined with the anchor's attributes (its value kept).
    AlreadyThere {
        handle: u32,
    },
    /// Could not be defined; the enrolment itself stands (see [`define_audit_anchor`]).
    Failed {
        handle: u32,
        error: TpmError,
    },
}

#[derive(Debug)]
pub enum Verification {
    /// The new object was unsealed and gave back the secret.
    Unsealed,
    /// The phase PCR is already extended in this boot, so only the policy could be
    /// checked (against the TPM's own computation).
    PolicyOnly,
    /// A signed enrolment with no signature yet for the current PCR values: the
    /// policy was computed in software (and matches the sealed object's).
    Unsigned(String),
}

#[derive(Debug)]
pub struct EnrollReport {
    pub device: String,
    pub keyslot: u32,
    pub token: u32,
    pub pcrs: Vec<u32>,
    pub verification: Verification,
    pub recovery_key: Option<SecretBytes>,
    pub recovery_keyslot: Option<u32>,
    /// Old tokens removed by a reseal.
    pub removed_tokens: Vec<u32>,
    /// (old token, keyslot) destroyed by a reseal.
    pub removed: Vec<(u32, u32)>,
    /// Keyslots an old token listed that a reseal kept, and why.
    pub kept: Vec<Kept>,
    pub audit_anchor: AuditAnchor,
}

/// A keyslot listed by a replaced token that was not destroyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub token: u32,
    pub slot: u32,
    pub reasons: Vec<KeepReason>,
}

/// Why a keyslot listed by a token being replaced is not destroyed. Any one is
/// enough; all that apply are reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// The new enrolment's keyslot (a token listed a number then free).
    NewKeyslot,
    /// The key that authorised this operation (passphrase, recovery key) opens it.
    OperationKey,
    /// A token that stays in the header refers to it.
    OtherToken { id: u32, kind: String },
    /// The old token's secret was unsealed and does not open it.
    NotOpenedBySecret,
    /// The old token's secret could not be unsealed now, and the token holds no
    /// valid binding for this keyslot.
    Unproven,
    /// It would leave no keyslot that opens without the TPM.
    LastWithoutTpm,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::NewKeyslot => write!(f, "it is the new enrolment's keyslot"),
            KeepReason::OperationKey => {
                write!(f, "the passphrase used for this reseal opens it")
            }
            KeepReason::OtherToken { id, kind } => write!(f, "token {id} ({kind}) refers to it"),
            KeepReason::NotOpenedBySecret => {
                write!(f, "the old token's TPM secret does not open it")
            }
            KeepReason::Unproven => write!(
                f,
                "nothing proves it is the old TPM enrolment's (its secret cannot be unsealed \
                 now and the token holds no valid binding to it)"
            ),
            KeepReason::LastWithoutTpm => {
                write!(f, "it is the last keyslot that opens without the TPM")
            }
        }
    }
}

/// What is known about one keyslot listed by a token being replaced.
#[derive(Debug, Clone, Default)]
pub struct SlotFacts {
    pub slot: u32,
    /// The replaced token's own secret opened it in this operation, or the token
    /// carries a valid volume-key binding to it.
    pub proven_tpm: bool,
    /// The replaced token's secret was unsealed (so "not proven" means "does not
    /// open it").
    pub secret_known: bool,
    /// The (non-TPM) key that authorised the operation opened it.
    pub operation_key: bool,
    /// Tokens that stay in the header and refer to it: (id, type).
    pub other_tokens: Vec<(u32, String)>,
}

/// Why `facts.slot` must be kept (empty: it may be destroyed). `new_slot` is the
/// keyslot just written; `active` all active keyslots; `tpm_slots` those proven to
/// open with a TPM secret (the new one included). A keyslot is destroyed only if
/// it is proven the replaced token's, no other token and no key of this operation
/// uses it, and it is not the last keyslot that opens without the TPM.
pub fn keep_reasons(
    facts: &SlotFacts,
    new_slot: u32,
    active: &[u32],
    tpm_slots: &[u32],
) -> Vec<KeepReason> {
    let mut why = Vec::new();
    if facts.slot == new_slot {
        why.push(KeepReason::NewKeyslot);
    }
    if facts.operation_key {
        why.push(KeepReason::OperationKey);
    }
    for (id, kind) in &facts.other_tokens {
        why.push(KeepReason::OtherToken {
            id: *id,
            kind: kind.clone(),
        });
    }
    if !facts.proven_tpm {
        why.push(if facts.secret_known {
            KeepReason::NotOpenedBySecret
        } else {
            KeepReason::Unproven
        });
        // Not proven a TPM keyslot: for all we know it opens with something else,
        // and it must not be the last such keyslot.
        let others_without_tpm = active
            .iter()
            .filter(|&&s| s != facts.slot && !tpm_slots.contains(&s))
            .count();
        if others_without_tpm == 0 {
            why.push(KeepReason::LastWithoutTpm);
        }
    }
    why
}

fn ask_new_pin(prompter: &mut dyn Prompter, name: &str) -> Result<SecretBytes, BootError> {
    let id = format!("cryptenroll-pin:{name}");
    let a = prompter.ask(&Ask::new(SecretKind::NewPin, id.clone(), "New TPM2 PIN: "))?;
    let b = prompter.ask(&Ask::new(SecretKind::NewPin, id, "Repeat the TPM2 PIN: "))?;
    if a.is_empty() {
        return Err(BootError::EmptyPin);
    }
    if !a.ct_eq(b.as_bytes()) {
        return Err(BootError::PinMismatch);
    }
    Ok(a)
}

/// The TPM's input for a `systemd-tpm2` token: `tpm` never reads LUKS tokens and
/// `luks` never names TPM types, so the translation lives here, in the flow.
/// A signed enrolment's signature file is looked up where systemd-cryptsetup
/// looks (see [`sealed_object_with`]).
pub fn sealed_object(t: &Tpm2Token) -> Result<SealedObject, token::TokenError> {
    sealed_object_with(t, None)
}

/// [`sealed_object`] with the signature file named by config `tpm.signature` or
/// crypttab `tpm2-signature=` (`None`: systemd-cryptsetup's places, `/.extra`
/// too in the initrd). An unusable signature file does not make the token
/// unusable: the unseal is refused with the file's problem as the reason.
pub fn sealed_object_with(
    t: &Tpm2Token,
    signature: Option<&std::path::Path>,
) -> Result<SealedObject, token::TokenError> {
    use crate::tpm::signed;
    let signed = match &t.pubkey {
        None => None,
        Some(pem) => {
            let key = signed::PolicyKey::from_pem(pem).map_err(|e| token::TokenError::Field {
                field: "tpm2_pubkey",
                msg: e.to_string(),
            })?;
            let in_initrd = crate::handoff::in_initrd();
            let (signatures, source) = match signed::locate_signature_file(signature, in_initrd) {
                Some(path) if !path.exists() => (
                    Err(format!(
                        "no signature file at {}; sign this boot's PCR values with \
                         `vaultguard policy sign`",
                        path.display()
                    )),
                    path.display().to_string(),
                ),
                Some(path) => (
                    signed::read_signature_file(&path).map_err(|e| e.to_string()),
                    path.display().to_string(),
                ),
                None => {
                    let looked = match signature {
                        Some(p) => {
                            format!("{} in {}", p.display(), signed::SIGNATURE_DIRS.join(", "))
                        }
                        None => format!(
                            "{} in {}{}",
                            signed::SIGNATURE_FILE_NAME,
                            signed::SIGNATURE_DIRS.join(", "),
                            if in_initrd { ", /.extra" } else { "" }
                        ),
                    };
                    (
                        Err(format!(
                            "no signature file ({looked}); sign this boot's PCR values with \
                                 `vaultguard policy sign`"
                        )),
                        looked,
                    )
                }
            };
            Some(crate::tpm::SignedPolicy {
                key,
                pcrs: t.pubkey_pcrs.clone(),
                signatures,
                source,
                counter: t.revocation_counter,
            })
        }
    };
    Ok(SealedObject {
        blob: t.blob.clone(),
        pcrs: t.pcrs.clone(),
        bank: tpm_bank(t.bank),
        primary_alg: match t.primary_alg {
            token::PrimaryAlg::Ecc => PrimaryAlg::Ecc,
            token::PrimaryAlg::Rsa => PrimaryAlg::Rsa,
        },
        policy_hash: t.policy_hash.clone(),
        pin: t.pin,
        salt: t.salt.clone(),
        srk: t.srk.clone(),
        pcr_values: t.pcr_values.clone(),
        signed,
    })
}

/// The token format's bank name for a TPM bank.
pub fn token_bank(b: Bank) -> PcrBank {
    match b {
        Bank::Sha1 => PcrBank::Sha1,
        Bank::Sha256 => PcrBank::Sha256,
        Bank::Sha384 => PcrBank::Sha384,
        Bank::Sha512 => PcrBank::Sha512,
    }
}

/// The TPM bank a token's `tpm2-pcr-bank` names.
pub fn tpm_bank(b: PcrBank) -> Bank {
    match b {
        PcrBank::Sha1 => Bank::Sha1,
        PcrBank::Sha256 => Bank::Sha256,
        PcrBank::Sha384 => Bank::Sha384,
        PcrBank::Sha512 => Bank::Sha512,
    }
}

/// Seal, then check the result before anything is written to the header.
fn seal_and_verify(
    tpm: &mut Tpm,
    opts: &EnrollOptions,
    pin: Option<&SecretBytes>,
) -> Result<(Sealed, Tpm2Token, Verification), BootError> {
    let key = match &opts.signed {
        Some(s) => Some(
            crate::tpm::signed::PolicyKey::from_pem(&s.public_key_pem)
                .map_err(|e| BootError::BadArgument(ArgError::PublicKey(e.to_string())))?,
        ),
        None => None,
    };
    let counter = opts.signed.as_ref().and_then(|s| s.revocation_counter);
    if let Some(h) = counter.filter(|h| Some(*h) == opts.audit_nv_index) {
        // Defined first, the counter would take the anchor's place for good.
        return Err(BootError::BadArgument(ArgError::CounterIsAuditIndex {
            handle: h,
        }));
    }
    if let Some(h) = counter {
        // Defined (and written once) before sealing: its name is the policyRef.
        tpm.define_revocation_counter(h)?;
    }
    let policy_ref = counter
        .map(crate::tpm::counter::counter_name)
        .unwrap_or_default();
    let sealed = tpm.seal_signed(
        &SealRequest {
            bank: opts.bank,
            pcrs: &opts.pcrs,
            phase_pcr: opts.tpm.phase_pcr,
            pin: pin.map(SecretBytes::as_bytes),
        },
        key.as_ref(),
        &policy_ref,
    )?;
    let token = Tpm2Token {
        keyslots: vec![0], // set once the keyslot exists
        blob: sealed.blob.clone(),
        pcrs: sealed.pcr_values.iter().map(|(p, _)| *p).collect(),
        bank: token_bank(opts.bank),
        primary_alg: token::PrimaryAlg::Ecc,
        policy_hash: sealed.policy_hash.clone(),
        pin: pin.is_some(),
        salt: sealed.salt.clone(),
        srk: Some(sealed.srk.clone()),
        pcr_values: Some(sealed.pcr_values.iter().cloned().collect()),
        keyslot_macs: Default::default(), // set once the keyslot exists
        eventlog: explain::enrolment_eventlog(
            tpm,
            opts.bank,
            &sealed
                .pcr_values
                .iter()
                .map(|(p, _)| *p)
                .chain(opts.signed.iter().flat_map(|s| s.pcrs.iter().copied()))
                .collect::<Vec<_>>(),
            opts.tpm.phase_pcr,
        ),
        pubkey: opts.signed.as_ref().map(|s| s.public_key_pem.clone()),
        pubkey_pcrs: opts
            .signed
            .as_ref()
            .map(|s| s.pcrs.clone())
            .unwrap_or_default(),
        revocation_counter: counter,
    };
    let object = sealed_object_with(&token, opts.tpm.signature.as_deref())
        .map_err(|e| BootError::BadArgument(ArgError::PublicKey(e.to_string())))?;
    let verification = match tpm.check_policy(&object, opts.tpm.phase_pcr) {
        Ok(()) => {
            let back = tpm.unseal(&object, pin.map(SecretBytes::as_bytes))?;
            if !back.ct_eq(sealed.secret.as_bytes()) {
                return Err(BootError::Verify(VerifyFailure::DifferentSecret));
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
                return Err(BootError::Verify(VerifyFailure::PolicyDisagrees));
            }
            Verification::PolicyOnly
        }
        // Enrolled before anyone signed this boot's PCR values: the usual order
        // (enrol, then `policy sign`); the policy was checked in software.
        Err(TpmError::Signature(why)) => Verification::Unsigned(why),
        Err(e) => return Err(BootError::Verify(VerifyFailure::Refused(e))),
    };
    Ok((sealed, token, verification))
}

/// Add the TPM keyslot and its token (with the keyslot's volume-key binding).
/// If the token cannot be written, what was written is rolled back.
fn write_enrolment(
    vault: &mut Vault,
    vk: &SecretBytes,
    sealed: &Sealed,
    mut token: Tpm2Token,
    events: &mut dyn Events,
) -> Result<(u32, u32), BootError> {
    let passphrase = base64_encode_secret(sealed.secret.as_bytes());
    let keyslot = vault.add_keyslot(vk, passphrase.as_bytes(), true)?;
    events.event(
        "keyslot_added",
        &[
            ("device", vault.device()),
            ("keyslot", &keyslot.to_string()),
        ],
    );
    let written = (|| {
        let salt = vault.keyslot_salt(keyslot)?.ok_or(LuksError::Op {
            what: "reading the new keyslot",
            msg: format!("keyslot {keyslot} has no KDF salt in the header"),
        })?;
        token.keyslots = vec![keyslot];
        token.keyslot_macs = [(keyslot, token.keyslot_mac(vk.as_bytes(), keyslot, &salt))]
            .into_iter()
            .collect();
        vault.add_token(&token.to_json())
    })();
    match written {
        Ok(id) => Ok((keyslot, id)),
        Err(e) => Err(roll_back(vault, keyslot, &passphrase, e.into(), events)),
    }
}

/// Take back keyslot `slot`, written by this operation with `passphrase`, and
/// any token that refers to it, after `error`. Works from the header as it is on
/// disk (re-read), destroys the keyslot only if `passphrase` opens it there, and
/// checks the result; returns `error` with what could not be removed.
fn roll_back(
    vault: &mut Vault,
    slot: u32,
    passphrase: &SecretBytes,
    error: BootError,
    events: &mut dyn Events,
) -> BootError {
    events.event(
        "enrolment_rollback",
        &[
            ("device", vault.device()),
            ("keyslot", &slot.to_string()),
            ("error", &error.to_string()),
        ],
    );
    let device = vault.device().to_string();
    let result = (|| -> Result<(), LuksError> {
        vault.reload()?;
        // The keyslot did not exist before this operation, so a token that refers
        // to it is this operation's (written, or half-written, by it).
        for t in vault.token_refs()? {
            if t.keyslots.contains(&slot) {
                vault.remove_token(t.id)?;
            }
        }
        if vault.active_keyslots().contains(&slot) {
            match vault.volume_key(Some(slot), passphrase.as_bytes()) {
                Ok(_) => vault.destroy_keyslot(slot)?,
                // Not the keyslot this operation wrote: someone else's, keep it.
                Err(e) if e.is_wrong_passphrase() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })();
    // What the header says now, whatever the steps above reported.
    let _ = vault.reload();
    let tokens_left: Vec<u32> = vault
        .token_refs()
        .map(|refs| {
            refs.into_iter()
                .filter(|t| t.keyslots.contains(&slot))
                .map(|t| t.id)
                .collect()
        })
        .unwrap_or_default();
    let slot_left = vault.active_keyslots().contains(&slot)
        && vault.volume_key(Some(slot), passphrase.as_bytes()).is_ok();
    let mut left = Vec::new();
    if slot_left {
        left.push(format!(
            "keyslot {slot} (remove it with `cryptsetup luksKillSlot {device} {slot}`)"
        ));
    }
    for id in tokens_left {
        left.push(format!(
            "token {id} (remove it with `cryptsetup token remove --token-id {id} {device}`)"
        ));
    }
    let left = match (left.is_empty(), result) {
        (true, _) => None,
        (false, Err(e)) => Some(format!("{e}; left in the header: {}", left.join(", "))),
        (false, Ok(())) => Some(format!("left in the header: {}", left.join(", "))),
    };
    events.event(
        "enrolment_rolled_back",
        &[
            ("device", &device),
            ("keyslot", &slot.to_string()),
            ("complete", if left.is_none() { "yes" } else { "no" }),
        ],
    );
    BootError::PartlyWritten {
        error: Box::new(error),
        left,
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

fn add_recovery_key(
    vault: &mut Vault,
    vk: &SecretBytes,
    events: &mut dyn Events,
) -> Result<(SecretBytes, u32), BootError> {
    let key = make_recovery_key()?;
    let slot = vault.add_keyslot(vk, key.as_bytes(), true)?;
    events.event(
        "keyslot_added",
        &[("device", vault.device()), ("keyslot", &slot.to_string())],
    );
    let token = serde_json::json!({"type": "systemd-recovery", "keyslots": [slot.to_string()]});
    if let Err(e) = vault.add_token(&token) {
        return Err(roll_back(vault, slot, &key, e.into(), events));
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
    let (keyslot, token_id) = write_enrolment(&mut vault, &vk, &sealed, token, events)?;
    let (recovery_key, recovery_keyslot) = if opts.recovery_key {
        match add_recovery_key(&mut vault, &vk, events) {
            Ok((k, s)) => (Some(k), Some(s)),
            // All or nothing: an enrolment without the recovery key that was asked
            // for would be refused as "already enrolled" on the next try.
            Err(e) => {
                let passphrase = base64_encode_secret(sealed.secret.as_bytes());
                return Err(
                    match roll_back(&mut vault, keyslot, &passphrase, e, events) {
                        BootError::PartlyWritten { error, left } => BootError::PartlyWritten {
                            error: Box::new(match *error {
                                // The recovery key's own rollback already said its part.
                                BootError::PartlyWritten {
                                    error,
                                    left: Some(l),
                                } => BootError::PartlyWritten {
                                    error,
                                    left: Some(l),
                                },
                                BootError::PartlyWritten { error, left: None } => *error,
                                other => other,
                            }),
                            left,
                        },
                        other => other,
                    },
                );
            }
        }
    } else {
        (None, None)
    };
    events.event(
        "enrolled",
        &[("device", &opts.device), ("keyslot", &keyslot.to_string())],
    );
    let audit_anchor = define_audit_anchor(&mut tpm, opts.audit_nv_index, events);
    Ok(EnrollReport {
        device: opts.device.clone(),
        keyslot,
        token: token_id,
        pcrs,
        verification,
        recovery_key,
        recovery_keyslot,
        removed_tokens: Vec::new(),
        removed: Vec::new(),
        kept: Vec::new(),
        audit_anchor,
    })
}

/// Define the audit log's TPM anchor at `handle` and audit the outcome.
///
/// Done after the enrolment is written, and a failure is a warning in the report,
/// never a failed enrolment: the anchor protects the audit log, not the vault.
/// Refusing the TPM unlock because, say, the owner hierarchy has a password (a
/// common IT policy) or an unrelated index sits at the handle would cost the
/// machine its unattended boot for a reason that has nothing to do with booting;
/// without the anchor the audit chain is still verified, and `audit verify --tpm`
/// says that the index is absent.
pub fn define_audit_anchor(
    tpm: &mut Tpm,
    handle: Option<u32>,
    events: &mut dyn Events,
) -> AuditAnchor {
    let Some(handle) = handle else {
        return AuditAnchor::Skipped;
    };
    let index = format!("{handle:#010x}");
    let outcome = match tpm.define_audit_index(handle) {
        Ok(crate::tpm::nv::Defined::Created) => AuditAnchor::Created { handle },
        Ok(crate::tpm::nv::Defined::AlreadyThere) => AuditAnchor::AlreadyThere { handle },
        Err(error) => AuditAnchor::Failed { handle, error },
    };
    match &outcome {
        AuditAnchor::Created { .. } => events.event(
            "audit_anchor_defined",
            &[("nv_index", &index), ("outcome", "created")],
        ),
        AuditAnchor::AlreadyThere { .. } => events.event(
            "audit_anchor_defined",
            &[("nv_index", &index), ("outcome", "already_there")],
        ),
        AuditAnchor::Failed { error, .. } => events.event(
            "audit_anchor_failed",
            &[("nv_index", &index), ("error", &error.to_string())],
        ),
        AuditAnchor::Skipped => {}
    }
    outcome
}

/// Whether the signed policy token `t` names is, without the TPM, provably the
/// one its sealed object was made for: one of its keyslot bindings verifies
/// under `volume_key` (so the blob is the one vaultguard sealed for this
/// volume), and the blob's authPolicy is the policy its public key, revocation
/// counter and recorded literal PCR values give ([`crate::tpm::check_sealed`]).
fn signed_policy_proven(vault: &mut Vault, volume_key: &[u8], t: &Tpm2Token) -> Result<(), String> {
    let mut bound = false;
    for &slot in &t.keyslots {
        if let Some(salt) = vault.keyslot_salt(slot).map_err(|e| e.to_string())? {
            bound |= t.binds_keyslot(volume_key, slot, &salt);
        }
    }
    if !bound {
        return Err(
            "no keyslot binding of the token verifies under the volume key: \
                    the token is not vaultguard's, or was edited"
                .into(),
        );
    }
    signed_claims_match_blob(t).map(|_| ())
}

/// Whether the signed policy `t` names (public key, revocation counter) gives
/// the authPolicy of its own sealed object, with its recorded literal PCR
/// values ([`crate::tpm::check_sealed`], strictly: every literal PCR recorded).
/// This ties the claims to the blob; whether the blob is genuine is for the
/// caller to prove (keyslot MAC, or [`Tpm::check_made_here`]). Returns the
/// sealed object.
pub fn signed_claims_match_blob(t: &Tpm2Token) -> Result<SealedObject, String> {
    let mut object = sealed_object(t).map_err(|e| e.to_string())?;
    if object.pcrs.is_empty() {
        // No literal PCRs: nothing to record, and the policy is still checked.
        object.pcr_values.get_or_insert_with(Default::default);
    }
    match &object.pcr_values {
        Some(v) if v.keys().copied().eq(object.pcrs.iter().copied()) => {}
        _ => return Err("the token records no literal PCR values to check its policy by".into()),
    }
    crate::tpm::check_sealed(&object).map_err(|e| e.to_string())?;
    Ok(object)
}

/// Seal to the current PCR values. The new token and keyslot are written first;
/// only then are the old ones removed, so a crash in between leaves two working
/// enrolments, never none. The old tokens all go; a keyslot one of them listed
/// is destroyed only as [`keep_reasons`] allows, proven to be that token's by its
/// unsealed secret opening it, or by the token's volume-key binding to it.
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
    // A signed enrolment stays signed: the same key, signed PCRs and revocation
    // counter, and its literal PCRs (resealing it to literal values would undo
    // what it is for: updates that need a signature, not a reseal).
    let carried;
    let mut carried_from = None;
    let opts = match (&opts.signed, old.iter().find(|(_, t)| t.pubkey.is_some())) {
        (None, Some((id, t))) => {
            carried_from = Some(*id);
            let mut o = opts.clone();
            o.signed = Some(SignedEnrolment {
                public_key_pem: t.pubkey.clone().unwrap_or_default(),
                pcrs: t.pubkey_pcrs.clone(),
                revocation_counter: t.revocation_counter,
            });
            o.pcrs = t
                .pcrs
                .iter()
                .copied()
                .filter(|p| Some(*p) != opts.tpm.phase_pcr)
                .collect();
            carried = o;
            &carried
        }
        _ => opts,
    };
    let mut tpm = Tpm::open(&opts.tpm.tcti, opts.tpm.timeout)?;
    let mut trials = Trials::default();
    // The old enrolment may still open the vault (reseal from the initrd before the
    // latch); otherwise the passphrase or recovery key is needed.
    let (vk, operation_slot, mut secrets) = match volume_key_via_tpm(
        &mut vault,
        &mut tpm,
        &opts.tpm,
        &opts.name,
        opts.tries,
        prompter,
        events,
        &mut trials,
    ) {
        Ok(o) => (o.vk, None, vec![(o.token, o.passphrase)]),
        Err(reason) => {
            prompter.say_at(Priority::Warning, &format!("vaultguard: the current enrolment cannot unseal ({reason}); the passphrase or recovery key is needed"));
            let (vk, slot) = passphrase_and_slot(
                &mut vault,
                &opts.name,
                opts.tries,
                SecretKind::CurrentPassphrase,
                prompter,
                events,
            )?;
            (vk, Some(slot), Vec::new())
        }
    };
    // The other old tokens' secrets, where the TPM still gives them without a
    // PIN (a PIN would have to be asked again just to tidy up).
    for (id, t) in &old {
        if !t.pin && !secrets.iter().any(|(s, _)| s == id) {
            let object = sealed_object_with(t, opts.tpm.signature.as_deref());
            if let Some(secret) = object.ok().and_then(|o| tpm.unseal(&o, None).ok()) {
                secrets.push((*id, base64_encode_secret(secret.as_bytes())));
            }
        }
    }
    // The signed policy carried from the header must be the sealed object's: a
    // TPM unseal through that token proves it; after a passphrase unlock only
    // the token's keyslot binding (a MAC under the volume key, over the blob) and
    // the blob's authPolicy recomputed from the key, counter and recorded PCR
    // values do. Otherwise someone who edited the header offline would have the
    // reseal seal the volume key to their own public key.
    // Every token in `secrets` was unsealed by the TPM just now.
    if let Some(id) = carried_from.filter(|id| !secrets.iter().any(|(s, _)| s == id)) {
        if let Some((_, t)) = old.iter().find(|(i, _)| *i == id) {
            signed_policy_proven(&mut vault, vk.as_bytes(), t)
                .map_err(|why| BootError::UnprovenSignedPolicy { token: id, why })?;
        }
    }
    let pin = if opts.pin || old.iter().any(|(_, t)| t.pin) {
        Some(ask_new_pin(prompter, &opts.name)?)
    } else {
        None
    };
    let (sealed, token, verification) = seal_and_verify(&mut tpm, opts, pin.as_ref())?;
    let pcrs = token.pcrs.clone();

    // What is known of every keyslot an old token lists, from the header before
    // anything is written.
    let refs = vault.token_refs()?;
    let mut facts: Vec<(u32, SlotFacts)> = Vec::new();
    for (id, t) in &old {
        let secret = secrets.iter().find(|(s, _)| s == id).map(|(_, p)| p);
        for &slot in &t.keyslots {
            let opened = match secret {
                Some(p) => match trials.try_slot(&mut vault, slot, p) {
                    (_, Ok(_)) => trials.opened(slot, p),
                    (_, Err(_)) => false,
                },
                None => false,
            };
            let bound = match vault.keyslot_salt(slot)? {
                Some(salt) => t.binds_keyslot(vk.as_bytes(), slot, &salt),
                None => false,
            };
            facts.push((
                *id,
                SlotFacts {
                    slot,
                    proven_tpm: opened || bound,
                    secret_known: secret.is_some(),
                    operation_key: operation_slot == Some(slot),
                    other_tokens: refs
                        .iter()
                        .filter(|r| {
                            r.keyslots.contains(&slot) && !old.iter().any(|(o, _)| *o == r.id)
                        })
                        .map(|r| (r.id, r.kind.clone()))
                        .collect(),
                },
            ));
        }
    }

    let (keyslot, token_id) = write_enrolment(&mut vault, &vk, &sealed, token, events)?;
    let active = vault.active_keyslots();
    let mut tpm_slots: Vec<u32> = facts
        .iter()
        .filter(|(_, f)| f.proven_tpm)
        .map(|(_, f)| f.slot)
        .collect();
    tpm_slots.push(keyslot);

    let mut removed_tokens = Vec::new();
    for (id, _) in &old {
        vault.remove_token(*id)?;
        removed_tokens.push(*id);
    }
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    for (id, f) in &facts {
        let done = removed.iter().any(|(_, s)| *s == f.slot)
            || kept.iter().any(|k: &Kept| k.slot == f.slot);
        if done || !active.contains(&f.slot) {
            continue;
        }
        let reasons = keep_reasons(f, keyslot, &active, &tpm_slots);
        if reasons.is_empty() {
            vault.destroy_keyslot(f.slot)?;
            removed.push((*id, f.slot));
        } else {
            events.event(
                "keyslot_kept",
                &[
                    ("device", &opts.device),
                    ("keyslot", &f.slot.to_string()),
                    ("token", &id.to_string()),
                    (
                        "why",
                        &reasons
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                ],
            );
            kept.push(Kept {
                token: *id,
                slot: f.slot,
                reasons,
            });
        }
    }
    events.event(
        "resealed",
        &[("device", &opts.device), ("keyslot", &keyslot.to_string())],
    );
    // After a TPM clear (recovery key, then reseal) the anchor is gone with
    // everything else: reseal defines it again.
    let audit_anchor = define_audit_anchor(&mut tpm, opts.audit_nv_index, events);
    Ok(EnrollReport {
        device: opts.device.clone(),
        keyslot,
        token: token_id,
        pcrs,
        verification,
        recovery_key: None,
        recovery_keyslot: None,
        removed_tokens,
        removed,
        kept,
        audit_anchor,
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
        .expect_err("a recovery key from a failed RNG");
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

    fn facts(slot: u32) -> SlotFacts {
        SlotFacts {
            slot,
            proven_tpm: true,
            secret_known: true,
            ..SlotFacts::default()
        }
    }

    #[test]
    fn a_keyslot_goes_only_when_proven_the_tokens_and_used_by_nothing_else() {
        // slot 0 passphrase, 1 old TPM, 2 new TPM
        let active = [0, 1, 2];
        assert_eq!(keep_reasons(&facts(1), 2, &active, &[1, 2]), vec![]);
        // the operation's passphrase opened it
        let f = SlotFacts {
            operation_key: true,
            ..facts(1)
        };
        assert_eq!(
            keep_reasons(&f, 2, &active, &[1, 2]),
            vec![KeepReason::OperationKey]
        );
        // another token refers to it
        let f = SlotFacts {
            other_tokens: vec![(3, "systemd-fido2".into())],
            ..facts(1)
        };
        assert_eq!(
            keep_reasons(&f, 2, &active, &[1, 2]),
            vec![KeepReason::OtherToken {
                id: 3,
                kind: "systemd-fido2".into()
            }]
        );
        // the secret was unsealed and does not open it
        let f = SlotFacts {
            proven_tpm: false,
            ..facts(0)
        };
        assert_eq!(
            keep_reasons(&f, 2, &active, &[2]),
            vec![KeepReason::NotOpenedBySecret]
        );
        // nothing known either way
        let f = SlotFacts {
            proven_tpm: false,
            secret_known: false,
            ..facts(0)
        };
        assert_eq!(
            keep_reasons(&f, 2, &active, &[2]),
            vec![KeepReason::Unproven]
        );
        // the token listed the number the new enrolment took
        assert_eq!(
            keep_reasons(&facts(2), 2, &active, &[2]),
            vec![KeepReason::NewKeyslot]
        );
    }

    #[test]
    fn the_last_keyslot_that_opens_without_the_tpm_is_kept() {
        // Only the new TPM keyslot and slot 0 are active, and nothing proves slot
        // 0 is a TPM keyslot: it is the last one that may open without the TPM.
        let f = SlotFacts {
            proven_tpm: false,
            secret_known: false,
            ..facts(0)
        };
        assert_eq!(
            keep_reasons(&f, 2, &[0, 2], &[2]),
            vec![KeepReason::Unproven, KeepReason::LastWithoutTpm]
        );
        // A proven TPM keyslot is not a way in without the TPM: it may go even
        // when only TPM keyslots remain (a recovery-less, passphrase-less setup).
        assert_eq!(keep_reasons(&facts(1), 2, &[1, 2], &[1, 2]), vec![]);
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
