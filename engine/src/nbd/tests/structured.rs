//! Structured replies: READ as data and hole chunks (one chunk with DF),
//! errors as error chunks with a message, BLOCK_STATUS extents, and the
//! WRITE_ZEROES flags as the device receives them.

use super::*;

const DATA: u16 = proto::REPLY_TYPE_OFFSET_DATA;
const HOLE: u16 = proto::REPLY_TYPE_OFFSET_HOLE;
const DONE: u16 = proto::REPLY_FLAG_DONE;
const ERROR: u16 = proto::REPLY_TYPE_ERROR;
const ZERO: u32 = proto::STATE_ZERO;

/// 1 MiB, data at [4096, 8192) and [12288, 12388), zeroes elsewhere.
fn patterned() -> Arc<MemDevice> {
    let mut bytes = vec![0u8; SIZE as usize];
    bytes[4096..8192].fill(0x5a);
    bytes[12288..12388].fill(0xa5);
    Arc::new(MemDevice::from_bytes(bytes))
}

async fn structured_client(h: &Harness) -> (Client, JoinHandle<crate::Result<()>>) {
    let (mut c, task) = h.connect();
    c.go_with(EXPORT, Go { structured: true, meta: Some(&[proto::BASE_ALLOCATION]) }).await;
    (c, task)
}

#[tokio::test]
async fn reads_send_zero_runs_as_holes_and_one_data_chunk_with_df() {
    let dev = patterned();
    let h = Harness::new(dev.clone());
    let (mut c, task) = structured_client(&h).await;

    let a = c.ask(proto::CMD_READ, 0, 0, 16384).await;
    assert_eq!(a.error, 0);
    assert_eq!(a.data, dev.contents()[..16384]);
    assert_eq!(a.chunks, [(HOLE, 0), (DATA, 0), (HOLE, 0), (DATA, DONE)], "4 KiB granules, neighbours merged");

    // Unaligned: the granules stay aligned to the device, so the first is short.
    let a = c.ask(proto::CMD_READ, 0, 100, 8000).await;
    assert_eq!(a.data, dev.contents()[100..8100]);
    assert_eq!(a.chunks, [(HOLE, 0), (DATA, DONE)]);

    // DF: one content chunk, zeroes included.
    let a = c.ask(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 16384).await;
    assert_eq!(a.data, dev.contents()[..16384]);
    assert_eq!(a.chunks, [(DATA, DONE)]);

    let all_zero = c.ask(proto::CMD_READ, 0, 65536, 65536).await;
    assert_eq!((all_zero.data, all_zero.chunks), (vec![0; 65536], vec![(HOLE, DONE)]));
    let empty = c.ask(proto::CMD_READ, 0, 0, 0).await;
    assert_eq!((empty.error, empty.chunks), (0, vec![(proto::REPLY_TYPE_NONE, DONE)]));
    c.disconnect(task).await;
}

#[tokio::test]
async fn errors_are_error_chunks_with_a_message_even_for_bad_reads() {
    let h = Harness::new(mem());
    let (mut c, task) = structured_client(&h).await;

    let a = c.ask(proto::CMD_READ, 0, SIZE - 10, 11).await;
    assert_eq!((a.error, a.chunks.clone()), (proto::EINVAL, vec![(ERROR, DONE)]), "never a simple reply to READ");
    assert!(a.message.contains("goes past the end"), "{}", a.message);
    let a = c.ask(proto::CMD_READ, proto::CMD_FLAG_REQ_ONE, 0, 512).await;
    assert_eq!((a.error, a.chunks.clone()), (proto::EINVAL, vec![(ERROR, DONE)]), "bad flags on READ");
    assert!(a.message.contains("not valid on READ"), "{}", a.message);
    let a = c.ask(proto::CMD_READ, 0, 0, (32 << 20) + 1).await;
    assert_eq!(a.error, proto::EOVERFLOW, "a structured client may ask, and hears it is too large");
    let a = c.ask(proto::CMD_WRITE_ZEROES, 0, SIZE - 1, 2).await;
    assert_eq!(a.error, proto::ENOSPC);
    let a = c.ask(77, 0, 0, 0).await;
    assert_eq!(a.error, proto::EINVAL);
    assert!(a.message.contains("unknown command 77"), "{}", a.message);
    assert_eq!(c.call_write(SIZE - 2, &[9; 8], 0).await, proto::ENOSPC, "the payload is skipped");
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 4).await, (0, vec![0; 4]), "still usable");
    c.disconnect(task).await;

    // A device error reaches the client with its reason.
    struct Broken;
    impl BlockDevice for Broken {
        fn size(&self) -> u64 {
            SIZE
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> crate::Result<()> {
            Err(crate::Error::FailedPrecondition("disk d of VM v is no longer protected".into()))
        }
        fn write_at(&self, _: u64, _: &[u8], _: bool) -> crate::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: Zeroing) -> crate::Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64, _: bool) -> crate::Result<()> {
            Ok(())
        }
        fn flush(&self) -> crate::Result<()> {
            Ok(())
        }
    }
    let h = Harness::new(Arc::new(Broken));
    let (mut c, task) = structured_client(&h).await;
    let a = c.ask(proto::CMD_READ, 0, 0, 512).await;
    assert_eq!(a.error, proto::EIO);
    assert!(a.message.contains("no longer protected"), "{}", a.message);
    // The default block status: all data.
    let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 4096, 8192).await;
    assert_eq!(a.extents, [(8192, 0)]);
    c.disconnect(task).await;
}

#[tokio::test]
async fn block_status_reports_zero_and_data_runs() {
    let h = Harness::new(patterned());
    let (mut c, task) = structured_client(&h).await;

    let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 0, SIZE as u32).await;
    assert_eq!(a.error, 0);
    assert_eq!(a.chunks, [(proto::REPLY_TYPE_BLOCK_STATUS, DONE)]);
    assert_eq!(a.context, Some(super::super::handshake::ALLOCATION_CONTEXT));
    let rest = (SIZE - 16384) as u32;
    assert_eq!(a.extents, [(4096, ZERO), (4096, 0), (4096, ZERO), (4096, 0), (rest, ZERO)]);

    // REQ_ONE: one extent, never longer than asked.
    let a = c.ask(proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_REQ_ONE, 0, SIZE as u32).await;
    assert_eq!(a.extents, [(4096, ZERO)]);
    let a = c.ask(proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_REQ_ONE, 4096, 100).await;
    assert_eq!(a.extents, [(100, 0)]);
    let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 100, 200).await;
    assert_eq!(a.extents, [(200, ZERO)], "a range inside one granule");

    for (offset, len) in [(SIZE - 4096, 4097u32), (u64::MAX - 10, 20), (0, 0)] {
        let a = c.ask(proto::CMD_BLOCK_STATUS, 0, offset, len).await;
        assert_eq!(a.error, proto::EINVAL, "{offset}+{len}");
    }
    c.disconnect(task).await;
}

/// A large device of alternating 512-byte data and zero extents; reads are zeroes.
struct Chequered;

impl BlockDevice for Chequered {
    fn size(&self) -> u64 {
        1 << 40
    }
    fn read_at(&self, _: u64, buf: &mut [u8]) -> crate::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: u64, _: &[u8], _: bool) -> crate::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: Zeroing) -> crate::Result<()> {
        Ok(())
    }
    fn trim(&self, _: u64, _: u64, _: bool) -> crate::Result<()> {
        Ok(())
    }
    fn flush(&self) -> crate::Result<()> {
        Ok(())
    }
    /// Deliberately careless: ignores `max_extents` and `len`, and slips in
    /// empty extents; the server must still send a valid, bounded reply.
    fn block_status(&self, _: u64, _: u64, max_extents: usize) -> crate::Result<Vec<Extent>> {
        Ok((0..2 * max_extents + 10)
            .map(|i| Extent { len: if i % 7 == 3 { 0 } else { 512 }, flags: if i % 2 == 0 { 0 } else { ZERO } })
            .collect())
    }
}

#[tokio::test]
async fn block_status_replies_are_capped_and_tidy_whatever_the_device_says() {
    let h = Harness::new(Arc::new(Chequered));
    let (mut c, task) = structured_client(&h).await;
    let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 0, u32::MAX).await;
    assert_eq!(a.error, 0);
    assert_eq!(a.extents.len(), MAX_EXTENTS, "at most MAX_EXTENTS descriptors");
    assert!(a.extents.iter().all(|&(len, _)| len > 0), "no empty descriptor");
    assert!(a.extents.windows(2).all(|w| w[0].1 != w[1].1), "neighbours differ");
    let covered: u64 = a.extents.iter().map(|&(len, _)| u64::from(len)).sum();
    assert!(covered < u64::from(u32::MAX), "short of the request: the client asks again");
    let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 0, 1000).await;
    let covered: u32 = a.extents.iter().map(|&(len, _)| len).sum();
    assert_eq!(covered, 1000, "never past the request");
    c.disconnect(task).await;
}

/// Records how each WRITE_ZEROES was asked for; refuses fast zeroing when told to.
struct ZeroRecorder {
    inner: MemDevice,
    refuse_fast: bool,
    seen: Mutex<Vec<Zeroing>>,
}

impl BlockDevice for ZeroRecorder {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> crate::Result<()> {
        self.inner.write_at(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, how: Zeroing) -> crate::Result<()> {
        self.seen.lock().unwrap().push(how);
        if self.refuse_fast {
            let e = std::io::Error::from(std::io::ErrorKind::Unsupported);
            return Err(crate::Error::io("zero", e));
        }
        self.inner.write_zeroes(offset, len, how)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn flush(&self) -> crate::Result<()> {
        self.inner.flush()
    }
}

#[tokio::test]
async fn write_zeroes_flags_reach_the_device_and_only_fast_refusals_are_enotsup() {
    for structured in [false, true] {
        let dev = Arc::new(ZeroRecorder { inner: MemDevice::new(SIZE), refuse_fast: false, seen: Mutex::default() });
        dev.inner.write_at(0, &[1; 8192], false).unwrap();
        let h = Harness::new(dev.clone());
        let (mut c, task) = h.connect();
        c.go_with(EXPORT, Go { structured, meta: None }).await;
        let z = proto::CMD_WRITE_ZEROES;
        assert_eq!(c.call(z, proto::CMD_FLAG_NO_HOLE, 0, 4096).await.0, 0);
        assert_eq!(c.call(z, proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_FUA, 4096, 4096).await.0, 0);
        assert_eq!(c.call(z, 0, 8192, 4096).await.0, 0);
        let seen = dev.seen.lock().unwrap().clone();
        let how = |fua, keep_allocated, fast_only| Zeroing { fua, keep_allocated, fast_only };
        assert_eq!(seen, [how(false, true, false), how(true, false, true), how(false, false, false)]);
        assert!(dev.inner.contents()[..8192].iter().all(|&b| b == 0));
        c.disconnect(task).await;
    }

    let dev = Arc::new(ZeroRecorder { inner: MemDevice::new(SIZE), refuse_fast: true, seen: Mutex::default() });
    let h = Harness::new(dev);
    let (mut c, task) = structured_client(&h).await;
    let a = c.ask(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_FAST_ZERO, 0, 4096).await;
    assert_eq!(a.error, proto::ENOTSUP, "a fast zero that cannot be fast");
    assert!(a.message.contains("no faster"), "{}", a.message);
    let a = c.ask(proto::CMD_WRITE_ZEROES, 0, 0, 4096).await;
    assert_eq!(a.error, proto::EIO, "without FAST_ZERO the spec forbids ENOTSUP");
    c.disconnect(task).await;
}
