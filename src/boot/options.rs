//! The crypttab option table: systemd-cryptsetup's option string (the fourth
//! crypttab field, `vaultguard attach`'s last argument) in, what the unlock does
//! differently out.
//!
//! Every option systemd-cryptsetup 252-257 knows is either honoured with systemd's
//! meaning or refused with an error that names it and says why: a volume must never
//! open in a way its crypttab line did not ask for. Options systemd does not know
//! are warned about and ignored, as systemd does (a typo must not stop the boot).
//! vaultguard's own options live under `x-vaultguard.`, a name systemd will never
//! take. This module is pure: it parses, it never touches a device or the TPM.

use crate::luks::ActivateFlags;
use crate::prompt::{Ask, Echo, PromptError, Prompter};
use crate::secret::SecretBytes;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What a crypttab option string asks for. `None` fields: not given (the
/// configuration's value applies).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CrypttabOptions {
    /// `discard`, `readonly`, `same-cpu-crypt`, ... (libcryptsetup activation flags).
    pub flags: ActivateFlags,
    /// `headless`: never prompt.
    pub headless: bool,
    /// `tries=`: prompts allowed; 0 is unlimited, as in systemd.
    pub tries: Option<u32>,
    /// `token-only`: the TPM token or nothing; no key file, no prompt.
    pub token_only: bool,
    /// `password-echo=`.
    pub echo: Option<Echo>,
    /// `password-cache=`: whether a cached passphrase may be used.
    pub accept_cached: Option<bool>,
    /// `password-cache=`: whether an answer is added to the cache (`read-only`
    /// and `no`: not).
    pub push_cache: Option<bool>,
    /// `keyfile-offset=` (bytes skipped at the start of the key file).
    pub keyfile_offset: u64,
    /// `keyfile-size=` (bytes read from the key file).
    pub keyfile_size: Option<u64>,
    /// `header=`: a detached LUKS2 header.
    pub header: Option<PathBuf>,
    /// `timeout=`: how long a prompt waits; `Some(None)` is `timeout=0` (forever).
    pub prompt_timeout: Option<Option<Duration>>,
    /// `token-timeout=`: how long to wait for the TPM device.
    pub token_timeout: Option<Duration>,
    /// `tpm2-device=` or `x-vaultguard.tcti=`.
    pub tcti: Option<String>,
    /// `tpm2-signature=`: the signed-policy signature file.
    pub signature: Option<PathBuf>,
    /// `tpm2-measure-pcr=`: `Some(None)` is "do not measure".
    pub phase_pcr: Option<Option<u32>>,
    /// `x-vaultguard.no-tpm`: do not use the TPM at all.
    pub no_tpm: bool,
    /// Lines for the console: options ignored, and why.
    pub warnings: Vec<String>,
}

/// What crypttab says about prompts; `None`: the prompt's own default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptTuning {
    /// `timeout=`: `Some(None)` waits forever.
    pub timeout: Option<Option<Duration>>,
    pub echo: Option<Echo>,
    pub accept_cached: Option<bool>,
    pub push_cache: Option<bool>,
}

impl CrypttabOptions {
    pub fn prompt(&self) -> PromptTuning {
        PromptTuning {
            timeout: self.prompt_timeout,
            echo: self.echo,
            accept_cached: self.accept_cached,
            push_cache: self.push_cache,
        }
    }
}

/// A prompter that applies [`PromptTuning`] to every request before passing it on:
/// the options reach every prompt without each call site knowing of them, and the
/// prompters (`crate::prompt`) do the honouring.
pub struct Tuned<'a> {
    inner: &'a mut dyn Prompter,
    tuning: PromptTuning,
}

impl<'a> Tuned<'a> {
    pub fn new(inner: &'a mut dyn Prompter, tuning: PromptTuning) -> Tuned<'a> {
        Tuned { inner, tuning }
    }

    /// The request as the options change it.
    pub fn tune(&self, req: &Ask) -> Ask {
        let mut req = req.clone();
        if let Some(t) = self.tuning.timeout {
            req.timeout = t;
        }
        if let Some(e) = self.tuning.echo {
            req.echo = e;
        }
        if let Some(c) = self.tuning.accept_cached {
            req.accept_cached = c;
        }
        req
    }
}

impl Prompter for Tuned<'_> {
    fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
        let req = self.tune(req);
        self.inner.ask(&req)
    }
    fn say(&mut self, line: &str) {
        self.inner.say(line)
    }
    fn say_at(&mut self, priority: crate::log::Priority, line: &str) {
        self.inner.say_at(priority, line)
    }
    fn unattended(&mut self, req: &Ask) -> Vec<SecretBytes> {
        let req = self.tune(req);
        self.inner.unattended(&req)
    }
    fn remember(&mut self, req: &Ask, answer: &SecretBytes) {
        if self.tuning.push_cache != Some(false) {
            let req = self.tune(req);
            self.inner.remember(&req, answer)
        }
    }
}

/// An option vaultguard will not run with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub option: String,
    pub why: String,
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "crypttab option `{}`: {}", self.option, self.why)
    }
}

impl std::error::Error for OptionError {}

/// systemd's `parse_boolean`.
fn boolean(v: &str) -> Option<bool> {
    match v {
        "1" | "yes" | "y" | "true" | "t" | "on" => Some(true),
        "0" | "no" | "n" | "false" | "f" | "off" => Some(false),
        _ => None,
    }
}

/// systemd's time spans as crypttab uses them: `30`, `30s`, `2min`, `1h`, `500ms`
/// (a bare number is seconds).
pub fn parse_timespan(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "s" | "sec" | "second" | "seconds" => n.checked_mul(1000)?,
        "ms" | "msec" => n,
        "m" | "min" | "minute" | "minutes" => n.checked_mul(60_000)?,
        "h" | "hr" | "hour" | "hours" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Split at commas as systemd does (`\,` is a comma inside a value); the value of
/// `x-vaultguard.tcti=` is the rest of the string, commas included (a TCTI such
/// as `swtpm:host=127.0.0.1,port=2321` has them), so it must come last.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' if !cur.starts_with(TCTI) => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out.into_iter()
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .collect()
}

const TCTI: &str = "x-vaultguard.tcti=";

/// Options of other volume types and features vaultguard does not have: refused,
/// because opening the volume without them would not be what the line asks for.
fn refusal(key: &str) -> Option<&'static str> {
    Some(match key {
        "plain" | "swap" | "tmp" | "tcrypt" | "tcrypt-hidden" | "tcrypthidden"
        | "tcrypt-system" | "tcrypt-veracrypt" | "veracrypt" | "veracrypt-pim"
        | "tcrypt-keyfile" | "bitlk" => {
            "vaultguard opens LUKS2 volumes only; use systemd-cryptsetup for this volume"
        }
        "cipher" | "hash" | "size" | "offset" | "skip" | "sector-size" => {
            "this sets up a plain dm-crypt volume; a LUKS2 header carries these itself, \
             remove the option"
        }
        "fido2-device" | "fido2-cid" | "fido2-rp" | "fido2-pin" | "fido2-up" | "fido2-uv"
        | "pkcs11-uri" => {
            "vaultguard unlocks with a TPM2 token, key file or passphrase only; \
             FIDO2 and PKCS#11 tokens are not supported"
        }
        "tpm2-pcrlock" => {
            "pcrlock policies are not supported; enrol with `vaultguard enroll` and remove \
             the option"
        }
        "key-slot" | "keyslot" => {
            "restricting the passphrase to one keyslot is not supported; remove the option"
        }
        "keyfile-erase" => "vaultguard never deletes a key file; remove the option",
        "verify" => {
            "asking for the passphrase twice is for creating plain volumes; remove the option"
        }
        "try-empty-password" => "an empty passphrase is never tried; remove the option",
        "link-volume-key" => {
            "vaultguard never leaves the volume key in a keyring it does not sweep; remove \
             the option"
        }
        "fixate-volume-key" => "not supported; remove the option",
        _ => return None,
    })
}

/// Parse an option string (`-`, `none` or empty: no options).
pub fn parse(s: &str) -> Result<CrypttabOptions, OptionError> {
    let mut o = CrypttabOptions::default();
    for word in split_options(s) {
        if matches!(word.as_str(), "-" | "none") {
            continue;
        }
        let (k, v) = word
            .split_once('=')
            .map_or((word.as_str(), None), |(k, v)| (k, Some(v)));
        let bad = |why: &str| OptionError {
            option: word.clone(),
            why: why.to_string(),
        };
        // systemd warns and ignores an unparsable value of most options; so do we.
        let ignore = |why: &str| o_warn(&word, why);
        let flag = |v: Option<&str>| match v {
            None => Ok(true),
            Some(v) => boolean(v).ok_or_else(|| bad("expected a boolean (yes/no)")),
        };
        match k {
            // systemd matches these words exactly: `discard=no` is an unknown
            // option there, warned about and ignored, never a `discard`.
            "discard"
            | "allow-discards"
            | "readonly"
            | "read-only"
            | "same-cpu-crypt"
            | "submit-from-crypt-cpus"
            | "no-read-workqueue"
            | "no-write-workqueue"
                if v.is_some() =>
            {
                o.warnings.push(ignore(&format!(
                    "`{k}` takes no value (systemd-cryptsetup ignores `{word}` too); write \
                     `{k}` to set it, or leave it out"
                )))
            }
            "discard" | "allow-discards" => o.flags.discard = true,
            "readonly" | "read-only" => o.flags.readonly = true,
            "same-cpu-crypt" => o.flags.same_cpu_crypt = true,
            "submit-from-crypt-cpus" => o.flags.submit_from_crypt_cpus = true,
            "no-read-workqueue" => o.flags.no_read_workqueue = true,
            "no-write-workqueue" => o.flags.no_write_workqueue = true,
            "headless" => o.headless = flag(v)?,
            "token-only" => o.token_only = flag(v)?,
            "tries" => match v.and_then(|v| v.parse().ok()) {
                Some(n) => o.tries = Some(n),
                None => o.warnings.push(ignore("not a number")),
            },
            "password-echo" => match v {
                Some("masked") => o.echo = Some(Echo::Masked),
                Some(b) => match boolean(b) {
                    Some(true) => o.echo = Some(Echo::On),
                    Some(false) => o.echo = Some(Echo::Off),
                    None => o.warnings.push(ignore("expected yes, no or masked")),
                },
                None => o.warnings.push(ignore("expected yes, no or masked")),
            },
            "password-cache" => match v {
                // systemd: `read-only` uses the cache without adding to it.
                Some("read-only") => {
                    o.accept_cached = Some(true);
                    o.push_cache = Some(false);
                }
                Some(b) => match boolean(b) {
                    Some(c) => {
                        o.accept_cached = Some(c);
                        o.push_cache = Some(c);
                    }
                    None => o.warnings.push(ignore("expected yes, no or read-only")),
                },
                None => o.warnings.push(ignore("expected yes, no or read-only")),
            },
            "keyfile-offset" => match v.and_then(|v| v.parse().ok()) {
                Some(n) => o.keyfile_offset = n,
                None => o.warnings.push(ignore("not a number of bytes")),
            },
            "keyfile-size" => match v.and_then(|v| v.parse().ok()) {
                Some(n) => o.keyfile_size = Some(n),
                None => o.warnings.push(ignore("not a number of bytes")),
            },
            "header" => {
                let p = v.unwrap_or("");
                if !p.starts_with('/') {
                    return Err(bad("the header path must be absolute"));
                }
                if o.header.is_some() {
                    return Err(bad("header= is given twice"));
                }
                o.header = Some(PathBuf::from(p));
            }
            "timeout" => match v.and_then(parse_timespan) {
                Some(d) if d.is_zero() => o.prompt_timeout = Some(None),
                Some(d) => o.prompt_timeout = Some(Some(d)),
                None => o.warnings.push(ignore("not a time span")),
            },
            "token-timeout" => match v.and_then(parse_timespan) {
                Some(d) => o.token_timeout = Some(d),
                None => o.warnings.push(ignore("not a time span")),
            },
            "tpm2-device" => match v {
                Some("auto") => o.tcti = None,
                Some(p) if p.starts_with('/') => o.tcti = Some(format!("device:{p}")),
                _ => {
                    return Err(bad(
                        "expected `auto` or a device path; give any other TCTI as the last \
                         option, x-vaultguard.tcti=...",
                    ))
                }
            },
            "tpm2-signature" => match v {
                Some(p) if !p.is_empty() => o.signature = Some(PathBuf::from(p)),
                _ => return Err(bad("expected the path of a signature file")),
            },
            "tpm2-pcrs" => {
                // As in systemd, these apply only to a volume without token metadata;
                // vaultguard's tokens always carry their PCRs, which is what is used.
                crate::config::parse_pcr_list(v.unwrap_or(""))
                    .map_err(|e| bad(&format!("not a PCR list: {e}")))?;
            }
            "tpm2-pin" => {
                // Likewise: whether a PIN is needed is recorded in the token.
                flag(v)?;
            }
            "tpm2-measure-pcr" => match v.unwrap_or("yes") {
                n if n.parse::<u32>().is_ok() => match n.parse::<u32>() {
                    Ok(p) if p < 24 => o.phase_pcr = Some(Some(p)),
                    _ => o.warnings.push(ignore("not a PCR (0-23)")),
                },
                b => match boolean(b) {
                    // systemd's "yes" is PCR 15, the system-identity PCR.
                    Some(true) => o.phase_pcr = Some(Some(15)),
                    Some(false) => o.phase_pcr = Some(None),
                    None => o
                        .warnings
                        .push(ignore("expected a PCR number or a boolean")),
                },
            },
            "tpm2-measure-bank" => {
                if v != Some("sha256") {
                    return Err(bad(
                        "the phase PCR is measured in the sha256 bank only; use \
                         tpm2-measure-bank=sha256 or remove the option",
                    ));
                }
            }
            // The generator's options (systemd-cryptsetup-generator reads these, the
            // attach does not) and the other volume types' no-ops.
            "luks" | "noauto" | "auto" | "nofail" | "fail" | "_netdev" | "keyfile-timeout"
            | "x-initrd.attach" => {}
            k if k.starts_with("x-systemd.") => {}
            "x-vaultguard.no-tpm" => o.no_tpm = flag(v)?,
            "x-vaultguard.tcti" => match v {
                Some(t) if !t.is_empty() => {
                    // The value runs to the end of the line, so an option written
                    // after it would silently become part of the TCTI: `readonly`
                    // or `header=` lost, the volume opened as the line did not ask.
                    if let Some(after) = t.split(',').skip(1).find(|w| is_option(w)) {
                        return Err(bad(&format!(
                            "`{}` follows it, and x-vaultguard.tcti= takes the rest of the                              line as the TCTI; move x-vaultguard.tcti= to the end",
                            after.trim()
                        )));
                    }
                    o.tcti = Some(t.to_string())
                }
                _ => return Err(bad("expected a TCTI, e.g. swtpm:host=127.0.0.1,port=2321")),
            },
            k if k.starts_with("x-vaultguard.") => {
                return Err(bad(
                    "not a vaultguard option (known: x-vaultguard.no-tpm, x-vaultguard.tcti=)",
                ))
            }
            k => match refusal(k) {
                Some(why) => return Err(bad(why)),
                None => o.warnings.push(format!(
                    "ignoring unknown crypttab option `{word}` (systemd-cryptsetup ignores it too)"
                )),
            },
        }
    }
    Ok(o)
}

/// Is `word` a crypttab option (one this table honours, refuses or passes over
/// for the generator), as opposed to a part of a TCTI (`port=2321`)?
fn is_option(word: &str) -> bool {
    const KNOWN: &[&str] = &[
        "discard",
        "allow-discards",
        "readonly",
        "read-only",
        "same-cpu-crypt",
        "submit-from-crypt-cpus",
        "no-read-workqueue",
        "no-write-workqueue",
        "headless",
        "token-only",
        "tries",
        "password-echo",
        "password-cache",
        "keyfile-offset",
        "keyfile-size",
        "header",
        "timeout",
        "token-timeout",
        "tpm2-device",
        "tpm2-signature",
        "tpm2-pcrs",
        "tpm2-pin",
        "tpm2-measure-pcr",
        "tpm2-measure-bank",
        "luks",
        "noauto",
        "auto",
        "nofail",
        "fail",
        "_netdev",
        "keyfile-timeout",
        "x-initrd.attach",
        "-",
        "none",
    ];
    let w = word.trim();
    let k = w.split_once('=').map_or(w, |(k, _)| k);
    KNOWN.contains(&k)
        || refusal(k).is_some()
        || k.starts_with("x-systemd.")
        || k.starts_with("x-vaultguard.")
}

/// `header=` must name something libcryptsetup can read a header from: a
/// regular file or a block device. A FIFO would block the open for ever (the
/// boot hangs without a word), a directory or socket fails with a message about
/// the data device. Not there yet is left to the open (a header on a device that
/// is still coming up gets its own "does not exist" error). The one check in
/// this module that looks at the file system; the caller runs it.
pub fn check_header(o: &CrypttabOptions) -> Result<(), OptionError> {
    use std::os::unix::fs::FileTypeExt;
    let Some(p) = &o.header else {
        return Ok(());
    };
    let Ok(meta) = std::fs::metadata(p) else {
        return Ok(());
    };
    let t = meta.file_type();
    if t.is_file() || t.is_block_device() {
        return Ok(());
    }
    let kind = if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a character device"
    };
    Err(OptionError {
        option: format!("header={}", p.display()),
        why: format!("it is {kind}; a detached LUKS2 header is a regular file or a block device"),
    })
}

fn o_warn(word: &str, why: &str) -> String {
    format!("ignoring crypttab option `{word}`: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> CrypttabOptions {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn refused(s: &str) -> String {
        match parse(s) {
            Err(e) => e.to_string(),
            Ok(o) => panic!("{s} was accepted: {o:?}"),
        }
    }

    #[test]
    fn empty_dash_and_none_are_no_options() {
        for s in ["", "-", "none", " , "] {
            assert_eq!(ok(s), CrypttabOptions::default(), "{s:?}");
        }
    }

    #[test]
    fn activation_flags() {
        let o = ok("discard,same-cpu-crypt,submit-from-crypt-cpus,no-read-workqueue,no-write-workqueue,read-only");
        let f = o.flags;
        assert!(f.discard && f.same_cpu_crypt && f.submit_from_crypt_cpus);
        assert!(f.no_read_workqueue && f.no_write_workqueue && f.readonly);
        assert!(ok("allow-discards").flags.discard);
        assert!(ok("readonly").flags.readonly);
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    }

    #[test]
    fn a_flag_with_a_value_is_ignored_as_systemd_does_never_set() {
        // Before: `discard=no` turned discard on, the opposite of what it says.
        for w in [
            "discard=no",
            "allow-discards=0",
            "readonly=false",
            "same-cpu-crypt=off",
            "no-read-workqueue=no",
            "discard=",
        ] {
            let o = ok(w);
            assert_eq!(o.flags, ActivateFlags::default(), "{w}");
            assert_eq!(o.warnings.len(), 1, "{w}: {:?}", o.warnings);
            assert!(o.warnings[0].contains(w), "{:?}", o.warnings);
        }
        // The last word of a repeated option wins, as in systemd.
        assert_eq!(ok("tries=3,tries=5").tries, Some(5));
        assert_eq!(ok("tries=3,tries=-1").tries, Some(3));
        assert_eq!(ok("tries=99999999999").tries, None);
        assert!(!ok("headless,headless=no").headless);
        assert_eq!(ok("tpm2-device=/dev/tpmrm0,tpm2-device=auto").tcti, None);
        // Empty words, lone `=`: nothing set.
        let o = ok(",,discard,,");
        assert!(o.flags.discard && o.warnings.is_empty());
        assert_eq!(ok("=").flags, ActivateFlags::default());
    }

    #[test]
    fn tries_zero_is_unlimited_not_refused() {
        assert_eq!(ok("tries=0").tries, Some(0));
        assert_eq!(ok("tries=4").tries, Some(4));
        let o = ok("tries=x");
        assert_eq!(o.tries, None);
        assert!(o.warnings[0].contains("tries=x"), "{:?}", o.warnings);
    }

    #[test]
    fn headless_and_token_only() {
        assert!(ok("headless").headless);
        assert!(ok("headless=yes").headless);
        assert!(!ok("headless=0").headless);
        assert!(ok("token-only").token_only);
        assert!(refused("token-only=maybe").contains("boolean"));
    }

    #[test]
    fn password_echo_and_cache() {
        assert_eq!(ok("password-echo=no").echo, Some(Echo::Off));
        assert_eq!(ok("password-echo=yes").echo, Some(Echo::On));
        assert_eq!(ok("password-echo=masked").echo, Some(Echo::Masked));
        assert_eq!(ok("password-echo=blue").echo, None);
        assert_eq!(ok("password-cache=no").accept_cached, Some(false));
        assert_eq!(ok("password-cache=no").push_cache, Some(false));
        assert_eq!(ok("password-cache=read-only").accept_cached, Some(true));
        assert_eq!(ok("password-cache=read-only").push_cache, Some(false));
        assert_eq!(ok("password-cache=yes").push_cache, Some(true));
    }

    #[test]
    fn key_file_offset_size_and_header() {
        let o = ok("keyfile-offset=10,keyfile-size=32,header=/boot/vault.hdr");
        assert_eq!(o.keyfile_offset, 10);
        assert_eq!(o.keyfile_size, Some(32));
        assert_eq!(
            o.header.as_deref(),
            Some(std::path::Path::new("/boot/vault.hdr"))
        );
        assert!(refused("header=vault.hdr").contains("absolute"));
        assert!(refused("header=/a,header=/b").contains("twice"));
    }

    #[test]
    fn timeout_is_the_prompt_and_token_timeout_the_tpm() {
        let o = ok("timeout=30s,token-timeout=2min");
        assert_eq!(o.prompt_timeout, Some(Some(Duration::from_secs(30))));
        assert_eq!(o.token_timeout, Some(Duration::from_secs(120)));
        assert_eq!(ok("timeout=0").prompt_timeout, Some(None));
        assert_eq!(
            ok("timeout=90").prompt_timeout,
            Some(Some(Duration::from_secs(90)))
        );
        assert_eq!(
            ok("token-timeout=500ms").token_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(ok("x-systemd.device-timeout=5s").token_timeout, None);
    }

    #[test]
    fn tpm2_device_is_auto_or_a_path_and_the_tcti_keeps_its_commas() {
        assert_eq!(ok("tpm2-device=auto").tcti, None);
        assert_eq!(
            ok("tpm2-device=/dev/tpmrm1").tcti.as_deref(),
            Some("device:/dev/tpmrm1")
        );
        assert!(refused("tpm2-device=swtpm:port=1").contains("x-vaultguard.tcti"));
        let o = ok("headless,x-vaultguard.tcti=swtpm:host=127.0.0.1,port=2321");
        assert_eq!(o.tcti.as_deref(), Some("swtpm:host=127.0.0.1,port=2321"));
        assert!(o.headless && o.warnings.is_empty(), "{o:?}");
        // systemd's own escape works too.
        assert_eq!(
            ok(r"x-vaultguard.tcti=mssim:port=1\,host=h")
                .tcti
                .as_deref(),
            Some("mssim:port=1,host=h")
        );
    }

    #[test]
    fn an_option_after_the_tcti_is_refused_not_swallowed() {
        // Before: tcti `device:/dev/tpmrm0,readonly` and a read-write volume.
        for (line, after) in [
            ("x-vaultguard.tcti=device:/dev/tpmrm0,readonly", "readonly"),
            ("x-vaultguard.tcti=swtpm:port=2321,header=/h", "header=/h"),
            (
                r"x-vaultguard.tcti=mssim:port=1\,host=h,headless",
                "headless",
            ),
            (
                "x-vaultguard.tcti=swtpm:port=2321, token-only",
                "token-only",
            ),
            (
                "x-vaultguard.tcti=swtpm:port=2321,x-systemd.device-timeout=0",
                "x-systemd.",
            ),
            ("x-vaultguard.tcti=swtpm:port=2321,keyslot=1", "keyslot=1"),
        ] {
            let e = refused(line);
            assert!(
                e.contains(after) && e.contains("move x-vaultguard.tcti="),
                "{line}: {e}"
            );
        }
        // Its own key=value parts are not options.
        let o = ok("readonly,x-vaultguard.tcti=swtpm:host=127.0.0.1,port=2321,path=/s");
        assert!(o.flags.readonly);
        assert_eq!(
            o.tcti.as_deref(),
            Some("swtpm:host=127.0.0.1,port=2321,path=/s")
        );
    }

    #[test]
    fn tpm2_pcrs_pin_and_measure() {
        let o = ok("tpm2-pcrs=0+7,tpm2-pin=yes");
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
        assert!(refused("tpm2-pcrs=7+x").contains("PCR"));
        assert_eq!(ok("tpm2-measure-pcr=no").phase_pcr, Some(None));
        assert_eq!(ok("tpm2-measure-pcr=yes").phase_pcr, Some(Some(15)));
        assert_eq!(ok("tpm2-measure-pcr=14").phase_pcr, Some(Some(14)));
        assert_eq!(ok("tpm2-measure-pcr=99").phase_pcr, None);
        assert!(ok("tpm2-measure-bank=sha256").warnings.is_empty());
        assert!(refused("tpm2-measure-bank=sha1").contains("sha256"));
    }

    #[test]
    fn generator_options_are_accepted_silently() {
        let o = ok("nofail,noauto,luks,x-systemd.device-timeout=10s,x-initrd.attach,keyfile-timeout=5s,_netdev");
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    }

    #[test]
    fn tpm2_signature_names_the_signature_file() {
        assert_eq!(
            ok("tpm2-signature=/boot/sig.json").signature.as_deref(),
            Some(std::path::Path::new("/boot/sig.json"))
        );
        assert_eq!(ok("discard").signature, None);
        assert!(refused("tpm2-signature=").contains("signature file"));
    }

    #[test]
    fn what_vaultguard_cannot_do_is_refused_by_name() {
        for (opt, word) in [
            ("tpm2-pcrlock=/var/lib/pcrlock.json", "pcrlock"),
            ("fido2-device=auto", "FIDO2"),
            ("pkcs11-uri=auto", "PKCS#11"),
            ("plain", "LUKS2 volumes only"),
            ("tcrypt", "LUKS2 volumes only"),
            ("cipher=aes-xts-plain64", "plain dm-crypt"),
            ("keyslot=1", "keyslot"),
            ("keyfile-erase", "never deletes"),
            ("try-empty-password", "empty passphrase"),
            ("x-vaultguard.colour=red", "not a vaultguard option"),
            ("tpm2-device-none", "unknown"),
        ] {
            if word == "unknown" {
                // No such option in systemd: warned about, not honoured.
                let o = ok(opt);
                assert!(!o.no_tpm && o.warnings[0].contains(opt), "{o:?}");
                continue;
            }
            let e = refused(opt);
            assert!(e.contains(opt) && e.contains(word), "{opt}: {e}");
        }
        assert!(ok("x-vaultguard.no-tpm").no_tpm);
    }

    #[test]
    fn unknown_options_warn_and_are_ignored() {
        let o = ok("colour=red,discard");
        assert!(o.flags.discard);
        assert_eq!(o.warnings.len(), 1);
        assert!(o.warnings[0].contains("colour=red"), "{:?}", o.warnings);
    }

    #[test]
    fn password_cache_decides_what_is_read_from_and_added_to_the_cache() {
        #[derive(Default)]
        struct Cache {
            read_with: Vec<bool>,
            pushed: usize,
        }
        impl Prompter for Cache {
            fn ask(&mut self, _: &Ask) -> Result<SecretBytes, PromptError> {
                Err(PromptError::Cancelled)
            }
            fn say(&mut self, _: &str) {}
            fn unattended(&mut self, req: &Ask) -> Vec<SecretBytes> {
                self.read_with.push(req.accept_cached);
                Vec::new()
            }
            fn remember(&mut self, _: &Ask, _: &SecretBytes) {
                self.pushed += 1;
            }
        }
        let answer = SecretBytes::from_slice(b"pass");
        let mut ask = Ask::new(crate::prompt::SecretKind::Passphrase, "id", "msg");
        ask.accept_cached = true;
        ask.keyname = Some("cryptsetup".into());
        // (option, cache read, answer added)
        for (opt, read, pushed) in [
            ("discard", true, 1),
            ("password-cache=yes", true, 1),
            ("password-cache=read-only", true, 0),
            ("password-cache=no", false, 0),
        ] {
            let mut c = Cache::default();
            let mut t = Tuned::new(&mut c, ok(opt).prompt());
            let _ = t.unattended(&ask);
            t.remember(&ask, &answer);
            assert_eq!((c.read_with[0], c.pushed), (read, pushed), "{opt}");
        }
    }

    #[test]
    fn the_prompt_options_reach_the_request() {
        struct Seen(Vec<Ask>);
        impl Prompter for Seen {
            fn ask(&mut self, req: &Ask) -> Result<SecretBytes, PromptError> {
                self.0.push(req.clone());
                Err(PromptError::Cancelled)
            }
            fn say(&mut self, _: &str) {}
        }
        let o = ok("timeout=7,password-echo=yes,password-cache=no");
        let mut seen = Seen(Vec::new());
        let mut t = Tuned::new(&mut seen, o.prompt());
        let mut ask = Ask::new(crate::prompt::SecretKind::Passphrase, "id", "msg");
        ask.accept_cached = true;
        let _ = t.ask(&ask);
        let got = &seen.0[0];
        assert_eq!(got.timeout, Some(Duration::from_secs(7)));
        assert_eq!(got.echo, Echo::On);
        assert!(!got.accept_cached);
        // Nothing given: the request is left as its caller made it.
        let mut seen = Seen(Vec::new());
        let _ = Tuned::new(&mut seen, PromptTuning::default()).ask(&ask);
        assert_eq!(seen.0[0].timeout, None);
        assert!(seen.0[0].accept_cached);
    }

    #[test]
    fn time_spans() {
        assert_eq!(parse_timespan("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timespan("15"), Some(Duration::from_secs(15)));
        assert_eq!(parse_timespan("x"), None);
        assert_eq!(parse_timespan("5 fortnights"), None);
    }
}
