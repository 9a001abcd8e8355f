//! One device cache flush for a disk's change log and its image.
//!
//! A guest FLUSH must make every acknowledged write durable in the log and
//! in the image. Two fdatasyncs do that, but each ends with a flush of the
//! device's volatile cache, the slow part of a sync on most devices (and
//! twice as slow as qemu-nbd, which has only the image to sync). When the
//! log's records need no metadata to be read back (their blocks allocated
//! and written, the file size committed: `changelog`'s filler ahead, the
//! plan's `data_only`) and the log is on the image's device, the records
//! need only reach the device and then one cache flush, which the image's
//! fdatasync makes. So a sync is:
//!
//! 1. start writing the log's dirty pages, and the image's (`sync_file_range`
//!    `SYNC_FILE_RANGE_WRITE`, so both are in flight together);
//! 2. wait until every log page of `0..upto` is written to the device
//!    (`WAIT_BEFORE | WRITE | WAIT_AFTER`: pages dirtied before the call are
//!    written and their writes completed; an error is the log's, as a failed
//!    fdatasync would be);
//! 3. fdatasync the image.
//!
//! Why 3 covers the log's bytes: on ext4 an fdatasync always ends with a
//! cache flush issued after it was called. It waits for the image's pages,
//! then either commits the journal transaction holding the image's metadata
//! (the commit block goes out with a preflush), waits for a commit whose
//! flush has not been issued yet (`jbd2_trans_will_send_data_barrier`), or,
//! when nothing needs committing, issues the flush itself
//! (`blkdev_issue_flush`, `ext4_sync_file`'s `needs_barrier`). A flush
//! empties the whole device cache, so the log's writes, completed in 2,
//! are durable when 3 returns. A file system mounted without barriers
//! flushes nothing for either server; that is the operator's choice.
//!
//! Only ext4 set up as that argument needs is trusted with this
//! ([`Ext4Facts::trusted`]): no journal or an internal one (with an
//! external journal, older kernels commit without flushing the data
//! device), no fast commits (a fast commit can return early on another
//! thread's commit whose flush came before the log's writes), and no data
//! journalling, by mount option or by the image's or its folder's
//! `chattr +j` (the log's bytes would sit in the journal, not on the
//! device). Everything else (XFS, whose log force can wait on a log write
//! submitted before the log's bytes completed; Btrfs; network file
//! systems; a log on another device than the image) gets two fdatasyncs
//! at once, as does any sync whose records are not all over prepared bytes
//! (a log just rotated or grown past its filler: that fdatasync also
//! prepares them for the next syncs).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use crate::capture::extents;

/// How a disk syncs its log and image for one group commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Write the log's bytes out, then one fdatasync of the image (module docs).
    OneFlush,
    /// fdatasync the log and the image at once, each with its own flush.
    TwoSyncs,
}

/// What a disk knows about its image for [`mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDevice {
    /// The image's device (`st_dev`).
    pub device: u64,
    /// The image's file system makes a cache flush at every fdatasync (ext4).
    pub flush_on_every_sync: bool,
}

impl ImageDevice {
    /// Looks at an open image at `path`; an image that cannot be examined
    /// gets two syncs.
    pub fn of(image: &File, path: &std::path::Path) -> ImageDevice {
        let Ok(meta) = image.metadata() else {
            return ImageDevice { device: 0, flush_on_every_sync: false };
        };
        let ext4 = extents::fs_magic(image) == Some(extents::EXT4_MAGIC);
        let flush_on_every_sync = ext4 && Ext4Facts::read(meta.dev(), image, path).trusted();
        ImageDevice { device: meta.dev(), flush_on_every_sync }
    }
}

/// The journal of an ext4 file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    None,
    /// In the file system (`/proc/fs/jbd2/<dev>-8`).
    Internal,
    /// On another device, or not found.
    Other,
}

/// What decides whether an ext4 image's fdatasync flushes the device after
/// the log's writes (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Facts {
    pub journal: Journal,
    /// Mounted `data=journal`.
    pub data_journal: bool,
    /// Fast commits on (`fast_commit` in `/proc/fs/ext4/<dev>/options`).
    pub fast_commit: bool,
    /// The image or its folder (which new logs inherit from) has `chattr +j`.
    pub inode_journal_data: bool,
}

impl Ext4Facts {
    pub fn trusted(&self) -> bool {
        matches!(self.journal, Journal::None | Journal::Internal)
            && !self.data_journal
            && !self.fast_commit
            && !self.inode_journal_data
    }

    /// Reads them from `/proc` and `/sys` for the file system on `device`;
    /// what cannot be read counts against.
    fn read(device: u64, image: &File, path: &std::path::Path) -> Ext4Facts {
        let (major, minor) = (libc::major(device), libc::minor(device));
        let name = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let journal = match &name {
            None => Journal::Other,
            Some(n) => match std::fs::read_to_string(format!("/sys/fs/ext4/{n}/journal_task")) {
                Ok(t) if t.trim() == "<none>" => Journal::None,
                Ok(_) if std::path::Path::new(&format!("/proc/fs/jbd2/{n}-8")).exists() => Journal::Internal,
                _ => Journal::Other,
            },
        };
        let options = name.as_ref().and_then(|n| std::fs::read_to_string(format!("/proc/fs/ext4/{n}/options")).ok());
        let dev = format!("{major}:{minor}");
        let mount = std::fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| m.lines().find(|l| l.split(' ').nth(2) == Some(dev.as_str())).map(str::to_string));
        // A text that cannot be read names every option: it counts against.
        let names = |text: &Option<String>, option: &str| {
            text.as_ref().is_none_or(|t| t.split([',', ' ', '\n']).any(|o| o.trim() == option))
        };
        let journal_data = |f: &File| journal_data_flag(f).unwrap_or(true);
        Ext4Facts {
            journal,
            data_journal: names(&mount, "data=journal") || names(&options, "data=journal"),
            fast_commit: options.is_some() && names(&options, "fast_commit"),
            inode_journal_data: journal_data(image)
                || path.parent().and_then(|p| File::open(p).ok()).is_none_or(|f| journal_data(&f)),
        }
    }
}

/// Whether an ext2/3/4 inode has `FS_JOURNAL_DATA_FL` (`chattr +j`), from `FS_IOC_GETFLAGS`.
fn journal_data_flag(file: &File) -> io::Result<bool> {
    const FS_JOURNAL_DATA_FL: libc::c_long = 0x0000_4000;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one long into the pointed-to value.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & FS_JOURNAL_DATA_FL != 0)
}

/// The sync for a log on `log_device` whose records are all over prepared
/// bytes (`data_only`), beside an image on `image`.
pub fn mode(image: ImageDevice, log_device: u64, data_only: bool) -> SyncMode {
    if image.flush_on_every_sync && image.device == log_device && data_only {
        SyncMode::OneFlush
    } else {
        SyncMode::TwoSyncs
    }
}

/// Starts writing a file's dirty pages to the device, without waiting.
/// A hint: errors show up in the wait or fdatasync that follows.
pub fn start_writing(file: &File) {
    // SAFETY: sync_file_range on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Writes every page of `0..upto` dirtied before the call to the device and
/// waits for those writes (not for a cache flush, nor any metadata).
pub fn write_out(file: &File, upto: u64) -> io::Result<()> {
    let len = libc::off64_t::try_from(upto).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    loop {
        // SAFETY: sync_file_range on an open descriptor; no memory is passed.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, len, flags) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flush_only_on_ext4_same_device_prepared_records() {
        let ext4 = ImageDevice { device: 7, flush_on_every_sync: true };
        let other_fs = ImageDevice { device: 7, flush_on_every_sync: false };
        let table = [
            (ext4, 7, true, SyncMode::OneFlush),
            (ext4, 7, false, SyncMode::TwoSyncs),
            (ext4, 8, true, SyncMode::TwoSyncs),
            (other_fs, 7, true, SyncMode::TwoSyncs),
            (other_fs, 8, false, SyncMode::TwoSyncs),
        ];
        for (image, log_device, data_only, want) in table {
            assert_eq!(mode(image, log_device, data_only), want, "{image:?} log on {log_device} data_only {data_only}");
        }
    }

    #[test]
    fn only_ext4_as_the_argument_needs_it_is_trusted() {
        let good = Ext4Facts {
            journal: Journal::Internal,
            data_journal: false,
            fast_commit: false,
            inode_journal_data: false,
        };
        assert!(good.trusted());
        assert!(Ext4Facts { journal: Journal::None, ..good }.trusted());
        for bad in [
            Ext4Facts { journal: Journal::Other, ..good },
            Ext4Facts { data_journal: true, ..good },
            Ext4Facts { fast_commit: true, ..good },
            Ext4Facts { inode_journal_data: true, ..good },
        ] {
            assert!(!bad.trusted(), "{bad:?}");
        }
    }

    #[test]
    fn the_facts_of_the_test_folder_are_read_without_error() {
        // Whatever file system the tests run on, looking at it must not fail
        // or panic, and a non-ext4 one is never trusted.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = File::create(&path).unwrap();
        let d = ImageDevice::of(&f, &path);
        assert_eq!(d.device, f.metadata().unwrap().dev());
        if extents::fs_magic(&f) != Some(extents::EXT4_MAGIC) {
            assert!(!d.flush_on_every_sync);
        }
    }

    #[test]
    fn write_out_writes_dirty_pages_and_refuses_a_range_past_off_t() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[5u8; 8192], 0).unwrap();
        start_writing(&f);
        write_out(&f, 8192).unwrap();
        write_out(&f, 0).unwrap();
        assert_eq!(write_out(&f, u64::MAX).unwrap_err().raw_os_error(), Some(libc::EFBIG));
    }
}
