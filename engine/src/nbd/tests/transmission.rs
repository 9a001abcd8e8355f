//! The commands on simple replies: round trips, errors that keep the
//! connection usable, pipelining, completion order, DISC and shutdown
//! with requests in flight, device failures.

use super::*;

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
    assert_eq!(c.call(proto::CMD_READ, 0, 0, (32 << 20) + 1).await.0, proto::EINVAL, "over the payload limit");
    assert_eq!(c.call(proto::CMD_BLOCK_STATUS, 0, 0, 4096).await.0, proto::EINVAL);
    assert_eq!(c.call(77, 0, 0, 0).await.0, proto::EINVAL);
    assert_eq!(c.call(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 512).await.0, proto::EINVAL, "DF needs structured");
    assert_eq!(c.call(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_REQ_ONE, 0, 512).await.0, proto::EINVAL);

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
async fn pipelined_plain_writes_are_served_as_one_batch_in_arrival_order() {
    let dev = mem();
    let h = Harness::new(dev.clone());
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    // 16 writes, then a READ of them, then two overlapping writes elsewhere,
    // all sent before any reply is read: the writes before the READ reach
    // the device before it (it sees them), the overlapping ones in order.
    // (A READ and a later WRITE in flight at once have no order in NBD.)
    for i in 0..16u64 {
        c.write(i, i * 4096, &[i as u8 + 1; 4096], 0).await;
    }
    c.request(proto::CMD_READ, 0, 100, 0, 16 * 4096).await;
    let later = 16 * 4096;
    c.write(200, later, &[0xaa; 8192], 0).await;
    c.write(201, later + 4096, &[0xbb; 4096], 0).await; // overlaps the one before: must land after it
    c.write(202, SIZE, &[1; 512], 0).await; // past the end: rejected, the rest unharmed
    let mut handles = std::collections::BTreeMap::new();
    for _ in 0..20 {
        // Simple replies: only the READ's (handle 100) carries data.
        let mut head = [0u8; proto::SIMPLE_REPLY_LEN];
        within(c.s.read_exact(&mut head)).await.unwrap();
        let (error, handle) = (proto::be_u32(&head[4..8]), proto::be_u64(&head[8..16]));
        let mut data = vec![];
        if handle == 100 {
            assert_eq!(error, 0);
            data = vec![0u8; 16 * 4096];
            within(c.s.read_exact(&mut data)).await.unwrap();
            let want: Vec<u8> = (0..16u8).flat_map(|i| [i + 1; 4096]).collect();
            assert!(data == want, "the READ sees every write sent before it");
        }
        handles.insert(handle, (error, data));
    }
    let got: Vec<u64> = handles.keys().copied().collect();
    let mut want: Vec<u64> = (0..16).collect();
    want.extend([100, 200, 201, 202]);
    assert_eq!(got, want, "one reply per request");
    assert!(handles.iter().all(|(h, (e, _))| (*h == 202) == (*e != 0)), "only the write past the end failed");
    assert!(dev.largest_batch() >= 2, "pipelined writes reached the device together");
    let data = dev.contents();
    assert!(data[8192..12288] == [3; 4096]);
    assert!(data[later as usize..][..4096] == [0xaa; 4096]);
    assert!(data[later as usize + 4096..][..4096] == [0xbb; 4096], "overlapping writes in arrival order");
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
    fn write_zeroes(&self, _: u64, _: u64, _: Zeroing) -> crate::Result<()> {
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
