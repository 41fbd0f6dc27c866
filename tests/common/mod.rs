//! Shared host-test fixtures: a software TPM (swtpm on loopback TCP, fresh copy of
//! a pristine state per test), LUKS2 images in files, and temporary directories.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A fresh temporary directory (the `tempfile` crate), removed when dropped
/// (`None`: a placeholder that owns nothing).
pub struct TempDir(pub PathBuf, Option<tempfile::TempDir>);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let t = tempfile::Builder::new()
            .prefix(&format!("vg-test-{tag}-"))
            .tempdir()
            .expect("a temporary directory");
        TempDir(t.path().to_path_buf(), Some(t))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// A manufactured TPM state with sha1 and sha256 PCR banks, as on most machines.
fn pristine_state() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One per test process, and nothing runs at a process's exit to remove it:
        // those of processes that have ended are removed here instead.
        if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("vg-pristine-tpm-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let d = std::env::temp_dir().join(format!("vg-pristine-tpm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        run(Command::new("swtpm_setup")
            .args([
                "--tpm2",
                "--pcr-banks",
                "sha1,sha256",
                "--overwrite",
                "--tpmstate",
            ])
            .arg(&d)
            .stdout(Stdio::null()));
        d
    })
}

pub struct Swtpm {
    child: Child,
    pub state: TempDir,
    pub port: u16,
}

/// Listeners on two adjacent loopback ports (the swtpm TCTI's data and control
/// channels), and the first port.
pub fn port_pair() -> (TcpListener, TcpListener, u16) {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000 {
            if let Ok(c) = TcpListener::bind(("127.0.0.1", p + 1)) {
                return (l, c, p);
            }
        }
    }
}

/// A port pair that was free a moment ago (swtpm binds it itself; its caller
/// checks that swtpm got it).
fn free_port_pair() -> u16 {
    port_pair().2
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`
/// (/proc/net/tcp's inode for the port, among /proc/PID/fd's sockets).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    let Some(inode) = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
    }) else {
        return false;
    };
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == want))
}

impl Swtpm {
    /// A fresh copy of the pristine TPM, listening on loopback.
    pub fn start() -> Swtpm {
        let state = TempDir::new("tpm");
        for entry in std::fs::read_dir(pristine_state()).unwrap() {
            let e = entry.unwrap();
            std::fs::copy(e.path(), state.path().join(e.file_name())).unwrap();
        }
        Swtpm::start_in(state)
    }

    /// Power-cycle: the process restarts on the same state, as a reboot does
    /// (PCRs reset, persistent objects and DA counters kept).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let state = std::mem::replace(&mut self.state, TempDir(PathBuf::new(), None));
        let fresh = Swtpm::start_in(state);
        let old = std::mem::replace(self, fresh);
        drop(old);
    }

    fn start_in(state: TempDir) -> Swtpm {
        for _ in 0..20 {
            let port = free_port_pair();
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init", "--tpmstate"])
                .arg(format!("dir={}", state.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm must be installed (qemu-tests/setup-host.sh)");
            let start = Instant::now();
            let mut child = child;
            // The port was free when chosen, but another test's swtpm may have
            // taken it since (this one then fails to bind and exits): a connection
            // is not proof enough, the listening socket must be our child's.
            while start.elapsed() < Duration::from_secs(5) {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                if listens_on(child.id(), port) && listens_on(child.id(), port + 1) {
                    let mut s = Swtpm { child, state, port };
                    s.tool("tpm2_startup", &["-c"]);
                    return s;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut c = child;
            let _ = c.kill();
            let _ = c.wait();
        }
        panic!("swtpm did not start");
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Run a tpm2-tools command against this TPM; panics on failure.
    pub fn tool(&mut self, tool: &str, args: &[&str]) -> Output {
        run(Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti()))
    }

    /// Same, returning the output whatever the status.
    pub fn tool_status(&mut self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap()
    }
}

/// A TCP relay in front of a swtpm that records every TPM command sent through
/// it (the swtpm TCTI's data channel carries bare TPM commands; its control
/// channel, one port up, is relayed unread).
pub struct TpmRecorder {
    port: u16,
    log: CommandLog,
}

/// One recorded command: its code and the first two words after the header (its
/// first handles, for commands that have them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpmCommand {
    pub code: u32,
    pub handle: Option<u32>,
    pub handle2: Option<u32>,
}

impl TpmCommand {
    pub fn name(&self) -> &'static str {
        match self.code {
            0x144 => "Startup",
            0x157 => "Load",
            0x15E => "Unseal",
            0x165 => "FlushContext",
            0x16B => "PolicyAuthValue",
            0x173 => "ReadPublic",
            0x176 => "StartAuthSession",
            0x17A => "GetCapability",
            0x17E => "PCR_Read",
            0x17F => "PolicyPCR",
            0x182 => "PCR_Extend",
            0x167 => "LoadExternal",
            0x177 => "VerifySignature",
            0x16A => "PolicyAuthorize",
            0x149 => "PolicyNV",
            0x14E => "NV_Read",
            0x134 => "NV_Increment",
            0x169 => "NV_ReadPublic",
            _ => "other",
        }
    }
}

impl TpmRecorder {
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The commands recorded so far, and forget them.
    pub fn take(&self) -> Vec<TpmCommand> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

type CommandLog = std::sync::Arc<std::sync::Mutex<Vec<TpmCommand>>>;

fn relay(listener: TcpListener, to: u16, log: Option<CommandLog>) {
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                return;
            };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            // Either side closing closes the other: swtpm serves one connection
            // per channel at a time.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let log = log.clone();
            std::thread::spawn(move || {
                match &log {
                    Some(log) => forward_commands(&mut client, &mut server, log),
                    None => drop(std::io::copy(&mut client, &mut server)),
                }
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

/// Relay whole TPM commands (tag, size, code, then handles and parameters),
/// noting each one's code and first handle.
fn forward_commands(
    client: &mut std::net::TcpStream,
    server: &mut std::net::TcpStream,
    log: &CommandLog,
) {
    use std::io::{Read, Write};
    let mut head = [0u8; 10];
    while client.read_exact(&mut head).is_ok() {
        let size = u32::from_be_bytes(head[2..6].try_into().unwrap()) as usize;
        let mut command = head.to_vec();
        command.resize(size.max(10), 0);
        if client.read_exact(&mut command[10..]).is_err() {
            return;
        }
        log.lock().unwrap().push(TpmCommand {
            code: u32::from_be_bytes(head[6..10].try_into().unwrap()),
            handle: command
                .get(10..14)
                .map(|h| u32::from_be_bytes(h.try_into().unwrap())),
            handle2: command
                .get(14..18)
                .map(|h| u32::from_be_bytes(h.try_into().unwrap())),
        });
        // In one write: swtpm takes what one read returns for the whole command.
        if server.write_all(&command).is_err() {
            return;
        }
    }
}

impl Swtpm {
    /// A recording relay to this TPM (see `TpmRecorder`).
    pub fn recorder(&self) -> TpmRecorder {
        let (data, ctrl, port) = port_pair();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        relay(data, self.port, Some(log.clone()));
        relay(ctrl, self.port + 1, None);
        TpmRecorder { port, log }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `cmd` with `input` on its standard input; panics with its stderr if it fails.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A LUKS2 image in a file with `passphrase` in keyslot 0 (cheap KDF for tests).
pub fn luks_image(dir: &Path, passphrase: &str) -> PathBuf {
    luks_image_with(dir, "vault.img", passphrase, &[])
}

/// [`luks_image`] named `name`, with `extra` luksFormat options (e.g. `--hash`).
pub fn luks_image_with(dir: &Path, name: &str, passphrase: &str, extra: &[&str]) -> PathBuf {
    let img = dir.join(name);
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    run_with_input(
        Command::new("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks2",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
            ])
            .args(extra)
            .args(["--key-file", "-"])
            .arg(&img),
        passphrase.as_bytes(),
    );
    img
}

/// A loop device over an image file, detached on drop. Unlike the file itself, a
/// block device can be made read-only under an open descriptor (BLKROSET), which
/// is how tests make one header write fail in the middle of an operation.
pub struct LoopDevice {
    pub path: String,
}

impl LoopDevice {
    pub fn attach(img: &Path) -> LoopDevice {
        let out = run(Command::new("losetup").args(["--find", "--show"]).arg(img));
        LoopDevice {
            path: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }

    /// Writes to the device fail with EPERM while it is read-only.
    pub fn set_readonly(&self, ro: bool) {
        run(Command::new("blockdev")
            .arg(if ro { "--setro" } else { "--setrw" })
            .arg(&self.path));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("blockdev")
            .args(["--setrw", &self.path])
            .status();
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// The path of the built vaultguard binary (for CLI tests).
pub fn vaultguard_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vaultguard"))
}

// ---------------------------------------------------------------- boot flows

/// The TPM options of a test: swtpm's TCTI, the phase PCR latch on.
pub fn tpm_opts(sw: &Swtpm) -> vaultguard::boot::TpmOptions {
    vaultguard::boot::TpmOptions {
        tcti: sw.tcti(),
        timeout: Duration::from_secs(5),
        phase_pcr: Some(15),
        signature: None,
    }
}

/// An enrolment of `img` as `vaultguard enroll` makes it by default.
pub fn enroll_opts(sw: &Swtpm, img: &Path) -> vaultguard::boot::EnrollOptions {
    vaultguard::boot::EnrollOptions {
        device: img.display().to_string(),
        name: "secure-ai-vault".into(),
        tpm: tpm_opts(sw),
        bank: vaultguard::tpm::policy::Bank::Sha256,
        pcrs: vec![0, 2, 4, 7],
        pin: false,
        recovery_key: false,
        tries: 3,
        audit_nv_index: Some(vaultguard::tpm::nv::DEFAULT_AUDIT_NV_INDEX),
        signed: None,
    }
}

/// The boot unlock of `img` by TPM (then key file or prompt).
pub fn unlock_opts(sw: &Swtpm, img: &Path) -> vaultguard::boot::UnlockOptions {
    vaultguard::boot::UnlockOptions {
        name: "secure-ai-vault".into(),
        device: img.display().to_string(),
        tpm: Some(tpm_opts(sw)),
        tries: 3,
        keyfile: None,
        flags: vaultguard::luks::ActivateFlags::default(),
        crypttab: Default::default(),
    }
}

// ---------------------------------------------------------------- control socket

/// Read up to and excluding the first newline; `None` on EOF, reset or timeout.
pub fn read_line(s: &mut std::os::unix::net::UnixStream) -> Option<String> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return None,
            Ok(_) if b[0] == b'\n' => return Some(String::from_utf8(out).unwrap()),
            Ok(_) => out.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// True once the peer has closed (EOF or reset) within `within`.
pub fn closed_within(s: &mut std::os::unix::net::UnixStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A fresh private key made by openssl (the tool operators use), as PEM.
pub fn openssl_key(dir: &Path, kind: &str) -> Vec<u8> {
    let path = dir.join(format!("{kind}.pem"));
    let args: &[&str] = match kind {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    };
    let out = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&path)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&path).unwrap()
}

/// A signed enrolment as the library makes it, for the swtpm tests: sealed to
/// `key` over PCR 9 (signed) + PCR 7 and the phase PCR 15 (literal), with
/// `policy_ref` (empty, or a revocable enrolment's counter name) and the record
/// that unlock reads (`file` as its signature file). Returns it and the secret.
pub fn signed_enrolment(
    tpm: &mut vaultguard::tpm::Tpm,
    key: &vaultguard::tpm::signed::PolicyKey,
    pin: Option<&[u8]>,
    counter: Option<u32>,
    file: vaultguard::tpm::signed::SignatureFile,
) -> (vaultguard::tpm::SealedObject, Vec<u8>) {
    use vaultguard::tpm::policy::Bank;
    use vaultguard::tpm::{PrimaryAlg, SealRequest, SealedObject, SignedPolicy};
    let policy_ref = counter
        .map(vaultguard::tpm::counter::counter_name)
        .unwrap_or_default();
    let sealed = tpm
        .seal_signed(
            &SealRequest {
                bank: Bank::Sha256,
                pcrs: &[7],
                phase_pcr: Some(15),
                pin,
            },
            Some(key),
            &policy_ref,
        )
        .expect("seal to a signed policy");
    let object = SealedObject {
        blob: sealed.blob.clone(),
        pcrs: vec![7, 15],
        bank: Bank::Sha256,
        primary_alg: PrimaryAlg::Ecc,
        policy_hash: sealed.policy_hash.clone(),
        pin: pin.is_some(),
        salt: sealed.salt.clone(),
        srk: Some(sealed.srk.clone()),
        pcr_values: Some(sealed.pcr_values.iter().cloned().collect()),
        signed: Some(SignedPolicy {
            key: key.clone(),
            pcrs: vec![9],
            signatures: Ok(file),
            source: "the test's signature file".into(),
            counter,
        }),
    };
    (object, sealed.secret.as_bytes().to_vec())
}

/// A systemd-measure style signature (no revocation counter) of the live values
/// of `pcrs`, as `policy sign` makes it.
pub fn sign_live(
    tpm: &mut vaultguard::tpm::Tpm,
    key: &vaultguard::tpm::signed::SigningKey,
    pcrs: &[u32],
) -> vaultguard::tpm::signed::SignatureEntry {
    use vaultguard::tpm::policy::Bank;
    let live = tpm.read_pcrs(Bank::Sha256, pcrs).unwrap();
    let pol = vaultguard::tpm::signed::approved_policy(Bank::Sha256, &live);
    vaultguard::tpm::signed::SignatureEntry {
        pcrs: pcrs.to_vec(),
        pkfp: key.public().fingerprint(),
        sig: key.sign(&pol).unwrap(),
        pol,
        counter: None,
        ticket: None,
    }
}

/// Boot a TCG event log into swtpm: every record that extends a PCR extends its
/// SHA-256 digest, as firmware and the EFI stub did when they wrote it.
pub fn replay_eventlog(sw: &mut Swtpm, log: &[u8]) {
    let log = vaultguard::tpm::eventlog::parse(log).unwrap();
    for e in log.events.iter().filter(|e| e.extends()) {
        let d = e.digest(vaultguard::tpm::policy::Bank::Sha256).unwrap();
        sw.tool(
            "tpm2_pcrextend",
            &[&format!(
                "{}:sha256={}",
                e.pcr,
                vaultguard::encoding::hex_encode(d)
            )],
        );
    }
}

/// Write `token` as LUKS2 token `id` of `img`, replacing what is there: an
/// offline header edit, as an attacker with the disk would make it.
pub fn import_token(img: &Path, id: u32, token: &serde_json::Value) {
    run_with_input(
        Command::new("cryptsetup")
            .args([
                "token",
                "import",
                "--token-replace",
                "--token-id",
                &id.to_string(),
            ])
            .arg(img),
        token.to_string().as_bytes(),
    );
}
