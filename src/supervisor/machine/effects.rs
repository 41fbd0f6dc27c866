//! What the decision core wants done, as data: audit entries, the state to
//! publish, the lockout to persist, log lines. The core only returns these; the
//! shell ([`super::Machine`]) performs them in order, so the core's tests read
//! what would happen without a file system.

use super::super::lockout::LockoutFile;
use super::super::state_file::Snapshot;
use crate::audit;

/// An audit field value the core owns (the audit log's [`audit::Value`] borrows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Str(String),
    UInt(u64),
    Int(i64),
}

impl Field {
    pub fn as_value(&self) -> audit::Value<'_> {
        match self {
            Field::Str(s) => audit::Value::Str(s),
            Field::UInt(n) => audit::Value::UInt(*n),
            Field::Int(n) => audit::Value::Int(*n),
        }
    }
}

impl From<&str> for Field {
    fn from(s: &str) -> Self {
        Field::Str(s.to_string())
    }
}

impl From<String> for Field {
    fn from(s: String) -> Self {
        Field::Str(s)
    }
}

impl From<u64> for Field {
    fn from(n: u64) -> Self {
        Field::UInt(n)
    }
}

impl From<u32> for Field {
    fn from(n: u32) -> Self {
        Field::UInt(n.into())
    }
}

impl From<usize> for Field {
    fn from(n: usize) -> Self {
        Field::UInt(n as u64)
    }
}

impl From<i64> for Field {
    fn from(n: i64) -> Self {
        Field::Int(n)
    }
}

/// Log priorities as syslog numbers (journald files them so).
pub use crate::log::Priority;

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Append one entry to the audit log.
    Audit {
        event: &'static str,
        fields: Vec<(&'static str, Field)>,
    },
    /// Write the state file(s).
    Publish(Snapshot),
    /// Persist the lockout counters.
    SaveLockout(LockoutFile),
    Log(Priority, String),
    /// Drop the keyring passphrase cache of this name (a lock leaves no cached
    /// passphrase behind).
    ForgetCache(String),
    /// Tell the watchers (`{"cmd":"watch"}`): one line `{"seq":N,"event":E,...}`.
    /// The shell numbers them; never carries a secret.
    Event {
        event: &'static str,
        fields: Vec<(&'static str, Field)>,
    },
}

/// The effects of one call, in the order they must happen.
#[derive(Debug, Default)]
pub struct Effects(Vec<Effect>);

impl Effects {
    pub fn audit(&mut self, event: &'static str, fields: Vec<(&'static str, Field)>) {
        self.0.push(Effect::Audit { event, fields });
    }

    pub fn info(&mut self, msg: impl Into<String>) {
        self.0.push(Effect::Log(Priority::Info, msg.into()));
    }

    pub fn warn(&mut self, msg: impl Into<String>) {
        self.0.push(Effect::Log(Priority::Warning, msg.into()));
    }

    pub fn event(&mut self, event: &'static str, fields: Vec<(&'static str, Field)>) {
        self.0.push(Effect::Event { event, fields });
    }

    pub fn push(&mut self, e: Effect) {
        self.0.push(e);
    }

    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.0)
    }
}
