//! Bad input around the vault's mount point, as the journal shows it when the
//! supervisor starts under systemd: stderr is a file standing in for journald's
//! stream and `$JOURNAL_STREAM` names it, so each line carries its priority. A
//! mount point that is a symlink is one `<3>` line, a missing one a `<4>` line,
//! an /etc/fstab line mounting the vault (bind-mounted over /etc/fstab in a
//! private mount namespace) a `<4>` line; in each case the supervisor still
//! comes up (its socket answers), so the operator can fix it, and nothing is
//! mounted on the symlink's target.

mod common;

use common::{vaultguard_bin, TempDir};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn dev_ino(p: &Path) -> String {
    let m = std::fs::metadata(p).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// Start `vaultguard supervise` with vault.mount = `mount` (through `unshare -m`
/// with `fstab` bind-mounted over /etc/fstab when given), wait for its socket,
/// stop it; the lines it wrote to its journal stream.
fn supervise_lines(dir: &Path, mount: &Path, fstab: Option<&Path>) -> Vec<String> {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let socket = run.join("control.sock");
    let p = |n: &str| run.join(n).display().to_string();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "vault": {"name": "vg-mount-check-none", "mount": mount.display().to_string(),
                      "state_path": p("state.json")},
            "auth": {"state_path": p("lockout.json")},
            "control": {"socket": socket.display().to_string()},
            "audit": {"path": p("audit.jsonl")},
        })
        .to_string(),
    )
    .unwrap();
    let stream = dir.join("stream");
    let f = File::create(&stream).unwrap();
    let mut cmd = match fstab {
        Some(fstab) => {
            let mut c = Command::new("unshare");
            c.args(["-m", "--propagation", "private", "sh", "-c"])
                .arg("mount --bind \"$1\" /etc/fstab && exec \"$2\" -c \"$3\" supervise")
                .arg("sh")
                .arg(fstab)
                .arg(vaultguard_bin())
                .arg(&config);
            c
        }
        None => {
            let mut c = Command::new(vaultguard_bin());
            c.arg("-c").arg(&config).arg("supervise");
            c
        }
    };
    let child = cmd
        .env("JOURNAL_STREAM", dev_ino(&stream))
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(f.try_clone().unwrap()))
        .stderr(Stdio::from(f))
        .spawn()
        .unwrap();
    let up = wait_for(&socket, child);
    let text = std::fs::read_to_string(&stream).unwrap();
    assert!(
        up,
        "the supervisor did not come up (no control socket): {text}"
    );
    text.lines().map(str::to_string).collect()
}

/// Wait (up to 20 s) for the socket, then SIGTERM the child and reap it.
fn wait_for(socket: &Path, mut child: Child) -> bool {
    let start = Instant::now();
    let mut up = false;
    while start.elapsed() < Duration::from_secs(20) {
        if socket.exists() {
            up = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    up
}

fn one_line<'a>(lines: &'a [String], containing: &str) -> &'a String {
    let hits: Vec<&String> = lines.iter().filter(|l| l.contains(containing)).collect();
    assert_eq!(
        hits.len(),
        1,
        "want one line with {containing:?}: {lines:#?}"
    );
    hits[0]
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn a_symlinked_mount_point_is_one_error_line_and_nothing_is_mounted() {
    let dir = TempDir::new("mc-link");
    let real = dir.path().join("elsewhere");
    let link = dir.path().join("vault");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let lines = supervise_lines(dir.path(), &link, None);
    let line = one_line(&lines, "is a symlink");
    assert_eq!(
        line,
        &format!(
            "<3>the vault's mount point {l} (vault.mount) is a symlink (to {r}): the vault is \
             not mounted through one; make it a directory (rm {l} && mkdir -m 0700 {l}), then \
             vaultguard unlock",
            l = link.display(),
            r = real.display()
        )
    );
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = real.display().to_string();
    assert!(
        !mi.lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_str())),
        "something is mounted on the symlink's target"
    );
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
fn a_missing_mount_point_is_one_warning_line() {
    let dir = TempDir::new("mc-missing");
    let missing: PathBuf = dir.path().join("no").join("such");
    let lines = supervise_lines(dir.path(), &missing, None);
    let line = one_line(&lines, "does not exist");
    assert!(
        line.starts_with(&format!(
            "<4>the vault's mount point {} (vault.mount) does not exist",
            missing.display()
        )),
        "{line}"
    );
    assert!(line.contains("mkdir -p -m 0700"), "{line}");
    assert!(!lines.iter().any(|l| l.starts_with("<3>")), "{lines:#?}");
}

#[test]
#[cfg_attr(
    not(feature = "root-tests"),
    ignore = "root tier: run `cargo test --features root-tests` as root"
)]
fn an_fstab_line_mounting_the_vault_is_one_warning_line() {
    let dir = TempDir::new("mc-fstab");
    let mount = dir.path().join("vault");
    std::fs::create_dir(&mount).unwrap();
    let fstab = dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "/dev/vda / ext4 rw 0 1\n/dev/mapper/vg-mount-check-none {} ext4 nosuid,nodev 0 2\n",
            mount.display()
        ),
    )
    .unwrap();
    let lines = supervise_lines(dir.path(), &mount, Some(&fstab));
    let line = one_line(&lines, "/etc/fstab line");
    assert!(
        line.starts_with(&format!(
            "<4>/etc/fstab line 2 mounts /dev/mapper/vg-mount-check-none on {}, the vault's \
             mount point: vaultguard mounts the vault itself",
            mount.display()
        )),
        "{line}"
    );
    assert!(line.ends_with("remove the line"), "{line}");
    assert!(!lines.iter().any(|l| l.starts_with("<3>")), "{lines:#?}");
}
