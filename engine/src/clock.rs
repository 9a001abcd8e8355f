//! Policy time: the clock the engine's decisions read (retry backoff,
//! auto-resync windows, work hours, transition times).
//!
//! Production runs on [`SystemClock`]. Tests and the simulator pass an
//! [`AcceleratedClock`] to [`crate::Engine::open_with_clock`], so a day of
//! retries and work-hours windows runs in minutes with no knob in the
//! production configuration. Captured data keeps wall time: a recovery
//! point's time is when its logs were rotated.

use std::time::{Duration, Instant};

use crate::model::{now_millis, UnixMillis};
use crate::schedule::LocalTime;

pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// Policy time now, in ms since the Unix epoch.
    fn now_ms(&self) -> UnixMillis;
    /// Local day and minute now, in policy time (for work hours).
    fn local_now(&self) -> LocalTime;
    /// How long to really wait for `policy` of policy time.
    fn real(&self, policy: Duration) -> Duration;
}

/// Wall time.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        now_millis()
    }
    fn local_now(&self) -> LocalTime {
        crate::schedule::local_now()
    }
    fn real(&self, policy: Duration) -> Duration {
        policy
    }
}

/// Policy time that runs `factor` times faster than wall time, from now.
#[derive(Debug)]
pub struct AcceleratedClock {
    factor: f64,
    started: Instant,
    started_ms: UnixMillis,
    /// Local time of day (minutes since Monday 00:00) when it started.
    started_local: u64,
}

const WEEK_MINUTES: u64 = 7 * 24 * 60;

impl AcceleratedClock {
    /// `factor` in [1, 1e6]: 720 runs a day in two minutes.
    pub fn new(factor: f64) -> crate::Result<Self> {
        if !(1.0..=1e6).contains(&factor) {
            return Err(crate::Error::invalid("clock factor", format!("{factor} is outside 1..=1000000")));
        }
        let local = crate::schedule::local_now();
        Ok(AcceleratedClock {
            factor,
            started: Instant::now(),
            started_ms: now_millis(),
            started_local: local.weekday as u64 * 24 * 60 + local.minute as u64,
        })
    }

    fn elapsed_policy(&self) -> Duration {
        self.started.elapsed().mul_f64(self.factor)
    }
}

impl Clock for AcceleratedClock {
    fn now_ms(&self) -> UnixMillis {
        self.started_ms + self.elapsed_policy().as_millis() as u64
    }
    fn local_now(&self) -> LocalTime {
        let m = (self.started_local + self.elapsed_policy().as_secs() / 60) % WEEK_MINUTES;
        LocalTime { weekday: (m / (24 * 60)) as u8, minute: (m % (24 * 60)) as u16 }
    }
    fn real(&self, policy: Duration) -> Duration {
        policy.div_f64(self.factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerated_time_runs_faster_and_waits_shorter() {
        let c = AcceleratedClock::new(3600.0).unwrap(); // an hour a second
        assert_eq!(c.real(Duration::from_secs(3600)), Duration::from_secs(1));
        let (t0, l0) = (c.now_ms(), c.local_now());
        std::thread::sleep(Duration::from_millis(50));
        let (t1, l1) = (c.now_ms(), c.local_now());
        assert!(t1 - t0 >= 150_000, "50 ms real is at least 3 policy minutes: {}", t1 - t0);
        let minutes = |l: LocalTime| l.weekday as u64 * 1440 + l.minute as u64;
        assert!((minutes(l1) + WEEK_MINUTES - minutes(l0)) % WEEK_MINUTES >= 2);
        assert!(AcceleratedClock::new(0.5).is_err());
        assert_eq!(SystemClock.real(Duration::from_secs(5)), Duration::from_secs(5));
    }
}
