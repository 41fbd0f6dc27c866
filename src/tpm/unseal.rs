//! Unsealing, and the checks that explain a refusal before or after the TPM
//! gives it: the sealed object's self-consistency (tampering, in software), its
//! parent key (a swapped or cleared TPM) and the PCR policy (which PCRs changed).

use super::error::{Alteration, BlobDefect, Malformed};
use super::marshal::Reader;
use super::pcr::{hashing_alg, pcr_slot};
use super::policy;
use super::signed;
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
    Auth, Digest, EccParameter, EccSignature, Name, Nonce, PcrSelectionListBuilder, PcrSlot,
    Private, Public, PublicKeyRsa, RsaSignature, Signature, SymmetricDefinition, VerifiedTicket,
};
use tss_esapi::traits::UnMarshall;
use tss_esapi::tss2_esys::{TPM2B_DIGEST, TPMT_TK_VERIFIED};

impl Tpm {
    /// Compute the policy digest that the live PCRs would produce for `sealed`.
    pub fn live_policy(&mut self, sealed: &SealedObject) -> Result<(Vec<u8>, PcrValues), TpmError> {
        let live = self.read_pcrs(sealed.bank, &sealed.pcrs)?;
        Ok((expected_policy(sealed, &live), live))
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
            if sealed.signed.is_some() {
                self.signed_approval(sealed)?;
            }
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

    /// The signature that approves the live values of the signed policy's PCRs
    /// (and, in a revocable enrolment, the live revocation counter). One
    /// PCR_Read (and the counter's NV_ReadPublic + NV_Read); refuses with the
    /// reason no signature fits (none found, other key, other PCRs, other
    /// values, an older counter value).
    pub fn signed_approval(&mut self, sealed: &SealedObject) -> Result<Approval, TpmError> {
        self.approval(sealed, true)
    }

    /// [`Tpm::signed_approval`]; without `check_live`, a file with exactly one
    /// signature by the key over the policy's PCRs gives it without reading the
    /// PCRs (one TPM command less per unlock): the TPM itself then refuses it at
    /// PolicyAuthorize if it does not fit, and the refusal is explained with the
    /// full check.
    fn approval(&mut self, sealed: &SealedObject, check_live: bool) -> Result<Approval, TpmError> {
        let Some(sp) = &sealed.signed else {
            return Err(TpmError::Signature(
                "the enrolment has no signed policy".into(),
            ));
        };
        let file = match &sp.signatures {
            Ok(f) => f,
            Err(why) => return Err(TpmError::Signature(why.clone())),
        };
        let pkfp = sp.key.fingerprint();
        // A revocable enrolment takes only entries signed for a counter value
        // (the value tells PolicyNV what to compare); a plain one only others.
        let revocable = sp.counter.is_some();
        if !check_live {
            let mut candidates = file.entries(sealed.bank).into_iter().filter(|e| {
                e.pcrs == sp.pcrs && e.pkfp == pkfp && e.counter.is_some() == revocable
            });
            if let (Some(only), None) = (candidates.next(), candidates.next()) {
                return Ok(Approval {
                    pol: only.pol,
                    sig: only.sig,
                    counter_value: only.counter,
                    ticket: only.ticket,
                });
            }
        }
        let live = self.read_pcrs(sealed.bank, &sp.pcrs)?;
        let Some(h) = sp.counter else {
            let pol = signed::approved_policy(sealed.bank, &live);
            return match file.find(sealed.bank, &sp.pcrs, &pkfp, &pol) {
                Some(e) => Ok(Approval {
                    pol,
                    sig: e.sig,
                    counter_value: None,
                    ticket: e.ticket,
                }),
                None => Err(TpmError::Signature(format!(
                    "{} does not approve this boot: {}",
                    sp.source,
                    file.explain_miss(sealed.bank, &sp.pcrs, &pkfp)
                ))),
            };
        };
        let value = self.read_revocation_counter(h)?.ok_or_else(|| {
            TpmError::Signature(format!(
                "the revocation counter {h:#010x} was never written (defined by hand?)"
            ))
        })?;
        let name = super::counter::counter_name(h);
        let pol = signed::approved_policy_revocable(sealed.bank, &live, &name, value);
        if let Some(e) = file.find(sealed.bank, &sp.pcrs, &pkfp, &pol) {
            return Ok(Approval {
                pol,
                sig: e.sig,
                counter_value: Some(value),
                ticket: e.ticket,
            });
        }
        // Signed for these PCR values, but for an older counter value: revoked.
        let revoked: Vec<u64> = file
            .entries(sealed.bank)
            .into_iter()
            .filter(|e| e.pcrs == sp.pcrs && e.pkfp == pkfp)
            .filter_map(|e| {
                let v = e.counter?;
                (v != value
                    && e.pol == signed::approved_policy_revocable(sealed.bank, &live, &name, v))
                .then_some(v)
            })
            .collect();
        Err(TpmError::Signature(match revoked.iter().max() {
            Some(v) => format!(
                "{} approves this boot only for revocation counter {h:#010x} = {v}, and the \
                 counter is at {value}: that signature was withdrawn (policy revoke-older)",
                sp.source
            ),
            None if file
                .entries(sealed.bank)
                .iter()
                .any(|e| e.pcrs == sp.pcrs && e.pkfp == pkfp && e.counter.is_none()) =>
            {
                format!(
                    "{} does not approve this boot for revocation counter {h:#010x} = {value}: \
                     the enrolment is revocable and takes only signatures made with \
                     `policy sign --revocation-counter`",
                    sp.source
                )
            }
            None => format!(
                "{} does not approve this boot for revocation counter {h:#010x} = {value}: {}",
                sp.source,
                file.explain_miss(sealed.bank, &sp.pcrs, &pkfp)
            ),
        }))
    }

    /// PolicyPCR over the signed PCRs (then, in a revocable enrolment,
    /// PolicyNV: the counter equals the signed value), then the key's approval
    /// of that digest: LoadExternal + VerifySignature (a ticket), FlushContext,
    /// PolicyAuthorize.
    fn policy_authorize_steps(
        &mut self,
        ps: PolicySession,
        sealed: &SealedObject,
        sp: &super::SignedPolicy,
        approval: &Approval,
    ) -> Result<(), UnsealStep> {
        let (pol, sig) = (&approval.pol, &approval.sig);
        let sel = pcr_selection(sealed.bank, &sp.pcrs).map_err(UnsealStep::Other)?;
        self.ctx()?
            .execute_without_session(|c| c.policy_pcr(ps, Digest::default(), sel))
            .map_err(UnsealStep::Tpm)?;
        if let Some(h) = sp.counter {
            let value = approval.counter_value.ok_or_else(|| {
                UnsealStep::Other(TpmError::Signature(format!(
                    "{}: the signature names no revocation counter value",
                    sp.source
                )))
            })?;
            let nv = self
                .revocation_counter_handle(h)
                .map_err(UnsealStep::Other)?;
            let operand = Digest::try_from(value.to_be_bytes().to_vec())
                .map_err(|e| UnsealStep::Other(cmd("PolicyNV operand")(e)))?;
            let r = self
                .ctx()?
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.policy_nv(ps, nv.into(), nv, operand, 0, signed::TPM_EO_EQ)
                });
            self.close_nv(nv);
            r.map_err(UnsealStep::Tpm)?;
        }
        let policy_ref = sp.policy_ref();
        let bad =
            |what: &str| UnsealStep::Other(TpmError::Signature(format!("{}: {what}", sp.source)));
        let approved = Digest::try_from(pol.to_vec()).map_err(|_| bad("digest size"))?;
        let name = Name::try_from(sp.key.name()).map_err(|_| bad("key name size"))?;
        let reference = Nonce::try_from(policy_ref.clone()).map_err(|_| bad("policyRef size"))?;
        // This TPM's ticket from an earlier VerifySignature (`policy ticket`): one
        // command instead of four. A stale (TPM cleared) or foreign ticket is
        // refused by the TPM, which leaves the session as it was; the signature
        // is then verified as without one.
        if let Some(ticket) = approval.ticket.as_deref().and_then(unmarshal_ticket) {
            let (a, r) = (approved.clone(), reference.clone());
            if self
                .ctx()?
                .execute_without_session(|c| c.policy_authorize(ps, a, r, &name, ticket))
                .is_ok()
            {
                return Ok(());
            }
        }
        let ticket = self
            .verify_policy_signature(&sp.key, pol, &policy_ref, sig)
            .map_err(|e| match e {
                TicketError::Unusable(what) => bad(&what),
                TicketError::NoTpm(e) => UnsealStep::Other(e),
                TicketError::Tpm(e) => UnsealStep::Tpm(e),
                TicketError::Rejected(e) => UnsealStep::Other(TpmError::Signature(format!(
                    "the TPM rejected the signature in {} for PCRs {:?} ({e}): it was not made by the enrolled key",
                    sp.source, sp.pcrs
                ))),
            })?;
        self.ctx()?
            .execute_without_session(|c| c.policy_authorize(ps, approved, reference, &name, ticket))
            .map_err(UnsealStep::Tpm)?;
        Ok(())
    }

    /// The TPM's verification of `sig` over SHA-256(`pol` ‖ `policy_ref`) by
    /// `key`: LoadExternal (owner hierarchy, so that the ticket outlives this
    /// boot), VerifySignature, FlushContext.
    fn verify_policy_signature(
        &mut self,
        key: &signed::PolicyKey,
        pol: &[u8],
        policy_ref: &[u8],
        sig: &[u8],
    ) -> Result<VerifiedTicket, TicketError> {
        let bad = |what: &str| TicketError::Unusable(what.to_string());
        let public = Public::unmarshall(&key.tpmt_public())
            .map_err(|_| bad("the enrolled public key cannot be loaded"))?;
        let signature = if key.is_rsa() {
            let s = PublicKeyRsa::try_from(sig.to_vec())
                .map_err(|_| bad("an RSA signature of the wrong size"))?;
            Signature::RsaSsa(
                RsaSignature::create(HashingAlgorithm::Sha256, s)
                    .map_err(|_| bad("an unusable RSA signature"))?,
            )
        } else {
            let (r, s) = signed::ecdsa_r_s(sig).ok_or_else(|| bad("not a DER ECDSA signature"))?;
            Signature::EcDsa(
                EccSignature::create(
                    HashingAlgorithm::Sha256,
                    EccParameter::try_from(r).map_err(|_| bad("ECDSA r too large"))?,
                    EccParameter::try_from(s).map_err(|_| bad("ECDSA s too large"))?,
                )
                .map_err(|_| bad("an unusable ECDSA signature"))?,
            )
        };
        let ahash = Digest::try_from(policy::Bank::Sha256.hash(&[pol, policy_ref]))
            .map_err(|_| bad("digest size"))?;
        let ctx = self.ctx().map_err(TicketError::NoTpm)?;
        let key = ctx
            .execute_without_session(|c| c.load_external_public(public, Hierarchy::Owner))
            .map_err(TicketError::Tpm)?;
        let ticket = ctx.execute_without_session(|c| c.verify_signature(key, ahash, signature));
        self.flush(key.into());
        ticket.map_err(TicketError::Rejected)
    }

    /// This TPM's verification ticket for a signature-file entry (marshalled
    /// TPMT_TK_VERIFIED, for the file's [`signed::TICKET_FIELD`]). `policy_ref`
    /// is the enrolment's (the revocation counter's name, or empty).
    pub fn signature_ticket(
        &mut self,
        key: &signed::PolicyKey,
        entry: &signed::SignatureEntry,
        policy_ref: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        match self.verify_policy_signature(key, &entry.pol, policy_ref, &entry.sig) {
            Ok(t) => marshal_ticket(t),
            Err(TicketError::Unusable(what)) => Err(TpmError::Signature(what)),
            Err(TicketError::NoTpm(e)) => Err(e),
            Err(TicketError::Tpm(e)) => Err(cmd("LoadExternal(policy key)")(e)),
            Err(TicketError::Rejected(e)) => Err(TpmError::Signature(format!(
                "the TPM rejected the signature ({e}): it was not made by the enrolled key"
            ))),
        }
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

    /// The parent to unseal under, without asking the TPM: the recorded SRK is
    /// checked in software (the persistent SRK handle, a name that is the digest
    /// of its public area, a storage key's attributes) and deserialized into the
    /// ESYS context (no ReadPublic). Whether the TPM's SRK is that key is not asked
    /// here: a salt encrypted to another key gives the TPM another session key and
    /// the sealed object does not load under another parent, so nothing opens
    /// under a swapped SRK; [`Tpm::unseal`] then explains the failure with
    /// [`Tpm::parent_for`]'s full check. Returns the handle and whether it is a
    /// transient primary (flush) rather than a deserialized record (close).
    ///
    /// Only for unseals without a PIN: with one, the PIN's HMAC goes to the TPM
    /// keyed with the session key, and a session salted to a key written into
    /// the header by someone else would give that someone a key to try PINs
    /// against offline; [`Tpm::unseal`] checks the live SRK first then.
    fn parent_recorded(&mut self, sealed: &SealedObject) -> Result<(KeyHandle, bool), TpmError> {
        let Some(bytes) = &sealed.srk else {
            return self.parent_for(sealed);
        };
        let recorded =
            SerializedKey::parse_srk(bytes).map_err(|e| TpmError::Malformed(Malformed::Srk(e)))?;
        if !recorded.name_matches_public() {
            return Err(TpmError::Malformed(Malformed::SrkNameNotOfPublic));
        }
        let public = Public::unmarshall(&recorded.public)
            .map_err(|_| TpmError::Malformed(Malformed::SrkPublicUnparsable))?;
        check_storage_key(&public)?;
        let handle = self
            .ctx()?
            .tr_deserialize(&recorded.to_bytes())
            .map_err(cmd("TR_Deserialize(tpm2_srk)"))?;
        Ok((KeyHandle::from(handle), false))
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

    /// Done with a parent from [`Tpm::parent_for`] / `parent_recorded`: a
    /// transient primary is flushed; for the persistent SRK only the library's
    /// record of it is closed (the key stays).
    fn release_parent(&mut self, parent: KeyHandle, transient: bool) {
        if transient {
            self.flush(parent.into());
        } else if let Some(ctx) = self.ctx.as_mut() {
            let mut h = ObjectHandle::from(parent);
            let _ = ctx.tr_close(&mut h);
        }
    }

    /// Whether this TPM made `sealed`'s object: TPM2_Load checks the private
    /// part's integrity against the public area (its authPolicy included), which
    /// only the TPM that sealed it, under the recorded parent, can have produced.
    /// Needs no policy and unseals nothing: it tells a blob written into the
    /// header offline from one this TPM made.
    pub fn check_made_here(&mut self, sealed: &SealedObject) -> Result<(), TpmError> {
        let (private, public) = split_blob(&sealed.blob)?;
        let (parent, transient) = self.parent_for(sealed)?;
        let loaded = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.load(parent, private, public)
            });
        self.release_parent(parent, transient);
        let object = loaded.map_err(cmd("Load(sealed object)"))?;
        self.flush(object.into());
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
        let (parent, transient_parent) = if sealed.pin {
            self.parent_for(sealed)?
        } else {
            self.parent_recorded(sealed)?
        };
        let result = self.unseal_under(parent, sealed, pin);
        self.release_parent(parent, transient_parent);
        match result {
            // A failure that a missing or swapped SRK would also cause: if the
            // TPM's SRK is not the recorded one, say that instead.
            Err(e @ TpmError::Command { .. }) if sealed.srk.is_some() => {
                match self.check_parent(sealed) {
                    Err(why @ (TpmError::SrkMissing | TpmError::SrkMismatch)) => Err(why),
                    _ => Err(e),
                }
            }
            other => other,
        }
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
        // A signature picked without reading the PCRs (the file's only one for
        // this key) that the TPM refused: say why, from the live values.
        if let (Err(UnsealStep::Tpm(_)), Some(_)) = (&result, &sealed.signed) {
            if let Err(why @ TpmError::Signature(_)) = self.approval(sealed, true) {
                return Err(why);
            }
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
        // A signed policy: find the signature for the live PCRs first, so that a
        // boot nobody signed is refused before any session is started.
        let approval = match &sealed.signed {
            Some(_) => Some(self.approval(sealed, false).map_err(UnsealStep::Other)?),
            None => None,
        };
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
            if let (Some(sp), Some(approval)) = (&sealed.signed, &approval) {
                self.policy_authorize_steps(ps, sealed, sp, approval)?;
            }
            // A signed enrolment may have no literal PCRs (then no PolicyPCR here).
            if !(sealed.signed.is_some() && sealed.pcrs.is_empty()) {
                let sel = pcr_selection(sealed.bank, &sealed.pcrs).map_err(UnsealStep::Other)?;
                self.ctx()?
                    .execute_without_session(|c| c.policy_pcr(ps, Digest::default(), sel))
                    .map_err(UnsealStep::Tpm)?;
            }
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
            if expected_policy(sealed, &values) != sealed.policy_hash {
                return Err(TpmError::Altered(Alteration::PolicyNotTheRecordedPcrs));
            }
        }
    }
    Ok(())
}

/// A TPML_PCR_SELECTION of `pcrs` in `bank`.
fn pcr_selection(
    bank: policy::Bank,
    pcrs: &[u32],
) -> Result<tss_esapi::structures::PcrSelectionList, TpmError> {
    let slots: Vec<PcrSlot> = pcrs
        .iter()
        .map(|&p| pcr_slot(p))
        .collect::<Result<_, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(hashing_alg(bank), &slots)
        .build()
        .map_err(cmd("PCR selection"))
}

/// A signature that approves this boot, as the unseal presents it to the TPM.
#[derive(Debug, Clone)]
pub struct Approval {
    /// The approved policy digest.
    pub pol: Vec<u8>,
    pub sig: Vec<u8>,
    /// The revocation counter value it was signed for (revocable enrolments).
    pub counter_value: Option<u64>,
    /// A verification ticket for `sig` from this TPM (`policy ticket`), if any.
    pub ticket: Option<Vec<u8>>,
}

/// Why the TPM gave no verification ticket.
enum TicketError {
    /// The key or signature cannot be put to the TPM (the line says which).
    Unusable(String),
    /// The TPM connection is gone.
    NoTpm(TpmError),
    /// LoadExternal failed.
    Tpm(tss_esapi::Error),
    /// VerifySignature refused the signature.
    Rejected(tss_esapi::Error),
}

/// TPMT_TK_VERIFIED as the TPM marshals it: tag, hierarchy, TPM2B digest.
fn marshal_ticket(t: VerifiedTicket) -> Result<Vec<u8>, TpmError> {
    let raw = TPMT_TK_VERIFIED::try_from(t).map_err(cmd("verification ticket"))?;
    let len = usize::from(raw.digest.size).min(raw.digest.buffer.len());
    let mut out = Vec::with_capacity(8 + len);
    out.extend_from_slice(&raw.tag.to_be_bytes());
    out.extend_from_slice(&raw.hierarchy.to_be_bytes());
    out.extend_from_slice(&raw.digest.size.to_be_bytes());
    out.extend_from_slice(&raw.digest.buffer[..len]);
    Ok(out)
}

/// A ticket from the signature file, if it is a TPMT_TK_VERIFIED at all (one
/// that is not is ignored: the signature is verified instead).
fn unmarshal_ticket(b: &[u8]) -> Option<VerifiedTicket> {
    let tag = u16::from_be_bytes(b.get(0..2)?.try_into().ok()?);
    let hierarchy = u32::from_be_bytes(b.get(2..6)?.try_into().ok()?);
    let size = u16::from_be_bytes(b.get(6..8)?.try_into().ok()?);
    let digest = b.get(8..)?;
    if digest.len() != usize::from(size) || digest.len() > 64 {
        return None;
    }
    let mut buffer = [0u8; 64];
    buffer[..digest.len()].copy_from_slice(digest);
    VerifiedTicket::try_from(TPMT_TK_VERIFIED {
        tag,
        hierarchy,
        digest: TPM2B_DIGEST { size, buffer },
    })
    .ok()
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

/// The sealing policy `sealed` has with `literal` as its literal PCR values.
fn expected_policy(sealed: &SealedObject, literal: &[(u32, Vec<u8>)]) -> Vec<u8> {
    match &sealed.signed {
        Some(s) => {
            signed::signed_sealing_policy(&s.key, sealed.bank, literal, sealed.pin, &s.policy_ref())
        }
        None => policy::sealing_policy(sealed.bank, literal, sealed.pin),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_garbage_is_no_ticket() {
        // TPM_ST_VERIFIED (0x8022), TPM_RH_OWNER, a 32-byte HMAC.
        let mut bytes = vec![0x80, 0x22, 0x40, 0, 0, 1, 0, 32];
        bytes.extend(1..=32u8);
        let t = unmarshal_ticket(&bytes).expect("a TPMT_TK_VERIFIED");
        assert_eq!(marshal_ticket(t).unwrap(), bytes);
        // Another tag (TPM_ST_HASHCHECK), a size that lies, truncated, empty.
        let mut other_tag = bytes.clone();
        other_tag[1] = 0x24;
        let mut lying = bytes.clone();
        lying[7] = 31;
        for bad in [&other_tag[..], &lying[..], &bytes[..7], &[][..]] {
            assert!(unmarshal_ticket(bad).is_none(), "{bad:?}");
        }
    }
}
