//! What is wrong with the vault's mount point, said once when the supervisor
//! starts: the boot path (initrd) may have left the vault open but unmounted for
//! one of these reasons, and the operator reads the journal, not the code. Each
//! problem is one line at a journald priority: an error (`<3>`) when the vault
//! cannot be mounted there as configured, a warning (`<4>`) when it can but
//! something will get in the way. Nothing here changes the system.

use crate::config::VaultConfig;
use crate::log::Priority;
use std::path::Path;

/// The problems with `vault.mount` on this system; `fstab` is /etc/fstab's text.
pub fn problems(vault: &VaultConfig, fstab: Option<&str>) -> Vec<(Priority, String)> {
    let mut out = Vec::new();
    let m = vault.mount.display();
    match std::fs::symlink_metadata(&vault.mount) {
        Ok(md) if md.file_type().is_symlink() => {
            let to = std::fs::read_link(&vault.mount)
                .map(|t| format!(" (to {})", t.display()))
                .unwrap_or_default();
            out.push((
                Priority::Error,
                format!(
                    "the vault's mount point {m} (vault.mount) is a symlink{to}: the vault \
                     is not mounted through one; make it a directory (rm {m} && mkdir -m 0700 \
                     {m}), then vaultguard unlock"
                ),
            ));
        }
        Ok(md) if !md.is_dir() => out.push((
            Priority::Error,
            format!(
                "the vault's mount point {m} (vault.mount) is not a directory: the vault \
                 cannot be mounted there; move that file away or set vault.mount in \
                 /etc/vaultguard/config.json"
            ),
        )),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push((
            Priority::Warning,
            format!(
                "the vault's mount point {m} (vault.mount) does not exist, so the boot \
                 could not mount the vault there; vaultguard creates it (mode 0700) at the \
                 next unlock, or create it now (mkdir -p -m 0700 {m}); if the vault is open \
                 but not mounted: vaultguard lock, then vaultguard unlock"
            ),
        )),
        Err(e) => out.push((
            Priority::Warning,
            format!("the vault's mount point {m} (vault.mount) cannot be examined: {e}"),
        )),
    }
    if let Some(text) = fstab {
        out.extend(fstab_lines(vault, text).into_iter().map(|(n, src)| {
            (
                Priority::Warning,
                format!(
                    "/etc/fstab line {n} mounts {src} on {m}, the vault's mount point: \
                     vaultguard mounts the vault itself and unmounts it at every lock, so a \
                     mount unit for it fights the supervisor (at boot it waits for a device \
                     vaultguard opened, after a lock systemd shows it failed); remove the line"
                ),
            )
        }));
    }
    out
}

/// (line number, source) of the fstab lines that mount on the vault's mount
/// point or mount the vault's mapping anywhere.
fn fstab_lines(vault: &VaultConfig, text: &str) -> Vec<(usize, String)> {
    let want_mount = normal(&vault.mount.to_string_lossy());
    let mapping = format!("/dev/mapper/{}", vault.name);
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let mut f = line.split_whitespace();
            let (src, dst) = (f.next()?, f.next()?);
            let src = unescape(src);
            let hit =
                normal(&unescape(dst)) == want_mount || Path::new(&src) == Path::new(&mapping);
            hit.then(|| (i + 1, src))
        })
        .collect()
}

fn normal(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.into()
    }
}

/// fstab(5) escapes blanks in its fields as `\040` (octal), as mountinfo does.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(c) = u8::try_from(v) {
                out.push(c);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn vault(mount: &Path) -> VaultConfig {
        VaultConfig {
            name: "secure-ai-vault".into(),
            mount: mount.to_path_buf(),
            ..VaultConfig::default()
        }
    }

    #[test]
    fn a_fine_directory_and_fstab_say_nothing() {
        let tmp = crate::testutil::TmpDir::new("mc-ok");
        let fstab = "# comment\n/dev/vda / ext4 rw 0 1\n";
        assert!(problems(&vault(&tmp), Some(fstab)).is_empty());
    }

    #[test]
    fn a_symlink_is_an_error_naming_its_target() {
        let tmp = crate::testutil::TmpDir::new("mc-link");
        let real = tmp.to_path_buf().join("real");
        let link = tmp.to_path_buf().join("vault");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let p = problems(&vault(&link), None);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, Priority::Error);
        assert!(
            p[0].1
                .contains(&format!("is a symlink (to {})", real.display())),
            "{}",
            p[0].1
        );
    }

    #[test]
    fn a_missing_mount_point_is_a_warning_saying_what_to_do() {
        let tmp = crate::testutil::TmpDir::new("mc-missing");
        let m = tmp.to_path_buf().join("nope");
        let p = problems(&vault(&m), None);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, Priority::Warning);
        assert!(p[0].1.contains("does not exist"), "{}", p[0].1);
        assert!(p[0].1.contains("mkdir -p -m 0700"), "{}", p[0].1);
    }

    #[test]
    fn fstab_lines_on_the_mount_point_or_the_mapping_are_found() {
        let v = vault(&PathBuf::from("/var/lib/secure ai"));
        let fstab = "/dev/vda / ext4 rw 0 1\n\
                     # /dev/mapper/secure-ai-vault /x ext4 defaults 0 2\n\
                     UUID=abc /var/lib/secure\\040ai/ ext4 defaults 0 2\n\
                     /dev/mapper/secure-ai-vault /srv ext4 defaults 0 2\n\
                     /dev/mapper/other /var/lib/secure-ai2 ext4 defaults 0 2\n";
        assert_eq!(
            fstab_lines(&v, fstab),
            vec![
                (3, "UUID=abc".to_string()),
                (4, "/dev/mapper/secure-ai-vault".to_string())
            ]
        );
    }
}
