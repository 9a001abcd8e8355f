//! The NBD server: accept loops, handshake (option haggling) and the
//! pipelined transmission phase. The protocol summary and the durability
//! argument are in the module header of [`crate::nbd`].
//!
//! Longer than our other files (about 750 lines) on purpose: the handshake
//! and the transmission phase share the connection's state and its error
//! rules (what ends a connection, what gets an errno), and reading them in
//! one place is how a reviewer checks the server against the spec.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::proto::{self, Request};
use super::{BlockDevice, ExportCatalog};
use crate::{Error, Result};

/// Largest option data we read during the handshake. Names are at most 4096
/// bytes, so real clients stay far below; longer gets `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Requests in flight on one connection (queued on the device or waiting
/// for their reply to be written). The reader waits beyond that.
pub const MAX_IN_FLIGHT: usize = 64;
/// READ/WRITE buffer bytes in flight on one connection.
pub const MAX_IN_FLIGHT_BYTES: usize = 128 << 20;
/// After shutdown, how long a connection may take to write its last replies
/// (to a client that stopped reading) before it is dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Handshake flags we offer.
const HANDSHAKE_FLAGS: u16 = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;
/// Transmission flags of every export (none is read-only).
const TRANSMISSION_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_FUA
    | proto::FLAG_SEND_TRIM
    | proto::FLAG_SEND_WRITE_ZEROES
    | proto::FLAG_SEND_CACHE
    | proto::FLAG_CAN_MULTI_CONN;
/// Pause after a failed accept (out of descriptors) so we do not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Piece size for discarding data we do not keep (rejected WRITE payloads).
const DISCARD_CHUNK: usize = 64 << 10;

/// Serves the exports of a catalog over NBD until its token is cancelled.
/// Cheap to clone: clones share the catalog and the token.
#[derive(Clone)]
pub struct NbdServer {
    /// Where export names are resolved, at each handshake.
    catalog: Arc<dyn ExportCatalog>,
    /// Shutdown: stop accepting, drain in-flight requests, close.
    shutdown: CancellationToken,
}

impl NbdServer {
    pub fn new(catalog: Arc<dyn ExportCatalog>, shutdown: CancellationToken) -> Self {
        NbdServer { catalog, shutdown }
    }

    /// Accepts connections on a Unix socket until shutdown, then waits for
    /// its connections to finish.
    pub async fn serve_unix(&self, listener: tokio::net::UnixListener) -> Result<()> {
        let connections = TaskTracker::new();
        let result = loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => self.spawn_connection(&connections, stream, "unix".to_string()),
                Err(e) => {
                    if let Err(e) = self.accept_failed(e).await {
                        break Err(e);
                    }
                }
            }
        };
        connections.close();
        connections.wait().await;
        result
    }

    /// Accepts connections on TCP until shutdown, then waits for its
    /// connections to finish.
    pub async fn serve_tcp(&self, listener: tokio::net::TcpListener) -> Result<()> {
        let connections = TaskTracker::new();
        let result = loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Replies are small and latency-bound: do not let Nagle hold them.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "nbd: cannot set TCP_NODELAY");
                    }
                    self.spawn_connection(&connections, stream, peer.to_string());
                }
                Err(e) => {
                    if let Err(e) = self.accept_failed(e).await {
                        break Err(e);
                    }
                }
            }
        };
        connections.close();
        connections.wait().await;
        result
    }

    fn spawn_connection<S>(&self, connections: &TaskTracker, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let server = self.clone();
        connections.spawn(async move {
            debug!(%peer, "nbd: connection accepted");
            match server.serve_connection(stream).await {
                Ok(()) => debug!(%peer, "nbd: connection closed"),
                Err(e) => warn!(%peer, error = %e, "nbd: connection ended with an error"),
            }
        });
    }

    /// Transient accept failures (a client that went away, no descriptors
    /// left) are logged and retried; anything else ends the accept loop.
    async fn accept_failed(&self, e: io::Error) -> Result<()> {
        let transient = matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
        ) || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
        );
        if !transient {
            return Err(Error::io("nbd accept", e));
        }
        warn!(error = %e, "nbd: accept failed, retrying");
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
        }
        Ok(())
    }

    /// Serves one client on any byte stream: handshake, then transmission
    /// until the client disconnects or the server shuts down. `Ok` for a
    /// clean end (DISC, ABORT, EOF between messages, shutdown), `Err` for a
    /// protocol violation or an I/O failure; either way the stream is closed.
    pub async fn serve_connection<S>(&self, mut stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let export = tokio::select! {
            _ = self.shutdown.cancelled() => {
                debug!("nbd: shutdown during handshake, closing");
                return Ok(());
            }
            export = handshake(&mut stream, &*self.catalog) => export?,
        };
        let Some(export) = export else {
            return Ok(());
        };
        debug!(export = %export.name, size = export.size, "nbd: entering transmission");
        let shutdown = self.shutdown.clone();
        let transmission = transmit(stream, export, shutdown.clone());
        tokio::pin!(transmission);
        tokio::select! {
            result = &mut transmission => result,
            _ = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                warn!("nbd: connection still draining after shutdown grace, dropping it");
                Ok(())
            }
        }
    }
}

/// The export a handshake settled on.
struct Export {
    name: String,
    device: Arc<dyn BlockDevice>,
    /// Read once: the size is fixed for the whole session.
    size: u64,
}

/// Fixed newstyle handshake. `Ok(None)`: the client aborted or hung up.
async fn handshake<S>(stream: &mut S, catalog: &dyn ExportCatalog) -> Result<Option<Export>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&proto::greeting(HANDSHAKE_FLAGS)).await.map_err(|e| Error::io("nbd: send greeting", e))?;
    stream.flush().await.map_err(|e| Error::io("nbd: send greeting", e))?;

    let mut client_flags = [0u8; 4];
    if !read_exact_or_eof(stream, &mut client_flags).await? {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(client_flags);
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(Error::invalid("nbd client flags", format!("unknown bits in {client_flags:#x}")));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        if !read_exact_or_eof(stream, &mut header).await? {
            return Ok(None);
        }
        let header = proto::OptionHeader::parse(&header);
        if header.magic != proto::IHAVEOPT {
            return Err(Error::invalid("nbd option", format!("bad magic {:#x}", header.magic)));
        }
        let option = header.option;
        if header.len > MAX_OPTION_DATA {
            // We cannot answer EXPORT_NAME with an error, and skipping up to
            // 4 GiB for a client this far off the rails is not worth it.
            if option != proto::OPT_EXPORT_NAME {
                let msg = format!("option data of {} bytes exceeds {MAX_OPTION_DATA}", header.len);
                send_option_reply(stream, option, proto::REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            }
            return Err(Error::invalid("nbd option", format!("length {} too big", header.len)));
        }
        let mut data = vec![0u8; header.len as usize];
        read_exact(stream, &mut data, "nbd: read option data").await?;
        debug!(option, len = header.len, "nbd: option");

        match option {
            proto::OPT_EXPORT_NAME => {
                let name = String::from_utf8(data).map_err(|_| Error::invalid("nbd export name", "not UTF-8"))?;
                let Some(export) = open_export(catalog, &name) else {
                    // This option has no error reply: the spec says close.
                    warn!(export = %name, "nbd: EXPORT_NAME of an unknown export, closing");
                    return Err(Error::not_found("nbd export", name));
                };
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.size.to_be_bytes());
                reply.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                write_flush(stream, &reply, "nbd: send export info").await?;
                return Ok(Some(export));
            }
            proto::OPT_ABORT => {
                // The client may already be gone: a failed ACK is no error.
                let _ = send_option_reply(stream, option, proto::REP_ACK, &[]).await;
                let _ = stream.shutdown().await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_option_reply(stream, option, proto::REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                let mut out = Vec::new();
                for name in catalog.names() {
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name.as_bytes());
                    proto::put_option_reply(&mut out, option, proto::REP_SERVER, &entry);
                }
                proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
                write_flush(stream, &out, "nbd: send export list").await?;
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    send_option_reply(stream, option, proto::REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let Some(export) = open_export(catalog, &name) else {
                    debug!(export = %name, "nbd: unknown export");
                    let msg = format!("no export named {name:?}");
                    send_option_reply(stream, option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let out = info_replies(option, &export, &infos, catalog);
                write_flush(stream, &out, "nbd: send export info").await?;
                if option == proto::OPT_GO {
                    return Ok(Some(export));
                }
            }
            _ => {
                // STARTTLS, STRUCTURED_REPLY, meta contexts, EXTENDED_HEADERS,
                // and whatever comes later: the data was read, say no.
                debug!(option, "nbd: unsupported option");
                send_option_reply(stream, option, proto::REP_ERR_UNSUP, &[]).await?;
            }
        }
    }
}

fn open_export(catalog: &dyn ExportCatalog, name: &str) -> Option<Export> {
    let device = catalog.open(name)?;
    let size = device.size();
    Some(Export { name: name.to_string(), device, size })
}

/// Parses INFO/GO data: u32 name length, name, u16 count, count x u16.
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = proto::be_u32(data.get(0..4)?) as usize;
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(data.get(4..name_end)?).ok()?.to_string();
    let count = proto::be_u16(data.get(name_end..name_end + 2)?) as usize;
    let rest = data.get(name_end + 2..)?;
    if rest.len() != count * 2 {
        return None;
    }
    Some((name, rest.chunks_exact(2).map(proto::be_u16).collect()))
}

/// The NBD_REP_INFO replies for an export, then the final ACK.
fn info_replies(option: u32, export: &Export, infos: &[u16], catalog: &dyn ExportCatalog) -> Vec<u8> {
    let mut out = Vec::new();
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    proto::put_option_reply(&mut out, option, proto::REP_INFO, &info);
    for &requested in infos {
        let mut info = Vec::new();
        info.extend_from_slice(&requested.to_be_bytes());
        match requested {
            proto::INFO_NAME => info.extend_from_slice(export.name.as_bytes()),
            proto::INFO_DESCRIPTION => match catalog.describe(&export.name) {
                // Strings are at most 4096 bytes on the wire.
                Some(d) => info.extend_from_slice(truncate_utf8(&d, 4096).as_bytes()),
                None => continue,
            },
            proto::INFO_BLOCK_SIZE => {
                info.extend_from_slice(&proto::MIN_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&proto::PREFERRED_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
            }
            // EXPORT was sent already; unknown types are ignored, as the spec asks.
            _ => continue,
        }
        proto::put_option_reply(&mut out, option, proto::REP_INFO, &info);
    }
    proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
    out
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

async fn send_option_reply<S>(stream: &mut S, option: u32, reply_type: u32, data: &[u8]) -> Result<()>
where
    S: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(proto::OPTION_REPLY_HEADER_LEN + data.len());
    proto::put_option_reply(&mut out, option, reply_type, data);
    write_flush(stream, &out, "nbd: send option reply").await
}

async fn write_flush<S>(stream: &mut S, bytes: &[u8], context: &'static str) -> Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(bytes).await.map_err(|e| Error::io(context, e))?;
    stream.flush().await.map_err(|e| Error::io(context, e))
}

async fn read_exact<S>(stream: &mut S, buf: &mut [u8], context: &'static str) -> Result<()>
where
    S: AsyncRead + Unpin,
{
    stream.read_exact(buf).await.map(|_| ()).map_err(|e| Error::io(context, e))
}

/// Fills `buf`; `false` if the stream ended cleanly before its first byte,
/// an error if it ended in the middle.
async fn read_exact_or_eof<S>(stream: &mut S, buf: &mut [u8]) -> Result<bool>
where
    S: AsyncRead + Unpin,
{
    let mut filled = 0;
    while filled < buf.len() {
        let n = stream.read(&mut buf[filled..]).await.map_err(|e| Error::io("nbd: read", e))?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(Error::io(
                "nbd: read",
                io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-message"),
            ));
        }
        filled += n;
    }
    Ok(true)
}

/// A reply on its way to the writer.
struct Reply {
    handle: u64,
    /// Protocol error value; 0 for success.
    error: u32,
    /// READ data, sent after the header on success.
    data: Option<Vec<u8>>,
    /// Held until the reply is written, so the in-flight bounds also cover
    /// replies queued behind a slow client.
    _permits: Permits,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What a request asks the device to do, once validated.
enum Job {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Vec<u8>, fua: bool },
    WriteZeroes { offset: u64, len: u64, fua: bool },
    Trim { offset: u64, len: u64, fua: bool },
    Flush,
}

/// Why the reader stopped.
enum ReaderEnd {
    /// DISC, EOF between requests, shutdown, or the writer failed.
    Clean,
    Failed(Error),
}

/// The transmission phase: a reader (this task) and a writer run side by
/// side; device calls run on blocking threads in between.
async fn transmit<S>(stream: S, export: Export, shutdown: CancellationToken) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let rd = BufReader::with_capacity(256 << 10, rd);
    // Unbounded is fine: every message holds a permit of the bounded semaphores.
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_failed = CancellationToken::new();

    let reader = read_requests(rd, &export, tx, shutdown, writer_failed.clone());
    let writer = write_replies(wr, rx, writer_failed);
    let (read_end, written) = tokio::join!(reader, writer);
    debug!(export = %export.name, "nbd: transmission ended");
    match (read_end, written) {
        (ReaderEnd::Failed(e), _) => Err(e),
        (ReaderEnd::Clean, Err(e)) => Err(Error::io("nbd: send reply", e)),
        (ReaderEnd::Clean, Ok(())) => Ok(()),
    }
}

async fn read_requests<R>(
    mut rd: R,
    export: &Export,
    tx: mpsc::UnboundedSender<Reply>,
    shutdown: CancellationToken,
    writer_failed: CancellationToken,
) -> ReaderEnd
where
    R: AsyncRead + Unpin,
{
    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                debug!("nbd: shutdown, no new requests");
                return ReaderEnd::Clean;
            }
            _ = writer_failed.cancelled() => return ReaderEnd::Clean,
            next = read_request(&mut rd, export, &requests, &bytes) => next,
        };
        match next {
            Ok(Some(Next::Disconnect)) => {
                debug!("nbd: DISC, finishing in-flight requests");
                return ReaderEnd::Clean;
            }
            Ok(Some(Next::Reply(reply))) => {
                let _ = tx.send(reply);
            }
            Ok(Some(Next::Run { handle, job, permits })) => dispatch(&export.device, handle, job, permits, &tx),
            Ok(None) => {
                debug!("nbd: client closed the connection without DISC");
                return ReaderEnd::Clean;
            }
            Err(e) => return ReaderEnd::Failed(e),
        }
    }
}

/// What the reader does with one request.
enum Next {
    Disconnect,
    /// Answered without the device (rejected, or CACHE).
    Reply(Reply),
    Run {
        handle: u64,
        job: Job,
        permits: Permits,
    },
}

/// Reads one request (and a WRITE's payload) and validates it. `Ok(None)`
/// at a clean end of stream.
async fn read_request<R>(
    rd: &mut R,
    export: &Export,
    requests: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
) -> Result<Option<Next>>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; proto::REQUEST_LEN];
    if !read_exact_or_eof(rd, &mut header).await? {
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

    let request_permit = requests.clone().acquire_owned().await.map_err(closed_semaphore)?;
    // READ and WRITE hold a buffer of `len` bytes until their reply is out.
    let buffered = matches!(req.command, proto::CMD_READ | proto::CMD_WRITE) && req.len <= proto::MAX_PAYLOAD;
    let bytes_permit = if buffered && req.len > 0 {
        Some(bytes.clone().acquire_many_owned(req.len).await.map_err(closed_semaphore)?)
    } else {
        None
    };
    let permits = Permits { _request: request_permit, _bytes: bytes_permit };

    let verdict = validate(&req, export.size);
    let reject =
        |error: u32, permits: Permits| Next::Reply(Reply { handle: req.handle, error, data: None, _permits: permits });

    if req.command == proto::CMD_WRITE {
        // The payload follows whatever we think of the request: read it (or
        // skip it in bounded pieces) so the next header is where we expect it.
        if let Err(error) = verdict {
            skip(rd, u64::from(req.len)).await?;
            debug!(handle = req.handle, offset = req.offset, len = req.len, error, "nbd: WRITE rejected");
            return Ok(Some(reject(error, permits)));
        }
        let mut data = vec![0u8; req.len as usize];
        read_exact(rd, &mut data, "nbd: read WRITE payload").await?;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        return Ok(Some(Next::Run { handle: req.handle, job: Job::Write { offset: req.offset, data, fua }, permits }));
    }
    if let Err(error) = verdict {
        debug!(
            command = proto::command_name(req.command),
            handle = req.handle,
            offset = req.offset,
            len = req.len,
            flags = req.flags,
            error,
            "nbd: request rejected"
        );
        return Ok(Some(reject(error, permits)));
    }
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, u64::from(req.len));
    let job = match req.command {
        proto::CMD_READ => Job::Read { offset, len: req.len },
        proto::CMD_FLUSH => Job::Flush,
        proto::CMD_TRIM => Job::Trim { offset, len, fua },
        proto::CMD_WRITE_ZEROES => Job::WriteZeroes { offset, len, fua },
        // CACHE: a hint to prefetch; the data is as close as it gets already.
        _ => return Ok(Some(reject(0, permits))),
    };
    Ok(Some(Next::Run { handle: req.handle, job, permits }))
}

fn closed_semaphore(_: tokio::sync::AcquireError) -> Error {
    Error::Internal("nbd: in-flight semaphore closed".to_string())
}

/// Checks command, flags, length and range; `Err(errno)` to reject.
fn validate(req: &Request, size: u64) -> std::result::Result<(), u32> {
    let allowed_flags = match req.command {
        proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_FUA | proto::CMD_FLAG_NO_HOLE,
        // FUA is valid on every command once negotiated (clients set it on
        // reads and flushes too); we ignore it where nothing is written.
        proto::CMD_READ | proto::CMD_WRITE | proto::CMD_FLUSH | proto::CMD_TRIM | proto::CMD_CACHE => {
            proto::CMD_FLAG_FUA
        }
        // BLOCK_STATUS needs meta contexts, RESIZE was never offered.
        _ => return Err(proto::EINVAL),
    };
    if req.flags & !allowed_flags != 0 {
        return Err(proto::EINVAL);
    }
    if req.command == proto::CMD_FLUSH {
        // Offset and length are reserved; nothing to check.
        return Ok(());
    }
    if matches!(req.command, proto::CMD_READ | proto::CMD_WRITE) && req.len > proto::MAX_PAYLOAD {
        return Err(proto::EINVAL);
    }
    let in_range = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= size);
    if !in_range {
        // The spec (and qemu-nbd) answer writes past the end with ENOSPC.
        let writes = matches!(req.command, proto::CMD_WRITE | proto::CMD_WRITE_ZEROES);
        let overflows = req.offset.checked_add(u64::from(req.len)).is_none();
        return Err(if writes && !overflows { proto::ENOSPC } else { proto::EINVAL });
    }
    Ok(())
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

/// Runs a job on a blocking thread; its reply goes to the writer.
/// Writes up to this size run on the connection's task: a page-cache write
/// and a buffered log append take microseconds, less than the two thread
/// handoffs of the blocking pool. Reads (which may wait for the disk),
/// flushes (fsync) and large requests go to the blocking pool.
pub const INLINE_WRITE_MAX: usize = 256 << 10;

fn dispatch(device: &Arc<dyn BlockDevice>, handle: u64, job: Job, permits: Permits, tx: &mpsc::UnboundedSender<Reply>) {
    if matches!(&job, Job::Write { data, fua: false, .. } if data.len() <= INLINE_WRITE_MAX) {
        let (error, data) = match std::panic::catch_unwind(AssertUnwindSafe(|| run(&**device, handle, job))) {
            Ok(outcome) => outcome,
            Err(_) => {
                warn!(handle, "nbd: block device panicked, replying EIO");
                (proto::EIO, None)
            }
        };
        let _ = tx.send(Reply { handle, error, data, _permits: permits });
        return;
    }
    let device = Arc::clone(device);
    let tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        // A panicking device must still answer, or the client waits forever.
        let (error, data) = match std::panic::catch_unwind(AssertUnwindSafe(|| run(&*device, handle, job))) {
            Ok(outcome) => outcome,
            Err(_) => {
                warn!(handle, "nbd: block device panicked, replying EIO");
                (proto::EIO, None)
            }
        };
        // The writer is gone only if the client is: nobody to tell.
        let _ = tx.send(Reply { handle, error, data, _permits: permits });
    });
}

/// Calls the device; returns the protocol error (0 for success) and READ data.
fn run(device: &dyn BlockDevice, handle: u64, job: Job) -> (u32, Option<Vec<u8>>) {
    let (what, result) = match job {
        Job::Read { offset, len } => {
            let mut buf = vec![0u8; len as usize];
            match device.read_at(offset, &mut buf) {
                Ok(()) => return (0, Some(buf)),
                Err(e) => ("read", Err(e)),
            }
        }
        Job::Write { offset, data, fua } => ("write", device.write_at(offset, &data, fua)),
        Job::WriteZeroes { offset, len, fua } => ("write_zeroes", device.write_zeroes(offset, len, fua)),
        Job::Trim { offset, len, fua } => ("trim", device.trim(offset, len, fua)),
        Job::Flush => ("flush", device.flush()),
    };
    match result {
        Ok(()) => (0, None),
        Err(e) => {
            let errno = errno_for(&e);
            warn!(handle, op = what, error = %e, errno, "nbd: device error");
            (errno, None)
        }
    }
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
        _ => proto::EIO,
    }
}

/// Writes replies in the order they complete, flushing once per batch.
/// Ends when every sender (reader and jobs) is gone, then closes the write
/// side. On failure it tells the reader to stop.
async fn write_replies<W>(wr: W, mut rx: mpsc::UnboundedReceiver<Reply>, failed: CancellationToken) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    let result = async {
        while let Some(reply) = rx.recv().await {
            write_reply(&mut w, reply).await?;
            while let Ok(reply) = rx.try_recv() {
                write_reply(&mut w, reply).await?;
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

async fn write_reply<W>(w: &mut W, reply: Reply) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    w.write_all(&proto::simple_reply(reply.error, reply.handle)).await?;
    if reply.error == 0 {
        if let Some(data) = &reply.data {
            w.write_all(data).await?;
        }
    }
    Ok(())
}
