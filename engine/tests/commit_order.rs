//! Commit ordering: a recovery point's objects are durable before its
//! manifest (the commit record) is put; the point is in the index before
//! the local logs it holds are deleted; a failed attempt is retried as the
//! same point, under the same object keys.
//!
//! The failure is placed on the local target itself: a folder where one
//! object (or the manifest) is to be renamed into place makes exactly that
//! put fail, on every try, with EISDIR (a recoverable I/O error), while
//! every other put succeeds. The unreliable target's `fail_first` fails
//! every key alike, so it cannot fail just one.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::changelog;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::PointKind;
use ferry_engine::replica::manifest::{manifest_key, object_key, vm_prefix};
use ferry_engine::Engine;
use support::*;

/// Six 64 KiB writes, 128 KiB apart: with 64 KiB objects, a delta of six parts.
async fn six_part_delta(engine: &Engine) {
    for k in 0..6u64 {
        engine.write("vm", "a", k * 128 * KIB, random_bytes(64 * KIB as usize, 100 + k)).await.unwrap();
    }
    engine.flush("vm", "a").await.unwrap();
}

async fn listed(engine: &Engine, seq: u64) -> bool {
    engine.recovery_points("vm").await.unwrap().iter().any(|p| p.seq == seq)
}

/// Watches a sealed log until it is deleted; returns whether the point that
/// holds it was in the index at that moment. The file is looked at first and
/// the index second, and points never leave the index, so "gone and not
/// listed" means the log was deleted before its point was committed.
fn watch_log_deletion(engine: Arc<Engine>, log: PathBuf, seq: u64) -> tokio::task::JoinHandle<bool> {
    tokio::spawn(async move {
        loop {
            if !log.exists() {
                return listed(&engine, seq).await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_point_with_one_failed_object_is_not_committed_and_its_retry_writes_the_same_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let a = random_disk(tmp.path(), "a", MIB, 1);
    let engine = Arc::new(open_engine(config(tmp.path())).await.unwrap());
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    let [sealed]: [PathBuf; 1] = logs(&a).try_into().unwrap(); // the active log, sealed by the next cycle
    six_part_delta(&engine).await;
    let source = std::fs::read(&a).unwrap();

    // Part 2 of point 2 cannot be put.
    let blocked = object_key("vm", generation, "a", 2, 2);
    std::fs::create_dir_all(root.join(&blocked)).unwrap();
    let e = engine.replicate_now("vm").await.unwrap_err();
    assert!(e.to_string().contains(&blocked), "the error names the object that failed: {e}");

    // Nothing is committed: no manifest, no index entry; the logs stay beside the disk.
    assert!(!root.join(manifest_key("vm", generation, 2)).exists(), "a manifest was put before all its objects");
    assert!(!listed(&engine, 2).await);
    assert!(changelog::scan(&sealed).unwrap().clean, "the log of the failed point is kept, sealed");
    assert_eq!(logs(&a).len(), 2, "the sealed log and the new active one");
    let info = engine.vm("vm").await.unwrap();
    assert_eq!((info.state, info.last_point_seq), (VmState::Protected, 1), "a recoverable failure: {info:?}");
    let point_prefix = format!("{}/disks/a/p{:010}", vm_prefix("vm", generation), 2);
    let put_by_failed_try = stored_keys(&root, &point_prefix);
    assert!(!put_by_failed_try.contains(&blocked));

    // The retries (on the backoff schedule) commit once the object can be put.
    let watcher = watch_log_deletion(engine.clone(), sealed.clone(), 2);
    std::fs::remove_dir(root.join(&blocked)).unwrap();
    eventually("point 2 to commit", Duration::from_secs(30), || async { listed(&engine, 2).await.then_some(()) }).await;
    let in_index_when_deleted = tokio::time::timeout(Duration::from_secs(30), watcher).await.unwrap().unwrap();
    assert!(in_index_when_deleted, "the log was deleted before its point was in the index");

    // Same seq, same keys: the manifest lists parts 0..6 of point 2, the
    // target holds exactly those under the point, and no other point number was used.
    let m = stored_manifest(&root, "vm", generation, 2).expect("manifest of point 2");
    assert_eq!((m.seq, m.parent, m.kind), (2, Some(1), PointKind::Delta));
    let keys: BTreeSet<String> = m.disks[0].objects.iter().map(|o| o.key.clone()).collect();
    let want: BTreeSet<String> = (0..6).map(|part| object_key("vm", generation, "a", 2, part)).collect();
    assert_eq!(keys, want);
    assert_eq!(stored_keys(&root, &point_prefix), want, "no object under another key");
    assert!(put_by_failed_try.is_subset(&want), "the failed try put {put_by_failed_try:?}");
    let points_dir = root.join(vm_prefix("vm", generation)).join("disks/a");
    let used: Vec<String> =
        std::fs::read_dir(points_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert_eq!(BTreeSet::from_iter(used), BTreeSet::from(["p0000000001".to_string(), "p0000000002".to_string()]));
    let seqs: Vec<u64> = engine.recovery_points("vm").await.unwrap().iter().map(|p| p.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    assert_point_equals(&engine, "vm", 2, &[("a", &source)], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_object_is_durable_before_the_manifest_and_a_failed_manifest_commits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = target_root(tmp.path());
    let a = random_disk(tmp.path(), "a", MIB, 2);
    let engine = Arc::new(open_engine(config(tmp.path())).await.unwrap());
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    let [sealed]: [PathBuf; 1] = logs(&a).try_into().unwrap();
    six_part_delta(&engine).await;
    let source = std::fs::read(&a).unwrap();

    let manifest = manifest_key("vm", generation, 2);
    std::fs::create_dir_all(root.join(&manifest)).unwrap();
    let e = engine.replicate_now("vm").await.unwrap_err();
    assert!(e.to_string().contains(&manifest), "the error names the manifest: {e}");

    // The manifest was tried only after every object of the point was put.
    let point_prefix = format!("{}/disks/a/p{:010}", vm_prefix("vm", generation), 2);
    let want: BTreeSet<String> = (0..6).map(|part| object_key("vm", generation, "a", 2, part)).collect();
    assert_eq!(stored_keys(&root, &point_prefix), want, "objects missing when the manifest was put");
    assert!(!listed(&engine, 2).await, "a point is in the index without its manifest");
    assert!(sealed.exists(), "a log was deleted though its point is not committed");

    let watcher = watch_log_deletion(engine.clone(), sealed.clone(), 2);
    std::fs::remove_dir(root.join(&manifest)).unwrap();
    eventually("point 2 to commit", Duration::from_secs(30), || async { listed(&engine, 2).await.then_some(()) }).await;
    let in_index_when_deleted = tokio::time::timeout(Duration::from_secs(30), watcher).await.unwrap().unwrap();
    assert!(in_index_when_deleted, "the log was deleted before its point was in the index");
    let m = stored_manifest(&root, "vm", generation, 2).expect("manifest of point 2");
    let keys: BTreeSet<String> = m.disks[0].objects.iter().map(|o| o.key.clone()).collect();
    assert_eq!(keys, want, "the retry committed the objects under the keys the failed try used");
    for o in &m.disks[0].objects {
        let stored = std::fs::read(root.join(&o.key)).unwrap();
        assert_eq!(
            ferry_engine::replica::bundle::checksum(&stored),
            o.checksum,
            "{} is what the manifest lists",
            o.key
        );
    }
    assert_point_equals(&engine, "vm", 2, &[("a", &source)], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}
