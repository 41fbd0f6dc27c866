//! Named inhibitors: a client (a model download, a backup) holds off the idle
//! lock for a bounded time. Pure bookkeeping over times passed in (CLOCK_BOOTTIME
//! ms), like [`crate::supervisor::idle`]; the core decides what they mean.
//!
//! Bounds, so that no client can grow the supervisor's memory or its audit log:
//! at most [`MAX_INHIBITORS_PER_HOLDER`] per holder and [`MAX_INHIBITORS`] in all;
//! each lasts at most `vault.max_inhibit` seconds. Names are unique: the same
//! `who` from the same holder renews its inhibitor, from another it is refused.
//! The holder is the requester's identity (`uid:1000`, `token:ci-runner`), not its
//! uid: containers sharing one uid with tokens of their own cannot release each
//! other's inhibitors. Root by its uid (`uid:0`, no token) may release any.

use std::collections::BTreeMap;

/// The identity that may release anyone's inhibitor.
pub const ROOT: &str = "uid:0";

/// Inhibitors one holder may hold at once.
pub const MAX_INHIBITORS_PER_HOLDER: usize = 64;
/// Inhibitors all clients together may hold.
pub const MAX_INHIBITORS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inhibitor {
    pub why: String,
    /// Who asked: the identity (`uid:N` or `token:NAME`), which owns it.
    pub holder: String,
    /// And its process, by SO_PEERCRED (shown, not trusted).
    pub uid: u32,
    pub pid: i32,
    /// The connection that asked; it releases the inhibitor when it closes,
    /// unless `keep`.
    pub conn: u64,
    pub keep: bool,
    pub until_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The name is held by another identity.
    HeldByOther {
        holder: String,
    },
    PerHolder,
    Total,
}

#[derive(Debug, Default)]
pub struct Inhibitors {
    by_name: BTreeMap<String, Inhibitor>,
}

impl Inhibitors {
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Inhibitor)> {
        self.by_name.iter()
    }

    #[cfg(test)]
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    /// Add or renew `who`. Returns whether it renewed an existing one.
    pub fn add(&mut self, who: &str, inh: Inhibitor) -> Result<bool, Refused> {
        if let Some(old) = self.by_name.get_mut(who) {
            if old.holder != inh.holder && inh.holder != ROOT {
                return Err(Refused::HeldByOther {
                    holder: old.holder.clone(),
                });
            }
            *old = inh;
            return Ok(true);
        }
        if self.by_name.len() >= MAX_INHIBITORS {
            return Err(Refused::Total);
        }
        let held = self
            .by_name
            .values()
            .filter(|i| i.holder == inh.holder)
            .count();
        if held >= MAX_INHIBITORS_PER_HOLDER {
            return Err(Refused::PerHolder);
        }
        self.by_name.insert(who.to_string(), inh);
        Ok(false)
    }

    /// Remove `who` if `holder` may (its holder, or root).
    pub fn release(&mut self, who: &str, holder: &str) -> Result<Option<Inhibitor>, Refused> {
        match self.by_name.get(who) {
            None => Ok(None),
            Some(i) if i.holder != holder && holder != ROOT => Err(Refused::HeldByOther {
                holder: i.holder.clone(),
            }),
            Some(_) => Ok(self.by_name.remove(who)),
        }
    }

    /// Remove those that expired by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(String, Inhibitor)> {
        self.take_where(|i| i.until_ms <= now_ms)
    }

    /// Remove those connection `conn` held without `keep`.
    pub fn disconnected(&mut self, conn: u64) -> Vec<(String, Inhibitor)> {
        self.take_where(|i| i.conn == conn && !i.keep)
    }

    pub fn clear(&mut self) -> Vec<(String, Inhibitor)> {
        std::mem::take(&mut self.by_name).into_iter().collect()
    }

    /// The earliest expiry.
    pub fn next_expiry(&self) -> Option<u64> {
        self.by_name.values().map(|i| i.until_ms).min()
    }

    /// The latest expiry.
    pub fn last_expiry(&self) -> Option<u64> {
        self.by_name.values().map(|i| i.until_ms).max()
    }

    fn take_where(&mut self, pred: impl Fn(&Inhibitor) -> bool) -> Vec<(String, Inhibitor)> {
        let names: Vec<String> = self
            .by_name
            .iter()
            .filter(|(_, i)| pred(i))
            .map(|(n, _)| n.clone())
            .collect();
        names
            .into_iter()
            .filter_map(|n| self.by_name.remove(&n).map(|i| (n, i)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inh(uid: u32, conn: u64, until_ms: u64) -> Inhibitor {
        Inhibitor {
            why: String::new(),
            holder: format!("uid:{uid}"),
            uid,
            pid: 1,
            conn,
            keep: false,
            until_ms,
        }
    }

    #[test]
    fn bounded_per_uid_and_in_total() {
        let mut s = Inhibitors::default();
        for n in 0..MAX_INHIBITORS_PER_HOLDER {
            assert_eq!(s.add(&format!("a{n}"), inh(1000, 1, 10)), Ok(false));
        }
        assert_eq!(s.add("one-more", inh(1000, 1, 10)), Err(Refused::PerHolder));
        // Renewing a held name is not a new one.
        assert_eq!(s.add("a0", inh(1000, 1, 20)), Ok(true));
        assert_eq!(
            s.add("a0", inh(1001, 2, 20)),
            Err(Refused::HeldByOther {
                holder: "uid:1000".into()
            })
        );
        // Root is held to the same share; many uids fill the total.
        for n in 0..(MAX_INHIBITORS - MAX_INHIBITORS_PER_HOLDER) {
            let uid = 2000 + (n / MAX_INHIBITORS_PER_HOLDER) as u32;
            s.add(&format!("r{n}"), inh(uid, 3, 10)).unwrap();
        }
        assert_eq!(s.add("full", inh(5000, 3, 10)), Err(Refused::Total));
    }

    #[test]
    fn expiry_and_disconnect_remove_the_right_ones() {
        let mut s = Inhibitors::default();
        s.add("short", inh(1, 7, 100)).unwrap();
        s.add("long", inh(1, 7, 500)).unwrap();
        let mut kept = inh(1, 7, 500);
        kept.keep = true;
        s.add("kept", kept).unwrap();
        s.add("other-conn", inh(1, 8, 500)).unwrap();
        assert_eq!(s.next_expiry(), Some(100));
        let gone: Vec<String> = s.expire(100).into_iter().map(|(n, _)| n).collect();
        assert_eq!(gone, ["short"]);
        let gone: Vec<String> = s.disconnected(7).into_iter().map(|(n, _)| n).collect();
        assert_eq!(gone, ["long"]);
        assert_eq!(s.names(), ["kept", "other-conn"]);
        assert_eq!(
            s.release("kept", "uid:2"),
            Err(Refused::HeldByOther {
                holder: "uid:1".into()
            })
        );
        assert!(s.release("kept", ROOT).unwrap().is_some());
    }

    #[test]
    fn two_tokens_of_one_uid_are_two_holders() {
        let mut s = Inhibitors::default();
        let mut a = inh(1000, 1, 10);
        a.holder = "token:a".into();
        let mut b = inh(1000, 2, 10);
        b.holder = "token:b".into();
        s.add("job", a).unwrap();
        // Same uid, another token: neither renews nor releases it.
        assert_eq!(
            s.add("job", b.clone()),
            Err(Refused::HeldByOther {
                holder: "token:a".into()
            })
        );
        assert!(s.release("job", "token:b").is_err());
        assert!(s.release("job", "uid:1000").is_err());
        assert!(s.release("job", "token:a").unwrap().is_some());
        // Each token has its own share.
        for n in 0..MAX_INHIBITORS_PER_HOLDER {
            s.add(&format!("b{n}"), b.clone()).unwrap();
        }
        let mut c = b.clone();
        c.holder = "token:c".into();
        assert_eq!(s.add("c0", c), Ok(false));
    }
}
