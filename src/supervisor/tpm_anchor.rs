//! The audit anchor's TPM edge: [`crate::audit::anchor::Anchor`] over the NV extend
//! index that enrolment defines ([`crate::tpm::nv`]). The flow modules (the
//! supervisor's shell, `audit verify --tpm`) hold one; `audit` and `tpm` do not
//! know each other.

use crate::audit::anchor::{Anchor, AnchorError};
use crate::tpm::{Tpm, TpmError};
use std::time::Duration;

/// Opens the TPM for each call: audit entries are rare, and a handle kept open
/// would tie the supervisor's thread to tss-esapi's context (not `Send`).
pub struct TpmAnchor {
    tcti: String,
    handle: u32,
}

impl TpmAnchor {
    pub fn new(tcti: &str, handle: u32) -> TpmAnchor {
        TpmAnchor {
            tcti: tcti.to_string(),
            handle,
        }
    }

    pub fn handle(&self) -> u32 {
        self.handle
    }

    fn tpm(&self) -> Result<Tpm, AnchorError> {
        Tpm::open(&self.tcti, Duration::ZERO).map_err(|e| self.say(e))
    }

    fn say(&self, e: TpmError) -> AnchorError {
        match e {
            TpmError::NvIndexAbsent { .. } => AnchorError::Unavailable(format!(
                "the TPM has no audit anchor at NV index {:#010x} (`vaultguard enroll` \
                 defines it; or set audit.tpm_anchor to false)",
                self.handle
            )),
            e @ TpmError::Absent { .. } => AnchorError::Unavailable(e.to_string()),
            other => AnchorError::Failed(other.to_string()),
        }
    }
}

impl Anchor for TpmAnchor {
    fn extend(&mut self, entry_hash: &[u8; 32]) -> Result<(), AnchorError> {
        self.tpm()?
            .extend_audit_index(self.handle, entry_hash)
            .map_err(|e| self.say(e))
    }

    fn read(&mut self) -> Result<Option<[u8; 32]>, AnchorError> {
        self.tpm()?
            .read_audit_index(self.handle)
            .map_err(|e| self.say(e))
    }
}
