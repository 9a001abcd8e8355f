//! Resynchronization by fixed-block checksums.
//!
//! When change logs can no longer describe what changed (logs over 50% of
//! the disk, a log left open before a reboot, a damaged or broken chain, a
//! failed log write, a missing
//! remote object), the replica is brought back by comparison instead:
//! source and target are cut into fixed blocks, each block is hashed (xxh3)
//! on both sides, and only the blocks whose hashes differ are sent.
//!
//! Overview: the VM actor starts a new log chain and a copy-before-write
//! snapshot at one instant (writes made during the resync are logged and
//! shipped as the next point, after it). The target's block hashes are
//! computed once, from the replica at the last committed point; the
//! source's blocks are read from the snapshot once, hashed, and a block is
//! kept for upload only when its hash differs. The resync's recovery point
//! is a delta on top of the last point holding just those blocks, so
//! restore is unchanged and the point equals the source at snapshot time.
//!
//! Consistency: the point is committed like any other (objects, manifest,
//! index). Keys depend on (point, disk, chunk), so a retried resync rewrites
//! the same keys.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::capture::disk::Disk;
use crate::capture::snapshot::CowSnapshot;
use crate::error::{Error, Result};
use crate::replica::bundle::{BundleExtent, ExtentData};
use crate::replica::manifest::ObjectRef;
use crate::replicate::UploadCtx;
use crate::target::Target;

/// Default resync block: 4 KiB, the granularity guests write in, so scattered
/// small writes cost what they changed (a hash list is 0.2% of the disk).
pub const DEFAULT_RESYNC_BLOCK: u64 = 4 << 10;

pub use crate::replica::hashes::hash_block;

/// Runs of block indices whose hashes differ. A block the target lacks
/// (the target list is shorter) differs.
pub fn differing_runs(source: &[u64], target: &[u64]) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (i, h) in source.iter().enumerate() {
        if target.get(i) == Some(h) {
            continue;
        }
        let i = i as u64;
        match runs.last_mut() {
            Some(r) if r.end == i => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    runs
}

/// What a resync did, for its job and the operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncStats {
    pub blocks_compared: u64,
    pub blocks_sent: u64,
    /// Bytes put on the target (compressed).
    pub bytes_sent: u64,
    /// Bytes of disk the sent blocks cover.
    pub bytes_logical: u64,
}

impl ResyncStats {
    pub fn add(&mut self, o: &ResyncStats) {
        self.blocks_compared += o.blocks_compared;
        self.blocks_sent += o.blocks_sent;
        self.bytes_sent += o.bytes_sent;
        self.bytes_logical += o.bytes_logical;
    }
}

/// Hashes every block of an image file (a replica restored once).
pub fn hash_file(path: &Path, size: u64, block: u64) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let mut buf = vec![0u8; (4 << 20).max(block as usize)];
    let per = buf.len() as u64 / block * block;
    let mut out = Vec::with_capacity(size.div_ceil(block) as usize);
    let mut off = 0;
    while off < size {
        let n = per.min(size - off) as usize;
        f.read_exact_at(&mut buf[..n], off).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        out.extend(buf[..n].chunks(block as usize).map(hash_block));
        off += n as u64;
    }
    Ok(out)
}

/// Compares one disk's snapshot with the target's block hashes and uploads
/// the differing blocks as parts of point `seq` (one part per chunk of
/// `ctx.chunk_size`, none for a chunk that matches), through the snapshot
/// pipeline (`replicate::copy_snapshot`). Also returns every block's
/// source hash (the replica's, once the point commits).
pub async fn resync_disk(
    ctx: &UploadCtx,
    disk: Arc<Disk>,
    snap: Arc<CowSnapshot>,
    target_hashes: Arc<Vec<u64>>,
    seq: u64,
    resume: crate::replicate::Resume,
) -> Result<(Vec<ObjectRef>, ResyncStats, Vec<u64>)> {
    let block = ctx.hash_block;
    let plan: crate::replicate::ChunkPlan = Arc::new(move |offset, buf, source| {
        let first = (offset / block) as usize;
        let end = (first + source.len()).min(target_hashes.len());
        let target = target_hashes.get(first..end).unwrap_or(&[]);
        differing_runs(source, target)
            .iter()
            .map(|r| {
                let a = (r.start * block) as usize;
                let b = ((r.end * block) as usize).min(buf.len());
                BundleExtent { offset: offset + a as u64, data: ExtentData::Data(buf[a..b].to_vec()) }
            })
            .collect()
    });
    let copy = crate::replicate::copy_snapshot(ctx, disk, snap, seq, plan, resume).await?;
    let s = ResyncStats {
        blocks_compared: copy.hashes.len() as u64,
        blocks_sent: copy.objects.iter().map(|o| o.logical_len.div_ceil(block)).sum(),
        bytes_sent: copy.objects.iter().map(|o| o.stored_len).sum(),
        bytes_logical: copy.objects.iter().map(|o| o.logical_len).sum(),
    };
    Ok((copy.objects, s, copy.hashes))
}

/// Checks that every object the chain of point `seq` names is on the target
/// (one listing, plus the chain's manifests). Hashes kept beside the daemon
/// describe what was put, not what is there now: a resync must not build a
/// delta on a replica that lost an object (every later point would be
/// unrestorable). A gap is `NeedsResync`, naming the object.
pub async fn replica_intact(target: &Target, vm: &str, generation: u64, seq: u64) -> Result<()> {
    let chain = crate::restore::load_chain(target, vm, generation, seq).await?;
    let prefix = format!("{}/disks/", crate::replica::manifest::Keys::new(&**target, vm).prefix(generation));
    let present: std::collections::HashSet<String> = target.list(&prefix).await?.into_iter().collect();
    for m in &chain {
        for o in m.disks.iter().flat_map(|d| &d.objects) {
            if !present.contains(&o.key) {
                return Err(crate::target::missing(&o.key));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
/// The target's block hashes of one disk at point `seq`: the replica is
/// rebuilt once into `scratch` (sparse), hashed, and removed.
pub async fn target_hashes(
    target: &Target,
    vm: &str,
    generation: u64,
    seq: u64,
    disk: &str,
    size: u64,
    block: u64,
    scratch: &Path,
    parallelism: usize,
) -> Result<Vec<u64>> {
    if seq == 0 {
        return Ok(Vec::new()); // no replica yet: every block differs
    }
    let restored = crate::restore::restore_point(
        target,
        vm,
        generation,
        seq,
        scratch,
        crate::restore::RestoreOpts { parallelism, only: Some(disk), durable: false, replace: true },
        Default::default(),
        Default::default(),
    )
    .await?;
    let Some(img) = restored.into_iter().find(|d| d.name == disk) else {
        return Ok(Vec::new()); // the disk is new since that point
    };
    let path = img.path.clone();
    let hashes = crate::runtime::background(move || hash_file(&path, size.min(img.size), block)).await?;
    let _ = std::fs::remove_file(&img.path);
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    #[allow(clippy::type_complexity, clippy::single_range_in_vec_init)]
    fn runs_table() {
        let cases: Vec<(Vec<u64>, Vec<u64>, Vec<Range<u64>>)> = vec![
            (vec![1, 2, 3], vec![1, 2, 3], vec![]),
            (vec![1, 2, 3], vec![9, 2, 9], vec![0..1, 2..3]),
            (vec![1, 2, 3, 4], vec![9, 9, 3, 9], vec![0..2, 3..4]),
            (vec![1, 2, 3], vec![1], vec![1..3]),
            (vec![1, 2], vec![], vec![0..2]),
            (vec![], vec![1], vec![]),
        ];
        for (s, t, want) in cases {
            assert_eq!(differing_runs(&s, &t), want, "{s:?} vs {t:?}");
        }
    }

    proptest! {
        /// Copying exactly the differing runs from source onto target makes them equal,
        /// and no run covers a block that was already equal.
        #[test]
        fn applying_the_runs_makes_target_equal_source(
            source in proptest::collection::vec(0u64..4, 0..200),
            target in proptest::collection::vec(0u64..4, 0..200),
        ) {
            let mut t = target.clone();
            t.resize(source.len().max(t.len()), u64::MAX);
            for r in differing_runs(&source, &target) {
                for i in r {
                    prop_assert!(target.get(i as usize) != Some(&source[i as usize]));
                    t[i as usize] = source[i as usize];
                }
            }
            prop_assert_eq!(&t[..source.len()], &source[..]);
        }
    }
}
