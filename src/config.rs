//! Configuration: `/etc/vaultguard/config.json` plus `rd.vaultguard.*` kernel
//! command-line overrides (SPEC §4).
//!
//! Every key is optional and defaults to the value the specification names. Unknown
//! keys are rejected with their full name, so a typo never silently falls back to a
//! default. This module only parses and validates; it never touches devices.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the configuration lives unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/vaultguard/config.json";

/// Largest configuration file read: a real one is a few hundred bytes, and the
/// file is read by the boot path, where memory is small.
pub const MAX_FILE: u64 = 64 * 1024;

/// Upper bounds of the durations and counts, so that no arithmetic on them can
/// overflow and no typo can disable a protection for centuries.
pub const MAX_AUTO_LOCK_MINUTES: u64 = 7 * 24 * 60;
pub const MAX_LOCKOUT_SECONDS: u64 = 7 * 24 * 3600;
pub const MAX_TPM_TIMEOUT_SECONDS: u64 = 3600;
pub const MAX_CHECK_INTERVAL_SECONDS: u64 = 24 * 3600;
pub const MAX_ATTEMPTS: u32 = 1000;

/// Commands of the control socket that can be authorised separately.
pub const CONTROL_COMMANDS: [&str; 8] = [
    "status",
    "lock",
    "unlock",
    "keepalive",
    "metrics",
    "watch",
    "inhibit",
    "release",
];

/// `vault.max_inhibit` may not exceed a week: an inhibitor is for a job, not a
/// way to switch the idle lock off (that is `auto_lock_timeout: 0`).
pub const MAX_INHIBIT_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub vault: VaultConfig,
    pub tpm: TpmConfig,
    pub auth: AuthConfig,
    pub control: ControlConfig,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub clevis: ClevisConfig,
}

/// clevis tokens (Tang, sss): `clevis.deadline`, `clevis.tang_thumbprints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClevisConfig {
    /// Seconds the boot unlock waits for the network pins (all at once) before
    /// the passphrase prompt; `rd.vaultguard.clevis.deadline=`.
    pub deadline: u64,
    /// S256 thumbprints of Tang signing keys trusted in addition to those each
    /// token recorded at bind time; `rd.vaultguard.clevis.tang_thumbprint=` adds one.
    pub tang_thumbprints: Vec<String>,
}

impl Default for ClevisConfig {
    fn default() -> Self {
        ClevisConfig {
            deadline: crate::clevis::DEFAULT_DEADLINE_SECS,
            tang_thumbprints: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultConfig {
    /// The LUKS2 block device (a path, or `UUID=<luks uuid>`). No default: a wrong
    /// guess could open someone else's volume.
    pub device: Option<String>,
    /// dm-crypt mapping name (`/dev/mapper/<name>`).
    pub name: String,
    /// Where the opened vault is mounted after boot.
    pub mount: PathBuf,
    /// Filesystem type for the mount (`auto` probes ext4, xfs, btrfs).
    pub fstype: String,
    /// crypttab options for the boot unlock (`vaultguard unlock`), as the fourth
    /// crypttab field: the same table as `vaultguard attach` (README, "crypttab
    /// options"); `rd.vaultguard.options=` sets it, as `rd.luks.options=` does
    /// for systemd.
    pub options: String,
    /// Minutes of inactivity before the supervisor locks the vault; 0 disables.
    pub auto_lock_timeout: u64,
    /// Seconds; accepted for compatibility with the appliance's polling watchdog. The
    /// supervisor is event-driven and does not poll.
    pub check_interval: u64,
    /// systemd units stopped before a lock and started after an unlock.
    pub services: Vec<String>,
    /// A file whose mtime counts as activity (watched with inotify).
    pub activity_file: Option<PathBuf>,
    /// Where the supervisor mirrors its state (and the boot path leaves its hint).
    pub state_path: PathBuf,
    /// Extra copy of the state for readers of the appliance's old path.
    pub state_compat_path: Option<PathBuf>,
    /// Seconds before the idle lock during which the state is `locking_soon`
    /// (and watchers are warned).
    pub lock_warning: u64,
    /// Seconds: the longest one inhibitor may hold off the idle lock.
    pub max_inhibit: u64,
    /// Lock when the machine suspends or hibernates (vaultguard-suspend.service).
    pub lock_on_suspend: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TpmConfig {
    /// PCRs the sealed secret is bound to at enrolment.
    pub pcrs: Vec<u32>,
    /// PCR bank: `sha256` or `sha1`.
    pub bank: String,
    /// The PCR extended after unlock so that the secret cannot be unsealed twice in
    /// one boot (bound to zeros at enrolment).
    pub phase_pcr: u32,
    /// TCTI: `device:/dev/tpmrm0`, or `swtpm:host=127.0.0.1,port=2321` for tests.
    pub tcti: String,
    /// Seconds to wait for the TPM device to appear before falling back.
    pub timeout: u64,
    /// After a passphrase/recovery-key unlock caused by a PCR change, offer on the
    /// console to reseal to this boot's PCRs (yes/no; never without the answer).
    pub reseal_after_recovery: bool,
    /// Signed PCR policies: the `systemd-measure sign` signature file (crypttab
    /// `tpm2-signature=` overrides it); unset: where systemd-cryptsetup looks
    /// (/etc/systemd, /run/systemd, /usr/local/lib/systemd, /usr/lib/systemd,
    /// /.extra in the initrd).
    pub signature: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub max_failed_attempts: u32,
    /// Seconds of lockout after `max_failed_attempts` failures.
    pub lockout_duration: u64,
    /// Seconds of lockout once lockouts repeat.
    pub escalated_lockout: u64,
    /// Passphrase tries at the boot prompt before giving up.
    pub boot_tries: u32,
    /// Root-only file that carries the lockout across restarts.
    pub state_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Per command, who may run it. Root is always allowed.
    pub allow: BTreeMap<String, Allow>,
    /// Custom roles: name -> the commands it may run (see control::roles).
    pub roles: BTreeMap<String, Vec<String>>,
    /// Per role (built-in or custom), the uids and gids that hold it.
    pub grants: BTreeMap<String, Allow>,
    /// Root-only file of the bearer tokens' SHA-256 hashes (`vaultguard token`).
    pub tokens_file: PathBuf,
    /// Per role, requests per second and burst of each identity holding it.
    pub rate_limit: BTreeMap<String, RateLimitConfig>,
}

/// A token bucket: `burst` requests at once, refilled at `rate` per second
/// (`rate` 0: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub rate: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// node-exporter textfile collector directory: `vaultguard.prom` is
    /// rewritten there (atomically) whenever a metric changes.
    pub textfile_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Allow {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// The supervisor closes the live segment once it grows past this many bytes
    /// (0: never; `vaultguard audit rotate` does it by hand).
    pub rotate_size: u64,
    /// Extend every entry's hash into the TPM's audit anchor (an NV extend index
    /// defined at enrolment) so that a rewritten log no longer replays to it.
    pub tpm_anchor: bool,
    /// The anchor's NV index (owner range, 0x01000000-0x013FFFFF).
    pub tpm_nv_index: u32,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            device: None,
            name: "secure-ai-vault".into(),
            mount: "/var/lib/secure-ai".into(),
            fstype: "auto".into(),
            options: String::new(),
            auto_lock_timeout: 30,
            check_interval: 30,
            services: Vec::new(),
            activity_file: None,
            state_path: "/run/vaultguard/state.json".into(),
            state_compat_path: None,
            lock_warning: 60,
            max_inhibit: 3600,
            lock_on_suspend: true,
        }
    }
}

impl Default for TpmConfig {
    fn default() -> Self {
        TpmConfig {
            pcrs: vec![0, 2, 4, 7],
            bank: "sha256".into(),
            phase_pcr: 15,
            tcti: "device:/dev/tpmrm0".into(),
            timeout: 10,
            reseal_after_recovery: false,
            signature: None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            max_failed_attempts: 5,
            lockout_duration: 60,
            escalated_lockout: 900,
            boot_tries: 3,
            state_path: "/var/lib/vaultguard/lockout.json".into(),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        // Root only until the operator names who else may speak to the vault.
        let allow = CONTROL_COMMANDS
            .iter()
            .map(|c| (c.to_string(), Allow::default()))
            .collect();
        ControlConfig {
            socket: "/run/vaultguard/control.sock".into(),
            allow,
            roles: BTreeMap::new(),
            grants: BTreeMap::new(),
            tokens_file: "/var/lib/vaultguard/tokens.json".into(),
            rate_limit: BTreeMap::new(),
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: "/var/log/vaultguard/audit.jsonl".into(),
            rotate_size: 16 * 1024 * 1024,
            tpm_anchor: true,
            tpm_nv_index: crate::tpm::nv::DEFAULT_AUDIT_NV_INDEX,
        }
    }
}

#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        err: std::io::Error,
    },
    Parse {
        path: String,
        msg: String,
    },
    UnknownField {
        field: String,
    },
    Invalid {
        field: String,
        msg: String,
    },
    /// A value of the wrong JSON type: what the key takes and what it was given.
    Type {
        field: String,
        expected: String,
        got: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, err } => {
                write!(f, "cannot read configuration {}: {err}", path.display())
            }
            ConfigError::Parse { path, msg } => write!(f, "configuration {path}: {msg}"),
            ConfigError::UnknownField { field } => write!(
                f,
                "unknown configuration key `{field}` (check its spelling against the README)"
            ),
            ConfigError::Invalid { field, msg } => write!(f, "configuration `{field}`: {msg}"),
            ConfigError::Type {
                field,
                expected,
                got,
            } => write!(f, "configuration {field}: expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Load from `path`. A missing file at the default path means "all defaults"; a
    /// missing file that the operator named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_err = |err| ConfigError::Read {
            path: path.to_path_buf(),
            err,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(err) => return Err(read_err(err)),
        };
        let mut text = String::new();
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_FILE {
            return Err(ConfigError::Parse {
                path: path.display().to_string(),
                msg: format!(
                    "larger than {} KiB: not a vaultguard configuration",
                    MAX_FILE / 1024
                ),
            });
        }
        Config::from_json(&text, &path.display().to_string())
    }

    pub fn from_json(text: &str, origin: &str) -> Result<Config, ConfigError> {
        // serde_json would keep the last of two equal keys without a word.
        crate::json::check_no_duplicate_keys(text.as_bytes()).map_err(|msg| {
            ConfigError::Parse {
                path: origin.to_string(),
                msg,
            }
        })?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                msg: e.to_string(),
            })?;
        // serde's own message for an unknown field lacks the section; find it first
        // so the operator is told `vault.auto_lock_timout`, not just the leaf.
        // serde would also take `[]` (a struct from a sequence) as all defaults.
        if !value.is_object() {
            return Err(ConfigError::Parse {
                path: origin.to_string(),
                msg: "must be a JSON object ({…})".into(),
            });
        }
        // The path of whatever serde refuses, so the operator is told
        // `vault.auto_lock_timeout`, not just the leaf or a line and column.
        let cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let msg = e.into_inner().to_string();
            // For an unknown key the path already ends with it.
            if msg.starts_with("unknown field `") {
                ConfigError::UnknownField { field }
            } else if let Some((expected, got)) = type_mismatch(&msg) {
                ConfigError::Type {
                    field,
                    expected,
                    got,
                }
            } else {
                ConfigError::Invalid { field, msg }
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Load, and say what the file holds that does nothing: keys kept so that an
    /// older configuration still loads (each named once).
    pub fn load_with_warnings(
        path: &Path,
        explicit: bool,
    ) -> Result<(Config, Vec<String>), ConfigError> {
        let cfg = Config::load(path, explicit)?;
        let text = std::fs::read_to_string(path).unwrap_or_default();
        Ok((cfg, compat_warnings(&text)))
    }

    /// Checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, msg: String| ConfigError::Invalid {
            field: field.into(),
            msg,
        };
        if !valid_mapping_name(&self.vault.name) {
            return Err(invalid(
                "vault.name",
                format!(
                    "`{}` is not a usable dm name (1-127 characters from A-Za-z0-9._-)",
                    self.vault.name
                ),
            ));
        }
        if !self.vault.mount.is_absolute() {
            return Err(invalid("vault.mount", "must be an absolute path".into()));
        }
        if self.tpm.pcrs.is_empty() {
            return Err(invalid("tpm.pcrs", "needs at least one PCR".into()));
        }
        for &p in &self.tpm.pcrs {
            if p > 23 {
                return Err(invalid(
                    "tpm.pcrs",
                    format!("PCR {p} does not exist (0-23)"),
                ));
            }
        }
        if self.tpm.phase_pcr > 23 {
            return Err(invalid(
                "tpm.phase_pcr",
                format!("PCR {} does not exist (0-23)", self.tpm.phase_pcr),
            ));
        }
        if self.tpm.pcrs.contains(&self.tpm.phase_pcr) {
            return Err(invalid(
                "tpm.pcrs",
                format!(
                    "PCR {} is the phase PCR; it is bound to zeros automatically",
                    self.tpm.phase_pcr
                ),
            ));
        }
        if !matches!(self.tpm.bank.as_str(), "sha256" | "sha1") {
            return Err(invalid(
                "tpm.bank",
                format!("`{}`: use sha256 or sha1", self.tpm.bank),
            ));
        }
        let over = |field: &str, value: u64, max: u64, unit: &str| {
            (value > max).then(|| {
                invalid(
                    field,
                    format!("{value} is more than the most allowed, {max} {unit}"),
                )
            })
        };
        if let Some(e) = [
            over(
                "vault.auto_lock_timeout",
                self.vault.auto_lock_timeout,
                MAX_AUTO_LOCK_MINUTES,
                "minutes",
            ),
            over(
                "vault.max_inhibit",
                self.vault.max_inhibit,
                MAX_INHIBIT_SECONDS,
                "seconds",
            ),
            over(
                "vault.lock_warning",
                self.vault.lock_warning,
                MAX_AUTO_LOCK_MINUTES * 60,
                "seconds",
            ),
            over(
                "vault.check_interval",
                self.vault.check_interval,
                MAX_CHECK_INTERVAL_SECONDS,
                "seconds",
            ),
            over(
                "tpm.timeout",
                self.tpm.timeout,
                MAX_TPM_TIMEOUT_SECONDS,
                "seconds",
            ),
            over(
                "auth.lockout_duration",
                self.auth.lockout_duration,
                MAX_LOCKOUT_SECONDS,
                "seconds",
            ),
            over(
                "auth.escalated_lockout",
                self.auth.escalated_lockout,
                MAX_LOCKOUT_SECONDS,
                "seconds",
            ),
            over(
                "auth.max_failed_attempts",
                self.auth.max_failed_attempts.into(),
                MAX_ATTEMPTS.into(),
                "attempts",
            ),
            over(
                "auth.boot_tries",
                self.auth.boot_tries.into(),
                MAX_ATTEMPTS.into(),
                "tries",
            ),
        ]
        .into_iter()
        .flatten()
        .next()
        {
            return Err(e);
        }
        if !crate::tpm::nv::OWNER_NV_RANGE.contains(&self.audit.tpm_nv_index) {
            return Err(invalid(
                "audit.tpm_nv_index",
                format!(
                    "{:#010x} is outside the owner range 0x01000000-0x013fffff",
                    self.audit.tpm_nv_index
                ),
            ));
        }
        // A relative path would depend on the directory the command runs in:
        // the supervisor and the CLI would not meet at the same socket.
        let paths: [(&str, Option<&Path>); 7] = [
            ("vault.state_path", Some(&self.vault.state_path)),
            (
                "vault.state_compat_path",
                self.vault.state_compat_path.as_deref(),
            ),
            ("vault.activity_file", self.vault.activity_file.as_deref()),
            ("control.socket", Some(&self.control.socket)),
            ("audit.path", Some(&self.audit.path)),
            ("auth.state_path", Some(&self.auth.state_path)),
            ("metrics.textfile_dir", self.metrics.textfile_dir.as_deref()),
        ];
        for (field, p) in paths {
            if let Some(p) = p.filter(|p| !p.is_absolute()) {
                return Err(invalid(
                    field,
                    format!("`{}` is relative; give an absolute path", p.display()),
                ));
            }
        }
        if let Some(d) = &self.vault.device {
            if !d.starts_with('/') && !d.starts_with("UUID=") {
                return Err(invalid(
                    "vault.device",
                    format!("`{d}` is neither an absolute path nor UUID=<luks uuid>"),
                ));
            }
        }
        if self.auth.max_failed_attempts == 0 {
            return Err(invalid(
                "auth.max_failed_attempts",
                "must be at least 1".into(),
            ));
        }
        if self.auth.escalated_lockout < self.auth.lockout_duration {
            return Err(invalid(
                "auth.escalated_lockout",
                "must not be shorter than auth.lockout_duration".into(),
            ));
        }
        if self.auth.boot_tries == 0 {
            return Err(invalid("auth.boot_tries", "must be at least 1".into()));
        }
        for cmd in self.control.allow.keys() {
            if !CONTROL_COMMANDS.contains(&cmd.as_str()) {
                return Err(ConfigError::UnknownField {
                    field: format!("control.allow.{cmd}"),
                });
            }
        }
        if let Err(e) = crate::control::roles::Policy::from_config(&self.control) {
            return Err(invalid(&e.field, e.msg));
        }
        if !self.control.tokens_file.is_absolute() {
            return Err(invalid(
                "control.tokens_file",
                "must be an absolute path".into(),
            ));
        }
        for s in &self.vault.services {
            if s.is_empty() || s.starts_with('-') || s.contains(char::is_whitespace) {
                return Err(invalid(
                    "vault.services",
                    format!("`{s}` is not a unit name"),
                ));
            }
        }
        Ok(())
    }

    /// Apply `rd.vaultguard.*` options from a kernel command line. Returns warnings
    /// for options that were ignored: a typo on the command line must not stop the
    /// boot, but the operator sees it on the console.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut warnings = Vec::new();
        for word in split_cmdline(cmdline) {
            let Some(rest) = word.strip_prefix("rd.vaultguard.") else {
                continue;
            };
            let (key, value) = match rest.split_once('=') {
                Some((k, v)) => (k, v),
                None => (rest, "1"),
            };
            let mut next = self.clone();
            match next.set(key, value).and_then(|()| next.validate()) {
                Ok(()) => *self = next,
                Err(e) => warnings.push(format!("ignoring rd.vaultguard.{key}: {e}")),
            }
        }
        warnings
    }

    /// Set one key by its dotted name (or a short alias). Used by the command line.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let full = match key {
            "device" | "name" | "mount" | "fstype" | "options" => format!("vault.{key}"),
            "pcrs" | "bank" | "phase_pcr" | "tcti" => format!("tpm.{key}"),
            "tpm_timeout" => "tpm.timeout".into(),
            "tries" => "auth.boot_tries".into(),
            _ => key.to_string(),
        };
        let bad = |msg: String| ConfigError::Invalid {
            field: full.clone(),
            msg,
        };
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(format!("`{v}` is not a number")))
        };
        match full.as_str() {
            "vault.device" => self.vault.device = Some(value.into()),
            "vault.name" => self.vault.name = value.into(),
            "vault.mount" => self.vault.mount = value.into(),
            "vault.fstype" => self.vault.fstype = value.into(),
            "vault.options" => self.vault.options = value.into(),
            "vault.auto_lock_timeout" => self.vault.auto_lock_timeout = num(value)?,
            "tpm.pcrs" => self.tpm.pcrs = parse_pcr_list(value).map_err(bad)?,
            "tpm.bank" => self.tpm.bank = value.into(),
            "tpm.phase_pcr" => {
                self.tpm.phase_pcr =
                    u32::try_from(num(value)?).map_err(|_| bad("out of range".into()))?
            }
            "tpm.tcti" => self.tpm.tcti = value.into(),
            "tpm.timeout" => self.tpm.timeout = num(value)?,
            "auth.boot_tries" => {
                self.auth.boot_tries =
                    u32::try_from(num(value)?).map_err(|_| bad("out of range".into()))?
            }
            "audit.path" => self.audit.path = value.into(),
            "clevis.deadline" => self.clevis.deadline = num(value)?,
            "clevis.tang_thumbprint" => {
                if value.len() != 43
                    || !value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(bad(format!("`{value}` is not an S256 JWK thumbprint")));
                }
                self.clevis.tang_thumbprints.push(value.into())
            }
            _ => return Err(ConfigError::UnknownField { field: full }),
        }
        Ok(())
    }
}

/// serde's "invalid type: string \"30\", expected u64" as the operator reads it:
/// ("a number", "\"30\"").
fn type_mismatch(msg: &str) -> Option<(String, String)> {
    let rest = msg
        .strip_prefix("invalid type: ")
        .or_else(|| msg.strip_prefix("invalid value: "))?;
    let (got, expected) = rest.rsplit_once(", expected ")?;
    let got = match got.split_once(' ') {
        Some(("string", v)) => v.to_string(),
        Some(("integer" | "floating" | "boolean", v)) => {
            v.trim_start_matches("point ").trim_matches('`').to_string()
        }
        _ => match got {
            "map" => "an object".into(),
            "sequence" => "a list".into(),
            "null" | "unit value" => "null".into(),
            other => other.to_string(),
        },
    };
    // A number out of range or with a fraction (`-1`, `1.5`, `1e10`): "expected
    // a number, got -1" would read as nonsense; say which numbers.
    let numeric = got.parse::<f64>().is_ok();
    let max = |t: &str| match t {
        "u8" => u64::from(u8::MAX),
        "u16" => u64::from(u16::MAX),
        "u32" => u64::from(u32::MAX),
        _ => u64::MAX,
    };
    let expected = match expected {
        t @ ("u8" | "u16" | "u32" | "u64" | "usize") if numeric => {
            format!("a whole number from 0 to {}", max(t))
        }
        "u8" | "u16" | "u32" | "u64" | "usize" => "a number".to_string(),
        "a sequence" => "a list".into(),
        "a borrowed path" | "path string" => "a path (a string)".into(),
        e if e.starts_with("struct ") || e.starts_with("a map") => "an object".into(),
        e => e.to_string(),
    };
    Some((expected, got))
}

/// Keys that are accepted for compatibility and do nothing.
fn compat_warnings(text: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if v.get("vault")
        .and_then(|v| v.get("check_interval"))
        .is_some()
    {
        out.push(
            "configuration vault.check_interval does nothing: the supervisor is \
             event-driven (inotify, the control socket, timers) and never polls; remove it"
                .to_string(),
        );
    }
    out
}

impl Config {
    /// One value by its dotted name, for scripts (strings bare, the rest as JSON).
    pub fn get(&self, key: &str) -> Result<String, ConfigError> {
        Ok(match self.get_value(key)? {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        })
    }

    /// The value at a dotted key as JSON (`config --get KEY --json`).
    pub fn get_value(&self, key: &str) -> Result<serde_json::Value, ConfigError> {
        let mut v = serde_json::to_value(self).map_err(|e| ConfigError::Parse {
            path: key.into(),
            msg: e.to_string(),
        })?;
        for part in key.split('.') {
            v = v
                .get(part)
                .cloned()
                .ok_or_else(|| ConfigError::UnknownField { field: key.into() })?;
        }
        Ok(v)
    }
}

/// `0,2,4,7` or systemd's `0+2+4+7`.
pub fn parse_pcr_list(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split([',', '+']).map(str::trim).filter(|p| !p.is_empty()) {
        let n: u32 = part
            .parse()
            .map_err(|_| format!("`{part}` is not a PCR number"))?;
        if n > 23 {
            return Err(format!("PCR {n} does not exist (0-23)"));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    if out.is_empty() {
        return Err("no PCR given".into());
    }
    out.sort_unstable();
    Ok(out)
}

fn valid_mapping_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Kernel command line words, honouring double quotes as the kernel does.
fn split_cmdline(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::from_json("{}", "test").unwrap();
        assert_eq!(c.vault.name, "secure-ai-vault");
        assert_eq!(c.vault.mount, PathBuf::from("/var/lib/secure-ai"));
        assert_eq!(c.vault.auto_lock_timeout, 30);
        assert_eq!(c.tpm.pcrs, vec![0, 2, 4, 7]);
        assert_eq!(c.tpm.bank, "sha256");
        assert_eq!(c.tpm.phase_pcr, 15);
        assert_eq!(c.auth.max_failed_attempts, 5);
        assert_eq!(c.auth.lockout_duration, 60);
        assert_eq!(c.auth.escalated_lockout, 900);
        assert_eq!(
            c.control.socket,
            PathBuf::from("/run/vaultguard/control.sock")
        );
        assert!(c.vault.device.is_none());
    }

    #[test]
    fn a_negative_fractional_or_huge_rate_limit_says_which_numbers() {
        let e = |v: &str| {
            Config::from_json(
                &format!(r#"{{"control":{{"rate_limit":{{"viewer":{v}}}}}}}"#),
                "test",
            )
            .unwrap_err()
            .to_string()
        };
        // Before: "expected a number, got -1".
        for (v, got) in [
            (r#"{"rate":-1,"burst":1}"#, "got -1"),
            (r#"{"rate":1.5,"burst":1}"#, "got 1.5"),
            (r#"{"rate":1e10,"burst":1}"#, "got 10000000000"),
        ] {
            let e = e(v);
            assert!(
                e.contains(
                    "control.rate_limit.viewer.rate: expected a whole number from 0 to 4294967295"
                ) && e.contains(got),
                "{e}"
            );
        }
        assert!(e(r#"{"rate":"5","burst":1}"#).contains(r#"expected a number, got "5""#));
        assert!(e(r#"{"rate":5,"burst":0}"#).contains("must be at least 1"));
        // The largest values load, and their bucket arithmetic stays finite.
        assert!(Config::from_json(
            r#"{"control":{"rate_limit":{"viewer":{"rate":4294967295,"burst":4294967295}}}}"#,
            "test"
        )
        .is_ok());
    }

    #[test]
    fn a_relative_textfile_dir_is_refused_like_every_path() {
        // Before: accepted, and the supervisor wrote vaultguard.prom relative
        // to its working directory (/ under systemd).
        let e = Config::from_json(r#"{"metrics":{"textfile_dir":"prom"}}"#, "test")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("metrics.textfile_dir") && e.contains("relative"),
            "{e}"
        );
        let c = Config::from_json(r#"{"metrics":{"textfile_dir":"/var/lib/p"}}"#, "test");
        assert!(c.is_ok());
    }

    #[test]
    fn hostile_files_are_refused_by_name() {
        let err = |t: &str| Config::from_json(t, "test").unwrap_err().to_string();
        assert!(err("[]").contains("must be a JSON object"));
        assert!(err("null").contains("must be a JSON object"));
        let e = err(r#"{"vault":{"auto_lock_timeout":5,"auto_lock_timeout":0}}"#);
        assert!(e.contains("`auto_lock_timeout` appears twice"), "{e}");
        let e = err(r#"{"vault":{"auto_lock_timeout":18446744073709551615}}"#);
        assert!(
            e.contains("vault.auto_lock_timeout") && e.contains("10080"),
            "{e}"
        );
        for (key, section) in [
            ("lockout_duration", "auth"),
            ("escalated_lockout", "auth"),
            ("timeout", "tpm"),
            ("check_interval", "vault"),
            ("max_failed_attempts", "auth"),
            ("boot_tries", "auth"),
        ] {
            let e = err(&format!(r#"{{"{section}":{{"{key}":4294967295}}}}"#));
            assert!(e.contains(&format!("{section}.{key}")), "{e}");
        }
        let e = err(r#"{"vault":{"state_path":"state.json"}}"#);
        assert!(e.contains("vault.state_path"), "{e}");
        for (section, key) in [
            ("control", "socket"),
            ("audit", "path"),
            ("auth", "state_path"),
            ("vault", "activity_file"),
            ("vault", "device"),
        ] {
            let e = err(&format!(r#"{{"{section}":{{"{key}":"run/x"}}}}"#));
            assert!(
                e.contains(&format!("{section}.{key}")) && e.contains("run/x"),
                "{e}"
            );
        }
        assert!(Config::from_json(r#"{"vault":{"device":"UUID=1234"}}"#, "t").is_ok());
    }

    #[test]
    fn clevis_deadline_and_tang_thumbprints_from_file_and_cmdline() {
        let mut c = Config::default();
        assert_eq!(c.clevis.deadline, 10);
        let thp = "3kOpVDW0pw0OyRx2jGNO_JzATRAj0raqCk8jhG2bZFI";
        let w = c.apply_cmdline(&format!(
            "rd.vaultguard.clevis.deadline=4 rd.vaultguard.clevis.tang_thumbprint={thp} \
             rd.vaultguard.clevis.tang_thumbprint=not-a-thumbprint"
        ));
        assert_eq!(c.clevis.deadline, 4);
        assert_eq!(c.clevis.tang_thumbprints, vec![thp.to_string()]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("not an S256 JWK thumbprint"), "{w:?}");
        let c = Config::from_json(r#"{"clevis":{"deadline":3,"tang_thumbprints":["x"]}}"#, "t")
            .unwrap();
        assert_eq!(c.clevis.deadline, 3);
        assert!(Config::from_json(r#"{"clevis":{"dead_line":3}}"#, "t").is_err());
    }

    #[test]
    fn rd_vaultguard_options_sets_the_boot_unlocks_crypttab_options() {
        let mut c = Config::default();
        assert!(c.vault.options.is_empty());
        let w = c.apply_cmdline("ro rd.vaultguard.options=discard,tries=0,headless quiet");
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.vault.options, "discard,tries=0,headless");
    }

    #[test]
    fn check_interval_is_accepted_with_one_warning() {
        let text = r#"{"vault":{"check_interval":30}}"#;
        assert!(Config::from_json(text, "t").is_ok());
        let w = compat_warnings(text);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("vault.check_interval") && w[0].contains("event-driven"));
        assert!(compat_warnings(r#"{"vault":{}}"#).is_empty());
    }

    #[test]
    fn type_errors_and_unknown_keys_name_the_dotted_key() {
        let err = |t: &str| Config::from_json(t, "test").unwrap_err().to_string();
        let e = err(r#"{"vault":{"auto_lock_timeout":"30"}}"#);
        assert!(
            e.contains(r#"vault.auto_lock_timeout: expected a number, got "30""#),
            "{e}"
        );
        let e = err(r#"{"vault":{"services":"ollama.service"}}"#);
        assert!(
            e.contains(r#"vault.services: expected a list, got "ollama.service""#),
            "{e}"
        );
        let e = err(r#"{"audit":{"tpm_anchor":1}}"#);
        assert!(
            e.contains("audit.tpm_anchor: expected a boolean, got 1"),
            "{e}"
        );
        let e = err(r#"{"control":{"allow":{"status":{"uids":["x"]}}}}"#);
        assert!(
            e.contains(r#"control.allow.status.uids[0]: expected a number, got "x""#),
            "{e}"
        );
        let e = err(r#"{"control":{"allow":{"status":{"uid":[1]}}}}"#);
        assert!(e.contains("`control.allow.status.uid`"), "{e}");
        let e = err(r#"{"vault":{"auto_lock_timout":3}}"#);
        assert!(
            e.contains("unknown configuration key `vault.auto_lock_timout`"),
            "{e}"
        );
        let e = err(r#"{"vaults":{}}"#);
        assert!(e.contains("unknown configuration key `vaults`"), "{e}");
    }

    #[test]
    fn an_oversized_file_is_not_read_whole() {
        let dir = crate::testutil::TmpDir::new("config-big");
        let p = dir.join("config.json");
        let mut text = String::from("{\"vault\":{\"services\":[");
        while text.len() <= MAX_FILE as usize {
            text.push_str("\"a.service\",");
        }
        text.push_str("\"b.service\"]}}");
        std::fs::write(&p, &text).unwrap();
        let e = Config::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("larger than 64 KiB"), "{e}");
    }

    #[test]
    fn the_state_file_path_is_a_key() {
        let c = Config::from_json(r#"{"vault":{"state_path":"/tmp/x/state.json"}}"#, "t").unwrap();
        assert_eq!(c.vault.state_path, PathBuf::from("/tmp/x/state.json"));
        assert_eq!(
            Config::default().vault.state_path,
            PathBuf::from(crate::supervisor::state_file::DEFAULT_PATH)
        );
    }

    #[test]
    fn full_file_parses() {
        let text = r#"{
            "vault": {"device": "/dev/vdb", "name": "v", "mount": "/srv/v", "auto_lock_timeout": 0,
                      "check_interval": 30, "services": ["ollama.service"]},
            "tpm": {"pcrs": [7], "bank": "sha1", "phase_pcr": 14},
            "auth": {"max_failed_attempts": 3, "lockout_duration": 10, "escalated_lockout": 20},
            "control": {"socket": "/tmp/s", "allow": {"status": {"uids": [1000], "gids": [27]}}},
            "audit": {"path": "/tmp/a"}
        }"#;
        let c = Config::from_json(text, "test").unwrap();
        assert_eq!(c.vault.device.as_deref(), Some("/dev/vdb"));
        assert_eq!(c.vault.auto_lock_timeout, 0);
        assert_eq!(c.vault.services, vec!["ollama.service"]);
        assert_eq!(c.tpm.pcrs, vec![7]);
        assert_eq!(c.tpm.phase_pcr, 14);
        assert_eq!(c.control.allow["status"].uids, vec![1000]);
        assert_eq!(c.control.allow["status"].gids, vec![27]);
        // a partial section keeps the other defaults
        assert_eq!(c.vault.fstype, "auto");
    }

    #[test]
    fn unknown_fields_are_named_with_their_section() {
        let e = Config::from_json(r#"{"vault": {"auto_lock_timout": 5}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("`vault.auto_lock_timout`"), "{e}");
        let e = Config::from_json(r#"{"vaults": {}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("`vaults`"), "{e}");
        let e = Config::from_json(r#"{"control": {"allow": {"status": {"uid": [1]}}}}"#, "t")
            .unwrap_err();
        assert!(e.to_string().contains("`control.allow.status.uid`"), "{e}");
        let e = Config::from_json(r#"{"control": {"allow": {"reboot": {}}}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("`control.allow.reboot`"), "{e}");
    }

    #[test]
    fn wrong_types_and_values_are_refused() {
        let e = Config::from_json(r#"{"vault": {"auto_lock_timeout": "5"}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("expected a number"), "{e}");
        for (text, field) in [
            (r#"{"tpm": {"pcrs": [24]}}"#, "tpm.pcrs"),
            (r#"{"tpm": {"pcrs": []}}"#, "tpm.pcrs"),
            (r#"{"tpm": {"pcrs": [7, 15]}}"#, "tpm.pcrs"),
            (r#"{"tpm": {"bank": "md5"}}"#, "tpm.bank"),
            (r#"{"vault": {"name": "a/b"}}"#, "vault.name"),
            (r#"{"vault": {"mount": "relative"}}"#, "vault.mount"),
            (
                r#"{"auth": {"max_failed_attempts": 0}}"#,
                "auth.max_failed_attempts",
            ),
            (
                r#"{"auth": {"lockout_duration": 100, "escalated_lockout": 10}}"#,
                "auth.escalated_lockout",
            ),
            (r#"{"vault": {"services": ["--now"]}}"#, "vault.services"),
        ] {
            let e = Config::from_json(text, "t").unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
        let e = Config::from_json("{", "t").unwrap_err();
        assert!(e.to_string().contains("EOF"), "{e}");
    }

    #[test]
    fn missing_default_file_is_defaults_but_named_file_must_exist() {
        let p = Path::new("/nonexistent/vaultguard.json");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(Config::load(p, true)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent"));
    }

    #[test]
    fn cmdline_overrides() {
        let mut c = Config::default();
        let w = c.apply_cmdline(
            "BOOT_IMAGE=/vmlinuz quiet rd.vaultguard.device=/dev/vda rd.vaultguard.pcrs=0+7 \
             rd.vaultguard.tpm.bank=sha1 rd.vaultguard.name=\"vault2\" rd.vaultguard.vault.mount=/mnt/v \
             rd.vaultguard.tries=5 rd.vaultguard.tcti=swtpm:host=127.0.0.1,port=2321",
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.vault.device.as_deref(), Some("/dev/vda"));
        assert_eq!(c.tpm.pcrs, vec![0, 7]);
        assert_eq!(c.tpm.bank, "sha1");
        assert_eq!(c.vault.name, "vault2");
        assert_eq!(c.vault.mount, PathBuf::from("/mnt/v"));
        assert_eq!(c.auth.boot_tries, 5);
        assert_eq!(c.tpm.tcti, "swtpm:host=127.0.0.1,port=2321");
    }

    #[test]
    fn bad_cmdline_options_warn_and_keep_the_value() {
        let mut c = Config::default();
        let w = c.apply_cmdline(
            "rd.vaultguard.pcrs=0,99 rd.vaultguard.colour=blue rd.vaultguard.bank=md5",
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("PCR 99"), "{w:?}");
        assert!(w[1].contains("`colour`"), "{w:?}");
        assert!(w[2].contains("tpm.bank"), "{w:?}");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn get_by_dotted_key() {
        let c = Config::default();
        assert_eq!(c.get("vault.name").unwrap(), "secure-ai-vault");
        assert_eq!(c.get("tpm.pcrs").unwrap(), "[0,2,4,7]");
        assert_eq!(c.get("vault.device").unwrap(), "");
        assert!(c.get("vault.nope").is_err());
    }

    #[test]
    fn pcr_lists() {
        assert_eq!(parse_pcr_list("7,0,2,4").unwrap(), vec![0, 2, 4, 7]);
        assert_eq!(parse_pcr_list("0+7+7").unwrap(), vec![0, 7]);
        assert!(parse_pcr_list("").is_err());
        assert!(parse_pcr_list("a").is_err());
        assert!(parse_pcr_list("24").is_err());
    }

    #[test]
    fn suspend_inhibit_and_warning_keys_have_defaults_and_bounds() {
        let c = Config::from_json("{}", "test").unwrap();
        assert!(c.vault.lock_on_suspend);
        assert_eq!((c.vault.max_inhibit, c.vault.lock_warning), (3600, 60));
        let c = Config::from_json(
            r#"{"vault":{"lock_on_suspend":false,"max_inhibit":7200,"lock_warning":30}}"#,
            "test",
        )
        .unwrap();
        assert!(!c.vault.lock_on_suspend);
        assert_eq!((c.vault.max_inhibit, c.vault.lock_warning), (7200, 30));
        let e = Config::from_json(r#"{"vault":{"max_inhibit":604801}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("vault.max_inhibit"), "{e}");
        let e = Config::from_json(r#"{"vault":{"lock_on_suspend":"yes"}}"#, "t").unwrap_err();
        assert!(e.to_string().contains("vault.lock_on_suspend"), "{e}");
    }
}
