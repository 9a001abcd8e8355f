//! Restart paths, each made deterministic: the change logs found beside a
//! disk at start-up are trusted only when every one is readable, cleanly
//! closed and chained (a gap, a damaged header or a damaged record means
//! `ResyncRequired`, with that reason); a crash during initial replication
//! resumes the copy where it stopped and ends byte-identical; unprotecting a
//! real VM removes its logs but keeps its replica, and it can be protected
//! again. (A failed log write has its own test binary, `log_write_failure`,
//! because it changes a process-wide limit.)

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::changelog;
use ferry_engine::error::ErrorKind;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobKind, JobStatus, PointKind};
use ferry_engine::replica::manifest::vm_prefix;
use ferry_engine::snapshot;
use ferry_engine::target::unreliable::Faults;
use ferry_engine::target::LocalTarget;
use ferry_engine::throttle::{BandwidthPolicy, MIN_LIMIT_BPS};
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

/// The inode of every object stored under `prefix` (a put writes a new
/// file and renames it, so an object put again has a new inode).
fn stored_inodes(root: &Path, prefix: &str) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    stored_keys(root, prefix)
        .into_iter()
        .map(|k| (k.clone(), std::fs::metadata(root.join(&k)).unwrap().ino()))
        .collect()
}

/// A crash of ferryd (the engine dropped without shutdown, as kill -9
/// leaves it) half-way through the initial copy: the restarted VM goes on
/// with the same generation and snapshot, puts only the parts the first run
/// had not finished, reaches Protected without a resync, and its base point
/// is the disk at protection time while the latest point is the disk now,
/// with the writes made before and after the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_during_initial_replication_resumes_the_copy_and_ends_byte_identical() {
    initial_copy_resumes_after(Stopped::Crash).await;
}

/// The same after a clean shutdown mid-copy (`systemctl restart ferryd`):
/// the side file and the disk are synced and the log sealed, so the copy
/// resumes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_during_initial_replication_resumes_the_copy_and_ends_byte_identical() {
    initial_copy_resumes_after(Stopped::Shutdown).await;
}

/// What a resume rests on, taken away after a crash mid-copy: the VM
/// starts protection over (new generation, the first replica never mixed
/// in) and still ends byte-identical; nothing is assumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_during_initial_replication_starts_over_when_what_a_resume_needs_is_gone() {
    let progress = |tmp: &Path| tmp.join("data").join("progress").join("vm.copy");
    type Damage = fn(&Path, &Path);
    let cases: [(&str, Damage); 3] = [
        ("side file removed", |_, disk| {
            for f in snapshot::side_files(disk) {
                std::fs::remove_file(f).unwrap();
            }
        }),
        ("progress removed", |p, _| std::fs::remove_file(p).unwrap()),
        ("progress damaged", |p, _| {
            let mut text = std::fs::read(p).unwrap();
            let first = text.iter().position(|b| *b == b'\n').unwrap();
            text.splice(first + 1..first + 1, b"not json\n".iter().copied());
            std::fs::write(p, text).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let a = random_disk(tmp.path(), "a", MIB, 2);
        let first_generation;
        {
            let mut cfg = config(tmp.path());
            cfg.bandwidth = BandwidthPolicy::flat(Some(MIN_LIMIT_BPS));
            let engine = open_engine(cfg).await.unwrap();
            let spec =
                ferry_engine::VmSpec::new("vm", vec![ferry_engine::DiskSpec { name: "a".into(), path: a.clone() }])
                    .with_frequency(Duration::from_secs(3600));
            first_generation = engine.protect(spec).await.unwrap().generation;
            eventually("two parts on the target", Duration::from_secs(30), || async {
                engine.jobs().await.unwrap().into_iter().find(|j| {
                    j.kind == JobKind::InitialReplication
                        && j.status == JobStatus::Running
                        && j.bytes_done >= 2 * 64 * KIB
                })
            })
            .await;
            engine.write("vm", "a", 700 * KIB, random_bytes(8192, 3)).await.unwrap();
            drop(engine);
        }
        damage(&progress(tmp.path()), &a);
        let engine = open_engine(config(tmp.path())).await.unwrap();
        let info = engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
        assert!(info.generation > first_generation, "{what}: protection started over: {info:?}");
        let root = target_root(tmp.path());
        assert!(stored_keys(&root, &format!("{}/points", vm_prefix("vm", first_generation))).is_empty(), "{what}");
        assert_eq!(snapshot::side_files(&a).len(), 0, "{what}: stale side files removed");
        wait_idle(&engine).await;
        engine.write("vm", "a", 500 * KIB, random_bytes(8192, 5)).await.unwrap();
        replicate(&engine, "vm").await;
        assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
        engine.shutdown().await.unwrap();
    }
}

/// How many objects of `first` are still the same files in `second` (not put again).
fn kept_objects(
    first: &std::collections::BTreeMap<String, u64>,
    second: &std::collections::BTreeMap<String, u64>,
) -> usize {
    first.iter().filter(|(k, ino)| second.get(*k) == Some(ino)).count()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    Crash,
    Shutdown,
}

async fn initial_copy_resumes_after(stopped: Stopped) {
    const PARTS: usize = 16; // 1 MiB in 64 KiB objects of random data
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 2);
    let at_protection = std::fs::read(&a).unwrap();
    let root = target_root(tmp.path());
    let generation;
    let first_run;
    {
        // 512 Kbps: one 64 KiB object a second.
        let mut cfg = config(tmp.path());
        cfg.bandwidth = BandwidthPolicy::flat(Some(MIN_LIMIT_BPS));
        let engine = open_engine(cfg).await.unwrap();
        let spec = ferry_engine::VmSpec::new("vm", vec![ferry_engine::DiskSpec { name: "a".into(), path: a.clone() }])
            .with_frequency(Duration::from_secs(3600));
        generation = engine.protect(spec).await.unwrap().generation;
        eventually("five parts of the copy on the target", Duration::from_secs(30), || async {
            engine.jobs().await.unwrap().into_iter().find(|j| {
                j.kind == JobKind::InitialReplication && j.status == JobStatus::Running && j.bytes_done >= 5 * 64 * KIB
            })
        })
        .await;
        // Writes in the middle of the copy: one into a part already on the
        // target, one into a part not copied yet (copy-before-write saves it).
        engine.write("vm", "a", 100 * KIB, random_bytes(8192, 3)).await.unwrap();
        engine.write("vm", "a", 900 * KIB, random_bytes(8192, 4)).await.unwrap();
        engine.flush("vm", "a").await.unwrap();
        assert_eq!(engine.vm("vm").await.unwrap().state, VmState::InitialReplication);
        match stopped {
            Stopped::Crash => drop(engine), // no shutdown: the log stays open, the side file stays
            Stopped::Shutdown => engine.shutdown().await.unwrap(),
        }
        first_run = stored_inodes(&root, &vm_prefix("vm", generation));
    }
    assert!((5..PARTS).contains(&first_run.len()), "the crash came half-way: {first_run:?}");
    assert_eq!(snapshot::side_files(&a).len(), 1, "the snapshot's side file is left for the restart");

    let engine = open_engine(config(tmp.path())).await.unwrap();
    // A write while the copy goes on.
    engine.write("vm", "a", 300 * KIB, random_bytes(8192, 5)).await.unwrap();
    let info = engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
    assert_eq!(info.generation, generation, "the same protection goes on");
    assert_eq!(info.transitions.iter().filter(|t| t.to == VmState::InitialReplication).count(), 1, "{info:?}");
    assert!(info.transitions.iter().all(|t| t.to != VmState::ResyncRequired), "{info:?}");
    assert!(engine.jobs().await.unwrap().iter().all(|j| j.kind != JobKind::Resync), "no resync");
    // Only what the first run had not finished was put again: the objects it
    // put keep their files, but for the few in flight at the crash (puts
    // that returned before their part was recorded).
    let second_run = stored_inodes(&root, &vm_prefix("vm", generation));
    let base: Vec<_> = second_run.keys().filter(|k| k.contains("/p0000000001/")).collect();
    assert_eq!(base.len(), PARTS, "{second_run:?}");
    let kept = kept_objects(&first_run, &second_run);
    let put_again = base.len() - kept;
    eprintln!("{stopped:?}: base objects: {} put before, {kept} of them kept, {put_again} put after", first_run.len());
    assert!(kept >= first_run.len() - 4, "at most the 4 parts in flight are put again: kept {kept} of {first_run:?}");
    assert!(put_again <= PARTS - 5 + 4, "{put_again} base objects put after the restart");
    assert!(snapshot::side_files(&a).is_empty(), "the snapshot's space was reclaimed");
    assert!(!tmp.path().join("data").join("progress").join("vm.copy").exists(), "the copy progress was removed");
    let points = engine.recovery_points("vm").await.unwrap();
    assert_eq!((points[0].seq, points[0].kind), (1, PointKind::Base), "{points:?}");
    // The base is the disk at protection time, whatever was written since.
    assert_point_equals(&engine, "vm", 1, &[("a", &at_protection)], &tmp.path().join("base")).await;
    wait_idle(&engine).await;
    engine.write("vm", "a", 500 * KIB, random_bytes(8192, 6)).await.unwrap();
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}

/// A stop (a crash, or a clean shutdown) after the initial copy put every
/// part but before its base point was committed (FinalizingProtection, the
/// commit failing against a target whose manifests cannot be written): the
/// restarted VM commits the base from the copy's journal, under the same
/// generation, without putting any part again and without starting over;
/// the base is the disk at protection time. (Before, this window started
/// protection over: a full copy again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_between_the_copy_and_the_base_commit_commits_the_base_without_copying_again() {
    const PARTS: usize = 16;
    for stopped in [Stopped::Crash, Stopped::Shutdown] {
        let tmp = tempfile::tempdir().unwrap();
        let a = random_disk(tmp.path(), "a", MIB, 2);
        let at_protection = std::fs::read(&a).unwrap();
        let root = target_root(tmp.path());
        let generation;
        let first_run;
        {
            let mut cfg = config(tmp.path());
            let manifests_down =
                Faults { down: true, only_keys_containing: Some(".manifest".into()), ..Default::default() };
            cfg.faults = Some(manifests_down);
            let engine = open_engine(cfg).await.unwrap();
            let spec =
                ferry_engine::VmSpec::new("vm", vec![ferry_engine::DiskSpec { name: "a".into(), path: a.clone() }])
                    .with_frequency(Duration::from_secs(3600));
            generation = engine.protect(spec).await.unwrap().generation;
            eventually("the base commit failing", Duration::from_secs(60), || async {
                let info = engine.vm("vm").await.unwrap();
                (info.state == VmState::FinalizingProtection && info.reason.is_some()).then_some(())
            })
            .await;
            // A write after the copy: not in the base.
            engine.write("vm", "a", 100 * KIB, random_bytes(8192, 3)).await.unwrap();
            engine.flush("vm", "a").await.unwrap();
            match stopped {
                Stopped::Crash => drop(engine),
                Stopped::Shutdown => {
                    engine.shutdown().await.unwrap();
                    drop(engine)
                }
            }
            first_run = stored_inodes(&root, &vm_prefix("vm", generation));
        }
        assert_eq!(first_run.len(), PARTS, "{stopped:?}: every part and no manifest: {first_run:?}");
        assert_eq!(snapshot::side_files(&a).len(), 1, "{stopped:?}: the snapshot stays until the base is committed");

        let engine = open_engine(config(tmp.path())).await.unwrap();
        let info = engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
        assert_eq!(info.generation, generation, "{stopped:?}: the same protection goes on");
        assert_eq!(info.transitions.iter().filter(|t| t.to == VmState::InitialReplication).count(), 1, "{info:?}");
        assert!(info.transitions.iter().all(|t| t.to != VmState::ResyncRequired), "{info:?}");
        let second_run = stored_inodes(&root, &vm_prefix("vm", generation));
        let kept = kept_objects(&first_run, &second_run);
        assert_eq!(kept, PARTS, "{stopped:?}: no part put again");
        let points = engine.recovery_points("vm").await.unwrap();
        assert_eq!((points[0].seq, points[0].kind), (1, PointKind::Base), "{points:?}");
        assert_point_equals(&engine, "vm", 1, &[("a", &at_protection)], &tmp.path().join("base")).await;
        assert!(snapshot::side_files(&a).is_empty(), "{stopped:?}: the snapshot's space was reclaimed");
        assert!(!tmp.path().join("data").join("progress").join("vm.copy").exists(), "the copy progress was removed");
        // The write made before the stop ships with the cycle after the base
        // (a point asked for now comes after it, or is that cycle).
        engine.replicate_now("vm").await.unwrap();
        assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
        engine.shutdown().await.unwrap();
    }
}

/// A clean shutdown in the middle of a resync (`systemctl restart ferryd`)
/// keeps the resync's snapshot, syncs it and seals the log, so the
/// restarted VM goes on with the same resync: the parts it had put stay
/// (same files on the target), and the point equals the disk. (Before, a
/// clean stop released the snapshot and the resync ran again in full.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_mid_resync_goes_on_with_the_same_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 2);
    let spec = ferry_engine::VmSpec::new("vm", vec![ferry_engine::DiskSpec { name: "a".into(), path: a.clone() }])
        .with_frequency(Duration::from_secs(3600));
    let generation = {
        let engine = open_engine(config(tmp.path())).await.unwrap();
        let generation = engine.protect(spec).await.unwrap().generation;
        engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
        engine.shutdown().await.unwrap();
        generation
    };
    // Every block changed behind ferry's back: the resync sends them all.
    std::fs::write(&a, random_bytes(MIB as usize, 9)).unwrap();
    let root = target_root(tmp.path());
    let resync_objects = |all: std::collections::BTreeMap<String, u64>| {
        all.into_iter().filter(|(k, _)| k.contains("/p0000000002/")).collect::<std::collections::BTreeMap<_, _>>()
    };
    let first_run =
        {
            let mut cfg = config(tmp.path());
            cfg.bandwidth = BandwidthPolicy::flat(Some(MIN_LIMIT_BPS));
            let engine = open_engine(cfg).await.unwrap();
            engine.resync("vm").await.unwrap();
            eventually("five parts of the resync on the target", Duration::from_secs(30), || async {
                engine.jobs().await.unwrap().into_iter().find(|j| {
                    j.kind == JobKind::Resync && j.status == JobStatus::Running && j.bytes_done >= 5 * 64 * KIB
                })
            })
            .await;
            engine.write("vm", "a", 900 * KIB, random_bytes(8192, 3)).await.unwrap();
            engine.shutdown().await.unwrap();
            drop(engine);
            resync_objects(stored_inodes(&root, &vm_prefix("vm", generation)))
        };
    assert!(first_run.len() >= 3, "the stop came during the resync: {first_run:?}");
    assert_eq!(snapshot::side_files(&a).len(), 1, "the resync's snapshot is kept for the restart");

    let engine = open_engine(config(tmp.path())).await.unwrap();
    let info = engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
    assert_eq!(info.transitions.iter().filter(|t| t.to == VmState::Resynchronizing).count(), 1, "{info:?}");
    let second_run = resync_objects(stored_inodes(&root, &vm_prefix("vm", generation)));
    let kept = kept_objects(&first_run, &second_run);
    // Puts in flight at the stop (made, not yet recorded) may go again: at most the 4 upload workers'.
    assert!(kept + 4 >= first_run.len(), "parts put before the stop put again: kept {kept} of {first_run:?}");
    assert!(kept >= 1, "the resync went on, it did not run again: {first_run:?} {second_run:?}");
    assert!(snapshot::side_files(&a).is_empty(), "the snapshot's space was reclaimed");
    // The write made during the resync ships with the cycle after it (a
    // point asked for now comes after it, or is that cycle).
    engine.replicate_now("vm").await.unwrap();
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
    // At least the sealed log and the active one: the failed cycle's retries
    // (30 ms apart in policy time here) seal one more log each.
    assert!(logs(&a).len() >= 2, "{:?}", logs(&a));
    engine.set_faults(Default::default()).unwrap();

    engine.unprotect("vm").await.unwrap();
    assert!(logs(&a).is_empty(), "change logs left beside the disk: {:?}", logs(&a));
    assert!(snapshot::side_files(&a).is_empty());
    assert!(!data.join("hashes").join("vm").exists(), "kept replica hashes left behind");
    assert!(!data.join("progress").join("vm.copy").exists(), "copy progress left behind");
    assert_eq!(engine.vm("vm").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(engine.recovery_points("vm").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(engine.disk("vm", "a").err().map(|e| e.kind()), Some(ErrorKind::NotFound));
    assert!(engine.exports().is_empty());

    // The replica stays on the target and restores with the target alone.
    let target: ferry_engine::target::Target = std::sync::Arc::new(LocalTarget::open(target_root(tmp.path())).unwrap());
    let out = tmp.path().join("kept");
    let opts = ferry_engine::restore::RestoreOpts { parallelism: 4, only: None, durable: true, replace: false };
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

/// A crash mid-resync whose journal no longer fits what the restart finds
/// (it compared with another point than the last one; or the replica lost
/// an object since, so the resync must now send every block): the resync
/// runs again from scratch, the VM never goes Critical, and the latest
/// point equals the disk. (The resumed happy path runs against the real
/// daemon in tests/resync_resume.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_mid_resync_whose_progress_no_longer_fits_runs_the_resync_again() {
    type Damage = fn(&Path, &Path);
    let cases: [(&str, Damage); 2] = [
        ("journal compared with another point", |progress, _| {
            let text = std::fs::read_to_string(progress).unwrap();
            let (first, rest) = text.split_once('\n').unwrap();
            let mut header: serde_json::Value = serde_json::from_str(first).unwrap();
            header["purpose"] = serde_json::json!({ "Resync": { "compared_with": 99 } });
            std::fs::write(progress, format!("{header}\n{rest}")).unwrap();
        }),
        ("replica lost an object", |_, root| {
            let base = stored_keys(root, "").into_iter().find(|k| k.contains("/p0000000001/")).unwrap();
            std::fs::remove_file(root.join(base)).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let a = random_disk(tmp.path(), "a", MIB, 2);
        let spec = ferry_engine::VmSpec::new("vm", vec![ferry_engine::DiskSpec { name: "a".into(), path: a.clone() }])
            .with_frequency(Duration::from_secs(3600));
        {
            let engine = open_engine(config(tmp.path())).await.unwrap();
            engine.protect(spec).await.unwrap();
            engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
            engine.shutdown().await.unwrap();
        }
        // Every block changed behind ferry's back: the resync sends them all.
        std::fs::write(&a, random_bytes(MIB as usize, 9)).unwrap();
        {
            let mut cfg = config(tmp.path());
            cfg.bandwidth = BandwidthPolicy::flat(Some(MIN_LIMIT_BPS));
            let engine = open_engine(cfg).await.unwrap();
            engine.resync("vm").await.unwrap();
            eventually("three parts of the resync on the target", Duration::from_secs(30), || async {
                engine.jobs().await.unwrap().into_iter().find(|j| {
                    j.kind == JobKind::Resync && j.status == JobStatus::Running && j.bytes_done >= 3 * 64 * KIB
                })
            })
            .await;
            engine.write("vm", "a", 100 * KIB, random_bytes(8192, 3)).await.unwrap();
            drop(engine); // a crash: the journal, side file and open log stay
        }
        let progress = tmp.path().join("data").join("progress").join("vm.copy");
        assert!(progress.exists(), "{what}: the resync kept a journal");
        damage(&progress, &target_root(tmp.path()));
        let engine = open_engine(config(tmp.path())).await.unwrap();
        let info = engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
        assert!(info.transitions.iter().all(|t| t.to != VmState::Critical), "{what}: {info:?}");
        wait_idle(&engine).await;
        engine.write("vm", "a", 500 * KIB, random_bytes(8192, 5)).await.unwrap();
        replicate(&engine, "vm").await;
        assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
        engine.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_of_the_layout_before_host_ids_are_moved_into_the_hosts_folder_and_go_on() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", 2 << 20, 40);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    engine.write("vm", "a", 0, random_bytes(8192, 41)).await.unwrap();
    replicate(&engine, "vm").await;
    engine.shutdown().await.unwrap();
    drop(engine);
    // What a daemon before host ids left: `<target>/vms/...`, no `hosts/`.
    let target = tmp.path().join("data").join("target");
    std::fs::rename(target_root(tmp.path()).join("vms"), target.join("vms")).unwrap();
    std::fs::remove_dir_all(target.join("hosts")).unwrap();

    let engine = open_engine(config(tmp.path())).await.unwrap();
    assert!(!target.join("vms").exists(), "moved");
    assert!(target_root(tmp.path()).join("vms").is_dir());
    assert_eq!(engine.vm("vm").await.unwrap().state, VmState::Protected);
    engine.write("vm", "a", 4096, random_bytes(4096, 42)).await.unwrap();
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
    drop(engine);

    // Replicas of VMs this daemon does not have are not adopted: another
    // host's, or a fresh data folder's.
    std::fs::create_dir_all(target.join("vms").join("other").join("7")).unwrap();
    let local = LocalTarget::open(&target).unwrap();
    std::fs::rename(target.join("hosts"), tmp.path().join("hosts-aside")).unwrap();
    assert!(!local.adopt_unhosted_replicas(HOST_ID, &[("vm".into(), 7)]).unwrap());
    assert!(!local.adopt_unhosted_replicas(HOST_ID, &[("other".into(), 8)]).unwrap());
    assert!(target.join("vms").join("other").is_dir() && !target.join("hosts").exists());
    // With replicas in the host's folder already, an old-layout folder is left alone.
    std::fs::rename(tmp.path().join("hosts-aside"), target.join("hosts")).unwrap();
    assert!(!local.adopt_unhosted_replicas(HOST_ID, &[("other".into(), 7)]).unwrap());
    assert!(target.join("vms").join("other").is_dir() && target_root(tmp.path()).join("vms").is_dir());
}

/// A disk's folder swapped for a symbolic link while the daemon was down
/// (to `/etc`, say: the link here points at a harmless copy) is not
/// followed at the restart: the disk is not opened or served, and the VM
/// says why. With the folder back, the VM goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_folder_swapped_for_a_symlink_is_not_followed_at_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let vms = tmp.path().join("vms");
    std::fs::create_dir_all(&vms).unwrap();
    let a = random_disk(&vms, "a", MIB, 3);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    wait_state(&engine, "vm", VmState::Protected).await;
    engine.shutdown().await.unwrap();
    drop(engine);

    let elsewhere = tmp.path().join("elsewhere");
    std::fs::rename(&vms, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &vms).unwrap();
    let before = std::fs::read(elsewhere.join("a.img")).unwrap();
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let info = eventually("the VM refuses its disk", Duration::from_secs(30), || async {
        let info = engine.vm("vm").await.unwrap();
        (info.state == VmState::Critical).then_some(info)
    })
    .await;
    let reason = info.reason.clone().unwrap_or_default();
    assert!(reason.contains("symbolic link") && reason.contains(&a.display().to_string()), "{reason}");
    assert!(engine.write("vm", "a", 0, vec![1u8; 4096]).await.is_err(), "the disk is not served");
    assert_eq!(std::fs::read(elsewhere.join("a.img")).unwrap(), before, "nothing was written through the link");
    engine.shutdown().await.unwrap();
    drop(engine);

    std::fs::remove_file(&vms).unwrap();
    std::fs::rename(&elsewhere, &vms).unwrap();
    let engine = open_engine(config(tmp.path())).await.unwrap();
    engine.resume("vm").await.ok();
    wait_state(&engine, "vm", VmState::Protected).await;
    engine.write("vm", "a", 0, vec![1u8; 4096]).await.unwrap();
    engine.shutdown().await.unwrap();
}
