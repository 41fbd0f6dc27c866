//! The built binary run as `vaultguard-generator` (a symlink, as the package
//! installs it) over a crafted crypttab into temporary normal/early/late
//! directories: the files and symlinks it writes, what it leaves to
//! systemd-cryptsetup-generator, what it skips and says, and that systemd's own
//! `systemd-analyze verify` accepts the units (systemd 252 on Debian 12).

mod common;

use common::{vaultguard_bin, TempDir};
use std::fs;
use std::path::Path;
use std::process::Command;

const CRYPTTAB: &str = "\
# a comment, then a blank line

secure-ai-vault UUID=1234-ab none x-vaultguard,tpm2-device=auto,x-systemd.device-timeout=5s
spare /dev/disk/by-uuid/00000000-0000-0000-0000-000000000000 - x-vaultguard,nofail,x-systemd.device-timeout=5s
later /dev/vdd none x-vaultguard,noauto
theirs /dev/vde none luks
configured /dev/vdf none luks
bad vdg none x-vaultguard
";

struct Run {
    normal: std::path::PathBuf,
    early: std::path::PathBuf,
    late: std::path::PathBuf,
    stderr: String,
    status: std::process::ExitStatus,
}

fn generate(t: &TempDir, crypttab: &str, cmdline: &str) -> Run {
    let link = t.path().join("vaultguard-generator");
    if !link.exists() {
        std::os::unix::fs::symlink(vaultguard_bin(), &link).expect("symlink");
    }
    let ct = t.path().join("crypttab");
    fs::write(&ct, crypttab).unwrap();
    let cl = t.path().join("cmdline");
    fs::write(&cl, cmdline).unwrap();
    let cfg = t.path().join("config.json");
    fs::write(
        &cfg,
        r#"{"vault":{"name":"configured","device":"/dev/vdf"}}"#,
    )
    .unwrap();
    let out_dir = t.path().join(format!("out{}", cmdline.len()));
    let (normal, early, late) = (out_dir.join("n"), out_dir.join("e"), out_dir.join("l"));
    for d in [&normal, &early, &late] {
        fs::create_dir_all(d).unwrap();
    }
    let o = Command::new(&link)
        .args([&normal, &early, &late])
        .env("SYSTEMD_CRYPTTAB", &ct)
        .env("SYSTEMD_PROC_CMDLINE", &cl)
        .env("VAULTGUARD_CONFIG", &cfg)
        .env("SYSTEMD_LOG_TARGET", "console")
        .output()
        .expect("run vaultguard-generator");
    Run {
        normal,
        early,
        late,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        status: o.status,
    }
}

fn link(p: &Path) -> String {
    fs::read_link(p)
        .unwrap_or_else(|e| panic!("{} is not a symlink: {e}", p.display()))
        .display()
        .to_string()
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn generator_writes_units_links_and_the_alias_for_its_lines_only() {
    let t = TempDir::new("generator");
    let r = generate(&t, CRYPTTAB, "root=/dev/vda quiet");
    assert!(r.status.success(), "a generator never fails: {}", r.stderr);
    let n = &r.normal;

    // The x-vaultguard TPM line: unit, device timeout, requires links.
    let vault = fs::read_to_string(n.join(r"vaultguard-attach@secure\x2dai\x2dvault.service"))
        .expect("the vault's unit");
    assert!(vault.contains(
        "ExecStart=/usr/bin/vaultguard attach 'secure-ai-vault' '/dev/disk/by-uuid/1234-ab' 'none' 'x-vaultguard,tpm2-device=auto'\n"
    ), "{vault}");
    assert!(vault.contains("BindsTo=dev-disk-by\\x2duuid-1234\\x2dab.device\n"));
    assert!(vault.contains("Before=cryptsetup.target\n"));
    assert_eq!(
        fs::read_to_string(
            n.join(r"dev-disk-by\x2duuid-1234\x2dab.device.d/50-device-timeout.conf")
        )
        .unwrap()
        .lines()
        .last(),
        Some("JobRunningTimeoutSec=5s")
    );
    assert_eq!(
        link(
            &n.join(r"cryptsetup.target.requires/vaultguard-attach@secure\x2dai\x2dvault.service")
        ),
        r"../vaultguard-attach@secure\x2dai\x2dvault.service"
    );
    assert_eq!(
        link(&n.join(r"dev-mapper-secure\x2dai\x2dvault.device.requires/vaultguard-attach@secure\x2dai\x2dvault.service")),
        r"../vaultguard-attach@secure\x2dai\x2dvault.service"
    );
    // systemd-cryptsetup's unit name is vaultguard's, from the early dir.
    assert_eq!(
        link(
            &r.early
                .join(r"systemd-cryptsetup@secure\x2dai\x2dvault.service")
        ),
        format!(
            r"{}/vaultguard-attach@secure\x2dai\x2dvault.service",
            n.display()
        )
    );

    // nofail: wanted, not required; no Before=cryptsetup.target.
    let spare = fs::read_to_string(n.join("vaultguard-attach@spare.service")).unwrap();
    assert!(!spare.contains("Before=cryptsetup.target"), "{spare}");
    assert!(n
        .join("cryptsetup.target.wants/vaultguard-attach@spare.service")
        .is_symlink());
    assert!(!n
        .join("cryptsetup.target.requires/vaultguard-attach@spare.service")
        .exists());

    // noauto: a unit and the device link, but no target pulls it in.
    assert!(n.join("vaultguard-attach@later.service").is_file());
    assert!(n
        .join("dev-mapper-later.device.requires/vaultguard-attach@later.service")
        .is_symlink());
    assert!(!n
        .join("cryptsetup.target.requires/vaultguard-attach@later.service")
        .exists());
    assert!(!n
        .join("cryptsetup.target.wants/vaultguard-attach@later.service")
        .exists());

    // The line without x-vaultguard is systemd-cryptsetup's; the configured
    // vault's line is vaultguard's without the option.
    assert!(!n.join("vaultguard-attach@theirs.service").exists());
    assert!(!r.early.join("systemd-cryptsetup@theirs.service").exists());
    assert!(n.join("vaultguard-attach@configured.service").is_file());
    assert!(r
        .early
        .join("systemd-cryptsetup@configured.service")
        .is_symlink());

    // The unusable line: skipped with one line that names it and why.
    assert!(!n.join("vaultguard-attach@bad.service").exists());
    let said: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(said.len(), 1, "{}", r.stderr);
    assert!(
        said[0].starts_with("<3>vaultguard-generator: "),
        "{}",
        said[0]
    );
    assert!(
        said[0].contains("crypttab:8: device `vdg` is neither a path nor UUID="),
        "{}",
        said[0]
    );
    assert!(said[0].ends_with("line skipped"), "{}", said[0]);
    assert!(names(&r.late).is_empty());

    // systemd's own check of the units, where systemd-analyze exists (it does
    // on Debian 12 hosts; the test requires it). It is run with the unit path
    // set to the generated directories so that the aliases and links resolve.
    let sa = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(n.join(r"vaultguard-attach@secure\x2dai\x2dvault.service"))
        .arg(n.join("vaultguard-attach@spare.service"))
        .arg(n.join("vaultguard-attach@later.service"))
        .env(
            "SYSTEMD_UNIT_PATH",
            format!("{}:{}:", r.early.display(), n.display()),
        )
        .output()
        .expect("systemd-analyze (systemd) is needed for this test");
    let text =
        String::from_utf8_lossy(&sa.stderr).into_owned() + &String::from_utf8_lossy(&sa.stdout);
    // On a host without the package the binary ExecStart= names is absent:
    // that is the only complaint allowed.
    let other: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !l.contains("Command /usr/bin/vaultguard is not executable")
                || Path::new("/usr/bin/vaultguard").exists()
        })
        .collect();
    assert!(other.is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn luks_no_on_the_kernel_command_line_writes_nothing() {
    let t = TempDir::new("generator-off");
    let r = generate(&t, CRYPTTAB, "quiet luks=no");
    assert!(r.status.success());
    assert!(names(&r.normal).is_empty(), "{:?}", names(&r.normal));
    assert!(names(&r.early).is_empty());
    assert!(
        r.stderr.contains("luks=no on the kernel command line"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_missing_crypttab_and_bad_arguments_never_fail() {
    let t = TempDir::new("generator-none");
    let link = t.path().join("vaultguard-generator");
    std::os::unix::fs::symlink(vaultguard_bin(), &link).unwrap();
    let o = Command::new(&link)
        .args([t.path(), t.path(), t.path()])
        .env("SYSTEMD_CRYPTTAB", t.path().join("absent"))
        .env("SYSTEMD_LOG_TARGET", "console")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(&link)
        .env("SYSTEMD_LOG_TARGET", "console")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage: vaultguard-generator"));
}
