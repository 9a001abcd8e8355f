//! Where a disk image file holds data and where it has holes, from
//! `SEEK_DATA` / `SEEK_HOLE`, and zeroing that keeps a range allocated.
//! The NBD export reports the first as `base:allocation` block status and
//! uses the second for `WRITE_ZEROES` with `NO_HOLE`.
//!
//! A hole reads as zeroes. The converse is not promised: file systems
//! report blocks that were allocated but never written (`fallocate`,
//! `FALLOC_FL_ZERO_RANGE`) as holes or as data as they see fit, and a
//! file system without `SEEK_DATA` reports everything as data. Either
//! answer is a correct block status; it only decides how much a sparse
//! copy skips.
//!
//! Nothing here changes the file's size or data, except the zeroing, and
//! nothing uses the descriptor's file position (all I/O elsewhere is
//! positional), so concurrent calls are fine.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// A run of a file: `len` bytes, all hole or all data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub len: u64,
    pub hole: bool,
}

/// The runs of `[offset, offset + len)` of `file`, in order from `offset`;
/// at most `max_runs` (then they stop short of the end). Past the file's
/// end counts as hole. `EINVAL`/`ENOTSUP` from `lseek` (no `SEEK_DATA` in
/// this file system) give one run of data.
pub fn allocation(file: &File, offset: u64, len: u64, max_runs: usize) -> io::Result<Vec<Run>> {
    let end = offset.checked_add(len).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
    let mut runs: Vec<Run> = Vec::new();
    let mut pos = offset;
    while pos < end && runs.len() < max_runs.max(1) {
        let (next, hole) = match seek(file, pos, libc::SEEK_DATA) {
            // No data at or after `pos`: a hole to the end of the range.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (end, true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => (end, false),
            Err(e) => return Err(e),
            Ok(data) if data > pos => (data.min(end), true),
            // Data at `pos`: it runs to the next hole (there is always one,
            // at the end of the file).
            Ok(_) => match seek(file, pos, libc::SEEK_HOLE) {
                Ok(hole) => (hole.clamp(pos + 1, end), false),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (end, true), // truncated meanwhile
                Err(e) => return Err(e),
            },
        };
        match runs.last_mut() {
            Some(last) if last.hole == hole => last.len += next - pos,
            _ => runs.push(Run { len: next - pos, hole }),
        }
        pos = next;
    }
    Ok(runs)
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::ENXIO))?;
    // SAFETY: lseek on a valid, open descriptor; it reads no memory of ours.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Writes zeroes over a range and leaves it allocated: `FALLOC_FL_ZERO_RANGE`
/// where the file system has it; else punch a hole and allocate it again
/// (tmpfs); else write zero buffers.
pub fn zero_allocated(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
        Ok(()) => return Ok(()),
        Err(e) if !unsupported(&e) => return Err(e),
        Err(_) => {}
    }
    match fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len) {
        Ok(()) => match fallocate(file, keep, offset, len) {
            Ok(()) => return Ok(()),
            // Zero already (a hole), just not allocated: write to allocate.
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        },
        Err(e) if !unsupported(&e) => return Err(e),
        Err(_) => {}
    }
    write_zeros(file, offset, len)
}

/// Writes zeros over a range: punches a hole where the file system can
/// (reads back as zeros, frees space), else writes zero buffers.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 || fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len).is_ok() {
        return Ok(());
    }
    write_zeros(file, offset, len)
}

/// Writes zero buffers (1 MiB at a time) over a range.
fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    // SAFETY: fallocate on a valid, open descriptor with in-range arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
}

/// File systems known to zero a range (punch a hole, or zero it and keep
/// it allocated) with metadata updates only, no data written: ext4, XFS,
/// Btrfs, tmpfs. Elsewhere zeroing may fall back to writing zero buffers,
/// so NBD `FAST_ZERO` is refused and the client writes them itself.
pub fn zeroing_is_fast(file: &File) -> bool {
    fs_magic(file).is_some_and(|m| matches!(m, EXT4_MAGIC | XFS_MAGIC | BTRFS_MAGIC | TMPFS_MAGIC))
}

pub(crate) const EXT4_MAGIC: i64 = 0xef53;
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683e;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The file system type of `file` (`statfs.f_type`), if it can be told.
pub(crate) fn fs_magic(file: &File) -> Option<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct we pass on success, and we read it only then.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: initialized by the successful fstatfs above.
    let st = unsafe { st.assume_init() };
    // f_type is 32 or 64 bits wide depending on the target.
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_type as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const MIB: u64 = 1 << 20;

    /// A 16 MiB file: data at [1, 2) MiB and [8, 9) MiB, holes elsewhere.
    fn sparse() -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("d"))
            .unwrap();
        f.set_len(16 * MIB).unwrap();
        f.write_all_at(&vec![7u8; MIB as usize], MIB).unwrap();
        f.write_all_at(&vec![9u8; MIB as usize], 8 * MIB).unwrap();
        (dir, f)
    }

    fn runs(v: &[(u64, bool)]) -> Vec<Run> {
        v.iter().map(|&(len, hole)| Run { len, hole }).collect()
    }

    #[test]
    fn holes_and_data_are_found_and_bounded() {
        let (_dir, f) = sparse();
        // This file system must have SEEK_DATA for the test to say anything.
        assert_eq!(seek(&f, 0, libc::SEEK_DATA).unwrap(), MIB, "the test folder's file system reports holes");
        let all = allocation(&f, 0, 16 * MIB, 100).unwrap();
        assert_eq!(all, runs(&[(MIB, true), (MIB, false), (6 * MIB, true), (MIB, false), (7 * MIB, true)]));
        // A range starting inside data, ending inside a hole.
        let mid = allocation(&f, MIB + 4096, 2 * MIB, 100).unwrap();
        assert_eq!(mid, runs(&[(MIB - 4096, false), (MIB + 4096, true)]));
        // Capped: the runs stop short, and the client asks again.
        assert_eq!(allocation(&f, 0, 16 * MIB, 2).unwrap(), runs(&[(MIB, true), (MIB, false)]));
        // Past the end of the file: a hole (ENXIO from SEEK_DATA).
        assert_eq!(allocation(&f, 15 * MIB, 4 * MIB, 100).unwrap(), runs(&[(4 * MIB, true)]));
        assert!(allocation(&f, u64::MAX, 2, 100).is_err(), "an overflowing range is refused");
    }

    #[test]
    fn zeroing_keeps_the_range_allocated_and_reads_zero() {
        let (_dir, f) = sparse();
        let before = f.metadata().unwrap().blocks();
        zero_allocated(&f, MIB, MIB).unwrap();
        let mut buf = vec![1u8; MIB as usize];
        f.read_exact_at(&mut buf, MIB).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(f.metadata().unwrap().blocks() >= before, "no blocks freed: the range stays allocated");
        // Over a hole it allocates.
        zero_allocated(&f, 4 * MIB, MIB).unwrap();
        assert!(f.metadata().unwrap().blocks() >= before + MIB / 512, "the hole got allocated");
        assert_eq!(f.metadata().unwrap().len(), 16 * MIB, "the size is kept");
    }
}
