//! Secret buffers, the kernel RNG, and process hardening.
//!
//! Every secret in the process (sealed secret, volume key, passphrase, PIN) lives in
//! a [`SecretBytes`]: a fixed-capacity, mlock'ed buffer that is zeroized before its
//! memory is released and that has no `Debug`/`Display` which could print it. This
//! module never logs, stores or compares secrets in a way that leaks timing.
//!
//! Memory locks are per page and do not nest (one `munlock` undoes any number of
//! `mlock`s), while small secrets share pages with each other. So pages are locked
//! through a process-wide count of the live secrets on each: a page is unlocked
//! only when the last secret on it is dropped.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use zeroize::Zeroize;

/// A secret byte string. Its capacity is fixed at creation so the buffer is never
/// reallocated (which would leave an un-wiped copy behind).
pub struct SecretBytes {
    buf: Vec<u8>,
    locked: bool,
}

impl SecretBytes {
    /// An empty secret that can grow up to `cap` bytes without reallocating.
    pub fn with_capacity(cap: usize) -> SecretBytes {
        let buf = Vec::with_capacity(cap.max(1));
        let locked = lock_region(buf.as_ptr(), buf.capacity());
        SecretBytes { buf, locked }
    }

    /// Copy `bytes` into a new secret. The caller still owns (and must wipe) its copy.
    pub fn from_slice(bytes: &[u8]) -> SecretBytes {
        let mut s = SecretBytes::with_capacity(bytes.len());
        s.buf.extend_from_slice(bytes);
        s
    }

    /// Take ownership of `v`; its buffer is locked and will be wiped on drop.
    pub fn from_vec(v: Vec<u8>) -> SecretBytes {
        let locked = lock_region(v.as_ptr(), v.capacity());
        SecretBytes { buf: v, locked }
    }

    /// A secret of `len` zero bytes, to be filled in place (e.g. by a C library).
    pub fn zeroed(len: usize) -> SecretBytes {
        let mut s = SecretBytes::with_capacity(len);
        s.buf.resize(len, 0);
        s
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Append one byte; refuses (returns false) instead of reallocating.
    pub fn push(&mut self, b: u8) -> bool {
        if self.buf.len() == self.buf.capacity() {
            return false;
        }
        self.buf.push(b);
        true
    }

    /// Drop the last byte (wiping it).
    pub fn pop(&mut self) -> bool {
        match self.buf.last_mut() {
            Some(last) => {
                *last = 0;
                self.buf.pop();
                true
            }
            None => false,
        }
    }

    /// Shorten to `len` bytes, wiping what is cut off.
    pub fn truncate(&mut self, len: usize) {
        if len < self.buf.len() {
            self.buf[len..].zeroize();
            self.buf.truncate(len);
        }
    }

    /// Compare with another secret in time independent of where they differ.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        if self.buf.len() != other.len() {
            return false;
        }
        let diff = self
            .buf
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl Clone for SecretBytes {
    fn clone(&self) -> Self {
        SecretBytes::from_slice(&self.buf)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // Wipe the whole capacity: bytes past len may hold earlier contents.
        let cap = self.buf.capacity();
        self.buf.resize(cap, 0);
        self.buf.zeroize();
        if self.locked {
            unlock_region(self.buf.as_ptr(), cap);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.buf.len())
    }
}

/// Per page (by page number): how many live secrets lie on it, and whether the
/// page is locked.
static PAGES: Mutex<BTreeMap<usize, PageUse>> = Mutex::new(BTreeMap::new());

struct PageUse {
    secrets: usize,
    locked: bool,
}

fn page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| n.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Page numbers that `[ptr, ptr + len)` touches.
fn pages_of(ptr: *const u8, len: usize) -> std::ops::RangeInclusive<usize> {
    let size = page_size();
    let start = ptr as usize;
    (start / size)..=((start + len - 1) / size)
}

fn mlock_page(page: usize) -> bool {
    let size = page_size();
    // SAFETY: the page holds (part of) a live allocation of the caller; mlock
    // neither reads nor writes it, it only pins it in RAM. Failure
    // (RLIMIT_MEMLOCK) is tolerated: the buffer is still wiped on drop, and core
    // dumps are disabled by `harden_process`.
    unsafe { rustix::mm::mlock((page * size) as *mut std::ffi::c_void, size).is_ok() }
}

fn munlock_page(page: usize) {
    let size = page_size();
    // SAFETY: the page was locked by `mlock_page` for a secret that has just been
    // wiped, and no live secret lies on it any more (its count dropped to zero);
    // munlock does not touch its contents.
    let _ = unsafe { rustix::mm::munlock((page * size) as *mut std::ffi::c_void, size) };
}

/// Count a new secret on every page of its buffer, locking pages that are not
/// locked yet. Returns whether the buffer was registered (it must then be
/// unregistered exactly once, by `unlock_region`); whether the lock took is
/// visible in /proc/self/smaps, not here.
fn lock_region(ptr: *const u8, len: usize) -> bool {
    if len == 0 {
        return false;
    }
    // A poisoned map is still a consistent map: every update below is complete
    // before anything that could panic.
    let mut pages = PAGES.lock().unwrap_or_else(|e| e.into_inner());
    for page in pages_of(ptr, len) {
        let entry = pages.entry(page).or_insert(PageUse {
            secrets: 0,
            locked: false,
        });
        entry.secrets += 1;
        if !entry.locked {
            entry.locked = mlock_page(page);
        }
    }
    true
}

/// Uncount a dropped secret; pages with no live secret left are unlocked.
fn unlock_region(ptr: *const u8, len: usize) {
    if len == 0 {
        return;
    }
    let mut pages = PAGES.lock().unwrap_or_else(|e| e.into_inner());
    for page in pages_of(ptr, len) {
        let Some(entry) = pages.get_mut(&page) else {
            continue;
        };
        entry.secrets -= 1;
        if entry.secrets == 0 {
            if entry.locked {
                munlock_page(page);
            }
            pages.remove(&page);
        }
    }
}

/// Fill `buf` from the kernel RNG (getrandom(2), blocking until it is seeded).
/// In an early initramfs the first call may block and a signal may interrupt it
/// (EINTR), or hand back fewer bytes than asked: both are retried here, so a
/// caller gets either a full buffer of random bytes or an error, never a buffer
/// left partly zero.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    fill_random_with(buf, |b| {
        rustix::rand::getrandom(b, rustix::rand::GetRandomFlags::empty())
            .map_err(std::io::Error::from)
    })
}

/// `fill_random` over any getrandom-like source (tests inject failures).
pub fn fill_random_with(
    buf: &mut [u8],
    mut source: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match source(&mut buf[filled..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "getrandom returned no bytes",
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Keep secrets out of core dumps and away from ptrace by other users: no core
/// files, not dumpable. Called first thing by every command that handles a secret.
pub fn harden_process() {
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    );
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
}

/// Read-only mappings of this program's own file (code and constants), from
/// /proc/self/maps: `(address, length)`.
fn own_image_mappings() -> Vec<(usize, usize)> {
    let exe = std::fs::read_link("/proc/self/exe").ok();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3)?;
            if perms.starts_with("rw") || exe.as_deref() != Some(std::path::Path::new(path)) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            let a = usize::from_str_radix(a, 16).ok()?;
            let b = usize::from_str_radix(b, 16).ok()?;
            Some((a, b - a))
        })
        .collect()
}

/// Hand the program's code and constants back to the page cache: for a process
/// about to sleep for hours, what start-up touched need not stay resident; pages
/// it runs later come back on first use, one at a time (no read-ahead or
/// fault-around, which would map up to 64 KiB around each: the binary is 5.5 MiB
/// and the supervisor's steady state uses a small part of it).
pub fn release_image_pages() {
    use rustix::mm::{madvise, Advice};
    for (addr, len) in own_image_mappings() {
        let addr = addr as *mut std::ffi::c_void;
        // SAFETY: advice on mappings this process owns; the pages are clean
        // file-backed ones and fault back in unchanged.
        let _ = unsafe { madvise(addr, len, Advice::Random) };
        let _ = unsafe { madvise(addr, len, Advice::LinuxPageOut) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_does_not_print_the_secret() {
        let s = SecretBytes::from_slice(b"hunter2");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains("7 bytes"));
    }

    #[test]
    fn push_refuses_to_reallocate() {
        let mut s = SecretBytes::with_capacity(2);
        let cap = s.capacity();
        for _ in 0..cap {
            assert!(s.push(b'x'));
        }
        assert!(!s.push(b'y'));
        assert_eq!(s.len(), cap);
        assert!(s.pop());
        assert_eq!(s.len(), cap - 1);
    }

    /// `Locked:` (kB) of the mapping holding `addr`, from /proc/self/smaps.
    fn locked_kb_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("Locked:") {
                    return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    /// The body of `dropping_one_secret_keeps_a_shared_page_locked`, run in a
    /// process of its own: memory locks are per process, and other tests' secrets
    /// would lock and unlock pages in the same mappings meanwhile.
    #[test]
    #[ignore = "run in its own process by dropping_one_secret_keeps_a_shared_page_locked"]
    fn shared_page_probe() {
        let page = |s: &SecretBytes| s.as_bytes().as_ptr() as usize / page_size();
        // Two small secrets on one page (the allocator places them side by side;
        // if a pair straddles a page boundary, the next pair does not).
        let mut spare = Vec::new();
        let (a, b) = loop {
            let a = SecretBytes::from_slice(b"first secret");
            let b = SecretBytes::from_slice(b"second secret");
            if page(&a) == page(&b) {
                break (a, b);
            }
            spare.push(a);
            spare.push(b);
        };
        let addr = b.as_bytes().as_ptr() as usize;
        let before = locked_kb_at(addr);
        assert!(before > 0, "the secrets' page is not locked at all");
        drop(a);
        assert_eq!(
            locked_kb_at(addr),
            before,
            "dropping one secret unlocked a page another live secret uses"
        );
        drop(b);
        drop(spare);
        assert!(
            locked_kb_at(addr) < before,
            "the page stayed locked after its last secret was dropped"
        );
    }

    #[test]
    fn dropping_one_secret_keeps_a_shared_page_locked() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "secret::tests::shared_page_probe",
                "--ignored",
                "--test-threads=1",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn random_fill_retries_interruptions_and_short_reads_and_reports_failure() {
        // EINTR twice, then short reads: the buffer ends up fully written.
        let mut calls = 0;
        let mut buf = [0u8; 32];
        fill_random_with(&mut buf, |b| {
            calls += 1;
            if calls <= 2 {
                return Err(std::io::Error::from_raw_os_error(4)); // EINTR
            }
            let n = b.len().min(5);
            b[..n].fill(0xa5);
            Ok(n)
        })
        .unwrap();
        assert_eq!(buf, [0xa5; 32]);
        assert_eq!(calls, 2 + 7);
        // Any other error is the caller's, not a zero-filled buffer.
        let e = fill_random_with(&mut [0u8; 32], |_| {
            Err(std::io::Error::from_raw_os_error(38)) // ENOSYS
        })
        .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(38));
        // The real thing.
        let mut a = [0u8; 32];
        fill_random(&mut a).unwrap();
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn constant_time_compare() {
        let s = SecretBytes::from_slice(b"abc");
        assert!(s.ct_eq(b"abc"));
        assert!(!s.ct_eq(b"abd"));
        assert!(!s.ct_eq(b"ab"));
    }

    #[test]
    fn harden_makes_process_undumpable() {
        // Run in a child so the test harness itself is unaffected.
        let pid = unsafe { libc_fork() };
        if pid == 0 {
            harden_process();
            let ok = rustix::process::dumpable_behavior().ok()
                == Some(rustix::process::DumpableBehavior::NotDumpable)
                && rustix::process::getrlimit(rustix::process::Resource::Core).current == Some(0);
            std::process::exit(if ok { 0 } else { 1 });
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0)
        );
    }

    unsafe fn libc_fork() -> i32 {
        // SAFETY: the child only calls async-signal-safe syscalls and exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => 0,
            nix::unistd::ForkResult::Parent { child } => child.as_raw(),
        }
    }
}
