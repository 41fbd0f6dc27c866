//! The TPM edge: SRK, sealing, unsealing, PCR reads, the phase-PCR latch and the
//! audit log's NV anchor.
//!
//! Sealing follows systemd-cryptenroll so that enrolments interoperate: a 32-byte
//! secret in a keyed-hash object under the persistent SRK (0x81000001), policy =
//! PolicyPCR (+ PolicyAuthValue with a PIN). Unsealing (`unseal`) runs the policy
//! in a session salted with the SRK, so only the real TPM can complete it; without
//! a PIN that same session also encrypts the response (one ECDH, the fewest
//! commands), with a PIN a second salted session bound to the object encrypts it
//! and the PIN is checked in the policy session against the DA-protected object.
//! Either way the secret never crosses the bus in clear.
//!
//! Layout: `error` (TpmError), `unseal` (unseal and the refusal checks), `pcr`
//! (PCR reads, latch, trial policy), `da` (dictionary-attack state), `template`
//! (SRK and sealed-object templates), `marshal` (the TPM2B reader), `policy`
//! (pure policy arithmetic), `signed` (signed PCR policies: the policy key, the
//! signature file, signing), `srk` (the serialized SRK), `nv` (audit anchor),
//! `eventlog` (the firmware event log: replay, prediction, refusal diff).
//! This module takes its own input ([`SealedObject`]), never touches LUKS
//! headers and never logs a secret: errors carry PCR numbers, handles and TPM
//! response kinds only.

pub mod counter;
mod da;
mod error;
pub mod eventlog;
mod marshal;
pub mod nv;
mod pcr;
pub mod policy;
pub mod signed;
pub mod srk;
mod template;
mod unseal;

use error::{cmd, rc_kind};
pub use error::{Alteration, BlobDefect, LatchFailure, Malformed, SrkDefect, TpmError};
use marshal::sized;
pub use template::srk_template;
use template::{check_storage_key, sealed_template};
pub use unseal::{check_sealed, split_blob, Approval};

use crate::secret::SecretBytes;
use policy::Bank;
use srk::{SerializedKey, SRK_HANDLE};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, SessionType, StartupType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{Auth, CapabilityData, SensitiveData, SymmetricDefinition};
use tss_esapi::tcti_ldr::{DeviceConfig, TctiNameConf};
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

/// Length of the sealed secret, as systemd uses.
pub const SECRET_LEN: usize = 32;

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
    /// A signed PCR policy (PolicyAuthorize) in front of the literal one.
    pub signed: Option<SignedPolicy>,
}

/// A signed PCR policy: the key whose signatures approve PolicyPCR digests over
/// `pcrs`, and the signature file the caller found (see [`signed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPolicy {
    pub key: signed::PolicyKey,
    pub pcrs: Vec<u32>,
    /// The signature file, or why there is none usable (the unseal is then
    /// refused with that reason, and the passphrase is asked).
    pub signatures: Result<signed::SignatureFile, String>,
    /// Where the signature file is (or was looked for), for messages.
    pub source: String,
    /// A revocable enrolment's revocation counter (NV index handle), see
    /// [`counter`].
    pub counter: Option<u32>,
}

impl SignedPolicy {
    /// The policyRef of the enrolment's PolicyAuthorize: the revocation
    /// counter's name, or empty (systemd's).
    pub fn policy_ref(&self) -> Vec<u8> {
        self.counter.map(counter::counter_name).unwrap_or_default()
    }
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
        Tpm::open_unless(tcti, timeout, &|| false)
    }

    /// [`Tpm::open`], but the wait for a device node ends early once `done()` says
    /// the caller no longer needs the TPM (another token opened the volume).
    pub fn open_unless(
        tcti: &str,
        timeout: Duration,
        done: &dyn Fn() -> bool,
    ) -> Result<Tpm, TpmError> {
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
                if done() {
                    return Err(absent(format!(
                        "{path} not waited for: another token opened the volume"
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
        self.seal_signed(req, None, &[])
    }

    /// Seal a fresh secret; with `key`, to a signed policy (PolicyAuthorize by
    /// `key`, then the literal PCRs of `req` and the PIN), as systemd-cryptenroll
    /// --tpm2-public-key does. `policy_ref` is empty, or a revocable
    /// enrolment's counter name ([`SignedPolicy::policy_ref`]).
    pub fn seal_signed(
        &mut self,
        req: &SealRequest<'_>,
        key: Option<&signed::PolicyKey>,
        policy_ref: &[u8],
    ) -> Result<Sealed, TpmError> {
        let (srk, srk_ser) = self.srk_get_or_create()?;
        let mut values = self.read_pcrs(req.bank, req.pcrs)?;
        if let Some(phase) = req.phase_pcr {
            values.retain(|(p, _)| *p != phase);
            values.push((phase, vec![0u8; req.bank.digest_len()]));
        }
        values.sort_by_key(|(p, _)| *p);
        let policy = match key {
            Some(k) => {
                signed::signed_sealing_policy(k, req.bank, &values, req.pin.is_some(), policy_ref)
            }
            None => policy::sealing_policy(req.bank, &values, req.pin.is_some()),
        };

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

    /// Seal `data` (not a fresh secret) to the PCR policy of `pcrs` under the
    /// transient primary of the legacy template (the one `tpm2_createprimary -C o
    /// -G ecc` derives), as clevis' `tpm2` pin does. Returns the TPM2B_PRIVATE and
    /// TPM2B_PUBLIC of the sealed object.
    pub fn seal_data_legacy_primary(
        &mut self,
        bank: Bank,
        pcrs: &[u32],
        data: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let template = template::srk_template(PrimaryAlg::Ecc, false)?;
        let primary = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(cmd("CreatePrimary(legacy)"))?
            .key_handle;
        let result = (|| {
            let mut values = self.read_pcrs(bank, pcrs)?;
            values.sort_by_key(|(p, _)| *p);
            let policy = policy::sealing_policy(bank, &values, false);
            let sealed = sealed_template(&policy, false)?;
            let data = SensitiveData::try_from(data.to_vec()).map_err(cmd("sensitive data"))?;
            let enc = self.encryption_session(primary, None)?;
            let created = self
                .ctx()?
                .execute_with_sessions((Some(enc), None, None), |c| {
                    c.create(primary, sealed, None, Some(data), None, None)
                })
                .map_err(cmd("Create(sealed object)"));
            self.flush_session(enc);
            let created = created?;
            Ok((
                sized(created.out_private.value()),
                sized(
                    &created
                        .out_public
                        .marshall()
                        .map_err(cmd("marshal public"))?,
                ),
            ))
        })();
        self.flush(primary.into());
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
            .ok_or(TpmError::NoSession { what: "salted" })?;
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
