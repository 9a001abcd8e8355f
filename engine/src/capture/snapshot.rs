//! Point-in-time snapshot of a disk by copy-before-write.
//!
//! Initial replication copies a disk as it was at protection time while the
//! VM keeps writing. A full copy would cost 100% space and time up front, so
//! the snapshot keeps only what is about to be overwritten: before a write
//! lands on a block whose protection-time bytes are not on the target yet,
//! the block's old bytes are saved to a sparse side file
//! (`<disk>.ferry-snap.<random>`, beside the disk). The copier reads a block
//! from the side file if it was saved, else from the disk. Space used is the
//! blocks written during the copy, and it is reclaimed when the snapshot is
//! released (the side file is deleted).
//!
//! Consistency: block states live under one mutex. The copier reads a chunk
//! under it; a writer calls [`CowSnapshot::preserve`] (same mutex) before
//! its disk write. A block becomes `Copied` (later writes skip the save)
//! only when the copier calls [`CowSnapshot::mark_copied`], after the part
//! holding it is durably on the target. Until then every write saves it
//! first, so the copier, and a copier that reads it again after a crash,
//! always sees the protection-time bytes (a block read but not uploaded
//! costs at most one extra save).
//!
//! Crash safety (kill -9 of ferryd, host up): the side file's saves are in
//! the page cache, which survives the process. The write path saves before
//! it appends the change-log record (`capture::disk`), so after a crash
//! every block touched by a record logged since the snapshot has its
//! protection-time bytes in the side file, unless its part was already on
//! the target; a block no such record touches still holds them on the disk.
//! [`CowSnapshot::reopen`] rebuilds the states from exactly that
//! ([`rebuild_blocks`]: parts on the target `Copied`, blocks touched since
//! the snapshot `Saved`, the rest `Live`), so a resumed copy reads the same
//! bytes the interrupted one would have. After a reboot the page cache is
//! gone: the logs are then untrusted and protection starts over
//! (`vm::restart`).
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Snapshot block size: the copy-before-write granularity.
pub const SNAPSHOT_BLOCK: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// Not on the target yet, not overwritten since the snapshot: the disk
    /// holds its snapshot-time bytes.
    Live,
    /// Old bytes saved in the side file.
    Saved,
    /// Its part is durably on the target: later writes need not save it.
    Copied,
}

/// The block states of a snapshot resumed after a crash (pure): blocks of
/// the parts already on the target are `Copied`; blocks touched by a change
/// logged since the snapshot (`touched`, byte ranges) are `Saved` (the write
/// path saved them before logging, unless they were `Copied` then); the rest
/// are `Live`. `parts_done` are part numbers of `chunk` bytes each.
pub fn rebuild_blocks(size: u64, chunk: u64, parts_done: &[u64], touched: &[(u64, u64)]) -> Result<Vec<Block>> {
    if chunk == 0 || !chunk.is_multiple_of(SNAPSHOT_BLOCK) {
        return Err(Error::Internal(format!("part size {chunk} is not a multiple of the {SNAPSHOT_BLOCK}-byte block")));
    }
    let n = size.div_ceil(SNAPSHOT_BLOCK);
    let mut blocks = vec![Block::Live; n as usize];
    for &(offset, len) in touched {
        if len == 0 {
            continue;
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                "a change logged since the snapshot",
                format!("{len} bytes at {offset} lie past the end of the {size}-byte disk"),
            ));
        }
        for b in offset / SNAPSHOT_BLOCK..=(offset + len - 1) / SNAPSHOT_BLOCK {
            blocks[b as usize] = Block::Saved;
        }
    }
    let per_part = chunk / SNAPSHOT_BLOCK;
    for &p in parts_done {
        let first = p.checked_mul(per_part).filter(|f| *f < n).ok_or_else(|| {
            Error::corrupt("the initial copy's progress", format!("part {p} lies past the end of the {size}-byte disk"))
        })?;
        for b in first..(first + per_part).min(n) {
            blocks[b as usize] = Block::Copied;
        }
    }
    Ok(blocks)
}

pub struct CowSnapshot {
    side_path: PathBuf,
    side: File,
    size: u64,
    blocks: Mutex<Vec<Block>>,
    saved_bytes: AtomicU64,
}

/// Asks the kernel to drop the clean cached pages of `[offset, offset +
/// len)` of `file` (`POSIX_FADV_DONTNEED`; dirty pages stay and are
/// written back as usual). Best effort: it changes no data, and failing
/// only leaves the pages cached.
pub fn drop_cached(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else { return };
    // SAFETY: an advisory call on an open descriptor; no memory is passed.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED) };
}

/// A new side-file path for a snapshot of `disk_path`: unique per snapshot,
/// so a snapshot never shares (or truncates) another one's saved blocks.
pub fn side_path(disk_path: &Path) -> PathBuf {
    let mut name = disk_path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".ferry-snap.{:016x}", rand::random::<u64>()));
    disk_path.with_file_name(name)
}

/// Side files of snapshots of `disk_path` left on disk (for clean-up).
pub fn side_files(disk_path: &Path) -> Vec<PathBuf> {
    let mut prefix = disk_path.file_name().unwrap_or_default().to_os_string();
    prefix.push(".ferry-snap");
    let prefix = prefix.to_string_lossy().to_string();
    let dir = disk_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Creates a new, empty sparse side file for copy-before-write saves
/// (one left at `path` is removed first); `what` names it in the error.
/// Its name beside the disk is predictable, and whoever can write the
/// disk's folder could plant a symlink there: the old name is unlinked
/// (which never follows a link) and the file made with `O_EXCL` (which
/// fails on any name, link or not, that appeared meanwhile), so root never
/// writes the disk's bytes through a planted link.
pub(crate) fn create_side_file(path: &Path, what: &str) -> Result<File> {
    crate::changelog::remove_file_if_present(path)?;
    crate::paths::private_options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("create {what} {}", path.display()), e))
}

impl CowSnapshot {
    /// Starts a snapshot of a disk of `size` bytes; the caller holds the disk's
    /// write lock so that no write is in flight.
    pub fn create(disk_path: &Path, size: u64) -> Result<Self> {
        let side_path = side_path(disk_path);
        let side = create_side_file(&side_path, "snapshot file")?;
        let n = size.div_ceil(SNAPSHOT_BLOCK) as usize;
        Ok(CowSnapshot {
            side_path,
            side,
            size,
            blocks: Mutex::new(vec![Block::Live; n]),
            saved_bytes: AtomicU64::new(0),
        })
    }

    /// Opens the side file of a snapshot a crashed daemon left, with block
    /// states rebuilt by [`rebuild_blocks`]; the caller holds the disk
    /// before any write is accepted.
    pub fn reopen(side_path: &Path, size: u64, blocks: Vec<Block>) -> Result<Self> {
        if blocks.len() as u64 != size.div_ceil(SNAPSHOT_BLOCK) {
            return Err(Error::Internal(format!("{} block states for a {size}-byte snapshot", blocks.len())));
        }
        // Never through a link planted at its predictable name.
        let side = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(side_path)
            .map_err(|e| Error::io(format!("reopen snapshot file {}", side_path.display()), e))?;
        let saved = blocks.iter().filter(|b| **b == Block::Saved).count() as u64 * SNAPSHOT_BLOCK;
        Ok(CowSnapshot {
            side_path: side_path.to_path_buf(),
            side,
            size,
            blocks: Mutex::new(blocks),
            saved_bytes: AtomicU64::new(saved.min(size)),
        })
    }

    /// Saves the protection-time bytes of every block in `[offset, offset+len)`
    /// that the copier has not read yet. Called before the write reaches `disk`.
    pub fn preserve(&self, disk: &File, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / SNAPSHOT_BLOCK;
        let last = (offset + len - 1) / SNAPSHOT_BLOCK;
        let mut blocks = self.blocks.lock().expect("snapshot lock is never poisoned");
        let mut buf = Vec::new();
        for b in first..=last {
            if blocks[b as usize] != Block::Live {
                continue;
            }
            let start = b * SNAPSHOT_BLOCK;
            let n = SNAPSHOT_BLOCK.min(self.size - start) as usize;
            buf.resize(n, 0);
            disk.read_exact_at(&mut buf, start).map_err(|e| Error::io("snapshot: read block to save", e))?;
            self.side
                .write_all_at(&buf, start)
                .map_err(|e| Error::io(format!("snapshot: save block to {}", self.side_path.display()), e))?;
            blocks[b as usize] = Block::Saved;
            self.saved_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` as they were at snapshot time.
    /// `offset` must be block-aligned. The blocks stay preserved until
    /// [`Self::mark_copied`]; a block marked copied is refused (its
    /// snapshot-time bytes may be gone from the disk).
    ///
    /// A copy streams the whole disk once, so the range read is dropped
    /// from the page cache afterwards ([`drop_cached`]): otherwise a full
    /// copy leaves the host's cache full of the disk's pages in large
    /// folios, which nobody reads and which make the guest's small writes
    /// into them about 4 times slower (measured: 4K random writes at 32
    /// MiB/s after an initial copy of a 16 GiB image, 130 MiB/s once its
    /// pages were dropped).
    pub fn read_for_copy(&self, disk: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_blocks(disk, offset, buf)?;
        drop_cached(disk, offset, buf.len() as u64);
        Ok(())
    }

    fn read_blocks(&self, disk: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
        if !offset.is_multiple_of(SNAPSHOT_BLOCK) {
            return Err(Error::Internal(format!("snapshot read at {offset} is not aligned to {SNAPSHOT_BLOCK}")));
        }
        let blocks = self.blocks.lock().expect("snapshot lock is never poisoned");
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let b = (at / SNAPSHOT_BLOCK) as usize;
            let n = (SNAPSHOT_BLOCK as usize).min(buf.len() - pos);
            let piece = &mut buf[pos..pos + n];
            match blocks[b] {
                Block::Saved => {
                    self.side.read_exact_at(piece, at).map_err(|e| Error::io("snapshot: read saved block", e))?
                }
                Block::Live => disk.read_exact_at(piece, at).map_err(|e| Error::io("snapshot: read disk", e))?,
                // Writes no longer save it: the disk may hold later bytes.
                Block::Copied => {
                    return Err(Error::Internal(format!(
                        "snapshot block at {at} is already on the target; reading it again could see a later write"
                    )))
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// The blocks of `[offset, offset+len)` are durably on the target: later
    /// writes need not save them. Call only after the put returned.
    pub fn mark_copied(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let mut blocks = self.blocks.lock().expect("snapshot lock is never poisoned");
        for b in offset / SNAPSHOT_BLOCK..=(end - 1) / SNAPSHOT_BLOCK {
            blocks[b as usize] = Block::Copied;
        }
    }

    /// Makes the saved blocks durable (a clean stop keeps the snapshot for
    /// a restart that may come after a reboot).
    pub fn sync(&self) -> Result<()> {
        self.side.sync_data().map_err(|e| Error::io(format!("sync snapshot file {}", self.side_path.display()), e))
    }

    /// Bytes held by the side file (blocks saved so far).
    pub fn space_used(&self) -> u64 {
        self.saved_bytes.load(Ordering::Relaxed)
    }

    /// The side file holding this snapshot's saved blocks.
    pub fn path(&self) -> &Path {
        &self.side_path
    }

    /// Deletes the side file, reclaiming its space.
    pub fn release(self) -> Result<()> {
        drop(self.side);
        match std::fs::remove_file(&self.side_path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("release snapshot {}", self.side_path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A symlink planted at a side file's name beside the disk (a held
    /// side file's name, `<disk>.<seq>.hrl.held`, is predictable) is never
    /// written through: a new side file replaces the link, and a reopen at
    /// restart refuses one.
    #[test]
    fn a_symlink_planted_at_a_side_file_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = dir.path().join("d.img.00000007.hrl.held");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let side = create_side_file(&planted, "held side file").unwrap();
        side.write_all_at(b"the disk's bytes", 0).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "nothing written through the link");
        assert!(std::fs::symlink_metadata(&planted).unwrap().is_file(), "the link was replaced");

        let link = dir.path().join("d.img.ferry-snap.0000000000000001");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let n = (1u64 << 20).div_ceil(SNAPSHOT_BLOCK) as usize;
        assert!(CowSnapshot::reopen(&link, 1 << 20, vec![Block::Live; n]).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }

    proptest! {
        /// Whatever writes interleave with the copy, the copy equals the disk at snapshot time.
        #[test]
        fn copy_sees_snapshot_time_bytes(
            writes in proptest::collection::vec((0u64..300_000, 1usize..100_000, any::<u8>(), 0usize..5), 0..30)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.img");
            let size = 300_000u64;
            let original: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &original).unwrap();
            let disk = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let snap = CowSnapshot::create(&path, size).unwrap();
            let chunk = 2 * SNAPSHOT_BLOCK;
            let mut copy = vec![0u8; size as usize];
            let mut writes = writes.into_iter();
            let mut off = 0;
            while off < size {
                // A few writes between copy steps, anywhere on the disk.
                for (o, l, v, _) in writes.by_ref().take(2) {
                    let l = (l as u64).min(size - o);
                    snap.preserve(&disk, o, l).unwrap();
                    disk.write_all_at(&vec![v; l as usize], o).unwrap();
                }
                let n = chunk.min(size - off) as usize;
                snap.read_for_copy(&disk, off, &mut copy[off as usize..off as usize + n]).unwrap();
                // Writes after the read and before the put still save.
                for (o, l, v, _) in writes.by_ref().take(1) {
                    let l = (l as u64).min(size - o);
                    snap.preserve(&disk, o, l).unwrap();
                    disk.write_all_at(&vec![v; l as usize], o).unwrap();
                }
                let mut again = vec![0u8; n];
                snap.read_for_copy(&disk, off, &mut again).unwrap();
                prop_assert!(again[..] == copy[off as usize..off as usize + n], "a block read but not put was lost");
                snap.mark_copied(off, n as u64);
                off += n as u64;
            }
            prop_assert!(copy == original);
            prop_assert!(snap.space_used() <= size);
            let side = snap.path().to_path_buf();
            prop_assert!(side.exists());
            prop_assert_eq!(side_files(&path), vec![side.clone()]);
            snap.release().unwrap();
            prop_assert!(!side.exists());
        }

        /// A copy killed part-way (the snapshot object dropped, its side file
        /// left) and resumed from the parts put and the changes logged since
        /// the snapshot still equals the disk at snapshot time, whatever
        /// writes come before and after the crash.
        #[test]
        fn a_resumed_copy_sees_snapshot_time_bytes(
            before in proptest::collection::vec((0u64..300_000, 1usize..100_000, any::<u8>()), 0..15),
            after in proptest::collection::vec((0u64..300_000, 1usize..100_000, any::<u8>()), 0..15),
            put_before_crash in 0u64..3,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d.img");
            let size = 300_000u64;
            let chunk = 2 * SNAPSHOT_BLOCK;
            let parts = size.div_ceil(chunk);
            let original: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&path, &original).unwrap();
            let disk = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let snap = CowSnapshot::create(&path, size).unwrap();
            let mut copy = vec![0u8; size as usize];
            let mut logged = Vec::new();
            let mut before = before.into_iter();
            // Parts 0..put_before_crash are put (and marked); part
            // put_before_crash is read but not put when the crash comes.
            for p in 0..=put_before_crash.min(parts - 1) {
                for (o, l, v) in before.by_ref().take(2) {
                    let l = (l as u64).min(size - o);
                    snap.preserve(&disk, o, l).unwrap();
                    logged.push((o, l));
                    disk.write_all_at(&vec![v; l as usize], o).unwrap();
                }
                let off = p * chunk;
                let n = chunk.min(size - off) as usize;
                snap.read_for_copy(&disk, off, &mut copy[off as usize..off as usize + n]).unwrap();
                if p < put_before_crash {
                    snap.mark_copied(off, n as u64);
                }
            }
            for (o, l, v) in before {
                let l = (l as u64).min(size - o);
                snap.preserve(&disk, o, l).unwrap();
                logged.push((o, l));
                disk.write_all_at(&vec![v; l as usize], o).unwrap();
            }
            let side = snap.path().to_path_buf();
            drop(snap); // kill -9: the side file stays, the states are gone
            let done: Vec<u64> = (0..put_before_crash.min(parts)).collect();
            let blocks = rebuild_blocks(size, chunk, &done, &logged).unwrap();
            let snap = CowSnapshot::reopen(&side, size, blocks).unwrap();
            let mut after = after.into_iter();
            for p in put_before_crash.min(parts)..parts {
                for (o, l, v) in after.by_ref().take(2) {
                    let l = (l as u64).min(size - o);
                    snap.preserve(&disk, o, l).unwrap();
                    disk.write_all_at(&vec![v; l as usize], o).unwrap();
                }
                let off = p * chunk;
                let n = chunk.min(size - off) as usize;
                snap.read_for_copy(&disk, off, &mut copy[off as usize..off as usize + n]).unwrap();
                snap.mark_copied(off, n as u64);
            }
            prop_assert!(copy == original);
            snap.release().unwrap();
        }
    }

    /// Pages of `[0, len)` of `file` in the page cache (mincore on a map).
    fn resident_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        // SAFETY: a read-only shared map of an open file, unmapped below;
        // mincore writes one byte per page into a vector of that size.
        unsafe {
            let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0);
            assert_ne!(map, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
            libc::munmap(map, len);
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    #[test]
    fn a_copy_read_leaves_the_disk_out_of_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let len = 4 * SNAPSHOT_BLOCK as usize;
        std::fs::write(&path, vec![5u8; len]).unwrap();
        let disk = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        disk.sync_all().unwrap(); // clean pages: the kernel may drop them
        let mut warm = vec![0u8; len];
        disk.read_exact_at(&mut warm, 0).unwrap();
        assert!(resident_pages(&disk, len) > 0, "a plain read fills the page cache");
        let snap = CowSnapshot::create(&path, len as u64).unwrap();
        let mut buf = vec![0u8; len];
        snap.read_for_copy(&disk, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 5));
        assert_eq!(resident_pages(&disk, len), 0, "the copy dropped what it read");
        snap.release().unwrap();
    }

    #[test]
    fn a_block_on_the_target_is_never_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![1u8; 3 * SNAPSHOT_BLOCK as usize]).unwrap();
        let disk = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let snap = CowSnapshot::create(&path, 3 * SNAPSHOT_BLOCK).unwrap();
        let mut buf = vec![0u8; SNAPSHOT_BLOCK as usize];
        snap.read_for_copy(&disk, SNAPSHOT_BLOCK, &mut buf).unwrap();
        snap.mark_copied(SNAPSHOT_BLOCK, SNAPSHOT_BLOCK);
        let e = snap.read_for_copy(&disk, SNAPSHOT_BLOCK, &mut buf).unwrap_err().to_string();
        assert!(e.contains("already on the target"), "{e}");
        assert!(snap.read_for_copy(&disk, 0, &mut vec![0u8; 2 * SNAPSHOT_BLOCK as usize]).is_err());
        snap.read_for_copy(&disk, 2 * SNAPSHOT_BLOCK, &mut buf).unwrap();
        // Out of range and unaligned marks are harmless.
        snap.mark_copied(10 * SNAPSHOT_BLOCK, 5);
        snap.mark_copied(0, 0);
        assert!(snap.read_for_copy(&disk, 7, &mut buf).is_err());
        snap.release().unwrap();
    }

    #[test]
    fn rebuilt_states_follow_parts_then_changes() {
        use Block::{Copied as C, Live as L, Saved as S};
        let b = SNAPSHOT_BLOCK;
        let size = 5 * b + 10; // six blocks, the last one short
        type Row = (Vec<u64>, Vec<(u64, u64)>, Vec<Block>);
        let table: Vec<Row> = vec![
            (vec![], vec![], vec![L, L, L, L, L, L]),
            (vec![0], vec![], vec![C, C, L, L, L, L]),
            (vec![], vec![(b - 1, 2)], vec![S, S, L, L, L, L]),
            // A part on the target wins over a change made after it was put.
            (vec![0], vec![(b - 1, 2)], vec![C, C, L, L, L, L]),
            (vec![2], vec![(5 * b, 10), (3 * b, 0)], vec![L, L, L, L, C, C]),
            (vec![1], vec![(0, size)], vec![S, S, C, C, S, S]),
        ];
        for (done, touched, want) in table {
            assert_eq!(rebuild_blocks(size, 2 * b, &done, &touched).unwrap(), want, "{done:?} {touched:?}");
        }
        let past = rebuild_blocks(size, 2 * b, &[], &[(size - 1, 2)]).unwrap_err().to_string();
        assert!(past.contains("past the end"), "{past}");
        let part = rebuild_blocks(size, 2 * b, &[3], &[]).unwrap_err().to_string();
        assert!(part.contains("part 3"), "{part}");
        assert!(rebuild_blocks(size, 1000, &[], &[]).is_err());
        assert!(rebuild_blocks(size, 2 * b, &[u64::MAX], &[]).is_err());
    }
}
