//! Host-wide upload bandwidth limit (governor), shared by every VM's workers.
//!
//! The limit is counted in bits per second as operators state it (512 Kbps
//! to 1023 Mbps, or unlimited), with one limit for work hours and one for
//! the rest of the week ([`BandwidthPolicy`]). The policy is looked at on
//! every request, so a change (or the work day starting) takes effect at once.
//!
//! governor's cells are `u32`, so one cell is one KiB, and a request larger
//! than the burst (one second of traffic) is taken in burst-sized pieces:
//! `until_n_ready` fails for more than the burst.
//!
//! Fairness: each VM has at most one piece waiting at the shared gate (a
//! per-VM lock), and the gate is a FIFO lock, so VMs take turns piece by
//! piece whatever their worker counts: one busy VM cannot starve the others.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schedule::{LocalTime, WorkSchedule};

/// Lowest accepted limit: 512 Kbps.
pub const MIN_LIMIT_BPS: u64 = 512_000;
/// Highest accepted limit: 1023 Mbps.
pub const MAX_LIMIT_BPS: u64 = 1_023_000_000;

/// Checks a limit in bits per second (`None` = unlimited).
pub fn validate_limit(field: &'static str, bps: Option<u64>) -> Result<()> {
    match bps {
        Some(b) if !(MIN_LIMIT_BPS..=MAX_LIMIT_BPS).contains(&b) => {
            Err(Error::invalid(field, format!("{b} bit/s is outside 512 Kbps..=1023 Mbps (or unlimited)")))
        }
        _ => Ok(()),
    }
}

/// Upload limits by time of week. Default: unlimited at all times.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BandwidthPolicy {
    pub schedule: WorkSchedule,
    /// Limit during work hours, bit/s (`None` = unlimited).
    pub work_limit_bps: Option<u64>,
    /// Limit outside work hours, bit/s (`None` = unlimited).
    pub off_limit_bps: Option<u64>,
}

impl BandwidthPolicy {
    /// The same limit at all times.
    pub fn flat(bps: Option<u64>) -> Self {
        BandwidthPolicy { work_limit_bps: bps, off_limit_bps: bps, ..Default::default() }
    }

    pub fn validate(&self) -> Result<()> {
        validate_limit("work limit", self.work_limit_bps)?;
        validate_limit("off-hours limit", self.off_limit_bps)
    }

    pub fn limit_at(&self, t: LocalTime) -> Option<u64> {
        if self.schedule.is_work_time(t) {
            self.work_limit_bps
        } else {
            self.off_limit_bps
        }
    }
}

/// (limit in bit/s, burst in KiB cells, limiter).
type Limiter = (u64, u32, Arc<DefaultDirectRateLimiter>);

pub struct Throttle {
    /// Says whether it is work hours (policy time).
    clock: Arc<dyn crate::clock::Clock>,
    policy: RwLock<BandwidthPolicy>,
    limiter: RwLock<Option<Limiter>>,
    /// FIFO gate: VMs take turns.
    gate: tokio::sync::Mutex<()>,
    per_vm: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn build(bps: u64) -> Limiter {
    let kib_per_sec = NonZeroU32::new(((bps / 8) / 1024).clamp(1, u32::MAX as u64) as u32).expect("clamped to >= 1");
    (bps, kib_per_sec.get(), Arc::new(RateLimiter::direct(Quota::per_second(kib_per_sec))))
}

impl Throttle {
    pub fn new(policy: BandwidthPolicy) -> Result<Self> {
        Throttle::with_clock(policy, Arc::new(crate::clock::SystemClock))
    }

    pub fn with_clock(policy: BandwidthPolicy, clock: Arc<dyn crate::clock::Clock>) -> Result<Self> {
        let t = Throttle {
            clock,
            policy: Default::default(),
            limiter: Default::default(),
            gate: Default::default(),
            per_vm: Default::default(),
        };
        t.set_policy(policy)?;
        Ok(t)
    }

    pub fn policy(&self) -> BandwidthPolicy {
        self.policy.read().expect("throttle lock").clone()
    }

    pub fn set_policy(&self, policy: BandwidthPolicy) -> Result<()> {
        policy.validate()?;
        *self.policy.write().expect("throttle lock") = policy;
        Ok(())
    }

    /// The limit in force now (bit/s, `None` = unlimited).
    pub fn limit(&self) -> Option<u64> {
        self.policy().limit_at(self.clock.local_now())
    }

    /// The limiter for the limit in force, rebuilt when the limit changed.
    fn current(&self) -> Option<Limiter> {
        let want = self.limit()?;
        if let Some(h) = self.limiter.read().expect("throttle lock").as_ref().filter(|h| h.0 == want) {
            return Some(h.clone());
        }
        // Build under the write lock, checking again: two callers racing here
        // must share one limiter, or each would get a fresh burst.
        let mut slot = self.limiter.write().expect("throttle lock");
        match slot.as_ref() {
            Some(h) if h.0 == want => Some(h.clone()),
            _ => {
                let l = build(want);
                *slot = Some(l.clone());
                Some(l)
            }
        }
    }

    /// Waits until `vm` may send `bytes` under the limit in force.
    pub async fn acquire(&self, vm: &str, bytes: u64) {
        if self.current().is_none() {
            return;
        }
        let mine = self.per_vm.lock().expect("throttle lock").entry(vm.to_string()).or_default().clone();
        let _one_waiter_per_vm = mine.lock().await;
        let mut kib = bytes.div_ceil(1024);
        while kib > 0 {
            let _turn = self.gate.lock().await;
            let Some((_, burst, limiter)) = self.current() else {
                return; // the limit was lifted meanwhile
            };
            let piece = kib.min(burst.min(256) as u64) as u32;
            let n = NonZeroU32::new(piece).expect("piece is at least 1");
            if limiter.until_n_ready(n).await.is_err() {
                return; // cannot happen: piece <= burst
            }
            kib -= piece as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn limits_outside_the_range_are_refused() {
        assert!(validate_limit("work limit", Some(511_999)).is_err());
        assert!(validate_limit("work limit", Some(1_023_000_001)).is_err());
        validate_limit("work limit", Some(512_000)).unwrap();
        validate_limit("work limit", None).unwrap();
        let e = Throttle::new(BandwidthPolicy::flat(Some(1))).err().unwrap().to_string();
        assert!(e.contains("512 Kbps") && e.contains("1023 Mbps"), "{e}");
    }

    #[test]
    fn the_limit_follows_the_work_week() {
        let p = BandwidthPolicy {
            schedule: WorkSchedule::parse("08:00-18:00", "mon-fri").unwrap(),
            work_limit_bps: Some(100_000_000),
            off_limit_bps: None,
        };
        assert_eq!(p.limit_at(LocalTime { weekday: 1, minute: 9 * 60 }), Some(100_000_000));
        assert_eq!(p.limit_at(LocalTime { weekday: 1, minute: 20 * 60 }), None);
        assert_eq!(p.limit_at(LocalTime { weekday: 6, minute: 9 * 60 }), None);
    }

    /// The measured rate stays under the limit (plus one second of burst);
    /// only a lower bound on time is asserted, which load cannot break.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measured_rate_stays_under_the_limit() {
        let t = Arc::new(Throttle::new(BandwidthPolicy::flat(Some(8_000_000))).unwrap()); // 1 MB/s
        let start = Instant::now();
        let mut tasks = vec![];
        for w in 0..4 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move { t.acquire(&format!("vm{}", w % 2), 768 * 1024).await }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        let bytes = 4.0 * 768.0 * 1024.0;
        // 3 MiB at ~1 MB/s with a one-second burst: at least ~2 s.
        assert!(bytes / secs <= 1_000_000.0 * 1.6, "rate {:.0} B/s over {secs:.2}s", bytes / secs);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_vm_does_not_starve_another() {
        let t = Arc::new(Throttle::new(BandwidthPolicy::flat(Some(16_000_000))).unwrap()); // 2 MB/s
        let done_quiet = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_millis(2500);
        let mut tasks = vec![];
        for _ in 0..16 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    t.acquire("busy", 64 * 1024).await;
                }
            }));
        }
        {
            let (t, done) = (t.clone(), done_quiet.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    t.acquire("quiet", 64 * 1024).await;
                    done.fetch_add(64 * 1024, std::sync::atomic::Ordering::Relaxed);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        // Turn by turn, the quiet VM gets about half of ~5 MB; require a fair fraction.
        let quiet = done_quiet.load(std::sync::atomic::Ordering::Relaxed);
        assert!(quiet >= 1_000_000, "quiet VM sent only {quiet} bytes");
    }

    #[tokio::test]
    async fn unlimited_returns_at_once_and_changes_apply() {
        let t = Throttle::new(BandwidthPolicy::default()).unwrap();
        assert_eq!(t.limit(), None);
        t.acquire("vm", u64::MAX / 2).await;
        t.set_policy(BandwidthPolicy::flat(Some(100_000_000))).unwrap();
        assert_eq!(t.limit(), Some(100_000_000));
        assert!(t.set_policy(BandwidthPolicy::flat(Some(5))).is_err());
        assert_eq!(t.limit(), Some(100_000_000), "a refused change changes nothing");
    }
}
