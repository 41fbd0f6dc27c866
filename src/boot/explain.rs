//! Explaining a TPM refusal from the firmware event log: at enrolment the log's
//! records of each sealed PCR go into the token (`vaultguard_eventlog`); when the
//! TPM later refuses because PCRs changed, the records that differ are named, one
//! line each (event type, what was measured, old and new digest), for the console
//! fallback message, the audit and `status`.
//!
//! Only an explanation: nothing here decides whether to unlock, and a log that
//! cannot be read or does not replay makes the enrolment record nothing (and the
//! refusal say so) rather than fail.

use super::{tpm_bank, TpmRefusal};
use crate::luks::token::{self, EventDigests};
use crate::luks::Vault;
use crate::tpm::eventlog::{self, EventLog};
use crate::tpm::policy::Bank;
use crate::tpm::{Tpm, TpmError};
use std::path::PathBuf;

/// The event log read at enrolment and on refusal. `VAULTGUARD_EVENT_LOG` names
/// another file (host tests, whose software TPM has no firmware log).
pub fn log_path() -> PathBuf {
    std::env::var_os("VAULTGUARD_EVENT_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| eventlog::SYSFS_LOG.into())
}

/// The log, if it replays to the live values of `pcrs` in `bank`.
fn replaying_log(tpm: &mut Tpm, bank: Bank, pcrs: &[u32]) -> Result<EventLog, String> {
    let log = eventlog::read(&log_path()).map_err(|e| e.to_string())?;
    let live = tpm.read_pcrs(bank, pcrs).map_err(|e| e.to_string())?;
    log.verify(bank, &live).map_err(|e| e.to_string())?;
    Ok(log)
}

/// What the token keeps: the records of each sealed PCR (literal or signed) the
/// log has events for (the phase PCR excluded), or nothing when the log does not
/// describe this boot.
pub fn enrolment_eventlog(
    tpm: &mut Tpm,
    bank: Bank,
    sealed: &[u32],
    phase: Option<u32>,
) -> EventDigests {
    let mut pcrs: Vec<u32> = sealed
        .iter()
        .copied()
        .filter(|p| Some(*p) != phase)
        .collect();
    pcrs.sort_unstable();
    pcrs.dedup();
    let Ok(log) = replaying_log(tpm, bank, &pcrs) else {
        return EventDigests::new();
    };
    let in_log = log.pcrs();
    let lists: Vec<(u32, Records)> = pcrs
        .into_iter()
        .filter(|p| in_log.contains(p))
        .map(|p| (p, fit_descriptions(log.digest_list(bank, p))))
        .collect();
    within_budget(lists)
}

/// One PCR's records as the token keeps them: (description, digest).
type Records = Vec<(String, Vec<u8>)>;

/// At most this many bytes of the token's JSON go to the event-log record: the
/// LUKS2 header's JSON area is ~12 KiB by default and holds the keyslots and,
/// during a reseal, the old and the new token side by side.
pub const EVENTLOG_BUDGET: usize = 2048;

/// Each description cut to what the token parser takes
/// ([`token::EVENTLOG_MAX_TEXT`] bytes, on a character boundary, `…` marking
/// the cut): a longer one made a token that could not be read back, and with it
/// no TPM unlock at all.
fn fit_descriptions(list: Records) -> Records {
    list.into_iter()
        .map(|(mut text, digest)| {
            if text.len() > token::EVENTLOG_MAX_TEXT {
                let mut cut = token::EVENTLOG_MAX_TEXT - '…'.len_utf8();
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            (text, digest)
        })
        .collect()
}

/// The PCRs' record lists that fit [`EVENTLOG_BUDGET`] together, smallest
/// first (the kernel/initrd PCRs, which updates change, have few records; a
/// firmware PCR with a long key-database history is the one left out), each
/// whole or not at all and never more records than the parser takes. A PCR left
/// out is explained as "no event-log record at enrolment".
fn within_budget(mut lists: Vec<(u32, Records)>) -> EventDigests {
    // The JSON each record costs: {"event":"…","digest":"<hex>"}, with the
    // escapes of `"` and `\` (the only ones left after the parser's cleaning).
    let cost = |l: &[(String, Vec<u8>)]| -> usize {
        l.iter()
            .map(|(t, d)| t.len() + t.matches(['"', '\\']).count() + 2 * d.len() + 26)
            .sum::<usize>()
            + 8
    };
    lists.retain(|(_, l)| l.len() <= token::EVENTLOG_MAX_EVENTS);
    lists.sort_by_key(|(p, l)| (cost(l), *p));
    let mut used = 0;
    let mut out = EventDigests::new();
    for (p, l) in lists {
        let c = cost(&l);
        if used + c <= EVENTLOG_BUDGET {
            used += c;
            out.insert(p, l);
        }
    }
    out
}

/// The records that differ from enrolment, one line each, when `reason` is a PCR
/// change and a token recorded the log; empty otherwise.
pub fn explain(vault: &mut Vault, tpm: Option<&mut Tpm>, reason: &TpmRefusal) -> Vec<String> {
    let TpmRefusal::Tpm(err) = reason else {
        return Vec::new();
    };
    let TpmError::PcrMismatch { changed, phase, .. } = err else {
        // A signed policy that no signature approves: which PCR is not said.
        if matches!(err, TpmError::Signature(_)) {
            return explain_signed(vault, tpm);
        }
        return Vec::new();
    };
    let changed: Vec<u32> = changed
        .iter()
        .copied()
        .filter(|p| Some(*p) != *phase)
        .collect();
    if changed.is_empty() {
        return Vec::new();
    }
    let Some((bank, enrolled)) = vault
        .tpm2_tokens()
        .into_iter()
        .filter_map(|(_, t)| t.ok())
        .find(|t| !t.eventlog.is_empty())
        .map(|t| (tpm_bank(t.bank), t.eventlog))
    else {
        return Vec::new();
    };
    // The current log is trusted as far as it replays: a log that does not would
    // name records that are not what the TPM holds.
    let log = match tpm {
        Some(tpm) => replaying_log(tpm, bank, &changed),
        None => eventlog::read(&log_path()).map_err(|e| e.to_string()),
    };
    let log = match log {
        Ok(l) => l,
        Err(e) => return vec![format!("the event log cannot explain it: {e}")],
    };
    lines(&enrolled, &log, bank, &changed)
}

/// A signed enrolment refused (no signature approves this boot): the records of
/// its signed PCRs that differ from enrolment, when it recorded them; the TPM
/// does not say which PCR, so every recorded signed PCR is compared.
fn explain_signed(vault: &mut Vault, tpm: Option<&mut Tpm>) -> Vec<String> {
    let Some(t) = vault
        .tpm2_tokens()
        .into_iter()
        .filter_map(|(_, t)| t.ok())
        .find(|t| t.pubkey.is_some() && !t.eventlog.is_empty())
    else {
        return Vec::new();
    };
    let bank = tpm_bank(t.bank);
    let signed: Vec<u32> = t
        .pubkey_pcrs
        .iter()
        .copied()
        .filter(|p| t.eventlog.contains_key(p))
        .collect();
    if signed.is_empty() {
        return Vec::new();
    }
    let log = match tpm {
        Some(tpm) => replaying_log(tpm, bank, &signed),
        None => eventlog::read(&log_path()).map_err(|e| e.to_string()),
    };
    let log = match log {
        Ok(l) => l,
        Err(e) => return vec![format!("the event log cannot explain it: {e}")],
    };
    let before: EventDigests = signed.iter().map(|p| (*p, t.eventlog[p].clone())).collect();
    let now: EventDigests = signed
        .iter()
        .map(|&p| (p, log.digest_list(bank, p)))
        .collect();
    capped(
        eventlog::diff(&before, &now)
            .iter()
            .map(ToString::to_string)
            .collect(),
    )
}

/// At most this many lines explain a refusal; the rest are counted in one more.
pub const MAX_EXPLAINED: usize = 16;

/// The explanation goes to the console above the passphrase prompt, into the
/// journal and the audit, one line per record: the records kept in the token
/// are the header's (512 per PCR may be written there), so a header edit must
/// not bury the prompt or the log under thousands of lines.
fn capped(mut out: Vec<String>) -> Vec<String> {
    if out.len() > MAX_EXPLAINED {
        let more = out.len() - (MAX_EXPLAINED - 1);
        out.truncate(MAX_EXPLAINED - 1);
        out.push(format!("… and {more} more event-log records differ"));
    }
    out
}

/// The records that differ from enrolment for the PCRs whose live value differs
/// from the one the token recorded (for `reseal --confirm`, with no refusal in
/// hand); empty when nothing was recorded or nothing changed.
pub fn current_diff(vault: &mut Vault, tpm: &mut Tpm) -> Vec<String> {
    let Some(t) = vault
        .tpm2_tokens()
        .into_iter()
        .filter_map(|(_, t)| t.ok())
        .find(|t| !t.eventlog.is_empty())
    else {
        return Vec::new();
    };
    let bank = tpm_bank(t.bank);
    let pcrs: Vec<u32> = t.eventlog.keys().copied().collect();
    let Ok(live) = tpm.read_pcrs(bank, &pcrs) else {
        return Vec::new();
    };
    let recorded = t.pcr_values.clone().unwrap_or_default();
    let changed: Vec<u32> = live
        .iter()
        .filter(|(p, v)| recorded.get(p) != Some(v))
        .map(|(p, _)| *p)
        .collect();
    if changed.is_empty() {
        return Vec::new();
    }
    match replaying_log(tpm, bank, &changed) {
        Ok(log) => lines(&t.eventlog, &log, bank, &changed),
        Err(e) => vec![format!("the event log cannot explain it: {e}")],
    }
}

/// The diff of `enrolled` against `log` for `changed`, as lines; a changed PCR
/// whose records all match was extended outside the log, and says so.
pub fn lines(enrolled: &EventDigests, log: &EventLog, bank: Bank, changed: &[u32]) -> Vec<String> {
    let before: EventDigests = enrolled
        .iter()
        .filter(|(p, _)| changed.contains(p))
        .map(|(p, l)| (*p, l.clone()))
        .collect();
    let now: EventDigests = before
        .keys()
        .map(|&p| (p, log.digest_list(bank, p)))
        .collect();
    let diffs = eventlog::diff(&before, &now);
    let mut out: Vec<String> = diffs.iter().map(ToString::to_string).collect();
    for p in changed {
        if !before.contains_key(p) {
            out.push(format!("PCR {p}: no event-log record at enrolment"));
        } else if !diffs.iter().any(|d| d.pcr == *p) {
            out.push(format!(
                "PCR {p}: every event-log record is as at enrolment: it was extended outside the log"
            ));
        }
    }
    capped(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_log_pair_names_the_initrd_record_of_pcr_9() {
        let log =
            eventlog::parse(include_bytes!("../tpm/testdata/ovmf-direct-boot.eventlog")).unwrap();
        let bank = Bank::Sha256;
        let enrolled: EventDigests = [7u32, 9]
            .iter()
            .map(|&p| (p, log.digest_list(bank, p)))
            .collect();
        let tampered = log
            .with_changes(
                bank,
                &eventlog::Changes {
                    initrd: Some(b"tampered initrd".to_vec()),
                    ..Default::default()
                },
            )
            .unwrap();
        let out = lines(&enrolled, &tampered, bank, &[7, 9]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].starts_with("PCR 9: EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\": c64ea348"),
            "{}",
            out[0]
        );
        assert!(out[0].ends_with(&crate::encoding::hex_encode(
            &bank.hash(&[b"tampered initrd"])
        )));
        assert_eq!(
            out[1],
            "PCR 7: every event-log record is as at enrolment: it was extended outside the log"
        );
        // A PCR without a record at enrolment says so; unchanged PCRs say nothing.
        let out = lines(&enrolled, &log, bank, &[4]);
        assert_eq!(out, ["PCR 4: no event-log record at enrolment"]);
    }
}
