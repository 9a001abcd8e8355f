//! Appending records to the active log of a disk.
//!
//! Every append is one positioned vectored write (`pwritev` of the record
//! headers and payloads of one change, or of a batch of changes that
//! arrived together) at the end of the log, so when an append returns
//! its record is in the kernel: a crash of the daemon (kill -9, panic, OOM
//! kill) with the host still up loses nothing that was appended, and the
//! file is always whole records followed by at most one partial record (the
//! one being written when the process died). Appends are made one at a time
//! by the caller (the writer is `&mut`), which is what keeps that shape.
//! Durability against power loss is [`LogWriter::sync`], or a
//! [`LogWriter::sync_plan`] carried out outside the caller's lock (group
//! commit).
//!
//! # Filler ahead of the records
//!
//! The file is kept longer than its records: the writer writes filler (an
//! 8-byte pattern derived from the log id, [`super::format::filler`])
//! ahead of `end`, about [`PREALLOC_MIN`] at first, then steps as large as
//! the log up to [`PREALLOC_STEP_MAX`], so an append overwrites bytes the
//! file already has instead of growing it. Once one fdatasync has covered
//! the filler (its blocks allocated and written, the file size committed),
//! a record appended over it needs no metadata to be read back after a
//! power loss: writing its bytes to the device is enough. The disk's group
//! commit uses that to make one device cache flush serve both the log and
//! the image (`capture::shared_flush`). After a crash the file is the
//! records, at most one partial record, then filler: the scan takes the
//! filler after the last record as the end ([`super::Tail::Filler`],
//! [`super::Tail::Torn`]); a seal cuts it off, so a sealed log is exactly
//! its records. Filler, unlike zeros, cannot be mistaken for the zero bytes
//! a damaged last record ends with, so that damage is still found.
//!
//! Filler pays only while the records between two syncs fit in it. A stream
//! that appends more than [`PREALLOC_STEP_MAX`] between syncs (large
//! sequential writes, or writes with no FLUSH at all) outruns any step, so
//! every sync of it is a full fdatasync anyway, and the filler would only
//! write each byte twice: the writer then writes none until the next sync
//! ([`LogWriter::wants_filler`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{
    encode_record_header, record_crc_seed, CloseBlock, LogHeader, RecordKind, CLOSE_BLOCK_OFFSET, HEADER_SIZE,
    RECORD_HEADER_SIZE,
};
use crate::{Error, ErrorClass, Result};

/// What [`LogWriter::mark_untrusted`] writes over the magic.
pub const UNTRUSTED_MAGIC: &[u8; 8] = b"FERRYBAD";

/// Most records in one [`LogWriter::append_all`]: two iovecs each stay
/// far below the kernel's `IOV_MAX` (1024).
pub const MAX_BATCH: usize = 256;

/// Filler written ahead of the records at first ([module docs](self)).
pub const PREALLOC_MIN: u64 = 1 << 20;

/// Largest step of filler written ahead at once: an append that needs more
/// room writes at most about this much extra under the disk's lock (a few
/// milliseconds of page-cache copying), and a log holds at most this
/// much and one [`PREALLOC_MIN`] beyond its records.
pub const PREALLOC_STEP_MAX: u64 = 8 << 20;

/// Bytes of filler written by one `pwrite` call.
const FILLER_CHUNK: usize = 64 << 10;

/// One change to log: a write and its bytes, or a zeroed range.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub offset: u64,
    pub len: u64,
    /// The written bytes (`len` of them) for a write; empty for a zero range.
    pub payload: &'a [u8],
}

impl<'a> Record<'a> {
    pub fn write(offset: u64, data: &'a [u8]) -> Self {
        Record { kind: RecordKind::Write, offset, len: data.len() as u64, payload: data }
    }
    pub fn zero(offset: u64, len: u64) -> Self {
        Record { kind: RecordKind::Zero, offset, len, payload: &[] }
    }
    /// A write of `len` bytes whose bytes stay in the disk image (see `capture::held`).
    pub fn in_image(offset: u64, len: u64) -> Self {
        Record { kind: RecordKind::InImage, offset, len, payload: &[] }
    }
}

/// The writer of one open log. Not thread safe by itself: the caller holds it
/// under a lock and may carry out a [`LogWriter::sync_plan`] outside that
/// lock.
#[derive(Debug)]
pub struct LogWriter {
    /// For error messages and the sealed result.
    path: PathBuf,
    file: Arc<File>,
    header: LogHeader,
    /// Starting value of every record crc (ties records to this log).
    crc_seed: u32,
    /// Bytes of the file handed to the kernel (header included): where the
    /// next record goes.
    end: u64,
    records: u64,
    last_seq: u64,
    /// Ranges of the in-image records appended, in order, neighbours that
    /// continue each other merged: what the log's held side file protects
    /// once it is rotated out.
    in_image: Vec<(u64, u64)>,
    in_image_bytes: u64,
    /// Set by the first failed write or sync; the log has a gap (or pages
    /// the kernel may have dropped) after that point, so nothing more may be
    /// appended and the caller must resync.
    poisoned: Option<String>,
    /// File length: the records, then filler written ahead (never less than `end`).
    capacity: u64,
    /// The file up to here is covered by a finished fdatasync: its blocks
    /// are allocated and its length committed, so a record that ends here
    /// or before is readable after a power loss once its bytes reach the
    /// device.
    prepared: u64,
    /// The device the file is on (`st_dev`).
    device: u64,
    /// `end` when the last finished sync was planned: the appends since are
    /// what the next sync must cover.
    synced_end: u64,
}

/// What a group commit syncs ([`LogWriter::sync_plan`]), taken under the
/// caller's lock and carried out outside it.
#[derive(Debug, Clone)]
pub struct LogSync {
    pub file: Arc<File>,
    pub path: PathBuf,
    /// Records end here: syncing `0..upto` covers every append made before the plan.
    pub upto: u64,
    /// The records need only their bytes written to the device: no
    /// metadata (allocation, file size) of the log changed since a
    /// finished fdatasync ([module docs](self)).
    pub data_only: bool,
    /// The device the log is on (`st_dev`).
    pub device: u64,
    /// File length when the plan was taken: what a full fdatasync of the
    /// plan makes prepared ([`LogWriter::synced`]).
    capacity: u64,
}

/// A log that was cleanly closed: everything in it is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedLog {
    pub path: PathBuf,
    pub header: LogHeader,
    /// Number of records (the seq of the last one).
    pub records: u64,
    /// File length, header included.
    pub end_offset: u64,
}

impl LogWriter {
    /// Creates a new log at `path`, failing if the file exists. The header is
    /// durable (file and directory entry fsynced) when this returns; on any
    /// error the half-made file is removed, so the call can be retried.
    pub fn create(path: &Path, header: &LogHeader) -> Result<LogWriter> {
        let bytes = header.encode()?;
        let file = match crate::paths::private_options().read(true).write(true).create_new(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists { what: "HRL log", name: path.display().to_string() })
            }
            Err(e) => return Err(Error::io(format!("creating HRL log {}", path.display()), e)),
        };
        let made = (|| {
            file.write_all_at(&bytes, 0).map_err(|e| Error::io(format!("writing header of {}", path.display()), e))?;
            file.sync_all().map_err(|e| Error::io(format!("fsync of {}", path.display()), e))?;
            sync_parent_dir(path)?;
            let meta = file.metadata().map_err(|e| Error::io(format!("stat of {}", path.display()), e))?;
            Ok(std::os::unix::fs::MetadataExt::dev(&meta))
        })();
        let device = match made {
            Ok(device) => device,
            Err(e) => {
                drop(file);
                // Best effort: a leftover header-only file would be an unclean,
                // empty log, which recovery handles anyway.
                let _ = std::fs::remove_file(path);
                let _ = sync_parent_dir(path);
                return Err(e);
            }
        };
        Ok(LogWriter {
            path: path.to_path_buf(),
            file: Arc::new(file),
            header: header.clone(),
            crc_seed: record_crc_seed(header.log_id),
            end: HEADER_SIZE,
            records: 0,
            last_seq: 0,
            in_image: Vec::new(),
            in_image_bytes: 0,
            poisoned: None,
            capacity: HEADER_SIZE,
            prepared: HEADER_SIZE,
            device,
            synced_end: HEADER_SIZE,
        })
    }

    /// Logs a write of `data` at disk byte `offset`. In the kernel when this
    /// returns; durable after [`sync`](Self::sync) or [`seal`](Self::seal).
    pub fn append_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.append_all(&[Record::write(offset, data)])
    }

    /// Logs that `len` bytes at disk byte `offset` became zeros
    /// (WRITE_ZEROES or TRIM). Like [`append_write`](Self::append_write).
    pub fn append_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.append_all(&[Record::zero(offset, len)])
    }

    /// Logs several changes, in order, with one `pwritev` (for a batch of
    /// requests that arrived together). All are in the kernel when this
    /// returns, or none is counted: an argument error changes nothing, an
    /// I/O error poisons the log as a single append's would. At most
    /// [`MAX_BATCH`] records.
    pub fn append_all(&mut self, records: &[Record<'_>]) -> Result<()> {
        self.check_usable()?;
        if records.len() > MAX_BATCH {
            return Err(Error::invalid("records", format!("{} in one append, at most {MAX_BATCH}", records.len())));
        }
        for r in records {
            check_range(r.offset, r.len)?;
            let payload = if r.kind == RecordKind::Write { r.len } else { 0 };
            if r.payload.len() as u64 != payload {
                return Err(Error::invalid(
                    "record",
                    format!("a {:?} record of {} bytes carries {} payload bytes", r.kind, r.len, r.payload.len()),
                ));
            }
        }
        let headers: Vec<[u8; RECORD_HEADER_SIZE as usize]> = records
            .iter()
            .zip(self.last_seq + 1..)
            .map(|(r, seq)| encode_record_header(self.crc_seed, r.kind, seq, r.offset, r.len, r.payload))
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * records.len());
        for (h, r) in headers.iter().zip(records) {
            parts.push(h);
            if !r.payload.is_empty() {
                parts.push(r.payload);
            }
        }
        let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let w = crate::failpoint::check("log.append", &self.path)
            .and_then(|()| write_all_vectored_at(&self.file, &parts, self.end))
            .map_err(|e| self.io_err("appending records", e));
        self.poison_on_err(w)?;
        self.end += bytes;
        if self.end > self.capacity {
            // After the records, never before them: a kill between the two
            // leaves records then nothing, not a gap then filler.
            self.capacity = self.end;
            if self.wants_filler() {
                self.write_filler_ahead();
            }
        }
        self.last_seq += records.len() as u64;
        self.records += records.len() as u64;
        for r in records.iter().filter(|r| r.kind == RecordKind::InImage) {
            self.in_image_bytes += r.len;
            match self.in_image.last_mut() {
                Some((o, l)) if *o + *l == r.offset => *l += r.len,
                _ => self.in_image.push((r.offset, r.len)),
            }
        }
        Ok(())
    }

    /// Whether filler ahead would pay off: the records appended since the
    /// last sync fit in one step, so the next sync can find them over
    /// prepared filler ([module docs](self)).
    fn wants_filler(&self) -> bool {
        self.end - self.synced_end <= PREALLOC_STEP_MAX
    }

    /// Writes filler from `end` to a step past it (see the [module
    /// docs](self)), after an append grew the file. Best effort: if it
    /// fails (a full volume), appends grow the file as they go, and syncs
    /// stay full fdatasyncs.
    fn write_filler_ahead(&mut self) {
        let step = (self.end - HEADER_SIZE).clamp(PREALLOC_MIN, PREALLOC_STEP_MAX);
        let target = (self.end + step).div_ceil(PREALLOC_MIN) * PREALLOC_MIN;
        let mut chunk = vec![0u8; FILLER_CHUNK.min((target - self.end) as usize)];
        let mut at = self.end;
        while at < target {
            let n = (target - at).min(chunk.len() as u64) as usize;
            super::format::fill_at(self.header.log_id, at, &mut chunk[..n]);
            let written = crate::failpoint::check("log.filler", &self.path)
                .and_then(|()| self.file.write_all_at(&chunk[..n], at));
            if let Err(e) = written {
                tracing::debug!(log = %self.path.display(), error = %e, "could not write filler ahead of the records");
                return;
            }
            at += n as u64;
            self.capacity = at;
        }
    }

    /// fdatasync: every record appended so far is durable. This is the
    /// durability point for an NBD FLUSH or FUA.
    pub fn sync(&mut self) -> Result<()> {
        self.check_usable()?;
        let (capacity, end) = (self.capacity, self.end);
        let r = self.file.sync_data().map_err(|e| self.io_err("fdatasync", e));
        self.poison_on_err(r)?;
        self.prepared = self.prepared.max(capacity);
        self.synced_end = self.synced_end.max(end);
        Ok(())
    }

    /// What a group commit must sync to make every record appended so far
    /// durable, to be carried out outside the lock that guards the writer:
    /// an fdatasync of `file` (then [`synced`](Self::synced)), or, when
    /// `data_only`, writing `0..upto` of it to the device followed by a
    /// device cache flush (which an fdatasync of another file on the same
    /// device makes, see `capture::disk`). A failure carrying it out must be
    /// treated like a failed [`sync`](Self::sync) (stop using the log,
    /// resync). Shares the writer's descriptor: no new one is needed.
    pub fn sync_plan(&self) -> Result<LogSync> {
        self.check_usable()?;
        Ok(LogSync {
            file: self.file.clone(),
            path: self.path.clone(),
            upto: self.end,
            data_only: self.end <= self.prepared,
            device: self.device,
            capacity: self.capacity,
        })
    }

    /// A full fdatasync of `plan` finished: the file as it was then is
    /// prepared. A plan of another log (rotated meanwhile) changes nothing.
    pub fn synced(&mut self, plan: &LogSync) {
        if Arc::ptr_eq(&self.file, &plan.file) {
            self.prepared = self.prepared.max(plan.capacity);
            self.synced_end = self.synced_end.max(plan.upto);
        }
    }

    /// A `data_only` plan was carried out: its records were written to the
    /// device and a device cache flush issued after that finished. The
    /// filler written since the plan's last full sync stays unprepared.
    pub fn written_out(&mut self, plan: &LogSync) {
        if Arc::ptr_eq(&self.file, &plan.file) && plan.data_only {
            self.synced_end = self.synced_end.max(plan.upto);
        }
    }

    /// Total bytes of the log, header included. This is what the
    /// 50%-of-disk space rule measures.
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Ranges written by in-image records (in order; they may overlap).
    pub fn in_image_ranges(&self) -> &[(u64, u64)] {
        &self.in_image
    }

    /// Bytes written by in-image records: changes the log describes
    /// beyond its own length (the 50% rule counts them).
    pub fn in_image_bytes(&self) -> u64 {
        self.in_image_bytes
    }

    /// True when no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Number of records appended (also the seq of the last one).
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an earlier failure has made this writer unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Closes the log cleanly: fdatasync, write the close block, fdatasync
    /// again. Records are durable before the close block is written, so a
    /// valid close block always describes records that are on disk.
    /// A failed seal marks the log untrusted: the failed fdatasync's error
    /// is consumed, and a retry after a restart could succeed on pages the
    /// kernel dropped.
    pub fn seal(mut self) -> Result<SealedLog> {
        let sealed = self
            .cut_filler_ahead()
            .and_then(|()| self.sync())
            .and_then(|()| write_close_block(&self.file, &self.path, self.records, self.end, self.last_seq));
        if let Err(e) = sealed {
            self.mark_untrusted();
            return Err(e);
        }
        Ok(SealedLog { path: self.path, header: self.header, records: self.records, end_offset: self.end })
    }

    /// Gives the log up after a failure: its magic is overwritten (in place,
    /// so no new space is needed) and synced, best effort, so a restart
    /// finds it unreadable and resyncs even if the VM's state did not say
    /// so yet. The writer is dropped.
    pub fn mark_untrusted(self) {
        let marked = self.file.write_all_at(UNTRUSTED_MAGIC, 0).and_then(|()| self.file.sync_data());
        if let Err(e) = marked {
            tracing::warn!(log = %self.path.display(), error = %e, "could not mark a failed change log untrusted");
        }
    }

    /// Cuts the filler written ahead: the file becomes exactly its records.
    /// The file's own length decides, not `capacity`: a filler write cut
    /// short (a full volume) may have left bytes past what was counted.
    fn cut_filler_ahead(&mut self) -> Result<()> {
        self.check_usable()?;
        let len = self.file.metadata().map(|m| m.len()).map_err(|e| self.io_err("stat", e));
        let len = self.poison_on_err(len)?;
        if len > self.end {
            let cut = self.file.set_len(self.end).map_err(|e| self.io_err("cutting the filler ahead", e));
            self.poison_on_err(cut)?;
            self.capacity = self.end;
            self.prepared = self.prepared.min(self.end);
        }
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(Error::Io {
                context: format!("HRL log {} is unusable after an earlier failure ({why})", self.path.display()),
                source: io::Error::other("log writer poisoned"),
                class: ErrorClass::NeedsResync,
            }),
        }
    }

    fn poison_on_err<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if self.poisoned.is_none() {
                self.poisoned = Some(e.to_string());
            }
        }
        r
    }

    /// A failed write or sync leaves a gap (or dropped dirty pages) in the
    /// log: retrying cannot help, the disk must be resynchronized.
    fn io_err(&self, what: &str, e: io::Error) -> Error {
        Error::Io {
            context: format!("{what} of HRL log {}", self.path.display()),
            source: e,
            class: ErrorClass::NeedsResync,
        }
    }
}

fn check_range(offset: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Err(Error::invalid("len", "a log record covers at least one byte"));
    }
    if offset.checked_add(len).is_none() {
        return Err(Error::invalid("offset", format!("range {offset}+{len} overflows u64")));
    }
    Ok(())
}

/// Writes every byte of `parts`, back to back, at file offset `at`: one
/// `pwritev` in the common case, continued after a short write.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], at: u64) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0usize;
    while done < total {
        // The parts still to write, the first one cut at `done`.
        let mut skip = done;
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            let rest = &p[skip..];
            skip = 0;
            iov.push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() });
        }
        let offset = libc::off_t::try_from(at + done as u64).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: every iovec points into a live slice of `parts` for its
        // length, and the descriptor is open for the call.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, offset) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
        }
        done += n as usize;
    }
    Ok(())
}

/// Writes a log's close block and fdatasyncs it; the records must be durable already.
fn write_close_block(file: &File, path: &Path, records: u64, end: u64, last_seq: u64) -> Result<()> {
    let block = CloseBlock { record_count: records, end_offset: end, last_record_seq: last_seq };
    let io_err = |what: &str, e| Error::Io {
        context: format!("{what} of HRL log {}", path.display()),
        source: e,
        class: ErrorClass::NeedsResync,
    };
    file.write_all_at(&block.encode(), CLOSE_BLOCK_OFFSET).map_err(|e| io_err("writing close block", e))?;
    file.sync_data().map_err(|e| io_err("fdatasync after close block", e))
}

/// Seals a log that a crashed daemon left open, as found: the torn tail cut
/// ([`super::recover`]), the records made durable, then the close block.
/// The caller has decided the log can be trusted (same boot, last of its
/// chain, only a torn tail after the records).
pub fn seal_found(path: &Path) -> Result<SealedLog> {
    let scan = super::reader::recover(path)?;
    let last_seq = scan.last_seq();
    if scan.clean {
        return Ok(SealedLog { path: path.into(), header: scan.header, records: last_seq, end_offset: scan.file_len });
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening HRL log {}", path.display()), e))?;
    file.sync_data().map_err(|e| Error::io(format!("fdatasync of HRL log {}", path.display()), e))?;
    write_close_block(&file, path, scan.records.len() as u64, scan.valid_len, last_seq)?;
    Ok(SealedLog { path: path.into(), header: scan.header, records: last_seq, end_offset: scan.valid_len })
}

/// Makes a created (or removed) directory entry durable.
pub(crate) fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("fsync of directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{read_payload, scan};
    use crate::error::ErrorKind;

    fn header() -> LogHeader {
        LogHeader::new("vm", "disk0", 1, 0, 1)
    }

    #[test]
    fn create_fails_on_an_existing_file_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img.00000001.hrl");
        std::fs::write(&path, b"precious").unwrap();
        let err = LogWriter::create(&path, &header()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn create_rejects_a_bad_header_without_making_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.hrl");
        let mut h = header();
        h.disk = "d".repeat(63);
        assert_eq!(LogWriter::create(&path, &h).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert!(!path.exists());
    }

    #[test]
    fn lengths_and_counts_follow_appends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        assert_eq!((w.len(), w.records(), w.is_empty()), (HEADER_SIZE, 0, true));
        w.append_write(0, &[1; 100]).unwrap();
        w.append_zero(4096, 1 << 30).unwrap();
        assert_eq!(w.records(), 2);
        assert_eq!(w.len(), HEADER_SIZE + 2 * RECORD_HEADER_SIZE + 100);
        // In the kernel as soon as appended: nothing waits in a user-space buffer.
        assert_eq!(scan(&path).unwrap().valid_len, w.len(), "in the kernel on return");
        let big = vec![7u8; (4 << 20) + 3];
        w.append_write(10, &[2; 10]).unwrap();
        w.append_write(1 << 20, &big).unwrap();
        assert_eq!(scan(&path).unwrap().valid_len, w.len(), "in the kernel on return");
        let sealed = w.seal().unwrap();
        assert_eq!(sealed.records, 4);
        let s = scan(&path).unwrap();
        assert!(s.clean);
        assert_eq!(s.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(s.file_len, sealed.end_offset);
    }

    #[test]
    fn a_batch_is_one_append_of_records_in_order_that_read_back_like_single_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.append_write(0, b"first").unwrap();
        let (a, b) = (vec![1u8; 4096], vec![2u8; 512]);
        let batch = [Record::write(8192, &a), Record::zero(0, 1 << 20), Record::write(8192, &b)];
        w.append_all(&batch).unwrap();
        assert_eq!(w.records(), 4);
        assert_eq!(w.len(), HEADER_SIZE + 4 * RECORD_HEADER_SIZE + 5 + 4096 + 512);
        assert_eq!(scan(&path).unwrap().valid_len, w.len(), "in the kernel on return");
        w.append_all(&[]).unwrap();
        assert_eq!(w.records(), 4, "an empty batch logs nothing");
        w.seal().unwrap();
        let s = scan(&path).unwrap();
        let got: Vec<_> = s.records.iter().map(|r| (r.seq, r.kind, r.offset, r.len)).collect();
        assert_eq!(
            got,
            vec![
                (1, RecordKind::Write, 0, 5),
                (2, RecordKind::Write, 8192, 4096),
                (3, RecordKind::Zero, 0, 1 << 20),
                (4, RecordKind::Write, 8192, 512)
            ]
        );
        let f = File::open(&path).unwrap();
        assert_eq!(read_payload(&f, &s.records[1]).unwrap(), a);
        assert_eq!(read_payload(&f, &s.records[3]).unwrap(), b);
    }

    #[test]
    fn a_batch_with_one_bad_record_or_too_many_logs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::create(&dir.path().join("l.hrl"), &header()).unwrap();
        let bad = [Record::write(0, b"ok"), Record::zero(u64::MAX, 2)];
        assert_eq!(w.append_all(&bad).unwrap_err().kind(), ErrorKind::InvalidArgument);
        let many = vec![Record::write(0, b"x"); MAX_BATCH + 1];
        assert_eq!(w.append_all(&many).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!((w.records(), w.len(), w.is_poisoned()), (0, HEADER_SIZE, false));
        w.append_all(&many[..MAX_BATCH]).unwrap();
        assert_eq!(w.seal().unwrap().records, MAX_BATCH as u64);
    }

    #[test]
    fn bad_arguments_do_not_poison() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::create(&dir.path().join("l.hrl"), &header()).unwrap();
        assert_eq!(w.append_write(0, &[]).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(w.append_zero(u64::MAX, 2).unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert!(!w.is_poisoned());
        w.append_write(0, b"x").unwrap();
        assert_eq!(w.seal().unwrap().records, 1);
    }

    #[test]
    fn a_failed_write_poisons_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.append_write(0, b"kept").unwrap();
        w.sync().unwrap();
        // Swap in a read-only handle so the next write fails with EBADF.
        w.file = Arc::new(File::open(&path).unwrap());
        let err = w.append_write(8, b"lost").unwrap_err();
        assert_eq!(err.class(), ErrorClass::NeedsResync, "{err}");
        assert!(err.to_string().contains("l.hrl"), "error names the file: {err}");
        assert!(w.is_poisoned());
        // Even with a working file again, nothing more is accepted.
        w.file = Arc::new(OpenOptions::new().write(true).open(&path).unwrap());
        for err in [
            w.append_write(0, b"y").unwrap_err(),
            w.append_zero(0, 1).unwrap_err(),
            w.sync().unwrap_err(),
            w.sync_plan().unwrap_err(),
        ] {
            assert_eq!(err.class(), ErrorClass::NeedsResync);
            assert!(err.to_string().contains("unusable"), "{err}");
        }
        // Before the failed seal, the log on disk held only what was written.
        let s = scan(&path).unwrap();
        assert!(!s.clean);
        assert_eq!(s.records.len(), 1);
        // A failed seal gives the log up: a restart finds it unreadable.
        assert!(w.seal().is_err());
        assert!(scan(&path).unwrap_err().to_string().contains("bad magic"));
    }

    #[test]
    fn a_large_append_failure_poisons_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.file = Arc::new(File::open(&path).unwrap());
        assert!(w.append_write(0, &vec![1; 2 << 20]).is_err());
        assert_eq!(w.records(), 0);
        assert!(w.append_write(0, b"x").is_err());
    }

    #[test]
    fn a_sync_plan_is_data_only_once_a_full_sync_covered_the_filler_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        assert!(w.sync_plan().unwrap().data_only, "no records: nothing to write out");
        w.append_write(0, b"abc").unwrap();
        let file_len = std::fs::metadata(&path).unwrap().len();
        assert!(file_len >= w.len() + PREALLOC_MIN, "filler ahead of the records: {file_len} for {}", w.len());
        let plan = w.sync_plan().unwrap();
        assert_eq!(plan.file.as_raw_fd(), w.file.as_raw_fd(), "no descriptor is duplicated to sync");
        assert_eq!(plan.upto, w.len());
        assert!(!plan.data_only, "the filler was never synced: its allocation is not durable");
        plan.file.sync_data().unwrap();
        w.synced(&plan);
        w.append_write(10, b"def").unwrap();
        assert!(w.sync_plan().unwrap().data_only, "over prepared filler");
        // A record past the filler grows the file again.
        w.append_write(0, &vec![7; (w.capacity - w.end) as usize]).unwrap();
        let grown = w.sync_plan().unwrap();
        assert!(!grown.data_only);
        w.sync().unwrap();
        assert!(w.sync_plan().unwrap().data_only, "a full sync prepares everything written ahead");
        // A plan of another log prepares nothing here.
        let mut other = LogWriter::create(&dir.path().join("o.hrl"), &header()).unwrap();
        other.append_write(0, b"x").unwrap();
        let foreign = w.sync_plan().unwrap();
        other.synced(&foreign);
        assert!(!other.sync_plan().unwrap().data_only);
        // The scan of the open log ends at the filler: every record.
        let s = scan(&path).unwrap();
        assert_eq!((s.records.len(), s.valid_len, s.tail.clone()), (3, w.len(), crate::changelog::Tail::Filler));
        // A seal cuts the filler: the sealed log is exactly its records.
        let sealed = w.seal().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), sealed.end_offset);
        let s = scan(&path).unwrap();
        assert!(s.clean && s.records.len() == 3 && s.file_len == sealed.end_offset);
    }

    #[test]
    fn a_stream_that_outruns_the_filler_between_syncs_writes_none_until_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        let mib = vec![3u8; 1 << 20];
        for i in 0..2 * PREALLOC_STEP_MAX / (1 << 20) {
            w.append_write(i << 20, &mib).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), w.len(), "no filler once the records outran a step");
        assert!(w.len() - HEADER_SIZE > PREALLOC_STEP_MAX + PREALLOC_MIN);
        w.sync().unwrap();
        w.append_write(0, b"abc").unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() >= w.len() + PREALLOC_MIN, "filler again after a sync");
        let s = scan(&path).unwrap();
        assert_eq!(
            (s.records.len(), s.tail),
            (2 * PREALLOC_STEP_MAX as usize / (1 << 20) + 1, crate::changelog::Tail::Filler)
        );
    }

    #[test]
    fn flushes_written_out_over_prepared_filler_keep_the_filler_coming() {
        // The one-flush path carries out data-only plans: each counts as a
        // sync, so small appends between them keep landing over filler.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        let chunk = vec![5u8; 512 << 10];
        let rounds = 4 * PREALLOC_STEP_MAX / chunk.len() as u64;
        let mut data_only = 0;
        for i in 0..rounds {
            w.append_write(i * chunk.len() as u64, &chunk).unwrap();
            let plan = w.sync_plan().unwrap();
            if plan.data_only {
                data_only += 1;
                plan.file.sync_data().unwrap(); // stands in for the shared device flush
                w.written_out(&plan);
            } else {
                plan.file.sync_data().unwrap();
                w.synced(&plan);
            }
        }
        assert!(data_only >= rounds - rounds / 4, "{data_only} of {rounds} syncs over prepared filler");
        // A full sync's plan taken as data-only marks nothing prepared.
        w.append_write(0, &vec![1; (w.capacity - w.end + 1) as usize]).unwrap();
        let grown = w.sync_plan().unwrap();
        assert!(!grown.data_only);
        w.written_out(&grown);
        assert!(!w.sync_plan().unwrap().data_only, "written out is not a full sync");
    }

    #[test]
    fn a_seal_cuts_filler_left_past_the_counted_capacity_by_a_write_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        crate::failpoint::arm("log.filler", &path, 1, libc::ENOSPC);
        w.append_write(0, b"only").unwrap();
        crate::failpoint::disarm(&path);
        assert_eq!(w.capacity, w.end, "no filler counted");
        // What a filler write cut short by a full volume leaves: some filler past it.
        let part = crate::changelog::format::filler_bytes(w.header.log_id, w.end, 1000);
        w.file.write_all_at(&part, w.end).unwrap();
        let sealed = w.seal().unwrap();
        let s = scan(&path).unwrap();
        assert!(s.clean && s.records.len() == 1 && s.file_len == sealed.end_offset, "{s:?}");
    }

    #[test]
    fn an_append_cut_short_leaves_no_gap_before_the_filler() {
        // A kill after the filler was written but before the records landed
        // left zeros (a hole) then filler: a damaged log and a resync. The
        // filler now follows the records; an append that fails leaves the
        // log as it was.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        crate::failpoint::arm("log.append", &path, 1, libc::EIO);
        assert!(w.append_write(0, b"lost").is_err());
        crate::failpoint::disarm(&path);
        let s = scan(&path).unwrap();
        assert!(s.records.is_empty() && matches!(s.tail, crate::changelog::Tail::None), "{s:?}");
        // The same past the filler of a log with records.
        let mut w = LogWriter::create(&dir.path().join("m.hrl"), &header()).unwrap();
        w.append_write(0, b"kept").unwrap();
        let room = w.capacity - w.end;
        crate::failpoint::arm("log.append", w.path(), 1, libc::EIO);
        assert!(w.append_write(0, &vec![1u8; room as usize + 1]).is_err());
        crate::failpoint::disarm(w.path());
        let s = scan(w.path()).unwrap();
        assert_eq!((s.records.len(), s.tail), (1, crate::changelog::Tail::Filler));
    }

    #[test]
    fn filler_that_cannot_be_written_leaves_appends_growing_the_file_and_never_covers_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        crate::failpoint::arm("log.filler", &path, 1, libc::ENOSPC);
        w.append_write(0, b"first").unwrap();
        crate::failpoint::disarm(&path);
        assert!(!w.is_poisoned(), "filler is best effort");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), w.len(), "no filler: the append grew the file");
        assert!(!w.sync_plan().unwrap().data_only);
        // The next append that needs room writes filler after itself, never over a record.
        w.append_write(8, &[3u8; 4000]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > w.len());
        w.append_write(16, b"third").unwrap();
        let s = scan(&path).unwrap();
        assert_eq!((s.records.len(), s.valid_len, s.tail), (3, w.len(), crate::changelog::Tail::Filler));
        let file = File::open(&path).unwrap();
        assert_eq!(read_payload(&file, &s.records[0]).unwrap(), b"first");
        assert_eq!(read_payload(&file, &s.records[1]).unwrap(), vec![3u8; 4000]);
    }

    #[test]
    fn a_log_given_up_after_a_failure_reads_as_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.append_write(0, b"abc").unwrap();
        w.mark_untrusted();
        let err = scan(&path).unwrap_err().to_string();
        assert!(err.contains("bad magic"), "{err}");
    }

    #[test]
    fn a_log_left_open_by_a_crash_is_sealed_as_found_with_its_torn_tail_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.append_write(0, b"one").unwrap();
        w.append_zero(4096, 8192).unwrap();
        let whole = w.len();
        w.append_write(100, &[9u8; 500]).unwrap();
        drop(w); // the daemon died: no seal
                 // The last record was cut short by the kill.
        OpenOptions::new().write(true).open(&path).unwrap().set_len(whole + 200).unwrap();
        let sealed = seal_found(&path).unwrap();
        assert_eq!((sealed.records, sealed.end_offset), (2, whole));
        let s = scan(&path).unwrap();
        assert!(s.clean, "sealed as found");
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.file_len, whole);
        // Sealing again is a no-op.
        assert_eq!(seal_found(&path).unwrap(), sealed);
    }
}
