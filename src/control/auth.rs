//! Who is on the other end of a control connection, and may they run a command.
//!
//! Identity comes from the kernel only: SO_PEERCRED (uid, gid, pid at connect time)
//! and SO_PEERGROUPS (the supplementary groups at connect time). Where the kernel
//! lacks SO_PEERGROUPS (before 4.13), the groups are read from /proc/PID/status,
//! and only if that process still has the peer's uid (a recycled pid of another user
//! is not trusted). Root is always allowed; everyone else needs their uid, primary
//! gid or a supplementary gid listed under `control.allow.<command>`. Nothing a
//! client sends on the socket affects who it is.

use crate::config::Allow;
use std::collections::BTreeMap;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (may include `gid`).
    pub groups: Vec<u32>,
}

#[derive(Debug)]
pub enum AuthError {
    PeerCred(std::io::Error),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::PeerCred(e) => write!(f, "cannot read the peer's credentials: {e}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// May `peer` run `cmd` under this `control.allow` table?
pub fn authorise(allow: &BTreeMap<String, Allow>, cmd: &str, peer: &Peer) -> bool {
    if peer.uid == 0 {
        return true;
    }
    let Some(a) = allow.get(cmd) else {
        return false;
    };
    a.uids.contains(&peer.uid)
        || a.gids.contains(&peer.gid)
        || peer.groups.iter().any(|g| a.gids.contains(g))
}

/// The credentials of the process connected on `fd`, as the kernel recorded them.
pub fn peer_of(fd: impl AsFd) -> Result<Peer, AuthError> {
    let cred =
        rustix::net::sockopt::socket_peercred(&fd).map_err(|e| AuthError::PeerCred(e.into()))?;
    let uid = cred.uid.as_raw();
    let gid = cred.gid.as_raw();
    let pid = cred.pid.as_raw_nonzero().get();
    let groups = match peer_groups(fd.as_fd().as_raw_fd()) {
        Some(g) => g,
        None => proc_groups(pid, uid).unwrap_or_default(),
    };
    Ok(Peer {
        pid,
        uid,
        gid,
        groups,
    })
}

/// SO_PEERGROUPS (Linux 4.13+). The option number differs between architectures
/// (59 on most, 0x3d on SPARC, 0x4034 on PA-RISC): the libc crate carries each.
fn peer_groups(fd: i32) -> Option<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<u32>()) as nix::libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of `len` bytes; the kernel writes
        // at most `len` bytes and reports the needed size in `len` on ERANGE.
        let rc = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                nix::libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<u32>();
        if rc == 0 {
            groups.truncate(n);
            return Some(groups);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(nix::libc::ERANGE) {
            return None;
        }
        groups.resize(n.max(groups.len() * 2), 0);
    }
    None
}

/// Supplementary groups from /proc/PID/status, if that process has the peer's uid.
fn proc_groups(pid: i32, uid: u32) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_groups(&text, uid)
}

/// `Groups:` of a /proc/PID/status text whose real uid is `uid`.
pub fn parse_status_groups(text: &str, uid: u32) -> Option<Vec<u32>> {
    let mut real_uid = None;
    let mut groups = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            real_uid = rest.split_whitespace().next()?.parse::<u32>().ok();
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            groups = Some(
                rest.split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect(),
            );
        }
    }
    (real_uid? == uid).then_some(groups?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(cmd: &str, uids: &[u32], gids: &[u32]) -> BTreeMap<String, Allow> {
        let mut m = crate::config::ControlConfig::default().allow;
        m.insert(
            cmd.into(),
            Allow {
                uids: uids.to_vec(),
                gids: gids.to_vec(),
            },
        );
        m
    }

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_is_always_allowed_and_defaults_are_root_only() {
        let a = crate::config::ControlConfig::default().allow;
        for cmd in crate::config::CONTROL_COMMANDS {
            assert!(authorise(&a, cmd, &peer(0, 0, &[])));
            assert!(!authorise(&a, cmd, &peer(1000, 1000, &[1000])));
        }
        assert!(authorise(&BTreeMap::new(), "lock", &peer(0, 0, &[])));
    }

    #[test]
    fn uid_gid_and_supplementary_groups_grant_per_command() {
        let a = allow("status", &[1000], &[27]);
        assert!(authorise(&a, "status", &peer(1000, 1000, &[])));
        assert!(authorise(&a, "status", &peer(1001, 27, &[])));
        assert!(authorise(&a, "status", &peer(1002, 1002, &[5, 27])));
        assert!(!authorise(&a, "status", &peer(1003, 1003, &[5])));
        // Allowed for status is not allowed for lock or unlock.
        assert!(!authorise(&a, "lock", &peer(1000, 1000, &[])));
        assert!(!authorise(&a, "unlock", &peer(1002, 1002, &[27])));
    }

    #[test]
    fn proc_status_groups_need_the_same_uid() {
        let text =
            "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t27 44 \n";
        assert_eq!(parse_status_groups(text, 1000), Some(vec![27, 44]));
        assert_eq!(parse_status_groups(text, 1001), None);
        assert_eq!(parse_status_groups("Uid:\t5\t5\t5\t5\n", 5), None);
    }

    #[test]
    fn peer_of_a_socketpair_is_ourselves() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = peer_of(&a).unwrap();
        assert_eq!(p.uid, rustix::process::getuid().as_raw());
        assert_eq!(p.gid, rustix::process::getgid().as_raw());
        assert_eq!(p.pid, std::process::id() as i32);
    }

    #[test]
    fn so_peergroups_answers_with_our_supplementary_groups() {
        // From the kernel directly, not the /proc fallback: a wrong option number
        // would be ENOPROTOOPT here, i.e. None.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = peer_groups(a.as_raw_fd()).expect("SO_PEERGROUPS refused");
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
    }
}
