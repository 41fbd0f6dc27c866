//! The TPM edge: SRK, sealing, unsealing, PCR reads and the phase-PCR latch.
//!
//! Sealing follows systemd-cryptenroll so that enrolments interoperate: a 32-byte
//! secret in a keyed-hash object under the persistent SRK (0x81000001), policy =
//! PolicyPCR (+ PolicyAuthValue with a PIN). Unsealing runs in an HMAC session salted
//! with the SRK, bound to the object, with parameter encryption, so the secret never
//! crosses the bus in clear. This module never touches LUKS headers and never logs
//! a secret: errors carry PCR numbers and TPM response kinds only.

pub mod nv;
pub mod policy;
pub mod srk;

use crate::secret::SecretBytes;
use policy::Bank;
use srk::{SerializedKey, SRK_HANDLE};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, PropertyTag, SessionType, StartupType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, CapabilityData, Digest, DigestValues, EccPoint, EccScheme, KeyDerivationFunctionScheme,
    KeyedHashScheme, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyRsa, PublicKeyedHashParameters,
    PublicRsaParametersBuilder, RsaExponent, RsaScheme, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::{DeviceConfig, TctiNameConf};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

/// Length of the sealed secret, as systemd uses.
pub const SECRET_LEN: usize = 32;

#[derive(Debug)]
pub enum TpmError {
    /// No TPM answered within the timeout.
    Absent { tcti: String, detail: String },
    /// A TPM command failed.
    Command {
        what: &'static str,
        err: tss_esapi::Error,
    },
    /// The PCR policy no longer matches. `changed` names the PCRs known to differ
    /// (empty when the enrolment recorded no values to compare with).
    PcrMismatch {
        changed: Vec<u32>,
        bound: Vec<u32>,
        phase: Option<u32>,
    },
    /// The SRK at 0x81000001 is not the one recorded at enrolment.
    SrkMismatch,
    /// There is no SRK at 0x81000001 although the enrolment used one.
    SrkMissing,
    /// 0x81000001 holds something that is not a storage key.
    SrkUnusable(String),
    /// Wrong PIN; the TPM's dictionary-attack counter moved.
    WrongPin { tries_left: Option<u32> },
    /// The TPM is in dictionary-attack lockout.
    Lockout { recovery_seconds: Option<u32> },
    /// The token's data is unusable.
    BadToken(String),
    /// The token contradicts itself (its policy hash, its sealed object's policy
    /// and its recorded PCR values do not agree): altered or damaged, not a PCR
    /// change. Resealing would only paper over it.
    TokenAltered(String),
    /// The phase-PCR extend did not take.
    LatchFailed(String),
    /// The kernel's random number generator failed (nothing was sealed).
    Random(std::io::Error),
    /// No NV index is defined at `handle` (the audit anchor was never created,
    /// or the TPM was cleared since).
    NvIndexAbsent { handle: u32 },
    /// An NV index at `handle` exists but is not the audit index: left alone.
    NvIndexConflict {
        handle: u32,
        differs: Vec<nv::NvDifference>,
    },
    /// An NV handle outside the owner range (0x01000000-0x013FFFFF).
    NvHandleOutOfRange { handle: u32 },
    /// The owner hierarchy has an authorisation value; vaultguard defines NV
    /// indexes only with the empty owner authorisation.
    OwnerAuthSet,
}

impl fmt::Display for TpmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TpmError::Absent { tcti, detail } => write!(f, "no TPM at {tcti}: {detail}"),
            TpmError::Command { what, err } => write!(f, "TPM {what} failed: {err}"),
            TpmError::PcrMismatch { changed, bound, phase } => {
                let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                match (changed.as_slice(), phase) {
                    ([p], Some(ph)) if p == ph => write!(
                        f,
                        "PCR {p} (phase) is already extended: the vault was unlocked once this boot; \
                         the TPM will not release the key again until reboot"
                    ),
                    ([], _) if bound.is_empty() => write!(
                        f,
                        "the TPM refused the PCR policy: a bound PCR changed since enrolment; \
                         run `vaultguard reseal` after verifying the change"
                    ),
                    ([], _) => write!(
                        f,
                        "PCR policy no longer matches (bound to PCRs {}); run `vaultguard reseal` after verifying the change",
                        list(bound)
                    ),
                    ([p], _) => write!(
                        f,
                        "PCR {p} changed since enrolment: run `vaultguard reseal` after verifying the update"
                    ),
                    (many, _) => write!(
                        f,
                        "PCRs {} changed since enrolment: run `vaultguard reseal` after verifying the update",
                        list(many)
                    ),
                }
            }
            TpmError::SrkMismatch => write!(
                f,
                "the TPM's storage root key differs from the one recorded at enrolment: \
                 this is not the TPM the vault was enrolled with (swapped, cleared or interposed)"
            ),
            TpmError::SrkMissing => write!(
                f,
                "the TPM has no storage root key at 0x81000001: it was cleared or replaced since enrolment"
            ),
            TpmError::SrkUnusable(why) => write!(f, "persistent handle 0x81000001 is unusable: {why}"),
            TpmError::WrongPin { tries_left: Some(n) } => {
                write!(f, "wrong TPM PIN ({n} tries left before the TPM locks out)")
            }
            TpmError::WrongPin { tries_left: None } => write!(f, "wrong TPM PIN"),
            TpmError::Lockout { recovery_seconds } => {
                write!(f, "the TPM is in dictionary-attack lockout")?;
                if let Some(s) = recovery_seconds {
                    write!(f, " (one try is restored every {s} s)")?;
                }
                Ok(())
            }
            TpmError::BadToken(why) => write!(f, "TPM2 token unusable: {why}"),
            TpmError::TokenAltered(why) => write!(
                f,
                "the TPM2 token was altered or damaged: {why}. This is not a PCR change; \
                 find out who wrote the LUKS header before trusting this machine \
                 (the passphrase still opens the vault)"
            ),
            TpmError::LatchFailed(why) => write!(f, "could not extend the phase PCR: {why}"),
            TpmError::Random(e) => write!(
                f,
                "the kernel random number generator failed (getrandom: {e}); nothing was sealed"
            ),
            TpmError::NvIndexAbsent { handle } => write!(
                f,
                "the TPM has no NV index {handle:#010x} (the audit anchor): it was never \
                 defined or the TPM was cleared; `vaultguard enroll` defines it"
            ),
            TpmError::NvIndexConflict { handle, differs } => {
                write!(
                    f,
                    "NV index {handle:#010x} exists but is not vaultguard's audit index ("
                )?;
                for (i, d) in differs.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(f, "{d}")?;
                }
                write!(
                    f,
                    "); it was left alone: choose another handle, or undefine it if it is unused"
                )
            }
            TpmError::NvHandleOutOfRange { handle } => write!(
                f,
                "NV handle {handle:#010x} is outside the owner range 0x01000000-0x013fffff"
            ),
            TpmError::OwnerAuthSet => write!(
                f,
                "the TPM's owner hierarchy has an authorisation value (owner password) set: \
                 vaultguard cannot define its audit NV index without it; clear the owner \
                 password (tpm2_changeauth -c owner) or define the index yourself with the \
                 attributes in `vaultguard::tpm::nv`"
            ),
        }
    }
}

impl std::error::Error for TpmError {}

fn cmd(what: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |err| TpmError::Command { what, err }
}

fn rc_kind(err: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match err {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

/// The algorithm of the storage key a sealed object lives under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryAlg {
    Ecc,
    Rsa,
}

/// A sealed object and what unsealing it needs: this module's input, filled by
/// the caller from wherever it keeps enrolments (`boot` from the LUKS token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedObject {
    /// Marshalled TPM2B_PRIVATE followed by TPM2B_PUBLIC.
    pub blob: Vec<u8>,
    /// The PCRs the policy binds, ascending.
    pub pcrs: Vec<u32>,
    pub bank: Bank,
    pub primary_alg: PrimaryAlg,
    /// The policy digest recorded at sealing.
    pub policy_hash: Vec<u8>,
    /// Whether the policy includes PolicyAuthValue (a PIN).
    pub pin: bool,
    /// The PIN's PBKDF2 salt (absent: the PIN is hashed unsalted, systemd < 254).
    pub salt: Option<Vec<u8>>,
    /// Serialized ESYS_TR of the SRK (absent: a legacy transient primary).
    pub srk: Option<Vec<u8>>,
    /// The PCR values recorded at sealing, where known.
    pub pcr_values: Option<std::collections::BTreeMap<u32, Vec<u8>>>,
}

/// What `seal` produced: everything a `systemd-tpm2` token needs, plus the secret.
pub struct Sealed {
    pub secret: SecretBytes,
    pub blob: Vec<u8>,
    pub policy_hash: Vec<u8>,
    pub srk: Vec<u8>,
    pub salt: Option<Vec<u8>>,
    /// PCR values the policy binds (phase PCR as zeros).
    pub pcr_values: PcrValues,
}

/// PCR number and value, in one bank.
pub type PcrValues = Vec<(u32, Vec<u8>)>;

pub struct SealRequest<'a> {
    pub bank: Bank,
    pub pcrs: &'a [u32],
    pub phase_pcr: Option<u32>,
    pub pin: Option<&'a [u8]>,
}

pub struct Tpm {
    /// `None` only between closing the connection for a command tss-esapi does
    /// not wrap (see [`nv`]) and reopening it; a failed reopen leaves it `None`
    /// and every later call reports the TPM absent.
    ctx: Option<Context>,
    /// The TCTI string the connection was opened with, to reopen it.
    tcti: String,
}

impl Tpm {
    /// Connect to the TPM named by `tcti`, waiting up to `timeout` for a device node
    /// to appear (the TPM driver can probe after the initramfs starts).
    pub fn open(tcti: &str, timeout: Duration) -> Result<Tpm, TpmError> {
        let absent = |detail: String| TpmError::Absent {
            tcti: tcti.to_string(),
            detail,
        };
        if let Some(path) = tcti.strip_prefix("device:") {
            let start = Instant::now();
            while !std::path::Path::new(path).exists() {
                if start.elapsed() >= timeout {
                    return Err(absent(format!(
                        "{path} did not appear within {} s",
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(Tpm {
            ctx: Some(connect(tcti)?),
            tcti: tcti.to_string(),
        })
    }

    /// The open connection (see [`Tpm::ctx`]'s field documentation).
    fn ctx(&mut self) -> Result<&mut Context, TpmError> {
        let tcti = &self.tcti;
        self.ctx.as_mut().ok_or_else(|| TpmError::Absent {
            tcti: tcti.clone(),
            detail: "the connection was closed and could not be reopened".into(),
        })
    }

    /// Run `f` with this process's connection to the TPM closed, then reopen it.
    /// For commands on a connection of their own (tss-esapi 7 does not wrap
    /// every TPM command): a simulator and `/dev/tpm0` serve one connection at
    /// a time. Handles obtained before (sessions, loaded objects) are gone after.
    fn with_connection_closed<T>(
        &mut self,
        f: impl FnOnce(&str) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        drop(self.ctx.take());
        let result = f(&self.tcti);
        self.ctx = Some(connect(&self.tcti)?);
        result
    }
}

/// Open a connection to the TPM named by `tcti` (its device node, if any, exists).
fn connect(tcti: &str) -> Result<Context, TpmError> {
    let absent = |detail: String| TpmError::Absent {
        tcti: tcti.to_string(),
        detail,
    };
    let device = tcti.strip_prefix("device:");
    // A device path is taken as it is: tss-esapi's parser compiles regular
    // expressions for it, a noticeable share of an emulated guest's unlock.
    let conf = match device {
        Some(path) => DeviceConfig::from_str(path).map(TctiNameConf::Device),
        None => TctiNameConf::from_str(tcti),
    }
    .map_err(|e| absent(format!("bad TCTI string: {e}")))?;
    let mut ctx = Context::new(conf).map_err(|e| absent(e.to_string()))?;
    // The kernel's TPM driver starts the TPM when it probes it; a simulator
    // reached over a socket may still need TPM2_Startup.
    if device.is_none() {
        match ctx.startup(StartupType::Clear) {
            Ok(()) => {}
            Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::Initialize) => {}
            Err(e) => return Err(absent(format!("startup: {e}"))),
        }
    }
    Ok(ctx)
}

impl Tpm {
    pub fn random(&mut self, len: usize) -> Result<SecretBytes, TpmError> {
        // The kernel RNG is the source (as systemd does); the TPM is not trusted to
        // be the only one.
        let mut out = SecretBytes::zeroed(len);
        crate::secret::fill_random(out.as_mut_bytes()).map_err(TpmError::Random)?;
        Ok(out)
    }

    /// Current values of `pcrs` in `bank`, in the order given.
    pub fn read_pcrs(&mut self, bank: Bank, pcrs: &[u32]) -> Result<PcrValues, TpmError> {
        let alg = hashing_alg(bank);
        let mut out = Vec::with_capacity(pcrs.len());
        // PCR_Read returns at most 8 digests per call.
        for chunk in pcrs.chunks(8) {
            let slots: Vec<PcrSlot> = chunk
                .iter()
                .map(|&p| pcr_slot(p))
                .collect::<Result<_, _>>()?;
            let sel = PcrSelectionListBuilder::new()
                .with_selection(alg, &slots)
                .build()
                .map_err(cmd("PCR selection"))?;
            let data =
                tss_esapi::abstraction::pcr::read_all(self.ctx()?, sel).map_err(cmd("PCR_Read"))?;
            let bank_data = data.pcr_bank(alg).ok_or(TpmError::Command {
                what: "PCR_Read",
                err: tss_esapi::Error::WrapperError(
                    tss_esapi::WrapperErrorKind::InconsistentParams,
                ),
            })?;
            for (&p, slot) in chunk.iter().zip(&slots) {
                let d = bank_data.get_digest(*slot).ok_or_else(|| {
                    TpmError::BadToken(format!(
                        "the TPM has no PCR {p} in the {} bank",
                        bank.name()
                    ))
                })?;
                out.push((p, d.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// PCR banks the TPM has active (extends must cover all of them).
    pub fn active_banks(&mut self) -> Result<Vec<Bank>, TpmError> {
        let (data, _) = self
            .ctx()?
            .get_capability(CapabilityType::AssignedPcr, 0, 16)
            .map_err(cmd("GetCapability(PCRs)"))?;
        let CapabilityData::AssignedPcr(list) = data else {
            return Err(TpmError::BadToken("unexpected capability data".into()));
        };
        Ok(list
            .get_selections()
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                Bank::from_alg_id(u16::from(tss_esapi::constants::AlgorithmIdentifier::from(
                    s.hashing_algorithm(),
                )))
            })
            .collect())
    }

    fn persistent_exists(&mut self, handle: u32) -> Result<bool, TpmError> {
        let (data, _) = self
            .ctx()?
            .get_capability(CapabilityType::Handles, handle, 1)
            .map_err(cmd("GetCapability(handles)"))?;
        Ok(match data {
            CapabilityData::Handles(list) => {
                list.into_inner().iter().any(|h| u32::from(*h) == handle)
            }
            _ => false,
        })
    }

    fn persistent_handle(&mut self, handle: u32) -> Result<KeyHandle, TpmError> {
        let ph = PersistentTpmHandle::new(handle).map_err(cmd("persistent handle"))?;
        let obj = self
            .ctx()?
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::Persistent(ph)))
            .map_err(cmd("TR_FromTPMPublic(SRK)"))?;
        Ok(KeyHandle::from(obj))
    }

    /// The SRK, created from the standard ECC P-256 template and persisted at
    /// 0x81000001 on first use. Returns the handle and its serialized form.
    pub fn srk_get_or_create(&mut self) -> Result<(KeyHandle, SerializedKey), TpmError> {
        if !self.persistent_exists(SRK_HANDLE)? {
            let template = srk_template(PrimaryAlg::Ecc, true)?;
            let primary = self
                .ctx()?
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.create_primary(Hierarchy::Owner, template, None, None, None, None)
                })
                .map_err(cmd("CreatePrimary(SRK)"))?;
            let ph = PersistentTpmHandle::new(SRK_HANDLE).map_err(cmd("persistent handle"))?;
            self.ctx()?
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.evict_control(
                        Provision::Owner,
                        primary.key_handle.into(),
                        Persistent::Persistent(ph),
                    )
                })
                .map_err(cmd("EvictControl(SRK)"))?;
            self.ctx()?
                .flush_context(primary.key_handle.into())
                .map_err(cmd("FlushContext"))?;
        }
        let handle = self.persistent_handle(SRK_HANDLE)?;
        let (public, name, _) = self
            .ctx()?
            .read_public(handle)
            .map_err(cmd("ReadPublic(SRK)"))?;
        check_storage_key(&public)?;
        let public_bytes = public.marshall().map_err(cmd("marshal SRK public"))?;
        Ok((
            handle,
            SerializedKey {
                handle: SRK_HANDLE,
                name: name.value().to_vec(),
                public: public_bytes,
            },
        ))
    }

    /// Seal a fresh secret to the PCR policy described by `req`.
    pub fn seal(&mut self, req: &SealRequest<'_>) -> Result<Sealed, TpmError> {
        let (srk, srk_ser) = self.srk_get_or_create()?;
        let mut values = self.read_pcrs(req.bank, req.pcrs)?;
        if let Some(phase) = req.phase_pcr {
            values.retain(|(p, _)| *p != phase);
            values.push((phase, vec![0u8; req.bank.digest_len()]));
        }
        values.sort_by_key(|(p, _)| *p);
        let policy = policy::sealing_policy(req.bank, &values, req.pin.is_some());

        let (salt, auth) = match req.pin {
            Some(pin) => {
                let salt = self.random(32)?;
                let auth = policy::pin_auth_value(pin, Some(salt.as_bytes()));
                (Some(salt.as_bytes().to_vec()), Some(auth))
            }
            None => (None, None),
        };
        let secret = self.random(SECRET_LEN)?;
        let template = sealed_template(&policy, req.pin.is_some())?;
        let auth_value = match &auth {
            Some(a) => Some(Auth::try_from(a.as_bytes().to_vec()).map_err(cmd("auth value"))?),
            None => None,
        };
        let data =
            SensitiveData::try_from(secret.as_bytes().to_vec()).map_err(cmd("sensitive data"))?;

        let enc = self.encryption_session(srk, None)?;
        let created = self
            .ctx()?
            .execute_with_sessions((Some(enc), None, None), |c| {
                c.create(srk, template, auth_value, Some(data), None, None)
            })
            .map_err(cmd("Create(sealed object)"));
        self.flush_session(enc);
        let created = created?;

        let mut blob = sized(created.out_private.value());
        blob.extend_from_slice(&sized(
            &created
                .out_public
                .marshall()
                .map_err(cmd("marshal public"))?,
        ));
        Ok(Sealed {
            secret,
            blob,
            policy_hash: policy,
            srk: srk_ser.to_bytes(),
            salt,
            pcr_values: values,
        })
    }

    /// Compute the policy digest that the live PCRs would produce for `token`.
    pub fn live_policy(&mut self, sealed: &SealedObject) -> Result<(Vec<u8>, PcrValues), TpmError> {
        let live = self.read_pcrs(sealed.bank, &sealed.pcrs)?;
        Ok((policy::sealing_policy(sealed.bank, &live, sealed.pin), live))
    }

    /// Check the live PCRs against the enrolled policy before asking the TPM, naming
    /// the PCRs that changed where the enrolment recorded their values. A token
    /// that contradicts itself is reported as such (see [`check_sealed`]), not as a
    /// PCR change.
    pub fn check_policy(
        &mut self,
        sealed: &SealedObject,
        phase_pcr: Option<u32>,
    ) -> Result<(), TpmError> {
        check_sealed(sealed)?;
        let (digest, live) = self.live_policy(sealed)?;
        if digest == sealed.policy_hash {
            return Ok(());
        }
        let mut changed = Vec::new();
        if let Some(expected) = &sealed.pcr_values {
            for (p, v) in &live {
                if expected.get(p).is_some_and(|e| e != v) {
                    changed.push(*p);
                }
            }
        } else if let Some(phase) = phase_pcr.filter(|p| sealed.pcrs.contains(p)) {
            // systemd enrolments record no values; the phase PCR is the one we can
            // judge (it is bound to zeros).
            if live
                .iter()
                .any(|(p, v)| *p == phase && v.iter().any(|&b| b != 0))
            {
                changed.push(phase);
            }
        }
        Err(TpmError::PcrMismatch {
            changed,
            bound: sealed.pcrs.clone(),
            phase: phase_pcr,
        })
    }

    /// Check the token's SRK against the TPM and return the parent to load under.
    fn parent_for(&mut self, sealed: &SealedObject) -> Result<(KeyHandle, bool), TpmError> {
        match &sealed.srk {
            Some(bytes) => {
                let recorded = SerializedKey::parse_srk(bytes)
                    .map_err(|e| TpmError::BadToken(e.to_string()))?;
                // One TPM command (ReadPublic, inside TR_FromTPMPublic, which also
                // checks that the name it returns is the digest of the public area).
                let handle = match self.persistent_handle(SRK_HANDLE) {
                    Err(TpmError::Command { err, .. })
                        if rc_kind(&err) == Some(Tss2ResponseCodeKind::Handle) =>
                    {
                        return Err(TpmError::SrkMissing)
                    }
                    other => other?,
                };
                let name = self
                    .ctx()?
                    .tr_get_name(handle.into())
                    .map_err(cmd("TR_GetName(SRK)"))?;
                if name.value() != recorded.name.as_slice() {
                    return Err(TpmError::SrkMismatch);
                }
                if !recorded.name_matches_public() {
                    return Err(TpmError::BadToken(
                        "tpm2_srk: the recorded public area is not the one its name names".into(),
                    ));
                }
                // Same name, same public area: the key the enrolment recorded. Its
                // attributes are judged from the token, without asking the TPM again.
                let public = Public::unmarshall(&recorded.public)
                    .map_err(|e| TpmError::BadToken(format!("tpm2_srk public area: {e}")))?;
                check_storage_key(&public)?;
                Ok((handle, false))
            }
            None => {
                // Enrolments from systemd < 254 derive a transient primary from the
                // older template (no noDA) on every use.
                let template = srk_template(sealed.primary_alg, false)?;
                let primary = self
                    .ctx()?
                    .execute_with_session(Some(AuthSession::Password), |c| {
                        c.create_primary(Hierarchy::Owner, template, None, None, None, None)
                    })
                    .map_err(cmd("CreatePrimary(legacy)"))?;
                Ok((primary.key_handle, true))
            }
        }
    }

    /// Whether the token's parent key is on this TPM (`tpm2_srk` matches the
    /// persistent SRK; a legacy token's primary can always be derived).
    pub fn check_parent(&mut self, sealed: &SealedObject) -> Result<(), TpmError> {
        let (parent, transient) = self.parent_for(sealed)?;
        if transient {
            self.flush(parent.into());
        }
        Ok(())
    }

    /// Unseal the token's secret. `pin` is required when the token says so.
    pub fn unseal(
        &mut self,
        sealed: &SealedObject,
        pin: Option<&[u8]>,
    ) -> Result<SecretBytes, TpmError> {
        if sealed.pin && pin.is_none() {
            return Err(TpmError::BadToken("this enrolment needs a PIN".into()));
        }
        let (parent, transient_parent) = self.parent_for(sealed)?;
        let result = self.unseal_under(parent, sealed, pin);
        if transient_parent {
            self.flush(parent.into());
        }
        result
    }

    /// The unseal sequence, ordered for the kernel's resource manager (which saves
    /// and reloads every live session and object around each command): the policy
    /// session is satisfied before the sealed object is loaded, and the Unseal ends
    /// the session itself, so no command runs with more than needed loaded.
    fn unseal_under(
        &mut self,
        parent: KeyHandle,
        sealed: &SealedObject,
        pin: Option<&[u8]>,
    ) -> Result<SecretBytes, TpmError> {
        let blob = split_blob(&sealed.blob)?;
        let mut object = None;
        let mut tries = 5;
        let result = loop {
            let attempt = self.policy_unseal_once(parent, &mut object, &blob, sealed, pin);
            match attempt {
                Err(e) if rc_kind_of(&e) == Some(Tss2ResponseCodeKind::PcrChanged) && tries > 0 => {
                    tries -= 1;
                    continue;
                }
                other => break other,
            }
        };
        if let Some(object) = object {
            self.flush(object.into());
        }
        result.map_err(|e| match e {
            // Without a PIN there is no authorisation value to get wrong: an
            // authorisation failure is the session's (its HMAC), not the operator's.
            UnsealStep::Tpm(err)
                if !sealed.pin
                    && matches!(
                        rc_kind(&err),
                        Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth)
                    ) =>
            {
                TpmError::Command {
                    what: "Unseal (session authorisation failed)",
                    err,
                }
            }
            UnsealStep::Tpm(err) => match self.classify(err, "Unseal") {
                // The refusal is about this token's PCRs: name them.
                TpmError::PcrMismatch { changed, phase, .. } => TpmError::PcrMismatch {
                    changed,
                    bound: sealed.pcrs.clone(),
                    phase,
                },
                other => other,
            },
            UnsealStep::Load(err) => self.classify(err, "Load(sealed object)"),
            UnsealStep::Other(e) => e,
        })
    }

    fn policy_unseal_once(
        &mut self,
        parent: KeyHandle,
        object: &mut Option<KeyHandle>,
        blob: &(Private, Public),
        sealed: &SealedObject,
        pin: Option<&[u8]>,
    ) -> Result<SecretBytes, UnsealStep> {
        // The policy session is salted with the parent (only the real TPM can
        // recover the salt). Without a PIN it also encrypts the response, so one
        // session does everything: one ECDH, one session's worth of TPM commands.
        // With a PIN a second salted session, bound to the object, encrypts it (the
        // PIN path is interactive; a few commands more do not matter). The policy
        // session is never the bound one: the PIN must fail in it, against the
        // DA-protected object, so that a wrong PIN counts against the TPM's
        // dictionary-attack budget.
        let session = self
            .ctx()?
            .execute_without_session(|c| {
                c.start_auth_session(
                    Some(parent),
                    None,
                    None,
                    SessionType::Policy,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(UnsealStep::Tpm)?
            .ok_or(UnsealStep::Other(TpmError::BadToken(
                "TPM returned no session".into(),
            )))?;
        let outcome = (|| {
            // continueSession clear: a successful Unseal flushes the session.
            let (attrs, mask) = SessionAttributesBuilder::new()
                .with_encrypt(!sealed.pin)
                .with_continue_session(false)
                .build();
            self.ctx()?
                .tr_sess_set_attributes(session, attrs, mask)
                .map_err(UnsealStep::Tpm)?;
            let ps = PolicySession::try_from(session).map_err(UnsealStep::Tpm)?;
            let slots: Vec<PcrSlot> = sealed
                .pcrs
                .iter()
                .map(|&p| pcr_slot(p))
                .collect::<Result<_, _>>()
                .map_err(UnsealStep::Other)?;
            let sel = PcrSelectionListBuilder::new()
                .with_selection(hashing_alg(sealed.bank), &slots)
                .build()
                .map_err(UnsealStep::Tpm)?;
            self.ctx()?
                .execute_without_session(|c| c.policy_pcr(ps, Digest::default(), sel))
                .map_err(UnsealStep::Tpm)?;
            if sealed.pin {
                self.ctx()?
                    .execute_without_session(|c| c.policy_auth_value(ps))
                    .map_err(UnsealStep::Tpm)?;
            }
            let loaded = match *object {
                Some(o) => o,
                None => {
                    let (private, public) = blob.clone();
                    let o = self
                        .ctx()?
                        .execute_with_session(Some(AuthSession::Password), |c| {
                            c.load(parent, private, public)
                        })
                        .map_err(UnsealStep::Load)?;
                    *object = Some(o);
                    if let (true, Some(pin)) = (sealed.pin, pin) {
                        let auth = policy::pin_auth_value(pin, sealed.salt.as_deref());
                        let auth = Auth::try_from(auth.as_bytes().to_vec())
                            .map_err(|e| UnsealStep::Other(cmd("auth value")(e)))?;
                        self.ctx()?
                            .tr_set_auth(o.into(), auth)
                            .map_err(|e| UnsealStep::Other(cmd("TR_SetAuth")(e)))?;
                    }
                    o
                }
            };
            let enc = if sealed.pin {
                Some(
                    self.encryption_session(parent, Some(loaded.into()))
                        .map_err(UnsealStep::Other)?,
                )
            } else {
                None
            };
            let data = self
                .ctx()?
                .execute_with_sessions((Some(session), enc, None), |c| c.unseal(loaded.into()));
            if let Some(enc) = enc {
                self.flush_session(enc);
            }
            let data = data.map_err(UnsealStep::Tpm)?;
            Ok(SecretBytes::from_slice(data.value()))
        })();
        if outcome.is_ok() {
            // The TPM has flushed it; only our record of it is left.
            let mut handle = ObjectHandle::from(tss_esapi::handles::SessionHandle::from(session));
            if let Some(ctx) = self.ctx.as_mut() {
                let _ = ctx.tr_close(&mut handle);
            }
        } else {
            self.flush_session(session);
        }
        outcome
    }

    /// Map TPM errors that mean something to the operator.
    fn classify(&mut self, err: tss_esapi::Error, what: &'static str) -> TpmError {
        match rc_kind(&err) {
            Some(Tss2ResponseCodeKind::AuthFail) | Some(Tss2ResponseCodeKind::BadAuth) => {
                TpmError::WrongPin {
                    tries_left: self.da_tries_left().ok(),
                }
            }
            Some(Tss2ResponseCodeKind::Lockout) => TpmError::Lockout {
                recovery_seconds: self.property(PropertyTag::LockoutInterval).ok().flatten(),
            },
            Some(Tss2ResponseCodeKind::PolicyFail) | Some(Tss2ResponseCodeKind::PcrChanged) => {
                TpmError::PcrMismatch {
                    changed: Vec::new(),
                    bound: Vec::new(),
                    phase: None,
                }
            }
            _ => TpmError::Command { what, err },
        }
    }

    /// A TPM property, read fresh every time (tss-esapi's `get_tpm_property` caches,
    /// which is wrong for counters such as the DA lockout counter).
    fn property(&mut self, tag: PropertyTag) -> Result<Option<u32>, TpmError> {
        let (data, _) = self
            .ctx()?
            .execute_without_session(|c| {
                c.get_capability(CapabilityType::TpmProperties, tag.into(), 1)
            })
            .map_err(cmd("GetCapability(properties)"))?;
        Ok(match data {
            CapabilityData::TpmProperties(props) => props
                .into_iter()
                .find(|p| p.property() == tag)
                .map(|p| p.value()),
            _ => None,
        })
    }

    /// Authorisation failures the TPM still tolerates before it locks out.
    pub fn da_tries_left(&mut self) -> Result<u32, TpmError> {
        let max = self.property(PropertyTag::MaxAuthFail)?.unwrap_or(0);
        let count = self.property(PropertyTag::LockoutCounter)?.unwrap_or(0);
        Ok(max.saturating_sub(count))
    }

    /// Whether the TPM is currently refusing DA-protected authorisations.
    pub fn in_lockout(&mut self) -> Result<bool, TpmError> {
        let max = self.property(PropertyTag::MaxAuthFail)?.unwrap_or(0);
        let count = self.property(PropertyTag::LockoutCounter)?.unwrap_or(0);
        Ok(max > 0 && count >= max)
    }

    /// Extend `pcr` in every active bank with the systemd-style volume-key HMAC and
    /// read it back: the latch must provably have moved the PCR.
    pub fn latch(
        &mut self,
        pcr: u32,
        volume_key: &[u8],
        name: &str,
        uuid: &str,
    ) -> Result<(), TpmError> {
        let banks = self.active_banks()?;
        if banks.is_empty() {
            return Err(TpmError::LatchFailed(
                "the TPM reports no active PCR bank".into(),
            ));
        }
        let mut before = Vec::new();
        let mut values = DigestValues::new();
        for &bank in &banks {
            let old = self.read_pcrs(bank, &[pcr])?.remove(0).1;
            let m = policy::latch_measurement(bank, volume_key, name, uuid);
            before.push((bank, policy::pcr_after_extend(bank, &old, m.as_bytes())));
            values.set(
                hashing_alg(bank),
                Digest::try_from(m.as_bytes().to_vec()).map_err(cmd("digest"))?,
            );
        }
        let handle = pcr_handle(pcr)?;
        self.ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.pcr_extend(handle, values)
            })
            .map_err(|e| TpmError::LatchFailed(e.to_string()))?;
        for (bank, expected) in before {
            let now = self.read_pcrs(bank, &[pcr])?.remove(0).1;
            if now != expected {
                return Err(TpmError::LatchFailed(format!(
                    "PCR {pcr} ({}) does not hold the expected value after the extend",
                    bank.name()
                )));
            }
        }
        Ok(())
    }

    /// Compare this crate's policy arithmetic with the TPM's own (a trial session
    /// over the live PCRs): enrolment refuses to write a token on disagreement.
    pub fn trial_policy(
        &mut self,
        bank: Bank,
        pcrs: &[u32],
        pin: bool,
    ) -> Result<Vec<u8>, TpmError> {
        let session = self
            .ctx()?
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Trial,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(cmd("StartAuthSession(trial)"))?
            .ok_or(TpmError::BadToken("TPM returned no session".into()))?;
        let result = (|| {
            let ps = PolicySession::try_from(session).map_err(cmd("policy session"))?;
            let slots: Vec<PcrSlot> = pcrs
                .iter()
                .map(|&p| pcr_slot(p))
                .collect::<Result<_, _>>()?;
            let sel = PcrSelectionListBuilder::new()
                .with_selection(hashing_alg(bank), &slots)
                .build()
                .map_err(cmd("PCR selection"))?;
            self.ctx()?
                .execute_without_session(|c| c.policy_pcr(ps, Digest::default(), sel))
                .map_err(cmd("PolicyPCR"))?;
            if pin {
                self.ctx()?
                    .execute_without_session(|c| c.policy_auth_value(ps))
                    .map_err(cmd("PolicyAuthValue"))?;
            }
            let d = self
                .ctx()?
                .execute_without_session(|c| c.policy_get_digest(ps))
                .map_err(cmd("PolicyGetDigest"))?;
            Ok(d.value().to_vec())
        })();
        self.flush_session(session);
        result
    }

    fn encryption_session(
        &mut self,
        salt_key: KeyHandle,
        bind: Option<ObjectHandle>,
    ) -> Result<AuthSession, TpmError> {
        let session = self
            .ctx()?
            .execute_without_session(|c| {
                c.start_auth_session(
                    Some(salt_key),
                    bind,
                    None,
                    SessionType::Hmac,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(|e| match rc_kind(&e) {
                // The salt is encrypted to the key we hold; a different TPM behind
                // the same handle cannot decrypt it.
                Some(Tss2ResponseCodeKind::Value) | Some(Tss2ResponseCodeKind::Integrity) => {
                    TpmError::SrkMismatch
                }
                _ => TpmError::Command {
                    what: "StartAuthSession(salted)",
                    err: e,
                },
            })?
            .ok_or(TpmError::BadToken("TPM returned no session".into()))?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        self.ctx()?
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(cmd("TRSess_SetAttributes"))?;
        Ok(session)
    }

    fn flush_session(&mut self, session: AuthSession) {
        let handle = tss_esapi::handles::SessionHandle::from(session);
        self.flush(ObjectHandle::from(handle));
    }

    fn flush(&mut self, handle: ObjectHandle) {
        // Best effort: a leaked transient handle is reclaimed when the context
        // closes, and there is nothing better to do with the error here.
        if let Some(ctx) = self.ctx.as_mut() {
            let _ = ctx.flush_context(handle);
        }
    }
}

/// Whether `token` agrees with itself, in software: the policy digest it records
/// (`tpm2-policy-hash`) must be the one its sealed object carries (the authPolicy
/// inside `tpm2-blob`), and the one its recorded PCR values give, where it records
/// them all. A PCR change moves none of these; only an edit of the header (or its
/// corruption) does, so a mismatch is reported as tampering, never as "reseal".
pub fn check_sealed(sealed: &SealedObject) -> Result<(), TpmError> {
    let (_, public) =
        split_blob(&sealed.blob).map_err(|e| TpmError::TokenAltered(format!("its {e}")))?;
    if let Public::KeyedHash { auth_policy, .. } = &public {
        if auth_policy.value() != sealed.policy_hash.as_slice() {
            return Err(TpmError::TokenAltered(
                "its tpm2-policy-hash is not the policy its sealed object (tpm2-blob) carries"
                    .into(),
            ));
        }
    }
    if let Some(recorded) = &sealed.pcr_values {
        if recorded.keys().copied().eq(sealed.pcrs.iter().copied()) {
            let values: PcrValues = recorded.iter().map(|(p, v)| (*p, v.clone())).collect();
            if policy::sealing_policy(sealed.bank, &values, sealed.pin) != sealed.policy_hash {
                return Err(TpmError::TokenAltered(
                    "its tpm2-policy-hash is not the policy its recorded PCR values \
                     (vaultguard_pcr_values) give"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

enum UnsealStep {
    Tpm(tss_esapi::Error),
    Load(tss_esapi::Error),
    Other(TpmError),
}

impl From<TpmError> for UnsealStep {
    fn from(e: TpmError) -> Self {
        UnsealStep::Other(e)
    }
}

fn rc_kind_of(step: &UnsealStep) -> Option<Tss2ResponseCodeKind> {
    match step {
        UnsealStep::Tpm(e) | UnsealStep::Load(e) => rc_kind(e),
        UnsealStep::Other(_) => None,
    }
}

fn hashing_alg(bank: Bank) -> HashingAlgorithm {
    match bank {
        Bank::Sha1 => HashingAlgorithm::Sha1,
        Bank::Sha256 => HashingAlgorithm::Sha256,
        Bank::Sha384 => HashingAlgorithm::Sha384,
        Bank::Sha512 => HashingAlgorithm::Sha512,
    }
}

fn pcr_slot(pcr: u32) -> Result<PcrSlot, TpmError> {
    if pcr > 23 {
        return Err(TpmError::BadToken(format!("PCR {pcr} out of range")));
    }
    PcrSlot::try_from(1u32 << pcr).map_err(cmd("PCR slot"))
}

fn pcr_handle(pcr: u32) -> Result<PcrHandle, TpmError> {
    if pcr > 23 {
        return Err(TpmError::LatchFailed(format!("PCR {pcr} out of range")));
    }
    PcrHandle::try_from(pcr).map_err(cmd("PCR handle"))
}

/// u16 length prefix, as TPM2B_* marshalling does.
fn sized(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + bytes.len());
    v.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    v.extend_from_slice(bytes);
    v
}

/// Split `tpm2-blob` (TPM2B_PRIVATE then TPM2B_PUBLIC) and refuse anything else.
pub fn split_blob(blob: &[u8]) -> Result<(Private, Public), TpmError> {
    let bad = |m: &str| TpmError::BadToken(format!("tpm2-blob {m}"));
    let take = |at: usize| -> Result<(&[u8], usize), TpmError> {
        let hdr = blob.get(at..at + 2).ok_or_else(|| bad("is truncated"))?;
        let n = u16::from_be_bytes([hdr[0], hdr[1]]) as usize;
        let body = blob
            .get(at + 2..at + 2 + n)
            .ok_or_else(|| bad("is truncated"))?;
        Ok((body, at + 2 + n))
    };
    let (private, at) = take(0)?;
    let (public, end) = take(at)?;
    if end != blob.len() {
        return Err(bad("has trailing bytes"));
    }
    if private.is_empty() || public.is_empty() {
        return Err(bad("has an empty part"));
    }
    let private =
        Private::try_from(private.to_vec()).map_err(|_| bad("private part is too large"))?;
    let public = Public::unmarshall(public).map_err(|_| bad("public part does not parse"))?;
    if !matches!(public, Public::KeyedHash { .. }) {
        return Err(bad("does not hold a sealed data object"));
    }
    Ok((private, public))
}

fn check_storage_key(public: &Public) -> Result<(), TpmError> {
    let attrs = public.object_attributes();
    if !(attrs.restricted() && attrs.decrypt() && !attrs.sign_encrypt() && attrs.fixed_tpm()) {
        return Err(TpmError::SrkUnusable(
            "the key there is not a restricted decryption (storage) key".into(),
        ));
    }
    if !matches!(public, Public::Ecc { .. } | Public::Rsa { .. }) {
        return Err(TpmError::SrkUnusable(
            "the object there is not an RSA or ECC key".into(),
        ));
    }
    Ok(())
}

/// The SRK templates systemd uses: `new_style` is the TCG provisioning-guidance
/// template (with noDA), the other the one systemd < 254 derived each time.
pub fn srk_template(alg: PrimaryAlg, new_style: bool) -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .with_no_da(new_style)
        .build()
        .map_err(cmd("SRK attributes"))?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs);
    let public = match alg {
        PrimaryAlg::Ecc => builder
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_signing_key(false)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(cmd("SRK ECC parameters"))?,
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build(),
        PrimaryAlg::Rsa => builder
            .with_public_algorithm(PublicAlgorithm::Rsa)
            .with_rsa_parameters(
                PublicRsaParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_scheme(RsaScheme::Null)
                    .with_key_bits(RsaKeyBits::Rsa2048)
                    .with_exponent(RsaExponent::default())
                    .with_is_signing_key(false)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .map_err(cmd("SRK RSA parameters"))?,
            )
            .with_rsa_unique_identifier(PublicKeyRsa::default())
            .build(),
    };
    public.map_err(cmd("SRK template"))
}

/// The sealed data object: keyed hash, policy-only authorisation (no userWithAuth),
/// noDA unless a PIN is set so that power cuts never count against the TPM's
/// dictionary-attack budget; with a PIN, wrong guesses must count.
fn sealed_template(policy: &[u8], pin: bool) -> Result<Public, TpmError> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(!pin)
        .build()
        .map_err(cmd("sealed attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(Digest::try_from(policy.to_vec()).map_err(cmd("policy digest"))?)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::try_from(vec![0u8; 32]).map_err(cmd("unique"))?)
        .build()
        .map_err(cmd("sealed template"))
}
