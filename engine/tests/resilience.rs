//! Resilience scenarios: faulty targets (error rate, outage, authentication
//! failure), retries, Critical and resume, pause, auto-resync by block
//! checksums, and an unclean shutdown. Each ends with a byte-identical restore.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_engine::config::AutoResync;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobKind, JobStatus};
use ferry_engine::target::unreliable::Faults;
use ferry_engine::{DiskSpec, Engine, EngineConfig, PointSelector, VmSpec};
use rand::{Rng, SeedableRng};
use support::{assert_retry_spacing, delta_attempts, failed, wait_first_cycle};

mod support;

const MIB: u64 = 1 << 20;

fn disk(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data[..]);
    let p = dir.join(format!("{name}.img"));
    std::fs::write(&p, data).unwrap();
    p
}

fn config(dir: &Path, faults: Option<Faults>) -> EngineConfig {
    let mut c = EngineConfig::new(dir.join("data"));
    c.auto_resync = AutoResync::Immediately;
    c.chunk_size = 256 << 10;
    c.faults = faults;
    c
}

async fn protect(engine: &Engine, vm: &str, paths: &[&Path]) {
    let disks = paths
        .iter()
        .map(|p| DiskSpec { name: p.file_stem().unwrap().to_string_lossy().into(), path: p.to_path_buf() })
        .collect();
    engine.protect(VmSpec::new(vm, disks).with_frequency(Duration::from_secs(3600))).await.unwrap();
}

async fn wait_state(engine: &Engine, vm: &str, want: VmState, timeout: Duration) -> ferry_engine::VmInfo {
    let deadline = Instant::now() + timeout;
    loop {
        let info = engine.vm(vm).await.unwrap();
        if info.state == want {
            return info;
        }
        assert!(Instant::now() < deadline, "waiting for {want}: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn churn(engine: &Engine, vm: &str, disk: &str, size: u64, seed: u64, n: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..n {
        let len = rng.random_range(1..=64u64) * 1024;
        let off = rng.random_range(0..(size - len) / 512) * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        engine.write(vm, disk, off, data).await.unwrap();
    }
    engine.flush(vm, disk).await.unwrap();
}

/// Cuts a point, retrying through recoverable failures until `timeout`.
async fn replicate_eventually(engine: &Engine, vm: &str, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        match engine.replicate_now(vm).await {
            Ok(Some(p)) => return p.seq,
            Ok(None) => return engine.vm(vm).await.unwrap().last_point_seq,
            Err(e) => {
                assert!(Instant::now() < deadline, "no recovery point before the deadline: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn assert_latest_equals_source(engine: &Engine, vm: &str, disks: &[&Path], out: &Path) {
    let restored = engine.restore(vm, PointSelector::Latest, out).await.unwrap();
    assert_eq!(restored.len(), disks.len());
    for src in disks {
        let name = src.file_stem().unwrap().to_string_lossy();
        let got = std::fs::read(out.join(format!("{name}.img"))).unwrap();
        assert!(got == std::fs::read(src).unwrap(), "disk {name} differs from its source");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_percent_target_errors_still_replicate_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", 4 * MIB, 1);
    let faults = Faults { error_rate: 0.3, seed: 42, ..Default::default() };
    let engine = support::open_engine(config(tmp.path(), Some(faults))).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(120)).await;
    for round in 0..3 {
        churn(&engine, "vm", "a", 4 * MIB, round, 20).await;
        replicate_eventually(&engine, "vm", Duration::from_secs(120)).await;
    }
    assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Protected);
    assert!(engine.injected_faults().unwrap() > 10, "30% of operations failed: {:?}", engine.injected_faults());
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// An outage of the target (a window of time in which every operation
/// fails) delays the next point without losing it: every attempt is the
/// same point, each retry starts when the backoff policy says, nothing
/// commits until the outage is over, the first retry after it commits by
/// itself, the VM never leaves Protected, and that point is the disk as
/// written before the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_is_retried_on_the_backoff_schedule_and_the_point_after_it_restores() {
    // 1 minute -> 600 ms, so the policy's spacing (0.6, 1.2, 2.4 s after the
    // first failure) shows beside a failing attempt's own quick put tries
    // (about 0.7 s); the outage lasts 3 s, so two or three retries fail.
    const SCALE: f64 = 0.01;
    const SLACK_MS: u64 = 750;
    const OUTAGE_MS: u64 = 3000;
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", 4 * MIB, 2);
    let cfg = config(tmp.path(), Some(Faults::default()));
    let engine = support::open_engine_at(cfg, 1.0 / SCALE).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    wait_first_cycle(&engine, "vm").await; // or the writes below could go into it, before the outage
    let before = engine.vm("vm").await.unwrap();
    churn(&engine, "vm", "a", 4 * MIB, 7, 30).await;
    let written = std::fs::read(&a).unwrap(); // what point 2 must hold

    let start = ferry_engine::model::now_millis();
    let end = start + OUTAGE_MS;
    engine.set_faults(Faults { outages: vec![(start, end)], ..Default::default() }).unwrap();
    let e = engine.replicate_now("vm").await.unwrap_err();
    assert!(e.to_string().contains("target unavailable (outage)"), "{e}");
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::Protected, "recoverable: no state change");
    assert!(info.reason.as_deref().unwrap_or_default().contains("target unavailable (outage)"), "{info:?}");
    assert!(info.disks[0].pending_log_bytes > 0, "the backlog is kept");

    // Nobody switches the outage off: a retry after its end commits point 2.
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine.vm("vm").await.unwrap().last_point_seq < 2 {
        assert!(Instant::now() < deadline, "no point after the outage: {:?}", delta_attempts(&engine, 2).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let jobs = delta_attempts(&engine, 2).await;
    let fails = failed(&jobs);
    let timeline: Vec<_> = jobs
        .iter()
        .map(|j| (j.started_ms as i64 - start as i64, j.ended_ms.map(|e| e as i64 - start as i64), j.status))
        .collect();
    eprintln!("attempts of point 2 (ms after the outage began at 0, ended at {OUTAGE_MS}): {timeline:?}");
    // The first try and at least one retry fell in the outage; then one success.
    assert!(fails >= 2 && jobs.len() == fails + 1, "{jobs:?}");
    assert_eq!(jobs.last().unwrap().status, JobStatus::Succeeded, "{jobs:?}");
    for j in &jobs[..fails] {
        assert!(j.error.as_deref().unwrap_or_default().contains("target unavailable (outage)"), "{j:?}");
        assert!(j.started_ms < end, "a failed attempt started after the outage: {j:?}");
    }
    assert!(jobs.last().unwrap().ended_ms.unwrap() >= end, "committed during the outage: {jobs:?}");
    assert_retry_spacing(&jobs, SCALE, SLACK_MS);

    // Back to normal: Protected, no reason left, no state change on the way.
    let info = engine.vm("vm").await.unwrap();
    assert_eq!((info.state, info.reason.as_deref()), (VmState::Protected, None), "{info:?}");
    assert_eq!(info.transitions, before.transitions, "an outage changes no state: {info:?}");
    assert_eq!(info.last_point_seq, 2, "one point for the backlog, committed once: {info:?}");
    assert_eq!(engine.recovery_points("vm").await.unwrap().iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
    let out = tmp.path().join("p2");
    engine.restore("vm", PointSelector::Seq(2), &out).await.unwrap();
    assert!(std::fs::read(out.join("a.img")).unwrap() == written, "point 2 is the disk as written before the outage");
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_authentication_failure_is_critical_until_the_operator_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", 4 * MIB, 3);
    let engine = support::open_engine(config(tmp.path(), Some(Faults::default()))).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    engine.set_faults(Faults { auth_failure: true, ..Default::default() }).unwrap();
    churn(&engine, "vm", "a", 4 * MIB, 9, 10).await;
    assert!(engine.replicate_now("vm").await.is_err());
    let info = wait_state(&engine, "vm", VmState::Critical, Duration::from_secs(10)).await;
    assert!(info.reason.as_deref().unwrap_or("").contains("target authentication failed"), "{info:?}");
    // No retry: the job count stays put for many scaled retry periods.
    let jobs = engine.jobs().await.unwrap().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(engine.jobs().await.unwrap().len(), jobs, "a Critical VM does not retry by itself");
    assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Critical);
    // The operator fixes the credentials and resumes.
    engine.set_faults(Faults::default()).unwrap();
    let info = engine.resume("vm").await.unwrap();
    assert_eq!(info.state, VmState::Protected);
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_over_half_the_disk_resync_by_block_checksums() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let a = disk(tmp.path(), "a", size, 4);
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    // Rewrite the same 1 MiB five times: 5 MiB of logs (> 50%), 1 MiB changed.
    for pass in 0..5u8 {
        for k in 0..16u64 {
            engine.write("vm", "a", 2 * MIB + k * 65536, vec![pass ^ k as u8; 65536]).await.unwrap();
        }
    }
    engine.flush("vm", "a").await.unwrap();
    // Immediately-mode auto-resync runs by itself and comes back to Protected.
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let jobs = engine.jobs().await.unwrap();
        if let Some(j) = jobs.iter().find(|j| j.kind == JobKind::Resync && j.status == JobStatus::Succeeded) {
            break j.clone();
        }
        assert!(Instant::now() < deadline, "no resync: {:?}", engine.vm("vm").await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let info = engine.vm("vm").await.unwrap();
    assert!(
        info.transitions.iter().any(|t| t.to == VmState::ResyncRequired
            && t.reason.starts_with("change logs of disk a reached ")
            && t.reason.ends_with(" bytes, 50% of its size")),
        "{info:?}"
    );
    // Only the 256 changed blocks (4 KiB each) were sent.
    assert!(job.detail.contains("compared 2048 blocks, sent 256 blocks"), "{}", job.detail);
    let p = engine.recovery_points("vm").await.unwrap();
    let resync_point = p.iter().find(|x| job.detail.starts_with(&format!("recovery point {}: ", x.seq))).unwrap();
    assert!(resync_point.bytes_logical == MIB && resync_point.bytes_stored < size, "{resync_point:?}");
    // Writes during and after the resync are replicated too.
    churn(&engine, "vm", "a", size, 11, 20).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(30)).await;
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// Protects one 4 MiB disk, writes `n` flushed writes into its open log
/// and drops the engine without shutdown, as kill -9 leaves it: the active
/// log is open. Returns the disk, its content and the open log.
async fn crash_with_open_log(tmp: &Path, seed: u64, n: usize) -> (PathBuf, Vec<u8>, PathBuf) {
    let a = disk(tmp, "a", 4 * MIB, seed);
    {
        let engine = support::open_engine(config(tmp, None)).await.unwrap();
        protect(&engine, "vm", &[&a]).await;
        wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
        wait_first_cycle(&engine, "vm").await; // so every write below stays in the open log
        churn(&engine, "vm", "a", 4 * MIB, seed + 1, n).await;
    }
    let (_, log) = ferry_engine::changelog::list_logs(&a).unwrap().pop().unwrap();
    let found = ferry_engine::changelog::scan(&log).unwrap();
    assert!(!found.clean, "the dropped engine left its log open: {found:?}");
    assert!(found.records.len() >= n, "the {n} writes are in the log (in the kernel) without any seal: {found:?}");
    (a.clone(), std::fs::read(&a).unwrap(), log)
}

/// Writes `bytes` right after the log's records, over the zeros its
/// writer wrote ahead: what an append cut short by a kill leaves.
fn write_after_records(path: &Path, bytes: &[u8]) {
    let end = ferry_engine::changelog::scan(path).unwrap().valid_len;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, end).unwrap();
}

/// Waits until the restarted VM is Protected with nothing running, and
/// checks it never needed a resync.
async fn assert_resumed_without_resync(engine: &Engine) {
    let info = wait_state(engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    assert!(info.transitions.iter().all(|t| t.to != VmState::ResyncRequired), "no resync after the crash: {info:?}");
    assert!(engine.jobs().await.unwrap().iter().all(|j| j.kind != JobKind::Resync), "no Resync job");
}

/// A torn record at the end (a crash mid-append) is cut; every complete
/// record is kept and shipped by the next cycle: no resync, no full read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_log_with_a_torn_tail_is_trusted_after_a_crash_and_shipped() {
    const TORN: [u8; 7] = [0x48, 0x52, 0x4c, 0x52, 1, 2, 3]; // a record magic ("HRLR"), then garbage
    let tmp = tempfile::tempdir().unwrap();
    let (a, content, log) = crash_with_open_log(tmp.path(), 12, 20).await;
    let records = ferry_engine::changelog::scan(&log).unwrap().records.len();
    write_after_records(&log, &TORN);
    let found = ferry_engine::changelog::scan(&log).unwrap();
    assert_eq!(found.records.len(), records, "{found:?}");
    assert_eq!(found.tail, ferry_engine::changelog::Tail::Torn);

    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    assert_resumed_without_resync(&engine).await;
    // The open log was sealed as found (tail cut) and waits for upload.
    let sealed = ferry_engine::changelog::scan(&log).unwrap();
    assert!(sealed.clean && sealed.records.len() == records && sealed.torn_bytes == 0, "{sealed:?}");
    let before = engine.vm("vm").await.unwrap().last_point_seq;
    let point = replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_eq!(point, before + 1, "the crash's log makes the next point");
    assert_eq!(std::fs::read(&a).unwrap(), content, "the restart changed nothing on the disk");
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    churn(&engine, "vm", "a", 4 * MIB, 13, 10).await;
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out2")).await;
    engine.shutdown().await.unwrap();
}

/// A write whose record reached the log but whose disk write had not
/// happened when the daemon died is replayed onto the disk at restart, so
/// disk and replica agree (the write was never acknowledged; either
/// outcome is allowed, but both sides must have the same one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_logged_write_missing_from_the_disk_is_replayed_at_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, content, log) = crash_with_open_log(tmp.path(), 22, 10).await;
    let found = ferry_engine::changelog::scan(&log).unwrap();
    let last = *found.records.last().unwrap();
    // Undo the last record's disk write, as if the kill came between the
    // append and the disk write.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&vec![0xEE; last.len as usize], last.offset).unwrap();
    }
    assert_ne!(std::fs::read(&a).unwrap(), content);
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    assert_resumed_without_resync(&engine).await;
    assert_eq!(std::fs::read(&a).unwrap(), content, "the replay put the logged write on the disk");
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// Sets the boot id in a log's header (bytes 176..192) and fixes its crc
/// (bytes 192..196, over 0..192), as a log written before a reboot reads.
fn set_boot_id(log: &Path, boot_id: u128) {
    let mut bytes = std::fs::read(log).unwrap();
    bytes[176..192].copy_from_slice(&boot_id.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..192]);
    bytes[192..196].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(log, bytes).unwrap();
}

/// After a reboot the page cache that held the open log is gone: the log
/// is not trusted and the VM resyncs, with the reason saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_log_from_before_a_reboot_forces_a_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _, log) = crash_with_open_log(tmp.path(), 32, 10).await;
    set_boot_id(&log, ferry_engine::changelog::boot_id() ^ 1);
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    let info = wait_state(&engine, "vm", VmState::ResyncRequired, Duration::from_secs(60)).await;
    let reason = info.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&log.display().to_string()) && reason.contains("left open before the host restarted"),
        "{reason}"
    );
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await; // auto-resync: immediately
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// Data after a bad record is damage, not a crash: resync, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_log_damaged_before_its_end_forces_a_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, _, log) = crash_with_open_log(tmp.path(), 42, 10).await;
    let found = ferry_engine::changelog::scan(&log).unwrap();
    // Flip a payload byte of the first record: the records after it remain.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&log).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, found.records[0].payload_pos).unwrap();
        f.write_all_at(&[b[0] ^ 0xFF], found.records[0].payload_pos).unwrap();
    }
    assert!(matches!(ferry_engine::changelog::scan(&log).unwrap().tail, ferry_engine::changelog::Tail::Damaged(_)));
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    let info = wait_state(&engine, "vm", VmState::ResyncRequired, Duration::from_secs(60)).await;
    let reason = info.reason.clone().unwrap_or_default();
    assert!(reason.contains("is damaged") && reason.contains("checksum mismatch"), "{reason}");
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pause_keeps_tracking_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", 4 * MIB, 6);
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    assert_eq!(engine.pause("vm").await.unwrap().state, VmState::Paused);
    churn(&engine, "vm", "a", 4 * MIB, 14, 10).await;
    assert!(engine.replicate_now("vm").await.is_err(), "no cycles while paused");
    assert!(engine.vm("vm").await.unwrap().disks[0].active_log_bytes > 4096, "writes are tracked while paused");
    assert!(engine.pause("vm").await.is_err(), "pausing twice is refused");
    assert_eq!(engine.resume("vm").await.unwrap().state, VmState::Protected);
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// The replica hashes kept as points commit match the replica itself:
/// every kept hash equals the restored block's hash or is UNKNOWN.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kept_replica_hashes_match_the_replica() {
    use ferry_engine::hashes::{self, BlockHashes, UNKNOWN};
    let tmp = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let a = disk(tmp.path(), "a", size, 21);
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for _ in 0..3 {
        for _ in 0..30 {
            // Unaligned on purpose: partly covered blocks must become UNKNOWN.
            let len = rng.random_range(1..=20_000u64);
            let off = rng.random_range(0..size - len);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            engine.write("vm", "a", off, data).await.unwrap();
        }
        engine.disk("vm", "a").unwrap().write_zeroes(8192, 12288, false).unwrap();
        replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    }
    let last = engine.vm("vm").await.unwrap().last_point_seq;
    let kept = BlockHashes::load(&hashes::path(&tmp.path().join("data"), "vm", "a")).expect("hashes are kept");
    assert_eq!(kept.seq, last, "kept hashes describe the last committed point");
    let out = tmp.path().join("out");
    engine.restore("vm", PointSelector::Latest, &out).await.unwrap();
    let actual = ferry_engine::resync::hash_file(&out.join("a.img"), size, kept.block).unwrap();
    assert_eq!(actual.len(), kept.hashes.len());
    let mut unknown = 0;
    for (i, (k, a)) in kept.hashes.iter().zip(&actual).enumerate() {
        if *k == UNKNOWN {
            unknown += 1;
        } else {
            assert_eq!(k, a, "block {i}: kept hash differs from the replica");
        }
    }
    assert!(unknown > 0 && unknown < actual.len() / 4, "{unknown} of {} unknown", actual.len());
    engine.shutdown().await.unwrap();

    // Without kept hashes (lost file), a resync reads the replica once instead.
    drop(engine);
    std::fs::remove_file(hashes::path(&tmp.path().join("data"), "vm", "a")).unwrap();
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    engine.write("vm", "a", 0, vec![9u8; 8192]).await.unwrap();
    engine.resync("vm").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        if let Some(j) = engine
            .jobs()
            .await
            .unwrap()
            .into_iter()
            .find(|j| j.kind == JobKind::Resync && j.status != JobStatus::Running)
        {
            break j;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert!(job.detail.contains("compared 1024 blocks, sent 2 blocks"), "{}", job.detail);
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(30)).await;
    assert!(
        BlockHashes::load(&hashes::path(&tmp.path().join("data"), "vm", "a")).is_some(),
        "kept again after the resync"
    );
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out2")).await;
    engine.shutdown().await.unwrap();
}

/// A daemon stopped while a resync runs starts the resync again on restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resync_interrupted_by_a_stop_runs_again_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", 4 * MIB, 31);
    {
        // Slow puts keep the resync running long enough to stop in the middle of it.
        let engine = support::open_engine(config(tmp.path(), Some(Faults::default()))).await.unwrap();
        protect(&engine, "vm", &[&a]).await;
        wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
        churn(&engine, "vm", "a", 4 * MIB, 32, 40).await;
        engine.set_faults(Faults { latency_ms: 300, ..Default::default() }).unwrap();
        engine.resync("vm").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Resynchronizing);
        engine.shutdown().await.unwrap();
    }
    let engine = support::open_engine(config(tmp.path(), None)).await.unwrap();
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    let resyncs = engine.jobs().await.unwrap().into_iter().filter(|j| j.kind == JobKind::Resync).collect::<Vec<_>>();
    assert!(resyncs.iter().any(|j| j.status == JobStatus::Succeeded), "{resyncs:?}");
    churn(&engine, "vm", "a", 4 * MIB, 33, 10).await;
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// A resync started while a cycle is still uploading: the two never write
/// the same keys, and every listed point restores (checksums verified).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resync_during_a_running_cycle_leaves_every_point_restorable() {
    let tmp = tempfile::tempdir().unwrap();
    let a = disk(tmp.path(), "a", 4 * MIB, 41);
    let engine = std::sync::Arc::new(support::open_engine(config(tmp.path(), Some(Faults::default()))).await.unwrap());
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    churn(&engine, "vm", "a", 4 * MIB, 42, 40).await;
    engine.set_faults(Faults { latency_ms: 150, ..Default::default() }).unwrap();
    let e2 = engine.clone();
    let cycle = tokio::spawn(async move { e2.replicate_now("vm").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    engine.resync("vm").await.unwrap();
    let _ = cycle.await.unwrap(); // superseded or committed: either is fine
    engine.set_faults(Faults::default()).unwrap();
    wait_state(&engine, "vm", VmState::Protected, Duration::from_secs(60)).await;
    churn(&engine, "vm", "a", 4 * MIB, 43, 10).await;
    replicate_eventually(&engine, "vm", Duration::from_secs(30)).await;
    assert_latest_equals_source(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    let points = engine.recovery_points("vm").await.unwrap();
    let seqs: Vec<u64> = points.iter().map(|p| p.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    for p in &points {
        let out = tmp.path().join(format!("p{}", p.seq));
        engine.restore("vm", PointSelector::Seq(p.seq), &out).await.unwrap_or_else(|e| panic!("point {}: {e}", p.seq));
    }
    engine.shutdown().await.unwrap();
}
