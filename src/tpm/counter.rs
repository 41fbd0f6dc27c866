//! The revocation counter of a revocable signed policy: a TPM NV counter index
//! whose value every signature names, so that bumping it withdraws every older
//! signature (`vaultguard policy revoke-older`).
//!
//! Construction (README, "Signed PCR policies"): the approved digest a signature
//! covers is PolicyPCR(signed PCRs) then PolicyNV(counter == value at signing);
//! the sealed object's PolicyAuthorize carries the counter's name as its
//! policyRef, so only signatures made for this counter (over SHA-256(approved ||
//! name)) are accepted, never a plain systemd-measure one for the same PCRs. The
//! TPM compares the live counter in PolicyNV; a counter only counts up, and one
//! defined again after a deletion starts above the highest value any counter on
//! the TPM ever had (TPM 2.0 Part 1, 37.2.2), so an old signature cannot become
//! valid again by deleting and re-creating the index.
//!
//! The index: TPM_NT_COUNTER, 8 bytes, SHA-256 name, written only with owner
//! authorisation (OWNERWRITE: bumping is an administrator's act), read with its
//! empty password (AUTHREAD: PolicyNV in the initramfs needs no owner
//! authorisation), NO_DA (no secret to guess). It is incremented once when
//! defined: an unwritten counter cannot be read, and its name changes when it
//! is first written.

use super::nv::{differences, nv_tpm_handle, owner_index_public, OWNER_NV_RANGE};
use super::{cmd, rc_kind, Tpm, TpmError};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{NvIndexType, PropertyTag};
use tss_esapi::handles::{NvIndexHandle, TpmHandle};
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::NvPublic;

/// Where `enroll --revocation-counter` suggests defining it: beside the audit
/// index (0x013FA0D1), in the owner range, for the same reasons.
pub const DEFAULT_REVOCATION_COUNTER: u32 = 0x013F_A0D2;

const TPMA_NV_OWNERWRITE: u32 = 1 << 1;
const TPM_NT_COUNTER: u32 = 1 << 4;
const TPMA_NV_AUTHREAD: u32 = 1 << 18;
const TPMA_NV_NO_DA: u32 = 1 << 25;
const TPMA_NV_WRITTEN: u32 = 1 << 29;
/// The attributes vaultguard defines the counter with.
pub const COUNTER_ATTRIBUTES: u32 =
    TPMA_NV_OWNERWRITE | TPM_NT_COUNTER | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA;

/// Check that `handle` is one a revocation counter may live at.
pub fn check_handle(handle: u32) -> Result<(), String> {
    if OWNER_NV_RANGE.contains(&handle) {
        Ok(())
    } else {
        Err(format!(
            "revocation counter {handle:#010x} is outside the owner NV range \
             {:#010x}-{:#010x} (suggested: {DEFAULT_REVOCATION_COUNTER:#010x})",
            OWNER_NV_RANGE.start(),
            OWNER_NV_RANGE.end()
        ))
    }
}

/// Parse an NV index handle as operators write it (`0x013fa0d2`, or decimal)
/// and check it is one a revocation counter may live at.
pub fn parse_handle(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse(),
    };
    let h = parsed.map_err(|_| {
        format!(
            "`{}` is not an NV index handle (e.g. {DEFAULT_REVOCATION_COUNTER:#010x})",
            t.escape_default()
        )
    })?;
    check_handle(h)?;
    Ok(h)
}

/// The counter's TPM name once written: SHA-256 name algorithm || SHA-256 of its
/// TPMS_NV_PUBLIC. Computed in software, so `policy sign` can sign for a counter
/// on a machine without the TPM; the TPM uses the index's real name, so an index
/// defined with other attributes matches no signature.
pub fn counter_name(handle: u32) -> Vec<u8> {
    let mut public = Vec::with_capacity(14);
    public.extend_from_slice(&handle.to_be_bytes());
    public.extend_from_slice(&0x000Bu16.to_be_bytes()); // nameAlg SHA-256
    public.extend_from_slice(&(COUNTER_ATTRIBUTES | TPMA_NV_WRITTEN).to_be_bytes());
    public.extend_from_slice(&0u16.to_be_bytes()); // authPolicy: empty
    public.extend_from_slice(&8u16.to_be_bytes()); // dataSize
    let mut name = 0x000Bu16.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(&public));
    name
}

fn counter_public(handle: u32) -> Result<NvPublic, TpmError> {
    let attrs = NvIndexAttributesBuilder::new()
        .with_nv_index_type(NvIndexType::Counter)
        .with_owner_write(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
        .map_err(cmd("NV attributes"))?;
    owner_index_public(handle, attrs, 8)
}

fn refused(msg: String) -> TpmError {
    TpmError::Signature(msg)
}

/// Why the index at `handle` is not a revocation counter vaultguard defined, if
/// it is not (compared as the audit index is with its definition: type,
/// attributes but the TPM-managed ones, name algorithm, size, no policy).
fn not_ours(handle: u32, public: &NvPublic) -> Result<Option<String>, TpmError> {
    let attrs = u32::try_from(public.attributes()).unwrap_or(0);
    let ours = differences(public, &counter_public(handle)?).is_empty();
    Ok((!ours).then(|| {
        format!(
            "the NV index {handle:#010x} is not a vaultguard revocation counter (attributes \
             {attrs:#010x}, {} bytes; expected a counter with attributes {COUNTER_ATTRIBUTES:#010x}, \
             8 bytes): choose another index with --revocation-counter",
            public.data_size()
        )
    }))
}

impl Tpm {
    /// Define the revocation counter at `handle` (owner authorisation, empty) and
    /// write it once; an index already there with the counter's definition is
    /// kept as it is. Returns the counter's value.
    pub fn define_revocation_counter(&mut self, handle: u32) -> Result<u64, TpmError> {
        check_handle(handle).map_err(refused)?;
        if let Some((public, nv)) = self.nv_public(handle)? {
            self.close_nv(nv);
            if let Some(why) = not_ours(handle, &public)? {
                return Err(refused(why));
            }
            if let Some(v) = self.read_revocation_counter(handle)? {
                return Ok(v);
            }
            return self.increment_revocation_counter(handle);
        }
        if self.property(PropertyTag::Permanent)?.unwrap_or(0) & 1 != 0 {
            return Err(TpmError::OwnerAuthSetForCounter { handle });
        }
        let wanted = counter_public(handle)?;
        let defined = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_define_space(Provision::Owner, None, wanted)
            });
        let nv =
            defined.map_err(|e| owner_auth(e, handle, "NV_DefineSpace(revocation counter)"))?;
        self.close_nv(nv);
        self.increment_revocation_counter(handle)
    }

    /// The counter's value: `None` when it is defined but never written, an
    /// error naming it when it is missing or not a revocation counter.
    pub fn read_revocation_counter(&mut self, handle: u32) -> Result<Option<u64>, TpmError> {
        let nv = self.our_counter(handle)?;
        let read = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::NvIndex(nv), nv, 8, 0)
            });
        self.close_nv(nv);
        match read {
            Ok(buf) => {
                let b: [u8; 8] = buf.value().try_into().map_err(|_| {
                    refused(format!(
                        "the revocation counter {handle:#010x} gave {} bytes, not 8",
                        buf.value().len()
                    ))
                })?;
                Ok(Some(u64::from_be_bytes(b)))
            }
            Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::NvUninitialized) => Ok(None),
            Err(e) => Err(cmd("NV_Read(revocation counter)")(e)),
        }
    }

    /// Bump the counter (owner authorisation): every signature for an older
    /// value stops opening anything. Returns the new value.
    pub fn increment_revocation_counter(&mut self, handle: u32) -> Result<u64, TpmError> {
        let nv = self.our_counter(handle)?;
        let bumped = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_increment(NvAuth::Owner, nv)
            });
        self.close_nv(nv);
        bumped.map_err(|e| owner_auth(e, handle, "NV_Increment(revocation counter)"))?;
        self.read_revocation_counter(handle)?.ok_or_else(|| {
            refused(format!(
                "the revocation counter {handle:#010x} reads as unwritten after an increment"
            ))
        })
    }

    /// An ESYS handle for the counter at `handle` (the caller closes it), once
    /// its public area shows it is a revocation counter as vaultguard defines it.
    fn our_counter(&mut self, handle: u32) -> Result<NvIndexHandle, TpmError> {
        let Some((public, nv)) = self.nv_public(handle)? else {
            return Err(missing(handle));
        };
        match not_ours(handle, &public) {
            Ok(None) => Ok(nv),
            Ok(Some(why)) => {
                self.close_nv(nv);
                Err(refused(why))
            }
            Err(e) => {
                self.close_nv(nv);
                Err(e)
            }
        }
    }

    /// An ESYS handle for the counter for PolicyNV: one NV_ReadPublic (inside
    /// TR_FromTPMPublic, which also checks the name against the public area);
    /// its attributes are not judged here: PolicyNV extends the TPM's own name
    /// of the index, which matches no signature unless it is the counter's.
    /// The caller closes it.
    pub(super) fn revocation_counter_handle(
        &mut self,
        handle: u32,
    ) -> Result<NvIndexHandle, TpmError> {
        let tpm_handle = TpmHandle::NvIndex(nv_tpm_handle(handle)?);
        match self
            .ctx()?
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
        {
            Ok(obj) => Ok(NvIndexHandle::from(obj)),
            Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::Handle) => Err(missing(handle)),
            Err(e) => Err(cmd("TR_FromTPMPublic(revocation counter)")(e)),
        }
    }

    pub(super) fn close_nv(&mut self, nv: NvIndexHandle) {
        let mut obj = nv.into();
        if let Some(ctx) = self.ctx.as_mut() {
            let _ = ctx.tr_close(&mut obj);
        }
    }
}

/// An owner-authorised command on the counter at `handle` failed: a refused
/// authorisation means an owner password is set (vaultguard uses the empty one).
fn owner_auth(e: tss_esapi::Error, handle: u32, what: &'static str) -> TpmError {
    match rc_kind(&e) {
        Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth) => {
            TpmError::OwnerAuthSetForCounter { handle }
        }
        _ => cmd(what)(e),
    }
}

fn missing(handle: u32) -> TpmError {
    refused(format!(
        "the revocation counter {handle:#010x} is not defined on this TPM (deleted, or the \
         TPM was cleared): signatures for this enrolment cannot be checked; enrol again \
         (enroll --public-key … --revocation-counter) to define a new one"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_counter_is_in_the_owner_range_and_not_the_audit_index() {
        assert!(check_handle(DEFAULT_REVOCATION_COUNTER).is_ok());
        assert_ne!(
            DEFAULT_REVOCATION_COUNTER,
            super::super::nv::DEFAULT_AUDIT_NV_INDEX
        );
        let e = check_handle(0x0180_0400).unwrap_err();
        assert!(e.contains("outside the owner NV range"), "{e}");
    }

    #[test]
    fn handles_parse_in_hex_or_decimal_and_only_in_the_owner_range() {
        assert_eq!(parse_handle("0x013fa0d2"), Ok(0x013f_a0d2));
        assert_eq!(parse_handle("20947154"), Ok(0x013f_a0d2));
        for bad in ["", "0x", "nv", "0x1_0000_0000", "0x01800400", "-1"] {
            assert!(parse_handle(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_software_name_uses_the_attributes_the_counter_is_defined_with() {
        let public = counter_public(DEFAULT_REVOCATION_COUNTER).unwrap();
        assert_eq!(
            u32::try_from(public.attributes()).unwrap(),
            COUNTER_ATTRIBUTES
        );
        assert_eq!(public.data_size(), 8);
    }

    #[test]
    fn the_name_is_sha256_of_the_written_public_area() {
        // TPMS_NV_PUBLIC: 013fa0d2 000b 22040012 0000 0008 (hashed by hand with
        // sha256sum; the swtpm test checks it against the TPM's own name).
        let n = counter_name(DEFAULT_REVOCATION_COUNTER);
        assert_eq!(&n[..2], &[0x00, 0x0b]);
        let mut public = vec![0x01, 0x3f, 0xa0, 0xd2, 0x00, 0x0b, 0x22, 0x04, 0x00, 0x12];
        public.extend_from_slice(&[0, 0, 0, 8]);
        assert_eq!(&n[2..], Sha256::digest(&public).as_slice());
        assert_ne!(counter_name(DEFAULT_REVOCATION_COUNTER + 1), n);
    }
}
