//! Appending records to the active log of a disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    encode_record_header, record_crc_seed, CloseBlock, LogHeader, RecordKind, CLOSE_BLOCK_OFFSET, HEADER_SIZE,
};
use crate::{Error, ErrorClass, Result};

/// Appends are gathered up to this many bytes before they go to the OS.
/// Larger payloads bypass the buffer.
pub const WRITE_BUFFER_SIZE: usize = 1 << 20;

/// The writer of one open log. Not thread safe by itself: the caller holds it
/// under a lock and may fdatasync a [`LogWriter::file_for_sync`] handle
/// outside that lock.
pub struct LogWriter {
    /// For error messages and the sealed result.
    path: PathBuf,
    file: File,
    header: LogHeader,
    /// Starting value of every record crc (ties records to this log).
    crc_seed: u32,
    /// Records not yet handed to the OS; they start at file offset `flushed`.
    buf: Vec<u8>,
    /// Bytes of the file handed to the OS (header included).
    flushed: u64,
    records: u64,
    last_seq: u64,
    /// Set by the first failed write or sync; the log has a gap (or pages
    /// the kernel may have dropped) after that point, so nothing more may be
    /// appended and the caller must resync.
    poisoned: Option<String>,
}

impl std::fmt::Debug for LogWriter {
    // Not derived: the buffer can hold a MiB of guest data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("flushed", &self.flushed)
            .field("buffered", &self.buf.len())
            .field("records", &self.records)
            .field("poisoned", &self.poisoned)
            .finish()
    }
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
        let file = match OpenOptions::new().read(true).write(true).create_new(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::AlreadyExists { what: "HRL log", name: path.display().to_string() })
            }
            Err(e) => return Err(Error::io(format!("creating HRL log {}", path.display()), e)),
        };
        let made = (|| {
            file.write_all_at(&bytes, 0).map_err(|e| Error::io(format!("writing header of {}", path.display()), e))?;
            file.sync_all().map_err(|e| Error::io(format!("fsync of {}", path.display()), e))?;
            sync_parent_dir(path)
        })();
        if let Err(e) = made {
            drop(file);
            // Best effort: a leftover header-only file would be an unclean,
            // empty log, which recovery handles anyway.
            let _ = std::fs::remove_file(path);
            let _ = sync_parent_dir(path);
            return Err(e);
        }
        Ok(LogWriter {
            path: path.to_path_buf(),
            file,
            header: header.clone(),
            crc_seed: record_crc_seed(header.log_id),
            buf: Vec::with_capacity(WRITE_BUFFER_SIZE),
            flushed: HEADER_SIZE,
            records: 0,
            last_seq: 0,
            poisoned: None,
        })
    }

    /// Logs a write of `data` at disk byte `offset`. Buffered: durable only
    /// after [`sync`](Self::sync) or [`seal`](Self::seal).
    pub fn append_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        check_range(offset, data.len() as u64)?;
        self.append(RecordKind::Write, offset, data.len() as u64, data)
    }

    /// Logs that `len` bytes at disk byte `offset` became zeros
    /// (WRITE_ZEROES or TRIM). Buffered like [`append_write`](Self::append_write).
    pub fn append_zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_usable()?;
        check_range(offset, len)?;
        self.append(RecordKind::Zero, offset, len, &[])
    }

    /// Hands buffered records to the OS (no fsync).
    pub fn flush(&mut self) -> Result<()> {
        self.check_usable()?;
        let r = self.write_out();
        self.poison_on_err(r)
    }

    /// Flush, then fdatasync: every record appended so far is durable. This is
    /// the durability point for an NBD FLUSH or FUA.
    pub fn sync(&mut self) -> Result<()> {
        self.flush()?;
        let r = self.file.sync_data().map_err(|e| self.io_err("fdatasync", e));
        self.poison_on_err(r)
    }

    /// A second handle on the log file, for group commit: call
    /// [`flush`](Self::flush) under the lock that guards the writer, then
    /// `sync_data()` on this handle outside it; that makes durable everything
    /// flushed before the call. A failed `sync_data()` on it must be treated
    /// like a failed [`sync`](Self::sync) (stop using the log, resync).
    pub fn file_for_sync(&self) -> Result<File> {
        self.check_usable()?;
        self.file.try_clone().map_err(|e| self.io_err("cloning file handle", e))
    }

    /// Total bytes of the log, header and buffered records included. This is
    /// what the 50%-of-disk space rule measures.
    pub fn len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
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

    /// Closes the log cleanly: flush, fdatasync, write the close block,
    /// fdatasync again. Records are durable before the close block is written,
    /// so a valid close block always describes records that are on disk.
    pub fn seal(mut self) -> Result<SealedLog> {
        self.sync()?;
        let block = CloseBlock { record_count: self.records, end_offset: self.flushed, last_record_seq: self.last_seq };
        self.file
            .write_all_at(&block.encode(), CLOSE_BLOCK_OFFSET)
            .map_err(|e| self.io_err("writing close block", e))?;
        self.file.sync_data().map_err(|e| self.io_err("fdatasync after close block", e))?;
        Ok(SealedLog { path: self.path, header: self.header, records: self.records, end_offset: self.flushed })
    }

    fn append(&mut self, kind: RecordKind, offset: u64, len: u64, payload: &[u8]) -> Result<()> {
        let seq = self.last_seq + 1;
        let hdr = encode_record_header(self.crc_seed, kind, seq, offset, len, payload);
        let r = self.push(&hdr, payload);
        self.poison_on_err(r)?;
        self.last_seq = seq;
        self.records += 1;
        Ok(())
    }

    fn push(&mut self, hdr: &[u8], payload: &[u8]) -> Result<()> {
        let need = hdr.len() + payload.len();
        if self.buf.len() + need > WRITE_BUFFER_SIZE {
            self.write_out()?;
        }
        if need > WRITE_BUFFER_SIZE {
            // Too big to buffer: straight to the file, in log order.
            self.pwrite(hdr)?;
            self.pwrite(payload)?;
        } else {
            self.buf.extend_from_slice(hdr);
            self.buf.extend_from_slice(payload);
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.pwrite(&buf);
        self.buf = buf;
        r?;
        self.buf.clear();
        Ok(())
    }

    /// Positional write at the end of what was handed to the OS, so the file
    /// cursor (shared with cloned handles) plays no part.
    fn pwrite(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, self.flushed).map_err(|e| self.io_err("appending records", e))?;
        self.flushed += bytes.len() as u64;
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
    use crate::changelog::{scan, RECORD_HEADER_SIZE};
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
        // Buffered: the file does not have the records yet.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_SIZE);
        w.flush().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), w.len());
        // A payload bigger than the buffer goes straight through, in order.
        let big = vec![7u8; WRITE_BUFFER_SIZE + 3];
        w.append_write(10, &[2; 10]).unwrap();
        w.append_write(1 << 20, &big).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), w.len());
        let sealed = w.seal().unwrap();
        assert_eq!(sealed.records, 4);
        let s = scan(&path).unwrap();
        assert!(s.clean);
        assert_eq!(s.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(s.file_len, sealed.end_offset);
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
        w.file = File::open(&path).unwrap();
        w.append_write(8, b"lost").unwrap(); // buffered: no I/O yet
        let err = w.flush().unwrap_err();
        assert_eq!(err.class(), ErrorClass::NeedsResync, "{err}");
        assert!(err.to_string().contains("l.hrl"), "error names the file: {err}");
        assert!(w.is_poisoned());
        // Even with a working file again, nothing more is accepted.
        w.file = OpenOptions::new().write(true).open(&path).unwrap();
        for err in [
            w.append_write(0, b"y").unwrap_err(),
            w.append_zero(0, 1).unwrap_err(),
            w.flush().unwrap_err(),
            w.sync().unwrap_err(),
            w.file_for_sync().unwrap_err(),
        ] {
            assert_eq!(err.class(), ErrorClass::NeedsResync);
            assert!(err.to_string().contains("unusable"), "{err}");
        }
        assert!(w.seal().is_err());
        // The log on disk is unclean and holds only what was synced.
        let s = scan(&path).unwrap();
        assert!(!s.clean);
        assert_eq!(s.records.len(), 1);
    }

    #[test]
    fn a_large_append_failure_poisons_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        w.file = File::open(&path).unwrap();
        assert!(w.append_write(0, &vec![1; WRITE_BUFFER_SIZE * 2]).is_err());
        assert_eq!(w.records(), 0);
        assert!(w.append_write(0, b"x").is_err());
    }

    #[test]
    fn group_commit_handle_makes_flushed_records_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.hrl");
        let mut w = LogWriter::create(&path, &header()).unwrap();
        let f = w.file_for_sync().unwrap();
        w.append_write(0, b"abc").unwrap();
        w.flush().unwrap();
        f.sync_data().unwrap();
        let s = scan(&path).unwrap();
        assert_eq!(s.records.len(), 1);
        assert!(!s.clean);
    }
}
