//! Point-in-time snapshot of a disk by copy-before-write.
//!
//! Initial replication copies a disk as it was at protection time while the
//! VM keeps writing. A full copy would cost 100% space and time up front, so
//! the snapshot keeps only what is about to be overwritten: before a write
//! lands on a block that the copier has not read yet, the block's old bytes
//! are saved to a sparse side file (`<disk>.ferry-snap`, beside the disk).
//! The copier reads a block from the side file if it was saved, else from
//! the disk. Space used is the blocks written during the copy, and it is
//! reclaimed when the snapshot is released (the side file is deleted).
//!
//! Consistency: block states live under one mutex. The copier holds it while
//! it reads a chunk from the disk and marks those blocks copied; a writer
//! calls [`CowSnapshot::preserve`] (same mutex) before its disk write. So a
//! block is either read by the copier before any new write, or saved first:
//! the copier always sees the protection-time bytes.
//!
//! Crash safety: the side file is not a durable structure. A daemon that
//! restarts during initial replication discards it and starts protection
//! again (a new snapshot), so nothing depends on it after a crash.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Snapshot block size: the copy-before-write granularity.
pub const SNAPSHOT_BLOCK: u64 = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    /// Not read by the copier, not overwritten since the snapshot.
    Live,
    /// Old bytes saved in the side file.
    Saved,
    /// The copier has read it: later writes need not save it.
    Copied,
}

pub struct CowSnapshot {
    side_path: PathBuf,
    side: File,
    size: u64,
    blocks: Mutex<Vec<Block>>,
    saved_bytes: AtomicU64,
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

impl CowSnapshot {
    /// Starts a snapshot of a disk of `size` bytes; the caller holds the disk's
    /// write lock so that no write is in flight.
    pub fn create(disk_path: &Path, size: u64) -> Result<Self> {
        let side_path = side_path(disk_path);
        let side = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&side_path)
            .map_err(|e| Error::io(format!("create snapshot file {}", side_path.display()), e))?;
        let n = size.div_ceil(SNAPSHOT_BLOCK) as usize;
        Ok(CowSnapshot {
            side_path,
            side,
            size,
            blocks: Mutex::new(vec![Block::Live; n]),
            saved_bytes: AtomicU64::new(0),
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

    /// Reads `buf.len()` bytes at `offset` as they were at snapshot time and
    /// marks those blocks copied. `offset` must be block-aligned.
    pub fn read_for_copy(&self, disk: &File, offset: u64, buf: &mut [u8]) -> Result<()> {
        if !offset.is_multiple_of(SNAPSHOT_BLOCK) {
            return Err(Error::Internal(format!("snapshot read at {offset} is not aligned to {SNAPSHOT_BLOCK}")));
        }
        let mut blocks = self.blocks.lock().expect("snapshot lock is never poisoned");
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
                Block::Live | Block::Copied => {
                    disk.read_exact_at(piece, at).map_err(|e| Error::io("snapshot: read disk", e))?
                }
            }
            blocks[b] = Block::Copied;
            pos += n;
        }
        Ok(())
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
    }
}
