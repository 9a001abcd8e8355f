//! The server driven over `tokio::io::duplex` by a small hand-written client.
//! One file (about 700 lines): each test is a short exchange with the one
//! client defined here, and they read best side by side with the spec.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::proto::{self, Request};
use super::*;

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
        let catalog = MapCatalog::new().with(EXPORT, device).with("vm2/disk0", Arc::new(MemDevice::new(4096)));
        let shutdown = CancellationToken::new();
        let server = NbdServer::new(Arc::new(TestCatalog { inner: catalog }), shutdown.clone());
        Harness { server, shutdown }
    }

    fn connect(&self) -> (Client, JoinHandle<crate::Result<()>>) {
        let (client, server_side) = tokio::io::duplex(4 << 20);
        let server = self.server.clone();
        let task = tokio::spawn(async move { server.serve_connection(server_side).await });
        (Client { s: client }, task)
    }
}

struct Client {
    s: DuplexStream,
}

struct OptReply {
    option: u32,
    reply_type: u32,
    data: Vec<u8>,
}

impl Client {
    /// Reads the greeting and sends our flags.
    async fn greet(&mut self, client_flags: u32) {
        let mut g = [0u8; proto::GREETING_LEN];
        self.s.read_exact(&mut g).await.unwrap();
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
        self.s.read_exact(&mut h).await.unwrap();
        assert_eq!(proto::be_u64(&h[0..8]), proto::OPTION_REPLY_MAGIC);
        let mut data = vec![0u8; proto::be_u32(&h[16..20]) as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptReply { option: proto::be_u32(&h[8..12]), reply_type: proto::be_u32(&h[12..16]), data }
    }

    /// Sends INFO or GO and collects the NBD_REP_INFO payloads up to the final reply.
    async fn info(&mut self, option: u32, name: &str, requests: &[u16]) -> (Vec<Vec<u8>>, u32) {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        self.send_option(option, &data).await;
        let mut infos = Vec::new();
        loop {
            let r = self.option_reply().await;
            assert_eq!(r.option, option);
            if r.reply_type == proto::REP_INFO {
                infos.push(r.data);
            } else {
                return (infos, r.reply_type);
            }
        }
    }

    /// Full handshake with GO; returns (size, transmission flags).
    async fn go(&mut self, name: &str) -> (u64, u16) {
        self.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
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

    /// Reads a simple reply; `read_len` bytes of data follow a successful READ.
    async fn reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        within(self.s.read_exact(&mut h)).await.unwrap();
        assert_eq!(proto::be_u32(&h[0..4]), proto::SIMPLE_REPLY_MAGIC);
        let (error, handle) = (proto::be_u32(&h[4..8]), proto::be_u64(&h[8..16]));
        let mut data = Vec::new();
        if error == 0 && read_len > 0 {
            data = vec![0u8; read_len];
            within(self.s.read_exact(&mut data)).await.unwrap();
        }
        (handle, error, data)
    }

    /// One request, one reply; returns (error, data).
    async fn call(&mut self, command: u16, flags: u16, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.request(command, flags, 99, offset, len).await;
        let read_len = if command == proto::CMD_READ { len as usize } else { 0 };
        let (handle, error, data) = self.reply(read_len).await;
        assert_eq!(handle, 99);
        (error, data)
    }

    async fn call_write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.write(98, offset, data, flags).await;
        let (handle, error, _) = self.reply(0).await;
        assert_eq!(handle, 98);
        error
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

#[tokio::test]
async fn go_negotiates_size_flags_and_requested_infos() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    let want = [proto::INFO_NAME, proto::INFO_DESCRIPTION, proto::INFO_BLOCK_SIZE, 0x7777];
    let (infos, last) = c.info(proto::OPT_GO, EXPORT, &want).await;
    assert_eq!(last, proto::REP_ACK);
    let by_type = |t: u16| infos.iter().find(|i| proto::be_u16(i) == t).cloned();

    let export = by_type(proto::INFO_EXPORT).expect("EXPORT always sent");
    assert_eq!(proto::be_u64(&export[2..10]), SIZE);
    let flags = proto::be_u16(&export[10..12]);
    for f in [
        proto::FLAG_HAS_FLAGS,
        proto::FLAG_SEND_FLUSH,
        proto::FLAG_SEND_FUA,
        proto::FLAG_SEND_TRIM,
        proto::FLAG_SEND_WRITE_ZEROES,
        proto::FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} advertised");
    }
    assert_eq!(flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(&by_type(proto::INFO_NAME).unwrap()[2..], EXPORT.as_bytes());
    assert_eq!(&by_type(proto::INFO_DESCRIPTION).unwrap()[2..], b"disk vm1/disk0");
    let bs = by_type(proto::INFO_BLOCK_SIZE).unwrap();
    assert_eq!((proto::be_u32(&bs[2..6]), proto::be_u32(&bs[6..10]), proto::be_u32(&bs[10..14])), (1, 4096, 32 << 20));
    assert_eq!(infos.len(), 4, "the unknown info type is ignored");

    let (error, data) = c.call(proto::CMD_READ, 0, 0, 512).await;
    assert_eq!((error, data), (0, vec![0u8; 512]));
    c.disconnect(task).await;
}

#[tokio::test]
async fn export_name_enters_transmission_with_and_without_zeroes() {
    for no_zeroes in [false, true] {
        let dev = mem();
        let h = Harness::new(dev.clone());
        let (mut c, task) = h.connect();
        let flags = proto::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_C_NO_ZEROES } else { 0 };
        c.greet(flags).await;
        c.send_option(proto::OPT_EXPORT_NAME, EXPORT.as_bytes()).await;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        c.s.read_exact(&mut reply).await.unwrap();
        assert_eq!(proto::be_u64(&reply[0..8]), SIZE);
        assert_ne!(proto::be_u16(&reply[8..10]) & proto::FLAG_SEND_FLUSH, 0);
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(c.call_write(4096, b"hello", 0).await, 0);
        assert_eq!(&dev.contents()[4096..4101], b"hello");
        c.disconnect(task).await;
    }
}

#[tokio::test]
async fn export_name_of_unknown_export_closes() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    assert!(within(task).await.unwrap().is_err());
}

#[tokio::test]
async fn list_info_unknown_and_unsupported_options_keep_haggling() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;

    c.send_option(proto::OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let r = c.option_reply().await;
        assert_eq!(r.option, proto::OPT_LIST);
        if r.reply_type == proto::REP_ACK {
            break;
        }
        assert_eq!(r.reply_type, proto::REP_SERVER);
        let len = proto::be_u32(&r.data[0..4]) as usize;
        names.push(String::from_utf8(r.data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, vec!["vm1/disk0".to_string(), "vm2/disk0".to_string()]);

    c.send_option(proto::OPT_LIST, b"junk").await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_INVALID);

    let (infos, last) = c.info(proto::OPT_INFO, "vm2/disk0", &[]).await;
    assert_eq!(last, proto::REP_ACK);
    assert_eq!(proto::be_u64(&infos[0][2..10]), 4096);

    let (infos, last) = c.info(proto::OPT_GO, "vm9/none", &[]).await;
    assert!(infos.is_empty());
    assert_eq!(last, proto::REP_ERR_UNKNOWN);

    // A truncated INFO request is invalid, not fatal.
    c.send_option(proto::OPT_INFO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_INVALID);

    for option in [
        proto::OPT_STARTTLS,
        proto::OPT_STRUCTURED_REPLY,
        proto::OPT_LIST_META_CONTEXT,
        proto::OPT_SET_META_CONTEXT,
        proto::OPT_EXTENDED_HEADERS,
        proto::OPT_PEEK_EXPORT,
        0xdead_beef,
    ] {
        c.send_option(option, &[1, 2, 3, 4, 5, 6, 7]).await;
        let r = c.option_reply().await;
        assert_eq!((r.option, r.reply_type), (option, proto::REP_ERR_UNSUP));
    }

    // Still haggling: GO works after all that.
    let (infos, last) = c.info(proto::OPT_GO, EXPORT, &[]).await;
    assert_eq!(last, proto::REP_ACK);
    assert_eq!(proto::be_u64(&infos[0][2..10]), SIZE);
    c.disconnect(task).await;
}

#[tokio::test]
async fn abort_is_acked_and_closes() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_ABORT, &[]).await;
    let r = c.option_reply().await;
    assert_eq!((r.option, r.reply_type), (proto::OPT_ABORT, proto::REP_ACK));
    c.expect_closed().await;
    within(task).await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_option_gets_too_big_and_closes_without_allocating() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let header = proto::OptionHeader { magic: proto::IHAVEOPT, option: proto::OPT_GO, len: u32::MAX };
    c.s.write_all(&header.encode()).await.unwrap();
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_TOO_BIG);
    c.expect_closed().await;
    assert!(within(task).await.unwrap().is_err());
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | 0x80).await;
    c.expect_closed().await;
    assert!(within(task).await.unwrap().is_err());
}

#[tokio::test]
async fn read_write_flush_trim_write_zeroes_round_trip() {
    let dev = mem();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    assert_eq!(c.go(EXPORT).await.0, SIZE);

    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(c.call_write(8192, &pattern, 0).await, 0);
    let (error, data) = c.call(proto::CMD_READ, 0, 8192, pattern.len() as u32).await;
    assert_eq!(error, 0);
    assert_eq!(data, pattern);

    assert_eq!(c.call_write(0, &[0xab; 4096], proto::CMD_FLAG_FUA).await, 0);
    assert_eq!(dev.fua_write_count(), 1);
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0).await.0, 0);
    assert_eq!(dev.flush_count(), 1);

    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 8192, 4096).await.0, 0);
    assert_eq!(c.call(proto::CMD_TRIM, proto::CMD_FLAG_FUA, 8192 + 4096, 4096).await.0, 0);
    assert_eq!(dev.fua_write_count(), 2);
    assert_eq!(c.call(proto::CMD_CACHE, 0, 0, 4096).await.0, 0);
    let (_, data) = c.call(proto::CMD_READ, 0, 8192, pattern.len() as u32).await;
    assert!(data[..8192].iter().all(|&b| b == 0));
    assert_eq!(data[8192..], pattern[8192..]);
    assert_eq!(dev.contents()[..4096], [0xab; 4096]);

    // The last byte of the disk is reachable; zero-length requests are harmless.
    assert_eq!(c.call_write(SIZE - 1, &[1], 0).await, 0);
    assert_eq!(c.call(proto::CMD_READ, 0, SIZE - 1, 1).await, (0, vec![1]));
    assert_eq!(c.call(proto::CMD_READ, 0, SIZE, 0).await, (0, vec![]));
    c.disconnect(task).await;
}

#[tokio::test]
async fn bad_requests_get_errors_and_the_connection_stays_usable() {
    let dev = mem();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;

    assert_eq!(c.call(proto::CMD_READ, 0, SIZE - 10, 11).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_READ, 0, u64::MAX - 1, 16).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_TRIM, 0, SIZE, 1).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, 0, SIZE - 1, 2).await.0, proto::ENOSPC);
    assert_eq!(c.call(proto::CMD_CACHE, 0, SIZE, 1).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_READ, 0, 0, (32 << 20) + 1).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_BLOCK_STATUS, 0, 0, 4096).await.0, proto::EINVAL);
    assert_eq!(c.call(77, 0, 0, 0).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 512).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_FAST_ZERO, 0, 512).await.0, proto::EINVAL);

    // Rejected writes still have their payload consumed.
    assert_eq!(c.call_write(SIZE - 2, &[9; 8], 0).await, proto::ENOSPC);
    assert_eq!(c.call_write(u64::MAX - 2, &[9; 8], 0).await, proto::EINVAL);
    c.write(5, 0, &[9; 8], proto::CMD_FLAG_DF).await;
    assert_eq!(c.reply(0).await.1, proto::EINVAL);
    let huge = vec![7u8; (32 << 20) + 4096];
    c.write(6, 0, &huge, 0).await;
    assert_eq!(c.reply(0).await, (6, proto::EINVAL, vec![]));
    assert!(dev.contents().iter().all(|&b| b == 0), "no rejected write reached the disk");

    assert_eq!(c.call_write(100, b"still here", 0).await, 0);
    assert_eq!(c.call(proto::CMD_READ, 0, 100, 10).await, (0, b"still here".to_vec()));
    c.disconnect(task).await;
}

#[tokio::test]
async fn bad_request_magic_closes() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    let mut r = Request { flags: 0, command: proto::CMD_READ, handle: 1, offset: 0, len: 512 }.encode();
    r[0] ^= 0xff;
    c.s.write_all(&r).await.unwrap();
    c.expect_closed().await;
    assert!(within(task).await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_pipelined_writes_all_answered_with_their_handles() {
    let dev = mem();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    for i in 0..100u64 {
        c.write(1000 + i, i * 4096, &[i as u8 + 1; 4096], 0).await;
    }
    let mut handles: Vec<u64> = Vec::new();
    for _ in 0..100 {
        let (handle, error, _) = c.reply(0).await;
        assert_eq!(error, 0);
        handles.push(handle);
    }
    handles.sort();
    assert_eq!(handles, (1000..1100).collect::<Vec<_>>());
    let disk = dev.contents();
    for i in 0..100usize {
        assert!(disk[i * 4096..(i + 1) * 4096].iter().all(|&b| b == i as u8 + 1), "block {i}");
    }

    // Pipelined reads come back with their own data.
    for i in 0..100u64 {
        c.request(proto::CMD_READ, 0, 5000 + i, i * 4096, 4096).await;
    }
    for _ in 0..100 {
        let (handle, error, data) = c.reply(4096).await;
        assert_eq!(error, 0);
        let i = handle - 5000;
        assert!(data.iter().all(|&b| b == i as u8 + 1), "read {i}");
    }
    c.disconnect(task).await;
}

/// A device whose reads at offset 0 wait until the test opens the gate.
struct GatedDevice {
    inner: MemDevice,
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicBool,
}

impl GatedDevice {
    fn new() -> Arc<Self> {
        Arc::new(GatedDevice {
            inner: MemDevice::new(SIZE),
            open: Mutex::new(false),
            opened: Condvar::new(),
            waiting: AtomicBool::new(false),
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
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        if offset == 0 {
            self.waiting.store(true, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> crate::Result<()> {
        self.inner.write_at(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()> {
        self.inner.write_zeroes(offset, len, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn flush(&self) -> crate::Result<()> {
        self.inner.flush()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_out_in_completion_order() {
    let dev = GatedDevice::new();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    c.request(proto::CMD_READ, 0, 1, 0, 512).await;
    dev.wait_until_blocked().await;
    c.request(proto::CMD_READ, 0, 2, 4096, 512).await;
    assert_eq!(c.reply(512).await.0, 2, "the fast read overtakes the blocked one");
    dev.release();
    assert_eq!(c.reply(512).await.0, 1);
    c.disconnect(task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_and_shutdown_let_in_flight_requests_reply_first() {
    // DISC while a read is in flight: the read is answered, then the close.
    let dev = GatedDevice::new();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    c.request(proto::CMD_READ, 0, 1, 0, 512).await;
    dev.wait_until_blocked().await;
    c.request(proto::CMD_DISC, 0, 0, 0, 0).await;
    dev.release();
    assert_eq!(c.reply(512).await.0, 1);
    c.expect_closed().await;
    within(task).await.unwrap().unwrap();

    // Shutdown while a read is in flight: same, and new connections are refused.
    let dev = GatedDevice::new();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    c.request(proto::CMD_READ, 0, 7, 0, 512).await;
    dev.wait_until_blocked().await;
    h.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    dev.release();
    assert_eq!(c.reply(512).await, (7, 0, vec![0; 512]));
    c.expect_closed().await;
    within(task).await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_closes_connections_in_handshake_and_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let h = Harness::new(mem());
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let server = h.server.clone();
    let serving = tokio::spawn(async move { server.serve_unix(listener).await });
    let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut g = [0u8; proto::GREETING_LEN];
    within(stream.read_exact(&mut g)).await.unwrap();
    h.shutdown.cancel();
    within(serving).await.unwrap().unwrap();
    let mut b = [0u8; 1];
    assert_eq!(within(stream.read(&mut b)).await.unwrap_or(0), 0);
}

/// A device that fails: writes with ENOSPC, reads with EIO, flush with a bad argument.
struct FailingDevice;

impl BlockDevice for FailingDevice {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, _: u64, _: &mut [u8]) -> crate::Result<()> {
        Err(crate::Error::io("read", std::io::Error::from_raw_os_error(libc::EIO)))
    }
    fn write_at(&self, _: u64, _: &[u8], _: bool) -> crate::Result<()> {
        Err(crate::Error::io("write", std::io::Error::from_raw_os_error(libc::ENOSPC)))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> crate::Result<()> {
        Err(crate::Error::io("zero", std::io::Error::from_raw_os_error(libc::EDQUOT)))
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> crate::Result<()> {
        panic!("a buggy device");
    }
    fn flush(&self) -> crate::Result<()> {
        Err(crate::Error::invalid("flush", "test"))
    }
}

#[tokio::test]
async fn device_errors_map_to_protocol_errors() {
    let h = Harness::new(Arc::new(FailingDevice));
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 512).await, (proto::EIO, vec![]));
    assert_eq!(c.call_write(0, &[1; 512], 0).await, proto::ENOSPC);
    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, 0, 0, 512).await.0, proto::ENOSPC);
    assert_eq!(c.call(proto::CMD_TRIM, 0, 0, 512).await.0, proto::EIO, "a panic is answered");
    assert_eq!(c.call(proto::CMD_FLUSH, 0, 0, 0).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 512).await.0, proto::EIO);
    c.disconnect(task).await;
}

#[tokio::test]
async fn mem_device_and_map_catalog_behave() {
    let dev = MemDevice::new(16);
    dev.write_at(4, b"abcd", false).unwrap();
    let mut buf = [0u8; 4];
    dev.read_at(4, &mut buf).unwrap();
    assert_eq!(&buf, b"abcd");
    assert!(dev.read_at(14, &mut buf).is_err());
    assert!(dev.write_at(u64::MAX, b"x", false).is_err());
    dev.trim(4, 2, false).unwrap();
    assert_eq!(&dev.contents()[4..8], b"\0\0cd");

    let cat = MapCatalog::new();
    cat.insert("b/1", Arc::new(MemDevice::new(1)));
    cat.insert("a/1", Arc::new(MemDevice::new(2)));
    assert_eq!(cat.names(), vec!["a/1", "b/1"]);
    assert_eq!(cat.open("a/1").unwrap().size(), 2);
    assert!(cat.remove("a/1").is_some());
    assert!(cat.open("a/1").is_none());
    assert_eq!(cat.describe("b/1"), None);
}

/// Runs the server on `bytes` sent after a GO handshake (or from the very
/// start), then hangs up: the server must end, without panicking.
fn survive(bytes: &[u8], after_handshake: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        let h = Harness::new(mem());
        let (mut c, task) = h.connect();
        if after_handshake {
            c.go(EXPORT).await;
        }
        let _ = c.s.write_all(bytes).await;
        let _ = c.s.shutdown().await;
        // Drain replies so the server is never blocked on a full pipe.
        let drain = async {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(c.s.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let (_, result) = tokio::join!(drain, async { within(task).await });
        assert!(result.is_ok(), "server task panicked: {result:?}");
    });
}

/// Random requests that mostly carry the right magic, so they get past the first check.
fn request_like() -> impl Strategy<Value = Vec<u8>> {
    let header = (any::<u16>(), 0u16..10, any::<u64>(), prop_oneof![0u64..SIZE + 10, any::<u64>()], 0u32..70_000)
        .prop_map(|(flags, command, handle, offset, len)| {
            Request { flags: flags & 0x1f, command, handle, offset, len }.encode().to_vec()
        });
    let noise = proptest::collection::vec(any::<u8>(), 0..200);
    proptest::collection::vec(prop_oneof![3 => header, 1 => noise], 0..20).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_after_handshake_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        survive(&bytes, true);
    }

    #[test]
    fn random_requests_never_panic(bytes in request_like()) {
        survive(&bytes, true);
    }

    #[test]
    fn random_handshake_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        survive(&bytes, false);
    }
}
