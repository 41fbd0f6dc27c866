//! The TCG event log the firmware and the kernel's EFI stub wrote
//! (`/sys/kernel/security/tpm0/binary_bios_measurements`): parsing, replay against
//! the live PCRs, prediction of the PCRs after a staged initrd/kernel/command line,
//! the Authenticode PE hash UEFI firmware measures an EFI application by, and the
//! per-event comparison that explains a refusal.
//!
//! The log is outside input (a firmware bug or an attacker with root may have
//! written anything), so the parser is bounded: a size cap, an event-count cap,
//! every length checked against what is left, no panics (fuzzed: fuzz/ci.sh,
//! target `eventlog`). Only the crypto-agile format (a SHA1-format "Spec ID Event03"
//! header, then TCG_PCR_EVENT2 records) is read: every TPM 2.0 firmware writes it.
//! Nothing here talks to the TPM: callers pass the live PCR values in, so the
//! decisions are plain functions over plain data.

use super::policy::Bank;
use std::collections::BTreeMap;
use std::fmt;

/// Where Linux exposes the firmware's log (securityfs).
pub const SYSFS_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";

/// A log larger than this is refused (OVMF's is ~2 KB, real laptops' ~30-100 KB).
pub const MAX_LOG_BYTES: usize = 4 << 20;
/// At most this many events (each costs at least 14 bytes anyway).
pub const MAX_EVENTS: usize = 20_000;

pub const EV_NO_ACTION: u32 = 0x0000_0003;
pub const EV_SEPARATOR: u32 = 0x0000_0004;
pub const EV_ACTION: u32 = 0x0000_0005;
pub const EV_EVENT_TAG: u32 = 0x0000_0006;
pub const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
pub const EV_EFI_VARIABLE_BOOT: u32 = 0x8000_0002;
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
pub const EV_EFI_ACTION: u32 = 0x8000_0007;
pub const EV_EFI_VARIABLE_AUTHORITY: u32 = 0x8000_00E0;

/// The tagged-event ids the Linux EFI stub measures into PCR 9
/// (drivers/firmware/efi/libstub: `INITRD_EVENT_TAG_ID`, `LOAD_OPTIONS_EVENT_TAG_ID`).
pub const TAG_LINUX_INITRD: u32 = 0x8F3B_22EC;
pub const TAG_LINUX_LOAD_OPTIONS: u32 = 0x8F3B_22ED;

/// One TCG_PCR_EVENT2 record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub event_type: u32,
    /// (TPM algorithm id, digest), in log order.
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl Event {
    pub fn digest(&self, bank: Bank) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(a, _)| *a == bank.alg_id())
            .map(|(_, d)| d.as_slice())
    }

    /// Whether the event changes its PCR (EV_NO_ACTION records are informational).
    pub fn extends(&self) -> bool {
        self.event_type != EV_NO_ACTION
    }

    /// The tagged-event id of an EV_EVENT_TAG record.
    pub fn tag_id(&self) -> Option<u32> {
        (self.event_type == EV_EVENT_TAG)
            .then(|| read_u32(&self.data, 0))
            .flatten()
    }

    /// One operator-readable line: type and what was measured (application device
    /// path, variable name, tagged-event description or the action string).
    pub fn describe(&self) -> String {
        format!("{} {}", type_name(self.event_type), self.description())
    }

    fn description(&self) -> String {
        match self.event_type {
            EV_EFI_VARIABLE_DRIVER_CONFIG | EV_EFI_VARIABLE_BOOT | EV_EFI_VARIABLE_AUTHORITY => {
                // UEFI_VARIABLE_DATA: GUID(16) NameLength(u64, chars) DataLength(u64) Name…
                match (read_u64(&self.data, 16), self.data.get(32..)) {
                    (Some(n), Some(rest)) if n <= 512 => {
                        format!("variable {}", utf16_lossy(rest, n as usize))
                    }
                    _ => "variable (unreadable name)".into(),
                }
            }
            EV_EFI_BOOT_SERVICES_APPLICATION => {
                // UEFI_IMAGE_LOAD_EVENT: addr(8) len(8) link(8) pathlen(8) device path
                match (read_u64(&self.data, 24), self.data.get(32..)) {
                    (Some(n), Some(path)) if n as usize <= path.len() => {
                        format!("application {}", device_path_text(&path[..n as usize]))
                    }
                    _ => "application (unreadable device path)".into(),
                }
            }
            EV_EVENT_TAG => match (self.tag_id(), read_u32(&self.data, 4)) {
                (Some(id), Some(len)) => {
                    let text = self
                        .data
                        .get(8..8 + (len as usize).min(self.data.len().saturating_sub(8)))
                        .map(ascii_text)
                        .unwrap_or_default();
                    format!("tag 0x{id:08X} \"{text}\"")
                }
                _ => "tag (unreadable)".into(),
            },
            EV_SEPARATOR => "separator".into(),
            _ => {
                let t = ascii_text(&self.data);
                if t.is_empty() {
                    format!("{} bytes of event data", self.data.len())
                } else {
                    format!("\"{t}\"")
                }
            }
        }
    }
}

/// A parsed log: the banks its header declares and the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    /// (algorithm id, digest size) from the Spec ID event.
    pub algs: Vec<(u16, u16)>,
    /// PCR 0's start value's last byte (StartupLocality event; 0 without one).
    pub startup_locality: u8,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventLogError {
    Read {
        path: String,
        err: String,
    },
    TooLarge(usize),
    Truncated {
        at: usize,
        what: &'static str,
    },
    NotCryptoAgile,
    UnknownAlgorithm {
        at: usize,
        alg: u16,
    },
    TooManyEvents,
    BankMissing(&'static str),
    /// Replaying the log does not give the live value of this PCR.
    DoesNotReplay {
        pcr: u32,
        log: String,
        live: String,
    },
    NoEvents {
        pcr: u32,
    },
    NoSuchEvent(&'static str),
    Pe(&'static str),
}

impl fmt::Display for EventLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventLogError::Read { path, err } => write!(
                f,
                "cannot read the TPM event log {path}: {err} (is securityfs mounted and the firmware TPM 2.0 aware?)"
            ),
            EventLogError::TooLarge(n) => write!(
                f,
                "the TPM event log is {n} bytes, more than the {MAX_LOG_BYTES} this reads: refusing it"
            ),
            EventLogError::Truncated { at, what } => {
                write!(f, "the TPM event log is cut off at byte {at} ({what})")
            }
            EventLogError::NotCryptoAgile => write!(
                f,
                "the TPM event log does not start with a TCG2 \"Spec ID Event03\" header (a SHA1-only TPM 1.2 log cannot be used)"
            ),
            EventLogError::UnknownAlgorithm { at, alg } => write!(
                f,
                "the TPM event log names hash algorithm 0x{alg:04x} at byte {at}, which its header did not declare"
            ),
            EventLogError::TooManyEvents => {
                write!(f, "the TPM event log has more than {MAX_EVENTS} events: refusing it")
            }
            EventLogError::BankMissing(b) => {
                write!(f, "the TPM event log carries no {b} digests")
            }
            EventLogError::DoesNotReplay { pcr, log, live } => write!(
                f,
                "the TPM event log does not replay: PCR {pcr} would be {log} from the log but the TPM says {live}; refusing to predict from it (something extended PCR {pcr} outside the log, or the log is not this boot's)"
            ),
            EventLogError::NoEvents { pcr } => write!(
                f,
                "PCR {pcr} has no events in the TPM event log: its next-boot value cannot be predicted from it"
            ),
            EventLogError::NoSuchEvent(what) => write!(
                f,
                "the TPM event log has no {what} event to replace (was this system booted through the measuring path, e.g. UEFI and the kernel's EFI stub?)"
            ),
            EventLogError::Pe(what) => write!(f, "not a PE/COFF image this can hash: {what}"),
        }
    }
}

impl std::error::Error for EventLogError {}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Read and parse the log at `path` (normally [`SYSFS_LOG`]).
pub fn read(path: &std::path::Path) -> Result<EventLog, EventLogError> {
    use std::io::Read;
    // Regular files only (securityfs' log is one): a FIFO or a device given as
    // `--event-log` must not block or be read without end.
    let (f, _) = super::signed::open_regular(path).map_err(|e| EventLogError::Read {
        path: path.display().to_string(),
        err: e.to_string(),
    })?;
    // securityfs reports size 0: read up to the cap plus one byte to detect more.
    let mut buf = Vec::new();
    f.take(MAX_LOG_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| EventLogError::Read {
            path: path.display().to_string(),
            err: e.to_string(),
        })?;
    parse(&buf)
}

/// Parse a crypto-agile TCG event log.
pub fn parse(b: &[u8]) -> Result<EventLog, EventLogError> {
    if b.len() > MAX_LOG_BYTES {
        return Err(EventLogError::TooLarge(b.len()));
    }
    let trunc = |at, what| EventLogError::Truncated { at, what };
    // TCG_PCClientPCREvent: pcr(4) type(4) sha1 digest(20) size(4) data.
    let ty = read_u32(b, 4).ok_or(trunc(0, "header"))?;
    let size = read_u32(b, 28).ok_or(trunc(0, "header"))? as usize;
    let spec = b
        .get(32..32usize.saturating_add(size))
        .ok_or(trunc(32, "Spec ID event"))?;
    if ty != EV_NO_ACTION || spec.get(..16) != Some(b"Spec ID Event03\0") {
        return Err(EventLogError::NotCryptoAgile);
    }
    // signature(16) platformClass(4) minor major errata uintnSize (4) numAlgs(4)
    let n = read_u32(spec, 24).ok_or(trunc(32, "Spec ID algorithms"))? as usize;
    if n == 0 || n > 16 {
        return Err(EventLogError::NotCryptoAgile);
    }
    let mut algs = Vec::with_capacity(n);
    for i in 0..n {
        let alg = read_u16(spec, 28 + 4 * i).ok_or(trunc(32, "Spec ID algorithms"))?;
        let len = read_u16(spec, 30 + 4 * i).ok_or(trunc(32, "Spec ID algorithms"))?;
        if len == 0 || len > 128 {
            return Err(EventLogError::NotCryptoAgile);
        }
        algs.push((alg, len));
    }
    let mut at = 32 + size;
    let mut events = Vec::new();
    let mut startup_locality = 0;
    while at < b.len() {
        // Some firmware pads the log's buffer with zeroes or 0xFF: an all-padding
        // tail ends the log.
        if b[at..].iter().all(|&x| x == 0 || x == 0xFF) {
            break;
        }
        if events.len() >= MAX_EVENTS {
            return Err(EventLogError::TooManyEvents);
        }
        let start = at;
        let pcr = read_u32(b, at).ok_or(trunc(start, "event header"))?;
        let event_type = read_u32(b, at + 4).ok_or(trunc(start, "event header"))?;
        let count = read_u32(b, at + 8).ok_or(trunc(start, "event header"))? as usize;
        if count > algs.len() {
            return Err(trunc(
                start,
                "digest count larger than the header's bank list",
            ));
        }
        at += 12;
        let mut digests = Vec::with_capacity(count);
        for _ in 0..count {
            let alg = read_u16(b, at).ok_or(trunc(start, "digest"))?;
            let len = algs
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, l)| *l as usize)
                .ok_or(EventLogError::UnknownAlgorithm { at, alg })?;
            let d = b.get(at + 2..at + 2 + len).ok_or(trunc(start, "digest"))?;
            digests.push((alg, d.to_vec()));
            at += 2 + len;
        }
        let dlen = read_u32(b, at).ok_or(trunc(start, "event size"))? as usize;
        let data = b
            .get(at + 4..(at + 4).saturating_add(dlen))
            .ok_or(trunc(start, "event data"))?;
        at += 4 + dlen;
        if event_type == EV_NO_ACTION && pcr == 0 && data.starts_with(b"StartupLocality\0") {
            startup_locality = data.get(16).copied().unwrap_or(0);
        }
        events.push(Event {
            pcr,
            event_type,
            digests,
            data: data.to_vec(),
        });
    }
    Ok(EventLog {
        algs,
        startup_locality,
        events,
    })
}

impl EventLog {
    fn check_bank(&self, bank: Bank) -> Result<(), EventLogError> {
        if self.algs.iter().any(|(a, _)| *a == bank.alg_id()) {
            Ok(())
        } else {
            Err(EventLogError::BankMissing(bank.name()))
        }
    }

    /// PCRs that at least one extending event touches, ascending.
    pub fn pcrs(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .events
            .iter()
            .filter(|e| e.extends())
            .map(|e| e.pcr)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The PCR values this log produces, for every PCR it touches.
    pub fn replay(&self, bank: Bank) -> Result<BTreeMap<u32, Vec<u8>>, EventLogError> {
        self.check_bank(bank)?;
        let mut out: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.extends()) {
            let d = e
                .digest(bank)
                .ok_or(EventLogError::BankMissing(bank.name()))?;
            let old = out
                .remove(&e.pcr)
                .unwrap_or_else(|| self.initial(bank, e.pcr));
            out.insert(e.pcr, bank.hash(&[&old, d]));
        }
        Ok(out)
    }

    fn initial(&self, bank: Bank, pcr: u32) -> Vec<u8> {
        let mut v = vec![0u8; bank.digest_len()];
        if pcr == 0 {
            if let Some(last) = v.last_mut() {
                *last = self.startup_locality;
            }
        }
        v
    }

    /// Check the replay against the live `pcrs` (PCR → value): the first PCR that
    /// disagrees is named. A PCR the log never touches must be at its reset value.
    pub fn verify(&self, bank: Bank, live: &[(u32, Vec<u8>)]) -> Result<(), EventLogError> {
        let replayed = self.replay(bank)?;
        for (pcr, value) in live {
            let expect = replayed
                .get(pcr)
                .cloned()
                .unwrap_or_else(|| self.initial(bank, *pcr));
            if &expect != value {
                return Err(EventLogError::DoesNotReplay {
                    pcr: *pcr,
                    log: crate::encoding::hex_encode(&expect),
                    live: crate::encoding::hex_encode(value),
                });
            }
        }
        Ok(())
    }

    /// This log with the staged components' digests in place of the measured ones.
    pub fn with_changes(&self, bank: Bank, changes: &Changes) -> Result<EventLog, EventLogError> {
        self.check_bank(bank)?;
        let mut log = self.clone();
        let mut set = |idx: usize, digest: &[u8]| {
            for (a, d) in log.events[idx].digests.iter_mut() {
                if *a == bank.alg_id() {
                    *d = digest.to_vec();
                }
            }
            // Other banks' digests are now stale: drop them so nothing uses them.
            log.events[idx].digests.retain(|(a, _)| *a == bank.alg_id());
        };
        if let Some(initrd) = &changes.initrd {
            let i = self
                .position(|e| e.pcr == 9 && e.tag_id() == Some(TAG_LINUX_INITRD))
                .ok_or(EventLogError::NoSuchEvent("\"Linux initrd\" (PCR 9)"))?;
            set(i, &bank.hash(&[initrd]));
        }
        if let Some(opts) = &changes.load_options {
            let i = self
                .position(|e| e.pcr == 9 && e.tag_id() == Some(TAG_LINUX_LOAD_OPTIONS))
                .ok_or(EventLogError::NoSuchEvent(
                    "\"LOADED_IMAGE::LoadOptions\" (PCR 9)",
                ))?;
            set(i, &bank.hash(&[&load_options_bytes(opts)]));
        }
        if let Some(kernel) = &changes.kernel {
            // The kernel is the last EFI application the firmware measures (after
            // shim and a boot loader, if any).
            let i = self
                .rposition(|e| e.pcr == 4 && e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
                .ok_or(EventLogError::NoSuchEvent(
                    "EV_EFI_BOOT_SERVICES_APPLICATION (PCR 4)",
                ))?;
            set(i, &authenticode_digest(bank, kernel)?);
        }
        Ok(log)
    }

    fn position(&self, f: impl Fn(&Event) -> bool) -> Option<usize> {
        self.events.iter().position(f)
    }
    fn rposition(&self, f: impl Fn(&Event) -> bool) -> Option<usize> {
        self.events.iter().rposition(f)
    }

    /// The extending events of `pcr` as (description, digest) in `bank`, the form
    /// kept in the token at enrolment.
    pub fn digest_list(&self, bank: Bank, pcr: u32) -> Vec<(String, Vec<u8>)> {
        self.events
            .iter()
            .filter(|e| e.pcr == pcr && e.extends())
            .filter_map(|e| Some((e.describe(), e.digest(bank)?.to_vec())))
            .collect()
    }
}

/// The staged components a prediction applies.
#[derive(Default)]
pub struct Changes {
    pub initrd: Option<Vec<u8>>,
    pub kernel: Option<Vec<u8>>,
    /// The kernel command line as the boot loader passes it (LoadOptions).
    pub load_options: Option<String>,
}

/// The bytes the EFI stub hashes for LoadOptions: the UCS-2 string with its NUL, as
/// measured under OVMF (`console=ttyS0 … initrd=initrd` + NUL, UTF-16LE).
pub fn load_options_bytes(cmdline: &str) -> Vec<u8> {
    cmdline
        .encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// Predict `pcrs` after `changes`: the log is first checked against `live` (the
/// same PCRs, read from the TPM) and refused if it does not replay.
pub fn predict(
    log: &EventLog,
    bank: Bank,
    live: &[(u32, Vec<u8>)],
    changes: &Changes,
) -> Result<Vec<(u32, Vec<u8>)>, EventLogError> {
    log.verify(bank, live)?;
    let new = log.with_changes(bank, changes)?.replay(bank)?;
    live.iter()
        .map(|(p, _)| {
            new.get(p)
                .map(|v| (*p, v.clone()))
                .ok_or(EventLogError::NoEvents { pcr: *p })
        })
        .collect()
}

/// One record that differs between enrolment and now, for a refusal message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventDiff {
    pub pcr: u32,
    pub description: String,
    /// `None`: the record is new (or is gone, for `new == None`).
    pub old: Option<Vec<u8>>,
    pub new: Option<Vec<u8>>,
}

impl fmt::Display for EventDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = |d: &Option<Vec<u8>>| {
            d.as_ref()
                .map(|d| crate::encoding::hex_encode(d))
                .unwrap_or_else(|| "(none)".into())
        };
        write!(
            f,
            "PCR {}: {}: {} -> {}",
            self.pcr,
            self.description,
            h(&self.old),
            h(&self.new)
        )
    }
}

/// Compare the digest lists recorded at enrolment with the current ones, record by
/// record in log order: each record whose digest (or presence) changed is one line.
pub fn diff(
    enrolled: &BTreeMap<u32, Vec<(String, Vec<u8>)>>,
    now: &BTreeMap<u32, Vec<(String, Vec<u8>)>>,
) -> Vec<EventDiff> {
    let empty = Vec::new();
    let mut out = Vec::new();
    let pcrs: std::collections::BTreeSet<u32> =
        enrolled.keys().chain(now.keys()).copied().collect();
    for pcr in pcrs {
        let a = enrolled.get(&pcr).unwrap_or(&empty);
        let b = now.get(&pcr).unwrap_or(&empty);
        for i in 0..a.len().max(b.len()) {
            match (a.get(i), b.get(i)) {
                (Some((da, xa)), Some((db, xb))) if xa != xb || da != db => out.push(EventDiff {
                    pcr,
                    description: if da == db {
                        db.clone()
                    } else {
                        format!("{da} / now {db}")
                    },
                    old: Some(xa.clone()),
                    new: Some(xb.clone()),
                }),
                (Some((da, xa)), None) => out.push(EventDiff {
                    pcr,
                    description: da.clone(),
                    old: Some(xa.clone()),
                    new: None,
                }),
                (None, Some((db, xb))) => out.push(EventDiff {
                    pcr,
                    description: db.clone(),
                    old: None,
                    new: Some(xb.clone()),
                }),
                _ => {}
            }
        }
    }
    out
}

fn type_name(t: u32) -> String {
    match t {
        EV_NO_ACTION => "EV_NO_ACTION".into(),
        EV_SEPARATOR => "EV_SEPARATOR".into(),
        EV_ACTION => "EV_ACTION".into(),
        EV_EVENT_TAG => "EV_EVENT_TAG".into(),
        0x0000_0008 => "EV_S_CRTM_VERSION".into(),
        0x0000_000D => "EV_IPL".into(),
        0x8000_0008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB".into(),
        EV_EFI_VARIABLE_DRIVER_CONFIG => "EV_EFI_VARIABLE_DRIVER_CONFIG".into(),
        EV_EFI_VARIABLE_BOOT => "EV_EFI_VARIABLE_BOOT".into(),
        EV_EFI_BOOT_SERVICES_APPLICATION => "EV_EFI_BOOT_SERVICES_APPLICATION".into(),
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER".into(),
        EV_EFI_ACTION => "EV_EFI_ACTION".into(),
        0x8000_000A => "EV_EFI_HANDOFF_TABLES".into(),
        0x8000_000C => "EV_EFI_VARIABLE_BOOT2".into(),
        EV_EFI_VARIABLE_AUTHORITY => "EV_EFI_VARIABLE_AUTHORITY".into(),
        other => format!("event type 0x{other:08X}"),
    }
}

/// Printable ASCII only (the log is outside input: no control characters reach a
/// console or the journal), trailing NULs dropped, at most 96 characters.
fn ascii_text(b: &[u8]) -> String {
    b.iter()
        .take(96)
        .take_while(|&&c| c != 0)
        .map(|&c| {
            if (0x20..0x7F).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

fn utf16_lossy(b: &[u8], chars: usize) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .take(chars.min(256))
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The device path as UEFI prints it, for the nodes an operator recognises (file
/// path, firmware volume file, hard disk partition); others as their type numbers.
fn device_path_text(b: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() && parts.len() < 16 {
        let (ty, sub) = (b[at], b[at + 1]);
        let len = u16::from_le_bytes([b[at + 2], b[at + 3]]) as usize;
        if ty == 0x7F || len < 4 || at + len > b.len() {
            break;
        }
        let body = &b[at + 4..at + len];
        parts.push(match (ty, sub) {
            (4, 4) => utf16_lossy(body, body.len() / 2),
            (4, 6) | (4, 7) if body.len() >= 16 => format!("FvFile({})", guid_text(&body[..16])),
            (4, 1) if body.len() >= 4 => format!(
                "HD({})",
                u32::from_le_bytes([body[0], body[1], body[2], body[3]])
            ),
            (4, 3) if body.len() >= 16 => format!("VenMedia({})", guid_text(&body[..16])),
            _ => format!("({ty},{sub})"),
        });
        at += len;
    }
    if parts.is_empty() {
        "(empty device path)".into()
    } else {
        parts.join("/")
    }
}

fn guid_text(g: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        crate::encoding::hex_encode(&g[8..10]).to_uppercase(),
        crate::encoding::hex_encode(&g[10..16]).to_uppercase()
    )
}

/// The Authenticode hash of a PE/COFF image (Microsoft "Windows Authenticode
/// Portable Executable Signature Format", as EDK2's Tcg2Dxe measures an EFI
/// application): the headers without the checksum and the certificate-table
/// entry, the sections in file order, then whatever follows them except the
/// attribute certificates. A signed kernel and the same kernel unsigned hash alike.
pub fn authenticode_digest(bank: Bank, img: &[u8]) -> Result<Vec<u8>, EventLogError> {
    let pe = EventLogError::Pe;
    if img.get(..2) != Some(b"MZ") {
        return Err(pe("no MZ header"));
    }
    let nt = read_u32(img, 0x3C).ok_or(pe("short DOS header"))? as usize;
    if img.get(nt..nt.saturating_add(4)) != Some(b"PE\0\0") {
        return Err(pe("no PE signature"));
    }
    let coff = nt + 4;
    let nsections = read_u16(img, coff + 2).ok_or(pe("short COFF header"))? as usize;
    let opt_size = read_u16(img, coff + 16).ok_or(pe("short COFF header"))? as usize;
    let opt = coff + 20;
    let magic = read_u16(img, opt).ok_or(pe("short optional header"))?;
    let (nrva_at, dirs_at) = match magic {
        0x10B => (opt + 92, opt + 96),
        0x20B => (opt + 108, opt + 112),
        _ => return Err(pe("unknown optional-header magic")),
    };
    let size_of_headers = read_u32(img, opt + 60).ok_or(pe("short optional header"))? as usize;
    let nrva = read_u32(img, nrva_at).ok_or(pe("short optional header"))? as usize;
    let checksum = opt + 64;
    if size_of_headers > img.len() || size_of_headers < checksum + 4 {
        return Err(pe("SizeOfHeaders out of range"));
    }
    let mut parts: Vec<&[u8]> = vec![&img[..checksum]];
    let cert_size = if nrva > 4 {
        let entry = dirs_at + 4 * 8;
        if entry + 8 > size_of_headers {
            return Err(pe("certificate table entry outside the headers"));
        }
        parts.push(&img[checksum + 4..entry]);
        parts.push(&img[entry + 8..size_of_headers]);
        read_u32(img, entry + 4).ok_or(pe("short data directory"))? as usize
    } else {
        parts.push(&img[checksum + 4..size_of_headers]);
        0
    };
    let sec_table = opt + opt_size;
    if nsections > 96 {
        return Err(pe("too many sections"));
    }
    let mut sections = Vec::with_capacity(nsections);
    for i in 0..nsections {
        let s = sec_table + 40 * i;
        let raw_size = read_u32(img, s + 16).ok_or(pe("short section table"))? as usize;
        let raw_ptr = read_u32(img, s + 20).ok_or(pe("short section table"))? as usize;
        if raw_size == 0 {
            continue;
        }
        sections.push((raw_ptr, raw_size));
    }
    sections.sort_unstable();
    let mut hashed = size_of_headers;
    for (ptr, size) in sections {
        let s = img
            .get(ptr..ptr.saturating_add(size))
            .ok_or(pe("section data beyond the end of the file"))?;
        parts.push(s);
        hashed += size;
    }
    if img.len() > hashed {
        let end = img
            .len()
            .checked_sub(cert_size)
            .ok_or(pe("certificate table larger than the file"))?;
        if end > hashed {
            // EDK2 hashes the bytes after the last section, up to the certificates.
            parts.push(
                img.get(hashed..end)
                    .ok_or(pe("trailing data out of range"))?,
            );
        } else if end < hashed {
            return Err(pe("sections overlap the certificate table"));
        }
    }
    Ok(bank.hash(&parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::hex_encode;

    /// A real log: OVMF (Debian 2022.11) + swtpm, QEMU `-kernel vmlinuz-6.1.0-56-amd64
    /// -initrd <busybox initramfs> -append "console=ttyS0 panic=-1 quiet"`.
    const OVMF: &[u8] = include_bytes!("testdata/ovmf-direct-boot.eventlog");

    /// The live PCRs read in that guest (/sys/class/tpm/tpm0/pcr-sha256/N).
    const LIVE: &[(u32, &str)] = &[
        (
            0,
            "d15e5a90a5188d103d9a0b1e7910a9e5d019506aabc25675cfae4950cd9ae64b",
        ),
        (
            1,
            "8e9d1fe23131f12d6a523e9c32eb3223d4dc25e14eb5fd60163e7ba8de0f248c",
        ),
        (
            2,
            "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969",
        ),
        (
            4,
            "ced194a42be6adbc979cc42346c046b96009ad609d36b05cac989ff03b9a2195",
        ),
        (
            5,
            "a5ceb755d043f32431d63e39f5161464620a3437280494b5850dc1b47cc074e0",
        ),
        (
            7,
            "65caf8dd1e0ea7a6347b635d2b379c93b9a1351edc2afc3ecda700e534eb3068",
        ),
        (
            8,
            "0000000000000000000000000000000000000000000000000000000000000000",
        ),
        (
            9,
            "c795da596f1debbaa8250e8496e4aaaf153a4ecd9f192047d9346ac8122354a1",
        ),
    ];

    fn live() -> Vec<(u32, Vec<u8>)> {
        LIVE.iter()
            .map(|(p, h)| (*p, crate::encoding::hex_decode(h).unwrap()))
            .collect()
    }

    #[test]
    fn real_ovmf_log_parses_and_replays_to_the_live_pcrs() {
        let log = parse(OVMF).unwrap();
        assert_eq!(log.algs, vec![(0x000B, 32)]);
        assert_eq!(log.events.len(), 24);
        assert_eq!(log.pcrs(), vec![0, 1, 2, 3, 4, 5, 6, 7, 9]);
        log.verify(Bank::Sha256, &live()).unwrap();
        // The initrd event is the tagged one, its digest the file's plain SHA-256.
        let initrd = log
            .events
            .iter()
            .find(|e| e.tag_id() == Some(TAG_LINUX_INITRD))
            .unwrap();
        assert_eq!(initrd.pcr, 9);
        assert_eq!(
            initrd.describe(),
            "EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\""
        );
        assert_eq!(
            hex_encode(initrd.digest(Bank::Sha256).unwrap()),
            "c64ea34845d40c782d8881cb59fdfd1ca42bd3e34558b1ee31a2de5748a2f687"
        );
        // The load options: the command line plus OVMF's " initrd=initrd", UTF-16 + NUL.
        let opts = log
            .events
            .iter()
            .find(|e| e.tag_id() == Some(TAG_LINUX_LOAD_OPTIONS))
            .unwrap();
        assert_eq!(
            opts.digest(Bank::Sha256).unwrap(),
            Bank::Sha256.hash(&[&load_options_bytes(
                "console=ttyS0 panic=-1 quiet initrd=initrd"
            )])
        );
        let app = log
            .events
            .iter()
            .find(|e| e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
            .unwrap();
        assert!(
            app.describe()
                .starts_with("EV_EFI_BOOT_SERVICES_APPLICATION application "),
            "{}",
            app.describe()
        );
        assert!(app.describe().ends_with("/kernel"), "{}", app.describe());
        let sb = &log.events[3];
        assert_eq!(
            sb.describe(),
            "EV_EFI_VARIABLE_DRIVER_CONFIG variable SecureBoot"
        );
    }

    #[test]
    fn a_pcr_that_does_not_replay_is_named() {
        let log = parse(OVMF).unwrap();
        let mut l = live();
        l[5].1[0] ^= 1; // PCR 7
        let err = log.verify(Bank::Sha256, &l).unwrap_err();
        assert!(
            matches!(err, EventLogError::DoesNotReplay { pcr: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("PCR 7"));
        // Predicting refuses too.
        let c = Changes {
            initrd: Some(b"x".to_vec()),
            ..Default::default()
        };
        assert!(predict(&log, Bank::Sha256, &l, &c).is_err());
        // A PCR the log never touches must be at its reset value.
        let err = log
            .verify(Bank::Sha256, &[(11, vec![1u8; 32])])
            .unwrap_err();
        assert!(matches!(err, EventLogError::DoesNotReplay { pcr: 11, .. }));
        // And the sha1 bank is not in this log.
        assert_eq!(
            log.replay(Bank::Sha1).unwrap_err(),
            EventLogError::BankMissing("sha1")
        );
    }

    #[test]
    fn predicting_the_same_initrd_gives_the_live_value_and_another_changes_only_pcr_9() {
        let log = parse(OVMF).unwrap();
        // The busybox initramfs of that boot (its SHA-256 is in the log): predicting
        // it again must give exactly the live PCRs.
        let same_digest = log
            .events
            .iter()
            .find(|e| e.tag_id() == Some(TAG_LINUX_INITRD))
            .unwrap()
            .digest(Bank::Sha256)
            .unwrap()
            .to_vec();
        let pcrs = [4u32, 7, 9];
        let l: Vec<_> = live()
            .into_iter()
            .filter(|(p, _)| pcrs.contains(p))
            .collect();
        let c = Changes {
            initrd: Some(b"new initrd".to_vec()),
            ..Default::default()
        };
        let p = predict(&log, Bank::Sha256, &l, &c).unwrap();
        assert_eq!(p[0], l[0]);
        assert_eq!(p[1], l[1]);
        assert_ne!(p[2], l[2]);
        // PCR 9 by hand: load options, then the new initrd.
        let opts = log.events[20].digest(Bank::Sha256).unwrap();
        let z = vec![0u8; 32];
        let s = Bank::Sha256;
        let want = s.hash(&[&s.hash(&[&z, opts]), &s.hash(&[b"new initrd"])]);
        assert_eq!(p[2].1, want);
        // And by its own digest: replacing with the same digest is identity.
        let mut log2 = log.clone();
        log2.events[21].digests[0].1 = same_digest;
        assert_eq!(log2, log);
        // A changed command line changes PCR 9 as well.
        let c = Changes {
            load_options: Some("console=ttyS0 initrd=initrd".into()),
            ..Default::default()
        };
        assert_ne!(predict(&log, Bank::Sha256, &l, &c).unwrap()[2], l[2]);
    }

    /// QEMU's `-kernel` hands OVMF the kernel with its setup header filled in
    /// (hw/i386/x86.c, x86_load_linux): loader type 0xB0, CAN_USE_HEAP, heap end,
    /// command-line address and the initrd's address and size. OVMF measures that
    /// patched image, so under QEMU direct boot PCR 4 also depends on the initrd's
    /// size; a kernel loaded from a disk is measured as the file is.
    fn qemu_direct_boot_patch(img: &mut [u8], ram: u32, initrd_size: u32) {
        const ACPI_DATA_SIZE: u32 = 0x20000 + 0x8000; // pc machine types >= 2.x
        img[0x210] = 0xB0;
        img[0x211] |= 0x80;
        img[0x224..0x226].copy_from_slice(&(0x20000u32 - 0x10000 - 0x200).to_le_bytes()[..2]);
        img[0x228..0x22C].copy_from_slice(&0x20000u32.to_le_bytes());
        let max =
            u32::from_le_bytes(img[0x22C..0x230].try_into().unwrap()).min(ram - ACPI_DATA_SIZE - 1);
        img[0x218..0x21C].copy_from_slice(&((max - initrd_size) & !4095).to_le_bytes());
        img[0x21C..0x220].copy_from_slice(&initrd_size.to_le_bytes());
    }

    #[test]
    fn authenticode_of_the_debian_kernel_is_what_ovmf_measured() {
        // Ground truth without sbsign/pesign: the PCR 4 application digest OVMF
        // logged when QEMU loaded this very file (-m 512, a 1,031,272-byte initrd).
        // Needs the Debian kernel the harness boots.
        let path = "/boot/vmlinuz-6.1.0-56-amd64";
        let mut img = std::fs::read(path)
            .expect("the Debian 12 kernel 6.1.0-56 (qemu-tests/setup-host.sh installs it)");
        let file_digest = authenticode_digest(Bank::Sha256, &img).unwrap();
        qemu_direct_boot_patch(&mut img, 512 << 20, 1_031_272);
        assert_eq!(
            hex_encode(&authenticode_digest(Bank::Sha256, &img).unwrap()),
            "af7e2cb29f1dc5737b4a575cf4edaed937187967c5e60f8c40253fa8530f7a8a"
        );
        assert_ne!(
            file_digest,
            authenticode_digest(Bank::Sha256, &img).unwrap()
        );
        // The signature (attribute certificate table) is not part of the hash: a
        // larger certificate table with the same image hashes alike.
        let mut signed_more = img.clone();
        signed_more.extend_from_slice(&[0u8; 8]);
        let nt = read_u32(&img, 0x3C).unwrap() as usize;
        let entry = nt + 4 + 20 + 112 + 32;
        let size = read_u32(&img, entry + 4).unwrap() + 8;
        signed_more[entry + 4..entry + 8].copy_from_slice(&size.to_le_bytes());
        assert_eq!(
            authenticode_digest(Bank::Sha256, &signed_more).unwrap(),
            authenticode_digest(Bank::Sha256, &img).unwrap()
        );
        // A kernel prediction with the same image is the identity on PCR 4.
        let log = parse(OVMF).unwrap();
        let l: Vec<_> = live().into_iter().filter(|(p, _)| *p == 4).collect();
        let c = Changes {
            kernel: Some(img),
            ..Default::default()
        };
        assert_eq!(predict(&log, Bank::Sha256, &l, &c).unwrap(), l);
    }

    #[test]
    fn authenticode_rejects_what_is_not_pe() {
        assert!(authenticode_digest(Bank::Sha256, b"").is_err());
        assert!(authenticode_digest(Bank::Sha256, b"MZ").is_err());
        let mut img = vec![0u8; 512];
        img[0..2].copy_from_slice(b"MZ");
        img[0x3C] = 0x40;
        img[0x40..0x44].copy_from_slice(b"PE\0\0");
        assert!(authenticode_digest(Bank::Sha256, &img).is_err());
    }

    #[test]
    fn every_truncation_and_corruption_of_the_real_log_is_an_error_not_a_panic() {
        for n in 0..OVMF.len() {
            let _ = parse(&OVMF[..n]);
        }
        for i in 0..OVMF.len() {
            let mut b = OVMF.to_vec();
            b[i] ^= 0xA5;
            if let Ok(log) = parse(&b) {
                let _ = log.replay(Bank::Sha256);
                for e in &log.events {
                    let _ = e.describe();
                }
            }
        }
        assert_eq!(
            parse(b"").unwrap_err(),
            EventLogError::Truncated {
                at: 0,
                what: "header"
            }
        );
        assert!(matches!(
            parse(&[0u8; 64]),
            Err(EventLogError::NotCryptoAgile)
        ));
        // A huge declared size is "cut off", not an allocation.
        let mut b = OVMF.to_vec();
        let last = b.len() - 44;
        b.truncate(last);
        assert!(parse(&b).is_err());
    }

    #[test]
    fn diff_names_each_changed_record_once() {
        let log = parse(OVMF).unwrap();
        let before: BTreeMap<u32, _> = [4u32, 9]
            .iter()
            .map(|&p| (p, log.digest_list(Bank::Sha256, p)))
            .collect();
        let c = Changes {
            initrd: Some(b"tampered".to_vec()),
            ..Default::default()
        };
        let after_log = log.with_changes(Bank::Sha256, &c).unwrap();
        let after: BTreeMap<u32, _> = [4u32, 9]
            .iter()
            .map(|&p| (p, after_log.digest_list(Bank::Sha256, p)))
            .collect();
        let d = diff(&before, &after);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].pcr, 9);
        let line = d[0].to_string();
        assert!(
            line.starts_with("PCR 9: EV_EVENT_TAG tag 0x8F3B22EC \"Linux initrd\": c64ea348"),
            "{line}"
        );
        assert!(
            line.ends_with(&hex_encode(&Bank::Sha256.hash(&[b"tampered"]))),
            "{line}"
        );
        assert!(diff(&before, &before).is_empty());
        // A record that appeared is a line too.
        let mut more = after.clone();
        more.get_mut(&4)
            .unwrap()
            .push(("EV_EFI_ACTION \"x\"".into(), vec![1; 32]));
        let d = diff(&before, &more);
        assert_eq!(d.len(), 2);
        assert!(d[0].to_string().contains("(none) -> 0101"), "{}", d[0]);
    }
}
