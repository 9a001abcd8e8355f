//! Defects found by review and by new users, each pinned by a test that
//! failed before its fix: the engine must keep every recovery point
//! restorable and every write either logged or flagged for a resync.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_engine::lifecycle::VmState;
use ferry_engine::{DiskSpec, Engine, EngineConfig, PointSelector, VmSpec};

const MIB: u64 = 1 << 20;

fn sparse_disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(format!("{name}.img"));
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

async fn protected(tmp: &Path, vm: &str, disks: &[(&str, &Path)]) -> Engine {
    let mut config = EngineConfig::new(tmp.join("data"));
    config.auto_resync = ferry_engine::config::AutoResync::Manual;
    let engine = Engine::open(config).await.unwrap();
    let specs = disks.iter().map(|(n, p)| DiskSpec { name: n.to_string(), path: p.to_path_buf() }).collect();
    engine.protect(VmSpec::new(vm, specs).with_frequency(Duration::from_secs(3600))).await.unwrap();
    engine.wait_protected(vm, Duration::from_secs(60)).await.unwrap();
    engine
}

fn assert_same_file(got: &Path, want: &Path) {
    let (g, w) = (std::fs::read(got).unwrap(), std::fs::read(want).unwrap());
    assert_eq!(g.len(), w.len(), "{} vs {}: size", got.display(), want.display());
    if let Some(i) = g.iter().zip(&w).position(|(a, b)| a != b) {
        panic!("{} vs {}: first differing byte at {i}", got.display(), want.display());
    }
}

/// Defect 1: `qemu-io -c 'write -z 0 300M'` made the point (and every later
/// one) unrestorable: "extent length out of range".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_zero_range_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "os", 512 * MIB);
    let engine = protected(tmp.path(), "vm", &[("os", &path)]).await;
    let disk = engine.disk("vm", "os").unwrap();
    engine.write("vm", "os", 0, vec![0xab; MIB as usize]).await.unwrap();
    engine.write("vm", "os", 400 * MIB, vec![0xcd; MIB as usize]).await.unwrap();
    engine.replicate_now("vm").await.unwrap().unwrap();
    // One huge zero range, then many small adjacent ones that coalesce (mkfs, fstrim).
    disk.write_zeroes(0, 300 * MIB, false).unwrap();
    for i in 0..64 {
        disk.write_zeroes(300 * MIB + i * (64 << 10), 64 << 10, false).unwrap();
    }
    disk.write_zeroes(304 * MIB, 100 * MIB + 4096, false).unwrap();
    disk.flush().unwrap();
    let p = engine.replicate_now("vm").await.unwrap().unwrap();
    engine.write("vm", "os", 5 * MIB, vec![1; 4096]).await.unwrap();
    let later = engine.replicate_now("vm").await.unwrap().unwrap();
    assert!(later.seq > p.seq);
    let out = tmp.path().join("restored");
    engine.restore("vm", PointSelector::Latest, &out).await.unwrap();
    assert_same_file(&out.join("os.img"), &path);
    engine.shutdown().await.unwrap();
}

async fn wait_state(engine: &Engine, vm: &str, want: VmState) -> ferry_engine::VmInfo {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = engine.vm(vm).await.unwrap();
        if info.state == want {
            return info;
        }
        assert!(std::time::Instant::now() < deadline, "waiting for {want}: {info:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Defect 6: a zero-length WRITE, TRIM or WRITE_ZEROES stopped logging and
/// sent the VM to ResyncRequired. It is harmless: success, nothing logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_length_requests_succeed_and_log_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "os", 4 * MIB);
    let engine = protected(tmp.path(), "vm", &[("os", &path)]).await;
    let disk = engine.disk("vm", "os").unwrap();
    let before = engine.vm("vm").await.unwrap().disks[0].active_log_bytes;
    engine.write("vm", "os", 4096, Vec::new()).await.unwrap();
    disk.write_zeroes(8192, 0, false).unwrap();
    ferry_engine::nbd::BlockDevice::trim(&*disk, 4 * MIB, 0, true).unwrap();
    disk.write_at(0, &[], true).unwrap();
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::Protected, "{info:?}");
    assert_eq!(info.disks[0].active_log_bytes, before, "nothing logged: {info:?}");
    assert_eq!(engine.replicate_now("vm").await.unwrap(), None, "nothing to replicate");
    // Logging goes on.
    engine.write("vm", "os", 0, vec![9; 4096]).await.unwrap();
    assert!(engine.replicate_now("vm").await.unwrap().is_some());
    engine.shutdown().await.unwrap();
}

/// Defect 7: a disk write that failed part-way was neither logged nor
/// flagged, so the replica diverged silently. It must fail and mark the
/// disk for a resync, after which the replica equals the disk again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_disk_write_errors_and_needs_a_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "os", 4 * MIB);
    let engine = protected(tmp.path(), "vm", &[("os", &path)]).await;
    // As if the image's file system ran out of space.
    ferry_engine::failpoint::arm("disk.write", tmp.path(), 1, libc::ENOSPC);
    let e = engine.write("vm", "os", 0, vec![7; 4096]).await.unwrap_err();
    assert!(e.to_string().contains("bytes at 0 of") && e.to_string().contains(&path.display().to_string()), "{e}");
    let info = wait_state(&engine, "vm", VmState::ResyncRequired).await;
    assert!(info.reason.as_deref().unwrap_or("").contains("write to disk os failed"), "{info:?}");
    engine.resync("vm").await.unwrap();
    wait_state(&engine, "vm", VmState::Protected).await;
    let out = tmp.path().join("restored");
    engine.restore("vm", PointSelector::Latest, &out).await.unwrap();
    assert_same_file(&out.join("os.img"), &path);
    engine.shutdown().await.unwrap();
}

/// Defect 8: after a failed disk fdatasync a later flush succeeded, though
/// the kernel may have dropped the pages. The failure is sticky until a
/// resync, which also tells the VM the log cannot be trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_disk_sync_is_sticky_until_a_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "os", 4 * MIB);
    let engine = protected(tmp.path(), "vm", &[("os", &path)]).await;
    engine.write("vm", "os", 0, vec![7; 4096]).await.unwrap();
    ferry_engine::failpoint::arm("disk.sync", tmp.path(), 1, libc::EIO);
    assert!(engine.flush("vm", "os").await.is_err());
    let again = engine.flush("vm", "os").await.unwrap_err();
    assert!(again.to_string().contains("an earlier sync failed"), "{again}");
    let info = wait_state(&engine, "vm", VmState::ResyncRequired).await;
    assert!(info.reason.as_deref().unwrap_or("").contains("could not be synced"), "{info:?}");
    engine.resync("vm").await.unwrap();
    wait_state(&engine, "vm", VmState::Protected).await;
    engine.flush("vm", "os").await.unwrap();
    engine.shutdown().await.unwrap();
}

/// Defect 5: a disk handle kept across unprotect (an open NBD connection)
/// went on writing with no log and no copy-before-write, tearing the next
/// protection's base copy. After unprotect every request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_handle_kept_across_unprotect_cannot_write() {
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "os", 4 * MIB);
    let engine = protected(tmp.path(), "vm", &[("os", &path)]).await;
    let old = engine.disk("vm", "os").unwrap();
    old.write_at(0, &[1; 4096], false).unwrap();
    engine.unprotect("vm").await.unwrap();
    let e = old.write_at(4096, &[2; 4096], false).unwrap_err();
    assert!(e.to_string().contains("no longer protected"), "{e}");
    assert!(old.write_zeroes(0, 4096, false).is_err());
    assert!(old.flush().is_err());
    let mut buf = [0u8; 16];
    assert!(old.read_at(0, &mut buf).is_err());
    // Protected again: the old handle still cannot write; the new VM replicates what the disk holds.
    let specs = vec![DiskSpec { name: "os".into(), path: path.clone() }];
    engine.protect(VmSpec::new("vm", specs).with_frequency(Duration::from_secs(3600))).await.unwrap();
    assert!(old.write_at(8192, &[3; 4096], false).is_err());
    engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();
    engine.write("vm", "os", 12288, vec![4; 4096]).await.unwrap();
    engine.replicate_now("vm").await.unwrap().unwrap();
    let out = tmp.path().join("restored");
    engine.restore("vm", PointSelector::Latest, &out).await.unwrap();
    assert_same_file(&out.join("os.img"), &path);
    engine.shutdown().await.unwrap();
}

/// Defect 4: a rotation prepared against one log swapped blindly, so a
/// resync begun meanwhile had its new log sealed by the cycle (which then
/// committed a point on an old parent) and the disk logged into a deleted
/// file. The rotation must refuse and leave the resync's log in place.
#[test]
fn a_rotation_prepared_before_a_resync_is_refused() {
    use ferry_engine::disk::{self, Disk};
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "d", MIB);
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let log = disk::new_log(&path, "vm", "d", 1, 0).unwrap();
    let d = std::sync::Arc::new(Disk::new("vm", "d", &path, log, 0, tx).unwrap());
    d.write_at(0, &[1; 4096], false).unwrap();
    let prepared = d.prepare_next_log().unwrap();
    let prepared_path = prepared.path().to_path_buf();
    let (snaps, _, _) = disk::begin_resync(std::slice::from_ref(&d)).unwrap();
    let resync_log = d.active_header().unwrap();
    let (e, back) = disk::rotate_all(std::slice::from_ref(&d), vec![prepared]).unwrap_err();
    assert!(e.to_string().contains("changed while its rotation was prepared"), "{e}");
    assert_eq!(back.len(), 1, "the prepared log is handed back to be removed");
    assert_eq!(d.active_header().unwrap(), resync_log, "the resync's log stays active");
    drop(back);
    let _ = std::fs::remove_file(prepared_path);
    // Writes during the resync are logged in the resync's chain.
    d.write_at(4096, &[2; 4096], false).unwrap();
    d.flush().unwrap();
    assert_eq!(d.active_records(), 1);
    drop(snaps);
}

/// Defect 3: discarding logs raced an operator resync accepted right after
/// the VM needed one: the late discard ended the resync's snapshot and
/// dropped its new log (later writes unlogged), and two tasks deleting the
/// same files sent the VM to Critical. Repeated, since it is a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_resync_right_after_a_resync_is_needed_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "os", 2 * MIB);
    let engine = protected(tmp.path(), "vm", &[("os", &path)]).await;
    let mut rng_state = 1u64;
    for round in 0..12u64 {
        // Past 50% of the disk: the VM needs a resync; the operator asks at once.
        for i in 0..5u64 {
            engine.write("vm", "os", (i * 256) << 10, vec![round as u8 + 1; 256 << 10]).await.unwrap();
        }
        loop {
            match engine.resync("vm").await {
                Ok(_) => break,
                Err(_) => tokio::task::yield_now().await, // not in ResyncRequired yet
            }
        }
        // Writes while the resync runs must reach the next point.
        for _ in 0..8 {
            rng_state = rng_state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (rng_state >> 33) % (2 * MIB - 4096);
            engine.write("vm", "os", off, vec![(rng_state >> 13) as u8; 4096]).await.unwrap();
        }
        let info = wait_state(&engine, "vm", VmState::Protected).await;
        assert!(info.disks[0].active_log_bytes > 0, "round {round}: the disk is logging: {info:?}");
        engine.replicate_now("vm").await.unwrap();
        let out = tmp.path().join(format!("restored{round}"));
        engine.restore("vm", PointSelector::Latest, &out).await.unwrap();
        assert_same_file(&out.join("os.img"), &path);
    }
    engine.shutdown().await.unwrap();
}

/// Review finding: a resync signal queued before a resync started a new
/// chain superseded that resync. Only a new chain makes a signal moot, not
/// a rotation (a first fix compared log ids and lost 50% signals to cycles).
#[test]
fn a_resync_signal_is_moot_only_after_a_new_chain() {
    use ferry_engine::disk::{self, Disk, DiskSignal};
    let tmp = tempfile::tempdir().unwrap();
    let path = sparse_disk(tmp.path(), "d", 64 << 10);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let log = disk::new_log(&path, "vm", "d", 1, 0).unwrap();
    let d = std::sync::Arc::new(Disk::new("vm", "d", &path, log, 0, tx).unwrap());
    d.write_at(0, &[1; 40 << 10], false).unwrap(); // past 50% of 64 KiB
    let Ok(DiskSignal::ResyncNeeded { chain, reason, .. }) = rx.try_recv() else { panic!("no signal") };
    assert!(reason.contains("50%"), "{reason}");
    let next = d.prepare_next_log().unwrap();
    let (old, _) = disk::rotate_all(std::slice::from_ref(&d), vec![next]).map_err(|(e, _)| e).unwrap();
    drop(old);
    assert!(d.signal_is_current(chain), "a rotation keeps the chain");
    let _snaps = disk::begin_resync(std::slice::from_ref(&d)).unwrap();
    assert!(!d.signal_is_current(chain), "a resync starts a new chain");
}
