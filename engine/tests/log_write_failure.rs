//! A change-log write that fails for real (not through a failpoint) stops
//! logging and sends the VM to `ResyncRequired`; the write itself reached
//! the disk and is acknowledged, and the resync ships it.
//!
//! How the log write is made to fail: as root, permissions do not stop a
//! write, and the log is written through a descriptor opened long before.
//! The file-size limit (RLIMIT_FSIZE) does stop it: a write past the limit
//! fails with EFBIG. The limit is set at 4 MiB, under the 50% rule of the
//! 16 MiB disk, and the test writes 6 MiB in 64 KiB writes (small enough to
//! carry their bytes in the log) over the disk's first MiB: the disk writes
//! and the state store stay under the limit, while the log grows past it. The limit is process-wide, so
//! this test is alone in its binary (nextest runs each test in a process
//! of its own anyway), and the limit is put back right after the write.

mod support;

use std::time::Duration;

use ferry_engine::lifecycle::VmState;
use support::*;

/// Sets the soft file-size limit; returns the previous one.
fn set_file_size_limit(bytes: libc::rlim_t) -> libc::rlim_t {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain libc calls with valid pointers to initialised structs.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut old), 0);
        let new = libc::rlimit { rlim_cur: bytes.min(old.rlim_max), rlim_max: old.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &new), 0);
    }
    old.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_change_log_write_is_acknowledged_stops_logging_and_resyncs() {
    const SIZE: u64 = 16 * MIB;
    // A write past the limit would otherwise kill the process with SIGXFSZ.
    // SAFETY: ignoring a signal has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let tmp = tempfile::tempdir().unwrap();
    let a = sparse_disk(tmp.path(), "a", SIZE);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    let [log]: [std::path::PathBuf; 1] = logs(&a).try_into().unwrap();
    // The limit stops the log at 4 MiB, before the 50% rule (8 MiB) would;
    // the writes go to the first MiB of the disk, well under it.
    const LIMIT: u64 = 4 * MIB + 4096;
    let store = std::fs::metadata(tmp.path().join("data/state.redb")).unwrap().len();
    assert!(store < LIMIT / 2, "the state store ({store} bytes) must stay under the limit");

    // Writes small enough to carry their bytes in the log (a large one
    // leaves them in the image), so the log outgrows the limit.
    let chunk = 64 * KIB;
    assert!(chunk < ferry_engine::disk::IN_IMAGE_MIN);
    let data = random_bytes(6 * MIB as usize, 1);
    let old = set_file_size_limit(LIMIT);
    let mut written = Ok(());
    for (i, piece) in data.chunks(chunk as usize).enumerate() {
        written = written.and(engine.write("vm", "a", (i as u64 % 16) * chunk, piece.to_vec()).await);
    }
    let flushed = engine.flush("vm", "a").await;
    set_file_size_limit(old);
    written.expect("the disk took the writes: they are acknowledged");
    flushed.expect("the disk is synced; the log is no longer used");

    let info = wait_state(&engine, "vm", VmState::ResyncRequired).await;
    let reason = info.reason.unwrap_or_default();
    assert!(reason.contains("change log write failed on disk a"), "{reason}");
    assert!(reason.contains(&log.display().to_string()) && reason.contains("File too large"), "{reason}");
    eventually("the logs to be discarded", Duration::from_secs(10), || async { logs(&a).is_empty().then_some(()) })
        .await;
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.disks[0].active_log_bytes, 0, "logging stopped until the resync");

    engine.resync("vm").await.unwrap();
    wait_state(&engine, "vm", VmState::Protected).await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    // Logging runs again after the resync.
    wait_idle(&engine).await;
    engine.write("vm", "a", 4096, random_bytes(4096, 2)).await.unwrap();
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("after")).await;
    engine.shutdown().await.unwrap();
}
