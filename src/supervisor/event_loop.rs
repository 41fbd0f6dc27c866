//! The supervisor's single-threaded event loop: one `poll(2)` over the control
//! socket, its connections, a CLOCK_BOOTTIME timerfd holding the idle deadline,
//! the activity-file inotify, and stop/signal descriptors.
//!
//! Nothing here wakes up periodically: with no connection open the poll has no
//! timeout and only the timerfd (armed for the next warning or lock) can end it.
//! Every connection is non-blocking with its own buffers; a client that stalls
//! mid-line is cut off after `read_timeout`, so no client can delay the timer or
//! another client. The vault sequences themselves (stop services, unmount, KDF)
//! run inline: they are the vault's own work and are bounded by their tools.
//!
//! Connection slots are the one thing other local users can exhaust, so they are
//! rationed by who is asking (see [`admit`]): a uid that neither `control.allow`
//! nor `control.grants` gives a command is answered once and closed at accept
//! (unless a usable bearer token exists, which any uid may present); one non-root uid holds at most a
//! quarter of `max_clients`; all non-root uids together leave [`root_reserve`]
//! slots that only root can use. A connection's deadline is renewed only by a
//! request it was allowed to run: denied or malformed lines are answered but do not
//! keep a slot alive.
//!
//! A connection that sends `{"cmd":"watch"}` becomes a watcher: it gets every
//! event line the machine produces ([`Machine::take_events`], fanned out after
//! each wake-up), has no read deadline (so watchers add no wake-ups), gives back
//! its request slot (watchers are bounded by [`MAX_WATCHERS`] instead), and is
//! dropped once [`WATCH_QUEUE_BYTES`] wait for it unsent: a reader that does not
//! keep up costs neither memory nor time. A connection's close tells the machine,
//! which releases the inhibitors it took without `keep`.
//!
//! The socket's directory is part of its security: whoever can write it can put
//! their own listener where clients look for ours. [`bind`] creates missing
//! directories with a fixed mode whatever the umask and refuses one that anyone
//! but its owner (root or us) can write, and names the uid and pid of another
//! user's listener found on the path.

use super::activity::ActivityWatch;
use super::backend::VaultBackend;
use super::machine::{Machine, Now, Settings};
use super::{log_info, log_warn, SupervisorError};
use crate::config::Config;
use crate::control::framing::{Framed, LineBuffer};
use crate::control::protocol::{parse_request_with_token, ProtocolError, Response};
use crate::control::{peer_of, Peer};
use rustix::event::{PollFd, PollFlags};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Knobs that are not configuration: paths for tests and the test hook for
/// sub-minute auto-lock timeouts.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_file: PathBuf,
    /// Test hook: overrides `vault.auto_lock_timeout` (which is whole minutes).
    pub auto_lock_override: Option<Duration>,
    /// Overrides `vault.lock_warning` (the `locking_soon` window).
    pub warn_before: Option<Duration>,
    /// A connection must complete each request line within this time.
    pub read_timeout: Duration,
    pub max_clients: usize,
    /// Hand the program image's pages back once, when the loop first waits
    /// ([`crate::secret::release_image_pages`]): `vaultguard supervise` sets it;
    /// in-process tests leave their test binary alone.
    pub release_image_when_idle: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            state_file: super::state_file::DEFAULT_PATH.into(),
            auto_lock_override: None,
            warn_before: None,
            read_timeout: Duration::from_secs(10),
            max_clients: 256,
            release_image_when_idle: false,
        }
    }
}

/// Pending output beyond which a connection is not read from until it drains.
const MAX_PENDING_OUT: usize = 64 * 1024;
/// Connections accepted per wake-up, so a flood cannot starve the rest.
const ACCEPT_BATCH: usize = 64;
/// How long to look for a client's next request after answering, before sleeping.
const BUSY_SPIN: Duration = Duration::from_micros(50);
const ZERO: rustix::time::Timespec = rustix::time::Timespec {
    tv_sec: 0,
    tv_nsec: 0,
};

struct Conn {
    /// Names the connection to the machine (its inhibitors go when it closes).
    id: u64,
    stream: UnixStream,
    peer: Peer,
    input: LineBuffer,
    out: Vec<u8>,
    /// `u64::MAX` for a watcher: it may stay silent for ever.
    deadline: u64,
    closing: bool,
    dead: bool,
    /// Sent `{"cmd":"watch"}`: gets every event line from now on.
    watching: bool,
    /// A watcher whose peer ended its input (half-close, as `nc -N` or socat do
    /// after the request): nothing more is read, the stream goes on, and a hang-up
    /// alone (the peer closed for good) ends it.
    input_done: bool,
    /// The `seq` of a watcher's first line: it gets only events after it (those
    /// made earlier in the same turn of the loop are already in that line).
    watch_from: u64,
}

/// A watcher whose unsent lines exceed this is dropped: a reader that does not
/// keep up must not make the supervisor hold (or slow down for) its backlog.
/// 64 KiB is some 256 event lines.
pub const WATCH_QUEUE_BYTES: usize = 64 * 1024;
/// Watchers in all. A watcher gives back its request slot (`max_clients`), so
/// dashboards cannot starve commands; these are bounded on their own. Each costs
/// a descriptor and a few hundred bytes while its queue is empty.
pub const MAX_WATCHERS: usize = 2048;
/// Watchers one non-root uid may hold.
pub const MAX_WATCHERS_PER_UID: usize = MAX_WATCHERS / 8;
/// The last watchers are root's: eight uids at their share must not leave the
/// administrator without a stream (as the request slots keep a root reserve).
pub const ROOT_WATCH_RESERVE: usize = 16;

/// The watchers open, counted once per wake-up and kept up to date as
/// connections turn into watchers.
struct WatchCount {
    total: usize,
    by_uid: BTreeMap<u32, usize>,
}

impl WatchCount {
    fn of(conns: &[Conn]) -> WatchCount {
        let mut w = WatchCount {
            total: 0,
            by_uid: BTreeMap::new(),
        };
        for c in conns.iter().filter(|c| c.watching && !c.dead) {
            w.total += 1;
            *w.by_uid.entry(c.peer.uid).or_insert(0) += 1;
        }
        w
    }

    /// May `uid` open one more? Root is held only to the total; the others
    /// leave it [`ROOT_WATCH_RESERVE`].
    fn admits(&self, uid: u32) -> bool {
        if uid == 0 {
            return self.total < MAX_WATCHERS;
        }
        self.total < MAX_WATCHERS - ROOT_WATCH_RESERVE
            && self.by_uid.get(&uid).copied().unwrap_or(0) < MAX_WATCHERS_PER_UID
    }

    fn add(&mut self, uid: u32) {
        self.total += 1;
        *self.by_uid.entry(uid).or_insert(0) += 1;
    }
}

/// Stops a running supervisor from another thread, and counts its wake-ups.
#[derive(Clone)]
pub struct Handle {
    stop: Arc<OwnedFd>,
    wakeups: Arc<AtomicU64>,
}

impl Handle {
    pub fn stop(&self) {
        let _ = rustix::io::write(&*self.stop, &1u64.to_ne_bytes());
    }

    /// How many times the event loop has woken up.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

pub struct Supervisor {
    machine: Machine,
    listener: UnixListener,
    socket_path: PathBuf,
    socket_id: (u64, u64),
    timer: OwnedFd,
    timer_armed: Option<u64>,
    stop: Arc<OwnedFd>,
    extra_stop: Option<OwnedFd>,
    watch: Option<ActivityWatch>,
    conns: Vec<Conn>,
    next_conn_id: u64,
    opts: Options,
    wakeups: Arc<AtomicU64>,
    accept_paused_until: u64,
}

/// The clocks: CLOCK_BOOTTIME (suspend counts as idle) and wall time.
pub fn now() -> Now {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Now {
        mono_ms: t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000,
        wall_ms: crate::audit::now_ms(),
    }
}

/// Connections one non-root uid may hold at once.
pub fn per_uid_limit(max_clients: usize) -> usize {
    (max_clients / 4).max(1)
}

/// Slots that non-root peers together can never take, so that root can always
/// run `status` or `lock` (32 of the default 256). There is no admin role yet;
/// when there is, it shares this reserve.
pub fn root_reserve(max_clients: usize) -> usize {
    (max_clients / 8).clamp(1, max_clients)
}

/// Why a new connection is refused at accept, if it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `control.allow` grants this uid nothing: holding a slot would serve no one.
    NoCommand,
    /// Every slot this peer may use is taken.
    Full,
    /// This non-root uid holds its whole share.
    UidShare,
}

/// May a peer of `uid` that may run some command (`may_run_any`) take a slot,
/// given the uids of the connections already open? Pure policy, unit tested.
pub fn admit(
    uid: u32,
    may_run_any: bool,
    open_uids: impl Iterator<Item = u32>,
    max_clients: usize,
) -> Result<(), Refusal> {
    if !may_run_any {
        return Err(Refusal::NoCommand);
    }
    let (mut total, mut non_root, mut same) = (0usize, 0usize, 0usize);
    for u in open_uids {
        total += 1;
        if u != 0 {
            non_root += 1;
        }
        if u == uid {
            same += 1;
        }
    }
    if total >= max_clients {
        return Err(Refusal::Full);
    }
    if uid == 0 {
        return Ok(());
    }
    if non_root >= max_clients.saturating_sub(root_reserve(max_clients)) {
        return Err(Refusal::Full);
    }
    if same >= per_uid_limit(max_clients) {
        return Err(Refusal::UidShare);
    }
    Ok(())
}

fn sys_err(what: &'static str, e: rustix::io::Errno) -> SupervisorError {
    SupervisorError::Sys {
        what,
        err: e.into(),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Supervisor {
    /// Bind the control socket, derive the state from `backend`, prepare the timer.
    pub fn new(
        cfg: &Config,
        backend: Box<dyn VaultBackend>,
        opts: Options,
    ) -> Result<Supervisor, SupervisorError> {
        // The configuration was validated at load; a policy error here means it
        // was built by hand, and is refused the same way. Both before the socket
        // is bound, so that a refused start leaves nothing behind.
        let policy = crate::control::roles::Policy::from_config(&cfg.control)
            .map_err(|e| SupervisorError::Access(e.to_string()))?;
        crate::control::tokens::check_roles(&cfg.control.tokens_file, |r| policy.has_role(r))
            .map_err(SupervisorError::Access)?;
        let socket_path = cfg.control.socket.clone();
        let listener = bind(&socket_path)?;
        let meta = std::fs::metadata(&socket_path).map_err(|err| SupervisorError::Socket {
            path: socket_path.clone(),
            err,
        })?;
        let timer = rustix::time::timerfd_create(
            rustix::time::TimerfdClockId::Boottime,
            rustix::time::TimerfdFlags::NONBLOCK | rustix::time::TimerfdFlags::CLOEXEC,
        )
        .map_err(|e| sys_err("timerfd_create", e))?;
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
        )
        .map_err(|e| sys_err("eventfd", e))?;
        let watch = match &cfg.vault.activity_file {
            Some(p) => match ActivityWatch::new(p) {
                Ok(w) => Some(w),
                Err(e) => {
                    log_warn(&format!("activity file {} not watched: {e}", p.display()));
                    None
                }
            },
            None => None,
        };
        let settings = Settings::from_config(
            cfg,
            &opts.state_file,
            opts.auto_lock_override,
            opts.warn_before
                .unwrap_or(Duration::from_secs(cfg.vault.lock_warning)),
        );
        let machine = Machine::start(settings, backend, now()).with_access(
            policy,
            &cfg.control.tokens_file,
            cfg.metrics.textfile_dir.as_deref(),
        );
        log_info(&format!("control socket {}", socket_path.display()));
        let mut machine = machine;
        if let Some(n) = super::notify::Notifier::from_env() {
            machine.notify_ready(n);
        }
        Ok(Supervisor {
            machine,
            listener,
            socket_path,
            socket_id: (meta.dev(), meta.ino()),
            timer,
            timer_armed: None,
            stop: Arc::new(stop),
            extra_stop: None,
            watch,
            conns: Vec::new(),
            next_conn_id: 1,
            opts,
            wakeups: Arc::new(AtomicU64::new(0)),
            accept_paused_until: 0,
        })
    }

    pub fn handle(&self) -> Handle {
        Handle {
            stop: self.stop.clone(),
            wakeups: self.wakeups.clone(),
        }
    }

    /// Also stop when `fd` becomes readable (a signalfd for SIGTERM/SIGINT).
    pub fn stop_on(mut self, fd: OwnedFd) -> Self {
        self.extra_stop = Some(fd);
        self
    }

    /// Serve until stopped. The vault is left as it is: stopping the supervisor
    /// is not a reason to lock or unlock.
    pub fn run(mut self) -> Result<(), SupervisorError> {
        let mut served = false;
        let mut image_released = !self.opts.release_image_when_idle;
        loop {
            self.arm_timer()?;
            let t = now();
            let timeout = self.poll_timeout(t.mono_ms);
            let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.conns.len() + 5);
            fds.push(PollFd::new(&*self.stop, PollFlags::IN));
            fds.push(PollFd::new(&self.timer, PollFlags::IN));
            let extra_idx = self.extra_stop.as_ref().map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::IN));
                fds.len() - 1
            });
            let watch_fd = self.watch.as_ref().map(|w| w.fd());
            let watch_idx = watch_fd.as_ref().map(|fd| {
                fds.push(PollFd::new(fd, PollFlags::IN));
                fds.len() - 1
            });
            let listen_idx = (t.mono_ms >= self.accept_paused_until).then(|| {
                fds.push(PollFd::new(&self.listener, PollFlags::IN));
                fds.len() - 1
            });
            let first_conn = fds.len();
            for c in &self.conns {
                let ev = if !c.out.is_empty() {
                    PollFlags::OUT
                } else if c.closing || c.input_done {
                    // Not IN: a socket at end of input is always readable.
                    PollFlags::empty()
                } else {
                    PollFlags::IN
                };
                fds.push(PollFd::new(&c.stream, ev));
            }
            let ts = timeout.map(|ms| rustix::time::Timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000) as i64,
            });
            // Right after an answer the same client usually sends its next request
            // within microseconds: look for it briefly before sleeping, which saves
            // a wake-up (an inter-processor interrupt, tens of microseconds on a VM)
            // per request on a busy socket. Only after serving: idle stays idle.
            let mut ready_now = 0;
            if served {
                let until = Instant::now() + BUSY_SPIN;
                while ready_now == 0 && Instant::now() < until {
                    ready_now = rustix::event::poll(&mut fds, Some(&ZERO)).unwrap_or(0);
                }
            }
            if ready_now == 0 && !image_released {
                // Start-up is over the first time the loop waits: what it touched
                // (configuration, audit import, the first publish, sd_notify) need
                // not stay resident for hours. Once, never on a timer.
                crate::secret::release_image_pages();
                image_released = true;
            }
            let polled = if ready_now > 0 {
                Ok(ready_now)
            } else {
                rustix::event::poll(&mut fds, ts.as_ref())
            };
            match polled {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(SupervisorError::Sys {
                        what: "poll",
                        err: e.into(),
                    })
                }
            }
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            let ready = |i: usize| !fds[i].revents().is_empty();
            let stop = ready(0) || extra_idx.is_some_and(ready);
            let timer = ready(1);
            let watch = watch_idx.is_some_and(ready);
            let listen = listen_idx.is_some_and(ready);
            let conn_ready: Vec<PollFlags> =
                fds[first_conn..].iter().map(|f| f.revents()).collect();
            drop(fds);

            if stop {
                break;
            }
            if timer {
                let mut buf = [0u8; 8];
                let _ = rustix::io::read(&self.timer, &mut buf);
                // Always re-arm after an expiry, even for the same deadline.
                self.timer_armed = None;
                self.machine.on_timer(now());
            }
            if watch {
                let advanced = self.watch.as_mut().is_some_and(|w| w.drain());
                if advanced {
                    self.machine.activity(now());
                }
            }
            let mut busy_ms = 0;
            served = false;
            let mut watchers = WatchCount::of(&self.conns);
            for (i, rev) in conn_ready.into_iter().enumerate() {
                if rev.is_empty() {
                    continue;
                }
                let c = &mut self.conns[i];
                if rev.intersects(PollFlags::ERR | PollFlags::NVAL)
                    || (c.input_done && rev.contains(PollFlags::HUP))
                {
                    c.dead = true;
                    continue;
                }
                if rev.contains(PollFlags::OUT) {
                    flush(c);
                }
                if rev.intersects(PollFlags::IN | PollFlags::HUP) {
                    busy_ms += serve(c, &mut self.machine, &self.opts, &mut watchers);
                    served = true;
                }
            }
            if listen {
                self.accept();
            }
            self.expire(busy_ms);
            self.fan_out();
            self.reap();
        }
        self.shutdown();
        Ok(())
    }

    fn arm_timer(&mut self) -> Result<(), SupervisorError> {
        let want = self.machine.next_wakeup();
        if want == self.timer_armed {
            return Ok(());
        }
        let value = match want {
            // An all-zero it_value disarms, so a real deadline is at least 1 ns.
            Some(ms) => rustix::time::Timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000).max(1) as i64,
            },
            None => rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
        };
        rustix::time::timerfd_settime(
            &self.timer,
            rustix::time::TimerfdTimerFlags::ABSTIME,
            &rustix::time::Itimerspec {
                it_interval: rustix::time::Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: value,
            },
        )
        .map_err(|e| SupervisorError::Sys {
            what: "timerfd_settime",
            err: e.into(),
        })?;
        self.timer_armed = want;
        Ok(())
    }

    /// Give every watcher the machine's new event lines. A watcher whose queue
    /// would pass [`WATCH_QUEUE_BYTES`] is dropped, never waited for.
    fn fan_out(&mut self) {
        let lines = self.machine.take_events();
        if lines.is_empty() {
            return;
        }
        let first = (self.machine.seq() + 1).saturating_sub(lines.len() as u64);
        for c in self.conns.iter_mut().filter(|c| c.watching && !c.dead) {
            let skip = (c.watch_from + 1).saturating_sub(first) as usize;
            for l in lines.iter().skip(skip) {
                if c.out.len() + l.len() > WATCH_QUEUE_BYTES {
                    log_warn(&format!(
                        "watcher (uid {}, pid {}) does not read its events: dropped with {} \
                         bytes unsent",
                        c.peer.uid,
                        c.peer.pid,
                        c.out.len()
                    ));
                    c.out.clear();
                    c.dead = true;
                    break;
                }
                c.out.extend_from_slice(l);
            }
            if !c.dead {
                flush(c);
            }
        }
    }

    /// Drop closed connections; the machine releases what they held.
    fn reap(&mut self) {
        if !self.conns.iter().any(|c| c.dead) {
            return;
        }
        let (dead, live): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut self.conns)
            .into_iter()
            .partition(|c| c.dead);
        self.conns = live;
        for c in dead {
            self.machine.disconnected(c.id, now());
        }
        // Releasing may itself be an event (and change the deadline).
        self.fan_out();
        if self.conns.iter().any(|c| c.dead) {
            self.reap();
        }
    }

    /// Milliseconds until the earliest connection deadline; `None` (sleep until an
    /// event) when no connection is open or only watchers are.
    fn poll_timeout(&self, now_ms: u64) -> Option<u64> {
        let conn = self
            .conns
            .iter()
            .map(|c| c.deadline)
            .filter(|&d| d != u64::MAX)
            .min();
        let paused = (self.accept_paused_until > now_ms).then_some(self.accept_paused_until);
        let next = match (conn, paused) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(next.saturating_sub(now_ms))
    }

    fn accept(&mut self) {
        let t = now();
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the listener stays readable, so back off
                    // instead of spinning.
                    log_warn(&format!("accept on the control socket failed: {e}"));
                    self.accept_paused_until = t.mono_ms + 250;
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            // Who is asking comes first: whether a slot is free depends on it.
            let peer = match peer_of(&stream) {
                Ok(p) => p,
                Err(e) => {
                    log_warn(&e.to_string());
                    continue;
                }
            };
            let may_run_any = self.machine.may_connect(&peer);
            let admitted = admit(
                peer.uid,
                may_run_any,
                self.conns
                    .iter()
                    .filter(|c| !c.watching)
                    .map(|c| c.peer.uid),
                self.opts.max_clients,
            );
            if let Err(refusal) = admitted {
                // One line into an empty socket buffer, then closed (dropped).
                let err = match refusal {
                    Refusal::NoCommand => ProtocolError::NoCommandAllowed { uid: peer.uid },
                    Refusal::Full => ProtocolError::TooManyConnections,
                    Refusal::UidShare => ProtocolError::TooManyConnectionsFromUid { uid: peer.uid },
                };
                let _ = send(&stream, &Response::failed(&err.to_string(), None).to_line());
                continue;
            }
            let id = self.next_conn_id;
            self.next_conn_id += 1;
            self.conns.push(Conn {
                id,
                watching: false,
                input_done: false,
                watch_from: 0,
                stream,
                peer,
                input: LineBuffer::new(),
                out: Vec::new(),
                deadline: t.mono_ms + ms(self.opts.read_timeout),
                closing: false,
                dead: false,
            });
        }
    }

    /// Cut off connections past their deadline. `busy_ms` (time spent inside vault
    /// sequences this round) is credited to everyone first: waiting for us is not
    /// stalling.
    fn expire(&mut self, busy_ms: u64) {
        let t = now();
        for c in &mut self.conns {
            if c.watching {
                continue;
            }
            c.deadline = c.deadline.saturating_add(busy_ms);
            if c.dead || t.mono_ms < c.deadline {
                continue;
            }
            if !c.closing {
                let line = Response::failed(&ProtocolError::Timeout.to_string(), None).to_line();
                c.out.extend_from_slice(&line);
                flush(c);
            }
            c.input.clear();
            c.dead = true;
        }
    }

    fn shutdown(&mut self) {
        self.conns.clear();
        self.machine.stopping();
        // Only remove the socket if it is still ours (not a newer supervisor's).
        if let Ok(m) = std::fs::symlink_metadata(&self.socket_path) {
            if (m.dev(), m.ino()) == self.socket_id {
                let _ = std::fs::remove_file(&self.socket_path);
            }
        }
        log_info("supervisor stopped; the vault is left as it is");
    }
}

/// Read what the connection has, answer every complete line. Returns the time
/// spent inside the machine (vault sequences).
fn serve(c: &mut Conn, machine: &mut Machine, opts: &Options, watchers: &mut WatchCount) -> u64 {
    let mut busy = 0;
    for _ in 0..16 {
        if c.closing || c.dead || c.input_done || c.out.len() > MAX_PENDING_OUT {
            break;
        }
        match c.input.read_from(&c.stream) {
            Ok(0) => {
                // End of input: a last request without its newline is still
                // answered, then the connection closes once the answer is out.
                if !c.input.is_empty() {
                    c.input.extend(b"\n");
                    busy += answer_lines(c, machine, opts, watchers);
                }
                c.input.clear();
                if c.watching {
                    // A half-close says "no more requests", not "stop the events".
                    c.input_done = true;
                    break;
                }
                c.closing = true;
                c.deadline = now().mono_ms + ms(opts.read_timeout);
            }
            Ok(_) => busy += answer_lines(c, machine, opts, watchers),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                c.dead = true;
                break;
            }
        }
        flush(c);
    }
    flush(c);
    busy
}

/// Answer every complete line in the connection's buffer. Only a request the peer
/// may run renews its deadline: an answer to a denied or malformed line is not
/// progress, or one such line every few seconds would hold a slot for ever.
fn answer_lines(
    c: &mut Conn,
    machine: &mut Machine,
    opts: &Options,
    watchers: &mut WatchCount,
) -> u64 {
    let mut busy = 0;
    while c.out.len() <= MAX_PENDING_OUT {
        // A watcher's lines get one error each: the connection is a stream now,
        // and it stays one (its queue bound drops it if it floods itself).
        if c.watching {
            let framed = c
                .input
                .next_line(|line| !line.iter().all(u8::is_ascii_whitespace));
            match framed {
                None => break,
                Some(Framed::TooLong) => {
                    c.input.clear();
                    c.closing = true;
                    let r = Response::failed(&ProtocolError::LineTooLong.to_string(), None);
                    c.out.extend_from_slice(&r.to_line());
                    break;
                }
                Some(Framed::Line(false)) => continue,
                Some(Framed::Line(true)) => {
                    let r = Response::failed(&ProtocolError::Watching.to_string(), None);
                    c.out.extend_from_slice(&r.to_line());
                    continue;
                }
            }
        }
        let framed = c.input.next_line(|line| {
            if line.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Some(parse_request_with_token(line))
            }
        });
        let response = match framed {
            None => break,
            Some(Framed::TooLong) => {
                c.input.clear();
                c.closing = true;
                // Whatever it carried (a 1 MiB token, a passphrase) was not read.
                machine.oversized(&c.peer, now());
                Response::failed(&ProtocolError::LineTooLong.to_string(), None)
            }
            Some(Framed::Line(None)) => continue,
            Some(Framed::Line(Some(Err(e)))) => machine.malformed(&c.peer, &e.to_string(), now()),
            Some(Framed::Line(Some(Ok((crate::control::protocol::Request::Watch, _)))))
                if !watchers.admits(c.peer.uid) =>
            {
                Response::failed(
                    &ProtocolError::TooManyWatchers { uid: c.peer.uid }.to_string(),
                    None,
                )
            }
            Some(Framed::Line(Some(Ok((req, token))))) => {
                // The machine identifies, authorises and rate-limits once; it says
                // whether the request ran, which is what counts as progress.
                let watch = matches!(req, crate::control::protocol::Request::Watch);
                let before = now();
                let (r, allowed) = machine.request(c.id, &c.peer, token, req, before);
                let after = now();
                busy += after.mono_ms.saturating_sub(before.mono_ms);
                if allowed {
                    c.deadline = after.mono_ms + ms(opts.read_timeout);
                }
                if watch && r.succeeded() {
                    c.watching = true;
                    c.watch_from = machine.seq();
                    c.deadline = u64::MAX;
                    watchers.add(c.peer.uid);
                }
                r
            }
        };
        c.out.extend_from_slice(&response.to_line());
        if c.closing {
            break;
        }
    }
    busy
}

fn flush(c: &mut Conn) {
    while !c.out.is_empty() {
        match send(&c.stream, &c.out) {
            Ok(n) => {
                c.out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                c.dead = true;
                return;
            }
        }
    }
    if c.closing {
        c.dead = true;
    }
}

fn send(fd: impl AsFd, data: &[u8]) -> io::Result<usize> {
    rustix::net::send(
        fd,
        data,
        rustix::net::SendFlags::NOSIGNAL | rustix::net::SendFlags::DONTWAIT,
    )
    .map_err(io::Error::from)
}

/// Mode of the directories created for the socket. Not 0700: users whom
/// `control.allow` grants a command must traverse it to reach the socket (whose
/// mode is 0666, peer credentials decide); 0755 still lets nobody but the owner
/// add, remove or replace anything in it.
pub const SOCKET_DIR_MODE: u32 = 0o755;

/// Bind the control socket: refuse a directory that others could use to replace
/// it, name another user's listener found on the path, refuse if another
/// supervisor answers on it, replace a stale one. Mode 0666: who may do what is
/// decided by peer credentials, and refused clients get a clear answer instead of
/// a bare EACCES.
fn bind(path: &Path) -> Result<UnixListener, SupervisorError> {
    let err = |err| SupervisorError::Socket {
        path: path.to_path_buf(),
        err,
    };
    let refuse = |msg: String| err(io::Error::new(io::ErrorKind::PermissionDenied, msg));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    create_dirs(dir, SOCKET_DIR_MODE).map_err(err)?;
    let me = rustix::process::geteuid().as_raw();
    let live = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => listener_on(path),
        Ok(_) => {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            )))
        }
        Err(_) => Listener::None,
    };
    // Another user's listener first: that is what the operator must hear about,
    // and a directory that let it in is refused just below anyway.
    if let Listener::Held(holder) = &live {
        if holder.uid != 0 && holder.uid != me {
            return Err(refuse(format!(
                "is held by a listener of uid {} (pid {}), not by root or this supervisor's \
                 uid {me}: another user is squatting the control socket's path. Stop that \
                 process (`ps -o user,pid,args -p {}`), remove the socket, and keep {} \
                 writable only by root",
                holder.uid,
                holder.pid,
                holder.pid,
                dir.display()
            )));
        }
    }
    check_socket_dir(dir, me).map_err(refuse)?;
    match live {
        Listener::Held(holder) => {
            log_warn(&format!(
                "{} is served by pid {} (uid {})",
                path.display(),
                holder.pid,
                holder.uid
            ));
            return Err(SupervisorError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        Listener::Unidentified(why) => {
            return Err(refuse(format!(
                "a socket is there and who holds it cannot be read ({why}); refusing to \
                 replace it: find its owner with `ss -xlp` and stop it, or remove it"
            )))
        }
        Listener::Stale => std::fs::remove_file(path).map_err(err)?,
        Listener::None => {}
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// What answers on an existing socket path.
enum Listener {
    None,
    /// Nobody listens: a leftover of a supervisor that did not stop cleanly.
    Stale,
    /// A live listener, as the kernel recorded it when it called listen(2).
    Held(Peer),
    /// Someone may listen but no connection (and so no credentials) could be had
    /// without waiting on it (its queue is full) or at all.
    Unidentified(String),
}

/// Connect without blocking (a squatter must not stall our start) and read who
/// listens. Nothing is sent.
fn listener_on(path: &Path) -> Listener {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let unknown = |e: rustix::io::Errno| Listener::Unidentified(io::Error::from(e).to_string());
    let addr = match SocketAddrUnix::new(path) {
        Ok(a) => a,
        Err(e) => return unknown(e),
    };
    let fd = match rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(e) => return unknown(e),
    };
    match rustix::net::connect(&fd, &addr) {
        Ok(()) => match peer_of(&fd) {
            Ok(p) => Listener::Held(p),
            Err(e) => Listener::Unidentified(e.to_string()),
        },
        Err(rustix::io::Errno::CONNREFUSED) => Listener::Stale,
        Err(rustix::io::Errno::NOENT) => Listener::None,
        Err(rustix::io::Errno::AGAIN) => {
            Listener::Unidentified("it listens but accepts no connection: queue full".into())
        }
        Err(e) => unknown(e),
    }
}

/// Create `dir` and its missing parents with exactly `mode`: mkdir's mode is
/// narrowed by the umask and, with umask 000, a default 0777 would let anyone
/// replace the socket; so each directory this creates is chmod-ed after mkdir.
/// Directories that already exist are left to [`check_socket_dir`].
fn create_dirs(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    for d in missing.into_iter().rev() {
        if d.as_os_str().is_empty() {
            continue;
        }
        match std::fs::DirBuilder::new().mode(mode).create(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))?,
            // Someone else created it meanwhile: not ours to chmod; checked later.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// May the socket live in `dir`? Whoever can write the directory can replace the
/// socket with their own, so: owned by root or by us (`me`), writable by its owner
/// only; and every directory above it owned by root or us and not writable by
/// others unless sticky (as /tmp is), so that `dir` itself cannot be swapped.
/// The error names the directory and what to do.
fn check_socket_dir(dir: &Path, me: u32) -> Result<(), String> {
    let shown = dir.display();
    let real = std::fs::canonicalize(dir).map_err(|e| format!("its directory {shown}: {e}"))?;
    let resolved = if real == dir {
        String::new()
    } else {
        format!(" (resolves to {})", real.display())
    };
    let meta = std::fs::metadata(&real).map_err(|e| format!("its directory {shown}: {e}"))?;
    let (mode, owner) = (meta.mode() & 0o7777, meta.uid());
    if owner != 0 && owner != me {
        return Err(format!(
            "its directory {shown}{resolved} is owned by uid {owner}, not by root or this \
             supervisor's uid {me}: its owner could replace the socket. Use a directory \
             owned by root (`chown root: {shown}`), such as the default /run/vaultguard"
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "its directory {shown}{resolved} (mode {mode:04o}) is writable by users other \
             than its owner: any of them could put their own listener where clients look \
             for the supervisor. Make it writable by its owner only (`chmod go-w {shown}`) \
             or use the default /run/vaultguard"
        ));
    }
    for a in real.ancestors().skip(1) {
        let m = std::fs::metadata(a).map_err(|e| format!("{}: {e}", a.display()))?;
        let (amode, aowner) = (m.mode() & 0o7777, m.uid());
        if aowner != 0 && aowner != me {
            return Err(format!(
                "{} above its directory {shown} is owned by uid {aowner}, who could \
                 replace {shown}: use a directory whose parents belong to root",
                a.display()
            ));
        }
        if amode & 0o022 != 0 && amode & 0o1000 == 0 {
            return Err(format!(
                "{} above its directory {shown} (mode {amode:04o}) is writable by others \
                 without the sticky bit, so {shown} could be replaced: `chmod go-w {}`",
                a.display(),
                a.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attack: eight uids allowed `watch` open their 256 watchers each; the
    /// 2048 were full and root could not watch at all. Root keeps a reserve.
    #[test]
    fn eight_uids_at_their_watcher_share_leave_root_its_reserve() {
        let mut w = WatchCount {
            total: 0,
            by_uid: BTreeMap::new(),
        };
        for uid in 1000..1008 {
            while w.admits(uid) {
                w.add(uid);
            }
        }
        assert_eq!(w.total, MAX_WATCHERS - ROOT_WATCH_RESERVE);
        assert_eq!(w.by_uid[&1000], MAX_WATCHERS_PER_UID);
        assert!(!w.admits(1009), "a ninth uid got into root's reserve");
        for _ in 0..ROOT_WATCH_RESERVE {
            assert!(w.admits(0));
            w.add(0);
        }
        assert!(!w.admits(0), "the total bound holds for root too");
    }

    fn admit_with(uid: u32, open: &[u32], max: usize) -> Result<(), Refusal> {
        admit(uid, true, open.iter().copied(), max)
    }

    #[test]
    fn a_peer_allowed_nothing_gets_no_slot_even_when_all_are_free() {
        assert_eq!(
            admit(1000, false, [].into_iter(), 256),
            Err(Refusal::NoCommand)
        );
    }

    #[test]
    fn four_users_with_full_shares_leave_the_root_reserve() {
        let max = 256;
        assert_eq!((per_uid_limit(max), root_reserve(max)), (64, 32));
        let mut open = Vec::new();
        for uid in 60001..=60004u32 {
            while admit_with(uid, &open, max).is_ok() {
                open.push(uid);
            }
        }
        // Three full shares, the fourth stopped by the reserve.
        assert_eq!(open.len(), max - 32);
        assert_eq!(open.iter().filter(|&&u| u == 60004).count(), 32);
        assert_eq!(admit_with(60005, &open, max), Err(Refusal::Full));
        // Root takes the reserve, and then nobody gets more.
        for _ in 0..32 {
            assert_eq!(admit_with(0, &open, max), Ok(()));
            open.push(0);
        }
        assert_eq!(admit_with(0, &open, max), Err(Refusal::Full));
    }

    #[test]
    fn one_uid_is_held_to_its_share() {
        let open = vec![1000; 64];
        assert_eq!(admit_with(1000, &open, 256), Err(Refusal::UidShare));
        assert_eq!(admit_with(1001, &open, 256), Ok(()));
        // Tiny limits still leave root one slot and each uid one.
        assert_eq!(admit_with(1000, &[], 1), Err(Refusal::Full));
        assert_eq!(admit_with(0, &[], 1), Ok(()));
        assert_eq!(admit_with(1000, &[], 8), Ok(()));
        assert_eq!(admit_with(1000, &[1000, 1000], 8), Err(Refusal::UidShare));
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_parent_others_can_write_is_refused_unless_sticky() {
        let t = crate::testutil::TmpDir::new("sockdir");
        chmod(&t, 0o755);
        let shared = t.join("shared");
        let dir = shared.join("vg");
        std::fs::create_dir_all(&dir).unwrap();
        chmod(&dir, 0o755);
        let me = rustix::process::geteuid().as_raw();
        // Like /tmp: others may write, but only the owner may rename `vg` away.
        chmod(&shared, 0o1777);
        assert_eq!(check_socket_dir(&dir, me), Ok(()));
        chmod(&shared, 0o777);
        let e = check_socket_dir(&dir, me).unwrap_err();
        assert!(e.contains(&shared.display().to_string()), "{e}");
        assert!(e.contains("without the sticky bit"), "{e}");
        // The socket's own directory gets no sticky exception.
        chmod(&shared, 0o755);
        chmod(&dir, 0o1777);
        let e = check_socket_dir(&dir, me).unwrap_err();
        assert!(e.contains("mode 1777"), "{e}");
    }

    #[test]
    fn a_symlinked_directory_is_judged_by_its_target() {
        let t = crate::testutil::TmpDir::new("sockdir-link");
        chmod(&t, 0o755);
        let real = t.join("real");
        std::fs::create_dir(&real).unwrap();
        chmod(&real, 0o777);
        let link = t.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = check_socket_dir(&link, rustix::process::geteuid().as_raw()).unwrap_err();
        assert!(e.contains("resolves to"), "{e}");
        assert!(e.contains("mode 0777"), "{e}");
    }
}
