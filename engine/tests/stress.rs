//! Stress of the engine: one writer making stamped writes (with flushes as a
//! guest issues them) to a two-disk VM replicated every second, while an
//! operator fires resyncs, pauses and resumes at random moments for 20 s.
//! Afterwards every listed recovery point must restore, each must equal the
//! disks after exactly the first k acknowledged writes for some k (a
//! crash-consistent cut across both disks: never a later write without an
//! earlier one), k must not decrease with the point's number, and the
//! latest point must equal the disks.
//!
//! Every written block carries the index of the write that wrote it, so the
//! k of a restored point is read off its blocks and then checked by
//! replaying the first k writes.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::lifecycle::VmState;
use ferry_engine::{DiskSpec, PointSelector, VmSpec};
use rand::{Rng, SeedableRng};
use support::*;

const BLOCK: u64 = 4096;
const DISK: u64 = 16 * MIB;
const DISKS: [&str; 2] = ["a", "b"];

/// One acknowledged write: disk, offset, blocks; `zero` for a WRITE_ZEROES.
#[derive(Clone, Copy, Debug)]
struct Write {
    disk: usize,
    offset: u64,
    blocks: u64,
    zero: bool,
}

/// Block contents of write `index`: its index in every 8 bytes, so any
/// block of a restored image names the write it came from.
fn stamped(index: u64, blocks: u64) -> Vec<u8> {
    let word = (index + 1).to_le_bytes();
    (0..blocks * BLOCK / 8).flat_map(|_| word).collect()
}

/// The disks after the first `k` writes, advanced write by write.
struct Model<'a> {
    writes: &'a [Write],
    disks: Vec<Vec<u8>>,
    k: usize,
}

impl Model<'_> {
    fn advance_to(&mut self, k: usize) {
        for i in self.k..k {
            let w = self.writes[i];
            let range = w.offset as usize..(w.offset + w.blocks * BLOCK) as usize;
            if w.zero {
                self.disks[w.disk][range].fill(0);
            } else {
                self.disks[w.disk][range].copy_from_slice(&stamped(i as u64, w.blocks));
            }
        }
        self.k = k;
    }

    /// The k (never below the last one found) for which `images` are the
    /// disks after the first k writes: the newest stamp, then any zeroing
    /// writes right after it (they leave no stamp).
    fn prefix_of(&mut self, images: &[Vec<u8>]) -> Option<usize> {
        let newest = images
            .iter()
            .flat_map(|img| img.chunks(BLOCK as usize))
            .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()) as usize)
            .max()
            .unwrap_or(0);
        if newest < self.k {
            return None; // an earlier point held a later write
        }
        self.advance_to(newest);
        loop {
            if self.disks == images {
                return Some(self.k);
            }
            if self.k < self.writes.len() && self.writes[self.k].zero {
                self.advance_to(self.k + 1);
            } else {
                return None;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_flushes_resyncs_and_pauses_at_random_keep_every_point_a_consistent_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let paths: Vec<_> = DISKS.iter().map(|d| sparse_disk(tmp.path(), d, DISK)).collect();
    let mut cfg = config(tmp.path());
    cfg.auto_resync = ferry_engine::config::AutoResync::Immediately;
    let engine = Arc::new(open_engine(cfg).await.unwrap());
    let specs = DISKS.iter().zip(&paths).map(|(n, p)| DiskSpec { name: n.to_string(), path: p.clone() }).collect();
    engine.protect(VmSpec::new("vm", specs).with_frequency(Duration::from_secs(1))).await.unwrap();
    engine.wait_protected("vm", Duration::from_secs(60)).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let operator = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let (mut resyncs, mut pauses) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                // Refusals (wrong state) are part of the game; only accepted asks count.
                match rng.random_range(0..3) {
                    0 => resyncs += engine.resync("vm").await.is_ok() as u32,
                    1 => {
                        if engine.pause("vm").await.is_ok() {
                            pauses += 1;
                            tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                            engine.resume("vm").await.unwrap();
                        }
                    }
                    _ => {
                        let _ = engine.replicate_now("vm").await;
                    }
                }
            }
            (resyncs, pauses)
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut writes = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        let i = writes.len() as u64;
        let disk = rng.random_range(0..DISKS.len());
        let blocks = rng.random_range(1..=4u64);
        let offset = rng.random_range(0..DISK / BLOCK - blocks) * BLOCK;
        let zero = rng.random_ratio(1, 10);
        let d = engine.disk("vm", DISKS[disk]).unwrap();
        if zero {
            d.write_zeroes(offset, blocks * BLOCK, false).unwrap();
        } else {
            engine.write("vm", DISKS[disk], offset, stamped(i, blocks)).await.unwrap();
        }
        writes.push(Write { disk, offset, blocks, zero });
        // Flushes as a guest issues them: every 32 writes, and the odd FUA.
        if i % 32 == 31 || rng.random_ratio(1, 50) {
            d.flush().unwrap();
        }
        // About 2 MB/s of churn: well under the 50% rule at a point a second.
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (resyncs, pauses) = operator.await.unwrap();

    // Settle: whatever state the operator left, end Protected with a final point.
    let _ = engine.resume("vm").await;
    let info = eventually("the VM to settle", Duration::from_secs(60), || async {
        let info = engine.vm("vm").await.unwrap();
        (info.state == VmState::Protected).then_some(info)
    })
    .await;
    engine.replicate_now("vm").await.unwrap();
    println!("{} writes, {resyncs} resyncs, {pauses} pauses accepted; settled in {}", writes.len(), info.state);
    assert!(resyncs >= 2 && pauses >= 2, "the operator's asks must land: {resyncs} resyncs, {pauses} pauses");

    let points = engine.recovery_points("vm").await.unwrap();
    assert!(points.len() >= 10, "a point a second (and resyncs): {}", points.len());
    let mut model = Model { writes: &writes, disks: vec![vec![0u8; DISK as usize]; DISKS.len()], k: 0 };
    let mut latest_images = Vec::new();
    for p in &points {
        let out = tmp.path().join(format!("p{}", p.seq));
        engine.restore("vm", PointSelector::Seq(p.seq), &out).await.unwrap_or_else(|e| {
            panic!("point {} ({:?}) does not restore: {e}", p.seq, p.kind);
        });
        let images: Vec<Vec<u8>> = DISKS.iter().map(|d| std::fs::read(out.join(format!("{d}.img"))).unwrap()).collect();
        let before = model.k;
        model.prefix_of(&images).unwrap_or_else(|| {
            panic!(
                "point {} ({:?}) is not the disks after any k >= {before} of the {} acknowledged writes",
                p.seq,
                p.kind,
                writes.len()
            )
        });
        std::fs::remove_dir_all(&out).unwrap();
        latest_images = images;
    }
    // The latest point holds every write: it is the disks after all of
    // them (a zeroing write over blocks already zero leaves no trace, so
    // the k found for it may be lower).
    let found = model.k;
    model.advance_to(writes.len());
    assert!(model.disks == latest_images, "the latest point holds every write (found {found} of {})", writes.len());
    let latest: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    assert_latest_equals_sources(&engine, "vm", &latest, &tmp.path().join("latest")).await;
    engine.shutdown().await.unwrap();
}
