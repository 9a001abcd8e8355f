//! Restart paths, each made deterministic: the change logs found beside a
//! disk at start-up are trusted only when every one is readable, cleanly
//! closed and chained (a gap, a damaged header or a damaged record means
//! `ResyncRequired`, with that reason); a stop during initial replication
//! starts protection over and still ends byte-identical; unprotecting a
//! real VM removes its logs but keeps its replica, and it can be protected
//! again. (A failed log write has its own test binary, `log_write_failure`,
//! because it changes a process-wide limit.)

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::snapshot;
use ferry_engine::error::ErrorKind;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobKind, JobStatus, PointKind};
use ferry_engine::replica::manifest::vm_prefix;
use ferry_engine::target::LocalTarget;
use ferry_engine::throttle::{BandwidthPolicy, MIN_LIMIT_BPS};
use ferry_engine::changelog;
use support::*;

/// A protected 1 MiB disk with three sealed logs beside it, each holding
/// one write: three sessions, each ending with a clean shutdown (which
/// seals the active log) and none cutting a point. Returns the disk and
/// the logs in chain order.
async fn three_sealed_logs(tmp: &Path) -> (PathBuf, Vec<PathBuf>) {
    let a = random_disk(tmp, "a", MIB, 1);
    for session in 0..3u64 {
        let engine = open_engine(config(tmp)).await.unwrap();
        if session == 0 {
            protect(&engine, "vm", &[&a]).await;
        }
        engine.write("vm", "a", session * 64 * KIB, random_bytes(8192, 10 + session)).await.unwrap();
        engine.flush("vm", "a").await.unwrap();
        engine.shutdown().await.unwrap();
    }
    let found = logs(&a);
    assert_eq!(found.len(), 3, "{found:?}");
    for l in &found {
        let scan = changelog::scan(l).unwrap();
        assert!(scan.clean && scan.records.len() == 1, "{l:?}: {scan:?}");
    }
    (a, found)
}

/// Restarts after `damage` to the logs and checks the VM distrusts them
/// with a reason containing every one of `why`; then an operator resync
/// brings the replica back to the disk's content, writes of all three
/// sessions included.
async fn restart_distrusts(damage: impl FnOnce(&[PathBuf]), why: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, found) = three_sealed_logs(tmp.path()).await;
    damage(&found);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let info = wait_state(&engine, "vm", VmState::ResyncRequired).await;
    let reason = info.reason.clone().unwrap_or_default();
    for w in why {
        assert!(reason.contains(w), "reason {reason:?} does not say {w:?}");
    }
    // None of the logs is trusted, not even those before the damage: they are
    // discarded, and no point is cut from them.
    eventually("the logs to be discarded", Duration::from_secs(10), || async { logs(&a).is_empty().then_some(()) })
        .await;
    let e = engine.replicate_now("vm").await.unwrap_err();
    assert!(e.to_string().contains("ResyncRequired"), "{e}");
    engine.resync("vm").await.unwrap();
    wait_state(&engine, "vm", VmState::Protected).await;
    let points = engine.recovery_points("vm").await.unwrap();
    assert_eq!(points.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![1, 2], "{points:?}");
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

fn flip_byte_at(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_log_missing_from_the_middle_of_the_chain_requires_a_resync() {
    restart_distrusts(
        |logs| std::fs::remove_file(&logs[1]).unwrap(),
        &["broken change log chain on disk a", "seq 3 does not follow seq 1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_log_with_a_damaged_header_requires_a_resync() {
    restart_distrusts(
        |logs| flip_byte_at(&logs[1], 152), // inside log_id, covered by the header crc
        &["00000002.hrl is unreadable", "header checksum mismatch"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_log_with_a_damaged_record_requires_a_resync() {
    // A byte of the first record's payload: the log says it was sealed, so
    // it must verify whole; it is not cut back like a torn tail.
    let at = changelog::HEADER_SIZE + changelog::RECORD_HEADER_SIZE + 100;
    restart_distrusts(|logs| flip_byte_at(&logs[1], at), &["00000002.hrl is unreadable", "checksum mismatch"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_during_initial_replication_starts_protection_over_and_ends_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 2);
    let first_generation;
    {
        // 512 Kbps: sixteen 64 KiB objects of random data take about 16 s.
        let mut cfg = config(tmp.path());
        cfg.bandwidth = BandwidthPolicy::flat(Some(MIN_LIMIT_BPS));
        let engine = open_engine(cfg).await.unwrap();
        let spec = ferry_engine::VmSpec::new("vm", vec![ferry_engine::DiskSpec { name: "a".into(), path: a.clone() }])
            .with_frequency(Duration::from_secs(3600));
        first_generation = engine.protect(spec).await.unwrap().generation;
        let copy =
            eventually("the copy to be under way", Duration::from_secs(30), || async {
                engine.jobs().await.unwrap().into_iter().find(|j| {
                    j.kind == JobKind::InitialReplication && j.status == JobStatus::Running && j.bytes_done > 0
                })
            })
            .await;
        assert!(copy.bytes_done < copy.bytes_total, "{copy:?}");
        // A write in the middle of the copy (copy-before-write keeps the snapshot).
        engine.write("vm", "a", 100 * KIB, random_bytes(8192, 3)).await.unwrap();
        engine.flush("vm", "a").await.unwrap();
        assert_eq!(engine.vm("vm").await.unwrap().state, VmState::InitialReplication);
        engine.shutdown().await.unwrap();
    }
    let engine = open_engine(config(tmp.path())).await.unwrap();
    engine.write("vm", "a", 300 * KIB, random_bytes(8192, 4)).await.unwrap();
    let info = engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
    // Started over under a new generation: the first, unfinished replica is never mixed in.
    assert!(info.generation > first_generation, "{} vs {first_generation}", info.generation);
    let root = target_root(tmp.path());
    assert!(stored_keys(&root, &format!("{}/points", vm_prefix("vm", first_generation))).is_empty());
    assert!(info.transitions.iter().filter(|t| t.to == VmState::InitialReplication).count() >= 2, "{info:?}");
    let first_copy = engine.jobs().await.unwrap().into_iter().find(|j| j.kind == JobKind::InitialReplication).unwrap();
    assert_eq!(first_copy.status, JobStatus::Failed, "the interrupted copy is not shown running: {first_copy:?}");
    assert_eq!(
        first_copy.error.as_deref(),
        Some("interrupted: the daemon stopped while the job ran"),
        "{first_copy:?}"
    );
    let points = engine.recovery_points("vm").await.unwrap();
    // The new base (point 1), then perhaps a delta with the write made during the new copy.
    assert_eq!((points[0].seq, points[0].kind), (1, PointKind::Base), "{points:?}");
    assert!(snapshot::side_files(&a).is_empty(), "the snapshot's space was reclaimed");
    // Both writes (before the stop and after the restart) are in the replica.
    wait_idle(&engine).await;
    engine.write("vm", "a", 500 * KIB, random_bytes(8192, 5)).await.unwrap();
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unprotecting_a_protected_vm_removes_its_logs_keeps_its_replica_and_allows_protecting_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let a = random_disk(tmp.path(), "a", MIB, 6);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let old_generation = protect(&engine, "vm", &[&a]).await.generation;
    engine.write("vm", "a", 0, random_bytes(64 * KIB as usize, 7)).await.unwrap();
    assert_eq!(replicate(&engine, "vm").await, 2);
    let at2 = std::fs::read(&a).unwrap();
    // A backlog too: a sealed log of a failed cycle and an active one with a record.
    engine.set_faults(ferry_engine::target::unreliable::Faults { down: true, ..Default::default() }).unwrap();
    engine.write("vm", "a", 128 * KIB, random_bytes(4096, 8)).await.unwrap();
    assert!(engine.replicate_now("vm").await.is_err());
    engine.write("vm", "a", 256 * KIB, random_bytes(4096, 9)).await.unwrap();
    assert_eq!(logs(&a).len(), 2);
    engine.set_faults(Default::default()).unwrap();

    engine.unprotect("vm").await.unwrap();
    assert!(logs(&a).is_empty(), "change logs left beside the disk: {:?}", logs(&a));
    assert!(snapshot::side_files(&a).is_empty());
    assert!(!data.join("hashes").join("vm").exists(), "kept replica hashes left behind");
    assert_eq!(engine.vm("vm").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(engine.recovery_points("vm").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(engine.disk("vm", "a").err().map(|e| e.kind()), Some(ErrorKind::NotFound));
    assert!(engine.exports().is_empty());

    // The replica stays on the target and restores with the target alone.
    let target: ferry_engine::target::Target = std::sync::Arc::new(LocalTarget::open(target_root(tmp.path())).unwrap());
    let out = tmp.path().join("kept");
    let opts = ferry_engine::restore::RestoreOpts { parallelism: 4, only: None, durable: true };
    ferry_engine::restore::restore_point(
        &target,
        "vm",
        old_generation,
        2,
        &out,
        opts,
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    assert!(std::fs::read(out.join("a.img")).unwrap() == at2, "the kept replica differs from point 2");

    // Protected again: a new replica beside the old one, which stays intact.
    let info = protect(&engine, "vm", &[&a]).await;
    assert_ne!(info.generation, old_generation);
    assert_eq!(info.disks[0].pending_log_bytes, 0, "the old backlog does not come back");
    engine.write("vm", "a", 512 * KIB, random_bytes(4096, 10)).await.unwrap();
    assert_eq!(replicate(&engine, "vm").await, 2);
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("new")).await;
    let old = tmp.path().join("old-again");
    ferry_engine::restore::restore_point(
        &target,
        "vm",
        old_generation,
        2,
        &old,
        opts,
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    assert!(std::fs::read(old.join("a.img")).unwrap() == at2);
    engine.shutdown().await.unwrap();
}
