//! The real [`VaultBackend`]: systemctl for services, syncfs and mount/umount via
//! the kernel, and the LUKS and keyring edges of [`crate::luks`] and
//! [`crate::keyring`] for the mapping and its keys.
//!
//! Each method does exactly one thing and reports the system's own words; the
//! order, the rollbacks and the decision to act live in [`super::machine`]. A busy
//! mount is EBUSY from umount2 and is reported as [`BackendError::Busy`] with the
//! mount point, nothing is forced (no lazy unmount: that would leave the key in
//! the kernel while files stay open).
//!
//! **Mount namespace.** The systemd unit sandboxes the supervisor (ProtectSystem=
//! and friends), which gives it a private mount namespace whose mounts would never
//! reach the workloads. So mount, unmount, syncfs and the mount probe run in PID
//! 1's mount namespace (`setns`, CAP_SYS_ADMIN + CAP_SYS_CHROOT), and the process
//! returns to its own namespace right after. The process is single-threaded, which
//! `setns(CLONE_NEWNS)` requires.

use super::backend::{BackendError, Reality, VaultBackend};
use crate::config::VaultConfig;
use crate::secret::SecretBytes;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Filesystems tried, in order, for `vault.fstype: auto`.
const AUTO_FSTYPES: [&str; 3] = ["ext4", "xfs", "btrfs"];

pub struct SystemBackend {
    device: Option<String>,
    name: String,
    mount: PathBuf,
    fstype: String,
    /// The LUKS UUID of the vault, learnt while the mapping is open; it names the
    /// keyring entries to revoke after the mapping is gone.
    uuid: Option<String>,
    /// Found on first use, i.e. after the supervisor holds its socket.
    ns: Option<HostMountNs>,
}

/// PID 1's mount namespace and ours, when they differ.
struct HostMountNs {
    switch: Option<(OwnedFd, OwnedFd)>,
}

impl HostMountNs {
    fn detect() -> HostMountNs {
        HostMountNs::relative_to(1)
    }

    /// Compare our mount namespace with that of `pid` (PID 1 in production).
    fn relative_to(pid: u32) -> HostMountNs {
        let open = |p: &str| -> std::io::Result<(OwnedFd, u64)> {
            let f = std::fs::File::open(p)?;
            let ino = f.metadata()?.ino();
            Ok((OwnedFd::from(f), ino))
        };
        let host_path = format!("/proc/{pid}/ns/mnt");
        let switch = match (open(&host_path), open("/proc/self/ns/mnt")) {
            (Ok((h, hi)), Ok((o, oi))) if hi != oi => Some((h, o)),
            (Ok(_), Ok(_)) => None,
            (Err(e), _) | (_, Err(e)) => {
                super::log_warn(&format!(
                    "cannot open {host_path} ({e}): mounts are made in the supervisor's own \
                     mount namespace; if its unit is sandboxed, workloads will not see the vault"
                ));
                None
            }
        };
        HostMountNs { switch }
    }

    /// Run `f` in the host's mount namespace.
    fn run<T>(&self, f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
        let Some((host, own)) = &self.switch else {
            return f();
        };
        move_into_link_name_space(host.as_fd(), Some(LinkNameSpaceType::Mount))
            .map_err(|e| failed("enter the host mount namespace", e))?;
        let r = f();
        if let Err(e) = move_into_link_name_space(own.as_fd(), Some(LinkNameSpaceType::Mount)) {
            // Staying in the host namespace loses the sandbox, not correctness.
            super::log_warn(&format!(
                "cannot return to the service's mount namespace: {e}"
            ));
        }
        r
    }
}

impl SystemBackend {
    pub fn new(vault: &VaultConfig) -> SystemBackend {
        SystemBackend {
            device: vault.device.clone(),
            name: vault.name.clone(),
            mount: vault.mount.clone(),
            fstype: vault.fstype.clone(),
            uuid: vault
                .device
                .as_deref()
                .and_then(|d| d.strip_prefix("UUID="))
                .map(str::to_ascii_lowercase),
            ns: None,
        }
    }

    fn learn_uuid(&mut self) {
        if let Some(u) = crate::handoff::mapping_luks_uuid(&self.name) {
            self.uuid = Some(u);
        }
    }

    fn mount_str(&self) -> String {
        self.mount.display().to_string()
    }
}

fn failed(op: &'static str, msg: impl ToString) -> BackendError {
    BackendError::Failed {
        op,
        msg: msg.to_string(),
    }
}

impl VaultBackend for SystemBackend {
    fn probe(&mut self) -> Result<Reality, BackendError> {
        let mapping_active = crate::luks::is_active(&self.name)
            .map_err(|e| failed("query the dm-crypt mapping", e))?;
        if mapping_active {
            self.learn_uuid();
        }
        let ns = self.ns.get_or_insert_with(HostMountNs::detect);
        let mountinfo = ns.run(|| {
            std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| failed("read /proc/self/mountinfo", e))
        })?;
        Ok(Reality {
            mapping_active,
            mounted: is_mount_point(&mountinfo, &self.mount),
        })
    }

    fn stop_service(&mut self, unit: &str) -> Result<(), BackendError> {
        systemctl(&["stop", unit]).map_err(|e| failed("systemctl stop", format!("{unit}: {e}")))
    }

    fn start_service(&mut self, unit: &str) -> Result<(), BackendError> {
        // --no-block: the vault is open whether or not a workload starts quickly;
        // a unit that cannot even be queued is still reported.
        systemctl(&["start", "--no-block", unit])
            .map_err(|e| failed("systemctl start", format!("{unit}: {e}")))
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        let mount = &self.mount;
        let ns = self.ns.get_or_insert_with(HostMountNs::detect);
        ns.run(|| match std::fs::File::open(mount) {
            Ok(dir) => rustix::fs::syncfs(&dir).map_err(|e| failed("syncfs", e)),
            Err(_) => {
                rustix::fs::sync();
                Ok(())
            }
        })
    }

    fn unmount(&mut self) -> Result<(), BackendError> {
        let shown = self.mount_str();
        let mount = &self.mount;
        let ns = self.ns.get_or_insert_with(HostMountNs::detect);
        ns.run(
            || match nix::mount::umount2(mount, MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) => Ok(()),
                Err(Errno::EBUSY) => Err(BackendError::Busy {
                    mount: shown.clone(),
                }),
                Err(e) => Err(failed("unmount", format!("{shown}: {e}"))),
            },
        )
    }

    fn close_mapping(&mut self) -> Result<(), BackendError> {
        self.learn_uuid();
        crate::luks::close(&self.name).map_err(|e| failed("close the dm-crypt mapping", e))
    }

    fn revoke_keys(&mut self) -> Result<usize, BackendError> {
        let uuid = match &self.uuid {
            Some(u) => u.clone(),
            None => {
                let dev = self.device.as_deref().ok_or_else(|| {
                    failed(
                        "revoke volume keys",
                        "the vault's LUKS UUID is unknown (set vault.device)",
                    )
                })?;
                let dev = crate::luks::resolve_device(dev, std::time::Duration::ZERO)
                    .map_err(|e| failed("revoke volume keys", e))?;
                let u = crate::luks::Vault::open(&dev)
                    .and_then(|mut v| v.uuid())
                    .map_err(|e| failed("revoke volume keys", e))?;
                self.uuid = Some(u.clone());
                u
            }
        };
        crate::keyring::revoke_volume_keys(&uuid).map_err(|e| failed("revoke volume keys", e))
    }

    fn presence(&mut self) -> super::backend::Presence {
        use super::backend::Presence;
        let Some(spec) = self.device.as_deref() else {
            return Presence::NoVault("no_device_configured");
        };
        let Ok(dev) = crate::luks::resolve_device(spec, std::time::Duration::ZERO) else {
            return Presence::Absent("device_absent");
        };
        // A LUKS header starts with this magic (both versions); anything else is
        // a device nobody has set up as a vault yet.
        let mut magic = [0u8; 6];
        match std::fs::File::open(&dev).and_then(|mut f| {
            use std::io::Read;
            f.read_exact(&mut magic)
        }) {
            Ok(()) if magic == *b"LUKS\xba\xbe" => Presence::Ready,
            Ok(()) => Presence::NoVault("not_a_luks_volume"),
            Err(_) => Presence::Absent("device_unreadable"),
        }
    }

    fn activate(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError> {
        let spec = self.device.as_deref().ok_or_else(|| {
            failed(
                "open the vault",
                "vault.device is not configured in /etc/vaultguard/config.json",
            )
        })?;
        let dev = crate::luks::resolve_device(spec, std::time::Duration::ZERO)
            .map_err(|e| failed("open the vault", e))?;
        match crate::luks::open_with_passphrase(&dev, &self.name, passphrase.as_bytes()) {
            Ok(()) => {
                self.learn_uuid();
                Ok(())
            }
            Err(e) if e.is_wrong_passphrase() => Err(BackendError::WrongPassphrase),
            Err(e) => Err(failed("open the vault", e)),
        }
    }

    fn verify_passphrase(&mut self, passphrase: &SecretBytes) -> Result<(), BackendError> {
        // The configured device, else the one behind the open mapping (its LUKS UUID).
        let spec = match (&self.device, &self.uuid) {
            (Some(d), _) => d.clone(),
            (None, Some(u)) => format!("UUID={u}"),
            (None, None) => {
                return Err(failed(
                    "check the passphrase",
                    "the vault's device is unknown (set vault.device)",
                ))
            }
        };
        let dev = crate::luks::resolve_device(&spec, std::time::Duration::ZERO)
            .map_err(|e| failed("check the passphrase", e))?;
        let mut vault =
            crate::luks::Vault::open(&dev).map_err(|e| failed("check the passphrase", e))?;
        match vault.volume_key(None, passphrase.as_bytes()) {
            // The key itself is dropped (zeroized) at once: only the check matters.
            Ok(_) => Ok(()),
            Err(crate::luks::LuksError::WrongPassphrase) => Err(BackendError::WrongPassphrase),
            Err(e) => Err(failed("check the passphrase", e)),
        }
    }

    fn mount(&mut self) -> Result<(), BackendError> {
        let source = PathBuf::from("/dev/mapper").join(&self.name);
        let types: Vec<&str> = if self.fstype == "auto" {
            AUTO_FSTYPES.to_vec()
        } else {
            vec![self.fstype.as_str()]
        };
        let ns = self.ns.get_or_insert_with(HostMountNs::detect);
        ns.run(|| mount_first_type(&source, &self.mount, &types))
    }
}

/// Mode of a mount point this creates. While the vault is locked the directory is
/// what sits at its path: 0700 (root's) keeps anyone else from planting files there
/// or a workload from writing plaintext onto the root filesystem. Mounted, the
/// vault's own root directory decides access, so this costs workloads nothing.
pub const MOUNT_POINT_MODE: u32 = 0o700;
/// Mode of missing parents this creates: others must traverse them to reach the
/// mounted vault, and only the owner may rename or replace what is inside.
pub const MOUNT_PARENT_MODE: u32 = 0o755;

/// Create a missing mount point and its missing parents with exactly
/// [`MOUNT_POINT_MODE`] and [`MOUNT_PARENT_MODE`]: mkdir's mode is narrowed by the
/// umask, and under umask 000 the default would be 0777. Existing directories are
/// left as the operator made them.
fn create_mount_point(target: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let missing: Vec<&Path> = target
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        let mode = if d == target {
            MOUNT_POINT_MODE
        } else {
            MOUNT_PARENT_MODE
        };
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?,
            // Made by someone else meanwhile: theirs, not ours to chmod.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The refusal of a mount point that is a symlink: mount(2) follows it, so the
/// vault would land wherever the link points (a directory another user or a
/// workload chose). One line saying what to do.
fn symlink_refusal(target: &Path) -> BackendError {
    let to = std::fs::read_link(target)
        .map(|t| format!(" (to {})", t.display()))
        .unwrap_or_default();
    failed(
        "mount",
        format!(
            "the mount point {shown} is a symlink{to}; vaultguard does not mount through one: \
             make it a directory (rm {shown} && mkdir -m 0700 {shown}), then vaultguard unlock",
            shown = target.display()
        ),
    )
}

/// Mount `source` at `target` with the first filesystem type the kernel accepts.
/// The target is opened without following a final symlink and the mount made on
/// that descriptor (/proc/self/fd/N), so a link swapped in after the check is not
/// followed either.
fn mount_first_type(source: &Path, target: &Path, types: &[&str]) -> Result<(), BackendError> {
    let shown = target.display();
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(symlink_refusal(target));
    }
    create_mount_point(target)
        .map_err(|e| failed("create the mount point", format!("{shown}: {e}")))?;
    let dir = match rustix::fs::open(
        target,
        rustix::fs::OFlags::PATH
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        // O_PATH|O_NOFOLLOW on a symlink gives the link itself, and O_DIRECTORY
        // then ENOTDIR; ELOOP on older kernels.
        Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP)
            if std::fs::symlink_metadata(target).is_ok_and(|m| m.file_type().is_symlink()) =>
        {
            return Err(symlink_refusal(target))
        }
        Err(e) => return Err(failed("open the mount point", format!("{shown}: {e}"))),
    };
    let via = PathBuf::from(format!("/proc/self/fd/{}", {
        use std::os::fd::AsRawFd;
        dir.as_raw_fd()
    }));
    let mut last = Errno::EINVAL;
    for t in types {
        match nix::mount::mount(
            Some(source),
            &via,
            Some(*t),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            // Wrong filesystem type (or its module is absent): try the next.
            Err(e @ (Errno::EINVAL | Errno::ENODEV)) => last = e,
            Err(e) => {
                return Err(failed(
                    "mount",
                    format!("{} on {shown}: {e}", source.display()),
                ))
            }
        }
    }
    Err(failed(
        "mount",
        format!(
            "{} on {shown}: {last} (tried {}; set vault.fstype)",
            source.display(),
            types.join(", ")
        ),
    ))
}

fn systemctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Err(if err.is_empty() {
        format!("systemctl {} exited with {}", args.join(" "), out.status)
    } else {
        err
    })
}

/// Is `path` a mount point according to a mountinfo text?
pub fn is_mount_point(mountinfo: &str, path: &Path) -> bool {
    let want = path.to_string_lossy();
    let want = want.trim_end_matches('/');
    let want = if want.is_empty() { "/" } else { want };
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = b
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
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
    use std::os::unix::fs::PermissionsExt;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 253:0 / /var/lib/secure-ai rw,nosuid,nodev shared:30 - ext4 /dev/mapper/secure-ai-vault rw
41 22 253:1 / /srv/my\\040vault rw shared:31 - xfs /dev/mapper/v2 rw
";

    #[test]
    fn mount_points_are_found_exactly() {
        assert!(is_mount_point(MOUNTINFO, Path::new("/var/lib/secure-ai")));
        assert!(is_mount_point(MOUNTINFO, Path::new("/var/lib/secure-ai/")));
        assert!(is_mount_point(MOUNTINFO, Path::new("/srv/my vault")));
        assert!(is_mount_point(MOUNTINFO, Path::new("/")));
        assert!(!is_mount_point(MOUNTINFO, Path::new("/var/lib")));
        assert!(!is_mount_point(
            MOUNTINFO,
            Path::new("/var/lib/secure-ai-2")
        ));
    }

    #[test]
    fn a_missing_mount_point_is_created_0700_and_its_parents_0755_whatever_the_umask() {
        // The supervisor may run with umask 000; mkdir's default would then be 0777.
        // Run in a child: the umask is per process and the harness is threaded.
        let t = crate::testutil::TmpDir::new("mountpoint");
        let parent = t.join("srv");
        let target = parent.join("ai").join("vault");
        // SAFETY: the child makes system calls, allocates (glibc's malloc is
        // fork-safe) and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                nix::sys::stat::umask(nix::sys::stat::Mode::empty());
                // No such device: the mount fails, after the mount point is made.
                let r = mount_first_type(Path::new("/dev/mapper/vg-no-such"), &target, &["ext4"]);
                // SAFETY: _exit skips the parent's atexit handlers and buffers.
                unsafe { nix::libc::_exit(if r.is_err() { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&target), 0o700, "{}", target.display());
        assert_eq!(mode(&parent.join("ai")), 0o755);
        assert_eq!(mode(&parent), 0o755);
    }

    #[test]
    fn an_existing_mount_point_keeps_its_mode() {
        // The operator's choice (e.g. a group-readable mount point) is not ours to change.
        let t = crate::testutil::TmpDir::new("mountpoint-kept");
        let target = t.join("vault");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o750)).unwrap();
        assert!(mount_first_type(Path::new("/dev/mapper/vg-no-such"), &target, &["ext4"]).is_err());
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o750);
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: run `cargo test --features root-tests` as root"
    )]
    fn unmount_of_a_busy_mount_is_reported_as_busy() {
        // A real tmpfs mount held busy by a process cwd'ed inside it.
        let tmp = crate::testutil::TmpDir::new("busy");
        let dir = tmp.to_path_buf();
        if let Err(e) = nix::mount::mount(
            Some("tmpfs"),
            &dir,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            panic!(
                "root tier: cannot mount a tmpfs on {} ({e}); run as root",
                dir.display()
            );
        }
        let holder = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&dir)
            .spawn();
        let mut b = SystemBackend::new(&VaultConfig {
            mount: dir.clone(),
            ..VaultConfig::default()
        });
        let result = b.unmount();
        let mut holder = holder.unwrap();
        let _ = holder.kill();
        let _ = holder.wait();
        assert_eq!(
            result,
            Err(BackendError::Busy {
                mount: dir.display().to_string()
            })
        );
        assert!(result.unwrap_err().to_string().contains("fuser -vm"));
        b.unmount().unwrap();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!is_mount_point(&mi, &dir));
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: run `cargo test --features root-tests` as root"
    )]
    fn a_symlinked_mount_point_is_refused_and_nothing_is_mounted_through_it() {
        let tmp = crate::testutil::TmpDir::new("mntlink");
        let dir = tmp.to_path_buf();
        let elsewhere = dir.join("elsewhere");
        let link = dir.join("vault");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let result = mount_first_type(Path::new("tmpfs"), &link, &["tmpfs"]);
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leaked = is_mount_point(&mi, &elsewhere) || is_mount_point(&mi, &link);
        if leaked {
            let _ = nix::mount::umount2(&elsewhere, MntFlags::MNT_DETACH);
        }
        assert!(!leaked, "a tmpfs was mounted through the symlink");
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "the mount point {} is a symlink (to {}); vaultguard does not mount through one",
                link.display(),
                elsewhere.display()
            )),
            "{err}"
        );
        assert!(err.contains("mkdir -m 0700"), "{err}");
        // The link is left as it was: the operator's to remove.
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: run `cargo test --features root-tests` as root"
    )]
    fn a_directory_mount_point_is_mounted_through_its_descriptor() {
        let tmp = crate::testutil::TmpDir::new("mntfd");
        let dir = tmp.to_path_buf().join("vault");
        mount_first_type(Path::new("tmpfs"), &dir, &["tmpfs"]).unwrap();
        let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mounted = is_mount_point(&mi, &dir);
        let _ = nix::mount::umount2(&dir, MntFlags::MNT_DETACH);
        assert!(mounted, "tmpfs not mounted on {}", dir.display());
    }

    #[test]
    #[cfg_attr(
        not(feature = "root-tests"),
        ignore = "root tier: run `cargo test --features root-tests` as root"
    )]
    fn mounts_from_a_sandboxed_namespace_land_in_the_hosts() {
        // What systemd's ProtectSystem= does to the service: a private mount
        // namespace, propagation slave. A mount made there directly would stay
        // there; made through HostMountNs it must be visible to everyone else.
        // The test process plays PID 1's part (reading PID 1's namespace may be
        // refused in a container).
        let host_pid = std::process::id();
        let tmp = crate::testutil::TmpDir::new("ns");
        let dir = tmp.to_path_buf();
        let direct = dir.join("direct");
        let via_host = dir.join("via-host");
        std::fs::create_dir_all(&direct).unwrap();
        std::fs::create_dir_all(&via_host).unwrap();
        let tmpfs = |target: &Path| {
            nix::mount::mount(
                Some("tmpfs"),
                target,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| failed("mount", e))
        };
        // SAFETY: the child is single-threaded after fork; it makes system calls,
        // allocates (glibc's malloc is fork-safe) and leaves with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    // SAFETY: single-threaded child; no descriptor table is shared.
                    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }
                        .map_err(|_| 10)?;
                    nix::mount::mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_REC | MsFlags::MS_SLAVE,
                        None::<&str>,
                    )
                    .map_err(|_| 11)?;
                    let ns = HostMountNs::relative_to(host_pid);
                    if ns.switch.is_none() {
                        return Err(12);
                    }
                    tmpfs(&direct).map_err(|_| 13)?;
                    ns.run(|| tmpfs(&via_host)).map_err(|_| 14)?;
                    Ok::<(), i32>(())
                })();
                // SAFETY: _exit skips the parent's atexit handlers and buffers.
                unsafe { nix::libc::_exit(code.err().unwrap_or(0)) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
                let seen_via_host = is_mount_point(&mi, &via_host);
                let seen_direct = is_mount_point(&mi, &direct);
                let _ = nix::mount::umount2(&via_host, MntFlags::MNT_DETACH);
                assert_ne!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 10),
                    "root tier: cannot unshare a mount namespace (needs CAP_SYS_ADMIN); run as root"
                );
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
                assert!(
                    seen_via_host,
                    "mount through HostMountNs not visible in the host namespace"
                );
                assert!(
                    !seen_direct,
                    "a private-namespace mount leaked (test premise broken)"
                );
            }
        }
    }
}
