//! Unsealing, and the checks that explain a refusal before or after the TPM
//! gives it: the sealed object's self-consistency (tampering, in software), its
//! parent key (a swapped or cleared TPM) and the PCR policy (which PCRs changed).

use super::error::{Alteration, BlobDefect, Malformed};
use super::marshal::Reader;
use super::pcr::{hashing_alg, pcr_slot};
use super::policy;
use super::srk::{SerializedKey, SRK_HANDLE};
use super::template::{check_storage_key, srk_template};
use super::{cmd, rc_kind, PcrValues, SealedObject, Tpm, TpmError};

use crate::secret::SecretBytes;
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{PropertyTag, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Digest, PcrSelectionListBuilder, PcrSlot, Private, Public, SymmetricDefinition,
};
use tss_esapi::traits::UnMarshall;

impl Tpm {
    /// Compute the policy digest that the live PCRs would produce for `sealed`.
    pub fn live_policy(&mut self, sealed: &SealedObject) -> Result<(Vec<u8>, PcrValues), TpmError> {
        let live = self.read_pcrs(sealed.bank, &sealed.pcrs)?;
        Ok((policy::sealing_policy(sealed.bank, &live, sealed.pin), live))
    }

    /// Check the live PCRs against the enrolled policy before asking the TPM, naming
    /// the PCRs that changed where the enrolment recorded their values. A record
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

    /// Check the recorded SRK against the TPM and return the parent to load under.
    pub(super) fn parent_for(
        &mut self,
        sealed: &SealedObject,
    ) -> Result<(KeyHandle, bool), TpmError> {
        match &sealed.srk {
            Some(bytes) => {
                let recorded = SerializedKey::parse_srk(bytes)
                    .map_err(|e| TpmError::Malformed(Malformed::Srk(e)))?;
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
                    return Err(TpmError::Malformed(Malformed::SrkNameNotOfPublic));
                }
                // Same name, same public area: the key the enrolment recorded. Its
                // attributes are judged from the record, without asking the TPM again.
                let public = Public::unmarshall(&recorded.public)
                    .map_err(|_| TpmError::Malformed(Malformed::SrkPublicUnparsable))?;
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

    /// Whether the sealed object's parent key is on this TPM (`tpm2_srk` matches the
    /// persistent SRK; a legacy enrolment's primary can always be derived).
    pub fn check_parent(&mut self, sealed: &SealedObject) -> Result<(), TpmError> {
        let (parent, transient) = self.parent_for(sealed)?;
        if transient {
            self.flush(parent.into());
        }
        Ok(())
    }

    /// Unseal the secret. `pin` is required when the record says so.
    pub fn unseal(
        &mut self,
        sealed: &SealedObject,
        pin: Option<&[u8]>,
    ) -> Result<SecretBytes, TpmError> {
        if sealed.pin && pin.is_none() {
            return Err(TpmError::PinRequired);
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
    pub(super) fn unseal_under(
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
                // The refusal is about this object's PCRs: name them.
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

    pub(super) fn policy_unseal_once(
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
            .ok_or(UnsealStep::Other(TpmError::NoSession { what: "policy" }))?;
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
    pub(super) fn classify(&mut self, err: tss_esapi::Error, what: &'static str) -> TpmError {
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
}

/// Whether `sealed` agrees with itself, in software: the policy digest it records
/// (`tpm2-policy-hash`) must be the one its sealed object carries (the authPolicy
/// inside `tpm2-blob`), and the one its recorded PCR values give, where it records
/// them all. A PCR change moves none of these; only an edit of the header (or its
/// corruption) does, so a mismatch is reported as tampering, never as "reseal".
pub fn check_sealed(sealed: &SealedObject) -> Result<(), TpmError> {
    let (_, public) = split_blob(&sealed.blob).map_err(|e| match e {
        TpmError::Malformed(Malformed::Blob(d)) => TpmError::Altered(Alteration::Blob(d)),
        other => other,
    })?;
    if let Public::KeyedHash { auth_policy, .. } = &public {
        if auth_policy.value() != sealed.policy_hash.as_slice() {
            return Err(TpmError::Altered(Alteration::PolicyNotTheObjects));
        }
    }
    if let Some(recorded) = &sealed.pcr_values {
        if recorded.keys().copied().eq(sealed.pcrs.iter().copied()) {
            let values: PcrValues = recorded.iter().map(|(p, v)| (*p, v.clone())).collect();
            if policy::sealing_policy(sealed.bank, &values, sealed.pin) != sealed.policy_hash {
                return Err(TpmError::Altered(Alteration::PolicyNotTheRecordedPcrs));
            }
        }
    }
    Ok(())
}

pub(super) enum UnsealStep {
    Tpm(tss_esapi::Error),
    Load(tss_esapi::Error),
    Other(TpmError),
}

impl From<TpmError> for UnsealStep {
    fn from(e: TpmError) -> Self {
        UnsealStep::Other(e)
    }
}

pub(super) fn rc_kind_of(step: &UnsealStep) -> Option<Tss2ResponseCodeKind> {
    match step {
        UnsealStep::Tpm(e) | UnsealStep::Load(e) => rc_kind(e),
        UnsealStep::Other(_) => None,
    }
}

/// Split `tpm2-blob` (TPM2B_PRIVATE then TPM2B_PUBLIC) and refuse anything else.
pub fn split_blob(blob: &[u8]) -> Result<(Private, Public), TpmError> {
    let bad = |d: BlobDefect| TpmError::Malformed(Malformed::Blob(d));
    let mut r = Reader::new(blob);
    let private = r
        .sized("private part")
        .map_err(|_| bad(BlobDefect::Truncated))?;
    let public = r
        .sized("public part")
        .map_err(|_| bad(BlobDefect::Truncated))?;
    if r.remaining() != 0 {
        return Err(bad(BlobDefect::TrailingBytes));
    }
    if private.is_empty() || public.is_empty() {
        return Err(bad(BlobDefect::EmptyPart));
    }
    let private =
        Private::try_from(private.to_vec()).map_err(|_| bad(BlobDefect::PrivateTooLarge))?;
    let public = Public::unmarshall(public).map_err(|_| bad(BlobDefect::PublicUnparsable))?;
    if !matches!(public, Public::KeyedHash { .. }) {
        return Err(bad(BlobDefect::NotSealedData));
    }
    Ok((private, public))
}
