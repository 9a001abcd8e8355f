//! Retry timing for recoverable errors.
//!
//! After the first failure a step is retried 1, 2, 4, 8 and 10 minutes
//! after that first failure, then every 30 minutes (40, 70, 100, ... minutes
//! after it), with the backlog kept meanwhile. A success resets the
//! schedule. Pure: it takes `now` in policy time and returns policy times;
//! tests and the simulator run the same schedule fast by running policy time
//! fast ([`crate::clock::AcceleratedClock`]), not by changing it.

use std::time::Duration;

/// Minutes after the first failure of the first five retries.
pub const RETRY_MINUTES: [u64; 5] = [1, 2, 4, 8, 10];
/// Minutes between retries after the fifth.
pub const RETRY_EVERY_MINUTES: u64 = 30;

/// Offset from the first failure of retry number `n` (1-based).
pub fn offset(n: u32) -> Duration {
    let minutes = match n {
        0 => 0,
        1..=5 => RETRY_MINUTES[n as usize - 1],
        _ => RETRY_MINUTES[4] + RETRY_EVERY_MINUTES * (n as u64 - 5),
    };
    Duration::from_secs(minutes * 60)
}

/// Where a failing step is in its retry schedule.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryState {
    /// When the first failure of the current streak happened (ms).
    first_failure_ms: Option<u64>,
    /// Retries scheduled so far in this streak.
    retries: u32,
}

impl RetryState {
    /// Records a failure at `now_ms`; returns when (ms) to retry.
    pub fn on_failure(&mut self, now_ms: u64) -> u64 {
        let first = *self.first_failure_ms.get_or_insert(now_ms);
        self.retries += 1;
        let at = first + offset(self.retries).as_millis() as u64;
        // A retry that itself failed late is never scheduled in the past.
        at.max(now_ms)
    }

    pub fn on_success(&mut self) {
        *self = RetryState::default();
    }

    pub fn retries(&self) -> u32 {
        self.retries
    }

    pub fn failing(&self) -> bool {
        self.first_failure_ms.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn retries_follow_the_schedule_in_exact_minutes() {
        let mut s = RetryState::default();
        let t0 = 1_000_000;
        // Each retry fails at once when it runs.
        let mut now = t0;
        let mut got = vec![];
        for _ in 0..9 {
            let at = s.on_failure(now);
            got.push((at - t0) / MIN);
            now = at;
        }
        assert_eq!(got, vec![1, 2, 4, 8, 10, 40, 70, 100, 130]);
        assert_eq!(s.retries(), 9);
        s.on_success();
        assert!(!s.failing());
        assert_eq!(s.on_failure(5 * MIN) - 5 * MIN, MIN, "a new streak starts over");
    }

    #[test]
    fn a_retry_that_ran_late_is_not_scheduled_in_the_past() {
        let mut s = RetryState::default();
        s.on_failure(0);
        // The first retry took 5 minutes to fail: the next (2 min) is due now.
        assert_eq!(s.on_failure(5 * MIN), 5 * MIN);
        assert_eq!(s.on_failure(5 * MIN), 5 * MIN, "the 4-minute retry is overdue too");
        assert_eq!(s.on_failure(5 * MIN), 8 * MIN);
    }
}
