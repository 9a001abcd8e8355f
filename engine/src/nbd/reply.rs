//! Replies on their way to the client, and how each is put on the wire:
//! as a simple reply, or (once the client negotiated
//! `NBD_OPT_STRUCTURED_REPLY`) as structured chunks, the last one carrying
//! `NBD_REPLY_FLAG_DONE`.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;

use super::proto;
use super::Extent;

/// What a request is answered with.
pub(super) enum Body {
    /// No payload: `error` 0 for success, else a protocol error value and,
    /// for structured replies, why (shown to the user by the client).
    Done { error: u32, message: String },
    /// A successful READ of `data.len()` bytes at `offset`; `df`: in one
    /// content chunk (the client set `NBD_CMD_FLAG_DF`).
    Read { offset: u64, data: Vec<u8>, df: bool },
    /// A successful BLOCK_STATUS for metadata context `context`.
    BlockStatus { context: u32, extents: Vec<Extent> },
}

impl Body {
    pub(super) fn ok() -> Body {
        Body::Done { error: 0, message: String::new() }
    }

    pub(super) fn error(error: u32, message: impl Into<String>) -> Body {
        Body::Done { error, message: message.into() }
    }
}

/// Held by a request from the moment it is read until its reply is
/// written, so the in-flight bounds also cover replies queued behind a
/// client that does not read them.
pub(super) struct Permits {
    pub(super) _request: OwnedSemaphorePermit,
    /// This connection's share of buffer bytes (READ/WRITE/BLOCK_STATUS).
    pub(super) _bytes: Option<OwnedSemaphorePermit>,
    /// The server-wide share of the same bytes.
    pub(super) _server_bytes: Option<OwnedSemaphorePermit>,
}

/// A reply on its way to the writer.
pub(super) struct Reply {
    pub(super) handle: u64,
    pub(super) body: Body,
    pub(super) _permits: Permits,
}

impl Reply {
    /// Writes the reply in the connection's reply style (not flushed).
    pub(super) async fn write_to<W>(&self, w: &mut W, structured: bool) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        if structured {
            self.write_structured(w).await
        } else {
            self.write_simple(w).await
        }
    }

    async fn write_simple<W>(&self, w: &mut W) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        match &self.body {
            Body::Done { error, .. } => w.write_all(&proto::simple_reply(*error, self.handle)).await,
            Body::Read { data, .. } => {
                w.write_all(&proto::simple_reply(0, self.handle)).await?;
                w.write_all(data).await
            }
            // Only a connection with structured replies selects a metadata
            // context, so this is never built for a simple one; if it were,
            // an error is the one answer a simple reply can carry.
            Body::BlockStatus { .. } => w.write_all(&proto::simple_reply(proto::EIO, self.handle)).await,
        }
    }

    async fn write_structured<W>(&self, w: &mut W) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        let handle = self.handle;
        match &self.body {
            Body::Done { error: 0, .. } => {
                w.write_all(&proto::chunk_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, handle, 0)).await
            }
            Body::Done { error, message } => {
                let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + 6 + message.len());
                proto::put_error_chunk(&mut out, handle, *error, message);
                w.write_all(&out).await
            }
            Body::Read { data, .. } if data.is_empty() => {
                w.write_all(&proto::chunk_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, handle, 0)).await
            }
            Body::Read { offset, data, df: true } => {
                write_data_chunk(w, handle, proto::REPLY_FLAG_DONE, *offset, data).await
            }
            Body::Read { offset, data, df: false } => {
                // Zero runs go as holes: the client learns they are zeroes
                // without our sending them. The data is in memory already,
                // so no error can follow: the last content chunk is final.
                let runs = super::zero_runs(*offset, data);
                for (i, &(start, len, zero)) in runs.iter().enumerate() {
                    let flags = if i + 1 == runs.len() { proto::REPLY_FLAG_DONE } else { 0 };
                    let at = offset + start as u64;
                    if zero {
                        // A READ is at most MAX_PAYLOAD bytes: the hole size fits in 32 bits.
                        let mut chunk = [0u8; proto::CHUNK_HEADER_LEN + 12];
                        chunk[..proto::CHUNK_HEADER_LEN].copy_from_slice(&proto::chunk_header(
                            flags,
                            proto::REPLY_TYPE_OFFSET_HOLE,
                            handle,
                            12,
                        ));
                        chunk[20..28].copy_from_slice(&at.to_be_bytes());
                        chunk[28..32].copy_from_slice(&(len as u32).to_be_bytes());
                        w.write_all(&chunk).await?;
                    } else {
                        write_data_chunk(w, handle, flags, at, &data[start..start + len]).await?;
                    }
                }
                Ok(())
            }
            Body::BlockStatus { context, extents } => {
                // At most MAX_EXTENTS descriptors: the length fits in 32 bits.
                let len = 4 + 8 * extents.len();
                let mut out = Vec::with_capacity(proto::CHUNK_HEADER_LEN + len);
                out.extend_from_slice(&proto::chunk_header(
                    proto::REPLY_FLAG_DONE,
                    proto::REPLY_TYPE_BLOCK_STATUS,
                    handle,
                    len as u32,
                ));
                out.extend_from_slice(&context.to_be_bytes());
                for e in extents {
                    // Each extent lies inside a request of a 32-bit length.
                    out.extend_from_slice(&(e.len as u32).to_be_bytes());
                    out.extend_from_slice(&e.flags.to_be_bytes());
                }
                w.write_all(&out).await
            }
        }
    }
}

/// One `NBD_REPLY_TYPE_OFFSET_DATA` chunk (`data` is at most MAX_PAYLOAD bytes).
async fn write_data_chunk<W>(w: &mut W, handle: u64, flags: u16, offset: u64, data: &[u8]) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut head = [0u8; proto::CHUNK_HEADER_LEN + 8];
    head[..proto::CHUNK_HEADER_LEN].copy_from_slice(&proto::chunk_header(
        flags,
        proto::REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data.len() as u32,
    ));
    head[20..28].copy_from_slice(&offset.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(data).await
}
