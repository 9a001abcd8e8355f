//! The bytes a sealed change log names in the disk image, held until its
//! recovery point is committed.
//!
//! A large write (at least [`super::disk::IN_IMAGE_MIN`] bytes) is logged
//! as an in-image record: its range, not its bytes, which stay only in the
//! disk image. That halves what a large write costs the host (one write of
//! the data, not two, and a FLUSH syncs a small log) and is what keeps
//! sequential guest writes as fast as an unreplicated disk. The price is
//! that the bytes must still be there, as they were, when the log is
//! shipped, while the guest keeps writing.
//!
//! So when a rotation seals a log with in-image records, it also starts a
//! [`HeldImage`] for it, at the same instant (every change quiesced): the
//! image then holds, for every block an in-image record touched (the
//! *protected* blocks, [`SNAPSHOT_BLOCK`] bytes each), exactly the bytes
//! the recovery point must contain. From then on every change saves a
//! protected block's bytes to the log's side file (`<log>.held`, sparse,
//! same offsets as the image) before it changes the block, once per block
//! ([`HeldImage::preserve`]). The upload reads a protected block from the
//! side file if it was saved, else from the image ([`HeldImage::read`]).
//! When the point is committed the side file is deleted; a resync drops
//! them all.
//!
//! A block the upload attempt under way has read needs no save while that
//! attempt runs: the upload marks it *shipped* ([`HeldImage::shipped`])
//! once every part of its point that reads it is built, and from then on
//! a change saves nothing for it (a saved block's memory is given back).
//! If that attempt fails, the next one starts with every change quiesced
//! (its rotation, or `disk::new_attempt_if_unchanged` when nothing was
//! logged since: [`HeldImage::next_attempt`]), which guards the shipped
//! blocks again, from the image as it is then: the next attempt ships
//! every sealed log up to its own rotation, coalesced (the rule the
//! restart rests on, below), so it reads through this held image only
//! bytes that no later logged change wrote, and in those ranges the image
//! still holds the rotation's bytes. Marks carry their attempt: a build of
//! a failed attempt that ends after the next rotation marks nothing.
//!
//! Where a saved block goes: into memory while the host-wide budget
//! ([`set_memory_budget`], `EngineConfig::held_memory`, default
//! [`DEFAULT_MEMORY_BUDGET`]) has room, else into the side file. A save
//! into memory is one copy out of the page cache; a save into a new file
//! also allocates its pages and later writes them back, which on a guest
//! that rewrites what it just wrote costs more than the guest's own write.
//! Memory saves need no durability: a restart holds afresh, nothing saved
//! (below).
//!
//! Consistency: the saved set lives under one mutex. `preserve` takes it,
//! reads the image, writes the side file and marks the block saved, all
//! before the change's own disk write begins; `read` takes it for each
//! block it reads. So a read that finds a block unsaved reads the image
//! before any change since the attempt's rotation reached it, and one that
//! finds it saved reads the saved bytes (the rotation's). A shipped block
//! is not read again by its attempt (the upload counts the parts that
//! read each block). A save
//! that fails breaks the held image (every later read fails, class
//! `NeedsResync`) before the change goes on to the disk: the caller then
//! asks for a resync instead of failing the guest's write, and no point
//! is built from bytes that are not the rotation's.
//!
//! Why a restart needs no side file (kill -9, or a clean stop, even with a
//! reboot after it): a point always ships every sealed log up to the
//! newest rotation, coalesced, so the bytes it reads through log N's held
//! image are exactly those of N's in-image ranges that no later logged
//! change wrote. Every change is logged before it reaches the disk (and
//! the restart replays the open log onto the disk first), so the image
//! still holds those bytes as they were at N's rotation. Holding each
//! kept log's bytes afresh at the restart, nothing saved
//! ([`HeldImage::create`], `vm::open`), is therefore exact; what a held
//! image guards against is only the writes that come after. The image
//! itself must be durable for that after a reboot: a clean stop syncs it
//! before it seals the active log (`vm::actor`), and an unclean reboot
//! leaves the active log unsealed, which is not trusted (resync).
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::snapshot::SNAPSHOT_BLOCK;
use crate::error::{Error, ErrorClass, Result};

pub use crate::changelog::held_path;

/// The host-wide memory for saved blocks unless configured: 256 MiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

/// Bytes of saved blocks that may live in memory, host-wide, and how many do.
pub struct MemoryBudget {
    budget: AtomicU64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub const fn new(budget: u64) -> Self {
        MemoryBudget { budget: AtomicU64::new(budget), used: AtomicU64::new(0) }
    }

    /// Reserves `n` bytes if the budget has room.
    fn take(&self, n: u64) -> bool {
        let budget = self.budget.load(Ordering::Relaxed);
        self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u + n <= budget).then_some(u + n)).is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes of saved blocks in memory now.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

static HOST_MEMORY: MemoryBudget = MemoryBudget::new(DEFAULT_MEMORY_BUDGET);

/// Sets the host-wide memory budget for saved blocks (saves already in
/// memory stay until released).
pub fn set_memory_budget(bytes: u64) {
    HOST_MEMORY.budget.store(bytes, Ordering::Relaxed);
}

/// The saved blocks, and the upload attempt marks are for.
#[derive(Default)]
struct SavedSet {
    blocks: BTreeMap<u64, Saved>,
    /// Bumped at the start of every upload attempt: an attempt's marks
    /// count only until the next one starts ([`HeldImage::next_attempt`]).
    attempt: u64,
}

/// Where a saved block's rotation-time bytes are.
enum Saved {
    Memory(Box<[u8]>),
    File,
    /// Read by the upload attempt under way: nothing to save until the next
    /// attempt rotates (module header).
    Shipped,
}

/// The blocks that byte ranges touch on a disk of `size` bytes, as sorted,
/// disjoint, non-adjacent block ranges `[first, end)` (pure). Ranges past
/// the end are cut at it.
pub fn blocks_of(size: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|&&(o, l)| l > 0 && o < size)
        .map(|&(o, l)| (o / SNAPSHOT_BLOCK, (o.saturating_add(l).min(size) - 1) / SNAPSHOT_BLOCK + 1))
        .collect();
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (first, end) in spans {
        match out.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => out.push((first, end)),
        }
    }
    out
}

/// The part of block range `[first, end)` inside `spans` (sorted, disjoint), as block numbers.
fn blocks_within(spans: &[(u64, u64)], first: u64, end: u64) -> impl Iterator<Item = u64> + '_ {
    let start = spans.partition_point(|&(_, e)| e <= first);
    spans[start..].iter().take_while(move |&&(f, _)| f < end).flat_map(move |&(f, e)| f.max(first)..e.min(end))
}

pub struct HeldImage {
    log: PathBuf,
    side_path: PathBuf,
    side: File,
    size: u64,
    /// Protected blocks, as [`blocks_of`] gives them; fixed at creation.
    protected: Vec<(u64, u64)>,
    protected_bytes: u64,
    saved: Mutex<SavedSet>,
    /// Bytes saved in the side file.
    saved_bytes: AtomicU64,
    memory: &'static MemoryBudget,
    /// Bytes saved in memory (reserved from `memory`, given back on drop).
    memory_bytes: AtomicU64,
    /// Why a save failed: the image may hold later bytes than the point's.
    broken: AtomicBool,
}

impl HeldImage {
    /// Starts holding the in-image `ranges` of sealed log `log` of a disk of
    /// `size` bytes; the caller holds the disk quiesced. The side file is
    /// created empty (an old one is truncated).
    pub fn create(log: &Path, size: u64, ranges: &[(u64, u64)]) -> Result<Self> {
        Self::create_in(log, size, ranges, &HOST_MEMORY)
    }

    /// [`HeldImage::create`] saving into memory under `memory`'s budget.
    fn create_in(log: &Path, size: u64, ranges: &[(u64, u64)], memory: &'static MemoryBudget) -> Result<Self> {
        let side_path = held_path(log);
        let side = super::snapshot::create_side_file(&side_path, "held side file")?;
        let protected = blocks_of(size, ranges);
        let protected_bytes =
            protected.iter().flat_map(|&(f, e)| f..e).map(|b| SNAPSHOT_BLOCK.min(size - b * SNAPSHOT_BLOCK)).sum();
        Ok(HeldImage {
            log: log.to_path_buf(),
            side_path,
            side,
            size,
            protected,
            protected_bytes,
            saved: Mutex::new(SavedSet::default()),
            saved_bytes: AtomicU64::new(0),
            memory,
            memory_bytes: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        })
    }

    /// Whether a protected block would needs its rotation-time bytes saved
    /// if `[offset, offset+len)` changed. A lookup, no lock.
    fn touches(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.size {
            return false;
        }
        let (first, end) =
            (offset / SNAPSHOT_BLOCK, (offset.saturating_add(len).min(self.size) - 1) / SNAPSHOT_BLOCK + 1);
        blocks_within(&self.protected, first, end).next().is_some()
    }

    /// Saves the rotation-time bytes of every protected block of
    /// `[offset, offset+len)` not saved yet. Called before the change
    /// reaches `disk`. A failure breaks the held image (see the module
    /// header) and is returned.
    pub fn preserve(&self, disk: &File, offset: u64, len: u64) -> Result<()> {
        // A broken image is never read again: nothing to save for it.
        if !self.touches(offset, len) || self.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let first = offset / SNAPSHOT_BLOCK;
        let end = (offset.saturating_add(len).min(self.size) - 1) / SNAPSHOT_BLOCK + 1;
        let mut saved = self.saved.lock().expect("held lock is never poisoned");
        let mut scratch = Vec::new();
        for b in blocks_within(&self.protected, first, end) {
            if saved.blocks.contains_key(&b) {
                continue;
            }
            let start = b * SNAPSHOT_BLOCK;
            let n = SNAPSHOT_BLOCK.min(self.size - start);
            match self.save(disk, start, n, &mut scratch) {
                Ok(place) => saved.blocks.insert(b, place),
                Err(e) => {
                    self.broken.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            };
        }
        Ok(())
    }

    /// Copies the `n` bytes of the block at `start` out of `disk`: into
    /// memory if the budget has room, else into the side file (through `scratch`).
    fn save(&self, disk: &File, start: u64, n: u64, scratch: &mut Vec<u8>) -> Result<Saved> {
        crate::failpoint::check("held.save", &self.side_path)
            .map_err(|e| Error::io(format!("held: save a block to {}", self.side_path.display()), e))?;
        let read =
            |buf: &mut [u8]| disk.read_exact_at(buf, start).map_err(|e| Error::io("held: read a block to save", e));
        if self.memory.take(n) {
            let mut buf = vec![0u8; n as usize];
            if let Err(e) = read(&mut buf) {
                self.memory.give(n);
                return Err(e);
            }
            self.memory_bytes.fetch_add(n, Ordering::Relaxed);
            return Ok(Saved::Memory(buf.into_boxed_slice()));
        }
        scratch.resize(n as usize, 0);
        read(scratch)?;
        self.side
            .write_all_at(scratch, start)
            .map_err(|e| Error::io(format!("held: save a block to {}", self.side_path.display()), e))?;
        self.saved_bytes.fetch_add(n, Ordering::Relaxed);
        Ok(Saved::File)
    }

    /// Reads `buf.len()` bytes at `offset` as they were when the log was
    /// rotated out. Every byte must lie in a protected block.
    pub fn read(&self, disk: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let b = at / SNAPSHOT_BLOCK;
            let n = ((SNAPSHOT_BLOCK - at % SNAPSHOT_BLOCK) as usize).min(buf.len() - pos);
            if at.saturating_add(n as u64) > self.size || blocks_within(&self.protected, b, b + 1).next().is_none() {
                return Err(self.lost(format!("byte {at} of the {}-byte disk is not held", self.size)));
            }
            let piece = &mut buf[pos..pos + n];
            {
                let saved = self.saved.lock().expect("held lock is never poisoned");
                match saved.blocks.get(&b) {
                    Some(Saved::Memory(bytes)) => {
                        let from = (at % SNAPSHOT_BLOCK) as usize;
                        piece.copy_from_slice(&bytes[from..from + n]);
                    }
                    Some(Saved::File) => {
                        self.side.read_exact_at(piece, at).map_err(|e| self.lost(format!("read held bytes: {e}")))?
                    }
                    Some(Saved::Shipped) | None => {
                        disk.read_exact_at(piece, at).map_err(|e| Error::io("held: read the disk", e))?
                    }
                }
            }
            // After the read: a save that failed before a change reached
            // this block shows here (the module header).
            if self.broken.load(Ordering::SeqCst) {
                return Err(self.lost("a save of its bytes failed".into()));
            }
            pos += n;
        }
        Ok(())
    }

    /// The upload attempt now under way (taken by the upload at its start,
    /// after its rotation).
    pub fn attempt(&self) -> u64 {
        self.saved.lock().expect("held lock is never poisoned").attempt
    }

    /// Marks `blocks` (block numbers; those not protected are skipped) as
    /// read by upload attempt `attempt`: until the next attempt rotates,
    /// changes save nothing for them, and their memory saves are given
    /// back (module header). Marks of an attempt that a newer one has
    /// replaced (a build still running after its attempt failed) are dropped.
    pub fn shipped(&self, attempt: u64, blocks: &[u64]) {
        let mut saved = self.saved.lock().expect("held lock is never poisoned");
        if saved.attempt != attempt {
            return;
        }
        for &b in blocks {
            if blocks_within(&self.protected, b, b + 1).next().is_none() {
                continue;
            }
            // The side file holds the rotation-time bytes: they stay good.
            if matches!(saved.blocks.get(&b), Some(Saved::File)) {
                continue;
            }
            if let Some(Saved::Memory(bytes)) = saved.blocks.insert(b, Saved::Shipped) {
                let n = bytes.len() as u64;
                self.memory_bytes.fetch_sub(n, Ordering::Relaxed);
                self.memory.give(n);
            }
        }
    }

    /// A new upload attempt starts (every change quiesced): the blocks
    /// the last attempt read are guarded again, from the image as it is
    /// now, whose bytes in the ranges the next point reads through this
    /// image are still the rotation's (module header).
    pub fn next_attempt(&self) {
        let mut saved = self.saved.lock().expect("held lock is never poisoned");
        saved.attempt += 1;
        saved.blocks.retain(|_, s| !matches!(s, Saved::Shipped));
    }

    fn lost(&self, why: String) -> Error {
        Error::Corrupt {
            what: format!("bytes held for change log {}", self.log.display()),
            reason: why,
            class: ErrorClass::NeedsResync,
        }
    }

    /// Marks the held image unusable: reads fail from now on (its disk
    /// stopped logging, or its bytes can no longer be kept).
    pub fn give_up(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    /// The sealed log whose bytes this holds.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Bytes of the protected blocks (what the held log stands for, for the 50% rule).
    pub fn protected_bytes(&self) -> u64 {
        self.protected_bytes
    }

    /// Bytes saved in the side file so far.
    pub fn space_used(&self) -> u64 {
        self.saved_bytes.load(Ordering::Relaxed)
    }

    /// Bytes saved in memory so far.
    pub fn memory_used(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    /// Deletes the side file (the point is committed, or the logs were dropped).
    pub fn release(&self) -> Result<()> {
        crate::changelog::remove_file_if_present(&self.side_path)
    }
}

impl Drop for HeldImage {
    /// Gives the memory saves' budget back.
    fn drop(&mut self) {
        self.memory.give(self.memory_bytes.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs::OpenOptions;

    const B: u64 = SNAPSHOT_BLOCK;

    #[test]
    fn blocks_of_sorts_merges_and_cuts_at_the_end() {
        let size = 10 * B + 5;
        let table: Vec<(Vec<(u64, u64)>, Vec<(u64, u64)>)> = vec![
            (vec![], vec![]),
            (vec![(0, 1)], vec![(0, 1)]),
            (vec![(B - 1, 2)], vec![(0, 2)]),
            (vec![(5 * B, B), (0, B)], vec![(0, 1), (5, 6)]),
            // Adjacent and overlapping ranges merge; zero lengths vanish.
            (vec![(0, B), (B, B), (3 * B, 0), (B + 7, 3 * B)], vec![(0, 5)]),
            (vec![(10 * B, 100), (20 * B, 1)], vec![(10, 11)]),
        ];
        for (ranges, want) in table {
            assert_eq!(blocks_of(size, &ranges), want, "{ranges:?}");
        }
        let spans = [(1, 3), (6, 8)];
        assert_eq!(blocks_within(&spans, 0, 10).collect::<Vec<_>>(), [1, 2, 6, 7]);
        assert_eq!(blocks_within(&spans, 2, 7).collect::<Vec<_>>(), [2, 6]);
        assert_eq!(blocks_within(&spans, 3, 6).count(), 0);
    }

    fn image(dir: &Path, size: u64) -> (PathBuf, File, Vec<u8>) {
        let path = dir.join("d.img");
        let bytes: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        (path, f, bytes)
    }

    fn write(disk: &File, model: &mut [u8], held: &[&HeldImage], offset: u64, len: u64, v: u8) {
        for h in held {
            h.preserve(disk, offset, len).unwrap();
        }
        disk.write_all_at(&vec![v; len as usize], offset).unwrap();
        model[offset as usize..(offset + len) as usize].fill(v);
    }

    proptest! {
        /// Whatever the guest writes after the rotation, a read returns
        /// the rotation-time bytes.
        #[test]
        fn reads_see_the_rotation_time_bytes(
            ranges in proptest::collection::vec((0u64..600_000, 1u64..200_000), 1..6),
            after in proptest::collection::vec((0u64..600_000, 1u64..100_000, any::<u8>()), 0..20),
            // Saves in memory up to this many blocks, the rest in the side file.
            budget_blocks in 0u64..6,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let size = 600_000u64;
            let (_, disk, mut model) = image(dir.path(), size);
            let log = dir.path().join("d.img.00000001.hrl");
            let ranges: Vec<(u64, u64)> = ranges.into_iter().map(|(o, l)| (o, l.min(size - o))).collect();
            let memory: &'static MemoryBudget = Box::leak(Box::new(MemoryBudget::new(budget_blocks * B)));
            let held = HeldImage::create_in(&log, size, &ranges, memory).unwrap();
            let at_rotation = model.clone();
            for (o, l, v) in after {
                write(&disk, &mut model, &[&held], o, l.min(size - o), v);
            }
            for &(o, l) in &ranges {
                let mut got = vec![0u8; l as usize];
                held.read(&disk, o, &mut got).unwrap();
                prop_assert!(got[..] == at_rotation[o as usize..(o + l) as usize], "range {o}+{l}");
            }
            prop_assert!(held.space_used() + held.memory_used() <= held.protected_bytes());
            prop_assert!(held.memory_used() <= budget_blocks * B);
            prop_assert_eq!(memory.used(), held.memory_used());
            held.release().unwrap();
            prop_assert!(!held_path(&log).exists());
            drop(held);
            prop_assert_eq!(memory.used(), 0, "the budget is given back");
        }
    }

    #[test]
    fn bytes_outside_the_protected_blocks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, disk, _) = image(dir.path(), 4 * B);
        let log = dir.path().join("d.img.00000001.hrl");
        let no_memory: &'static MemoryBudget = Box::leak(Box::new(MemoryBudget::new(0)));
        let held = HeldImage::create_in(&log, 4 * B, &[(B + 10, 20)], no_memory).unwrap();
        let mut buf = vec![0u8; 100];
        held.read(&disk, B, &mut buf).unwrap();
        let e = held.read(&disk, 2 * B - 50, &mut buf).unwrap_err().to_string();
        assert!(e.contains("not held"), "{e}");
        assert!(held.read(&disk, 4 * B - 50, &mut buf).is_err(), "past the end");
        // Writes elsewhere save nothing.
        held.preserve(&disk, 0, B).unwrap();
        held.preserve(&disk, 3 * B, B).unwrap();
        assert_eq!(held.space_used(), 0);
        held.preserve(&disk, 2 * B - 1, 2).unwrap();
        assert_eq!((held.space_used(), held.memory_used()), (B, 0));
        assert_eq!(held.protected_bytes(), B);
    }

    #[test]
    fn saves_go_to_memory_while_the_budget_lasts_then_to_the_side_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, disk, at_rotation) = image(dir.path(), 4 * B);
        let log = dir.path().join("d.img.00000001.hrl");
        let memory: &'static MemoryBudget = Box::leak(Box::new(MemoryBudget::new(B)));
        let held = HeldImage::create_in(&log, 4 * B, &[(0, 4 * B)], memory).unwrap();
        held.preserve(&disk, 0, 2 * B).unwrap();
        assert_eq!((held.memory_used(), held.space_used(), memory.used()), (B, B, B));
        disk.write_all_at(&vec![7u8; 2 * B as usize], 0).unwrap();
        let mut got = vec![0u8; 2 * B as usize];
        held.read(&disk, 0, &mut got).unwrap();
        assert!(got == at_rotation[..2 * B as usize], "both saves read back as at the rotation");
        drop(held);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn a_shipped_block_saves_nothing_more_and_gives_its_memory_back() {
        let dir = tempfile::tempdir().unwrap();
        let (_, disk, at_rotation) = image(dir.path(), 4 * B);
        let log = dir.path().join("d.img.00000001.hrl");
        let memory: &'static MemoryBudget = Box::leak(Box::new(MemoryBudget::new(4 * B)));
        let held = HeldImage::create_in(&log, 4 * B, &[(0, 3 * B)], memory).unwrap();
        held.preserve(&disk, 0, 10).unwrap();
        assert_eq!(memory.used(), B);
        // Blocks 0 and 1 read by this attempt; block 3 is not protected.
        held.shipped(held.attempt(), &[0, 1, 3]);
        assert_eq!((memory.used(), held.memory_used()), (0, 0), "block 0's save was given back");
        held.preserve(&disk, 0, 2 * B).unwrap();
        assert_eq!((held.memory_used(), held.space_used()), (0, 0), "nothing saved for shipped blocks");
        // Block 2 is still held as before.
        held.preserve(&disk, 2 * B, 1).unwrap();
        assert_eq!(held.memory_used(), B);
        disk.write_all_at(&vec![9u8; 10], B + 100).unwrap();
        disk.write_all_at(&vec![9u8; 3 * B as usize], 0).unwrap();
        let mut got = vec![0u8; B as usize];
        held.read(&disk, 2 * B, &mut got).unwrap();
        assert!(got == at_rotation[2 * B as usize..3 * B as usize], "block 2 as at the rotation");
        // A shipped block reads the image as it is now (a later attempt reads only bytes no change wrote).
        held.read(&disk, 0, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 9));
        // The next attempt guards them again, from the image as it is then;
        // marks of the attempt before are dropped.
        let old = held.attempt();
        held.next_attempt();
        held.shipped(old, &[0]);
        held.preserve(&disk, 0, 10).unwrap();
        assert_eq!(held.memory_used(), 2 * B, "block 0 saved again for the new attempt");
        disk.write_all_at(&vec![5u8; B as usize], 0).unwrap();
        held.read(&disk, 0, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 9), "as at the new attempt's rotation");
    }

    #[test]
    fn a_failed_save_breaks_every_later_read() {
        let dir = tempfile::tempdir().unwrap();
        let (path, disk, _) = image(dir.path(), 4 * B);
        let log = dir.path().join("d.img.00000001.hrl");
        let held = HeldImage::create(&log, 4 * B, &[(0, 2 * B)]).unwrap();
        // A disk opened write-only cannot be read for the save.
        let unreadable = OpenOptions::new().write(true).open(&path).unwrap();
        let e = held.preserve(&unreadable, 0, 10).unwrap_err();
        assert!(e.to_string().contains("read a block to save"), "{e}");
        let e = held.read(&disk, B, &mut [0u8; 10]).unwrap_err();
        assert_eq!(e.class(), ErrorClass::NeedsResync, "{e}");
        assert!(e.to_string().contains("a save of its bytes failed"), "{e}");
    }
}
