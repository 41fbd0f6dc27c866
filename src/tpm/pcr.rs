//! PCRs: reading them, the active banks, the phase-PCR latch after activation,
//! and the TPM's own policy computation (a trial session) to check ours against.

use super::error::LatchFailure;
use super::policy::{self, Bank};
use super::{cmd, PcrValues, Tpm, TpmError};

use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::PcrHandle;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Digest, DigestValues, PcrSelectionListBuilder, PcrSlot, SymmetricDefinition,
};

impl Tpm {
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
                let d = bank_data
                    .get_digest(*slot)
                    .ok_or_else(|| TpmError::PcrUnavailable {
                        pcr: p,
                        bank: bank.name(),
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
            return Err(TpmError::UnexpectedResponse {
                what: "GetCapability(PCRs)",
            });
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
            return Err(TpmError::LatchFailed(LatchFailure::NoActiveBank));
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
            .map_err(|e| TpmError::LatchFailed(LatchFailure::Extend(e)))?;
        for (bank, expected) in before {
            let now = self.read_pcrs(bank, &[pcr])?.remove(0).1;
            if now != expected {
                return Err(TpmError::LatchFailed(LatchFailure::NotMoved {
                    pcr,
                    bank: bank.name(),
                }));
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
            .ok_or(TpmError::NoSession { what: "trial" })?;
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
}

pub(super) fn hashing_alg(bank: Bank) -> HashingAlgorithm {
    match bank {
        Bank::Sha1 => HashingAlgorithm::Sha1,
        Bank::Sha256 => HashingAlgorithm::Sha256,
        Bank::Sha384 => HashingAlgorithm::Sha384,
        Bank::Sha512 => HashingAlgorithm::Sha512,
    }
}

pub(super) fn pcr_slot(pcr: u32) -> Result<PcrSlot, TpmError> {
    if pcr > 23 {
        return Err(TpmError::PcrOutOfRange { pcr });
    }
    PcrSlot::try_from(1u32 << pcr).map_err(cmd("PCR slot"))
}

pub(super) fn pcr_handle(pcr: u32) -> Result<PcrHandle, TpmError> {
    if pcr > 23 {
        return Err(TpmError::PcrOutOfRange { pcr });
    }
    PcrHandle::try_from(pcr).map_err(cmd("PCR handle"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_numbers_outside_0_to_23_are_refused() {
        assert!(pcr_slot(0).is_ok());
        assert!(pcr_slot(23).is_ok());
        assert!(matches!(
            pcr_slot(24),
            Err(TpmError::PcrOutOfRange { pcr: 24 })
        ));
        assert!(pcr_handle(15).is_ok());
        assert!(matches!(
            pcr_handle(24),
            Err(TpmError::PcrOutOfRange { pcr: 24 })
        ));
    }

    #[test]
    fn each_bank_maps_to_the_tpm_algorithm_with_its_id() {
        for bank in [Bank::Sha1, Bank::Sha256, Bank::Sha384, Bank::Sha512] {
            let id = u16::from(tss_esapi::constants::AlgorithmIdentifier::from(
                hashing_alg(bank),
            ));
            assert_eq!(id, bank.alg_id());
            assert_eq!(Bank::from_alg_id(id), Some(bank));
        }
    }
}
