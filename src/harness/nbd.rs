//! A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies, one
//! request in flight) for tests that need exact control of WRITE / FLUSH /
//! READ and of what was acknowledged. Every call returns an `io::Result`, so
//! a test can keep writing until the server dies under it (kill -9).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_FLUSH: u16 = 3;
/// Largest request the client sends at once (servers accept at least 32 MiB; stay well below).
pub const MAX_REQUEST: usize = 1 << 20;

fn proto(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

pub struct NbdClient {
    s: UnixStream,
    pub size: u64,
    handle: u64,
}

impl NbdClient {
    /// Connects and selects `export` ("vm/disk"). `Ok(Err(reply type))` when
    /// the server refuses the export; `Err` on a socket or protocol error.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Result<NbdClient, u32>> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut magic = [0u8; 16];
        s.read_exact(&mut magic)?;
        if &magic != b"NBDMAGICIHAVEOPT" {
            return Err(proto(format!("bad greeting {magic:?}")));
        }
        let mut flags = [0u8; 2];
        s.read_exact(&mut flags)?;
        let flags = u16::from_be_bytes(flags);
        if flags & 1 == 0 {
            return Err(proto("server is not fixed newstyle".into()));
        }
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES (if offered).
        s.write_all(&(1u32 | (flags as u32 & 2)).to_be_bytes())?;
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            let magic = u64::from_be_bytes(head[..8].try_into().unwrap());
            let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
            if magic != OPT_REPLY_MAGIC || option != OPT_GO {
                return Err(proto(format!("bad option reply magic {magic:#x} option {option}")));
            }
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            if kind & 0x8000_0000 != 0 {
                return Ok(Err(kind));
            }
            match kind {
                REP_INFO if payload.len() >= 12 && payload[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => return Err(proto(format!("unexpected option reply {other:#x}"))),
            }
        }
        let size = size.ok_or_else(|| proto("no NBD_INFO_EXPORT before ACK".into()))?;
        Ok(Ok(NbdClient { s, size, handle: 0 }))
    }

    /// Connects, panicking if the export is refused or the server is unreachable.
    pub fn open(socket: &Path, export: &str) -> NbdClient {
        match NbdClient::connect(socket, export) {
            Ok(Ok(c)) => c,
            Ok(Err(kind)) => panic!("NBD export {export} refused: reply {kind:#x}"),
            Err(e) => panic!("NBD connect to {export} on {}: {e}", socket.display()),
        }
    }

    /// One request and its simple reply: `Ok((nbd error, data read))`.
    pub fn call(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<(u32, Vec<u8>)> {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.s.write_all(&req)?;
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head)?;
        let magic = u32::from_be_bytes(head[..4].try_into().unwrap());
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
        if magic != SIMPLE_REPLY_MAGIC || handle != self.handle {
            return Err(proto(format!("bad reply: magic {magic:#x}, handle {handle} (sent {})", self.handle)));
        }
        let mut data = Vec::new();
        if error == 0 && cmd == CMD_READ {
            data = vec![0u8; len as usize];
            self.s.read_exact(&mut data)?;
        }
        Ok((error, data))
    }

    fn checked(&mut self, what: &str, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> io::Result<Vec<u8>> {
        let (err, data) = self.call(cmd, offset, len, payload)?;
        if err != 0 {
            return Err(io::Error::other(format!("NBD {what} at {offset} (+{len}) failed with error {err}")));
        }
        Ok(data)
    }

    /// WRITE `data` at `offset` (split into requests of at most MAX_REQUEST).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        for (i, chunk) in data.chunks(MAX_REQUEST).enumerate() {
            let off = offset + (i * MAX_REQUEST) as u64;
            self.checked("WRITE", CMD_WRITE, off, chunk.len() as u32, chunk)?;
        }
        Ok(())
    }

    /// FLUSH: once it returns Ok, every write acknowledged before is durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.checked("FLUSH", CMD_FLUSH, 0, 0, &[]).map(|_| ())
    }

    /// READ `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len as usize);
        let mut off = offset;
        while off < offset + len {
            let n = (offset + len - off).min(MAX_REQUEST as u64);
            out.extend(self.checked("READ", CMD_READ, off, n as u32, &[])?);
            off += n;
        }
        Ok(out)
    }

    /// READ the whole export.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        self.read(0, self.size)
    }
}
