//! `vaultguard policy predict`: the PCR values the next boot will have after a
//! staged initrd, kernel or command line, from this boot's firmware event log.
//!
//! The log is first replayed against the live PCRs (read from the TPM) and refused
//! if it does not replay: a prediction from a log that does not describe this boot
//! would sign a policy nobody can meet, or one an attacker chose. The output's
//! `--json` form is what `vaultguard policy sign --predicted -` reads (contract:
//! `{"bank":"sha256","pcrs":{"9":"<hex>"}}`). Nothing here writes anything.

use crate::cli::PolicyPredictCmd;
use crate::config::{parse_pcr_list, Config};
use crate::encoding::hex_encode;
use crate::exit::Failure;
use crate::tpm::eventlog::{self, Changes};
use crate::tpm::policy::Bank;
use crate::tpm::Tpm;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// PCRs predicted when `--pcrs` is not given, as far as the log has events for them.
pub const DEFAULT_PCRS: [u32; 4] = [4, 7, 9, 11];

/// A staged initrd or kernel larger than this is refused before it is read (a
/// Debian initrd with all firmware is ~100-200 MiB; the image is held in memory).
pub const MAX_STAGED_BYTES: u64 = 1 << 30;

/// Read a staged component: a regular file of at most [`MAX_STAGED_BYTES`] (a
/// FIFO would block, /dev/zero would be read until memory runs out).
fn read_file(what: &str, p: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let fail = |e: String| format!("cannot read the staged {what} {}: {e}", p.display());
    let (f, len) = crate::tpm::signed::open_regular(p).map_err(|e| fail(e.to_string()))?;
    let too_big = || fail(format!("larger than {MAX_STAGED_BYTES} bytes"));
    if len > MAX_STAGED_BYTES {
        return Err(too_big());
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(MAX_STAGED_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| fail(e.to_string()))?;
    if buf.len() as u64 > MAX_STAGED_BYTES {
        return Err(too_big());
    }
    Ok(buf)
}

pub fn run(
    cfg: &Config,
    c: &PolicyPredictCmd,
    json: bool,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let bank_name = c.bank.as_deref().unwrap_or("sha256");
    let bank = Bank::from_name(bank_name)
        .ok_or_else(|| Failure::usage(format!("unknown PCR bank `{bank_name}` (sha256, sha1)")))?;
    let log_path = c
        .event_log
        .clone()
        .unwrap_or_else(|| eventlog::SYSFS_LOG.into());
    let log = eventlog::read(&log_path)?;
    let in_log = log.pcrs();
    let pcrs = match &c.pcrs {
        Some(list) => parse_pcr_list(list).map_err(Failure::usage)?,
        None => DEFAULT_PCRS
            .iter()
            .copied()
            .filter(|p| in_log.contains(p))
            .collect(),
    };
    if pcrs.is_empty() {
        return Err(format!(
            "{}: none of PCRs 4, 7, 9, 11 has events in this event log; give --pcrs",
            log_path.display()
        )
        .into());
    }
    let changes = Changes {
        initrd: c
            .initrd
            .as_deref()
            .map(|p| read_file("initrd", p))
            .transpose()?,
        kernel: c
            .kernel
            .as_deref()
            .map(|p| read_file("kernel", p))
            .transpose()?,
        load_options: c.cmdline.clone(),
    };
    let mut tpm = Tpm::open(&cfg.tpm.tcti, Duration::from_secs(cfg.tpm.timeout))?;
    let live = tpm.read_pcrs(bank, &pcrs)?;
    drop(tpm);
    let predicted = eventlog::predict(&log, bank, &live, &changes)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    if json {
        let map: serde_json::Map<String, serde_json::Value> = predicted
            .iter()
            .map(|(p, v)| (p.to_string(), hex_encode(v).into()))
            .collect();
        println!("{}", serde_json::json!({"bank": bank.name(), "pcrs": map}));
    } else {
        for ((p, v), (_, now)) in predicted.iter().zip(&live) {
            let note = if v == now { "unchanged" } else { "changes" };
            println!("PCR {p} {}: {} ({note})", bank.name(), hex_encode(v));
        }
    }
    Ok(ExitCode::SUCCESS)
}
