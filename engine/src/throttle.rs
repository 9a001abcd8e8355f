//! Host-wide upload bandwidth limit (governor), shared by every VM's workers.
//!
//! The limit is counted in bits per second as operators state it (512 Kbps
//! to 1023 Mbps, or unlimited). governor's cells are `u32`, so one cell is
//! one KiB, and a request larger than the burst (one second of traffic) is
//! taken in burst-sized pieces: `until_n_ready` fails for more than the burst.
//! Changing the limit swaps the limiter at once; uploads waiting on the old
//! one finish their current piece and continue under the new one.

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::error::{Error, Result};

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

type Limit = (u64, u32, Arc<DefaultDirectRateLimiter>);

#[derive(Default)]
pub struct Throttle {
    /// (limit in bit/s, burst in KiB cells, limiter); `None` = unlimited.
    limiter: RwLock<Option<Limit>>,
}

impl Throttle {
    pub fn new(bps: Option<u64>) -> Result<Self> {
        let t = Throttle::default();
        t.set(bps)?;
        Ok(t)
    }

    /// Current limit in bits per second (`None` = unlimited).
    pub fn limit(&self) -> Option<u64> {
        self.limiter.read().expect("throttle lock is never poisoned").as_ref().map(|(b, _, _)| *b)
    }

    pub fn set(&self, bps: Option<u64>) -> Result<()> {
        validate_limit("bandwidth limit", bps)?;
        let new = bps.map(|b| {
            let kib_per_sec = NonZeroU32::new(((b / 8) / 1024).max(1) as u32).expect("max(1) is non-zero");
            (b, kib_per_sec.get(), Arc::new(RateLimiter::direct(Quota::per_second(kib_per_sec))))
        });
        *self.limiter.write().expect("throttle lock is never poisoned") = new;
        Ok(())
    }

    /// Waits until `bytes` may be sent under the current limit.
    pub async fn acquire(&self, bytes: u64) {
        let mut kib = bytes.div_ceil(1024);
        while kib > 0 {
            let Some((_, burst, limiter)) = self.limiter.read().expect("throttle lock is never poisoned").clone()
            else {
                return;
            };
            // The burst is one second of cells (the quota's default).
            let piece = kib.min(burst as u64) as u32;
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

    #[test]
    fn limits_outside_the_range_are_refused() {
        assert!(validate_limit("work limit", Some(511_999)).is_err());
        assert!(validate_limit("work limit", Some(1_023_000_001)).is_err());
        validate_limit("work limit", Some(512_000)).unwrap();
        validate_limit("work limit", None).unwrap();
        let e = Throttle::new(Some(1)).err().unwrap().to_string();
        assert!(e.contains("512 Kbps") && e.contains("1023 Mbps"), "{e}");
    }

    #[tokio::test]
    async fn a_request_larger_than_the_burst_is_paced_not_refused() {
        // 8 Mbps = 976 KiB/s: 2 MiB must take more than one second beyond the burst.
        let t = Throttle::new(Some(8_000_000)).unwrap();
        let start = std::time::Instant::now();
        t.acquire(2 * 1024 * 1024).await;
        assert!(start.elapsed() >= std::time::Duration::from_millis(900), "{:?}", start.elapsed());
        t.set(None).unwrap();
        assert_eq!(t.limit(), None);
        t.acquire(u64::MAX / 2).await; // unlimited: returns at once
    }
}
