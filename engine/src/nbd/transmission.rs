//! The transmission phase: per connection a reader parses and validates
//! requests and hands each to the device (see Pipelining in the module
//! header of [`crate::nbd`]); a writer sends the replies in completion
//! order. Every reply holds the permits of its request until it is
//! written, so what a connection can hold is bounded even when its client
//! stops reading.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::handshake::{read_exact, read_exact_or_eof, Export};
use super::proto::{self, Request};
use super::reply::{Body, Permits, Reply};
use super::server::Shared;
use super::{BlockDevice, Extent, Zeroing};
use crate::{Error, Result};

/// Writes up to this size run on the connection's task: a page-cache write
/// and a buffered log append take microseconds, less than the two thread
/// handoffs of the blocking pool. Reads (which may wait for the disk),
/// flushes (fsync) and large requests go to the blocking pool.
pub const INLINE_WRITE_MAX: usize = 256 << 10;
/// Most extents in one BLOCK_STATUS reply. The spec asks for at most 2^20;
/// 16384 keeps a reply at 128 KiB, and clients ask again for the rest.
pub const MAX_EXTENTS: usize = 16384;
/// Buffer bytes a BLOCK_STATUS holds (its reply, at most).
const BLOCK_STATUS_BYTES: u32 = (4 + 8 * MAX_EXTENTS) as u32;
/// Piece size for discarding data we do not keep (rejected WRITE payloads).
const DISCARD_CHUNK: usize = 64 << 10;

/// What one connection's reader and jobs need.
struct Conn {
    device: Arc<dyn BlockDevice>,
    size: u64,
    structured: bool,
    /// The id of `base:allocation`, if selected: BLOCK_STATUS is allowed.
    allocation: Option<u32>,
    shared: Arc<Shared>,
    /// This connection's requests in flight.
    requests: Arc<Semaphore>,
    /// This connection's buffer bytes in flight.
    bytes: Arc<Semaphore>,
}

/// What a request asks the device to do, once validated.
enum Job {
    Read { offset: u64, len: u32, df: bool },
    Write { offset: u64, data: Vec<u8>, fua: bool },
    WriteZeroes { offset: u64, len: u64, how: Zeroing },
    Trim { offset: u64, len: u64, fua: bool },
    Flush,
    BlockStatus { offset: u64, len: u32, one: bool, context: u32 },
}

/// Why the reader stopped.
enum ReaderEnd {
    /// DISC, EOF between requests, shutdown drained, idle, or the writer failed.
    Clean,
    Failed(Error),
}

/// The transmission phase: a reader (this task) and a writer run side by
/// side; device calls run on blocking threads in between.
pub(super) async fn transmit<S>(stream: S, export: Export, shared: Arc<Shared>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let rd = BufReader::with_capacity(256 << 10, rd);
    let conn = Arc::new(Conn {
        device: export.device.clone(),
        size: export.size,
        structured: export.structured,
        allocation: export.allocation,
        requests: Arc::new(Semaphore::new(shared.limits.requests_per_connection)),
        bytes: Arc::new(Semaphore::new(shared.limits.buffer_bytes_per_connection)),
        shared,
    });
    // Unbounded is fine: every message holds a permit of the bounded semaphores.
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_failed = CancellationToken::new();

    let reader = read_requests(rd, &conn, tx, writer_failed.clone());
    let writer = write_replies(wr, rx, writer_failed, conn.structured);
    let (read_end, written) = tokio::join!(reader, writer);
    debug!(export = %export.name, "nbd: transmission ended");
    match (read_end, written) {
        (ReaderEnd::Failed(e), _) => Err(e),
        (ReaderEnd::Clean, Err(e)) => Err(Error::io("nbd: send reply", e)),
        (ReaderEnd::Clean, Ok(())) => Ok(()),
    }
}

/// What woke the reader between requests.
enum Wake {
    Request,
    Eof,
    Shutdown,
    Drained,
    Idle,
    Stop,
    Failed(io::Error),
}

async fn read_requests<R>(
    mut rd: BufReader<R>,
    conn: &Arc<Conn>,
    tx: mpsc::UnboundedSender<Reply>,
    writer_failed: CancellationToken,
) -> ReaderEnd
where
    R: AsyncRead + Unpin,
{
    let shutdown = conn.shared.shutdown.clone();
    let mut shutting = false;
    let mut seen_request = false;
    let idle = tokio::time::sleep(conn.shared.limits.idle_timeout);
    tokio::pin!(idle);
    let all_permits = conn.shared.limits.requests_per_connection as u32;
    loop {
        // Wait, consuming nothing, until a request starts to arrive (or
        // something else happens): a request is then read whole, never
        // dropped half-read.
        let wake = tokio::select! {
            biased;
            _ = writer_failed.cancelled() => Wake::Stop,
            _ = shutdown.cancelled(), if !shutting => Wake::Shutdown,
            ready = rd.fill_buf() => match ready {
                Ok([]) => Wake::Eof,
                Ok(_) => Wake::Request,
                Err(e) => Wake::Failed(e),
            },
            // Every request answered (its permit back): nothing left to serve.
            _ = conn.requests.acquire_many(all_permits), if shutting => Wake::Drained,
            _ = &mut idle, if !seen_request => Wake::Idle,
        };
        match wake {
            Wake::Request => {}
            Wake::Eof => {
                debug!("nbd: client closed the connection without DISC");
                return ReaderEnd::Clean;
            }
            Wake::Shutdown => {
                debug!("nbd: shutdown: requests from now on get ESHUTDOWN");
                shutting = true;
                continue;
            }
            Wake::Drained => {
                debug!("nbd: shutdown: every request answered, closing");
                return ReaderEnd::Clean;
            }
            Wake::Idle => {
                let idle = conn.shared.limits.idle_timeout;
                info!(?idle, "nbd: no request since the handshake, closing the idle connection");
                return ReaderEnd::Clean;
            }
            Wake::Stop => return ReaderEnd::Clean,
            Wake::Failed(e) => return ReaderEnd::Failed(Error::io("nbd: read", e)),
        }
        seen_request = true;
        if !shutting && buffered_writes(&mut rd, conn, &tx) > 0 {
            continue;
        }
        match read_request(&mut rd, conn).await {
            Ok(Some(Next::Disconnect)) => {
                debug!("nbd: DISC, finishing in-flight requests");
                return ReaderEnd::Clean;
            }
            Ok(Some(Next::Reply(reply))) => {
                let _ = tx.send(reply);
            }
            Ok(Some(Next::Run { handle, job, permits })) => dispatch(conn, handle, job, permits, &tx),
            Ok(None) => {
                debug!("nbd: client closed the connection without DISC");
                return ReaderEnd::Clean;
            }
            Err(e) => return ReaderEnd::Failed(e),
        }
    }
}

/// Serves the plain WRITEs (no flags, at most [`INLINE_WRITE_MAX`]) that
/// sit whole in the read buffer, in the order they came, as one batch:
/// straight from the buffer (no copy), with one log append
/// ([`BlockDevice::write_many`]), on this task. Returns how many it
/// served (and consumed); 0 leaves the buffer as it was, for
/// [`read_request`]. Anything else stops the batch there, so requests are
/// still handed to the device in the order they arrived; so does a full
/// request bound (each reply holds a request permit, as elsewhere; no
/// buffer permit is needed: the payloads are the read buffer's own bytes,
/// consumed before the replies go out).
fn buffered_writes<R>(rd: &mut BufReader<R>, conn: &Conn, tx: &mpsc::UnboundedSender<Reply>) -> usize
where
    R: AsyncRead + Unpin,
{
    let buf = rd.buffer();
    let mut at = 0;
    let mut batch: Vec<(u64, u64, std::ops::Range<usize>, tokio::sync::OwnedSemaphorePermit)> = Vec::new();
    while batch.len() < MAX_BATCH {
        let Some(header) = buf.get(at..at + proto::REQUEST_LEN) else { break };
        let Some(req) = Request::parse(header.try_into().expect("REQUEST_LEN bytes")) else { break };
        let plain = req.command == proto::CMD_WRITE && req.flags == 0 && req.len > 0;
        if !plain || req.len as usize > INLINE_WRITE_MAX {
            break;
        }
        let payload = at + proto::REQUEST_LEN..at + proto::REQUEST_LEN + req.len as usize;
        if payload.end > buf.len() || !matches!(validate(&req, conn), Ok(Some(Job::Write { .. }))) {
            break; // not all here yet, or to be rejected by read_request
        }
        let Ok(permit) = conn.requests.clone().try_acquire_owned() else { break };
        at = payload.end;
        batch.push((req.handle, req.offset, payload, permit));
    }
    if batch.is_empty() {
        return 0;
    }
    let writes: Vec<(u64, &[u8])> = batch.iter().map(|(_, offset, r, _)| (*offset, &buf[r.clone()])).collect();
    let results = std::panic::catch_unwind(AssertUnwindSafe(|| conn.device.write_many(&writes)))
        .ok()
        .filter(|r| r.len() == writes.len())
        .unwrap_or_else(|| {
            warn!("nbd: block device panicked on a batch of writes, replying EIO");
            writes.iter().map(|_| Err(Error::Internal("the block device failed".into()))).collect()
        });
    let served = batch.len();
    for ((handle, _, _, permit), result) in batch.into_iter().zip(results) {
        let permits = Permits { _request: permit, _bytes: None, _server_bytes: None };
        let _ = tx.send(Reply { handle, body: answer(handle, "write", result, false), _permits: permits });
    }
    rd.consume(at);
    served
}

/// Most WRITEs served as one batch by [`buffered_writes`].
const MAX_BATCH: usize = 64;

/// What the reader does with one request.
enum Next {
    Disconnect,
    /// Answered without the device (rejected, CACHE, shutdown).
    Reply(Reply),
    Run {
        handle: u64,
        job: Job,
        permits: Permits,
    },
}

/// A request turned down before it reaches the device.
struct Rejection {
    error: u32,
    message: String,
}

fn reject(error: u32, message: impl Into<String>) -> Rejection {
    Rejection { error, message: message.into() }
}

/// Reads one request (and a WRITE's payload) and validates it. `Ok(None)`
/// at a clean end of stream.
async fn read_request<R>(rd: &mut R, conn: &Conn) -> Result<Option<Next>>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; proto::REQUEST_LEN];
    if !whole(conn, "header", read_exact_or_eof(rd, &mut header)).await? {
        return Ok(None);
    }
    let Some(req) = Request::parse(&header) else {
        let magic = proto::be_u32(&header[0..4]);
        warn!(magic = format_args!("{magic:#x}"), "nbd: bad request magic, closing");
        return Err(Error::invalid("nbd request", format!("bad magic {magic:#x}")));
    };
    if req.command == proto::CMD_DISC {
        return Ok(Some(Next::Disconnect));
    }

    let request_permit = conn.requests.clone().acquire_owned().await.map_err(closed_semaphore)?;
    let answer = |body: Body, request_permit| {
        let permits = Permits { _request: request_permit, _bytes: None, _server_bytes: None };
        Next::Reply(Reply { handle: req.handle, body, _permits: permits })
    };
    let verdict = if conn.shared.shutdown.is_cancelled() {
        Err(reject(proto::ESHUTDOWN, "the server is shutting down"))
    } else {
        validate(&req, conn)
    };
    let job = match verdict {
        Ok(job) => job,
        Err(r) => {
            if req.command == proto::CMD_WRITE {
                // The payload follows whatever we think of the request: skip
                // it in bounded pieces so the next header is where we expect it.
                whole(conn, "WRITE payload", skip(rd, u64::from(req.len))).await?;
            }
            debug!(
                command = proto::command_name(req.command),
                handle = req.handle,
                offset = req.offset,
                len = req.len,
                flags = req.flags,
                error = r.error,
                reason = %r.message,
                "nbd: request rejected"
            );
            return Ok(Some(answer(Body::error(r.error, r.message), request_permit)));
        }
    };
    // CACHE: a hint to prefetch; the data is as close as it gets already.
    let Some(job) = job else {
        return Ok(Some(answer(Body::ok(), request_permit)));
    };

    // READ, WRITE and BLOCK_STATUS hold a buffer until their reply is out:
    // this connection's share first, then the server's.
    let buffered = match &job {
        Job::Read { len, .. } => *len,
        Job::Write { .. } => req.len,
        Job::BlockStatus { .. } => BLOCK_STATUS_BYTES,
        _ => 0,
    };
    let (bytes, server_bytes) = if buffered > 0 {
        let mine = conn.bytes.clone().acquire_many_owned(buffered).await.map_err(closed_semaphore)?;
        let server = conn.shared.buffer_bytes.clone().acquire_many_owned(buffered).await.map_err(closed_semaphore)?;
        (Some(mine), Some(server))
    } else {
        (None, None)
    };
    let permits = Permits { _request: request_permit, _bytes: bytes, _server_bytes: server_bytes };
    let job = match job {
        Job::Write { offset, fua, .. } => {
            let mut data = vec![0u8; req.len as usize];
            whole(conn, "WRITE payload", read_exact(rd, &mut data, "nbd: read WRITE payload")).await?;
            Job::Write { offset, data, fua }
        }
        other => other,
    };
    Ok(Some(Next::Run { handle: req.handle, job, permits }))
}

/// A request that has started to arrive must arrive whole within the idle
/// timeout: a client stalling mid-request would otherwise hold its
/// connection (and a WRITE's buffer) forever.
async fn whole<T>(conn: &Conn, what: &str, read: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let limit = conn.shared.limits.idle_timeout;
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        let e = io::Error::new(io::ErrorKind::TimedOut, format!("request {what} incomplete after {limit:?}"));
        Err(Error::io("nbd: read", e))
    })
}

fn closed_semaphore(_: tokio::sync::AcquireError) -> Error {
    Error::Internal("nbd: in-flight semaphore closed".to_string())
}

/// Checks command, flags, length and range. `Ok(None)`: answered at once
/// (CACHE). A WRITE's job carries no data yet (the reader fills it in).
fn validate(req: &Request, conn: &Conn) -> std::result::Result<Option<Job>, Rejection> {
    let name = proto::command_name(req.command);
    let allowed_flags = match req.command {
        // DF exists only with structured replies (a simple reply is never fragmented).
        proto::CMD_READ if conn.structured => proto::CMD_FLAG_FUA | proto::CMD_FLAG_DF,
        // FUA is valid on every command once negotiated (clients set it on
        // reads and flushes too); we ignore it where nothing is written.
        proto::CMD_READ | proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM | proto::CMD_CACHE => {
            proto::CMD_FLAG_FUA
        }
        proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
        proto::CMD_BLOCK_STATUS if conn.allocation.is_some() => proto::CMD_FLAG_FUA | proto::CMD_FLAG_REQ_ONE,
        proto::CMD_BLOCK_STATUS => {
            return Err(reject(proto::EINVAL, "BLOCK_STATUS needs a metadata context selected for this export"))
        }
        // RESIZE was never offered.
        other => return Err(reject(proto::EINVAL, format!("unknown command {other}"))),
    };
    if req.flags & !allowed_flags != 0 {
        let bad = req.flags & !allowed_flags;
        return Err(reject(proto::EINVAL, format!("flags {bad:#x} are not valid on {name}")));
    }
    let flag = |f: u16| req.flags & f != 0;
    let (offset, len) = (req.offset, u64::from(req.len));
    if req.command == proto::CMD_FLUSH {
        // Offset and length are reserved; nothing to check.
        return Ok(Some(Job::Flush));
    }
    if matches!(req.command, proto::CMD_READ | proto::CMD_WRITE) && req.len > proto::MAX_PAYLOAD {
        // A structured client may ask for more and be told it is too large.
        let error = if conn.structured && req.command == proto::CMD_READ { proto::EOVERFLOW } else { proto::EINVAL };
        return Err(reject(error, format!("{name} of {len} bytes is over the {} byte limit", proto::MAX_PAYLOAD)));
    }
    let end = offset.checked_add(len);
    if end.is_none_or(|end| end > conn.size) {
        // The spec (and qemu-nbd) answer writes past the end with ENOSPC.
        let writes = matches!(req.command, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES);
        let error = if writes && end.is_some() { proto::ENOSPC } else { proto::EINVAL };
        let size = conn.size;
        return Err(reject(error, format!("{name} of {len} bytes at {offset} goes past the end ({size} bytes)")));
    }
    Ok(Some(match req.command {
        proto::CMD_READ => Job::Read { offset, len: req.len, df: flag(proto::CMD_FLAG_DF) },
        proto::CMD_WRITE => Job::Write { offset, data: Vec::new(), fua: flag(proto::CMD_FLAG_FUA) },
        proto::CMD_TRIM => Job::Trim { offset, len, fua: flag(proto::CMD_FLAG_FUA) },
        proto::CMD_WRITE_ZEROES => {
            let how = Zeroing {
                fua: flag(proto::CMD_FLAG_FUA),
                keep_allocated: flag(proto::CMD_FLAG_NO_HOLE),
                fast_only: flag(proto::CMD_FLAG_FAST_ZERO),
            };
            Job::WriteZeroes { offset, len, how }
        }
        proto::CMD_BLOCK_STATUS => {
            if len == 0 {
                return Err(reject(proto::EINVAL, "BLOCK_STATUS of 0 bytes"));
            }
            let context = conn.allocation.expect("checked with the flags");
            Job::BlockStatus { offset, len: req.len, one: flag(proto::CMD_FLAG_REQ_ONE), context }
        }
        _ => return Ok(None), // CACHE
    }))
}

/// Reads and drops `len` bytes in bounded pieces.
async fn skip<R>(rd: &mut R, len: u64) -> Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut left = len;
    let mut buf = vec![0u8; DISCARD_CHUNK.min(len as usize)];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        read_exact(rd, &mut buf[..n], "nbd: skip WRITE payload").await?;
        left -= n as u64;
    }
    Ok(())
}

/// Runs a job, small writes inline and the rest on the blocking pool
/// under the server-wide device-call bound; the reply goes to the writer.
fn dispatch(conn: &Arc<Conn>, handle: u64, job: Job, permits: Permits, tx: &mpsc::UnboundedSender<Reply>) {
    if matches!(&job, Job::Write { data, fua: false, .. } if data.len() <= INLINE_WRITE_MAX) {
        let body = run_guarded(&*conn.device, handle, job);
        let _ = tx.send(Reply { handle, body, _permits: permits });
        return;
    }
    let conn = Arc::clone(conn);
    let tx = tx.clone();
    tokio::spawn(async move {
        let device_calls = conn.shared.device_calls.clone();
        let body = tokio::select! {
            biased;
            // Still waiting for the device at shutdown: say so rather than run.
            _ = conn.shared.shutdown.cancelled() => Body::error(proto::ESHUTDOWN, "the server is shutting down"),
            permit = device_calls.acquire_owned() => match permit {
                Ok(permit) => {
                    let device = Arc::clone(&conn.device);
                    let call = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        run_guarded(&*device, handle, job)
                    });
                    call.await.unwrap_or_else(|_| Body::error(proto::EIO, "the device call was lost"))
                }
                Err(_) => Body::error(proto::EIO, "the device-call semaphore is closed"),
            },
        };
        // The writer is gone only if the client is: nobody to tell.
        let _ = tx.send(Reply { handle, body, _permits: permits });
    });
}

/// [`run`], answering EIO if the device panics (or the client would wait forever).
fn run_guarded(device: &dyn BlockDevice, handle: u64, job: Job) -> Body {
    std::panic::catch_unwind(AssertUnwindSafe(|| run(device, handle, job))).unwrap_or_else(|_| {
        warn!(handle, "nbd: block device panicked, replying EIO");
        Body::error(proto::EIO, "the block device failed")
    })
}

/// Calls the device and says what to answer.
fn run(device: &dyn BlockDevice, handle: u64, job: Job) -> Body {
    let (what, result, fast_zero) = match job {
        Job::Read { offset, len, df } => {
            let mut data = vec![0u8; len as usize];
            match device.read_at(offset, &mut data) {
                Ok(()) => return Body::Read { offset, data, df },
                Err(e) => ("read", Err(e), false),
            }
        }
        Job::Write { offset, data, fua } => ("write", device.write_at(offset, &data, fua), false),
        Job::WriteZeroes { offset, len, how } => ("write_zeroes", device.write_zeroes(offset, len, how), how.fast_only),
        Job::Trim { offset, len, fua } => ("trim", device.trim(offset, len, fua), false),
        Job::Flush => ("flush", device.flush(), false),
        Job::BlockStatus { offset, len, one, context } => {
            let max = if one { 1 } else { MAX_EXTENTS };
            match device.block_status(offset, u64::from(len), max) {
                Ok(extents) => match tidy_extents(extents, u64::from(len), max) {
                    Some(extents) => return Body::BlockStatus { context, extents },
                    None => ("block_status", Err(Error::Internal("the device reported no extent".into())), false),
                },
                Err(e) => ("block_status", Err(e), false),
            }
        }
    };
    answer(handle, what, result, fast_zero)
}

/// The reply to a device call that returns nothing but success or an error.
fn answer(handle: u64, what: &str, result: Result<()>, fast_zero: bool) -> Body {
    match result {
        Ok(()) => Body::ok(),
        Err(e) if fast_zero && is_unsupported(&e) => {
            debug!(handle, "nbd: fast zero not possible here, ENOTSUP");
            Body::error(proto::ENOTSUP, "zeroing this range would be no faster than writing zeroes")
        }
        Err(e) => {
            let errno = errno_for(&e);
            warn!(handle, op = what, error = %e, errno, "nbd: device error");
            Body::error(errno, e.to_string())
        }
    }
}

/// What a device returned, made safe to send: empty extents dropped,
/// neighbours with the same flags merged, cut to `len` bytes and `max`
/// extents. `None` if nothing is left (every reply needs one extent).
fn tidy_extents(extents: Vec<Extent>, len: u64, max: usize) -> Option<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len {
            break;
        }
        let n = e.len.min(len - covered);
        if n == 0 {
            continue;
        }
        let full = out.len() >= max;
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.len += n,
            _ if full => break,
            _ => out.push(Extent { len: n, flags: e.flags }),
        }
        covered += n;
    }
    (!out.is_empty()).then_some(out)
}

fn is_unsupported(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. }
        if source.kind() == io::ErrorKind::Unsupported
            || matches!(source.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)))
}

/// Maps an engine error to the protocol's error values.
pub(crate) fn errno_for(e: &Error) -> u32 {
    match e {
        Error::Io { source, .. } => {
            let no_space = matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG))
                || matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge);
            if no_space {
                proto::ENOSPC
            } else {
                proto::EIO
            }
        }
        Error::InvalidArgument { .. } => proto::EINVAL,
        // A disk that takes no writes: its VM failed over.
        Error::WritesRefused(_) => proto::EPERM,
        _ => proto::EIO,
    }
}

/// Writes replies in the order they complete, flushing once per batch.
/// Ends when every sender (reader and jobs) is gone, then closes the write
/// side. On failure it tells the reader to stop.
async fn write_replies<W>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    failed: CancellationToken,
    structured: bool,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    let result = async {
        while let Some(reply) = rx.recv().await {
            reply.write_to(&mut w, structured).await?;
            while let Ok(reply) = rx.try_recv() {
                reply.write_to(&mut w, structured).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if let Err(e) = &result {
        debug!(error = %e, "nbd: cannot send replies, closing");
        failed.cancel();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(len: u64, flags: u32) -> Extent {
        Extent { len, flags }
    }

    #[test]
    fn extents_are_merged_cut_to_the_request_and_never_empty() {
        let z = proto::STATE_ZERO;
        assert_eq!(tidy_extents(vec![e(4, 0), e(0, z), e(4, 0), e(8, z)], 12, 10), Some(vec![e(8, 0), e(4, z)]));
        assert_eq!(tidy_extents(vec![e(100, z)], 10, 10), Some(vec![e(10, z)]), "never past the request");
        assert_eq!(tidy_extents(vec![e(1, 0), e(1, z), e(1, 0)], 3, 2), Some(vec![e(1, 0), e(1, z)]), "at most max");
        assert_eq!(tidy_extents(vec![e(0, 0)], 3, 2), None);
        assert_eq!(tidy_extents(vec![], 3, 2), None);
    }

    #[test]
    fn only_fast_zero_refusals_become_enotsup() {
        let unsupported = Error::io("zero", io::Error::from(io::ErrorKind::Unsupported));
        assert!(is_unsupported(&unsupported));
        assert!(is_unsupported(&Error::io("zero", io::Error::from_raw_os_error(libc::EOPNOTSUPP))));
        assert!(!is_unsupported(&Error::io("zero", io::Error::from_raw_os_error(libc::EIO))));
        assert_eq!(errno_for(&unsupported), proto::EIO, "outside FAST_ZERO the spec wants no ENOTSUP");
    }

    #[test]
    fn writes_to_a_failed_over_disk_are_eperm_as_on_a_read_only_export() {
        assert_eq!(errno_for(&Error::WritesRefused("failed over".into())), proto::EPERM);
        assert_eq!(errno_for(&Error::FailedPrecondition("no longer protected".into())), proto::EIO);
    }
}
