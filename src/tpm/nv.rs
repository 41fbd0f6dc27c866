//! The audit log's anchor in the TPM: an NV index of type EXTEND (a PCR that lives
//! in NV memory, survives reboots and is reset only by undefining it), created at
//! enrolment, into which the supervisor extends each audit entry's hash.
//!
//! The index can only be extended, never written: whoever holds root can add to it
//! but cannot set it back to a value that an earlier, longer or different log
//! replays to, so a rewritten or truncated log no longer matches it. This module
//! provides the TPM half only (define, extend, read, and the software arithmetic
//! [`nv_extend`] that a verifier replays); the order of append and extend, and what
//! a mismatch means, belong to `audit`.
//!
//! tss-esapi 7 does not wrap TPM2_NV_Extend, so the extend runs through the C
//! ESAPI directly on a short connection of its own ([`raw`]); everything else uses
//! tss-esapi. Each operation is one or two TPM commands with the index's (empty)
//! password: no policy or HMAC session, nothing that slows the unseal path.

use super::{cmd, rc_kind, Tpm, TpmError};
use sha2::{Digest as _, Sha256};
use std::fmt;
use tss_esapi::attributes::NvIndexAttributesBuilder;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{NvIndexType, PropertyTag};
use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::resource_handles::{NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{NvPublic, NvPublicBuilder};

/// The NV index vaultguard defines for the audit anchor unless told otherwise.
///
/// In the owner range (0x01000000–0x013FFFFF), which the TCG leaves to the
/// machine's owner, near its top: `tpm2_nvdefine` without an index takes the
/// lowest free one from 0x01000000 upwards, and firmware that keeps indexes in
/// this range (cr50's at 0x0100100x) sits at the bottom too. systemd's indexes
/// are outside the owner range altogether (0x01800400–0x018005FF, its TCG
/// assignment, and 0x01D10200 onwards, the Linux registry's). `A0D1` reads as
/// "audit" to whoever finds it in `tpm2_getcap handles-nv-index`.
pub const DEFAULT_AUDIT_NV_INDEX: u32 = 0x013F_A0D1;

/// The owner range, where [`Tpm::define_audit_index`] accepts a handle.
pub const OWNER_NV_RANGE: std::ops::RangeInclusive<u32> = 0x0100_0000..=0x013F_FFFF;

/// Size of the index's value: one SHA-256 digest.
pub const AUDIT_NV_SIZE: usize = 32;

/// What [`Tpm::define_audit_index`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defined {
    /// The index did not exist and was created.
    Created,
    /// The index already existed with exactly the audit index's definition (it
    /// keeps its value: defining again never resets the anchor).
    AlreadyThere,
}

/// How an existing NV index differs from the audit index's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvDifference {
    /// Not an EXTEND index (`found`: the TPM_NT value, 0 ordinary, 1 counter, 2
    /// bits, 8/9 PIN fail/pass).
    Type { found: u8 },
    /// Other attribute bits (TPMA_NV, the type and the TPM-managed state bits
    /// masked out).
    Attributes { found: u32, expected: u32 },
    /// Name algorithm other than SHA-256 (TPM_ALG_ID).
    NameAlg { found: u16 },
    /// Data size other than 32 bytes.
    Size { found: usize },
    /// It carries an authorisation policy (the audit index has none).
    Policy,
}

impl fmt::Display for NvDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NvDifference::Type { found } => {
                write!(f, "its type is TPM_NT {found:#x}, not EXTEND (0x4)")
            }
            NvDifference::Attributes { found, expected } => {
                write!(f, "its attributes are {found:#010x}, not {expected:#010x}")
            }
            NvDifference::NameAlg { found } => {
                write!(f, "its name algorithm is {found:#06x}, not sha256 (0x000b)")
            }
            NvDifference::Size { found } => write!(f, "its size is {found} bytes, not 32"),
            NvDifference::Policy => write!(f, "it has an authorisation policy"),
        }
    }
}

/// The value an EXTEND index with name algorithm SHA-256 holds after extending
/// `old` with `data`: SHA-256(old || data), as TPM2_NV_Extend computes it (TPM 2.0
/// Part 3, 31.11). An index that was defined but never written counts as 32 zero
/// bytes: the first extend gives SHA-256(0^32 || data) (checked against swtpm by
/// `tests/tpm_swtpm.rs::nv_extend_matches_the_tpm`), exactly like a PCR from reset.
pub fn nv_extend(old: &[u8; 32], data: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(old);
    h.update(data);
    h.finalize().into()
}

/// TPMA_NV bits that the TPM manages (set by writes and locks), not the definer:
/// masked out when comparing an existing index with ours.
const TPM_MANAGED: u32 = (1 << 29) | (1 << 28) | (1 << 11);
/// TPMA_NV's TPM_NT field (bits 7:4).
const NT_MASK: u32 = 0xF0;

/// The audit index's public area: EXTEND, SHA-256, 32 bytes, empty authValue
/// usable for reading and writing (AUTHREAD|AUTHWRITE) so that the supervisor
/// needs no owner authorisation, NO_DA so that nothing about it can count towards
/// a dictionary-attack lockout (there is no secret to guess). Not ORDERLY: every
/// extend reaches NV, so a power cut right after an extend cannot lose it.
fn audit_public(handle: u32) -> Result<NvPublic, TpmError> {
    let attrs = NvIndexAttributesBuilder::new()
        .with_nv_index_type(NvIndexType::Extend)
        .with_auth_write(true)
        .with_auth_read(true)
        .with_no_da(true)
        .build()
        .map_err(cmd("NV attributes"))?;
    owner_index_public(handle, attrs, AUDIT_NV_SIZE)
}

/// The public area of an owner-range index vaultguard defines: `attrs`, `size`
/// bytes, SHA-256 name, no authorisation policy.
pub(super) fn owner_index_public(
    handle: u32,
    attrs: tss_esapi::attributes::NvIndexAttributes,
    size: usize,
) -> Result<NvPublic, TpmError> {
    NvPublicBuilder::new()
        .with_nv_index(nv_tpm_handle(handle)?)
        .with_index_name_algorithm(HashingAlgorithm::Sha256)
        .with_index_attributes(attrs)
        .with_data_area_size(size)
        .build()
        .map_err(cmd("NV public area"))
}

pub(super) fn nv_tpm_handle(handle: u32) -> Result<NvIndexTpmHandle, TpmError> {
    if !OWNER_NV_RANGE.contains(&handle) {
        return Err(TpmError::NvHandleOutOfRange { handle });
    }
    NvIndexTpmHandle::new(handle).map_err(cmd("NV index handle"))
}

fn attr_bits(public: &NvPublic) -> u32 {
    // Via the builder's validation, never fails for a public area the TPM gave.
    u32::try_from(public.attributes()).unwrap_or(0)
}

/// How `found` differs from `expected` (empty: the same definition).
pub(super) fn differences(found: &NvPublic, expected: &NvPublic) -> Vec<NvDifference> {
    let mut out = Vec::new();
    let (f, e) = (attr_bits(found), attr_bits(expected));
    if f & NT_MASK != e & NT_MASK {
        out.push(NvDifference::Type {
            found: ((f & NT_MASK) >> 4) as u8,
        });
    }
    let keep = !(NT_MASK | TPM_MANAGED);
    if f & keep != e & keep {
        out.push(NvDifference::Attributes {
            found: f & keep,
            expected: e & keep,
        });
    }
    if found.name_algorithm() != expected.name_algorithm() {
        out.push(NvDifference::NameAlg {
            found: u16::from(tss_esapi::constants::AlgorithmIdentifier::from(
                found.name_algorithm(),
            )),
        });
    }
    if found.data_size() != expected.data_size() {
        out.push(NvDifference::Size {
            found: found.data_size(),
        });
    }
    if !found.authorization_policy().value().is_empty() {
        out.push(NvDifference::Policy);
    }
    out
}

impl Tpm {
    /// Define the audit index at `handle` in the owner hierarchy (empty owner
    /// authorisation). Idempotent: an index already there with the same
    /// definition is left as it is, value included.
    pub fn define_audit_index(&mut self, handle: u32) -> Result<Defined, TpmError> {
        let wanted = audit_public(handle)?;
        if let Some((found, _)) = self.nv_public(handle)? {
            let differs = differences(&found, &wanted);
            return if differs.is_empty() {
                Ok(Defined::AlreadyThere)
            } else {
                Err(TpmError::NvIndexConflict { handle, differs })
            };
        }
        // TPMA_PERMANENT bit 0, ownerAuthSet: with an owner password we cannot
        // define anything, and a failed attempt would count against the lockout.
        if self.property(PropertyTag::Permanent)?.unwrap_or(0) & 1 != 0 {
            return Err(TpmError::OwnerAuthSet);
        }
        let defined = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_define_space(Provision::Owner, None, wanted)
            });
        match defined {
            Ok(nv) => {
                let mut obj = nv.into();
                let _ = self.ctx()?.tr_close(&mut obj);
                Ok(Defined::Created)
            }
            Err(e)
                if matches!(
                    rc_kind(&e),
                    Some(Tss2ResponseCodeKind::AuthFail | Tss2ResponseCodeKind::BadAuth)
                ) =>
            {
                Err(TpmError::OwnerAuthSet)
            }
            Err(e) => Err(cmd("NV_DefineSpace(audit index)")(e)),
        }
    }

    /// Extend the audit index at `handle` with `data` (TPM2_NV_Extend).
    pub fn extend_audit_index(&mut self, handle: u32, data: &[u8; 32]) -> Result<(), TpmError> {
        nv_tpm_handle(handle)?;
        // The connection is closed for the raw ESAPI call (see `raw`); an absent
        // index shows there as TPM_RC_HANDLE and is mapped below.
        self.with_connection_closed(|tcti| raw::nv_extend(tcti, handle, data))
            .map_err(|e| match e {
                TpmError::Command { err, .. }
                    if rc_kind(&err) == Some(Tss2ResponseCodeKind::Handle) =>
                {
                    TpmError::NvIndexAbsent { handle }
                }
                other => other,
            })
    }

    /// The audit index's value; `None` while it is defined but was never
    /// extended (the TPM refuses to read it then: TPM_RC_NV_UNINITIALIZED).
    pub fn read_audit_index(&mut self, handle: u32) -> Result<Option<[u8; 32]>, TpmError> {
        let Some((public, nv)) = self.nv_public(handle)? else {
            return Err(TpmError::NvIndexAbsent { handle });
        };
        let size = public.data_size();
        let read = self
            .ctx()?
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::NvIndex(nv), nv, size as u16, 0)
            });
        let mut obj = nv.into();
        let _ = self.ctx()?.tr_close(&mut obj);
        match read {
            Ok(buf) => {
                let value: [u8; 32] =
                    buf.value()
                        .try_into()
                        .map_err(|_| TpmError::NvIndexConflict {
                            handle,
                            differs: vec![NvDifference::Size {
                                found: buf.value().len(),
                            }],
                        })?;
                Ok(Some(value))
            }
            Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::NvUninitialized) => Ok(None),
            Err(e) => Err(cmd("NV_Read(audit index)")(e)),
        }
    }

    /// The public area of the NV index at `handle` and an ESYS handle for it (the
    /// caller closes it), or `None` when no index is defined there.
    pub(super) fn nv_public(
        &mut self,
        handle: u32,
    ) -> Result<Option<(NvPublic, NvIndexHandle)>, TpmError> {
        let tpm_handle = TpmHandle::NvIndex(nv_tpm_handle(handle)?);
        let obj = match self
            .ctx()?
            .execute_without_session(|c| c.tr_from_tpm_public(tpm_handle))
        {
            Ok(obj) => obj,
            Err(e) if rc_kind(&e) == Some(Tss2ResponseCodeKind::Handle) => return Ok(None),
            Err(e) => return Err(cmd("TR_FromTPMPublic(NV index)")(e)),
        };
        let nv = NvIndexHandle::from(obj);
        match self.ctx()?.nv_read_public(nv) {
            Ok((public, _)) => Ok(Some((public, nv))),
            Err(e) => {
                let mut obj = nv.into();
                let _ = self.ctx()?.tr_close(&mut obj);
                Err(cmd("NV_ReadPublic(audit index)")(e))
            }
        }
    }
}

/// TPM2_NV_Extend through the C ESAPI, which tss-esapi 7 does not wrap: one
/// connection of its own (the caller has closed the main one), one
/// TR_FromTPMPublic (which also checks the index's name), one NV_Extend with the
/// index's empty password.
mod raw {
    use super::super::TpmError;
    use std::ffi::CString;
    use std::ptr::null_mut;
    use tss_esapi::constants::response_code::Tss2ResponseCode;
    use tss_esapi::tss2_esys::{
        Esys_Finalize, Esys_Initialize, Esys_NV_Extend, Esys_TR_Close, Esys_TR_FromTPMPublic,
        Tss2_TctiLdr_Finalize, Tss2_TctiLdr_Initialize, ESYS_CONTEXT, ESYS_TR, ESYS_TR_NONE,
        ESYS_TR_PASSWORD, TPM2B_MAX_NV_BUFFER, TSS2_RC, TSS2_TCTI_CONTEXT,
    };

    fn check(what: &'static str, rc: TSS2_RC) -> Result<(), TpmError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(TpmError::Command {
                what,
                err: tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(rc)),
            })
        }
    }

    /// Owns the TCTI and ESYS contexts and finalises them in the right order.
    struct Conn {
        tcti: *mut TSS2_TCTI_CONTEXT,
        esys: *mut ESYS_CONTEXT,
    }

    impl Drop for Conn {
        fn drop(&mut self) {
            if !self.esys.is_null() {
                // SAFETY: `esys` came from Esys_Initialize and is finalised once,
                // before the TCTI it uses.
                unsafe { Esys_Finalize(&mut self.esys) };
            }
            if !self.tcti.is_null() {
                // SAFETY: `tcti` came from Tss2_TctiLdr_Initialize and nothing uses
                // it any more (the ESYS context above is gone).
                unsafe { Tss2_TctiLdr_Finalize(&mut self.tcti) };
            }
        }
    }

    pub(super) fn nv_extend(tcti: &str, handle: u32, data: &[u8; 32]) -> Result<(), TpmError> {
        let absent = |detail: String| TpmError::Absent {
            tcti: tcti.to_string(),
            detail,
        };
        let conf = CString::new(tcti).map_err(|_| absent("TCTI string contains NUL".into()))?;
        let mut conn = Conn {
            tcti: null_mut(),
            esys: null_mut(),
        };
        // SAFETY: `conf` is a NUL-terminated string that outlives the call; the
        // out-pointer is a valid place for the new context.
        let rc = unsafe { Tss2_TctiLdr_Initialize(conf.as_ptr(), &mut conn.tcti) };
        if rc != 0 {
            return Err(absent(format!("TCTI initialisation failed ({rc:#x})")));
        }
        // SAFETY: `conn.tcti` is a live TCTI context; a null ABI version asks for
        // the default; the out-pointer is valid.
        check("Esys_Initialize", unsafe {
            Esys_Initialize(&mut conn.esys, conn.tcti, null_mut())
        })?;
        let mut nv: ESYS_TR = ESYS_TR_NONE;
        // SAFETY: `conn.esys` is live; `nv` is a valid out-pointer.
        check("TR_FromTPMPublic(NV index)", unsafe {
            Esys_TR_FromTPMPublic(
                conn.esys,
                handle,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &mut nv,
            )
        })?;
        let mut buf = TPM2B_MAX_NV_BUFFER {
            size: data.len() as u16,
            buffer: [0; 2048],
        };
        buf.buffer[..data.len()].copy_from_slice(data);
        // SAFETY: `conn.esys` and `nv` are live; `buf` outlives the call. The
        // index authorises itself (AUTHWRITE) with its empty password.
        let extended = check("NV_Extend(audit index)", unsafe {
            Esys_NV_Extend(
                conn.esys,
                nv,
                nv,
                ESYS_TR_PASSWORD,
                ESYS_TR_NONE,
                ESYS_TR_NONE,
                &buf,
            )
        });
        // SAFETY: `nv` is a live ESYS handle of `conn.esys`, closed once (this
        // frees the library's record only; the index stays defined).
        unsafe { Esys_TR_Close(conn.esys, &mut nv) };
        extended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> [u8; 32] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    #[test]
    fn nv_extend_is_sha256_of_old_then_data() {
        // SHA-256 of 64 zero bytes (old = unwritten, data = zeros), a well-known
        // constant (as PCR 0 after extending zeros once).
        assert_eq!(
            nv_extend(&[0; 32], &[0; 32]),
            hex("f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a92759fb4b")
        );
        // Order matters: old first, then data.
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_ne!(nv_extend(&a, &b), nv_extend(&b, &a));
        let mut cat = a.to_vec();
        cat.extend_from_slice(&b);
        assert_eq!(nv_extend(&a, &b), <[u8; 32]>::from(Sha256::digest(&cat)));
    }

    #[test]
    fn the_default_index_is_in_the_owner_range() {
        assert!(OWNER_NV_RANGE.contains(&DEFAULT_AUDIT_NV_INDEX));
        assert!(audit_public(DEFAULT_AUDIT_NV_INDEX).is_ok());
    }

    #[test]
    fn handles_outside_the_owner_range_are_refused() {
        for h in [0x0180_0420, 0x01C0_0002, 0x8100_0001, 0x00FF_FFFF] {
            assert!(matches!(
                audit_public(h),
                Err(TpmError::NvHandleOutOfRange { handle }) if handle == h
            ));
        }
    }

    #[test]
    fn differences_ignore_tpm_managed_bits_and_name_the_rest() {
        let ours = audit_public(DEFAULT_AUDIT_NV_INDEX).unwrap();
        assert!(differences(&ours, &ours).is_empty());
        // An ordinary index with owner write.
        let other = NvPublicBuilder::new()
            .with_nv_index(nv_tpm_handle(DEFAULT_AUDIT_NV_INDEX).unwrap())
            .with_index_name_algorithm(HashingAlgorithm::Sha1)
            .with_index_attributes(
                NvIndexAttributesBuilder::new()
                    .with_owner_write(true)
                    .with_auth_read(true)
                    .with_written(true)
                    .build()
                    .unwrap(),
            )
            .with_data_area_size(64)
            .build()
            .unwrap();
        let d = differences(&other, &ours);
        assert_eq!(d[0], NvDifference::Type { found: 0 });
        assert!(matches!(d[1], NvDifference::Attributes { .. }));
        assert_eq!(d[2], NvDifference::NameAlg { found: 0x0004 });
        assert_eq!(d[3], NvDifference::Size { found: 64 });
        assert_eq!(d.len(), 4);
        // The written bit alone (set by the first extend) is not a difference.
        let written = NvPublicBuilder::new()
            .with_nv_index(nv_tpm_handle(DEFAULT_AUDIT_NV_INDEX).unwrap())
            .with_index_name_algorithm(HashingAlgorithm::Sha256)
            .with_index_attributes(
                NvIndexAttributesBuilder::new()
                    .with_nv_index_type(NvIndexType::Extend)
                    .with_auth_write(true)
                    .with_auth_read(true)
                    .with_no_da(true)
                    .with_written(true)
                    .build()
                    .unwrap(),
            )
            .with_data_area_size(32)
            .build()
            .unwrap();
        assert!(differences(&written, &ours).is_empty());
    }
}
