//! `vaultguard policy …`: signed PCR policies from the command line.
//!
//! `policy sign` approves a set of PCR values for every enrolment bound to the
//! signing key (`enroll --public-key`, or systemd-cryptenroll --tpm2-public-key):
//! it signs their PolicyPCR digest, as `systemd-measure sign` does, and writes or
//! extends the signature file systemd-cryptsetup and vaultguard read. The values
//! come from `--predicted` (the JSON `policy predict --json` prints; the update
//! workflow is `policy predict --initrd NEW --json | policy sign … --predicted -
//! --append`) or, for PCRs it lacks, from the TPM now. The private key is only
//! read here; in production it stays on the machine that signs, not the appliance.

use crate::cli::{PolicyCmd, PolicyRevokeOlderCmd, PolicySignCmd, PolicySub, PolicyTicketCmd};
use crate::config::{parse_pcr_list, Config};
use crate::encoding::{hex_decode, hex_encode};
use crate::exit::Failure;
use crate::tpm::counter;
use crate::tpm::policy::Bank;
use crate::tpm::signed::{self, PolicyKey, SignatureEntry, SignatureFile, SigningKey};
use crate::tpm::Tpm;
use serde_json::Value;
use std::collections::BTreeMap;
use std::error::Error;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Where `policy sign` writes by default: the first place systemd-cryptsetup looks.
pub const DEFAULT_SIGNATURE_FILE: &str = "/etc/systemd/tpm2-pcr-signature.json";

pub fn run(cfg: &Config, cmd: &PolicyCmd, json: bool) -> Result<ExitCode> {
    match &cmd.command {
        PolicySub::Sign(c) => sign(cfg, c, json || c.json),
        PolicySub::Predict(c) => crate::predict_cli::run(cfg, c, json || c.json),
        PolicySub::RevokeOlder(c) => revoke_older(cfg, c, json || c.json),
        PolicySub::Ticket(c) => ticket(cfg, c, json || c.json),
    }
}

/// `policy ticket`: for every entry of the signature file that one of the
/// vault's signed enrolments would use (its key, its signed PCRs, its counter
/// or none), this TPM's verification ticket replaces the entry's old one. A
/// signature the TPM rejects gets none and is reported (exit 1).
fn ticket(cfg: &Config, c: &PolicyTicketCmd, json: bool) -> Result<ExitCode> {
    let usage = |msg: String| -> Box<dyn Error> { Failure::usage(msg).into() };
    let dev = crate::boot::commands::device(cfg, c.device.as_deref())?;
    let mut vault = crate::luks::Vault::open(&dev)?;
    let mut enrolments = Vec::new();
    for (_, t) in vault.tpm2_tokens() {
        let Ok(t) = t else { continue };
        let Some(pem) = &t.pubkey else { continue };
        let key = PolicyKey::from_pem(pem).map_err(|e| format!("{dev}: tpm2_pubkey: {e}"))?;
        let policy_ref = t.revocation_counter.map(counter::counter_name);
        let bank = crate::boot::tpm_bank(t.bank);
        enrolments.push((key, t.pubkey_pcrs.clone(), policy_ref, bank));
    }
    if enrolments.is_empty() {
        return Err(usage(format!(
            "{dev} has no signed enrolment (enroll --public-key …): nothing to make tickets for"
        )));
    }
    let explicit = c.signature.as_deref().or(cfg.tpm.signature.as_deref());
    let path = signed::locate_signature_file(explicit, false)
        .filter(|p| p.exists())
        .ok_or_else(|| {
            usage(match explicit {
                Some(p) => format!("the signature file {} does not exist", p.display()),
                None => "no signature file where systemd-cryptsetup looks; give --signature".into(),
            })
        })?;
    let _lock = lock_directory_of(&path)?;
    let mut file = signed::read_signature_file(&path)?;
    let mut tpm = Tpm::open(&cfg.tpm.tcti, Duration::from_secs(cfg.tpm.timeout))?;
    let (mut made, mut refused) = (0usize, Vec::new());
    for (key, pcrs, policy_ref, bank) in &enrolments {
        let pkfp = key.fingerprint();
        for mut e in file.entries(*bank) {
            if e.pkfp != pkfp || &e.pcrs != pcrs || e.counter.is_some() != policy_ref.is_some() {
                continue;
            }
            let r = policy_ref.as_deref().unwrap_or_default();
            match tpm.signature_ticket(key, &e, r) {
                Ok(t) => {
                    e.ticket = Some(t);
                    file.add(*bank, &e);
                    made += 1;
                }
                Err(why) => refused.push(format!("{} {}: {why}", bank.name(), hex_encode(&e.pol))),
            }
        }
    }
    drop(tpm);
    if made > 0 {
        write_signature_file(&path, &file)?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "success": refused.is_empty(),
                "signature_file": path.display().to_string(),
                "tickets": made,
                "refused": refused,
            })
        );
    } else {
        println!(
            "{}: {made} signature(s) verified by this TPM, tickets kept",
            path.display()
        );
        for r in &refused {
            eprintln!("vaultguard: no ticket for {r}");
        }
    }
    Ok(if refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Predicted PCR values: `{"bank":"sha256","pcrs":{"9":"<hex>",…}}`.
pub fn parse_predicted(
    bytes: &[u8],
) -> std::result::Result<(Bank, BTreeMap<u32, Vec<u8>>), String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("is not JSON ({e})"))?;
    let bank_name = v
        .get("bank")
        .and_then(Value::as_str)
        .ok_or("has no \"bank\" string")?;
    let bank =
        Bank::from_name(bank_name).ok_or_else(|| format!("names an unknown bank `{bank_name}`"))?;
    let pcrs = v
        .get("pcrs")
        .and_then(Value::as_object)
        .ok_or("has no \"pcrs\" object")?;
    let mut out = BTreeMap::new();
    for (k, val) in pcrs {
        let p: u32 = k
            .parse()
            .ok()
            .filter(|&p| p < 24)
            .ok_or_else(|| format!("key `{k}` is not a PCR number (0-23)"))?;
        let hex = val
            .as_str()
            .ok_or_else(|| format!("PCR {p}: the value is not a hex string"))?;
        let bytes = hex_decode(hex).map_err(|e| format!("PCR {p}: {e}"))?;
        if bytes.len() != bank.digest_len() {
            return Err(format!(
                "PCR {p}: {} bytes, a {} value has {}",
                bytes.len(),
                bank.name(),
                bank.digest_len()
            ));
        }
        out.insert(p, bytes);
    }
    Ok((bank, out))
}

fn read_limited(path: &str) -> std::result::Result<Vec<u8>, String> {
    const MAX: u64 = 1 << 20;
    let mut buf = Vec::new();
    let r = if path == "-" {
        std::io::stdin().take(MAX + 1).read_to_end(&mut buf)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX + 1).read_to_end(&mut buf))
    };
    r.map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX {
        return Err(format!("larger than {MAX} bytes"));
    }
    Ok(buf)
}

fn sign(cfg: &Config, c: &PolicySignCmd, json: bool) -> Result<ExitCode> {
    let usage = |msg: String| -> Box<dyn Error> { Failure::usage(msg).into() };
    let shown = c.private_key.display();
    let pem = signed::read_key_file(&c.private_key)
        .map_err(|e| usage(format!("--private-key {shown}: {e}")))?;
    let key =
        SigningKey::from_pem(&pem).map_err(|e| usage(format!("--private-key {shown}: {e}")))?;
    drop(pem);
    let public = key.public();
    if let Some(p) = &c.public_key {
        let text = signed::read_key_file(p)
            .map_err(|e| usage(format!("--public-key {}: {e}", p.display())))?;
        let given = PolicyKey::from_pem(&text)
            .map_err(|e| usage(format!("--public-key {}: {e}", p.display())))?;
        if given.fingerprint() != public.fingerprint() {
            return Err(usage(format!(
                "--public-key {} is not the public half of --private-key {shown}",
                p.display()
            )));
        }
    }
    let (bank, predicted) = match &c.predicted {
        Some(src) => {
            let shown = if src == "-" {
                "standard input"
            } else {
                src.as_str()
            };
            let bytes =
                read_limited(src).map_err(|e| usage(format!("--predicted {shown}: {e}")))?;
            parse_predicted(&bytes).map_err(|e| usage(format!("--predicted {shown} {e}")))?
        }
        None => (Bank::Sha256, BTreeMap::new()),
    };
    let pcrs = match &c.public_key_pcrs {
        Some(l) => parse_pcr_list(l).map_err(|e| usage(format!("--public-key-pcrs: {e}")))?,
        None if !predicted.is_empty() => predicted.keys().copied().collect(),
        None => vec![11],
    };
    if pcrs.is_empty() {
        return Err(usage("--public-key-pcrs is empty".into()));
    }
    let missing: Vec<u32> = pcrs
        .iter()
        .copied()
        .filter(|p| !predicted.contains_key(p))
        .collect();
    let mut values: Vec<(u32, Vec<u8>)> = pcrs
        .iter()
        .filter_map(|p| predicted.get(p).map(|v| (*p, v.clone())))
        .collect();
    let revocable = match &c.revocation_counter {
        Some(h) => Some(
            counter::parse_handle(h).map_err(|e| usage(format!("--revocation-counter: {e}")))?,
        ),
        None if c.counter_value.is_some() => {
            return Err(usage(
                "--counter-value needs --revocation-counter (the counter it is a value of)".into(),
            ))
        }
        None => None,
    };
    // The TPM is opened only if something must be read from it (signing
    // predicted values for a given counter value needs none).
    let mut tpm_slot = None;
    if !missing.is_empty() {
        values.extend(tpm(&mut tpm_slot, cfg)?.read_pcrs(bank, &missing)?);
    }
    values.sort_by_key(|(p, _)| *p);
    let (pol, counter_value, message) = match revocable {
        None => {
            let pol = signed::approved_policy(bank, &values);
            (pol.clone(), None, pol)
        }
        Some(h) => {
            let v = match c.counter_value {
                Some(v) => v,
                None => tpm(&mut tpm_slot, cfg)?.read_revocation_counter(h)?.ok_or_else(|| {
                    format!("the revocation counter {h:#010x} was never written; enrol with it first")
                })?,
            };
            let name = counter::counter_name(h);
            let pol = signed::approved_policy_revocable(bank, &values, &name, v);
            let message = signed::signed_message(&pol, &name);
            (pol, Some(v), message)
        }
    };
    let sig = key.sign(&message)?;
    if !signed::verify(&public, &message, &sig) {
        return Err("the signature just made does not verify with the key's public half".into());
    }
    let entry = SignatureEntry {
        pcrs: pcrs.clone(),
        pkfp: public.fingerprint(),
        pol: pol.clone(),
        sig,
        counter: counter_value,
        ticket: None,
    };
    let path = c
        .signature
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SIGNATURE_FILE));
    // --append is a read-modify-write: concurrent runs (two kernels' hooks) each
    // renamed their own copy over the file and all but the last signature were
    // lost. An exclusive flock on the directory (the file itself is replaced by
    // rename, so it cannot carry the lock) serialises them; it goes with the fd.
    let _lock = if c.append {
        Some(lock_directory_of(&path)?)
    } else {
        None
    };
    let mut file = if c.append && path.exists() {
        signed::read_signature_file(&path).map_err(|e| {
            format!("cannot extend the signature file: {e}; sign without --append to replace it")
        })?
    } else {
        SignatureFile::default()
    };
    file.add(bank, &entry);
    write_signature_file(&path, &file)?;

    let list = pcrs
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if json {
        let vals: serde_json::Map<String, Value> = values
            .iter()
            .map(|(p, v)| (p.to_string(), Value::String(hex_encode(v))))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "success": true,
                "signature_file": path.display().to_string(),
                "bank": bank.name(),
                "pcrs": pcrs,
                "values": vals,
                "pol": hex_encode(&pol),
                "pkfp": hex_encode(&entry.pkfp),
                "appended": c.append,
                "revocation_counter": revocable,
                "counter_value": counter_value,
            })
        );
    } else {
        let for_counter = match (revocable, counter_value) {
            (Some(h), Some(v)) => format!(" for revocation counter {h:#010x} = {v}"),
            _ => String::new(),
        };
        println!(
            "vaultguard: signed {} PCRs {list} (policy {}){for_counter} with key {} into {}",
            bank.name(),
            hex_encode(&pol),
            hex_encode(&entry.pkfp),
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy revoke-older`: increment the revocation counter, so that every
/// signature made for an older value stops opening anything; audited. Says
/// whether the signature file holds a signature of the current PCRs for the new
/// value (without one, the next boot asks for the passphrase).
fn revoke_older(cfg: &Config, c: &PolicyRevokeOlderCmd, json: bool) -> Result<ExitCode> {
    let usage = |msg: String| -> Box<dyn Error> { Failure::usage(msg).into() };
    let (handle, enrolment) = match &c.revocation_counter {
        Some(h) => (
            counter::parse_handle(h).map_err(|e| usage(format!("--revocation-counter: {e}")))?,
            None,
        ),
        None => {
            let dev = crate::boot::commands::device(cfg, c.device.as_deref())?;
            let mut vault = crate::luks::Vault::open(&dev)?;
            let found: Vec<_> = vault
                .tpm2_tokens()
                .into_iter()
                .filter_map(|(_, t)| t.ok())
                .filter_map(|t| t.revocation_counter.map(|h| (h, t)))
                .collect();
            match found.as_slice() {
                [] => {
                    return Err(usage(format!(
                        "{dev} has no revocable signed enrolment (enroll --public-key … \
                         --revocation-counter); give --revocation-counter to bump a counter anyway"
                    )))
                }
                [(h, t), rest @ ..] => {
                    if rest.iter().any(|(o, _)| o != h) {
                        return Err(usage(format!(
                            "{dev} has enrolments with different revocation counters; choose one \
                             with --revocation-counter"
                        )));
                    }
                    (*h, Some(t.clone()))
                }
            }
        }
    };
    let mut tpm = Tpm::open(&cfg.tpm.tcti, Duration::from_secs(cfg.tpm.timeout))?;
    // The handle came from the (unauthenticated) header: bump it only if it is
    // the counter the sealed object was made for. Otherwise an offline edit of
    // `vaultguard_revocation_counter` had the operator bump some other counter
    // while every signature they meant to withdraw stayed valid.
    if let Some(t) = &enrolment {
        let proven = crate::boot::signed_claims_match_blob(t).and_then(|object| {
            tpm.check_made_here(&object)
                .map_err(|e| format!("its sealed object was not made by this TPM: {e}"))
        });
        if let Err(why) = proven {
            return Err(format!(
                "the header's revocation counter {handle:#010x} is not proven to be the one \
                 its enrolment was sealed for ({why}); nothing was bumped. Check the header, \
                 or name the counter with --revocation-counter"
            )
            .into());
        }
    }
    let old = tpm.read_revocation_counter(handle)?;
    let mut audit = crate::boot::commands::AuditEvents::for_config(cfg);
    let (old_s, handle_s) = (
        old.map_or("unwritten".to_string(), |v| v.to_string()),
        format!("{handle:#010x}"),
    );
    // Audited before the increment too: a run killed between the TPM's bump and
    // the outcome's entry must still leave a trace of a withdrawal.
    crate::boot::Events::event(
        &mut audit,
        "policy_revoke_older_started",
        &[("counter", &handle_s), ("old_value", &old_s)],
    );
    let new = tpm.increment_revocation_counter(handle)?;
    let new_s = new.to_string();
    crate::boot::Events::event(
        &mut audit,
        "policy_revoke_older",
        &[
            ("counter", &handle_s),
            ("old_value", &old_s),
            ("new_value", &new_s),
        ],
    );
    // Is the current boot signed for the new value? (Only when we know the
    // enrolment's key and PCRs.)
    let signed_now = match &enrolment {
        Some(t) => {
            let cfg_sig = c.signature.as_deref().or(cfg.tpm.signature.as_deref());
            match crate::boot::sealed_object_with(t, cfg_sig) {
                Ok(object) => Some(tpm.signed_approval(&object).is_ok()),
                Err(_) => Some(false),
            }
        }
        None => None,
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "success": true,
                "revocation_counter": handle,
                "old_value": old,
                "new_value": new,
                "current_boot_signed": signed_now,
            })
        );
    } else {
        println!(
            "vaultguard: revocation counter {handle_s} is now {new_s} (was {old_s}): every \
             signature made for an older value is withdrawn"
        );
        if signed_now == Some(false) {
            println!(
                "vaultguard: warning: no signature approves this boot for value {new_s}; the \
                 next boot will ask for the passphrase unless you install one (policy sign \
                 --revocation-counter {handle_s} --counter-value {new_s} --append)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn tpm<'a>(slot: &'a mut Option<Tpm>, cfg: &Config) -> Result<&'a mut Tpm> {
    if slot.is_none() {
        *slot = Some(Tpm::open(
            &cfg.tpm.tcti,
            Duration::from_secs(cfg.tpm.timeout),
        )?);
    }
    slot.as_mut()
        .ok_or_else(|| "the TPM connection was just opened".into())
}

/// An exclusive flock on `path`'s directory, held until the returned file is
/// dropped. A missing directory has nothing to extend: no lock is needed.
fn lock_directory_of(path: &Path) -> Result<Option<std::fs::File>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let held = match std::fs::File::open(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open {} to lock it: {e}", dir.display()).into()),
    };
    rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
        format!(
            "cannot lock {} against a concurrent `policy sign --append`: {e}",
            dir.display()
        )
    })?;
    Ok(Some(held))
}

fn write_signature_file(path: &Path, file: &SignatureFile) -> Result<()> {
    // Public data (signatures over PCR values): readable by all, as systemd's.
    crate::atomic_file::write_atomic(path, file.to_json_string().as_bytes(), 0o644, 0o755)
        .map_err(|e| format!("cannot write the signature file {}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicted_json_is_checked() {
        let (bank, v) = parse_predicted(
            format!(
                "{{\"bank\":\"sha256\",\"pcrs\":{{\"9\":\"{}\"}}}}",
                "ab".repeat(32)
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(bank, Bank::Sha256);
        assert_eq!(v.get(&9).unwrap(), &vec![0xab; 32]);
        for (bad, want) in [
            ("nope", "not JSON"),
            ("{\"pcrs\":{}}", "bank"),
            ("{\"bank\":\"md5\",\"pcrs\":{}}", "unknown bank"),
            (
                "{\"bank\":\"sha256\",\"pcrs\":{\"30\":\"00\"}}",
                "PCR number",
            ),
            ("{\"bank\":\"sha256\",\"pcrs\":{\"9\":\"00\"}}", "bytes"),
        ] {
            let e = parse_predicted(bad.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
