//! Failover through the embedded engine: a planned failover (migration)
//! carries every acknowledged write into its final point and stops the
//! disks' writes; an unplanned one restores the chosen committed point;
//! `FailedOver` survives a restart and ends with unprotect or a new
//! protection.

mod support;

use std::path::Path;
use std::time::Duration;

use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobKind, JobStatus};
use ferry_engine::{Engine, PointSelector};
use support::*;

const MIB: u64 = 1 << 20;

async fn failover(engine: &Engine, vm: &str, point: PointSelector, out: &Path, planned: bool) {
    let id = engine.failover(vm, point, out, planned).await.unwrap();
    let job = engine.wait_job(id).await.unwrap();
    assert_eq!((job.kind, job.status), (JobKind::Failover, JobStatus::Succeeded), "{job:?}");
}

fn assert_write_refused(engine: &Engine, vm: &str, disk: &str) {
    let d = engine.disk(vm, disk).unwrap();
    let e = d.write_at(0, &[1u8; 4096], false).unwrap_err();
    assert!(e.to_string().contains("failed over"), "{e}");
    let e = d.write_zeroes(0, 4096, false).unwrap_err();
    assert!(e.to_string().contains("failed over"), "{e}");
    // Reads and flushes go on.
    d.read_at(0, &mut [0u8; 512]).unwrap();
    d.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_carries_every_acknowledged_write_and_stops_writes_until_protected_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (random_disk(tmp.path(), "a", 2 * MIB, 1), random_disk(tmp.path(), "b", MIB, 2));
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a, &b]).await;
    // Written and acknowledged, never replicated by hand: the final point must carry them.
    engine.write("vm", "a", 3 * 4096, random_bytes(8192, 3)).await.unwrap();
    engine.write("vm", "b", 0, random_bytes(200 << 10, 4)).await.unwrap();
    let before = engine.vm("vm").await.unwrap().last_point_seq;
    let out = tmp.path().join("migrated");
    failover(&engine, "vm", PointSelector::Latest, &out, true).await;
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::FailedOver);
    let f = info.failover.clone().expect("the failover is shown");
    assert!(f.planned && f.point > before, "{f:?}: a final point was cut");
    assert_eq!(f.out_dir, std::fs::canonicalize(&out).unwrap());
    for (disk, src) in [("a", &a), ("b", &b)] {
        let got = std::fs::read(out.join(format!("{disk}.img"))).unwrap();
        assert!(got == std::fs::read(src).unwrap(), "disk {disk} differs from its source");
    }
    assert_write_refused(&engine, "vm", "a");
    assert_write_refused(&engine, "vm", "b");
    assert!(engine.replicate_now("vm").await.is_err(), "a failed-over VM cuts no points");
    assert!(engine.resume("vm").await.is_err());

    // A restart keeps it FailedOver, with its writes stopped from the first request.
    engine.shutdown().await.unwrap();
    drop(engine);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let info = engine.vm("vm").await.unwrap();
    assert_eq!((info.state, info.failover), (VmState::FailedOver, Some(f.clone())));
    assert_write_refused(&engine, "vm", "a");

    // Failing over again restores the same point into another folder.
    let again = tmp.path().join("again");
    failover(&engine, "vm", PointSelector::Latest, &again, true).await;
    assert_eq!(std::fs::read(again.join("a.img")).unwrap(), std::fs::read(&a).unwrap());
    assert_eq!(engine.vm("vm").await.unwrap().failover.map(|f| f.point), Some(f.point));

    // Protecting it again (here from the migrated disks) starts a new protection.
    let migrated = [out.join("a.img"), out.join("b.img")];
    protect(&engine, "vm", &[&migrated[0], &migrated[1]]).await;
    let info = engine.vm("vm").await.unwrap();
    assert_eq!((info.state, info.failover), (VmState::Protected, None));
    engine.write("vm", "a", 0, random_bytes(4096, 5)).await.unwrap();
    replicate(&engine, "vm").await;
    let restored = tmp.path().join("restored");
    assert_latest_equals_sources(&engine, "vm", &[&migrated[0], &migrated[1]], &restored).await;
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unplanned_failover_restores_the_chosen_point_and_unprotect_clears_it() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", 2 * MIB, 6);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    engine.write("vm", "a", 0, random_bytes(64 << 10, 7)).await.unwrap();
    let first = replicate(&engine, "vm").await;
    let at_first = std::fs::read(&a).unwrap();
    engine.write("vm", "a", 4096, random_bytes(4096, 8)).await.unwrap();
    replicate(&engine, "vm").await;
    engine.write("vm", "a", 8192, random_bytes(4096, 9)).await.unwrap(); // never replicated: lost with the source

    // A planned failover cannot choose its point.
    let out = tmp.path().join("dr");
    let e = engine.failover("vm", PointSelector::Seq(first), &out, true).await.unwrap_err();
    assert!(e.to_string().contains("recovery_point"), "{e}");
    assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Protected);
    engine.write("vm", "a", 0, random_bytes(16, 10)).await.unwrap(); // writes go on

    failover(&engine, "vm", PointSelector::Seq(first), &out, false).await;
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::FailedOver);
    let f = info.failover.expect("the failover is shown");
    assert_eq!((f.planned, f.point), (false, first));
    assert!(std::fs::read(out.join("a.img")).unwrap() == at_first, "the image is the chosen point");
    assert_write_refused(&engine, "vm", "a");

    engine.unprotect("vm").await.unwrap();
    assert!(engine.vm("vm").await.is_err(), "unprotect clears it");
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_of_a_vm_that_is_not_protected_is_refused_and_writes_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 11);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    engine.pause("vm").await.unwrap();
    let e = engine.failover("vm", PointSelector::Latest, &tmp.path().join("x"), true).await.unwrap_err();
    assert!(e.to_string().contains("planned failover needs a Protected VM"), "{e}");
    assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Paused);
    engine.write("vm", "a", 0, random_bytes(4096, 12)).await.unwrap();
    // An output folder holding the VM's own disks is refused before anything changes.
    engine.resume("vm").await.unwrap();
    let e = engine.failover("vm", PointSelector::Latest, tmp.path(), true).await.unwrap_err();
    assert!(e.to_string().contains("a.img"), "{e}");
    assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Protected);
    engine.write("vm", "a", 0, random_bytes(4096, 13)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), engine.shutdown()).await.unwrap().unwrap();
}
