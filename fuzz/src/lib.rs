//! What the fuzz targets run: arbitrary bytes into one of Ferry's parsers,
//! which must end without panicking, hanging, or allocating without bound
//! (the smoke run passes `-rss_limit_mb=512`). libfuzzer-sys turns any
//! panic, in any thread or task, into a crash.
//!
//! - [`nbd_connection`]: the bytes are the client side of one NBD
//!   connection to [`NbdServer::serve_connection`] over an in-memory
//!   duplex stream, with a small [`MemDevice`] export; the client then
//!   hangs up, and the server must end within [`BOUND`].
//! - [`hrl_log`]: the bytes become a change-log file (raw, or after a valid
//!   header, or a log written by the engine's writer and then corrupted),
//!   which is scanned, recovered and coalesced; the results must hold the
//!   reader's documented invariants.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_engine::changelog::{self, Coalescer, LogHeader, LogScan, LogWriter, RecordKind};
use ferry_engine::nbd::{proto, BlockDevice, MapCatalog, MemDevice, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// The export the client is given.
const EXPORT: &str = "vm/d";
/// Small, so that every READ the device can serve is small too (eight
/// 4 KiB blocks: the edges of the export are all still there; copying
/// READ replies was most of an execution at 256 KiB).
const DEVICE_SIZE: u64 = 32 << 10;
/// How long the server may take to end after the client's EOF.
pub const BOUND: Duration = Duration::from_secs(5);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime"))
}

/// What the client sends before the fuzz bytes.
#[derive(Debug, Clone, Copy)]
pub enum Handshake {
    /// Nothing: the bytes start right after the server's greeting.
    Raw,
    /// Client flags and a GO for the export (after STRUCTURED_REPLY and a
    /// SET_META_CONTEXT of `base:allocation` if asked): the bytes are requests.
    Go { structured: bool, allocation: bool },
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    let header = proto::OptionHeader { magic: proto::IHAVEOPT, option, len: data.len() as u32 };
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(data);
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn prelude(handshake: Handshake) -> Vec<u8> {
    let mut out = Vec::new();
    let Handshake::Go { structured, allocation } = handshake else {
        return out;
    };
    out.extend_from_slice(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
    if structured {
        option(&mut out, proto::OPT_STRUCTURED_REPLY, &[]);
    }
    if allocation {
        let mut data = Vec::new();
        string(&mut data, EXPORT);
        data.extend_from_slice(&1u32.to_be_bytes());
        string(&mut data, proto::BASE_ALLOCATION);
        option(&mut out, proto::OPT_SET_META_CONTEXT, &data);
    }
    let mut go = Vec::new();
    string(&mut go, EXPORT);
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, proto::OPT_GO, &go);
    out
}

/// One NBD connection whose client sends `prelude(handshake)`, then `data`,
/// then hangs up, reading every reply meanwhile.
pub fn nbd_connection(data: &[u8], handshake: Handshake) {
    let mut client = prelude(handshake);
    client.extend_from_slice(data);
    runtime().block_on(async move {
        let device: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DEVICE_SIZE));
        let catalog = MapCatalog::new().with(EXPORT, device).with("vm/e", Arc::new(MemDevice::new(4096)));
        let server = NbdServer::new(Arc::new(catalog), CancellationToken::new());
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let serving = tokio::spawn(async move { server.serve_connection(theirs).await });
        let (mut rd, mut wr) = tokio::io::split(ours);
        let write = async {
            let _ = wr.write_all(&client).await;
            let _ = wr.shutdown().await;
        };
        let drain = async {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let ended = tokio::time::timeout(BOUND, async {
            tokio::join!(write, drain);
            serving.await
        })
        .await;
        match ended {
            Err(_) => panic!("the NBD server did not end within {BOUND:?} of the client hanging up"),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // A protocol error or a clean end: both are fine answers to garbage.
            Ok(_) => {}
        }
    });
}

/// Valid log headers to put arbitrary records behind.
struct Templates {
    /// A header with an open (all-zero) close block.
    open: Vec<u8>,
    /// A sealed log with no records.
    sealed: Vec<u8>,
}

/// A private folder for the logs the writer makes (tmpfs when there is one:
/// the writer fsyncs).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("ferry-fuzz-hrl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

fn fresh_log_path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    changelog::log_path(&scratch().join(format!("disk{n}.img")), 1)
}

fn header() -> LogHeader {
    // A fixed log id, so that a crash reproduces from its input alone.
    LogHeader {
        vm: "vm".into(),
        disk: "d".into(),
        seq: 1,
        log_id: 0x5eed_f00d_1234_5679,
        prev_log_id: 0,
        created_unix_ms: 0,
        boot_id: ferry_engine::changelog::boot_id(),
    }
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| {
        let open_path = fresh_log_path();
        drop(LogWriter::create(&open_path, &header()).expect("a template log"));
        let sealed_path = fresh_log_path();
        LogWriter::create(&sealed_path, &header()).expect("a template log").seal().expect("sealed");
        let read = |p: &Path| {
            let bytes = std::fs::read(p).expect("read the template");
            let _ = std::fs::remove_file(p);
            bytes
        };
        Templates { open: read(&open_path), sealed: read(&sealed_path) }
    })
}

/// A log the engine's writer makes from `ops` (4 bytes each: kind and
/// length, a fill byte, offset in 512-byte units), sealed if `seal`, then
/// damaged by `(position, xor)` pairs.
fn written_log(input: &[u8]) -> Vec<u8> {
    let Some((&shape, rest)) = input.split_first() else {
        return Vec::new();
    };
    let ops = usize::from(shape >> 1) % 17;
    let (op_bytes, damage) = rest.split_at((ops * 4).min(rest.len()));
    let path = fresh_log_path();
    let mut log = LogWriter::create(&path, &header()).expect("create a log");
    for op in op_bytes.chunks_exact(4) {
        let len = (u64::from(op[0] >> 1) + 1) * 64;
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]])) * 512;
        let done = if op[0] & 1 == 0 {
            log.append_write(offset, &vec![op[1]; len as usize])
        } else {
            log.append_zero(offset, len)
        };
        done.expect("append to a healthy log");
    }
    if shape & 1 == 1 {
        log.seal().expect("seal");
    } else {
        log.sync().expect("sync");
        drop(log);
    }
    let mut bytes = std::fs::read(&path).expect("read the log back");
    let _ = std::fs::remove_file(&path);
    for pair in damage.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([pair[0], pair[1]]));
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= pair[2];
        }
    }
    bytes
}

/// An in-memory file holding `bytes`, and a path that opens it.
fn memfd(bytes: &[u8]) -> (File, PathBuf) {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ferry-hrl".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(bytes).expect("fill the memfd");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    (file, path)
}

/// The first byte picks the file: 0 the raw bytes, 1 a valid open header
/// then the bytes, 2 a sealed empty log then the bytes, 3 a log written
/// from the bytes and then damaged.
pub fn hrl_log(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = match mode % 4 {
        0 => rest.to_vec(),
        1 => [&templates().open[..], rest].concat(),
        2 => [&templates().sealed[..], rest].concat(),
        _ => written_log(rest),
    };
    let (file, path) = memfd(&bytes);
    let Ok(found) = changelog::scan(&path) else {
        return; // a bad header or a damaged sealed log: refused, as it must be
    };
    check(&file, &found, bytes.len() as u64);
    let recovered = changelog::recover(&path).expect("recover what scan accepted");
    assert_eq!(recovered, found, "recover finds what scan found");
    let again = changelog::scan(&path).expect("scan after recover");
    assert_eq!(again.torn_bytes, 0, "recover cut the torn tail");
    assert_eq!(again.records, found.records, "recover kept every intact record");
    assert_eq!(again.file_len, found.valid_len);
}

/// The reader's promises about what it accepted.
fn check(file: &File, found: &LogScan, len: u64) {
    assert_eq!(found.file_len, len);
    assert!(found.valid_len <= found.file_len);
    assert_eq!(found.torn_bytes, found.file_len - found.valid_len);
    assert!(!found.clean || found.torn_bytes == 0, "a sealed log has no torn tail");
    let mut coalescer = Coalescer::new();
    for (i, r) in found.records.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "records in seq order");
        assert!(r.len > 0 && r.offset.checked_add(r.len).is_some(), "{r:?}");
        assert!(r.payload_pos + r.payload_len() <= found.valid_len, "{r:?} inside the valid part");
        if r.kind == RecordKind::Write {
            let payload = changelog::read_payload(file, r).expect("the payload of an accepted record");
            assert_eq!(payload.len() as u64, r.len);
        }
        coalescer.push(0, r);
    }
    let extents = coalescer.finish();
    for pair in extents.windows(2) {
        assert!(pair[0].end() <= pair[1].offset, "coalesced extents are sorted and disjoint: {pair:?}");
    }
}
