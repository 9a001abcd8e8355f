//! NBD export: serves Ferry's disks to QEMU, qemu-io, qemu-img, nbdcopy, fio
//! and nbd-client over the Network Block Device protocol.
//!
//! # Overview
//!
//! [`NbdServer`] speaks the *fixed newstyle* protocol (`doc/proto.md` of
//! NetworkBlockDevice/nbd) on Unix sockets, TCP, or any byte stream
//! ([`NbdServer::serve_connection`], used by the tests over
//! `tokio::io::duplex`). Exports are named `<vm>/<disk>` and resolved through
//! an [`ExportCatalog`]; each one is a [`BlockDevice`], the engine's disk
//! write path (which appends to the change log before acknowledging).
//!
//! Handshake: the server sends `NBDMAGIC`, `IHAVEOPT` and the flags
//! `FIXED_NEWSTYLE | NO_ZEROES`; the client answers with its flags (unknown
//! bits close the connection) and haggles options:
//!
//! | option | answer |
//! | --- | --- |
//! | `EXPORT_NAME` | size + transmission flags, then transmission; unknown export closes (the option cannot carry an error) |
//! | `GO`, `INFO` | `NBD_REP_INFO` with `NBD_INFO_EXPORT` always, `NAME`, `DESCRIPTION` (when the catalog has one) and `BLOCK_SIZE` (min 1, preferred 4096, max 32 MiB) when asked, then `ACK`; `GO` enters transmission; unknown export gets `NBD_REP_ERR_UNKNOWN` |
//! | `LIST` | one `NBD_REP_SERVER` per export, then `ACK` |
//! | `ABORT` | `ACK`, then close |
//! | anything else (`STARTTLS`, `STRUCTURED_REPLY`, meta contexts, `EXTENDED_HEADERS` ...) | data read and discarded, `NBD_REP_ERR_UNSUP` |
//!
//! Option data is capped at 64 KiB: a longer option gets
//! `NBD_REP_ERR_TOO_BIG` and the connection is closed, so a hostile length
//! never makes us allocate (or read) gigabytes.
//!
//! Transmission uses simple replies only, with flags `HAS_FLAGS, SEND_FLUSH,
//! SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_CACHE, CAN_MULTI_CONN`.
//! Commands: `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`
//! accepted: we always write zeroes), `CACHE` (a no-op success), `DISC`
//! (in-flight requests finish and reply, then the connection closes). `FUA`
//! is accepted on every command and passed to the device for the writing
//! ones. Errors keep the connection usable: a range past the end or
//! overflowing gets `EINVAL` (`ENOSPC` for `WRITE`/`WRITE_ZEROES`, as the
//! spec and qemu-nbd say), a READ/WRITE over 32 MiB, an unknown command or a
//! flag not valid for the command gets `EINVAL`; a rejected WRITE's payload
//! is still read (in bounded pieces) so the stream stays framed. Device
//! errors map to `ENOSPC` (ENOSPC, EDQUOT, EFBIG), `EINVAL` (invalid
//! argument) or `EIO`. A bad request magic means the stream lost framing:
//! the connection is closed.
//!
//! # Pipelining
//!
//! Per connection a reader parses requests and hands each to its own
//! `spawn_blocking` job (the [`BlockDevice`] calls block on file I/O); jobs
//! send their reply through a channel to the writer, which writes replies in
//! completion order, each carrying the client's handle, and batches them
//! into one flush when several are ready. Requests in flight are bounded (64
//! per connection, and 128 MiB of READ/WRITE buffers), and a request holds
//! its permits until its reply is written, so memory stays bounded even
//! when a client stops reading. Many connections may use one export at once.
//!
//! # Consistency and durability
//!
//! A reply is sent only after the device call returned, so an acknowledged
//! WRITE/TRIM/WRITE_ZEROES is in the device's write path (the change log)
//! before the client hears of it. `FUA` is passed to the device, which makes
//! that write durable (log and disk) before returning. `FLUSH` calls
//! [`BlockDevice::flush`], which makes *everything* acknowledged so far
//! durable, whichever connection wrote it: that device-wide contract is what
//! lets us advertise `CAN_MULTI_CONN`. Requests in flight together are
//! unordered, as the protocol allows; a client that needs ordering waits
//! for the reply.
//!
//! # Cancellation
//!
//! When the server's `CancellationToken` fires, the accept loops stop,
//! connections still in the handshake are closed, and connections in
//! transmission stop reading new requests, let the ones in flight finish
//! and reply, then close. A client that does not read its replies gets
//! [`SHUTDOWN_GRACE`] before the connection is dropped.
//!
//! Inputs never cause a panic: every length is checked before use, and a
//! device that panics gets its request answered with `EIO`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::{Error, Result};

pub mod proto;
mod server;

pub use server::{NbdServer, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES, MAX_OPTION_DATA, SHUTDOWN_GRACE};

#[cfg(test)]
mod tests;

/// A disk as the NBD server sees it. Methods are blocking (file I/O); the server
/// calls them from tokio::task::spawn_blocking, never on an async worker.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()>;
    /// `fua`: the write must be durable (log and disk) before returning.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> crate::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()>;
    /// Everything acknowledged so far is durable when this returns.
    fn flush(&self) -> crate::Result<()>;
}

/// Resolves export names ("<vm>/<disk>") to devices.
pub trait ExportCatalog: Send + Sync + 'static {
    fn open(&self, name: &str) -> Option<std::sync::Arc<dyn BlockDevice>>;
    fn names(&self) -> Vec<String>;
    /// Optional one-line description for NBD_INFO_DESCRIPTION; default None.
    fn describe(&self, _name: &str) -> Option<String> {
        None
    }
}

/// A disk held in memory: for tests and the simulator. Trimmed ranges read
/// as zeroes. Durability is trivially met; `flush_count` lets a test check
/// that a flush reached the device.
pub struct MemDevice {
    /// The disk's bytes; a read-write lock so concurrent reads proceed.
    data: RwLock<Vec<u8>>,
    /// How many times `flush` was called.
    flushes: AtomicU64,
    /// How many writes (of any kind) carried FUA.
    fua_writes: AtomicU64,
}

impl MemDevice {
    /// A zero-filled disk of `size` bytes (allocated at once: keep it small).
    pub fn new(size: u64) -> Self {
        let size = usize::try_from(size).expect("MemDevice size fits in memory");
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemDevice { data: RwLock::new(bytes), flushes: AtomicU64::new(0), fua_writes: AtomicU64::new(0) }
    }

    /// A copy of the whole disk.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    pub fn fua_write_count(&self) -> u64 {
        self.fua_writes.load(Ordering::SeqCst)
    }

    /// The byte range `[offset, offset + len)` as indices, if it is inside the disk.
    fn range(&self, len_of_disk: usize, offset: u64, len: u64) -> Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= len_of_disk as u64)
            .ok_or_else(|| Error::invalid("offset", format!("range {offset}+{len} is past the end ({len_of_disk})")))?;
        Ok(offset as usize..end as usize)
    }

    fn fill(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let r = self.range(data.len(), offset, len)?;
        data[r].fill(0);
        self.count_fua(fua);
        Ok(())
    }

    fn count_fua(&self, fua: bool) {
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let r = self.range(data.len(), offset, buf.len() as u64)?;
        buf.copy_from_slice(&data[r]);
        Ok(())
    }

    fn write_at(&self, offset: u64, bytes: &[u8], fua: bool) -> Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let r = self.range(data.len(), offset, bytes.len() as u64)?;
        data[r].copy_from_slice(bytes);
        self.count_fua(fua);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.fill(offset, len, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.fill(offset, len, fua)
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A fixed set of exports in a map (name -> device), changeable at run time.
#[derive(Default)]
pub struct MapCatalog {
    /// The exports; a lock so exports can come and go while the server runs.
    exports: RwLock<HashMap<String, Arc<dyn BlockDevice>>>,
}

impl MapCatalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builder form of [`MapCatalog::insert`].
    pub fn with(self, name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        self.insert(name, device);
        self
    }

    /// Adds or replaces an export; connections already open keep their device.
    pub fn insert(&self, name: impl Into<String>, device: Arc<dyn BlockDevice>) {
        self.exports.write().unwrap_or_else(|e| e.into_inner()).insert(name.into(), device);
    }

    /// Removes an export from new connections; open ones keep it.
    pub fn remove(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.exports.write().unwrap_or_else(|e| e.into_inner()).remove(name)
    }
}

impl ExportCatalog for MapCatalog {
    fn open(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.exports.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// Sorted, so that `NBD_OPT_LIST` answers the same way every time.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exports.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }
}
