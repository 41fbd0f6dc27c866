//! The TPM's dictionary-attack state: how many wrong PINs it still tolerates and
//! whether it is locked out, read fresh (never cached) before every PIN prompt.

use super::{cmd, Tpm, TpmError};

use tss_esapi::constants::{CapabilityType, PropertyTag};
use tss_esapi::structures::CapabilityData;

impl Tpm {
    /// A TPM property, read fresh every time (tss-esapi's `get_tpm_property` caches,
    /// which is wrong for counters such as the DA lockout counter).
    pub(super) fn property(&mut self, tag: PropertyTag) -> Result<Option<u32>, TpmError> {
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
        let (max, count) = self.da_counters()?;
        Ok(tries_left(max, count))
    }

    /// Whether the TPM is currently refusing DA-protected authorisations.
    pub fn in_lockout(&mut self) -> Result<bool, TpmError> {
        let (max, count) = self.da_counters()?;
        Ok(locked_out(max, count))
    }

    /// TPM_PT_MAX_AUTH_FAIL and TPM_PT_LOCKOUT_COUNTER (0 when not reported).
    fn da_counters(&mut self) -> Result<(u32, u32), TpmError> {
        let max = self.property(PropertyTag::MaxAuthFail)?.unwrap_or(0);
        let count = self.property(PropertyTag::LockoutCounter)?.unwrap_or(0);
        Ok((max, count))
    }
}

/// Failures left before lockout, from the TPM's budget and its counter (which can
/// exceed the budget after the budget was lowered).
pub fn tries_left(max_auth_fail: u32, lockout_counter: u32) -> u32 {
    max_auth_fail.saturating_sub(lockout_counter)
}

/// Whether the counter has reached the budget. A budget of 0 means the TPM does
/// not count at all (DA protection disabled), never "locked out".
pub fn locked_out(max_auth_fail: u32, lockout_counter: u32) -> bool {
    max_auth_fail > 0 && lockout_counter >= max_auth_fail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tries_left_counts_down_and_never_wraps() {
        assert_eq!(tries_left(32, 0), 32);
        assert_eq!(tries_left(32, 31), 1);
        assert_eq!(tries_left(32, 32), 0);
        assert_eq!(tries_left(3, 10), 0);
    }

    #[test]
    fn lockout_needs_a_budget_and_a_counter_at_it() {
        assert!(!locked_out(32, 31));
        assert!(locked_out(32, 32));
        assert!(locked_out(3, 10));
        // DA disabled (budget 0): not a lockout, whatever the counter says.
        assert!(!locked_out(0, 0));
        assert!(!locked_out(0, 5));
    }
}
