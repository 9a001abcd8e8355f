//! Helpers shared by the engine-level tests that drive one engine through
//! its public API: disk images, a protected VM, waiting on a state with a
//! deadline, and byte-for-byte restore checks. Each test file uses a part
//! of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_engine::config::AutoResync;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{Job, JobKind, JobStatus};
use ferry_engine::replica::manifest::{manifest_key, Manifest};
use ferry_engine::schedule::retry;
use ferry_engine::target::unreliable::Faults;
use ferry_engine::{DiskSpec, Engine, EngineConfig, PointSelector, VmInfo, VmSpec};
use rand::{Rng, SeedableRng};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// A disk image of `size` random bytes (seeded, so a failure reproduces).
pub fn random_disk(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let mut data = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, data).unwrap();
    p
}

/// A sparse, all-zero disk image.
pub fn sparse_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(format!("{name}.img"));
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// `len` random bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// How much faster than wall time policy time runs in these tests: a
/// retry minute is 30 ms, the 30-minute retry 0.9 s.
pub const POLICY_FACTOR: f64 = 2000.0;

/// Opens an engine whose policy time runs [`POLICY_FACTOR`] times faster.
pub async fn open_engine(config: EngineConfig) -> ferry_engine::Result<Engine> {
    open_engine_at(config, POLICY_FACTOR).await
}

/// Opens an engine whose policy time runs `factor` times faster.
pub async fn open_engine_at(config: EngineConfig, factor: f64) -> ferry_engine::Result<Engine> {
    let clock = std::sync::Arc::new(ferry_engine::clock::AcceleratedClock::new(factor)?);
    Engine::open_with_clock(config, clock).await
}

/// Configuration for tests (open it with [`open_engine`]): resyncs only
/// when the test asks (so `ResyncRequired` can be looked at), 64 KiB
/// objects (so a test controls how many parts a point has) and a fault
/// injector that starts with no faults.
pub fn config(dir: &Path) -> EngineConfig {
    let mut c = EngineConfig::new(dir.join("data"));
    c.auto_resync = AutoResync::Manual;
    c.chunk_size = 64 * KIB;
    c.faults = Some(Faults::default());
    c.host_id = Some(HOST_ID.into());
    c
}

/// The host id of [`config`].
pub const HOST_ID: &str = "test-host";

/// Where [`config`]'s engine keeps its objects: its host's folder in the
/// local target (`<target>/hosts/<host>`).
pub fn target_root(dir: &Path) -> PathBuf {
    dir.join("data").join("target").join("hosts").join(HOST_ID)
}

/// Protects `vm` with one disk per path (named after the file stem) and a
/// replication frequency of an hour, so only the test cuts points.
pub async fn protect(engine: &Engine, vm: &str, paths: &[&Path]) -> VmInfo {
    let disks = paths.iter().map(|p| DiskSpec { name: disk_name(p), path: p.to_path_buf() }).collect();
    engine.protect(VmSpec::new(vm, disks).with_frequency(Duration::from_secs(3600))).await.unwrap();
    let info = engine.wait_protected(vm, Duration::from_secs(60)).await.unwrap();
    wait_first_cycle(engine, vm).await;
    info
}

/// Waits until the cycle that follows the base commit (it ships the writes
/// made during the copy, usually nothing) has ended and no job runs. The
/// VM is Protected before that cycle's job even exists, so waiting for
/// "no job running" alone can return first, and a write made next can land
/// in that cycle: a point the test did not cut.
pub async fn wait_first_cycle(engine: &Engine, vm: &str) {
    eventually("the cycle after the base commit to end", Duration::from_secs(60), || async {
        let jobs = engine.jobs().await.unwrap();
        let cycled =
            jobs.iter().any(|j| j.vm == vm && j.kind == JobKind::DeltaReplication && j.status != JobStatus::Running);
        (cycled && jobs.iter().all(|j| j.status != JobStatus::Running)).then_some(())
    })
    .await
}

pub fn disk_name(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Polls `probe` until it returns `Some`, failing the test after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn wait_state(engine: &Engine, vm: &str, want: VmState) -> VmInfo {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = engine.vm(vm).await.unwrap();
        if info.state == want {
            return info;
        }
        assert!(Instant::now() < deadline, "VM {vm} never reached {want}: {info:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until no job runs (e.g. the empty cycle that follows the base commit).
pub async fn wait_idle(engine: &Engine) {
    eventually("every job to end", Duration::from_secs(60), || async {
        engine.jobs().await.unwrap().iter().all(|j| j.status != JobStatus::Running).then_some(())
    })
    .await
}

/// Cuts a recovery point and returns its seq; the VM must accept it. If
/// nothing is left to ship (a cycle the engine started itself, such as the
/// one after a base commit or a resync, took every write first), the
/// newest point's seq.
pub async fn replicate(engine: &Engine, vm: &str) -> u64 {
    match engine.replicate_now(vm).await.unwrap() {
        Some(point) => point.seq,
        None => engine.recovery_points(vm).await.unwrap().last().expect("a point").seq,
    }
}

/// Restores point `seq` into `out` and checks each named disk byte for byte.
pub async fn assert_point_equals(engine: &Engine, vm: &str, seq: u64, want: &[(&str, &[u8])], out: &Path) {
    let restored = engine.restore(vm, PointSelector::Seq(seq), out).await.unwrap();
    assert_eq!(restored.len(), want.len(), "point {seq} has {} disks", restored.len());
    for (name, bytes) in want {
        let got = std::fs::read(out.join(format!("{name}.img"))).unwrap();
        assert!(got == *bytes, "point {seq}: disk {name} differs from what it held at that point");
    }
}

/// Restores the latest point and checks every disk against its source file now.
pub async fn assert_latest_equals_sources(engine: &Engine, vm: &str, sources: &[&Path], out: &Path) {
    let seq = engine.recovery_points(vm).await.unwrap().last().expect("a point").seq;
    let want: Vec<(String, Vec<u8>)> = sources.iter().map(|p| (disk_name(p), std::fs::read(p).unwrap())).collect();
    let want: Vec<(&str, &[u8])> = want.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    assert_point_equals(engine, vm, seq, &want, out).await;
}

/// The manifest of point `seq` as stored on the local target, if any.
pub fn stored_manifest(root: &Path, vm: &str, generation: u64, seq: u64) -> Option<Manifest> {
    let key = manifest_key(vm, generation, seq);
    let bytes = std::fs::read(root.join(&key)).ok()?;
    Some(Manifest::decode(&key, &bytes).unwrap())
}

/// Object keys (files, not folders) stored under a key prefix folder.
pub fn stored_keys(root: &Path, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.join(prefix)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // a put in progress
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The paths of the change logs beside a disk, in seq order.
pub fn logs(disk: &Path) -> Vec<PathBuf> {
    ferry_engine::changelog::list_logs(disk).unwrap().into_iter().map(|(_, p)| p).collect()
}

/// The delta jobs of recovery point `seq`, oldest first: every attempt
/// (a failed job keeps the detail it started with, a successful one adds
/// what it stored).
pub async fn delta_attempts(engine: &Engine, seq: u64) -> Vec<Job> {
    let tag = format!("recovery point {seq}");
    engine
        .jobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|j| {
            j.kind == JobKind::DeltaReplication && (j.detail == tag || j.detail.starts_with(&format!("{tag} (")))
        })
        .collect()
}

/// How many of `jobs` failed.
pub fn failed(jobs: &[Job]) -> usize {
    jobs.iter().filter(|j| j.status == JobStatus::Failed).count()
}

/// Checks that retry `k` (attempt `k`, 1-based) started no earlier than
/// the policy's offset after the first failure (`RetryPolicy::offset`
/// times `scale`), and no later than that (or the end of the attempt
/// before it) plus `slack_ms`.
pub fn assert_retry_spacing(jobs: &[Job], scale: f64, slack_ms: u64) {
    let first_failure = jobs[0].ended_ms.unwrap();
    for k in 1..jobs.len() {
        let due = first_failure + retry::offset(k as u32).mul_f64(scale).as_millis() as u64;
        let started = jobs[k].started_ms;
        let prev_end = jobs[k - 1].ended_ms.unwrap();
        assert!(started >= due, "retry {k} started {} ms before it was due: {jobs:?}", due - started);
        assert!(
            started <= due.max(prev_end) + slack_ms,
            "retry {k} started {} ms late: {jobs:?}",
            started - due.max(prev_end)
        );
    }
}

/// Waits for `n` failed attempts of point `seq`.
pub async fn wait_failed_attempts(engine: &Engine, seq: u64, n: usize) {
    eventually(&format!("{n} failed attempts of point {seq}"), Duration::from_secs(30), || async {
        (failed(&delta_attempts(engine, seq).await) >= n).then_some(())
    })
    .await
}

/// Restores point `seq` of VM `vm` (generation `generation`) from `store`
/// alone into `out`, as a restore on another machine does.
pub async fn restore_from(
    store: &ferry_engine::target::Target,
    generation: u64,
    seq: u64,
    out: &Path,
    replace: bool,
) -> ferry_engine::Result<()> {
    let opts = ferry_engine::restore::RestoreOpts { parallelism: 4, only: None, durable: true, replace };
    ferry_engine::restore::restore_point(
        store,
        "vm",
        generation,
        seq,
        out,
        opts,
        Default::default(),
        Default::default(),
    )
    .await
    .map(|_| ())
}
