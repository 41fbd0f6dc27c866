//! Who may run which command, and how often: roles, grants, the per-request
//! decision, the per-identity rate limit, and the coalescing of the audit entries
//! those decisions produce.
//!
//! A role is a set of commands. Four are built in (`admin`: all; `operator`:
//! status, lock, unlock, keepalive, inhibit, release; `viewer`: status, watch;
//! `agent`: status, keepalive, inhibit, release); `control.roles` adds more.
//! `control.grants.<role>` gives a role to uids and gids (primary or
//! supplementary), and `control.allow.<command>` still grants single commands as
//! before: a peer may run the union. A bearer token (see [`super::tokens`]) carries
//! exactly one role, and then the peer's uid grants nothing. Root (uid 0, without a
//! token) may always run everything and is never rate limited, so that root can
//! always read the state and lock.
//!
//! Everything here is plain data and arithmetic over a millisecond clock passed in
//! (CLOCK_BOOTTIME at the caller): no I/O, no timers. Audit entries come back as
//! [`Note`]s for the supervisor's shell to append; this module never writes one.

use super::auth::Peer;
use crate::config::{Allow, ControlConfig, RateLimitConfig};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Every command a role can name, in a fixed order (the bit of a [`CommandSet`]).
pub const COMMANDS: [&str; 8] = [
    "status",
    "lock",
    "unlock",
    "keepalive",
    "watch",
    "inhibit",
    "release",
    "metrics",
];

/// The built-in roles and their commands.
pub const BUILTIN_ROLES: [(&str, &[&str]); 4] = [
    ("admin", &COMMANDS),
    (
        "operator",
        &[
            "status",
            "lock",
            "unlock",
            "keepalive",
            "inhibit",
            "release",
        ],
    ),
    ("viewer", &["status", "watch"]),
    ("agent", &["status", "keepalive", "inhibit", "release"]),
];

/// Rate limit of an identity whose roles configure none: generous for any real
/// client (a dashboard, an agent's keepalive), small enough that one identity
/// cannot keep the single-threaded supervisor busy.
pub const DEFAULT_RATE: RateLimitConfig = RateLimitConfig {
    rate: 100,
    burst: 200,
};

/// Same-kind audit entries of one identity are written at most this often; the
/// ones in between are counted into the next entry (`suppressed_since_last`).
pub const AUDIT_INTERVAL_MS: u64 = 60_000;

/// Identities tracked for coalescing and rate limits before idle ones are
/// forgotten (a bound on memory whatever connects).
const MAX_TRACKED: usize = 4096;

/// A set of commands, one bit per entry of [`COMMANDS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommandSet(u16);

impl CommandSet {
    pub const ALL: CommandSet = CommandSet((1 << COMMANDS.len()) - 1);

    fn bit(cmd: &str) -> Option<u16> {
        COMMANDS.iter().position(|c| *c == cmd).map(|i| 1 << i)
    }

    /// The set of `cmds`; `Err` names the first that is not a command.
    pub fn of<'a>(cmds: impl IntoIterator<Item = &'a str>) -> Result<CommandSet, String> {
        let mut s = CommandSet::default();
        for c in cmds {
            s.0 |= CommandSet::bit(c).ok_or_else(|| c.to_string())?;
        }
        Ok(s)
    }

    pub fn contains(self, cmd: &str) -> bool {
        CommandSet::bit(cmd).is_some_and(|b| self.0 & b != 0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: CommandSet) -> CommandSet {
        CommandSet(self.0 | other.0)
    }

    /// The command names, in [`COMMANDS`] order.
    pub fn names(self) -> Vec<&'static str> {
        COMMANDS
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, c)| *c)
            .collect()
    }
}

/// Who is asking: the name every audit entry and metric uses (`uid:1000`,
/// `token:ci-runner`, `uid:0` for root), what it may run and at what rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    /// The peer's uid (for a token client too): the key of its unlock lockout.
    pub uid: u32,
    pub pid: i32,
    /// The token's role, or the roles granted to the uid (comma-separated; empty
    /// when only `control.allow` grants it something).
    pub role: String,
    pub token: Option<String>,
    pub commands: CommandSet,
    /// `None`: not limited (root).
    pub limit: Option<RateLimitConfig>,
}

impl Identity {
    pub fn may(&self, cmd: &str) -> bool {
        self.commands.contains(cmd)
    }
}

/// A refused configuration: the key and what is wrong, for `ConfigError::Invalid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub field: String,
    pub msg: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration `{}`: {}", self.field, self.msg)
    }
}

/// The role table, grants and limits of one configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: BTreeMap<String, CommandSet>,
    grants: BTreeMap<String, Allow>,
    allow: BTreeMap<String, Allow>,
    limits: BTreeMap<String, RateLimitConfig>,
}

impl Policy {
    /// Build from `control`; every role named anywhere must exist, every custom
    /// role's command must be a command, and a custom role may not redefine a
    /// built-in one (a reader of `admin` must know what it means).
    pub fn from_config(c: &ControlConfig) -> Result<Policy, PolicyError> {
        let err = |field: String, msg: String| PolicyError { field, msg };
        let mut roles = BTreeMap::new();
        for (name, cmds) in BUILTIN_ROLES {
            let set = CommandSet::of(cmds.iter().copied())
                .map_err(|c| err(format!("control.roles.{name}"), format!("`{c}` unknown")))?;
            roles.insert(name.to_string(), set);
        }
        for (name, cmds) in &c.roles {
            if roles.contains_key(name) {
                return Err(err(
                    format!("control.roles.{name}"),
                    format!(
                        "`{name}` is a built-in role and cannot be redefined; choose another name"
                    ),
                ));
            }
            if !valid_name(name) {
                return Err(err(
                    format!("control.roles.{name}"),
                    "a role name is 1-64 characters from a-z, 0-9, `_` and `-`".into(),
                ));
            }
            let set = CommandSet::of(cmds.iter().map(String::as_str)).map_err(|c| {
                err(
                    format!("control.roles.{name}"),
                    format!(
                        "`{}` is not a command (one of {})",
                        c.escape_default(),
                        COMMANDS.join(", ")
                    ),
                )
            })?;
            roles.insert(name.clone(), set);
        }
        for role in c.grants.keys() {
            if !roles.contains_key(role) {
                return Err(err(
                    format!("control.grants.{role}"),
                    unknown_role(role, &roles),
                ));
            }
        }
        for role in c.rate_limit.keys() {
            if !roles.contains_key(role) {
                return Err(err(
                    format!("control.rate_limit.{role}"),
                    unknown_role(role, &roles),
                ));
            }
        }
        for (role, l) in &c.rate_limit {
            if l.rate > 0 && l.burst == 0 {
                return Err(err(
                    format!("control.rate_limit.{role}.burst"),
                    "must be at least 1 (or set `rate` to 0 for no limit)".into(),
                ));
            }
        }
        Ok(Policy {
            roles,
            grants: c.grants.clone(),
            allow: c.allow.clone(),
            limits: c.rate_limit.clone(),
        })
    }

    /// The commands of `role`, if it exists.
    pub fn role(&self, role: &str) -> Option<CommandSet> {
        self.roles.get(role).copied()
    }

    /// Does `role` exist? (For `token issue` and the token file.)
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains_key(role)
    }

    /// The role names, for messages.
    pub fn role_names(&self) -> Vec<&str> {
        self.roles.keys().map(String::as_str).collect()
    }

    fn limit_of(&self, role: &str) -> RateLimitConfig {
        self.limits.get(role).copied().unwrap_or(DEFAULT_RATE)
    }

    /// The identity of a peer that presented no token.
    pub fn for_peer(&self, peer: &Peer) -> Identity {
        if peer.uid == 0 {
            return Identity {
                name: "uid:0".into(),
                uid: 0,
                pid: peer.pid,
                role: "admin".into(),
                token: None,
                commands: CommandSet::ALL,
                limit: None,
            };
        }
        let matches = |a: &Allow| {
            a.uids.contains(&peer.uid)
                || a.gids.contains(&peer.gid)
                || peer.groups.iter().any(|g| a.gids.contains(g))
        };
        let mut commands = CommandSet::default();
        for (cmd, a) in &self.allow {
            if matches(a) {
                // Keys are checked at load; an unknown one grants nothing.
                commands = commands.union(CommandSet::of([cmd.as_str()]).unwrap_or_default());
            }
        }
        let mut roles = Vec::new();
        let mut limit: Option<RateLimitConfig> = None;
        for (role, a) in &self.grants {
            if matches(a) {
                commands = commands.union(self.role(role).unwrap_or_default());
                // Several roles: the most generous of their limits.
                let l = self.limit_of(role);
                limit = Some(match limit {
                    Some(m) => more_generous(m, l),
                    None => l,
                });
                roles.push(role.as_str());
            }
        }
        Identity {
            name: format!("uid:{}", peer.uid),
            uid: peer.uid,
            pid: peer.pid,
            role: roles.join(","),
            token: None,
            commands,
            limit: Some(limit.unwrap_or(DEFAULT_RATE)),
        }
    }

    /// The identity of a peer that presented the valid token `name` of `role`.
    /// A role that no longer exists (the configuration changed since the token
    /// was issued) grants nothing.
    pub fn for_token(&self, name: &str, role: &str, peer: &Peer) -> Identity {
        Identity {
            name: format!("token:{name}"),
            uid: peer.uid,
            pid: peer.pid,
            role: role.to_string(),
            token: Some(name.to_string()),
            commands: self.role(role).unwrap_or_default(),
            limit: Some(self.limit_of(role)),
        }
    }
}

fn unknown_role(role: &str, roles: &BTreeMap<String, CommandSet>) -> String {
    format!(
        "role `{}` does not exist (built in: admin, operator, viewer, agent; or define it under control.roles; known: {})",
        role.escape_default(),
        roles.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

/// Role and token names: short, printable in a log and a metric label as is.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn more_generous(a: RateLimitConfig, b: RateLimitConfig) -> RateLimitConfig {
    if a.rate == 0 || b.rate == 0 {
        return RateLimitConfig { rate: 0, burst: 0 };
    }
    RateLimitConfig {
        rate: a.rate.max(b.rate),
        burst: a.burst.max(b.burst),
    }
}

/// A token bucket refilled from the clock at each request: `burst` requests at
/// once, then `rate` per second. No timer ever runs for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    pub fn full(limit: RateLimitConfig, now_ms: u64) -> Bucket {
        Bucket {
            tokens: f64::from(limit.burst),
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, limit: RateLimitConfig, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64;
        self.tokens =
            (self.tokens + elapsed * f64::from(limit.rate) / 1000.0).min(f64::from(limit.burst));
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Take one request's token; `Err(seconds)` until one is back (at least 1).
    pub fn take(&mut self, limit: RateLimitConfig, now_ms: u64) -> Result<(), u64> {
        if limit.rate == 0 {
            return Ok(());
        }
        self.refill(limit, now_ms);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait_s = (1.0 - self.tokens) / f64::from(limit.rate);
        Err((wait_s.ceil() as u64).max(1))
    }

    fn is_full(&mut self, limit: RateLimitConfig, now_ms: u64) -> bool {
        self.refill(limit, now_ms);
        self.tokens >= f64::from(limit.burst)
    }
}

/// An audit value (the shell converts it to its own field type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Str(String),
    UInt(u64),
}

impl From<&str> for Val {
    fn from(s: &str) -> Self {
        Val::Str(s.to_string())
    }
}

impl From<u64> for Val {
    fn from(n: u64) -> Self {
        Val::UInt(n)
    }
}

/// One audit entry to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub event: &'static str,
    pub fields: Vec<(&'static str, Val)>,
    /// A line for the log, when the event is worth one.
    pub log: Option<String>,
}

/// The decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    RateLimited { retry_after: u64 },
}

/// Why a presented token was not accepted (the token itself is never kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Malformed,
    Unknown,
    Expired,
    Revoked,
    /// The token file cannot be read: no token can be checked.
    StoreUnreadable,
}

impl TokenRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRefusal::Malformed => "malformed",
            TokenRefusal::Unknown => "unknown",
            TokenRefusal::Expired => "expired",
            TokenRefusal::Revoked => "revoked",
            TokenRefusal::StoreUnreadable => "token_file_unreadable",
        }
    }
}

/// Per-identity, per-event: when the last entry was written, and how many since.
#[derive(Debug, Clone, Copy, Default)]
struct Coalesced {
    last_ms: u64,
    suppressed: u64,
}

/// The stateful side of the decision: rate-limit buckets and audit coalescing.
#[derive(Debug)]
pub struct Gate {
    policy: Policy,
    buckets: HashMap<String, (Bucket, RateLimitConfig)>,
    /// Identities inside a run of rate-limited requests (begun, not yet ended).
    limited: HashMap<String, u64>,
    /// Per event, per identity.
    coalesce: HashMap<&'static str, HashMap<String, Coalesced>>,
}

impl Gate {
    pub fn new(policy: Policy) -> Gate {
        Gate {
            policy,
            buckets: HashMap::new(),
            limited: HashMap::new(),
            coalesce: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Charge one request of `who` to its bucket: `Some(retry_after)` when it is
    /// over its limit. Also for a request whose token was refused, charged to
    /// the presenting uid (see `Machine::request`): a bad token is no way around
    /// the limit.
    pub fn throttle(
        &mut self,
        who: &Identity,
        cmd: &'static str,
        now_ms: u64,
    ) -> (Option<u64>, Vec<Note>) {
        let mut notes = Vec::new();
        if let Some(limit) = who.limit.filter(|l| l.rate > 0) {
            self.forget_idle(now_ms);
            // Looked up by reference: the common case allocates nothing.
            if !self.buckets.contains_key(&who.name) {
                self.buckets
                    .insert(who.name.clone(), (Bucket::full(limit, now_ms), limit));
            }
            let taken = match self.buckets.get_mut(&who.name) {
                Some((bucket, _)) => bucket.take(limit, now_ms),
                None => Ok(()),
            };
            if let Err(retry_after) = taken {
                let run = self.limited.entry(who.name.clone()).or_insert(0);
                *run += 1;
                if *run == 1 {
                    if let Some(suppressed) = self.coalesced(&who.name, "rate_limited", now_ms) {
                        notes.push(Note {
                            event: "rate_limited",
                            fields: with_identity(
                                who,
                                vec![
                                    ("cmd", cmd.into()),
                                    ("rate", u64::from(limit.rate).into()),
                                    ("burst", u64::from(limit.burst).into()),
                                    ("suppressed_since_last", suppressed.into()),
                                ],
                            ),
                            log: Some(format!(
                                "rate limiting {} ({} requests/s, burst {})",
                                who.name, limit.rate, limit.burst
                            )),
                        });
                    }
                } else {
                    // Inside a run: counted into the next `rate_limited` entry.
                    self.count_suppressed(&who.name, "rate_limited", now_ms);
                }
                return (Some(retry_after), notes);
            }
            self.limited.remove(&who.name);
        }
        (None, notes)
    }

    /// May `who` run `cmd` now? Every request is charged to its identity's
    /// bucket first, the ones it may not run too: a denied command costs the
    /// supervisor as much as an allowed one, and an identity flooding with
    /// commands its role lacks must be slowed like any other flood. Denials and
    /// the start of each run of rate-limited requests are audited (coalesced per
    /// identity, counts kept); an allowed `keepalive` (it postpones the
    /// auto-lock) is audited coalesced too.
    pub fn decide(
        &mut self,
        who: &Identity,
        cmd: &'static str,
        now_ms: u64,
    ) -> (Verdict, Vec<Note>) {
        let (limited, mut notes) = self.throttle(who, cmd, now_ms);
        if let Some(retry_after) = limited {
            return (Verdict::RateLimited { retry_after }, notes);
        }
        if !who.may(cmd) {
            if let Some(suppressed) = self.coalesced(&who.name, "permission_denied", now_ms) {
                notes.push(Note {
                    event: "permission_denied",
                    fields: with_identity(
                        who,
                        vec![
                            ("cmd", cmd.into()),
                            ("suppressed_since_last", suppressed.into()),
                        ],
                    ),
                    log: Some(format!(
                        "denied `{cmd}` to {} (uid {}, pid {})",
                        who.name, who.uid, who.pid
                    )),
                });
            }
            return (Verdict::Denied, notes);
        }

        if cmd == "keepalive" {
            if let Some(suppressed) = self.coalesced(&who.name, "keepalive", now_ms) {
                notes.push(Note {
                    event: "keepalive",
                    fields: with_identity(who, vec![("suppressed_since_last", suppressed.into())]),
                    log: None,
                });
            }
        }
        (Verdict::Allowed, notes)
    }

    /// A presented token was refused: the entry names the presenter (its uid) and
    /// the token's name when it is known, never the token.
    pub fn token_refused(
        &mut self,
        peer: &Peer,
        token_name: Option<&str>,
        why: TokenRefusal,
        now_ms: u64,
    ) -> Vec<Note> {
        let identity = match token_name {
            Some(n) => format!("token:{n}"),
            None => format!("uid:{}", peer.uid),
        };
        let key = format!("{identity}/{}", why.as_str());
        let Some(suppressed) = self.coalesced(&key, "token_refused", now_ms) else {
            return Vec::new();
        };
        let mut fields = vec![
            ("identity", Val::Str(identity.clone())),
            ("uid", u64::from(peer.uid).into()),
            ("pid", u64::try_from(peer.pid).unwrap_or(0).into()),
            ("reason", why.as_str().into()),
        ];
        fields.push(("suppressed_since_last", suppressed.into()));
        vec![Note {
            event: "token_refused",
            fields,
            log: Some(format!(
                "refused a {} token from uid {} (pid {}){}",
                why.as_str(),
                peer.uid,
                peer.pid,
                token_name
                    .map(|n| format!(": token `{n}`"))
                    .unwrap_or_default()
            )),
        }]
    }

    /// A request line over the length limit (a 1 MiB token, say): nothing of it
    /// was parsed, so the entry names the peer's uid only.
    pub fn oversized(&mut self, peer: &Peer, now_ms: u64) -> Vec<Note> {
        let identity = format!("uid:{}", peer.uid);
        let Some(suppressed) = self.coalesced(&identity, "request_too_long", now_ms) else {
            return Vec::new();
        };
        vec![Note {
            event: "request_too_long",
            fields: vec![
                ("identity", Val::Str(identity)),
                ("uid", u64::from(peer.uid).into()),
                ("pid", u64::try_from(peer.pid).unwrap_or(0).into()),
                ("suppressed_since_last", suppressed.into()),
            ],
            log: Some(format!(
                "refused a request line over {} bytes from uid {} (pid {})",
                crate::control::protocol::MAX_LINE,
                peer.uid,
                peer.pid
            )),
        }]
    }

    /// What was counted but not yet written: one entry per identity and event,
    /// so that a stop loses no count.
    pub fn flush(&mut self) -> Vec<Note> {
        let mut out: Vec<Note> = self
            .coalesce
            .iter()
            .flat_map(|(event, m)| m.iter().map(move |(who, c)| (who, event, c)))
            .filter(|(_, _, c)| c.suppressed > 0)
            .map(|(who, event, c)| Note {
                event: "suppressed_summary",
                fields: vec![
                    ("identity", Val::Str(who.clone())),
                    ("of_event", (*event).into()),
                    ("suppressed_since_last", c.suppressed.into()),
                ],
                log: None,
            })
            .collect();
        out.sort_by_key(|n| format!("{:?}", n.fields));
        for c in self.coalesce.values_mut().flat_map(|m| m.values_mut()) {
            c.suppressed = 0;
        }
        out
    }

    /// `Some(count suppressed since the last)`: write an entry now; `None`: count it.
    fn coalesced(&mut self, who: &str, event: &'static str, now_ms: u64) -> Option<u64> {
        let c = self.entry(who, event, now_ms);
        if c.last_ms != 0 && now_ms.saturating_sub(c.last_ms) < AUDIT_INTERVAL_MS {
            c.suppressed = c.suppressed.saturating_add(1);
            return None;
        }
        let suppressed = c.suppressed;
        *c = Coalesced {
            last_ms: now_ms.max(1),
            suppressed: 0,
        };
        Some(suppressed)
    }

    fn count_suppressed(&mut self, who: &str, event: &'static str, now_ms: u64) {
        let c = self.entry(who, event, now_ms);
        c.suppressed = c.suppressed.saturating_add(1);
    }

    /// The coalescing record of `who` for `event` (entries written more than an
    /// interval ago with nothing pending are forgotten once there are many).
    fn entry(&mut self, who: &str, event: &'static str, now_ms: u64) -> &mut Coalesced {
        let m = self.coalesce.entry(event).or_default();
        if !m.contains_key(who) {
            if m.len() >= MAX_TRACKED {
                m.retain(|_, c| {
                    c.suppressed > 0 || now_ms.saturating_sub(c.last_ms) < AUDIT_INTERVAL_MS
                });
            }
            m.insert(who.to_string(), Coalesced::default());
        }
        m.get_mut(who).expect("inserted just above")
    }

    /// Forget buckets that are full again (they would start full anyway).
    fn forget_idle(&mut self, now_ms: u64) {
        if self.buckets.len() < MAX_TRACKED {
            return;
        }
        self.buckets.retain(|_, (b, l)| !b.is_full(*l, now_ms));
        self.limited.retain(|k, _| self.buckets.contains_key(k));
    }
}

fn with_identity(who: &Identity, mut rest: Vec<(&'static str, Val)>) -> Vec<(&'static str, Val)> {
    let mut f = vec![
        ("identity", Val::Str(who.name.clone())),
        ("uid", u64::from(who.uid).into()),
        ("pid", u64::try_from(who.pid).unwrap_or(0).into()),
    ];
    if !who.role.is_empty() {
        f.push(("role", Val::Str(who.role.clone())));
    }
    f.append(&mut rest);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 7,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    fn control(json: &str) -> ControlConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bucket_arithmetic_stays_finite_at_the_extremes() {
        let huge = RateLimitConfig {
            rate: u32::MAX,
            burst: u32::MAX,
        };
        let mut b = Bucket::full(huge, 0);
        for i in 0..1000 {
            assert_eq!(b.take(huge, i), Ok(()));
        }
        // A clock jump to the end of time refills to burst, no further.
        assert_eq!(b.take(huge, u64::MAX), Ok(()));
        assert!(b.tokens.is_finite() && b.tokens <= f64::from(u32::MAX));
        // The clock going backwards never adds tokens nor panics.
        let tight = RateLimitConfig { rate: 1, burst: 1 };
        let mut b = Bucket::full(tight, 10_000);
        assert_eq!(b.take(tight, 10_000), Ok(()));
        assert_eq!(b.take(tight, 0), Err(1));
        assert_eq!(b.take(tight, 10_999), Err(1));
        assert_eq!(b.take(tight, 11_000), Ok(()));
        // A huge rate with a burst of one: retry_after is still at least 1 s.
        let fast = RateLimitConfig {
            rate: u32::MAX,
            burst: 1,
        };
        let mut b = Bucket::full(fast, 5);
        assert_eq!(b.take(fast, 5), Ok(()));
        assert_eq!(b.take(fast, 5), Err(1));
    }

    #[test]
    fn builtin_roles_have_the_documented_commands() {
        let p = Policy::from_config(&ControlConfig::default()).unwrap();
        let names = |r| p.role(r).unwrap().names();
        assert_eq!(names("admin"), COMMANDS.to_vec());
        assert_eq!(
            names("operator"),
            [
                "status",
                "lock",
                "unlock",
                "keepalive",
                "inhibit",
                "release"
            ]
        );
        assert_eq!(names("viewer"), ["status", "watch"]);
        assert_eq!(
            names("agent"),
            ["status", "keepalive", "inhibit", "release"]
        );
    }

    #[test]
    fn unknown_roles_and_commands_are_refused_by_name() {
        let e = Policy::from_config(&control(r#"{"grants":{"operater":{"uids":[1000]}}}"#))
            .unwrap_err();
        assert_eq!(e.field, "control.grants.operater");
        assert!(
            e.msg.contains("role `operater` does not exist"),
            "{}",
            e.msg
        );
        let e = Policy::from_config(&control(r#"{"roles":{"backup":["status","reboot"]}}"#))
            .unwrap_err();
        assert_eq!(e.field, "control.roles.backup");
        assert!(e.msg.contains("`reboot` is not a command"), "{}", e.msg);
        let e = Policy::from_config(&control(
            r#"{"rate_limit":{"nobody":{"rate":1,"burst":1}}}"#,
        ))
        .unwrap_err();
        assert_eq!(e.field, "control.rate_limit.nobody");
        let e = Policy::from_config(&control(r#"{"roles":{"admin":["status"]}}"#)).unwrap_err();
        assert!(e.msg.contains("built-in"), "{}", e.msg);
    }

    #[test]
    fn grants_allow_and_custom_roles_combine_per_peer() {
        let p = Policy::from_config(&control(
            r#"{"roles":{"backup":["status","keepalive"]},
                "grants":{"viewer":{"uids":[1000]},"backup":{"gids":[27]}},
                "allow":{"lock":{"uids":[1000]}}}"#,
        ))
        .unwrap();
        let me = p.for_peer(&peer(1000, 1000, &[]));
        assert_eq!(me.name, "uid:1000");
        assert_eq!(me.commands.names(), ["status", "lock", "watch"]);
        assert_eq!(me.role, "viewer");
        // A supplementary group carries the custom role.
        let g = p.for_peer(&peer(1001, 1001, &[27]));
        assert_eq!(g.commands.names(), ["status", "keepalive"]);
        assert!(p.for_peer(&peer(1002, 1002, &[5])).commands.is_empty());
        let root = p.for_peer(&peer(0, 0, &[]));
        assert_eq!((root.commands, root.limit), (CommandSet::ALL, None));
        // A token's role, whatever the uid.
        let t = p.for_token("ci", "agent", &peer(1000, 1000, &[]));
        assert_eq!(t.name, "token:ci");
        assert!(t.may("keepalive") && !t.may("lock") && !t.may("watch"));
        assert!(p
            .for_token("x", "gone", &peer(0, 0, &[]))
            .commands
            .is_empty());
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let l = RateLimitConfig { rate: 2, burst: 3 };
        let mut b = Bucket::full(l, 1000);
        for _ in 0..3 {
            assert_eq!(b.take(l, 1000), Ok(()));
        }
        assert_eq!(b.take(l, 1000), Err(1));
        assert_eq!(b.take(l, 1499), Err(1));
        assert_eq!(b.take(l, 1500), Ok(()));
        assert_eq!(b.take(l, 1500), Err(1));
        // A slow rate says how long.
        let slow = RateLimitConfig { rate: 1, burst: 1 };
        let mut b = Bucket::full(slow, 0);
        assert_eq!(b.take(slow, 0), Ok(()));
        assert_eq!(b.take(slow, 0), Err(1));
        // rate 0: no limit.
        let none = RateLimitConfig { rate: 0, burst: 0 };
        assert_eq!(Bucket::full(none, 0).take(none, 0), Ok(()));
    }

    #[test]
    fn one_identity_limited_leaves_another_alone_and_runs_are_audited_once() {
        let p = Policy::from_config(&control(
            r#"{"grants":{"viewer":{"uids":[1000,1001]}},"rate_limit":{"viewer":{"rate":1,"burst":2}}}"#,
        ))
        .unwrap();
        let mut g = Gate::new(p.clone());
        let a = p.for_peer(&peer(1000, 1000, &[]));
        let b = p.for_peer(&peer(1001, 1001, &[]));
        assert_eq!(g.decide(&a, "status", 10).0, Verdict::Allowed);
        assert_eq!(g.decide(&a, "status", 10).0, Verdict::Allowed);
        let (v, notes) = g.decide(&a, "status", 10);
        assert_eq!(v, Verdict::RateLimited { retry_after: 1 });
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].event, "rate_limited");
        assert_eq!(
            notes[0].fields[0],
            ("identity", Val::Str("uid:1000".into()))
        );
        for _ in 0..100 {
            let (v, notes) = g.decide(&a, "status", 11);
            assert!(matches!(v, Verdict::RateLimited { .. }));
            assert!(notes.is_empty());
        }
        assert_eq!(g.decide(&b, "status", 11).0, Verdict::Allowed);
        // The run ends, another begins inside the interval: counted, not written;
        // after the interval the entry carries the count.
        assert_eq!(g.decide(&a, "status", 1100).0, Verdict::Allowed);
        let (_, notes) = g.decide(&a, "status", 1100);
        assert!(notes.is_empty());
        let (v, notes) = g.decide(&a, "status", 1100 + AUDIT_INTERVAL_MS);
        assert_eq!(v, Verdict::Allowed);
        assert!(notes.is_empty());
        g.decide(&a, "status", 1100 + AUDIT_INTERVAL_MS);
        let (_, notes) = g.decide(&a, "status", 1100 + AUDIT_INTERVAL_MS);
        assert_eq!(notes.len(), 1);
        assert_eq!(
            notes[0].fields.last().unwrap(),
            &("suppressed_since_last", Val::UInt(101))
        );
    }

    #[test]
    fn denials_are_coalesced_and_flushed_with_their_count() {
        let p = Policy::from_config(&ControlConfig::default()).unwrap();
        let mut g = Gate::new(p.clone());
        let who = p.for_peer(&peer(1000, 1000, &[]));
        let (v, n) = g.decide(&who, "lock", 5);
        assert_eq!((v, n.len()), (Verdict::Denied, 1));
        for t in 6..50 {
            assert!(g.decide(&who, "lock", t).1.is_empty());
        }
        let f = g.flush();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].fields[2], ("suppressed_since_last", Val::UInt(44)));
        assert!(g.flush().is_empty());
        // Token refusals never carry the token, only who presented it.
        let n = g.token_refused(&peer(1000, 1000, &[]), Some("ci"), TokenRefusal::Expired, 5);
        assert_eq!(n[0].fields[0], ("identity", Val::Str("token:ci".into())));
        assert_eq!(n[0].fields[3], ("reason", Val::Str("expired".into())));
    }
}
