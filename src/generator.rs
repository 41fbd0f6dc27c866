//! `vaultguard-generator`: the systemd generator (systemd.generator(7)) that makes
//! vaultguard systemd-cryptsetup's replacement for the crypttab lines it owns.
//!
//! The same static binary, installed as
//! `/usr/lib/systemd/system-generators/vaultguard-generator` (a symlink) and
//! dispatched on argv[0]. systemd runs it at boot and on every daemon-reload
//! with `normal-dir early-dir late-dir`. For each crypttab line that carries the
//! option `x-vaultguard` (or any `x-vaultguard.` option, or whose name is the
//! configured `vault.name`) it writes into normal-dir what
//! systemd-cryptsetup-generator 252 writes for its own lines, with vaultguard in
//! ExecStart=/ExecStop=:
//!
//! * `vaultguard-attach@NAME.service` (NAME escaped as systemd-escape does),
//!   ordered and bound to the source device's unit exactly as
//!   `systemd-cryptsetup@NAME.service` would be;
//! * `cryptsetup.target.requires/` (`.wants/` for `nofail`,
//!   `remote-cryptsetup.target` for `_netdev`, nothing for `noauto`) and
//!   `dev-mapper-NAME.device.requires/` links to it, so that a mount of
//!   `/dev/mapper/NAME` pulls the attach in;
//! * the `x-systemd.device-timeout=` drop-in on the source device and the
//!   `JobTimeoutSec=0` drop-in on the mapped device.
//!
//! systemd-cryptsetup-generator runs in parallel and writes its own
//! `systemd-cryptsetup@NAME.service` for the same line into the same normal-dir,
//! so a `/dev/null` mask there would collide with its file (whichever generator
//! runs second fails), and a mask anywhere would leave its
//! `cryptsetup.target.requires/` and `dev-mapper-NAME.device.requires/` links
//! pointing at a masked unit, which fails those transactions. Instead the name
//! `systemd-cryptsetup@NAME.service` is taken over in early-dir (which outranks
//! normal-dir and /etc): a symlink making it an alias of
//! `vaultguard-attach@NAME.service`. systemd-cryptsetup's unit for the line is
//! never loaded, and whatever asks for it gets vaultguard's.
//!
//! In the initrd (dracut's systemd initrd, /etc/initrd-release) it reads the
//! initrd's /etc/crypttab, which dracut's crypt module installs, the same way;
//! the configured vault is left to vaultguard-unlock.service there.
//!
//! A generator must never fail the boot: a line it cannot use gets one line on
//! the kernel log (generators log to kmsg) and is skipped; the exit status is
//! always 0.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The name this binary answers to as a generator.
pub const ARGV0: &str = "vaultguard-generator";

/// Where the unit's ExecStart= finds vaultguard (the package's path; the dracut
/// module installs it there in the initrd too).
const BINARY: &str = "/usr/bin/vaultguard";

/// One crypttab line, as systemd-cryptsetup-generator reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub name: String,
    pub device: String,
    pub keyfile: Option<String>,
    pub options: String,
}

/// Parses one crypttab line. `Ok(None)`: blank or a comment.
pub fn parse_line(line: &str) -> Result<Option<Line>, String> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return Ok(None);
    }
    let f: Vec<&str> = t.split_whitespace().collect();
    if !(2..=4).contains(&f.len()) {
        return Err(format!(
            "{} fields; crypttab(5) wants NAME DEVICE [KEYFILE [OPTIONS]]",
            f.len()
        ));
    }
    Ok(Some(Line {
        name: f[0].to_string(),
        device: f[1].to_string(),
        keyfile: f
            .get(2)
            .filter(|k| !matches!(**k, "-" | "none"))
            .map(|k| k.to_string()),
        options: f.get(3).map(|o| o.to_string()).unwrap_or_default(),
    }))
}

/// The comma-separated words of an option string. `x-vaultguard.tcti=` takes
/// the rest of the string (a TCTI has commas), as the option table reads it.
fn words(options: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = options;
    while !rest.is_empty() {
        if rest.starts_with("x-vaultguard.tcti=") {
            out.push(rest);
            break;
        }
        match rest.find(',') {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out.retain(|w| !w.is_empty());
    out
}

/// Is this line vaultguard's?
pub fn is_ours(line: &Line, vault_name: Option<&str>) -> bool {
    vault_name == Some(line.name.as_str())
        || words(&line.options)
            .iter()
            .any(|w| *w == "x-vaultguard" || w.starts_with("x-vaultguard."))
}

fn valid_unit_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b':' | b'_' | b'.')
}

/// systemd's unit_name_escape (`systemd-escape NAME`): `/` becomes `-`, bytes
/// outside `[A-Za-z0-9:_.]` and a leading `.` become `\xNN`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if b == b'/' {
            out.push('-');
        } else if (b == b'.' && i == 0) || !valid_unit_char(b) {
            let _ = write!(out, "\\x{b:02x}");
        } else {
            out.push(b as char);
        }
    }
    out
}

/// systemd's unit_name_from_path without the suffix (`systemd-escape --path`):
/// the path simplified (no repeated or trailing `/`, no `.` components), the
/// leading `/` dropped, then escaped; `/` itself is `-`.
pub fn escape_path(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.is_empty() {
        return "-".to_string();
    }
    escape(&parts.join("/"))
}

/// systemd's xescape(s, "/ "): `\`, `/`, space and bytes outside printable
/// ASCII become `\xNN` (how a LABEL= becomes a /dev/disk/by-label name).
fn xescape_tag(s: &str) -> String {
    let mut out = String::new();
    for &b in s.as_bytes() {
        if b == b'\\' || b == b'/' || b == b' ' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02x}");
        } else {
            out.push(b as char);
        }
    }
    out
}

/// fstab_node_to_udev_node: `UUID=`, `LABEL=`, `PARTUUID=`, `PARTLABEL=` as the
/// /dev/disk/by-* link udev makes; anything else as given.
pub fn udev_node(device: &str) -> String {
    for (tag, dir) in [
        ("UUID=", "by-uuid"),
        ("LABEL=", "by-label"),
        ("PARTUUID=", "by-partuuid"),
        ("PARTLABEL=", "by-partlabel"),
    ] {
        if let Some(v) = device.strip_prefix(tag) {
            let v = v.trim_matches('"');
            return format!("/dev/disk/{dir}/{}", xescape_tag(v));
        }
    }
    device.to_string()
}

/// A word of ExecStart=, single-quoted as systemd-cryptsetup-generator quotes
/// them (`%` doubled: unit files expand specifiers).
fn quote(s: &str) -> String {
    let mut out = String::from("'");
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '%' => out.push_str("%%"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// What the generator writes for one line: (relative path, contents) for files,
/// (relative path, target) for symlinks, per output directory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub normal_files: Vec<(String, String)>,
    pub normal_links: Vec<(String, String)>,
    pub early_links: Vec<(String, String)>,
}

/// The units for one of vaultguard's lines. `normal_dir`: the absolute path the
/// early-dir alias points into. Err: the line cannot be used (one sentence).
pub fn units_for(line: &Line, source: &str, normal_dir: &str) -> Result<Output, String> {
    if line.name.contains(['/', '\0']) || line.name.starts_with('.') || line.name.is_empty() {
        return Err(format!(
            "`{}` is not a device-mapper name (no `/`, no leading `.`)",
            line.name
        ));
    }
    if line.name.len() > 127 {
        return Err(format!("the name `{}` is longer than 127 bytes", line.name));
    }
    let node = udev_node(&line.device);
    if !node.starts_with('/') {
        return Err(format!(
            "device `{}` is neither a path nor UUID=/LABEL=/PARTUUID=/PARTLABEL=",
            line.device
        ));
    }
    let all = words(&line.options);
    let has = |w: &str| all.contains(&w);
    let nofail = has("nofail");
    let noauto = has("noauto");
    let netdev = has("_netdev");
    let no_tpm = has("x-vaultguard.no-tpm");
    let mut timeout = None;
    let mut kept = Vec::new();
    for w in &all {
        match w.strip_prefix("x-systemd.device-timeout=") {
            Some(t) => timeout = Some(t.to_string()),
            None => kept.push(*w),
        }
    }
    let e = escape(&line.name);
    let unit = format!("vaultguard-attach@{e}.service");
    let dev_unit = format!("{}.device", escape_path(&node));
    let dm_unit = format!("dev-mapper-{e}.device");
    let target = if netdev {
        "remote-cryptsetup.target"
    } else {
        "cryptsetup.target"
    };

    let mut u = String::new();
    let _ = writeln!(u, "# Automatically generated by vaultguard-generator\n");
    let _ = writeln!(u, "[Unit]");
    let _ = writeln!(u, "Description=vaultguard: unlock %I (crypttab)");
    let _ = writeln!(
        u,
        "Documentation=man:vaultguard(8) man:crypttab(5) man:systemd-cryptsetup-generator(8)"
    );
    let _ = writeln!(u, "SourcePath={source}");
    let _ = writeln!(u, "DefaultDependencies=no");
    let _ = writeln!(u, "IgnoreOnIsolate=true");
    let _ = writeln!(u, "After=cryptsetup-pre.target systemd-udevd-kernel.socket");
    if !no_tpm {
        // systemd 256+ provisions the SRK there; earlier versions lack the unit
        // and an ordering on a missing unit is a no-op.
        let _ = writeln!(u, "After=systemd-tpm2-setup-early.service");
    }
    let _ = writeln!(
        u,
        "Before=blockdev@{dm_unit_base}.target",
        dm_unit_base = &dm_unit[..dm_unit.len() - 7]
    );
    let _ = writeln!(u, "Wants=blockdev@{}.target", &dm_unit[..dm_unit.len() - 7]);
    let _ = writeln!(u, "Conflicts=umount.target");
    if netdev {
        let _ = writeln!(u, "After=remote-fs-pre.target");
    }
    if !nofail {
        let _ = writeln!(u, "Before={target}");
    }
    if let Some(k) = &line.keyfile {
        if k.starts_with('/') && !k.starts_with("/dev/") {
            let _ = writeln!(u, "RequiresMountsFor={}", quote_path(k));
        }
    }
    let _ = writeln!(u, "BindsTo={dev_unit}");
    let _ = writeln!(u, "After={dev_unit}");
    let _ = writeln!(u, "Before=umount.target");
    let _ = writeln!(u, "\n[Service]");
    let _ = writeln!(u, "Type=oneshot");
    let _ = writeln!(u, "RemainAfterExit=yes");
    let _ = writeln!(u, "TimeoutSec=infinity");
    let _ = writeln!(u, "KeyringMode=shared");
    let _ = writeln!(u, "OOMScoreAdjust=500");
    let _ = writeln!(
        u,
        "ExecStart={BINARY} attach {} {} {} {}",
        quote(&line.name),
        quote(&node),
        quote(line.keyfile.as_deref().unwrap_or("none")),
        quote(&kept.join(","))
    );
    let _ = writeln!(u, "ExecStop={BINARY} detach {}", quote(&line.name));

    let mut out = Output::default();
    out.normal_files.push((unit.clone(), u));
    if let Some(t) = timeout {
        out.normal_files.push((
            format!("{dev_unit}.d/50-device-timeout.conf"),
            format!(
                "# Automatically generated by vaultguard-generator\n# from x-systemd.device-timeout={t}\n\n[Unit]\nJobRunningTimeoutSec={t}\n"
            ),
        ));
    }
    if !noauto && !nofail {
        out.normal_files.push((
            format!("{dm_unit}.d/40-device-timeout.conf"),
            "# Automatically generated by vaultguard-generator\n\n[Unit]\nJobTimeoutSec=0\n"
                .to_string(),
        ));
    }
    let back = format!("../{unit}");
    if !noauto {
        let dir = if nofail { "wants" } else { "requires" };
        out.normal_links
            .push((format!("{target}.{dir}/{unit}"), back.clone()));
    }
    out.normal_links
        .push((format!("{dm_unit}.requires/{unit}"), back));
    out.early_links.push((
        format!("systemd-cryptsetup@{e}.service"),
        format!("{normal_dir}/{unit}"),
    ));
    Ok(out)
}

/// A path in RequiresMountsFor= (specifiers doubled, spaces escaped).
fn quote_path(p: &str) -> String {
    p.replace('%', "%%").replace(' ', "\\x20")
}

/// Does the kernel command line switch crypttab handling off? systemd's
/// `luks=no` (everywhere), `rd.luks=no` (initrd only), and the same for
/// `luks.crypttab=`/`rd.luks.crypttab=`: the generator then writes nothing.
pub fn disabled_by_cmdline(cmdline: &str, in_initrd: bool) -> Option<String> {
    let mut off = None;
    for w in cmdline.split_whitespace() {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        let relevant = match k {
            "luks" | "luks.crypttab" => true,
            "rd.luks" | "rd.luks.crypttab" => in_initrd,
            _ => false,
        };
        if relevant {
            // The last word wins, as with systemd's proc_cmdline parsing.
            off = matches!(v, "0" | "no" | "n" | "false" | "off").then(|| w.to_string());
        }
    }
    off
}

/// Where generator messages go: kmsg (what systemd reads for generators), or
/// stderr when `SYSTEMD_LOG_TARGET=console` or kmsg cannot be written.
struct Log {
    kmsg: Option<std::fs::File>,
}

impl Log {
    fn open() -> Log {
        let console = std::env::var("SYSTEMD_LOG_TARGET").is_ok_and(|t| t == "console");
        let kmsg = (!console)
            .then(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/kmsg")
                    .ok()
            })
            .flatten();
        Log { kmsg }
    }

    /// `priority`: syslog level (3 error, 4 warning, 6 info).
    fn line(&mut self, priority: u8, msg: &str) {
        if let Some(k) = &mut self.kmsg {
            if k.write_all(format!("<{priority}>vaultguard-generator: {msg}\n").as_bytes())
                .is_ok()
            {
                return;
            }
        }
        eprintln!("<{priority}>vaultguard-generator: {msg}");
    }
}

fn write_output(normal: &Path, early: &Path, out: &Output) -> std::io::Result<()> {
    for (rel, text) in &out.normal_files {
        let p = normal.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, text)?;
    }
    for (base, links) in [(normal, &out.normal_links), (early, &out.early_links)] {
        for (rel, target) in links {
            let p = base.join(rel);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d)?;
            }
            if std::fs::symlink_metadata(&p).is_ok() {
                std::fs::remove_file(&p)?;
            }
            std::os::unix::fs::symlink(target, &p)?;
        }
    }
    Ok(())
}

/// The configured vault's name, if a configuration is readable (a generator
/// runs before /var is mounted: only /etc is read).
fn configured_vault(path: &Path) -> Option<String> {
    std::fs::metadata(path).ok()?;
    crate::config::Config::load(path, false)
        .ok()
        .map(|c| c.vault.name)
}

/// The generator's entry point: `argv` as systemd passes it. Always returns 0.
pub fn main(argv: &[String]) -> i32 {
    let mut log = Log::open();
    let (normal, early) = match argv {
        [_, n, e, _] | [_, n, e] => (PathBuf::from(n), PathBuf::from(e)),
        [_, n] => (PathBuf::from(n), PathBuf::from(n)),
        _ => {
            log.line(
                3,
                "usage: vaultguard-generator NORMAL-DIR [EARLY-DIR [LATE-DIR]] (systemd.generator(7)); nothing written",
            );
            return 0;
        }
    };
    // The early-dir alias points at normal-dir by absolute path (systemd passes
    // absolute directories; a relative one is made absolute, not trusted).
    let normal = match std::env::current_dir() {
        Ok(cwd) if normal.is_relative() => cwd.join(normal),
        _ => normal,
    };
    let in_initrd = Path::new("/etc/initrd-release").exists();
    let cmdline_path = std::env::var_os("SYSTEMD_PROC_CMDLINE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/proc/cmdline"));
    if let Ok(c) = std::fs::read_to_string(&cmdline_path) {
        if let Some(w) = disabled_by_cmdline(&c, in_initrd) {
            log.line(
                6,
                &format!("{w} on the kernel command line: crypttab ignored"),
            );
            return 0;
        }
    }
    let crypttab = std::env::var_os("SYSTEMD_CRYPTTAB")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/crypttab"));
    let text = match std::fs::read_to_string(&crypttab) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            log.line(
                3,
                &format!(
                    "cannot read {}: {e}; no vaultguard unlock units written",
                    crypttab.display()
                ),
            );
            return 0;
        }
    };
    let config = std::env::var_os("VAULTGUARD_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
    let vault = configured_vault(&config);
    let source = crypttab.display().to_string();
    let mut seen = std::collections::BTreeSet::new();
    for (n, raw) in text.lines().enumerate() {
        let at = format!("{source}:{}", n + 1);
        let line = match parse_line(raw) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                if raw.contains("x-vaultguard") {
                    log.line(3, &format!("{at}: {e}; line skipped"));
                }
                continue;
            }
        };
        if !is_ours(&line, vault.as_deref()) {
            continue;
        }
        if in_initrd && vault.as_deref() == Some(line.name.as_str()) {
            // In the initrd the configured vault is vaultguard-unlock.service's
            // (the dracut module enables it); a second unit would race it.
            log.line(
                6,
                &format!("{at}: {} is unlocked by vaultguard-unlock.service in the initrd; no attach unit", line.name),
            );
            continue;
        }
        if !seen.insert(line.name.clone()) {
            log.line(
                3,
                &format!(
                    "{at}: {} is named twice in crypttab; this line skipped",
                    line.name
                ),
            );
            continue;
        }
        let out = match units_for(&line, &source, &normal.display().to_string()) {
            Ok(o) => o,
            Err(e) => {
                log.line(3, &format!("{at}: {e}; line skipped"));
                continue;
            }
        };
        if let Err(e) = write_output(&normal, &early, &out) {
            log.line(
                3,
                &format!(
                    "{at}: cannot write the unit for {} into {}: {e}",
                    line.name,
                    normal.display()
                ),
            );
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Line {
        parse_line(s).unwrap().unwrap()
    }

    #[test]
    fn escaping_matches_systemd_escape() {
        // Values from `systemd-escape` / `systemd-escape --path` (systemd 252).
        assert_eq!(escape("secure-ai-vault"), r"secure\x2dai\x2dvault");
        assert_eq!(escape(".hidden"), r"\x2ehidden");
        assert_eq!(escape("a b"), r"a\x20b");
        assert_eq!(escape("ok:_.x"), "ok:_.x");
        assert_eq!(
            escape_path("/dev/disk/by-uuid/1234-ab"),
            r"dev-disk-by\x2duuid-1234\x2dab"
        );
        assert_eq!(escape_path("//dev//vdb/"), "dev-vdb");
        assert_eq!(escape_path("/"), "-");
        assert_eq!(escape_path("/dev/./vdb"), "dev-vdb");
    }

    #[test]
    fn tags_become_udev_links() {
        assert_eq!(udev_node("UUID=1234-ab"), "/dev/disk/by-uuid/1234-ab");
        assert_eq!(
            udev_node("LABEL=my vault"),
            r"/dev/disk/by-label/my\x20vault"
        );
        assert_eq!(udev_node("PARTUUID=aa"), "/dev/disk/by-partuuid/aa");
        assert_eq!(udev_node("/dev/vdb"), "/dev/vdb");
    }

    #[test]
    fn lines_and_ownership() {
        assert_eq!(parse_line("  # comment").unwrap(), None);
        assert_eq!(parse_line("").unwrap(), None);
        assert!(parse_line("onlyname").is_err());
        assert!(parse_line("a b c d e").is_err());
        let l = line("v /dev/vdb - x-vaultguard,nofail");
        assert_eq!(l.keyfile, None);
        assert!(is_ours(&l, None));
        assert!(!is_ours(&line("v /dev/vdb none luks"), None));
        assert!(is_ours(&line("v /dev/vdb none luks"), Some("v")));
        assert!(is_ours(&line("v /dev/vdb none x-vaultguard.no-tpm"), None));
        // A word that merely starts with it is not it.
        assert!(!is_ours(&line("v /dev/vdb none x-vaultguardx"), None));
    }

    /// The unit for a plain x-vaultguard line, line by line as
    /// systemd-cryptsetup-generator 252 writes its own (SYSTEMD_CRYPTTAB= run on
    /// Debian 12), with vaultguard's ExecStart=.
    #[test]
    fn golden_unit_for_a_tpm_line_with_a_device_timeout() {
        let l = line("secure-ai-vault UUID=1234-ab none x-vaultguard,tpm2-device=auto,x-systemd.device-timeout=5s");
        let o = units_for(&l, "/etc/crypttab", "/run/systemd/generator").unwrap();
        let unit = r"# Automatically generated by vaultguard-generator

[Unit]
Description=vaultguard: unlock %I (crypttab)
Documentation=man:vaultguard(8) man:crypttab(5) man:systemd-cryptsetup-generator(8)
SourcePath=/etc/crypttab
DefaultDependencies=no
IgnoreOnIsolate=true
After=cryptsetup-pre.target systemd-udevd-kernel.socket
After=systemd-tpm2-setup-early.service
Before=blockdev@dev-mapper-secure\x2dai\x2dvault.target
Wants=blockdev@dev-mapper-secure\x2dai\x2dvault.target
Conflicts=umount.target
Before=cryptsetup.target
BindsTo=dev-disk-by\x2duuid-1234\x2dab.device
After=dev-disk-by\x2duuid-1234\x2dab.device
Before=umount.target

[Service]
Type=oneshot
RemainAfterExit=yes
TimeoutSec=infinity
KeyringMode=shared
OOMScoreAdjust=500
ExecStart=/usr/bin/vaultguard attach 'secure-ai-vault' '/dev/disk/by-uuid/1234-ab' 'none' 'x-vaultguard,tpm2-device=auto'
ExecStop=/usr/bin/vaultguard detach 'secure-ai-vault'
";
        let u = r"vaultguard-attach@secure\x2dai\x2dvault.service";
        assert_eq!(o.normal_files[0], (u.to_string(), unit.to_string()));
        assert_eq!(
            o.normal_files[1],
            (
                r"dev-disk-by\x2duuid-1234\x2dab.device.d/50-device-timeout.conf".to_string(),
                "# Automatically generated by vaultguard-generator\n# from x-systemd.device-timeout=5s\n\n[Unit]\nJobRunningTimeoutSec=5s\n".to_string()
            )
        );
        assert_eq!(
            o.normal_files[2].0,
            r"dev-mapper-secure\x2dai\x2dvault.device.d/40-device-timeout.conf"
        );
        assert!(o.normal_files[2].1.ends_with("[Unit]\nJobTimeoutSec=0\n"));
        assert_eq!(
            o.normal_links,
            vec![
                (format!("cryptsetup.target.requires/{u}"), format!("../{u}")),
                (
                    format!(r"dev-mapper-secure\x2dai\x2dvault.device.requires/{u}"),
                    format!("../{u}")
                ),
            ]
        );
        assert_eq!(
            o.early_links,
            vec![(
                r"systemd-cryptsetup@secure\x2dai\x2dvault.service".to_string(),
                format!("/run/systemd/generator/{u}")
            )]
        );
    }

    #[test]
    fn nofail_wants_and_does_not_order_before_the_target() {
        let l = line("data /dev/vdc /etc/keys/data.key x-vaultguard,nofail,x-vaultguard.no-tpm");
        let o = units_for(&l, "/etc/crypttab", "/n").unwrap();
        let unit = &o.normal_files[0].1;
        assert!(!unit.contains("Before=cryptsetup.target"), "{unit}");
        assert!(!unit.contains("systemd-tpm2-setup-early"), "{unit}");
        assert!(
            unit.contains("RequiresMountsFor=/etc/keys/data.key\n"),
            "{unit}"
        );
        assert!(unit.contains("BindsTo=dev-vdc.device\n"), "{unit}");
        assert!(unit.contains(
            "ExecStart=/usr/bin/vaultguard attach 'data' '/dev/vdc' '/etc/keys/data.key' 'x-vaultguard,nofail,x-vaultguard.no-tpm'\n"
        ));
        assert_eq!(
            o.normal_files.len(),
            1,
            "nofail: no JobTimeoutSec=0 drop-in"
        );
        assert_eq!(
            o.normal_links[0].0,
            "cryptsetup.target.wants/vaultguard-attach@data.service"
        );
    }

    #[test]
    fn noauto_is_not_pulled_in_and_netdev_is_remote() {
        let o = units_for(
            &line("n /dev/vdd - x-vaultguard,noauto"),
            "/etc/crypttab",
            "/n",
        )
        .unwrap();
        assert_eq!(o.normal_links.len(), 1);
        assert_eq!(
            o.normal_links[0].0,
            "dev-mapper-n.device.requires/vaultguard-attach@n.service"
        );
        let o = units_for(
            &line("r /dev/vde - x-vaultguard,_netdev"),
            "/etc/crypttab",
            "/n",
        )
        .unwrap();
        let unit = &o.normal_files[0].1;
        assert!(unit.contains("After=remote-fs-pre.target\n"));
        assert!(unit.contains("Before=remote-cryptsetup.target\n"));
        assert_eq!(
            o.normal_links[0].0,
            "remote-cryptsetup.target.requires/vaultguard-attach@r.service"
        );
    }

    #[test]
    fn quoting_and_bad_lines() {
        assert_eq!(quote("a'b%c\\"), r"'a\'b%%c\\'");
        assert!(units_for(&line("a/b /dev/vdb - x-vaultguard"), "/c", "/n").is_err());
        let e = units_for(&line("v vdb - x-vaultguard"), "/c", "/n").unwrap_err();
        assert!(e.contains("neither a path nor UUID="), "{e}");
    }

    #[test]
    fn the_kernel_command_line_can_switch_it_off() {
        assert!(disabled_by_cmdline("quiet luks=no", false).is_some());
        assert!(disabled_by_cmdline("rd.luks=0", true).is_some());
        assert!(disabled_by_cmdline("rd.luks=0", false).is_none());
        assert!(disabled_by_cmdline("luks.crypttab=off", false).is_some());
        assert!(disabled_by_cmdline("luks=no luks=yes", false).is_none());
        assert!(disabled_by_cmdline("root=/dev/vda", false).is_none());
    }
}
