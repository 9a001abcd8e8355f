//! The replica's block hashes, kept as blocks are written.
//!
//! A resync compares the source's block hashes with the target's. Reading
//! the replica back to hash it would cost a full download per resync, so
//! the engine keeps the target's hashes as it writes: the base copy and a
//! resync know every block they send, and a delta knows every block its
//! coalesced extents cover entirely. A block a delta only partly covers
//! becomes [`UNKNOWN`] and is simply sent by the next resync.
//!
//! Consistency: the file (`<data-dir>/hashes/<vm>/<disk>.hashes`) names
//! the recovery point it describes and is rewritten (temp file, rename)
//! only after that point is committed. A crash in between leaves a file for
//! an older point; the resync then sees the mismatch and falls back to
//! hashing the replica once. So stale hashes are never trusted.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A block whose replica content is not known here.
pub const UNKNOWN: u64 = u64::MAX;
const MAGIC: &[u8; 8] = b"FRYHASH1";

/// One disk's replica block hashes as of recovery point `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    pub generation: u64,
    pub seq: u64,
    pub block: u64,
    pub hashes: Vec<u64>,
}

/// A change to a run of blocks' hashes: `count` blocks from block `first`
/// all get `hash` (or UNKNOWN). A zeroed range of any size is one run, so
/// a TRIM of a whole disk costs one entry, not one per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRun {
    pub first: u64,
    pub count: u64,
    pub hash: u64,
}

pub type HashUpdates = Vec<HashRun>;

pub fn path(data_dir: &Path, vm: &str, disk: &str) -> PathBuf {
    crate::paths::DataDir::new(data_dir).disk_hashes(vm, disk)
}

pub fn hash_block(data: &[u8]) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(data) {
        UNKNOWN => UNKNOWN - 1, // keep the marker unambiguous
        h => h,
    }
}

/// Hashes of the blocks a piece of data at `offset` covers entirely, and
/// UNKNOWN for the blocks it covers only in part.
pub fn updates_for(offset: u64, data: Option<&[u8]>, len: u64, block: u64, out: &mut HashUpdates) {
    if len == 0 {
        return;
    }
    let end = offset + len;
    let (first, last) = (offset / block, (end - 1) / block);
    // Blocks the range covers entirely: `first_full..end_full`.
    let first_full = offset.div_ceil(block);
    let end_full = (end / block).max(first_full);
    let (head_partial, tail_partial) = (!offset.is_multiple_of(block), !end.is_multiple_of(block));
    let run = |first, count, hash| HashRun { first, count, hash };
    if head_partial {
        out.push(run(first, 1, UNKNOWN));
    }
    match data {
        Some(d) => out.extend((first_full..end_full).map(|b| {
            let at = (b * block - offset) as usize;
            run(b, 1, hash_block(&d[at..at + block as usize]))
        })),
        None if end_full > first_full => out.push(run(first_full, end_full - first_full, zero_block_hash(block))),
        None => {}
    }
    if tail_partial && !(head_partial && last == first) {
        out.push(run(last, 1, UNKNOWN));
    }
}

fn zero_block_hash(block: u64) -> u64 {
    hash_block(&vec![0u8; block as usize])
}

impl BlockHashes {
    pub fn apply(&mut self, updates: &[HashRun]) {
        let len = self.hashes.len() as u64;
        for r in updates {
            let (a, b) = (r.first.min(len), r.first.saturating_add(r.count).min(len));
            self.hashes[a as usize..b as usize].fill(r.hash);
        }
    }

    pub fn load(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        let (head, body) = bytes.split_at_checked(40)?;
        if &head[..8] != MAGIC || body.len() % 8 != 0 {
            return None;
        }
        let n = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
        let (generation, seq, block, count) = (n(8), n(16), n(24), n(32));
        let hashes: Vec<u64> =
            body.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        (hashes.len() as u64 == count).then_some(BlockHashes { generation, seq, block, hashes })
    }

    /// Writes the file atomically (temp file, rename). Not fsynced: a lost
    /// file only costs a fallback hash pass, never a wrong answer.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().expect("hash files live in a folder");
        crate::paths::create_private_dirs(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut out = Vec::with_capacity(40 + self.hashes.len() * 8);
        out.extend_from_slice(MAGIC);
        for v in [self.generation, self.seq, self.block, self.hashes.len() as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for h in &self.hashes {
            out.extend_from_slice(&h.to_le_bytes());
        }
        let tmp = path.with_extension("hashes.tmp");
        crate::paths::create_private(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &out))
            .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {}", path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fully_covered_blocks_get_a_hash() {
        let data = vec![7u8; 10_000];
        let mut u = vec![];
        updates_for(4096, Some(&data), 10_000, 4096, &mut u);
        // 4096..14096 covers block 1 and 2 fully, block 3 (12288..16384) in part.
        let run = |first, count, hash| HashRun { first, count, hash };
        assert_eq!(
            u,
            vec![run(1, 1, hash_block(&data[..4096])), run(2, 1, hash_block(&data[4096..8192])), run(3, 1, UNKNOWN)]
        );
        let mut z = vec![];
        updates_for(100, None, 9000, 4096, &mut z);
        assert_eq!(z, vec![run(0, 1, UNKNOWN), run(1, 1, hash_block(&[0u8; 4096])), run(2, 1, UNKNOWN)]);
        // Inside one block, in part: that block alone becomes unknown.
        let mut p = vec![];
        updates_for(10, None, 20, 4096, &mut p);
        assert_eq!(p, vec![run(0, 1, UNKNOWN)]);
        // A TRIM of a terabyte is one run.
        let mut t = vec![];
        updates_for(0, None, 1 << 40, 4096, &mut t);
        assert_eq!(t, vec![run(0, 1 << 28, hash_block(&[0u8; 4096]))]);
    }

    proptest::proptest! {
        /// Runs describe exactly the per-block rule: full blocks hashed, partial ones UNKNOWN.
        #[test]
        fn runs_match_the_per_block_rule(offset in 0u64..40_000, len in 0u64..40_000, zero: bool) {
            let block = 4096;
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + offset) as u8).collect();
            let mut runs = vec![];
            updates_for(offset, (!zero).then_some(&data[..]), len, block, &mut runs);
            let mut got = BlockHashes { generation: 0, seq: 0, block, hashes: vec![1; 25] };
            got.apply(&runs);
            let mut want = vec![1u64; 25];
            for b in 0..25u64 {
                let (bs, be) = (b * block, (b + 1) * block);
                if len == 0 || be <= offset || bs >= offset + len {
                    continue;
                }
                want[b as usize] = if bs < offset || be > offset + len {
                    UNKNOWN
                } else if zero {
                    hash_block(&[0u8; 4096])
                } else {
                    hash_block(&data[(bs - offset) as usize..(be - offset) as usize])
                };
            }
            proptest::prop_assert_eq!(got.hashes, want);
        }
    }

    #[test]
    fn save_load_round_trip_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path(), "vm", "d");
        let mut h = BlockHashes { generation: 9, seq: 3, block: 4096, hashes: vec![1, 2, UNKNOWN, 4] };
        h.save(&p).unwrap();
        assert_eq!(BlockHashes::load(&p), Some(h.clone()));
        h.apply(&[HashRun { first: 1, count: 1, hash: 20 }, HashRun { first: 9, count: 1, hash: 1 }]);
        assert_eq!(h.hashes, vec![1, 20, UNKNOWN, 4]);
        std::fs::write(&p, b"FRYHASH1short").unwrap();
        assert_eq!(BlockHashes::load(&p), None);
        assert_eq!(BlockHashes::load(&dir.path().join("missing")), None);
    }
}
