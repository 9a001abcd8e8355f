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
use ferry_engine::{DiskSpec, Engine, PointSelector, VmSpec};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_folder_a_restore_writes_into_or_a_failed_over_vm_lives_in_is_refused_to_every_other_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, w) = (random_disk(tmp.path(), "a", MIB, 14), random_disk(tmp.path(), "w", 4 * MIB, 15));
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    protect(&engine, "w", &[&w]).await;
    let out = tmp.path().join("dr");
    failover(&engine, "vm", PointSelector::Latest, &out, false).await;
    // The failed-over VM may run from `dr` now: nothing else is restored there.
    let refusals = [
        engine.test_failover("vm", PointSelector::Latest, &out).await.map(drop),
        engine.failover("vm", PointSelector::Latest, &out, false).await.map(drop),
        engine.restore("vm", PointSelector::Latest, &out).await.map(drop),
        engine.test_failover("w", PointSelector::Latest, &out).await.map(drop),
    ];
    for r in refusals {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("holds the disks VM vm failed over to"), "{e}");
    }
    let image = std::fs::read(out.join("a.img")).unwrap();
    assert_eq!(image, std::fs::read(&a).unwrap());
    // Failed over again elsewhere: both folders stay guarded.
    let elsewhere = tmp.path().join("elsewhere");
    failover(&engine, "vm", PointSelector::Latest, &elsewhere, false).await;
    for dir in [&out, &elsewhere] {
        let e = engine.test_failover("vm", PointSelector::Latest, dir).await.unwrap_err();
        assert!(e.to_string().contains("holds the disks VM vm failed over to"), "{e}");
    }

    // A restore under way holds its folder until its job ends.
    engine.set_faults(ferry_engine::target::unreliable::Faults { latency_ms: 100, ..Default::default() }).unwrap();
    let busy = tmp.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    let beside = random_disk(&busy, "beside", MIB, 17);
    let first = engine.test_failover("w", PointSelector::Latest, &busy).await.unwrap();
    let spec = VmSpec::new("v2", vec![DiskSpec { name: "beside".into(), path: beside.clone() }]);
    let e = engine.protect(spec).await.unwrap_err();
    assert!(e.to_string().contains("a restore is writing into the folder of"), "{e}");
    let e = engine.test_failover("w", PointSelector::Latest, &busy).await.unwrap_err();
    assert!(e.to_string().contains("already writing into"), "{e}");
    let e = engine.failover("w", PointSelector::Latest, &busy, false).await.unwrap_err();
    assert!(e.to_string().contains("already writing into"), "{e}");
    assert_eq!(engine.vm("w").await.unwrap().state, VmState::Protected, "a refused failover changes nothing");
    assert_eq!(engine.wait_job(first).await.unwrap().status, JobStatus::Succeeded);
    engine.set_faults(ferry_engine::target::unreliable::Faults::default()).unwrap();
    let again = engine.test_failover("w", PointSelector::Latest, &busy).await.unwrap();
    assert_eq!(engine.wait_job(again).await.unwrap().status, JobStatus::Succeeded);
    assert_eq!(std::fs::read(busy.join("w.img")).unwrap(), std::fs::read(&w).unwrap());
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_unprotects_and_protects_of_one_vm_leave_one_consistent_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 16);
    let engine = std::sync::Arc::new(open_engine(config(tmp.path())).await.unwrap());
    for round in 0..4u64 {
        protect(&engine, "vm", &[&a]).await;
        if round % 2 == 1 {
            // Protect over a failed-over VM unprotects it first.
            failover(&engine, "vm", PointSelector::Latest, &tmp.path().join(format!("dr{round}")), false).await;
        }
        // Two unprotects and a protect of the same VM at once.
        let (e1, e2, e3) = (engine.clone(), engine.clone(), engine.clone());
        let spec = VmSpec::new("vm", vec![DiskSpec { name: "a".into(), path: a.clone() }])
            .with_frequency(Duration::from_secs(3600));
        let u1 = tokio::spawn(async move { e1.unprotect("vm").await });
        let u2 = tokio::spawn(async move { e2.unprotect("vm").await });
        let p = tokio::spawn(async move { e3.protect(spec).await });
        let (u1, u2, p) = (u1.await.unwrap(), u2.await.unwrap(), p.await.unwrap());
        assert!(u1.is_ok() || u2.is_ok(), "round {round}: {u1:?} {u2:?}");
        for e in [u1.err(), u2.err()].into_iter().flatten() {
            assert!(e.to_string().contains("not found"), "round {round}: {e}");
        }
        if let Err(e) = &p {
            assert!(e.to_string().contains("already exists"), "round {round}: {e}");
        }
        // Whatever the order, the VM is either gone with nothing left beside
        // its disk, or whole: protected, replicating, and unprotected cleanly.
        if engine.vm("vm").await.is_ok() {
            engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
            engine.write("vm", "a", 0, random_bytes(4096, 20 + round)).await.unwrap();
            replicate(&engine, "vm").await;
            engine.unprotect("vm").await.unwrap();
        }
        assert!(engine.vm("vm").await.is_err(), "round {round}: gone");
        // No job of a stopped VM is left running (its tasks were cancelled).
        eventually("the stopped VM's jobs to end", Duration::from_secs(10), || async {
            engine.jobs().await.unwrap().iter().all(|j| j.status != JobStatus::Running).then_some(())
        })
        .await;
        let logs = ferry_engine::changelog::list_logs(&a).unwrap();
        assert!(logs.is_empty(), "round {round}: logs left beside the disk: {logs:?}");
    }
    engine.shutdown().await.unwrap();
}
