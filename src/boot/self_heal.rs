//! Self-healing after an update, opt-in (`tpm.reseal_after_recovery`): when the
//! vault had to be opened with the passphrase or recovery key because bound PCRs
//! changed, the operator at the console is asked whether to reseal to this boot's
//! PCRs; only a typed "yes" reseals ([`super::reseal`], which writes the new
//! enrolment before removing the old). The event-log records that changed are
//! shown first and go into the audit with the decision. Nothing here reseals
//! without that answer: a refusal for any other reason (no TPM, a cleared TPM, an
//! altered token, the phase PCR) is not offered.

use super::{explain, reseal, BootError, EnrollOptions, Events, TpmRefusal};
use crate::log::Priority;
use crate::luks::Vault;
use crate::prompt::{Ask, Echo, Prompter, SecretKind};
use crate::tpm::TpmError;

/// Whether `reason` is a change of bound PCRs other than the phase PCR.
pub fn is_pcr_change(reason: &TpmRefusal) -> bool {
    matches!(reason, TpmRefusal::Tpm(TpmError::PcrMismatch { changed, phase, .. })
        if changed.iter().any(|p| Some(*p) != *phase))
}

/// Offer the reseal after a fallback caused by `reason`. Returns whether it
/// resealed. The answer is read like a passphrase (the console, or an
/// ask-password agent) but shown as typed.
pub fn offer_reseal(
    opts: &EnrollOptions,
    reason: &TpmRefusal,
    prompter: &mut dyn Prompter,
    events: &mut dyn Events,
) -> Result<bool, BootError> {
    if !is_pcr_change(reason) {
        return Ok(false);
    }
    let name = opts.name.as_str();
    let mut opts = opts.clone();
    let diff = {
        let mut vault = Vault::open(&opts.device)?;
        // Reseal over the PCRs the enrolment bound, not the configured default.
        if let Some(t) = vault.tpm2_tokens().into_iter().find_map(|(_, t)| t.ok()) {
            opts.pcrs = t
                .pcrs
                .iter()
                .copied()
                .filter(|p| Some(*p) != opts.tpm.phase_pcr)
                .collect();
        }
        explain::explain(&mut vault, None, reason)
    };
    prompter.say_at(
        Priority::Warning,
        &format!("vaultguard: {name} was opened without the TPM because: {reason}"),
    );
    for line in &diff {
        prompter.say_at(Priority::Warning, &format!("vaultguard:   {line}"));
    }
    let answer = prompter.ask(&Ask {
        id: format!("vaultguard-reseal:{}", opts.device),
        message: format!(
            "Reseal the TPM enrolment of {name} to this boot's PCRs (only if you made this change)? [yes/NO]: "
        ),
        kind: SecretKind::Passphrase,
        keyname: None,
        accept_cached: false,
        timeout: None,
        echo: Echo::On,
    });
    let yes = matches!(&answer, Ok(a) if matches!(a.as_bytes().trim_ascii(), b"yes" | b"y" | b"YES" | b"Yes"));
    let diff_field = diff.join("\n");
    if !yes {
        events.event(
            "reseal_declined",
            &[
                ("name", name),
                ("reason", &reason.to_string()),
                ("eventlog_diff", &diff_field),
            ],
        );
        prompter.say_at(
            Priority::Warning,
            &format!("vaultguard: not resealed; after verifying the change: vaultguard reseal --confirm {}", opts.device),
        );
        return Ok(false);
    }
    let report = reseal(&opts, prompter, events)?;
    events.event(
        "resealed_after_recovery",
        &[
            ("name", name),
            ("reason", &reason.to_string()),
            ("eventlog_diff", &diff_field),
            ("keyslot", &report.keyslot.to_string()),
        ],
    );
    prompter.say_at(
        Priority::Warning,
        &format!(
            "vaultguard: {name} resealed to this boot's PCRs (keyslot {})",
            report.keyslot
        ),
    );
    Ok(true)
}
