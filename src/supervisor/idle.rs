//! The idle deadline: when the vault should auto-lock, when to warn before that,
//! and what a timer expiry means. Pure arithmetic over times the caller passes in
//! (milliseconds of CLOCK_BOOTTIME, so suspended time counts as idle), so every
//! branch is tested with an injected clock. This module never sleeps or reads a
//! clock itself.

/// What a timer expiry (or any look at the clock) means now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleEvent {
    Nothing,
    /// Log the warning: the vault auto-locks in `in_ms`.
    Warn {
        in_ms: u64,
    },
    /// The deadline has passed: lock now.
    Expired,
}

#[derive(Debug, Clone)]
pub struct IdleTimer {
    /// `None`: auto-lock disabled (`auto_lock_timeout: 0`).
    timeout_ms: Option<u64>,
    warn_before_ms: u64,
    last_mono_ms: u64,
    last_wall_ms: u64,
    /// When set, the deadline is this instead of `last + timeout` (a failed
    /// auto-lock is retried later rather than in a tight loop).
    retry_at: Option<u64>,
    warned: bool,
}

impl IdleTimer {
    pub fn new(timeout_ms: Option<u64>, warn_before_ms: u64, now_mono: u64, now_wall: u64) -> Self {
        IdleTimer {
            timeout_ms: timeout_ms.filter(|&t| t > 0),
            warn_before_ms,
            last_mono_ms: now_mono,
            last_wall_ms: now_wall,
            retry_at: None,
            warned: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.timeout_ms.is_some()
    }

    /// Record activity.
    pub fn touch(&mut self, now_mono: u64, now_wall: u64) {
        self.last_mono_ms = now_mono;
        self.last_wall_ms = now_wall;
        self.retry_at = None;
        self.warned = false;
    }

    /// Try again `after_ms` from now without counting it as activity.
    pub fn retry_later(&mut self, now_mono: u64, after_ms: u64) {
        self.retry_at = Some(now_mono.saturating_add(after_ms));
        self.warned = true;
    }

    pub fn last_activity_wall_ms(&self) -> u64 {
        self.last_wall_ms
    }

    pub fn idle_ms(&self, now_mono: u64) -> u64 {
        now_mono.saturating_sub(self.last_mono_ms)
    }

    /// When the vault locks (only meaningful while it is unlocked).
    pub fn deadline(&self) -> Option<u64> {
        let t = self.timeout_ms?;
        Some(
            self.retry_at
                .unwrap_or_else(|| self.last_mono_ms.saturating_add(t)),
        )
    }

    fn warn_at(&self) -> Option<u64> {
        let t = self.timeout_ms?;
        // A warning only makes sense if there is time before the lock to give it.
        if self.warned || t <= self.warn_before_ms {
            return None;
        }
        Some(self.deadline()? - self.warn_before_ms)
    }

    /// The next instant the caller must look again; `None` means never (so the
    /// event loop sleeps without any timeout).
    pub fn next_wakeup(&self, armed: bool) -> Option<u64> {
        if !armed {
            return None;
        }
        match (self.warn_at(), self.deadline()) {
            (Some(w), Some(d)) => Some(w.min(d)),
            (_, d) => d,
        }
    }

    /// Milliseconds until the lock, for `lock_in_seconds`.
    pub fn remaining_ms(&self, now_mono: u64, armed: bool) -> Option<u64> {
        if !armed {
            return None;
        }
        Some(self.deadline()?.saturating_sub(now_mono))
    }

    /// What `now` means; a warning is reported once per idle period.
    pub fn check(&mut self, now_mono: u64, armed: bool) -> IdleEvent {
        if !armed {
            return IdleEvent::Nothing;
        }
        let Some(deadline) = self.deadline() else {
            return IdleEvent::Nothing;
        };
        if now_mono >= deadline {
            return IdleEvent::Expired;
        }
        match self.warn_at() {
            Some(w) if now_mono >= w => {
                self.warned = true;
                IdleEvent::Warn {
                    in_ms: deadline - now_mono,
                }
            }
            _ => IdleEvent::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn warns_once_then_expires_at_the_deadline() {
        let mut t = IdleTimer::new(Some(30 * MIN), MIN, 1_000, 5_000);
        assert_eq!(t.next_wakeup(true), Some(1_000 + 29 * MIN));
        assert_eq!(t.check(1_000 + 29 * MIN - 1, true), IdleEvent::Nothing);
        assert_eq!(
            t.check(1_000 + 29 * MIN, true),
            IdleEvent::Warn { in_ms: MIN }
        );
        assert_eq!(t.check(1_000 + 29 * MIN + 10, true), IdleEvent::Nothing);
        // After the warning the next wake-up is the deadline itself.
        assert_eq!(t.next_wakeup(true), Some(1_000 + 30 * MIN));
        assert_eq!(t.check(1_000 + 30 * MIN - 1, true), IdleEvent::Nothing);
        assert_eq!(t.check(1_000 + 30 * MIN, true), IdleEvent::Expired);
    }

    #[test]
    fn activity_moves_the_deadline_and_rearms_the_warning() {
        let mut t = IdleTimer::new(Some(2 * MIN), MIN, 0, 0);
        assert!(matches!(t.check(MIN, true), IdleEvent::Warn { .. }));
        t.touch(MIN + 500, 77_000);
        assert_eq!(t.deadline(), Some(3 * MIN + 500));
        assert_eq!(t.next_wakeup(true), Some(2 * MIN + 500));
        assert_eq!(t.idle_ms(MIN + 1500), 1000);
        assert_eq!(t.last_activity_wall_ms(), 77_000);
        assert_eq!(t.remaining_ms(3 * MIN, true), Some(500));
        assert!(matches!(
            t.check(2 * MIN + 500, true),
            IdleEvent::Warn { .. }
        ));
    }

    #[test]
    fn zero_disables_and_locked_disarms() {
        let mut t = IdleTimer::new(Some(0), MIN, 0, 0);
        assert!(!t.enabled());
        assert_eq!(t.next_wakeup(true), None);
        assert_eq!(t.check(u64::MAX, true), IdleEvent::Nothing);
        assert_eq!(t.remaining_ms(5, true), None);
        let mut t = IdleTimer::new(Some(MIN), MIN, 0, 0);
        assert_eq!(t.next_wakeup(false), None);
        assert_eq!(t.check(10 * MIN, false), IdleEvent::Nothing);
        assert_eq!(t.remaining_ms(5, false), None);
    }

    #[test]
    fn short_timeouts_skip_the_warning() {
        // Test hook timeouts shorter than the warning lead go straight to the lock.
        let mut t = IdleTimer::new(Some(2_000), MIN, 10, 0);
        assert_eq!(t.next_wakeup(true), Some(2_010));
        assert_eq!(t.check(2_009, true), IdleEvent::Nothing);
        assert_eq!(t.check(2_010, true), IdleEvent::Expired);
    }

    #[test]
    fn a_failed_lock_is_retried_later_not_in_a_loop() {
        let mut t = IdleTimer::new(Some(5 * MIN), MIN, 0, 0);
        assert_eq!(t.check(5 * MIN, true), IdleEvent::Expired);
        t.retry_later(5 * MIN, MIN);
        assert_eq!(t.next_wakeup(true), Some(6 * MIN));
        assert_eq!(t.check(5 * MIN + 1, true), IdleEvent::Nothing);
        assert_eq!(t.check(6 * MIN, true), IdleEvent::Expired);
        // Activity clears the retry and restores the normal deadline.
        t.touch(6 * MIN, 0);
        assert_eq!(t.deadline(), Some(11 * MIN));
    }
}
