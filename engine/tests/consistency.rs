//! Cross-disk consistency and the log space rule.
//!
//! A recovery point of a multi-disk VM is cut at one instant for all its
//! disks, so it holds exactly the writes acknowledged before that instant:
//! when the order of writes across disks is known, a point holds a prefix
//! of it, never a later write without an earlier one.
//!
//! Change logs pending for a disk (sealed + active, headers included) may
//! reach just under half the disk; at half, the VM needs a resync. The sizes
//! are computed from the HRL layout (a 4096-byte header, a 40-byte header
//! per record), so the boundary is tested to the byte.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::changelog::{HEADER_SIZE, RECORD_HEADER_SIZE};
use ferry_engine::lifecycle::VmState;
use ferry_engine::PointSelector;
use support::*;

const BLOCK: usize = 512;
/// Blocks the writer cycles through on each disk (write `i` goes to block `i % SLOTS`).
const SLOTS: u64 = 1024;
const DISK: u64 = 16 * MIB;

/// The bytes of write `i` on `disk`: its number + 1 (so 0 means "never
/// written"), then a pattern of (disk, i).
fn block(disk: u8, i: u64) -> Vec<u8> {
    let mut b = random_bytes(BLOCK, (i << 1) | u64::from(disk));
    b[..8].copy_from_slice(&(i + 1).to_le_bytes());
    b
}

/// How many of the writes `0, 1, 2, ...` to `disk` the image holds, after
/// checking that it holds exactly the first that many (each block the
/// last of them aimed at it, the rest of the disk zeros).
fn writes_held(disk: u8, image: &[u8]) -> u64 {
    assert_eq!(image.len() as u64, DISK);
    let tags: Vec<u64> =
        (0..SLOTS as usize).map(|j| u64::from_le_bytes(image[j * BLOCK..j * BLOCK + 8].try_into().unwrap())).collect();
    let n = tags.iter().copied().max().unwrap(); // the last write held is number n - 1
    for (j, tag) in tags.iter().enumerate() {
        let j = j as u64;
        let slot = &image[j as usize * BLOCK..(j as usize + 1) * BLOCK];
        if j < n {
            let last = j + (n - 1 - j) / SLOTS * SLOTS;
            assert_eq!(*tag, last + 1, "disk {disk} block {j}: holds write {tag} - 1, not {last}");
            assert!(slot == block(disk, last), "disk {disk} block {j}: torn or foreign data");
        } else {
            assert!(slot.iter().all(|b| *b == 0), "disk {disk} block {j}: written, but write {j} is not held");
        }
    }
    let rest = &image[(SLOTS as usize) * BLOCK..];
    assert!(rest.chunks(1 << 16).all(|c| c == &[0u8; 1 << 16][..c.len()]), "disk {disk}: data outside the slots");
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_point_of_a_two_disk_vm_holds_a_prefix_of_the_acknowledged_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let a = sparse_disk(tmp.path(), "a", DISK);
    let b = sparse_disk(tmp.path(), "b", DISK);
    let engine = Arc::new(open_engine(config(tmp.path())).await.unwrap());
    protect(&engine, "vm", &[&a, &b]).await;

    // One writer, in this order: a[0], b[0], a[1], b[1], ...; each write
    // acknowledged before the next starts, a flush every 1024 pairs as a
    // guest would. `acked` counts acknowledged writes in that order.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (engine, acked, stop) = (engine.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let offset = (i % SLOTS) * BLOCK as u64;
                for (n, disk) in [(0u8, "a"), (1, "b")] {
                    engine.write("vm", disk, offset, block(n, i)).await.unwrap();
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
                if i.is_multiple_of(1024) {
                    engine.flush("vm", "a").await.unwrap();
                    engine.flush("vm", "b").await.unwrap();
                }
            }
            i
        })
    };
    eventually("the writer to start", Duration::from_secs(10), || async {
        (acked.load(Ordering::SeqCst) >= 200).then_some(())
    })
    .await;
    // Points cut while the writer runs: (seq, acknowledged before the
    // call, acknowledged when it returned).
    let mut cut = Vec::new();
    for _ in 0..4 {
        let before = acked.load(Ordering::SeqCst);
        let seq = replicate(&engine, "vm").await;
        cut.push((seq, before, acked.load(Ordering::SeqCst)));
    }
    stop.store(true, Ordering::SeqCst);
    let pairs = writer.await.unwrap();
    let total = 2 * pairs;
    assert_eq!(acked.load(Ordering::SeqCst), total);
    let last = replicate(&engine, "vm").await;
    cut.push((last, total, total));
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::Protected, "the logs stayed under half the disks: {info:?}");

    let mut previous = 0;
    for p in engine.recovery_points("vm").await.unwrap() {
        let out = tmp.path().join(format!("p{}", p.seq));
        engine.restore("vm", PointSelector::Seq(p.seq), &out).await.unwrap();
        let ka = writes_held(0, &std::fs::read(out.join("a.img")).unwrap());
        let kb = writes_held(1, &std::fs::read(out.join("b.img")).unwrap());
        std::fs::remove_dir_all(&out).unwrap();
        // A prefix of a[0], b[0], a[1], b[1], ...: never b[i] without a[i],
        // never a[i + 1] without b[i].
        assert!(ka == kb || ka == kb + 1, "point {}: {ka} writes on a, {kb} on b", p.seq);
        let held = ka + kb;
        assert!(held >= previous, "point {} holds fewer writes than the point before", p.seq);
        previous = held;
        if let Some((_, before, after)) = cut.iter().find(|(s, ..)| *s == p.seq) {
            // Everything acknowledged before the call, nothing not yet
            // started when it returned (one write may be logged, not yet acknowledged).
            assert!(
                (*before..=after + 1).contains(&held),
                "point {} holds {held} writes; {before} were acknowledged before it was asked for, {after} when it came",
                p.seq
            );
        }
    }
    assert_eq!(previous, total, "the last point holds every write");
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_logs_one_byte_under_half_the_disk_stay_protected_and_at_half_require_a_resync() {
    const SIZE: u64 = MIB;
    let tmp = tempfile::tempdir().unwrap();
    let a = sparse_disk(tmp.path(), "a", SIZE);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    let info = engine.vm("vm").await.unwrap();
    let (active, sealed) = (info.disks[0].active_log_bytes, info.disks[0].pending_log_bytes);
    assert_eq!((active, sealed), (HEADER_SIZE, 0), "an empty log: only its header");

    // One record that brings the logs to half the disk minus one byte.
    let len = SIZE / 2 - 1 - active - sealed - RECORD_HEADER_SIZE;
    engine.write("vm", "a", 0, random_bytes(len as usize, 1)).await.unwrap();
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.disks[0].active_log_bytes + info.disks[0].pending_log_bytes, SIZE / 2 - 1);
    assert_eq!(replicate(&engine, "vm").await, 2, "the VM still replicates");
    let info = engine.vm("vm").await.unwrap();
    assert_eq!(info.state, VmState::Protected);
    assert!(info.transitions.iter().all(|t| t.to != VmState::ResyncRequired), "{:?}", info.transitions);

    // Committed: its log no longer counts. One record that brings them to half exactly.
    let (active, sealed) = eventually("the committed log to be released", Duration::from_secs(10), || async {
        let d = engine.vm("vm").await.unwrap().disks[0].clone();
        (d.pending_log_bytes == 0).then_some((d.active_log_bytes, d.pending_log_bytes))
    })
    .await;
    assert_eq!(active, HEADER_SIZE);
    let len = SIZE / 2 - active - sealed - RECORD_HEADER_SIZE;
    engine.write("vm", "a", 0, random_bytes(len as usize, 2)).await.unwrap();
    let info = wait_state(&engine, "vm", VmState::ResyncRequired).await;
    let reason = info.reason.unwrap_or_default();
    assert!(reason.contains(&format!("reached {} bytes, 50% of its size", SIZE / 2)), "{reason}");
    // The resync brings the replica to the disk, both writes included.
    engine.resync("vm").await.unwrap();
    wait_state(&engine, "vm", VmState::Protected).await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
}
