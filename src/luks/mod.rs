//! The LUKS2 edge (libcryptsetup): header, tokens, keyslots, activation.
//!
//! Activation always goes through the volume key: it is fetched once (one KDF run)
//! into an mlock'ed buffer, handed to libcryptsetup, which passes it to dm-crypt
//! through the kernel keyring (the dm table names a `logon` key, never the hex key),
//! and the same buffer keys the phase-PCR measurement. This module never decides
//! *whether* to open a vault and never prints key material: libcryptsetup's own log
//! lines are captured for error messages, and those never contain keys.

pub mod token;

use crate::secret::SecretBytes;
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, CryptStatusInfo, EncryptionFormat, KeyslotInfo};
use libcryptsetup_rs::{CryptDevice, CryptInit, CryptPbkdfType, LibcryptErr, TokenInput};
use std::ffi::CStr;
use std::fmt;
use std::os::raw::{c_char, c_int, c_void};
use std::path::Path;
use std::sync::Mutex;
use token::{TokenError, Tpm2Token};

#[derive(Debug)]
pub enum LuksError {
    /// The device is not there or not LUKS2.
    Open { device: String, msg: String },
    /// No keyslot accepts this passphrase.
    WrongPassphrase,
    /// Something else in libcryptsetup or the kernel failed.
    Op { what: &'static str, msg: String },
    /// The kernel has no device-mapper (dm_mod not loaded): nothing can be
    /// activated or closed, whatever the name.
    NoDeviceMapper { what: &'static str },
}

impl LuksError {
    pub fn is_wrong_passphrase(&self) -> bool {
        matches!(self, LuksError::WrongPassphrase)
    }
}

impl fmt::Display for LuksError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LuksError::Open { device, msg } => {
                write!(f, "cannot open LUKS2 device {device}: {msg}")
            }
            LuksError::WrongPassphrase => write!(f, "no keyslot accepts this passphrase"),
            LuksError::Op { what, msg } => write!(f, "{what} failed: {msg}"),
            LuksError::NoDeviceMapper { what } => write!(
                f,
                "{what} failed: the kernel has no device-mapper ({DM_CONTROL} is missing or has \
                 no driver); \
                 load it with `modprobe dm_mod` (in the initramfs: add dm_mod and dm_crypt \
                 to it)"
            ),
        }
    }
}

impl std::error::Error for LuksError {}

/// The last error line libcryptsetup logged on this process (it has no per-call
/// error strings, only errno).
static LAST_LOG: Mutex<Option<String>> = Mutex::new(None);

// Written by hand rather than with libcryptsetup-rs's `c_logging_callback!`: that
// macro `expect`s a known log level and a UTF-8 message, and a panic inside an
// `extern "C"` callback aborts the process. Error messages quote device paths and
// labels, which need not be UTF-8; an unlock in the initramfs must not die on
// one. Here both are taken as they come (`to_string_lossy`, unknown levels
// ignored). See `tests::a_non_utf8_log_line_is_kept_not_fatal`.
unsafe extern "C" fn log_callback(level: c_int, msg: *const c_char, _usr: *mut c_void) {
    if msg.is_null() || level != libcryptsetup_rs_sys::CRYPT_LOG_ERROR as c_int {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string valid for this call.
    let text = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .trim()
        .to_string();
    if let Ok(mut last) = LAST_LOG.lock() {
        *last = Some(text);
    }
}

/// Route libcryptsetup's log into `LAST_LOG` instead of stderr, so that messages
/// reach the operator once, inside our error, and external token plugins (which a
/// static binary could not load anyway) are never looked for.
pub fn init_library() {
    libcryptsetup_rs::set_log_callback::<()>(Some(log_callback), None);
    // SAFETY: plain library call without arguments.
    unsafe { libcryptsetup_rs_sys::crypt_token_external_disable() };
}

/// device-mapper's control node: absent when dm_mod is not loaded.
const DM_CONTROL: &str = "/dev/mapper/control";

/// Say why an operation failed when there is no device-mapper: libcryptsetup
/// reports it as a name "invalid or still in use". Asked after libcryptsetup
/// failed, never before: with dm_mod not loaded yet (an initramfs-tools initrd)
/// libdevmapper creates the control node and opening it loads the module, which a
/// check in front would prevent. The node can exist with no driver behind it (a
/// container's static /dev): opening it is the test.
fn need_device_mapper(what: &'static str, control: &Path) -> Result<(), LuksError> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(control)
    {
        Err(e) if no_driver(&e) => Err(LuksError::NoDeviceMapper { what }),
        // Anything else (permissions, ...) is libcryptsetup's to report.
        _ => Ok(()),
    }
}

/// Whether opening the control node failed because there is no driver.
fn no_driver(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
        || e.raw_os_error().is_some_and(|n| {
            n == rustix::io::Errno::NODEV.raw_os_error()
                || n == rustix::io::Errno::NXIO.raw_os_error()
        })
}

/// Whether this kernel has a device-mapper to activate on.
pub fn has_device_mapper() -> bool {
    need_device_mapper("", Path::new(DM_CONTROL)).is_ok()
}

fn op(what: &'static str) -> impl FnOnce(LibcryptErr) -> LuksError {
    move |e| LuksError::Op {
        what,
        msg: describe(&e),
    }
}

fn describe(e: &LibcryptErr) -> String {
    let last = LAST_LOG.lock().ok().and_then(|mut l| l.take());
    let base = match e {
        LibcryptErr::IOError(io) => io.to_string(),
        other => format!("{other:?}"),
    };
    match last {
        Some(l) => format!("{l} ({base})"),
        None => base,
    }
}

fn errno(e: &LibcryptErr) -> Option<i32> {
    match e {
        LibcryptErr::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// A parsed `systemd-tpm2` token, or why it cannot be used, by token id.
pub type Tpm2Tokens = Vec<(u32, Result<Tpm2Token, TokenError>)>;

/// A token as the header lists it, whatever its type: what refers to which keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRef {
    pub id: u32,
    pub kind: String,
    pub keyslots: Vec<u32>,
}

pub struct Vault {
    dev: CryptDevice,
    device: String,
    /// The header's TPM2 tokens, read once (libcryptsetup answers from the header it
    /// loaded; our own token writes forget this).
    tokens: Option<Tpm2Tokens>,
}

impl Vault {
    pub fn open(device: &str) -> Result<Vault, LuksError> {
        Vault::open_with_header(device, None)
    }

    /// Open `device` whose LUKS2 header is `header` (crypttab's `header=`, a
    /// detached header), or on the device itself.
    pub fn open_with_header(device: &str, header: Option<&Path>) -> Result<Vault, LuksError> {
        let open_err = |e: LibcryptErr| LuksError::Open {
            device: device.to_string(),
            msg: match header {
                Some(h) => format!("with the header {}: {}", h.display(), describe(&e)),
                None => describe(&e),
            },
        };
        let mut dev = match header {
            Some(h) => CryptInit::init_with_data_device(libcryptsetup_rs::Either::Right((
                h,
                Path::new(device),
            ))),
            None => CryptInit::init(Path::new(device)),
        }
        .map_err(open_err)?;
        dev.context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .map_err(|e| LuksError::Open {
                device: device.to_string(),
                // With a detached header it is the header that is not LUKS2.
                msg: match header {
                    Some(h) => format!(
                        "the detached header {} (crypttab header=) is not a LUKS2 header ({})",
                        h.display(),
                        describe(&e)
                    ),
                    None => format!("not a LUKS2 volume ({})", describe(&e)),
                },
            })?;
        Ok(Vault {
            dev,
            device: device.to_string(),
            tokens: None,
        })
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Read the header from the device again. libcryptsetup applies a change to
    /// its in-memory header before writing it and keeps it there when the write
    /// fails; the next successful write (say, a rollback) would then commit it.
    /// After any failed write the copy in memory is thrown away for this reason.
    pub fn reload(&mut self) -> Result<(), LuksError> {
        self.tokens = None;
        self.dev = Vault::open(&self.device)?.dev;
        Ok(())
    }

    /// `result` of a header write; on failure the header is re-read (see `reload`).
    fn written<T>(&mut self, result: Result<T, LuksError>) -> Result<T, LuksError> {
        if result.is_err() {
            // If even the re-read fails, the next operation fails to load too;
            // the write's own error is the one to report.
            let _ = self.reload();
        }
        result
    }

    /// The header's metadata (keyslots, tokens, digests; no key material) as
    /// libcryptsetup dumps it.
    fn header_json(&mut self) -> Result<serde_json::Value, LuksError> {
        self.dev
            .status_handle()
            .dump_json()
            .map_err(op("reading the LUKS2 header"))
    }

    /// The KDF salt of `slot`, as the header stores it (base64): random per
    /// keyslot and bound to its key material, so it names that keyslot.
    pub fn keyslot_salt(&mut self, slot: u32) -> Result<Option<String>, LuksError> {
        let json = self.header_json()?;
        Ok(json["keyslots"][slot.to_string()]["kdf"]["salt"]
            .as_str()
            .map(str::to_string))
    }

    /// The JSON of every token of type `kind` (e.g. `clevis`), by token id.
    pub fn tokens_of_type(
        &mut self,
        kind: &str,
    ) -> Result<Vec<(u32, serde_json::Value)>, LuksError> {
        let json = self.header_json()?;
        let mut out: Vec<(u32, serde_json::Value)> = json["tokens"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(_, t)| t["type"].as_str() == Some(kind))
                    .filter_map(|(id, t)| Some((id.parse().ok()?, t.clone())))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|t| t.0);
        Ok(out)
    }

    /// Every token in the header, of any type, with the keyslots it refers to.
    pub fn token_refs(&mut self) -> Result<Vec<TokenRef>, LuksError> {
        let json = self.header_json()?;
        let mut out = Vec::new();
        if let Some(tokens) = json["tokens"].as_object() {
            for (id, t) in tokens {
                let Ok(id) = id.parse() else { continue };
                out.push(TokenRef {
                    id,
                    kind: t["type"].as_str().unwrap_or("?").to_string(),
                    keyslots: t["keyslots"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|k| k.as_str()?.parse().ok()).collect())
                        .unwrap_or_default(),
                });
            }
        }
        out.sort_by_key(|t| t.id);
        Ok(out)
    }

    pub fn uuid(&mut self) -> Result<String, LuksError> {
        self.dev
            .status_handle()
            .get_uuid()
            .map(|u| u.hyphenated().to_string())
            .map_err(op("reading the LUKS UUID"))
    }

    /// All `systemd-tpm2` tokens, each parsed or with the reason it is unusable.
    pub fn tpm2_tokens(&mut self) -> Tpm2Tokens {
        if let Some(tokens) = &self.tokens {
            return tokens.clone();
        }
        let mut out = Vec::new();
        for id in 0..32u32 {
            let Ok(json) = self.dev.token_handle().json_get(id) else {
                continue;
            };
            match Tpm2Token::from_json(&json) {
                Err(TokenError::NotTpm2) => {}
                parsed => out.push((id, parsed)),
            }
        }
        self.tokens = Some(out.clone());
        out
    }

    pub fn active_keyslots(&mut self) -> Vec<u32> {
        (0..32u32)
            .filter(|&s| {
                matches!(
                    self.dev.keyslot_handle().status(s),
                    Ok(KeyslotInfo::Active) | Ok(KeyslotInfo::ActiveLast)
                )
            })
            .collect()
    }

    /// Fetch the volume key with a passphrase (from `keyslot` or any slot). Returns
    /// the key and the keyslot that opened.
    pub fn volume_key(
        &mut self,
        keyslot: Option<u32>,
        passphrase: &[u8],
    ) -> Result<(SecretBytes, u32), LuksError> {
        let size = self.dev.status_handle().get_volume_key_size();
        if size <= 0 {
            return Err(LuksError::Op {
                what: "reading the volume key size",
                msg: format!("libcryptsetup returned {size}"),
            });
        }
        let mut vk = SecretBytes::zeroed(size as usize);
        match self
            .dev
            .volume_key_handle()
            .get(keyslot, vk.as_mut_bytes(), Some(passphrase))
        {
            Ok((slot, len)) => {
                vk.truncate(len);
                Ok((vk, slot as u32))
            }
            Err(e) if errno(&e) == Some(libc_eperm()) || errno(&e) == Some(libc_enoent()) => {
                let _ = LAST_LOG.lock().map(|mut l| l.take());
                Err(LuksError::WrongPassphrase)
            }
            // libcryptsetup says only "Keyslot open failed" (EINVAL) when its crypto
            // library lacks the keyslot's hash: name the hash and what to do.
            Err(e) => match self.unsupported_keyslot_hash(keyslot) {
                Some((slot, hash)) => {
                    let _ = LAST_LOG.lock().map(|mut l| l.take());
                    Err(LuksError::Op {
                        what: "unlocking a keyslot",
                        msg: format!(
                            "keyslot {slot} hashes with {hash}, which is not supported by \
                             this vaultguard (its libgcrypt has SHA-1, SHA-2 and SHA-3 only); \
                             add a keyslot with a supported hash using a full cryptsetup: \
                             `cryptsetup luksAddKey --hash sha256 DEVICE`"
                        ),
                    })
                }
                None => Err(op("unlocking a keyslot")(e)),
            },
        }
    }

    /// The first active keyslot (or `keyslot`) whose PBKDF2 hash the static
    /// binary's libgcrypt lacks (initramfs/build-cdeps.sh), with that hash.
    fn unsupported_keyslot_hash(&mut self, keyslot: Option<u32>) -> Option<(u32, String)> {
        let slots = match keyslot {
            Some(k) => vec![k],
            None => self.active_keyslots(),
        };
        slots.into_iter().find_map(|s| {
            let hash = self.dev.keyslot_handle().get_pbkdf(s).ok()?.hash?;
            (!hash_supported(&hash)).then_some((s, hash))
        })
    }

    /// Add a keyslot for `passphrase` holding `vk`. `minimal_kdf` is for
    /// high-entropy passphrases (the TPM secret, a recovery key), where key
    /// stretching adds nothing but boot time.
    pub fn add_keyslot(
        &mut self,
        vk: &SecretBytes,
        passphrase: &[u8],
        minimal_kdf: bool,
    ) -> Result<u32, LuksError> {
        if minimal_kdf {
            let pbkdf = CryptPbkdfType {
                type_: CryptKdf::Pbkdf2,
                hash: Some("sha512".into()),
                time_ms: 0,
                iterations: 1000,
                max_memory_kb: 0,
                parallel_threads: 0,
                flags: CryptPbkdf::NO_BENCHMARK,
            };
            self.dev
                .settings_handle()
                .set_pbkdf_type(&pbkdf)
                .map_err(op("setting the keyslot KDF"))?;
        }
        let slot = self
            .dev
            .keyslot_handle()
            .add_by_key(
                None,
                Some(libcryptsetup_rs::Either::Left(vk.as_bytes())),
                passphrase,
                CryptVolumeKey::empty(),
            )
            .map_err(op("adding a keyslot"));
        let slot = self.written(slot);
        if minimal_kdf {
            // Back to the library default for anything added later in this context.
            if let Ok(default) = libcryptsetup_rs::CryptSettingsHandle::get_pbkdf_default(
                &libcryptsetup_rs::consts::vals::LuksType::Luks2,
            ) {
                let _ = self.dev.settings_handle().set_pbkdf_type(&default);
            }
        }
        slot
    }

    pub fn destroy_keyslot(&mut self, slot: u32) -> Result<(), LuksError> {
        // Tokens lose their reference to a destroyed keyslot.
        self.tokens = None;
        let r = self
            .dev
            .keyslot_handle()
            .destroy(slot)
            .map_err(op("removing a keyslot"));
        self.written(r)
    }

    pub fn add_token(&mut self, json: &serde_json::Value) -> Result<u32, LuksError> {
        self.tokens = None;
        let r = self
            .dev
            .token_handle()
            .json_set(TokenInput::AddToken(json))
            .map_err(op("writing the LUKS2 token"));
        self.written(r)
    }

    pub fn remove_token(&mut self, id: u32) -> Result<(), LuksError> {
        self.tokens = None;
        let r = self
            .dev
            .token_handle()
            .json_set(TokenInput::RemoveToken(id))
            .map(|_| ())
            .map_err(op("removing a LUKS2 token"));
        self.written(r)
    }

    /// Create the dm-crypt mapping `name` from the volume key. libcryptsetup loads
    /// the key into the kernel keyring and the dm table references it there.
    pub fn activate(
        &mut self,
        name: &str,
        vk: &SecretBytes,
        flags: ActivateFlags,
    ) -> Result<(), LuksError> {
        self.dev
            .activate_handle()
            .activate_by_volume_key(Some(name), Some(vk.as_bytes()), flags.to_crypt())
            .map_err(|e| {
                let err = op("activating the mapping")(e);
                match need_device_mapper("activating the mapping", Path::new(DM_CONTROL)) {
                    Err(no_dm) => no_dm,
                    Ok(()) => err,
                }
            })?;
        // dm-crypt copied the key when the table was loaded; libcryptsetup leaves
        // its logon key linked in this thread's keyring, where it would live as
        // long as the process (the supervisor: for days). Best effort: the lock
        // sequence sweeps again and reports what it cannot remove.
        if let Ok(uuid) = self.uuid() {
            let _ = crate::keyring::revoke_volume_keys(&uuid);
        }
        Ok(())
    }
}

/// Activation options an operator can ask for (crypttab's names in brackets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActivateFlags {
    /// Pass discards through (`discard`).
    pub discard: bool,
    /// Read-only mapping (`readonly`, `read-only`).
    pub readonly: bool,
    /// Bypass dm-crypt's queues (`no-read-workqueue`, `no-write-workqueue`).
    pub no_read_workqueue: bool,
    pub no_write_workqueue: bool,
    /// dm-crypt's CPU placement (`same-cpu-crypt`, `submit-from-crypt-cpus`).
    pub same_cpu_crypt: bool,
    pub submit_from_crypt_cpus: bool,
}

impl ActivateFlags {
    fn to_crypt(self) -> CryptActivate {
        let mut f = CryptActivate::empty();
        if self.discard {
            f |= CryptActivate::ALLOW_DISCARDS;
        }
        if self.readonly {
            f |= CryptActivate::READONLY;
        }
        if self.no_read_workqueue {
            f |= CryptActivate::NO_READ_WORKQUEUE;
        }
        if self.no_write_workqueue {
            f |= CryptActivate::NO_WRITE_WORKQUEUE;
        }
        if self.same_cpu_crypt {
            f |= CryptActivate::SAME_CPU_CRYPT;
        }
        if self.submit_from_crypt_cpus {
            f |= CryptActivate::SUBMIT_FROM_CRYPT_CPUS;
        }
        f
    }
}

/// Whether the static binary's libgcrypt has this LUKS2 hash (gcrypt's names,
/// case-insensitively, as libcryptsetup maps them): SHA-1, SHA-2, SHA-3.
fn hash_supported(hash: &str) -> bool {
    matches!(
        hash.to_ascii_lowercase().as_str(),
        "sha1"
            | "sha224"
            | "sha256"
            | "sha384"
            | "sha512"
            | "sha512-224"
            | "sha512-256"
            | "sha3-224"
            | "sha3-256"
            | "sha3-384"
            | "sha3-512"
    )
}

fn libc_eperm() -> i32 {
    rustix::io::Errno::PERM.raw_os_error()
}

fn libc_enoent() -> i32 {
    rustix::io::Errno::NOENT.raw_os_error()
}

/// Is the mapping `name` present?
pub fn is_active(name: &str) -> Result<bool, LuksError> {
    match libcryptsetup_rs::status(None, name) {
        Ok(CryptStatusInfo::Active) | Ok(CryptStatusInfo::Busy) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => {
            let err = op("querying the mapping")(e);
            need_device_mapper("querying the mapping", Path::new(DM_CONTROL))?;
            Err(err)
        }
    }
}

/// Remove the mapping `name`. dm-crypt wipes its copy of the key on removal.
pub fn close(name: &str) -> Result<(), LuksError> {
    let mut dev =
        CryptInit::init_by_name_and_header(name, None).map_err(op("finding the mapping"))?;
    dev.activate_handle()
        .deactivate(name, CryptDeactivate::empty())
        .map_err(op("closing the mapping"))
}

/// Open `device` as `name` with a passphrase (the supervisor's unlock path, and the
/// boot fallback).
pub fn open_with_passphrase(device: &str, name: &str, passphrase: &[u8]) -> Result<(), LuksError> {
    let mut vault = Vault::open(device)?;
    let (vk, _) = vault.volume_key(None, passphrase)?;
    vault.activate(name, &vk, ActivateFlags::default())
}

/// LUKS2 UUID from the first bytes of a device, if it carries a LUKS2 header.
pub fn header_uuid(head: &[u8]) -> Option<String> {
    const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
    if head.len() < 208 || &head[..6] != MAGIC || head[6..8] != [0, 2] {
        return None;
    }
    let raw = &head[168..208];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    std::str::from_utf8(&raw[..end]).ok().map(str::to_string)
}

/// Resolve `vault.device`: a path, or `UUID=<luks uuid>` found by scanning block
/// devices (an initramfs may have no udev to make /dev/disk/by-uuid). Waits up to
/// `timeout` for the device to appear.
pub fn resolve_device(spec: &str, timeout: std::time::Duration) -> Result<String, LuksError> {
    let start = std::time::Instant::now();
    loop {
        let found = match spec.strip_prefix("UUID=") {
            None => Path::new(spec).exists().then(|| spec.to_string()),
            Some(uuid) => find_by_uuid(uuid),
        };
        if let Some(dev) = found {
            return Ok(dev);
        }
        if start.elapsed() >= timeout {
            return Err(LuksError::Open {
                device: spec.to_string(),
                msg: format!("not found within {} s", timeout.as_secs()),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn find_by_uuid(uuid: &str) -> Option<String> {
    let by_uuid = format!("/dev/disk/by-uuid/{uuid}");
    if Path::new(&by_uuid).exists() {
        return Some(by_uuid);
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.into_iter().map(|n| format!("/dev/{n}")).find(|dev| {
        let mut head = [0u8; 4096];
        std::fs::File::open(dev)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .ok()
            .and_then(|()| header_uuid(&head))
            .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hashes_the_static_libgcrypt_has() {
        for h in ["sha1", "SHA256", "sha512", "sha3-256", "sha384"] {
            assert!(hash_supported(h), "{h}");
        }
        for h in [
            "whirlpool",
            "ripemd160",
            "blake2b-512",
            "sm3",
            "stribog512",
            "",
        ] {
            assert!(!hash_supported(h), "{h}");
        }
    }

    #[test]
    fn crypttab_flags_become_libcryptsetup_activation_flags() {
        let all = ActivateFlags {
            discard: true,
            readonly: true,
            no_read_workqueue: true,
            no_write_workqueue: true,
            same_cpu_crypt: true,
            submit_from_crypt_cpus: true,
        };
        let f = all.to_crypt();
        for (i, want) in [
            CryptActivate::ALLOW_DISCARDS,
            CryptActivate::READONLY,
            CryptActivate::NO_READ_WORKQUEUE,
            CryptActivate::NO_WRITE_WORKQUEUE,
            CryptActivate::SAME_CPU_CRYPT,
            CryptActivate::SUBMIT_FROM_CRYPT_CPUS,
        ]
        .into_iter()
        .enumerate()
        {
            assert!(f.contains(want), "flag {i} missing: {:#x}", f.bits());
        }
        assert_eq!(ActivateFlags::default().to_crypt().bits(), 0);
    }

    #[test]
    fn a_missing_device_mapper_is_named_as_such() {
        let e = need_device_mapper("activating the mapping", Path::new("/nonexistent/control"))
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("no device-mapper") && m.contains("modprobe dm_mod"),
            "{m}"
        );
        assert!(!m.contains("in use"), "{m}");
        // A node with no driver behind it (a container's static /dev) opens with
        // ENODEV; a permission problem is not a missing driver.
        assert!(no_driver(&std::io::Error::from_raw_os_error(
            rustix::io::Errno::NODEV.raw_os_error()
        )));
        assert!(!no_driver(&std::io::Error::from_raw_os_error(
            rustix::io::Errno::ACCESS.raw_os_error()
        )));
        // The null device opens: that is a driver, whatever it is.
        assert!(need_device_mapper("x", Path::new("/dev/null")).is_ok());
    }

    #[test]
    fn a_non_utf8_log_line_is_kept_not_fatal() {
        let msg = b"Device /dev/disk/by-label/vault\xff\xfe is not a valid LUKS device.\0";
        // SAFETY: a NUL-terminated message valid for the call, as libcryptsetup
        // passes; the user pointer is unused.
        unsafe {
            log_callback(
                libcryptsetup_rs_sys::CRYPT_LOG_ERROR as c_int,
                msg.as_ptr().cast(),
                std::ptr::null_mut(),
            )
        };
        let last = LAST_LOG.lock().unwrap().take().unwrap();
        assert!(
            last.starts_with("Device /dev/disk/by-label/vault"),
            "{last}"
        );
        assert!(last.ends_with("is not a valid LUKS device."), "{last}");
        // A level libcryptsetup-rs has no variant for, and non-error levels, are
        // ignored rather than fatal.
        for level in [-3, 7, libcryptsetup_rs_sys::CRYPT_LOG_NORMAL as c_int] {
            // SAFETY: as above.
            unsafe { log_callback(level, msg.as_ptr().cast(), std::ptr::null_mut()) };
        }
        assert!(LAST_LOG.lock().unwrap().is_none());
    }
}
