//! The server driven over `tokio::io::duplex` by a small hand-written
//! client (simple and structured replies), grouped by what they exercise:
//! [`handshake`] (options, metadata contexts), [`transmission`] (commands,
//! errors, pipelining), [`structured`] (chunks, holes, block status,
//! zeroing flags), [`limits`] (caps, timeouts, shutdown) and [`hostile`]
//! (random bytes never panic the server).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::proto::{self, Request};
use super::*;

mod handshake;
mod hostile;
mod limits;
mod structured;
mod transmission;

const EXPORT: &str = "vm1/disk0";
const SIZE: u64 = 1 << 20;
/// Every wait in these tests is bounded: a hung server fails the test.
const WAIT: Duration = Duration::from_secs(10);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f).await.expect("server answered in time")
}

/// A catalog with one described export backed by `device`.
struct TestCatalog {
    inner: MapCatalog,
}

impl ExportCatalog for TestCatalog {
    fn open(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.inner.open(name)
    }
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn describe(&self, name: &str) -> Option<String> {
        Some(format!("disk {name}"))
    }
}

struct Harness {
    server: NbdServer,
    shutdown: CancellationToken,
}

impl Harness {
    fn new(device: Arc<dyn BlockDevice>) -> Self {
        Self::with_limits(device, NbdLimits::default())
    }

    fn with_limits(device: Arc<dyn BlockDevice>, limits: NbdLimits) -> Self {
        let catalog = MapCatalog::new().with(EXPORT, device).with("vm2/disk0", Arc::new(MemDevice::new(4096)));
        let shutdown = CancellationToken::new();
        let server = NbdServer::with_limits(Arc::new(TestCatalog { inner: catalog }), limits, shutdown.clone())
            .expect("valid limits");
        Harness { server, shutdown }
    }

    fn connect(&self) -> (Client, JoinHandle<crate::Result<()>>) {
        let (client, server_side) = tokio::io::duplex(4 << 20);
        let server = self.server.clone();
        let task = tokio::spawn(async move { server.serve_connection(server_side).await });
        (Client { s: client, structured: false }, task)
    }
}

struct Client {
    s: DuplexStream,
    /// Structured replies were negotiated: replies are read as chunks.
    structured: bool,
}

struct OptReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

/// One reply, simple or structured, as the client sees it.
#[derive(Debug, Default)]
struct Answer {
    handle: u64,
    error: u32,
    /// READ data, reassembled from its chunks (holes as zeroes).
    data: Vec<u8>,
    /// Structured: every chunk's (type, flags), in order.
    chunks: Vec<(u16, u16)>,
    /// Structured BLOCK_STATUS: the context and its (length, flags) extents.
    context: Option<u32>,
    extents: Vec<(u32, u32)>,
    /// Structured errors: the message.
    message: String,
}

/// The options of a full handshake.
#[derive(Default)]
struct Go<'a> {
    structured: bool,
    /// SET_META_CONTEXT queries (after STRUCTURED_REPLY if asked).
    meta: Option<&'a [&'a str]>,
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// LIST/SET_META_CONTEXT data.
fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = string(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        data.extend(string(q.as_bytes()));
    }
    data
}

impl Client {
    /// Reads the greeting and sends our flags.
    async fn greet(&mut self, client_flags: u32) {
        let mut g = [0u8; proto::GREETING_LEN];
        within(self.s.read_exact(&mut g)).await.unwrap();
        assert_eq!(g, proto::greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES));
        self.s.write_all(&client_flags.to_be_bytes()).await.unwrap();
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let h = proto::OptionHeader { magic: proto::IHAVEOPT, option, len: data.len() as u32 };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(data).await.unwrap();
    }

    async fn option_reply(&mut self) -> OptReply {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        within(self.s.read_exact(&mut h)).await.unwrap();
        assert_eq!(proto::be_u64(&h[0..8]), proto::OPTION_REPLY_MAGIC);
        let mut data = vec![0u8; proto::be_u32(&h[16..20]) as usize];
        within(self.s.read_exact(&mut data)).await.unwrap();
        OptReply { option: proto::be_u32(&h[8..12]), reply_type: proto::be_u32(&h[12..16]), data }
    }

    /// Sends an option and collects the replies up to the final one:
    /// (the payloads of every reply of `collect` type, final reply type).
    async fn option_replies(&mut self, option: u32, data: &[u8], collect: u32) -> (Vec<Vec<u8>>, u32) {
        self.send_option(option, data).await;
        let mut got = Vec::new();
        loop {
            let r = self.option_reply().await;
            assert_eq!(r.option, option);
            if r.reply_type == collect {
                got.push(r.data);
            } else {
                return (got, r.reply_type);
            }
        }
    }

    /// Sends INFO or GO and collects the NBD_REP_INFO payloads up to the final reply.
    async fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> (Vec<Vec<u8>>, u32) {
        let mut data = string(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        self.option_replies(option, &data, proto::REP_INFO).await
    }

    /// STRUCTURED_REPLY, answered ACK.
    async fn negotiate_structured(&mut self) {
        self.send_option(proto::OPT_STRUCTURED_REPLY, &[]).await;
        let r = self.option_reply().await;
        assert_eq!((r.option, r.reply_type), (proto::OPT_STRUCTURED_REPLY, proto::REP_ACK));
        self.structured = true;
    }

    /// LIST or SET_META_CONTEXT: (context ids and names, final reply type).
    async fn meta(&mut self, option: u32, export: &str, queries: &[&str]) -> (Vec<(u32, String)>, u32) {
        let (contexts, last) =
            self.option_replies(option, &meta_request(export, queries), proto::REP_META_CONTEXT).await;
        let contexts =
            contexts.iter().map(|c| (proto::be_u32(&c[0..4]), String::from_utf8(c[4..].to_vec()).unwrap())).collect();
        (contexts, last)
    }

    /// Full handshake with GO; returns (size, transmission flags).
    async fn go(&mut self, name: &str) -> (u64, u16) {
        self.go_with(name, Go::default()).await
    }

    async fn go_with(&mut self, name: &str, go: Go<'_>) -> (u64, u16) {
        self.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
        if go.structured {
            self.negotiate_structured().await;
        }
        if let Some(queries) = go.meta {
            let (_, last) = self.meta(proto::OPT_SET_META_CONTEXT, name, queries).await;
            assert_eq!(last, proto::REP_ACK);
        }
        let (infos, last) = self.info(proto::OPT_GO, name, &[]).await;
        assert_eq!(last, proto::REP_ACK);
        let export = infos.iter().find(|i| proto::be_u16(i) == proto::INFO_EXPORT).expect("INFO_EXPORT sent");
        (proto::be_u64(&export[2..10]), proto::be_u16(&export[10..12]))
    }

    async fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let r = Request { flags, command, handle, offset, len };
        self.s.write_all(&r.encode()).await.unwrap();
    }

    async fn write(&mut self, handle: u64, offset: u64, data: &[u8], flags: u16) {
        self.request(proto::CMD_WRITE, flags, handle, offset, data.len() as u32).await;
        self.s.write_all(data).await.unwrap();
    }

    /// Reads one reply. `read`: the (offset, len) of the READ it answers,
    /// if it answers one (a simple reply has no length of its own).
    async fn answer(&mut self, read: Option<(u64, usize)>) -> Answer {
        let mut magic = [0u8; 4];
        within(self.s.read_exact(&mut magic)).await.unwrap();
        if u32::from_be_bytes(magic) == proto::SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; proto::SIMPLE_REPLY_LEN - 4];
            within(self.s.read_exact(&mut rest)).await.unwrap();
            let mut a =
                Answer { error: proto::be_u32(&rest[0..4]), handle: proto::be_u64(&rest[4..12]), ..Answer::default() };
            if let (0, Some((_, len))) = (a.error, read) {
                a.data = vec![0u8; len];
                within(self.s.read_exact(&mut a.data)).await.unwrap();
            }
            return a;
        }
        assert!(self.structured, "a structured reply on a connection that did not negotiate them");
        assert_eq!(u32::from_be_bytes(magic), proto::STRUCTURED_REPLY_MAGIC);
        let (start, len) = read.unwrap_or((0, 0));
        let mut a = Answer { data: vec![0xee; len], ..Answer::default() };
        let mut covered = vec![false; len];
        let mut first = true;
        loop {
            let mut h = [0u8; proto::CHUNK_HEADER_LEN];
            h[..4].copy_from_slice(&magic);
            if !first {
                within(self.s.read_exact(&mut h)).await.unwrap();
            } else {
                within(self.s.read_exact(&mut h[4..])).await.unwrap();
            }
            let chunk = proto::ChunkHeader::parse(&h).expect("structured magic");
            if first {
                a.handle = chunk.handle;
                first = false;
            }
            assert_eq!(chunk.handle, a.handle, "the chunks of one reply come together");
            let mut p = vec![0u8; chunk.len as usize];
            within(self.s.read_exact(&mut p)).await.unwrap();
            a.chunks.push((chunk.chunk_type, chunk.flags));
            let mut cover = |at: u64, n: usize| {
                let i = (at - start) as usize;
                assert!(at >= start && i + n <= len, "chunk inside the request");
                assert!(covered[i..i + n].iter().all(|c| !c), "chunks do not overlap");
                covered[i..i + n].fill(true);
                i
            };
            match chunk.chunk_type {
                proto::REPLY_TYPE_NONE => assert_eq!(chunk.len, 0),
                proto::REPLY_TYPE_OFFSET_DATA => {
                    let i = cover(proto::be_u64(&p[0..8]), p.len() - 8);
                    a.data[i..i + p.len() - 8].copy_from_slice(&p[8..]);
                }
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(p.len(), 12);
                    let n = proto::be_u32(&p[8..12]) as usize;
                    assert!(n > 0, "a hole is never empty");
                    let i = cover(proto::be_u64(&p[0..8]), n);
                    a.data[i..i + n].fill(0);
                }
                proto::REPLY_TYPE_BLOCK_STATUS => {
                    a.context = Some(proto::be_u32(&p[0..4]));
                    a.extents =
                        p[4..].chunks_exact(8).map(|d| (proto::be_u32(&d[0..4]), proto::be_u32(&d[4..8]))).collect();
                }
                proto::REPLY_TYPE_ERROR => {
                    a.error = proto::be_u32(&p[0..4]);
                    assert_ne!(a.error, 0, "an error chunk carries an error");
                    let n = proto::be_u16(&p[4..6]) as usize;
                    assert_eq!(p.len(), 6 + n);
                    a.message = String::from_utf8(p[6..].to_vec()).expect("UTF-8 message");
                }
                other => panic!("unexpected chunk type {other}"),
            }
            if chunk.flags & proto::REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if a.error == 0 && read.is_some() {
            assert!(covered.iter().all(|&c| c), "a successful READ covers its whole range");
        }
        a
    }

    /// Reads a reply: (handle, error, data); `read_len` bytes of data follow a successful READ.
    async fn reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>) {
        // Structured READ replies carry their own offsets; only the length matters here.
        let a = self.answer((read_len > 0).then_some((0, read_len))).await;
        (a.handle, a.error, a.data)
    }

    /// One request, one reply.
    async fn ask(&mut self, command: u16, flags: u16, offset: u64, len: u32) -> Answer {
        self.request(command, flags, 99, offset, len).await;
        let read = (command == proto::CMD_READ).then_some((offset, len as usize));
        let a = self.answer(read).await;
        assert_eq!(a.handle, 99);
        a
    }

    /// One request, one reply; returns (error, data).
    async fn call(&mut self, command: u16, flags: u16, offset: u64, len: u32) -> (u32, Vec<u8>) {
        let a = self.ask(command, flags, offset, len).await;
        (a.error, a.data)
    }

    async fn call_write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.write(98, offset, data, flags).await;
        let a = self.answer(None).await;
        assert_eq!(a.handle, 98);
        a.error
    }

    /// The server closed its side: reading gives EOF (or an error).
    async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let n = within(self.s.read(&mut b)).await.unwrap_or(0);
        assert_eq!(n, 0, "expected the server to close the connection");
    }

    async fn disconnect(mut self, task: JoinHandle<crate::Result<()>>) {
        self.request(proto::CMD_DISC, 0, 0, 0, 0).await;
        self.expect_closed().await;
        within(task).await.unwrap().unwrap();
    }
}

fn mem() -> Arc<MemDevice> {
    Arc::new(MemDevice::new(SIZE))
}

/// A device whose reads at offset 0 (and, if asked, flushes) wait until
/// the test opens the gate. Counts the device calls running at once.
struct GatedDevice {
    inner: MemDevice,
    gate_flush: bool,
    /// Every call sleeps 2 ms, so that calls that may overlap do.
    slow: bool,
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicBool,
    running: AtomicUsize,
    most_running: AtomicUsize,
    /// The calls in the order they started and ended ("read 0", "end read 0", "flush" ...).
    log: Mutex<Vec<String>>,
}

impl GatedDevice {
    fn new() -> Arc<Self> {
        Self::build(SIZE, false, false)
    }

    fn gating_flushes() -> Arc<Self> {
        Self::build(SIZE, true, false)
    }

    /// `size` bytes, slow calls, reads at 0 gated.
    fn slow(size: u64) -> Arc<Self> {
        Self::build(size, false, true)
    }

    fn build(size: u64, gate_flush: bool, slow: bool) -> Arc<Self> {
        Arc::new(GatedDevice {
            inner: MemDevice::new(size),
            gate_flush,
            slow,
            open: Mutex::new(false),
            opened: Condvar::new(),
            waiting: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        })
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    async fn wait_until_blocked(&self) {
        within(async {
            while !self.waiting.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    fn wait_gate(&self) {
        self.waiting.store(true, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }

    /// Runs `f` as one device call: counted, logged, gated if `gated`.
    fn call<T>(&self, what: String, gated: bool, f: impl FnOnce() -> T) -> T {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_running.fetch_max(now, Ordering::SeqCst);
        self.log.lock().unwrap().push(what.clone());
        if gated {
            self.wait_gate();
        }
        if self.slow {
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = f();
        self.log.lock().unwrap().push(format!("end {what}"));
        self.running.fetch_sub(1, Ordering::SeqCst);
        out
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn most_running(&self) -> usize {
        self.most_running.load(Ordering::SeqCst)
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        self.call(format!("read {offset}"), offset == 0, || self.inner.read_at(offset, buf))
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> crate::Result<()> {
        self.call(format!("write {offset}"), false, || self.inner.write_at(offset, data, fua))
    }
    fn write_zeroes(&self, offset: u64, len: u64, how: Zeroing) -> crate::Result<()> {
        self.inner.write_zeroes(offset, len, how)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn flush(&self) -> crate::Result<()> {
        self.call("flush".to_string(), self.gate_flush, || self.inner.flush())
    }
}
