//! The TPM module's errors: what failed, on which PCR or handle, and what the
//! operator can do about it. Never a secret: TPM response codes, PCR numbers and
//! handles only.

use super::nv;

use std::fmt;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;

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
    SrkUnusable(SrkDefect),
    /// Wrong PIN; the TPM's dictionary-attack counter moved.
    WrongPin { tries_left: Option<u32> },
    /// The TPM is in dictionary-attack lockout.
    Lockout { recovery_seconds: Option<u32> },
    /// The sealed object's record (from the token) cannot be used as it is.
    Malformed(Malformed),
    /// The record contradicts itself (its policy hash, its sealed object's policy
    /// and its recorded PCR values do not agree): altered or damaged, not a PCR
    /// change. Resealing would only paper over it.
    Altered(Alteration),
    /// The enrolment has a PIN and none was given.
    PinRequired,
    /// The phase-PCR extend did not take.
    LatchFailed(LatchFailure),
    /// A PCR number outside 0-23.
    PcrOutOfRange { pcr: u32 },
    /// The TPM does not report this PCR in this bank.
    PcrUnavailable { pcr: u32, bank: &'static str },
    /// StartAuthSession succeeded but handed back no session.
    NoSession { what: &'static str },
    /// The TPM answered with something other than what the command returns.
    UnexpectedResponse { what: &'static str },
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
    /// The same, for the revocation counter at `handle` (defined or incremented
    /// with the empty owner authorisation).
    OwnerAuthSetForCounter { handle: u32 },
    /// A signed PCR policy cannot be satisfied: no usable signature for the
    /// current PCR values, or the signature file is unusable (the line says which).
    Signature(String),
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
            TpmError::SrkUnusable(why) => {
                write!(f, "persistent handle 0x81000001 is unusable: {why}")
            }
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
            TpmError::Malformed(why) => write!(f, "the sealed object's record is unusable: {why}"),
            TpmError::Altered(why) => write!(
                f,
                "the TPM2 token was altered or damaged: {why}. This is not a PCR change; \
                 find out who wrote the LUKS header before trusting this machine \
                 (the passphrase still opens the vault)"
            ),
            TpmError::PinRequired => write!(f, "this enrolment needs a PIN and none was given"),
            TpmError::LatchFailed(why) => write!(f, "could not extend the phase PCR: {why}"),
            TpmError::Signature(why) => write!(f, "signed PCR policy: {why}"),
            TpmError::PcrOutOfRange { pcr } => write!(f, "PCR {pcr} is out of range (0-23)"),
            TpmError::PcrUnavailable { pcr, bank } => {
                write!(f, "the TPM has no PCR {pcr} in the {bank} bank")
            }
            TpmError::NoSession { what } => {
                write!(f, "TPM StartAuthSession({what}) returned no session")
            }
            TpmError::UnexpectedResponse { what } => {
                write!(f, "the TPM answered {what} with data of another kind")
            }
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
            TpmError::OwnerAuthSetForCounter { handle } => write!(
                f,
                "the TPM's owner hierarchy has an authorisation value (owner password) set: \
                 vaultguard cannot define or increment the revocation counter {handle:#010x} \
                 with the empty one; increment it with the password \
                 (tpm2_nvincrement -C o -P PASSWORD {handle:#010x}) or clear the password \
                 (tpm2_changeauth -c owner -p PASSWORD)"
            ),
        }
    }
}

impl std::error::Error for TpmError {}

/// Why the key at 0x81000001 cannot be the SRK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrkDefect {
    /// Not a restricted, fixedTPM decryption key without signing.
    NotStorageKey,
    NotRsaOrEcc,
}

impl fmt::Display for SrkDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SrkDefect::NotStorageKey => {
                "the key there is not a restricted decryption (storage) key"
            }
            SrkDefect::NotRsaOrEcc => "the object there is not an RSA or ECC key",
        })
    }
}

/// What is wrong with `tpm2-blob` (TPM2B_PRIVATE then TPM2B_PUBLIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobDefect {
    Truncated,
    TrailingBytes,
    EmptyPart,
    PrivateTooLarge,
    PublicUnparsable,
    NotSealedData,
}

impl fmt::Display for BlobDefect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlobDefect::Truncated => "tpm2-blob is truncated",
            BlobDefect::TrailingBytes => "tpm2-blob has trailing bytes",
            BlobDefect::EmptyPart => "tpm2-blob has an empty part",
            BlobDefect::PrivateTooLarge => "tpm2-blob's private part is too large",
            BlobDefect::PublicUnparsable => "tpm2-blob's public part does not parse",
            BlobDefect::NotSealedData => "tpm2-blob does not hold a sealed data object",
        })
    }
}

/// A sealed object's record that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    Blob(BlobDefect),
    /// `tpm2_srk` does not parse or names another handle.
    Srk(super::srk::SrkError),
    /// `tpm2_srk`'s name is not the name of the public area recorded beside it.
    SrkNameNotOfPublic,
    /// `tpm2_srk`'s public area does not parse.
    SrkPublicUnparsable,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::Blob(d) => d.fmt(f),
            Malformed::Srk(e) => e.fmt(f),
            Malformed::SrkNameNotOfPublic => {
                f.write_str("tpm2_srk: the recorded public area is not the one its name names")
            }
            Malformed::SrkPublicUnparsable => {
                f.write_str("tpm2_srk: the public area does not parse")
            }
        }
    }
}

/// How a sealed object's record contradicts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alteration {
    /// The blob itself is damaged.
    Blob(BlobDefect),
    /// `tpm2-policy-hash` is not the authPolicy inside `tpm2-blob`.
    PolicyNotTheObjects,
    /// `tpm2-policy-hash` is not what the recorded PCR values give.
    PolicyNotTheRecordedPcrs,
}

impl fmt::Display for Alteration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alteration::Blob(d) => write!(f, "its {d}"),
            Alteration::PolicyNotTheObjects => f.write_str(
                "its tpm2-policy-hash is not the policy its sealed object (tpm2-blob) carries",
            ),
            Alteration::PolicyNotTheRecordedPcrs => f.write_str(
                "its tpm2-policy-hash is not the policy its recorded PCR values \
                 (vaultguard_pcr_values) give",
            ),
        }
    }
}

/// Why the phase-PCR latch failed.
#[derive(Debug)]
pub enum LatchFailure {
    NoActiveBank,
    /// TPM2_PCR_Extend failed.
    Extend(tss_esapi::Error),
    /// The PCR does not hold the value the extend should have given.
    NotMoved {
        pcr: u32,
        bank: &'static str,
    },
}

impl fmt::Display for LatchFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LatchFailure::NoActiveBank => f.write_str("the TPM reports no active PCR bank"),
            LatchFailure::Extend(e) => write!(f, "PCR_Extend: {e}"),
            LatchFailure::NotMoved { pcr, bank } => write!(
                f,
                "PCR {pcr} ({bank}) does not hold the expected value after the extend"
            ),
        }
    }
}

pub(super) fn cmd(what: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |err| TpmError::Command { what, err }
}

pub(super) fn rc_kind(err: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match err {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mismatch(changed: &[u32], bound: &[u32], phase: Option<u32>) -> String {
        TpmError::PcrMismatch {
            changed: changed.to_vec(),
            bound: bound.to_vec(),
            phase,
        }
        .to_string()
    }

    #[test]
    fn a_pcr_refusal_names_what_changed_and_what_to_do() {
        let one = mismatch(&[7], &[0, 7, 15], Some(15));
        assert!(
            one.contains("PCR 7 changed") && one.contains("vaultguard reseal"),
            "{one}"
        );
        let many = mismatch(&[0, 7], &[0, 7, 15], Some(15));
        assert!(many.contains("PCRs 0,7 changed"), "{many}");
        let unknown = mismatch(&[], &[0, 7, 15], Some(15));
        assert!(unknown.contains("bound to PCRs 0,7,15"), "{unknown}");
        // The phase PCR alone: already unlocked this boot, not a reason to reseal.
        let phase = mismatch(&[15], &[0, 7, 15], Some(15));
        assert!(
            phase.contains("already extended") && !phase.contains("reseal"),
            "{phase}"
        );
    }

    #[test]
    fn a_token_that_contradicts_itself_is_not_told_to_reseal() {
        let t = TpmError::Altered(Alteration::PolicyNotTheObjects).to_string();
        assert!(
            t.contains("not a PCR change") && !t.contains("run `vaultguard reseal`"),
            "{t}"
        );
    }
}
