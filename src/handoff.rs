//! The initramfs → supervisor hand-off: what the boot unlock leaves behind in
//! `/run` (which survives switch_root) and how the supervisor finds it.
//!
//! Both sides import this module and nothing else of each other: where the
//! initramfs's audit entries wait to be taken over, the hint saying how the vault
//! was opened, how to tell the initramfs from the booted system, and how a
//! mapping's device-mapper UUID names its LUKS UUID (for the keyring entries
//! either side revokes). It never decides anything: the supervisor believes the
//! hint only when the kernel agrees (`supervisor::machine`).

use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Where the boot unlock appends its audit entries while the real log is not
/// mounted yet; the supervisor takes them over at start (`audit::import`).
pub const INITRD_AUDIT: &str = "/run/vaultguard/audit-initrd.jsonl";

/// The file systemd and dracut put in every initramfs (os-release(5)).
const INITRD_RELEASE: &str = "/etc/initrd-release";

/// Whether this process runs in the initramfs.
pub fn in_initrd() -> bool {
    Path::new(INITRD_RELEASE).exists()
}

/// Where boot-time audit entries go: the initramfs's hand-off file there, the
/// configured log after boot.
pub fn boot_audit_path(configured: &Path) -> PathBuf {
    if in_initrd() {
        PathBuf::from(INITRD_AUDIT)
    } else {
        configured.to_path_buf()
    }
}

/// How the boot path opened the vault, left in the state file for the supervisor
/// (which overwrites the file with its own snapshot once it runs). The fields are
/// a subset of the supervisor's snapshot, so either reads the other's file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootHint {
    pub state: String,
    /// How it was opened (`tpm2_unseal`, `passphrase`, ...).
    pub detail: String,
    /// Seconds since the epoch of the write.
    pub updated: f64,
    /// How long the TPM path took (opening the TPM, the unseal, the keyslot it
    /// opens), when the TPM opened the vault: the supervisor's
    /// `vaultguard_boot_tpm_unseal_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_unseal_seconds: Option<f64>,
    /// Why the TPM did not open the vault, when it did not: the reason, then the
    /// event-log records that changed since enrolment (`status` shows them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tpm_refusal: Vec<String>,
}

/// Leave the hint at `path` (the configured state file), atomically, mode 0644.
pub fn write_boot_hint(
    path: &Path,
    state: &str,
    detail: &str,
    tpm_unseal_seconds: Option<f64>,
) -> io::Result<()> {
    write_boot_hint_with_refusal(path, state, detail, tpm_unseal_seconds, &[])
}

/// [`write_boot_hint`] with why the TPM did not open the vault (for `status`).
pub fn write_boot_hint_with_refusal(
    path: &Path,
    state: &str,
    detail: &str,
    tpm_unseal_seconds: Option<f64>,
    tpm_refusal: &[String],
) -> io::Result<()> {
    let hint = BootHint {
        state: state.into(),
        detail: detail.into(),
        updated: crate::audit::now_ms() as f64 / 1000.0,
        tpm_unseal_seconds,
        tpm_refusal: tpm_refusal.to_vec(),
    };
    let mut text = serde_json::to_vec(&hint).map_err(io::Error::other)?;
    text.push(b'\n');
    crate::atomic_file::write_atomic(path, &text, 0o644, 0o755)
}

/// The (state, detail) the boot path (or a previous supervisor) left at `path`.
pub fn read_boot_hint(path: &Path) -> Option<(String, String)> {
    read_boot_hint_full(path).map(|h| (h.state, h.detail))
}

/// The whole hint, timing included (a snapshot the supervisor wrote has none).
pub fn read_boot_hint_full(path: &Path) -> Option<BootHint> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The LUKS UUID a device-mapper UUID names: cryptsetup sets
/// `CRYPT-LUKS2-<32 hex>-<name>` (`CRYPT-LUKS1-` for LUKS1), the UUID without its
/// dashes. `None` for anything else (plain dm-crypt, other targets, damage).
pub fn luks_uuid_from_dm(dm_uuid: &str) -> Option<String> {
    let rest = dm_uuid
        .strip_prefix("CRYPT-LUKS2-")
        .or_else(|| dm_uuid.strip_prefix("CRYPT-LUKS1-"))?;
    let hex = rest.get(..32)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) || !matches!(rest.as_bytes().get(32), Some(b'-'))
    {
        return None;
    }
    let h = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// The LUKS UUID of the active mapping `name` (`/dev/mapper/NAME`), from the
/// kernel's record of its dm UUID; `None` when it is not active or not LUKS.
pub fn mapping_luks_uuid(name: &str) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(Path::new("/dev/mapper").join(name))
        .ok()?
        .rdev();
    let (maj, min) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let dm = std::fs::read_to_string(format!("/sys/dev/block/{maj}:{min}/dm/uuid")).ok()?;
    luks_uuid_from_dm(dm.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_uuid_names_the_luks_uuid() {
        assert_eq!(
            luks_uuid_from_dm("CRYPT-LUKS2-0F9C7E3A111122223333444455556666-secure-ai-vault")
                .as_deref(),
            Some("0f9c7e3a-1111-2222-3333-444455556666")
        );
        assert_eq!(
            luks_uuid_from_dm("CRYPT-LUKS1-0f9c7e3a111122223333444455556666-old").as_deref(),
            Some("0f9c7e3a-1111-2222-3333-444455556666")
        );
        assert_eq!(luks_uuid_from_dm("CRYPT-PLAIN-x"), None);
        assert_eq!(luks_uuid_from_dm("CRYPT-LUKS2-short"), None);
        // 32 hex digits must be the whole UUID, followed by the name.
        assert_eq!(
            luks_uuid_from_dm("CRYPT-LUKS2-0f9c7e3a1111222233334444555566667-x"),
            None
        );
        assert_eq!(
            luks_uuid_from_dm("CRYPT-LUKS2-0f9c7e3a11112222333344445555666g-x"),
            None
        );
    }

    #[test]
    fn the_hint_round_trips_and_the_supervisor_snapshot_reads_as_one() {
        let dir = crate::testutil::TmpDir::new("handoff");
        let p = dir.join("run/state.json");
        write_boot_hint(&p, "unlocked", "tpm2_unseal", Some(0.23)).unwrap();
        assert_eq!(
            read_boot_hint(&p),
            Some(("unlocked".into(), "tpm2_unseal".into()))
        );
        assert_eq!(
            read_boot_hint_full(&p).unwrap().tpm_unseal_seconds,
            Some(0.23)
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // The supervisor's own snapshot (a superset) reads as a hint, and the
        // hint as a snapshot: one file, two writers.
        let snap: crate::supervisor::state_file::Snapshot =
            serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(
            (snap.state.as_str(), snap.detail.as_str()),
            ("unlocked", "tpm2_unseal")
        );
        crate::supervisor::state_file::write(
            &p,
            &crate::supervisor::state_file::Snapshot {
                state: "locked".into(),
                detail: "auto_lock_idle".into(),
                last_activity: Some(1.0),
                auto_lock_at: None,
                lockout_until: Some(5),
                updated: 2.0,
            },
        )
        .unwrap();
        assert_eq!(
            read_boot_hint(&p),
            Some(("locked".into(), "auto_lock_idle".into()))
        );
        std::fs::write(&p, b"{not json").unwrap();
        assert_eq!(read_boot_hint(&p), None);
    }

    #[test]
    fn boot_audit_goes_to_the_configured_log_outside_the_initramfs() {
        // The test host is not an initramfs.
        assert!(!in_initrd());
        assert_eq!(
            boot_audit_path(Path::new("/var/log/vg.jsonl")),
            PathBuf::from("/var/log/vg.jsonl")
        );
    }
}
