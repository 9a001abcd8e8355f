//! A target that fails on purpose: fault injection for tests, the
//! simulator and drills, switched on by configuration and wrapping any
//! backend.
//!
//! Faults (all may be combined, and changed at run time through
//! [`UnreliableTarget::set_faults`]):
//! - `error_rate`: each operation fails with this probability (a recoverable
//!   "target unavailable" error, like a 503);
//! - `fail_first`: the first N tries of each (operation, key) fail, so every
//!   retry path is exercised and a retried put must reuse its key;
//! - `outages`: windows of Unix time (ms) during which every operation fails;
//!   `down` is an outage with no end;
//! - `latency_ms`: added to every operation;
//! - `auth_failure`: every operation fails with an authentication error
//!   (non-recoverable: the VM goes to `Critical` until an operator resumes);
//! - `only_keys_containing`: the faults above hit only the operations whose
//!   key (or listed prefix) contains this text, e.g. `.manifest` for the
//!   commit records alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{Target, TargetStore};
use crate::error::{Error, ErrorClass, Result};
use crate::model::now_millis;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Probability (0..=1) that an operation fails with a recoverable error.
    pub error_rate: f64,
    /// The first N tries of each (operation, key) fail.
    pub fail_first: u32,
    /// Windows `[start_ms, end_ms)` of Unix time during which everything fails.
    pub outages: Vec<(u64, u64)>,
    /// An outage with no end, until switched off.
    pub down: bool,
    /// Added to every operation, in milliseconds.
    pub latency_ms: u64,
    /// Every operation fails with an authentication error.
    pub auth_failure: bool,
    /// Seed of the error-rate dice (0: from the clock).
    pub seed: u64,
    /// Faults hit only keys (or listed prefixes) containing this text (None: every key).
    pub only_keys_containing: Option<String>,
}

impl Faults {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(Error::invalid("faults.error_rate", format!("{} is outside 0..=1", self.error_rate)));
        }
        if self.outages.iter().any(|(s, e)| s >= e) {
            return Err(Error::invalid("faults.outages", "each window must start before it ends"));
        }
        Ok(())
    }
}

pub struct UnreliableTarget {
    inner: Target,
    faults: Mutex<Faults>,
    tries: Mutex<HashMap<(&'static str, String), u32>>,
    rng: Mutex<rand::rngs::StdRng>,
    /// Operations failed on purpose so far, for tests and reports.
    injected: std::sync::atomic::AtomicU64,
}

impl UnreliableTarget {
    pub fn new(inner: Target, faults: Faults) -> Result<Arc<Self>> {
        faults.validate()?;
        let seed = if faults.seed == 0 { now_millis() } else { faults.seed };
        Ok(Arc::new(UnreliableTarget {
            inner,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            faults: Mutex::new(faults),
            tries: Mutex::new(HashMap::new()),
            injected: Default::default(),
        }))
    }

    pub fn set_faults(&self, faults: Faults) -> Result<()> {
        faults.validate()?;
        *self.faults.lock().expect("faults lock") = faults;
        self.tries.lock().expect("tries lock").clear();
        Ok(())
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decides the fate of one operation; `Err` is the injected failure.
    async fn gate(&self, op: &'static str, key: &str) -> Result<()> {
        let f = self.faults.lock().expect("faults lock").clone();
        if f.only_keys_containing.as_ref().is_some_and(|text| !key.contains(text.as_str())) {
            return Ok(());
        }
        if f.latency_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(f.latency_ms)).await;
        }
        let fail = |why: &str| {
            self.injected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Error::Io {
                context: format!("target {op} {key}"),
                source: std::io::Error::other(format!("injected fault: {why}")),
                class: ErrorClass::Recoverable,
            }
        };
        if f.auth_failure {
            self.injected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Error::Unauthenticated(format!("{op} {key}: injected fault: credentials refused")));
        }
        let now = now_millis();
        if f.down || f.outages.iter().any(|(s, e)| (*s..*e).contains(&now)) {
            return Err(fail("target unavailable (outage)"));
        }
        if f.fail_first > 0 {
            let mut tries = self.tries.lock().expect("tries lock");
            let n = tries.entry((op, key.to_string())).or_insert(0);
            *n += 1;
            if *n <= f.fail_first {
                return Err(fail(&format!("try {n} of the first {} fails", f.fail_first)));
            }
        }
        if f.error_rate > 0.0 && self.rng.lock().expect("rng lock").random_bool(f.error_rate) {
            return Err(fail("503 service unavailable"));
        }
        Ok(())
    }
}

impl TargetStore for UnreliableTarget {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.gate("put", key).await?;
            self.inner.put(key, data).await
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            self.gate("get", key).await?;
            self.inner.get(key).await
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            self.gate("list", prefix).await?;
            self.inner.list(prefix).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.gate("delete", key).await?;
            self.inner.delete(key).await
        })
    }

    fn describe(&self) -> String {
        format!("unreliable({})", self.inner.describe())
    }
    fn name_segment(&self, name: &str) -> String {
        self.inner.name_segment(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{contract, LocalTarget};

    fn local() -> (tempfile::TempDir, Target) {
        let dir = tempfile::tempdir().unwrap();
        let t: Target = Arc::new(LocalTarget::open(dir.path()).unwrap());
        (dir, t)
    }

    #[tokio::test]
    async fn without_faults_it_meets_the_contract() {
        let (_d, inner) = local();
        let t = UnreliableTarget::new(inner, Faults::default()).unwrap();
        contract::run_contract(t.as_ref()).await;
        assert_eq!(t.injected(), 0);
    }

    #[tokio::test]
    async fn fail_first_fails_each_key_n_times_then_succeeds() {
        let (_d, inner) = local();
        let t = UnreliableTarget::new(inner, Faults { fail_first: 2, ..Default::default() }).unwrap();
        for key in ["vms/a/1", "vms/a/2"] {
            for _ in 0..2 {
                let e = t.put(key, Bytes::from_static(b"x")).await.unwrap_err();
                assert_eq!(e.class(), ErrorClass::Recoverable);
            }
            t.put(key, Bytes::from_static(b"x")).await.unwrap();
        }
        assert_eq!(t.injected(), 4);
    }

    #[tokio::test]
    async fn outages_auth_failures_and_error_rates() {
        let (_d, inner) = local();
        let t = UnreliableTarget::new(inner, Faults { down: true, ..Default::default() }).unwrap();
        assert_eq!(t.get("k").await.unwrap_err().class(), ErrorClass::Recoverable);
        let now = now_millis();
        t.set_faults(Faults { outages: vec![(now - 1000, now + 60_000)], ..Default::default() }).unwrap();
        assert!(t.put("k", Bytes::new()).await.is_err());
        t.set_faults(Faults { outages: vec![(now - 1000, now - 500)], ..Default::default() }).unwrap();
        t.put("k", Bytes::new()).await.unwrap();
        t.set_faults(Faults { auth_failure: true, ..Default::default() }).unwrap();
        let e = t.put("k", Bytes::new()).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::NonRecoverable);
        t.set_faults(Faults { error_rate: 0.3, seed: 9, ..Default::default() }).unwrap();
        let mut failed = 0;
        for i in 0..1000 {
            if t.put(&format!("k{i}"), Bytes::new()).await.is_err() {
                failed += 1;
            }
        }
        assert!((200..400).contains(&failed), "{failed} of 1000 failed at a 30% rate");
        assert!(t.set_faults(Faults { error_rate: 1.5, ..Default::default() }).is_err());
    }

    #[tokio::test]
    async fn faults_limited_to_some_keys_leave_the_others_alone() {
        let (_d, inner) = local();
        let only = Some(".manifest".to_string());
        let t = UnreliableTarget::new(inner, Faults { down: true, only_keys_containing: only, ..Default::default() })
            .unwrap();
        t.put("vms/a/1/objects/x", Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(t.list("vms/a/1/").await.unwrap(), vec!["vms/a/1/objects/x"]);
        let e = t.put("vms/a/1/points/0000000001.manifest", Bytes::new()).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Recoverable);
        assert_eq!(t.injected(), 1);
    }
}
