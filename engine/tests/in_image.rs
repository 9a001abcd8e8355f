//! Large writes leave their bytes in the disk image (`capture::held`): the
//! log names the range, and the bytes are read from the image when the
//! point is shipped. Each point must still be the disk as it was at its
//! rotation while the guest overwrites those bytes during the upload, after
//! an upload that failed, and across a crash of the engine with sealed logs
//! waiting.

mod support;

use std::path::Path;
use std::time::Duration;

use ferry_engine::changelog::{self, RecordKind};
use ferry_engine::disk::IN_IMAGE_MIN;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobKind, JobStatus};
use ferry_engine::target::unreliable::Faults;
use ferry_engine::Engine;
use support::*;

const SIZE: u64 = 32 * MIB;

/// A large write (logged by range) and a small one (logged with its bytes)
/// into `[at, at + 1 MiB)`, then a flush.
async fn writes(engine: &Engine, at: u64, seed: u64) {
    engine.write("vm", "a", at, random_bytes(MIB as usize, seed)).await.unwrap();
    engine.write("vm", "a", at + 300 * KIB, random_bytes(4096, seed + 1)).await.unwrap();
    engine.write("vm", "a", at + 700 * KIB, random_bytes(2 * IN_IMAGE_MIN as usize, seed + 2)).await.unwrap();
    engine.flush("vm", "a").await.unwrap();
}

/// A VM with one random disk `a` (seeded `seed`), protected, idle.
async fn protected_vm(seed: u64) -> (tempfile::TempDir, std::path::PathBuf, Engine) {
    protected_vm_at(seed, POLICY_FACTOR).await
}

/// The same on a policy clock `factor` times faster than wall time.
async fn protected_vm_at(seed: u64, factor: f64) -> (tempfile::TempDir, std::path::PathBuf, Engine) {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", SIZE, seed);
    let engine = open_engine_at(config(tmp.path()), factor).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_idle(&engine).await;
    (tmp, a, engine)
}

fn in_image_records(disk: &Path) -> usize {
    logs(disk)
        .iter()
        .filter_map(|l| changelog::scan(l).ok())
        .flat_map(|s| s.records)
        .filter(|r| r.kind == RecordKind::InImage)
        .count()
}

/// Cuts a point on a slow target and, once its rotation is done (its job
/// runs), overwrites `[at, at + 1 MiB)` for each of `overwrite`; the point
/// must be the disk before those writes.
async fn point_while_overwriting(engine: &Engine, a: &Path, overwrite: &[u64], seed: u64, out: &Path) {
    let before = std::fs::read(a).unwrap();
    engine.set_faults(Faults { latency_ms: 300, ..Faults::default() }).unwrap();
    let overwrite = async {
        eventually("the cycle's upload to run", Duration::from_secs(30), || async {
            let jobs = engine.jobs().await.unwrap();
            jobs.iter().any(|j| j.kind == JobKind::DeltaReplication && j.status == JobStatus::Running).then_some(())
        })
        .await;
        for &at in overwrite {
            writes(engine, at, seed + at).await;
        }
    };
    let (cut, ()) = tokio::join!(engine.replicate_now("vm"), overwrite);
    let point = cut.unwrap().expect("a point");
    engine.set_faults(Faults::default()).unwrap();
    assert_point_equals(engine, "vm", point.seq, &[("a", &before)], out).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_writes_replicate_as_of_their_rotation_across_failed_uploads_and_a_crash() {
    let (tmp, a, engine) = protected_vm(1).await;

    // A point while the guest overwrites what its log left in the image.
    writes(&engine, 0, 10).await;
    assert!(in_image_records(&a) >= 2, "large writes are logged by range");
    point_while_overwriting(&engine, &a, &[64 * KIB], 100, &tmp.path().join("p1")).await;

    // A cycle that fails: its log stays sealed, its bytes held, while the
    // guest overwrites them; then the engine crashes.
    writes(&engine, 2 * MIB, 20).await;
    engine.set_faults(Faults { down: true, ..Faults::default() }).unwrap();
    assert!(engine.replicate_now("vm").await.is_err(), "the target is down");
    let held: Vec<_> = logs(&a).iter().map(|l| changelog::held_path(l)).filter(|h| h.exists()).collect();
    assert!(!held.is_empty(), "a sealed log with in-image records holds its bytes");
    writes(&engine, 2 * MIB + 128 * KIB, 30).await;
    writes(&engine, 4 * MIB, 40).await;
    // A large write over a small one of the same log: the restart's replay
    // of the open log must not put the small one's bytes back.
    writes(&engine, 4 * MIB + 256 * KIB, 45).await;
    let before_crash = std::fs::read(&a).unwrap();
    drop(engine); // no shutdown: the active log is left open

    let engine = open_engine(config(tmp.path())).await.unwrap();
    let info = wait_state(&engine, "vm", VmState::Protected).await;
    assert!(std::fs::read(&a).unwrap() == before_crash, "the replay kept every acknowledged write");
    assert!(info.transitions.iter().all(|t| t.to != VmState::ResyncRequired), "the logs were trusted: {info:?}");
    wait_idle(&engine).await;
    // The point ships the logs from before the crash, while the guest
    // overwrites their bytes again.
    point_while_overwriting(
        &engine,
        &a,
        &[64 * KIB, 2 * MIB + 64 * KIB, 4 * MIB + 64 * KIB],
        200,
        &tmp.path().join("p2"),
    )
    .await;
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("last")).await;
    assert!(engine.jobs().await.unwrap().iter().all(|j| j.kind != JobKind::Resync), "no resync");
    let left: Vec<_> = changelog::held_files(&a).unwrap();
    assert!(left.is_empty(), "held side files are deleted once their point is committed: {left:?}");
    engine.shutdown().await.unwrap();
}

/// A point whose upload read every held block, put every part and then
/// failed at the commit, while the guest overwrote some of those blocks
/// (which, read by that attempt, were not saved again): the next attempt
/// rotates again and its point is exactly the disk at its own rotation,
/// also when the guest writes into those blocks during that next upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_an_upload_that_read_the_held_bytes_is_the_disk_at_its_rotation() {
    // Wall-time policy: the first retry is a minute away, only the test cuts points.
    let (tmp, a, engine) = protected_vm_at(3, 1.0).await;
    writes(&engine, 0, 10).await;
    writes(&engine, 3 * MIB, 11).await;
    let manifests_down = Faults { down: true, only_keys_containing: Some(".manifest".into()), ..Faults::default() };
    engine.set_faults(manifests_down).unwrap();
    assert!(engine.replicate_now("vm").await.is_err(), "the commit fails");
    engine.set_faults(Faults::default()).unwrap();
    // Into blocks the failed upload read: partly, wholly, and by a small write.
    writes(&engine, 64 * KIB, 12).await;
    writes(&engine, 3 * MIB + 200 * KIB, 13).await;
    engine.write("vm", "a", 500 * KIB, random_bytes(1000, 14)).await.unwrap();
    engine.flush("vm", "a").await.unwrap();
    let now = std::fs::read(&a).unwrap();
    let point = engine.replicate_now("vm").await.unwrap().expect("a point");
    assert_point_equals(&engine, "vm", point.seq, &[("a", &now)], &tmp.path().join("p")).await;

    // Once more, but the guest writes into those blocks while the next
    // attempt uploads: what the failed attempt read is guarded again.
    writes(&engine, 0, 20).await;
    engine
        .set_faults(Faults { down: true, only_keys_containing: Some(".manifest".into()), ..Faults::default() })
        .unwrap();
    assert!(engine.replicate_now("vm").await.is_err(), "the commit fails");
    point_while_overwriting(&engine, &a, &[64 * KIB, 0], 300, &tmp.path().join("q")).await;
    engine.shutdown().await.unwrap();
}

/// A clean stop with large writes waiting: the restart ships them as the
/// disk holds them (the stop synced the image before it sealed the log).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_writes_waiting_at_a_clean_stop_are_shipped_after_the_restart() {
    let (tmp, a, engine) = protected_vm(2).await;
    writes(&engine, MIB, 50).await;
    engine.shutdown().await.unwrap();
    drop(engine);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    wait_state(&engine, "vm", VmState::Protected).await;
    wait_idle(&engine).await;
    point_while_overwriting(&engine, &a, &[MIB + 64 * KIB], 300, &tmp.path().join("p")).await;
    engine.shutdown().await.unwrap();
}
