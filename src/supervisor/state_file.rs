//! The state file (`/run/vaultguard/state.json`, plus `vault.state_compat_path`):
//! a mirror of the supervisor's state for readers that cannot use the socket, and
//! the atomic-write helper shared with the lockout file.
//!
//! Files are replaced with write-to-temporary + fsync + rename + fsync(dir), so a
//! reader sees the old or the new content, never a mix. The supervisor never
//! *trusts* this file: at start it derives the state from the kernel and only
//! borrows the `detail` (how the vault was opened at boot, e.g. `tpm2_unseal`) when
//! the file agrees with what the kernel shows.

use serde::{Deserialize, Serialize};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Where the supervisor mirrors its state (and where the boot path leaves its hint).
pub const DEFAULT_PATH: &str = "/run/vaultguard/state.json";

/// The file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub state: String,
    pub detail: String,
    /// Seconds since the epoch of the last activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity: Option<f64>,
    /// Seconds since the epoch at which the vault auto-locks, while unlocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_lock_at: Option<f64>,
    /// Seconds since the epoch until which unlocks are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockout_until: Option<u64>,
    /// Seconds since the epoch of this write.
    pub updated: f64,
}

/// Write `snapshot` to `path` atomically (mode 0644: readers need not be root).
pub fn write(path: &Path, snapshot: &Snapshot) -> io::Result<()> {
    let mut text = serde_json::to_vec(snapshot).map_err(io::Error::other)?;
    text.push(b'\n');
    write_atomic(path, &text, 0o644, 0o755)
}

/// For the boot path: record how the vault was opened, for the supervisor to
/// report as its `detail` (e.g. `tpm2_unseal`, `passphrase`).
pub fn write_boot_hint(path: &Path, state: &str, detail: &str) -> io::Result<()> {
    write(
        path,
        &Snapshot {
            state: state.into(),
            detail: detail.into(),
            last_activity: None,
            auto_lock_at: None,
            lockout_until: None,
            updated: crate::audit::now_ms() as f64 / 1000.0,
        },
    )
}

/// The (state, detail) a previous writer left, if the file is readable.
pub fn read_hint(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read(path).ok()?;
    let s: Snapshot = serde_json::from_slice(&text).ok()?;
    Some((s.state, s.detail))
}

/// Replace `path` with `data`: temporary file in the same directory (created with
/// `dir_mode` if missing), explicit `mode` regardless of umask, fsync, rename,
/// fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32, dir_mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)?;
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_with_exact_mode() {
        let dir = std::env::temp_dir().join(format!("vg-statefile-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("state.json");
        write_boot_hint(&p, "unlocked", "tpm2_unseal").unwrap();
        assert_eq!(
            read_hint(&p),
            Some(("unlocked".to_string(), "tpm2_unseal".to_string()))
        );
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        write_atomic(&p, b"x", 0o600, 0o700).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"x");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        assert_eq!(read_hint(&p), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
