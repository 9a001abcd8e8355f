//! The fixed newstyle handshake: greeting, client flags, then option
//! haggling until the client enters transmission (`GO`, `EXPORT_NAME`),
//! aborts or hangs up. What each option answers is in the table of the
//! module header of [`crate::nbd`]. Nothing a client sends here makes us
//! allocate more than [`MAX_OPTION_DATA`] bytes at once.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::proto;
use super::server::{ExportSlot, Shared, HANDSHAKE_SHUTDOWN_GRACE, MAX_OPTION_DATA};
use super::BlockDevice;
use crate::{Error, Result};

/// Handshake flags we offer.
const HANDSHAKE_FLAGS: u16 = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;
/// The id of `base:allocation` when selected (ids are ours to choose; 0
/// is what LIST replies carry, so a selected context gets another).
pub(super) const ALLOCATION_CONTEXT: u32 = 1;

/// Transmission flags of every export (none is read-only). `DF` exists only
/// with structured replies, as the spec requires.
pub(super) fn transmission_flags(structured: bool) -> u16 {
    let always = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_SEND_FAST_ZERO
        | proto::FLAG_SEND_CACHE
        | proto::FLAG_CAN_MULTI_CONN;
    if structured {
        always | proto::FLAG_SEND_DF
    } else {
        always
    }
}

/// The export a handshake settled on, and what was negotiated for it.
pub(super) struct Export {
    pub(super) name: String,
    pub(super) device: Arc<dyn BlockDevice>,
    /// Read once: the size is fixed for the whole session.
    pub(super) size: u64,
    /// Structured replies were negotiated.
    pub(super) structured: bool,
    /// The id of `base:allocation` if the client selected it for this export.
    pub(super) allocation: Option<u32>,
    /// Held for the whole session: counts against the export's cap.
    pub(super) _slot: ExportSlot,
}

/// What the last `NBD_OPT_SET_META_CONTEXT` selected, and for which export.
struct MetaSelection {
    export: String,
    allocation: bool,
}

/// The state of one connection's haggling.
struct Haggle<'a, S> {
    stream: &'a mut S,
    shared: &'a Arc<Shared>,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
}

/// Runs the handshake. `Ok(None)`: the client aborted or hung up, or the
/// server shut down.
pub(super) async fn handshake<S>(stream: &mut S, shared: &Arc<Shared>) -> Result<Option<Export>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    write_flush(stream, &proto::greeting(HANDSHAKE_FLAGS), "nbd: send greeting").await?;
    let mut client_flags = [0u8; 4];
    let read = tokio::select! {
        biased;
        read = read_exact_or_eof(stream, &mut client_flags) => read?,
        // No option is in flight yet, so there is nothing to answer.
        _ = shared.shutdown.cancelled() => false,
    };
    if !read {
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(client_flags);
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(Error::invalid("nbd client flags", format!("unknown bits in {client_flags:#x}")));
    }
    let no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;
    Haggle { stream, shared, no_zeroes, structured: false, meta: None }.run().await
}

impl<S> Haggle<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn run(mut self) -> Result<Option<Export>> {
        loop {
            let Some(header) = self.next_option().await? else {
                return Ok(None);
            };
            let option = header.option;
            let mut data = vec![0u8; header.len as usize];
            read_exact(self.stream, &mut data, "nbd: read option data").await?;
            debug!(option, len = header.len, "nbd: option");
            if self.shared.shutdown.is_cancelled() {
                match option {
                    proto::OPT_ABORT => return self.abort().await,
                    // This option has no error reply: the spec says close.
                    proto::OPT_EXPORT_NAME => return Ok(None),
                    _ => self.reply(option, proto::REP_ERR_SHUTDOWN, b"the server is shutting down").await?,
                }
                continue;
            }
            let entered = match option {
                proto::OPT_EXPORT_NAME => return self.export_name(data).await.map(Some),
                proto::OPT_ABORT => return self.abort().await,
                proto::OPT_LIST => self.list(&data).await?,
                proto::OPT_INFO | proto::OPT_GO => self.info_or_go(option, &data).await?,
                proto::OPT_STRUCTURED_REPLY => self.structured_reply(&data).await?,
                proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                    self.meta_context(option, &data).await?;
                    None
                }
                _ => {
                    // STARTTLS, EXTENDED_HEADERS, and whatever comes later:
                    // the data was read, say no.
                    debug!(option, "nbd: unsupported option");
                    self.reply(option, proto::REP_ERR_UNSUP, &[]).await?;
                    None
                }
            };
            if let Some(export) = entered {
                return Ok(Some(export));
            }
        }
    }

    /// Reads the next option header; `None` at a clean EOF, or when the
    /// server shut down and the client sent nothing within the grace.
    async fn next_option(&mut self) -> Result<Option<proto::OptionHeader>> {
        let mut b = [0u8; proto::OPTION_HEADER_LEN];
        let shutdown = self.shared.shutdown.clone();
        let got = {
            let read = read_exact_or_eof(self.stream, &mut b);
            tokio::pin!(read);
            if shutdown.is_cancelled() {
                tokio::time::timeout(HANDSHAKE_SHUTDOWN_GRACE, &mut read).await
            } else {
                tokio::select! {
                    read = &mut read => Ok(read),
                    _ = shutdown.cancelled() => tokio::time::timeout(HANDSHAKE_SHUTDOWN_GRACE, &mut read).await,
                }
            }
        };
        let Ok(got) = got else {
            debug!("nbd: shutdown during the handshake and no option within the grace, closing");
            return Ok(None);
        };
        if !got? {
            return Ok(None);
        }
        let header = proto::OptionHeader::parse(&b);
        if header.magic != proto::IHAVEOPT {
            return Err(Error::invalid("nbd option", format!("bad magic {:#x}", header.magic)));
        }
        if header.len > MAX_OPTION_DATA {
            // We cannot answer EXPORT_NAME with an error, and skipping up to
            // 4 GiB for a client this far off the rails is not worth it.
            if header.option != proto::OPT_EXPORT_NAME {
                let msg = format!("option data of {} bytes exceeds {MAX_OPTION_DATA}", header.len);
                self.reply(header.option, proto::REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            }
            return Err(Error::invalid("nbd option", format!("length {} too big", header.len)));
        }
        Ok(Some(header))
    }

    async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> Result<()> {
        let mut out = Vec::with_capacity(proto::OPTION_REPLY_HEADER_LEN + data.len());
        proto::put_option_reply(&mut out, option, reply_type, data);
        write_flush(self.stream, &out, "nbd: send option reply").await
    }

    async fn abort(&mut self) -> Result<Option<Export>> {
        // The client may already be gone: a failed ACK is no error.
        let _ = self.reply(proto::OPT_ABORT, proto::REP_ACK, &[]).await;
        let _ = self.stream.shutdown().await;
        Ok(None)
    }

    async fn export_name(&mut self, data: Vec<u8>) -> Result<Export> {
        let name = String::from_utf8(data).map_err(|_| Error::invalid("nbd export name", "not UTF-8"))?;
        let Some(device) = self.shared.catalog.open(&name) else {
            warn!(export = %name, "nbd: EXPORT_NAME of an unknown export, closing");
            return Err(Error::not_found("nbd export", name));
        };
        let Some(export) = self.enter(name, device) else {
            return Err(self.over_export_cap_error());
        };
        let mut reply = Vec::with_capacity(10 + 124);
        reply.extend_from_slice(&export.size.to_be_bytes());
        reply.extend_from_slice(&transmission_flags(self.structured).to_be_bytes());
        if !self.no_zeroes {
            reply.extend_from_slice(&[0u8; 124]);
        }
        write_flush(self.stream, &reply, "nbd: send export info").await?;
        Ok(export)
    }

    /// The export as transmission will use it, holding a slot of its cap;
    /// `None` when the export has all the connections it may.
    fn enter(&self, name: String, device: Arc<dyn BlockDevice>) -> Option<Export> {
        let slot = self.shared.claim_export(&name)?;
        let allocation = match &self.meta {
            Some(m) if self.structured && m.allocation && m.export == name => Some(ALLOCATION_CONTEXT),
            _ => None,
        };
        let size = device.size();
        Some(Export { name, device, size, structured: self.structured, allocation, _slot: slot })
    }

    fn over_export_cap_error(&self) -> Error {
        let cap = self.shared.limits.max_connections_per_export;
        Error::FailedPrecondition(format!("nbd: the export already has {cap} connections, the limit"))
    }

    async fn list(&mut self, data: &[u8]) -> Result<Option<Export>> {
        if !data.is_empty() {
            self.reply(proto::OPT_LIST, proto::REP_ERR_INVALID, b"LIST takes no data").await?;
            return Ok(None);
        }
        let mut out = Vec::new();
        for name in self.shared.catalog.names() {
            let mut entry = Vec::with_capacity(4 + name.len());
            entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            proto::put_option_reply(&mut out, proto::OPT_LIST, proto::REP_SERVER, &entry);
        }
        proto::put_option_reply(&mut out, proto::OPT_LIST, proto::REP_ACK, &[]);
        write_flush(self.stream, &out, "nbd: send export list").await?;
        Ok(None)
    }

    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Export>> {
        let Some((name, infos)) = parse_info_request(data) else {
            self.reply(option, proto::REP_ERR_INVALID, b"malformed INFO/GO request").await?;
            return Ok(None);
        };
        let Some(device) = self.shared.catalog.open(&name) else {
            debug!(export = %name, "nbd: unknown export");
            let msg = format!("no export named {name:?}");
            self.reply(option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await?;
            return Ok(None);
        };
        let size = device.size();
        if option == proto::OPT_INFO {
            let out = self.info_replies(option, &name, size, &infos);
            write_flush(self.stream, &out, "nbd: send export info").await?;
            return Ok(None);
        }
        let Some(export) = self.enter(name, device) else {
            warn!("nbd: GO refused: the export is at its connection limit");
            let msg = self.over_export_cap_error().to_string();
            self.reply(option, proto::REP_ERR_POLICY, msg.as_bytes()).await?;
            return Ok(None);
        };
        let out = self.info_replies(option, &export.name, export.size, &infos);
        write_flush(self.stream, &out, "nbd: send export info").await?;
        Ok(Some(export))
    }

    /// The NBD_REP_INFO replies for an export, then the final ACK.
    fn info_replies(&self, option: u32, name: &str, size: u64, infos: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&transmission_flags(self.structured).to_be_bytes());
        proto::put_option_reply(&mut out, option, proto::REP_INFO, &info);
        for &requested in infos {
            let mut info = Vec::new();
            info.extend_from_slice(&requested.to_be_bytes());
            match requested {
                proto::INFO_NAME => info.extend_from_slice(name.as_bytes()),
                proto::INFO_DESCRIPTION => match self.shared.catalog.describe(name) {
                    Some(d) => info.extend_from_slice(proto::truncate_utf8(&d, proto::MAX_STRING).as_bytes()),
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

    async fn structured_reply(&mut self, data: &[u8]) -> Result<Option<Export>> {
        if !data.is_empty() {
            self.reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data").await?;
            return Ok(None);
        }
        self.structured = true;
        self.reply(proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]).await?;
        Ok(None)
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT. We know one context,
    /// `base:allocation`; `base:` lists it; other queries match nothing.
    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection, even when it fails.
            self.meta = None;
        }
        if !self.structured {
            let msg = b"metadata contexts need NBD_OPT_STRUCTURED_REPLY first";
            return self.reply(option, proto::REP_ERR_INVALID, msg).await;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.reply(option, proto::REP_ERR_INVALID, b"malformed metadata context request").await;
        };
        if self.shared.catalog.open(&name).is_none() {
            let msg = format!("no export named {name:?}");
            return self.reply(option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await;
        }
        let allocation = BASE_ALLOCATION_BYTES;
        let matched = if set {
            queries.contains(&allocation)
        } else {
            queries.is_empty() || queries.iter().any(|q| *q == allocation || *q == b"base:")
        };
        let mut out = Vec::new();
        if matched {
            let id = if set { ALLOCATION_CONTEXT } else { 0 };
            let mut entry = id.to_be_bytes().to_vec();
            entry.extend_from_slice(allocation);
            proto::put_option_reply(&mut out, option, proto::REP_META_CONTEXT, &entry);
        }
        proto::put_option_reply(&mut out, option, proto::REP_ACK, &[]);
        if set {
            self.meta = Some(MetaSelection { export: name, allocation: matched });
        }
        write_flush(self.stream, &out, "nbd: send metadata contexts").await
    }
}

const BASE_ALLOCATION_BYTES: &[u8] = proto::BASE_ALLOCATION.as_bytes();

/// Parses INFO/GO data: u32 name length, name, u16 count, count x u16.
pub(super) fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (name, rest) = take_string(data)?;
    let count = proto::be_u16(rest.get(0..2)?) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return None;
    }
    Some((name, rest.chunks_exact(2).map(proto::be_u16).collect()))
}

/// Parses LIST/SET_META_CONTEXT data: u32 name length, name, u32 count,
/// count x (u32 length, query). The count is checked against the data,
/// never trusted for an allocation.
pub(super) fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<&[u8]>)> {
    let (name, rest) = take_string(data)?;
    let count = proto::be_u32(rest.get(0..4)?);
    let mut rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = proto::be_u32(rest.get(0..4)?) as usize;
        let end = 4usize.checked_add(len)?;
        queries.push(rest.get(4..end)?);
        rest = &rest[end..];
    }
    rest.is_empty().then_some((name, queries))
}

/// A u32-length-prefixed UTF-8 string of at most 4096 bytes, and what follows.
fn take_string(data: &[u8]) -> Option<(String, &[u8])> {
    let len = proto::be_u32(data.get(0..4)?) as usize;
    if len > proto::MAX_STRING {
        return None;
    }
    let name = std::str::from_utf8(data.get(4..4 + len)?).ok()?.to_string();
    Some((name, &data[4 + len..]))
}

pub(super) async fn write_flush<S>(stream: &mut S, bytes: &[u8], context: &'static str) -> Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(bytes).await.map_err(|e| Error::io(context, e))?;
    stream.flush().await.map_err(|e| Error::io(context, e))
}

pub(super) async fn read_exact<S>(stream: &mut S, buf: &mut [u8], context: &'static str) -> Result<()>
where
    S: AsyncRead + Unpin,
{
    stream.read_exact(buf).await.map(|_| ()).map_err(|e| Error::io(context, e))
}

/// Fills `buf`; `false` if the stream ended cleanly before its first byte,
/// an error if it ended in the middle.
pub(super) async fn read_exact_or_eof<S>(stream: &mut S, buf: &mut [u8]) -> Result<bool>
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

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn meta_requests_parse_and_reject_lengths_past_the_data() {
        let mut ok = string(b"vm/d");
        ok.extend_from_slice(&2u32.to_be_bytes());
        ok.extend(string(b"base:allocation"));
        ok.extend(string(b"qemu:dirty-bitmap:x"));
        let (name, queries) = parse_meta_request(&ok).unwrap();
        assert_eq!(name, "vm/d");
        assert_eq!(queries, [&b"base:allocation"[..], &b"qemu:dirty-bitmap:x"[..]]);

        let mut huge_count = string(b"vm/d");
        huge_count.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&huge_count), None, "a count the data cannot hold");
        let mut long_query = string(b"vm/d");
        long_query.extend_from_slice(&1u32.to_be_bytes());
        long_query.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&long_query), None, "a query length past the end");
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(parse_meta_request(&trailing), None, "bytes after the last query");
        assert_eq!(parse_meta_request(&string(&[b'x'; 4097])), None, "a name over 4096 bytes");
    }

    #[test]
    fn info_requests_parse_and_reject_bad_counts() {
        let mut ok = string(b"vm/d");
        ok.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        assert_eq!(parse_info_request(&ok), Some(("vm/d".to_string(), vec![3, 1])));
        ok.push(0);
        assert_eq!(parse_info_request(&ok), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'x']), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
    }
}
