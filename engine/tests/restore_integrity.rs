//! Restore integrity: restore verifies every object it reads and names the
//! one that fails; a damaged or missing object never yields an image that
//! looks complete; a resync rebuilds a replica whose chain lost an object;
//! images are built as `<disk>.img.partial` and renamed only when whole.
//!
//! Damage is done to the local target's files directly, as a failing disk
//! or a careless operator would.

mod support;

use std::path::Path;
use std::time::Duration;

use ferry_engine::error::ErrorKind;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobKind, JobStatus, PointKind};
use ferry_engine::target::unreliable::Faults;
use ferry_engine::{Engine, ErrorClass, PointSelector};
use support::*;

/// A protected 1 MiB disk with a base point (1) and a delta point (2).
/// Returns the engine, the disk, its generation and its bytes at each point.
async fn two_points(tmp: &Path, seed: u64) -> (Engine, std::path::PathBuf, u64, Vec<u8>, Vec<u8>) {
    let a = random_disk(tmp, "a", MIB, seed);
    let engine = open_engine(config(tmp)).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    let at1 = std::fs::read(&a).unwrap();
    for k in 0..2u64 {
        engine.write("vm", "a", k * 256 * KIB, random_bytes(64 * KIB as usize, seed * 10 + k)).await.unwrap();
    }
    assert_eq!(replicate(&engine, "vm").await, 2);
    let at2 = std::fs::read(&a).unwrap();
    (engine, a, generation, at1, at2)
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_byte_in_a_stored_object_fails_the_restore_naming_the_object() {
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let (engine, _a, generation, at1, _) = two_points(tmp.path(), 1).await;

    let delta_object = stored_manifest(&root, "vm", generation, 2).unwrap().disks[0].objects[0].key.clone();
    flip_byte(&root.join(&delta_object));
    let out = tmp.path().join("out2");
    let e = engine.restore("vm", PointSelector::Seq(2), &out).await.unwrap_err();
    assert_eq!((e.kind(), e.class()), (ErrorKind::Corrupt, ErrorClass::NeedsResync), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&delta_object) && msg.contains("checksum"), "{msg}");
    assert!(!out.join("a.img").exists(), "a failed restore left an image that looks complete");
    // The damage is confined to the points that need the object.
    assert_point_equals(&engine, "vm", 1, &[("a", &at1)], &tmp.path().join("out1")).await;

    // The same for an object of the base, which every point needs.
    let base_object = stored_manifest(&root, "vm", generation, 1).unwrap().disks[0].objects[3].key.clone();
    flip_byte(&root.join(&base_object));
    for seq in [1, 2] {
        let out = tmp.path().join(format!("again{seq}"));
        let e = engine.restore("vm", PointSelector::Seq(seq), &out).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(!out.join("a.img").exists());
    }
    let e = engine.restore("vm", PointSelector::Seq(1), &tmp.path().join("again")).await.unwrap_err();
    assert!(e.to_string().contains(&base_object) && e.to_string().contains("checksum"), "{e}");
    engine.shutdown().await.unwrap();
}

/// Deletes an object of point 2, checks restore refuses it by name, then
/// runs the operator resync and checks the replica is whole again. With
/// `forget_hashes`, the replica hashes the engine keeps are lost first
/// (restart without the file), so the resync has to read the replica.
async fn missing_object_then_resync(forget_hashes: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let (mut engine, a, generation, at1, _) = two_points(tmp.path(), 2).await;
    let object = stored_manifest(&root, "vm", generation, 2).unwrap().disks[0].objects[1].key.clone();
    std::fs::remove_file(root.join(&object)).unwrap();

    let out = tmp.path().join("out");
    let e = engine.restore("vm", PointSelector::Seq(2), &out).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NeedsResync, "{e}");
    assert!(e.to_string().contains(&object) && e.to_string().contains("missing"), "{e}");
    assert!(!out.join("a.img").exists());
    // The VM learns its replica is damaged: it needs a resync.
    let info = wait_state(&engine, "vm", VmState::ResyncRequired).await;
    assert!(info.reason.as_deref().unwrap_or("").contains(&object), "{info:?}");
    assert_point_equals(&engine, "vm", 1, &[("a", &at1)], &tmp.path().join("out1")).await;

    if forget_hashes {
        engine.shutdown().await.unwrap();
        drop(engine);
        std::fs::remove_file(ferry_engine::hashes::path(&tmp.path().join("data"), "vm", "a")).unwrap();
        engine = open_engine(config(tmp.path())).await.unwrap();
    }
    // Writes made before and after the resync starts must all arrive.
    engine.write("vm", "a", 512 * KIB, random_bytes(8192, 7)).await.unwrap();
    engine.resync("vm").await.unwrap();
    let job = eventually("the resync to end", Duration::from_secs(60), || async {
        engine.jobs().await.unwrap().into_iter().find(|j| j.kind == JobKind::Resync && j.status != JobStatus::Running)
    })
    .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    wait_state(&engine, "vm", VmState::Protected).await;
    // The resync's point restores, byte for byte. The replica's chain was
    // broken, so the point is a new base (see `resync_all` in engine/src/vm.rs).
    let latest = engine.recovery_points("vm").await.unwrap().pop().unwrap();
    let restored = engine.restore("vm", PointSelector::Seq(latest.seq), &tmp.path().join("after")).await;
    assert!(restored.is_ok(), "the resync's point {} does not restore: {:?}", latest.seq, restored.err());
    assert!(std::fs::read(tmp.path().join("after/a.img")).unwrap() == std::fs::read(&a).unwrap());
    assert_eq!(latest.kind, PointKind::Base, "a resync over a broken chain must not build on it: {latest:?}");
    engine.write("vm", "a", 0, random_bytes(4096, 8)).await.unwrap();
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("later")).await;
    engine.shutdown().await.unwrap();
}

/// The usual case: the engine kept the replica's block hashes as points committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_object_fails_the_restore_and_the_next_resync_rebuilds_the_replica() {
    missing_object_then_resync(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_object_fails_the_restore_and_a_resync_without_kept_hashes_rebuilds_the_replica() {
    missing_object_then_resync(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_builds_partial_images_and_renames_them_only_when_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let (engine, _a, _, _, at2) = two_points(tmp.path(), 3).await;
    // Slow downloads, so the restore can be watched while it runs.
    engine.set_faults(Faults { latency_ms: 150, ..Default::default() }).unwrap();
    let out = tmp.path().join("out");
    let (partial, image) = (out.join("a.img.partial"), out.join("a.img"));
    let job = engine.test_failover("vm", PointSelector::Seq(2), &out).await.unwrap();
    eventually("the partial image", Duration::from_secs(30), || async { partial.exists().then_some(()) }).await;
    assert!(!image.exists(), "the image is in place before the restore ended");
    assert_eq!(engine.job(job).await.unwrap().status, JobStatus::Running);
    let done = engine.wait_job(job).await.unwrap();
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert!(!partial.exists(), "the partial image was not renamed");
    assert!(std::fs::read(&image).unwrap() == at2, "the restored image differs from point 2");
    engine.shutdown().await.unwrap();
}
