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
//! | file | what lives there |
//! | --- | --- |
//! | `server.rs` | accept loops, connection caps, one connection's life, shutdown grace |
//! | `handshake.rs` | option haggling, metadata contexts |
//! | `transmission.rs` | reading and validating requests, device calls, the reply writer |
//! | `reply.rs` | simple and structured replies on the wire (data/hole chunks, block status, errors) |
//! | `limits.rs` | [`NbdLimits`]: caps, timeouts, memory and device-call bounds |
//! | `proto.rs` | wire constants and fixed messages, pure |
//!
//! Handshake: the server sends `NBDMAGIC`, `IHAVEOPT` and the flags
//! `FIXED_NEWSTYLE | NO_ZEROES`; the client answers with its flags (unknown
//! bits close the connection) and haggles options:
//!
//! | option | answer |
//! | --- | --- |
//! | `EXPORT_NAME` | size + transmission flags, then transmission; unknown export, or one at its connection cap, closes (the option cannot carry an error) |
//! | `GO`, `INFO` | `NBD_REP_INFO` with `NBD_INFO_EXPORT` always, `NAME`, `DESCRIPTION` (when the catalog has one) and `BLOCK_SIZE` (min 1, preferred 4096, max 32 MiB) when asked, then `ACK`; `GO` enters transmission; unknown export gets `NBD_REP_ERR_UNKNOWN`, a `GO` to an export at its connection cap `NBD_REP_ERR_POLICY` |
//! | `LIST` | one `NBD_REP_SERVER` per export, then `ACK` |
//! | `STRUCTURED_REPLY` | `ACK`: from then on every reply is structured (data with it: `NBD_REP_ERR_INVALID`) |
//! | `LIST_META_CONTEXT` | `base:allocation` for no query, `base:` or `base:allocation`; nothing for other queries; `NBD_REP_ERR_INVALID` before `STRUCTURED_REPLY` or when malformed, `NBD_REP_ERR_UNKNOWN` for an unknown export |
//! | `SET_META_CONTEXT` | selects `base:allocation` (id 1) when asked by that name, for that export only; replaces the previous selection even when it fails; same errors as LIST |
//! | `ABORT` | `ACK`, then close |
//! | anything else (`STARTTLS`, `EXTENDED_HEADERS` ...) | data read and discarded, `NBD_REP_ERR_UNSUP` |
//!
//! Option data is capped at 64 KiB: a longer option gets
//! `NBD_REP_ERR_TOO_BIG` and the connection is closed, so a hostile length
//! never makes us allocate (or read) gigabytes. Extended headers (an
//! experimental extension of the spec) are not offered.
//!
//! Transmission flags: `HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
//! SEND_WRITE_ZEROES, SEND_FAST_ZERO, SEND_CACHE, CAN_MULTI_CONN`, and
//! `SEND_DF` once structured replies were negotiated. Commands:
//!
//! | command | what it does |
//! | --- | --- |
//! | `READ` | simple reply + data; structured: zero runs of 4 KiB blocks as `OFFSET_HOLE`, the rest as `OFFSET_DATA`, the last chunk `DONE`; with `DF` one `OFFSET_DATA` chunk |
//! | `WRITE` | the device's write path |
//! | `WRITE_ZEROES` | [`Zeroing`]: may punch a hole; `NO_HOLE` keeps the range allocated; `FAST_ZERO` fails at once with `ENOTSUP` (changing nothing) where zeroing would not be faster than writing |
//! | `TRIM` | zeroes the range (trimmed ranges read as zeroes, here and on the replica) |
//! | `FLUSH` | [`BlockDevice::flush`] |
//! | `BLOCK_STATUS` | with `base:allocation` selected: one `BLOCK_STATUS` chunk of extents (`HOLE`, `ZERO`), at most [`MAX_EXTENTS`], never past the request; `REQ_ONE`: one extent |
//! | `CACHE` | a no-op success |
//! | `DISC` | in-flight requests finish and reply, then the connection closes |
//!
//! `FUA` is accepted on every command and passed to the device for the
//! writing ones. Errors keep the connection usable: a range past the end or
//! overflowing gets `EINVAL` (`ENOSPC` for `WRITE`/`WRITE_ZEROES`, as the
//! spec and qemu-nbd say), a READ/WRITE over 32 MiB `EINVAL` (a structured
//! READ `EOVERFLOW`), an unknown command or a flag not valid for the command
//! (`DF` without structured replies, `BLOCK_STATUS` without a context)
//! `EINVAL`; a rejected WRITE's payload is still read (in bounded pieces) so
//! the stream stays framed. Device errors map to `ENOSPC` (ENOSPC, EDQUOT,
//! EFBIG), `EINVAL` (invalid argument) or `EIO`. With structured replies an
//! error is an `NBD_REPLY_TYPE_ERROR` chunk whose message says why (even for
//! a READ rejected up front: a READ never gets a simple reply then). A bad
//! request magic means the stream lost framing: the connection is closed.
//!
//! # Pipelining
//!
//! Per connection a reader parses requests and dispatches each: small
//! non-FUA writes run on the connection's task, the rest as a job on the
//! blocking pool (the [`BlockDevice`] calls block on file I/O). Plain
//! WRITEs that sit whole in the read buffer (a client's pipelined queue)
//! go to the device as one batch ([`BlockDevice::write_many`]: one log
//! append for all), straight from the buffer; the batch stops at the
//! first request of another kind, so the device still sees requests in
//! the order they arrived. Jobs send
//! their reply through a channel to the writer, which writes replies in
//! completion order (the chunks of one reply together), each carrying the
//! client's handle, and batches them into one flush when several are ready.
//! Many connections may use one export at once.
//!
//! # Limits
//!
//! A hostile or broken client must not hurt the other VMs' exports, so
//! everything it can hold is bounded ([`NbdLimits`], with defaults):
//!
//! - Connections: 256 at once (Unix and TCP together); one more is closed
//!   right after accept, before anything is read or allocated for it. 16
//!   per export in transmission.
//! - Time: 10 s from accept to transmission; a connection that entered
//!   transmission and sends no request for 5 minutes is closed (one that
//!   has sent a request is never closed for being quiet: a guest's disk
//!   may go hours without I/O).
//! - Memory: per connection 64 requests in flight and 128 MiB of
//!   READ/WRITE/BLOCK_STATUS buffers, 1 GiB of buffers server-wide. A
//!   request holds its permits until its reply is written, so memory stays
//!   bounded even when a client stops reading.
//! - Threads: 32 device calls at once server-wide (FLUSH included), so
//!   clients cannot fill tokio's blocking pool, which the engine's uploads
//!   and state commits also use; more wait their turn in arrival order.
//!
//! A client that holds its share of a server-wide bound (buffers, device
//! calls) slows the others down but cannot stop them: every permit comes
//! back when its reply is written.
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
//! When the server's `CancellationToken` fires, the accept loops stop. A
//! connection in the handshake answers its client's next options with
//! `NBD_REP_ERR_SHUTDOWN` (`ABORT` with `ACK`) and closes when the client
//! leaves or sends nothing for [`HANDSHAKE_SHUTDOWN_GRACE`]. A connection in
//! transmission lets the device calls already running finish and reply;
//! requests still waiting for a device call, and every request read from
//! then on, are answered `ESHUTDOWN` (a WRITE's payload is read and
//! dropped); once every request has its reply, the connection closes. A
//! client that does not read its replies gets [`SHUTDOWN_GRACE`] before the
//! connection is dropped.
//!
//! Inputs never cause a panic: every length is checked before use, and a
//! device that panics gets its request answered with `EIO`. The fuzz targets
//! in `fuzz/` drive [`NbdServer::serve_connection`] with arbitrary bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::{Error, Result};

mod handshake;
mod limits;
pub mod proto;
mod reply;
mod server;
mod transmission;

pub use limits::NbdLimits;
pub use server::{NbdServer, HANDSHAKE_SHUTDOWN_GRACE, MAX_OPTION_DATA, SHUTDOWN_GRACE};
pub use transmission::{INLINE_WRITE_MAX, MAX_EXTENTS};

#[cfg(test)]
mod tests;

/// A disk as the NBD server sees it. Methods are blocking (file I/O); the server
/// calls them from tokio::task::spawn_blocking, never on an async worker.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()>;
    /// `fua`: the write must be durable (log and disk) before returning.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> crate::Result<()>;
    /// Writes that arrived together, without FUA, each with its own result
    /// in order; a device may share work between them (one log append).
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<crate::Result<()>> {
        writes.iter().map(|&(offset, data)| self.write_at(offset, data, false)).collect()
    }
    /// Makes `[offset, offset + len)` read as zeroes, as `how` asks.
    fn write_zeroes(&self, offset: u64, len: u64, how: Zeroing) -> crate::Result<()>;
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()>;
    /// Everything acknowledged so far is durable when this returns.
    fn flush(&self) -> crate::Result<()>;
    /// What `[offset, offset + len)` holds, as consecutive extents starting
    /// at `offset` (flags [`proto::STATE_HOLE`], [`proto::STATE_ZERO`]).
    /// At most `max_extents`, each nonzero; they may stop short of
    /// `offset + len` (the client asks again for the rest), never past it.
    /// The server calls it with `len > 0` and a range inside the device.
    /// Default: one extent of data (flags 0), which is always true.
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> crate::Result<Vec<Extent>> {
        let _ = (offset, max_extents);
        Ok(vec![Extent { len, flags: 0 }])
    }
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

/// How a WRITE_ZEROES is to be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Zeroing {
    /// Durable (log and disk) before returning, as for a write.
    pub fua: bool,
    /// The range must stay allocated (NBD `NO_HOLE`): no hole punched, so
    /// later writes there cannot fail for want of space.
    pub keep_allocated: bool,
    /// NBD `FAST_ZERO`: if zeroing would be no faster than writing zeroes,
    /// change nothing and fail with an [`std::io::ErrorKind::Unsupported`]
    /// I/O error (the client then writes the zeroes itself).
    pub fast_only: bool,
}

/// A run of a device with one status, as `NBD_CMD_BLOCK_STATUS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run, nonzero.
    pub len: u64,
    /// [`proto::STATE_HOLE`] and/or [`proto::STATE_ZERO`], or 0 for data.
    pub flags: u32,
}

impl From<crate::capture::extents::Run> for Extent {
    /// A hole of a file reads as zeroes.
    fn from(run: crate::capture::extents::Run) -> Self {
        let flags = if run.hole { proto::STATE_HOLE | proto::STATE_ZERO } else { 0 };
        Extent { len: run.len, flags }
    }
}

/// Granularity at which [`MemDevice`] reports zero runs (and the server
/// sends holes in READ replies): the usual file-system block.
pub(crate) const ZERO_GRANULE: u64 = 4096;

/// Splits `data`, which sits at `offset` of the device, into runs of
/// all-zero and other granules of [`ZERO_GRANULE`] (aligned to device
/// offsets, so the first and last may be shorter), merging neighbours:
/// `(start in data, len, zero)`.
pub(crate) fn zero_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut at = 0usize;
    while at < data.len() {
        let into_granule = ((offset + at as u64) % ZERO_GRANULE) as usize;
        let n = (ZERO_GRANULE as usize - into_granule).min(data.len() - at);
        let zero = is_zero(&data[at..at + n]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += n,
            _ => runs.push((at, n, zero)),
        }
        at += n;
    }
    runs
}

fn is_zero(b: &[u8]) -> bool {
    const Z: [u8; 64] = [0; 64];
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c == Z) && chunks.remainder().iter().all(|&x| x == 0)
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
    /// The most writes one `write_many` call carried.
    largest_batch: AtomicU64,
}

impl MemDevice {
    /// A zero-filled disk of `size` bytes (allocated at once: keep it small).
    pub fn new(size: u64) -> Self {
        let size = usize::try_from(size).expect("MemDevice size fits in memory");
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemDevice {
            data: RwLock::new(bytes),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            largest_batch: AtomicU64::new(0),
        }
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

    /// The most writes a single [`BlockDevice::write_many`] call carried.
    pub fn largest_batch(&self) -> u64 {
        self.largest_batch.load(Ordering::SeqCst)
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

    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<Result<()>> {
        self.largest_batch.fetch_max(writes.len() as u64, Ordering::SeqCst);
        writes.iter().map(|&(offset, data)| self.write_at(offset, data, false)).collect()
    }

    /// Memory has no allocation to keep and zeroes at memory speed, so
    /// `keep_allocated` and `fast_only` are met as they come.
    fn write_zeroes(&self, offset: u64, len: u64, how: Zeroing) -> Result<()> {
        self.fill(offset, len, how.fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.fill(offset, len, fua)
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Zero runs of whole 4 KiB blocks are `STATE_ZERO` (never `HOLE`:
    /// memory has no allocation to report); the rest is data.
    fn block_status(&self, offset: u64, len: u64, max_extents: usize) -> Result<Vec<Extent>> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let r = self.range(data.len(), offset, len)?;
        let mut extents: Vec<Extent> = zero_runs(offset, &data[r])
            .into_iter()
            .map(|(_, n, zero)| Extent { len: n as u64, flags: if zero { proto::STATE_ZERO } else { 0 } })
            .collect();
        extents.truncate(max_extents.max(1));
        Ok(extents)
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
