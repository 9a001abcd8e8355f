//! What a hostile or broken client cannot take: connection slots (server
//! and export caps), time (handshake and idle timeouts, on paused time),
//! device calls and buffer memory server-wide; and what every client
//! hears at shutdown (ESHUTDOWN, NBD_REP_ERR_SHUTDOWN) instead of silence.

use super::*;

fn limits(f: impl FnOnce(&mut NbdLimits)) -> NbdLimits {
    let mut l = NbdLimits::default();
    f(&mut l);
    l
}

#[test]
fn limits_outside_their_bounds_are_refused_by_name() {
    let catalog = Arc::new(MapCatalog::new());
    let bad = limits(|l| l.device_calls = 0);
    let err = NbdServer::with_limits(catalog, bad, CancellationToken::new()).err().expect("refused");
    assert!(err.to_string().contains("device_calls"), "{err}");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_before_the_greeting() {
    let h = Harness::with_limits(mem(), limits(|l| l.max_connections = 2));
    let (mut c1, t1) = h.connect();
    let (mut c2, t2) = h.connect();
    c1.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c2.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;

    let (mut c3, t3) = h.connect();
    c3.expect_closed().await;
    let err = within(t3).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("2 connections are open, the limit"), "{err}");

    // A slot frees when a connection ends.
    c1.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(c1.option_reply().await.reply_type, proto::REP_ACK);
    within(t1).await.unwrap().unwrap();
    let (mut c4, t4) = h.connect();
    c4.go(EXPORT).await;
    c4.disconnect(t4).await;
    assert_eq!(c2.info(proto::OPT_GO, EXPORT, &[]).await.1, proto::REP_ACK, "the held slot still works");
    c2.disconnect(t2).await;
}

#[tokio::test]
async fn an_export_at_its_cap_refuses_go_and_closes_export_name() {
    let h = Harness::with_limits(mem(), limits(|l| l.max_connections_per_export = 1));
    let (mut c1, t1) = h.connect();
    c1.go(EXPORT).await;

    let (mut c2, t2) = h.connect();
    c2.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    let (infos, last) = c2.info(proto::OPT_INFO, EXPORT, &[]).await;
    assert_eq!((infos.len(), last), (1, proto::REP_ACK), "INFO takes no slot");
    c2.send_option(proto::OPT_GO, &{
        let mut d = string(EXPORT.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    })
    .await;
    let r = c2.option_reply().await;
    assert_eq!(r.reply_type, proto::REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&r.data).contains("already has 1 connections"), "{:?}", r.data);
    // Other exports are not affected, and the refused client may go on.
    let (_, last) = c2.info(proto::OPT_GO, "vm2/disk0", &[]).await;
    assert_eq!(last, proto::REP_ACK);

    let (mut c3, t3) = h.connect();
    c3.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    c3.send_option(proto::OPT_EXPORT_NAME, EXPORT.as_bytes()).await;
    c3.expect_closed().await;
    assert!(within(t3).await.unwrap().is_err());

    c1.disconnect(t1).await;
    let (mut c4, t4) = h.connect();
    c4.go(EXPORT).await;
    c4.disconnect(t4).await;
    c2.disconnect(t2).await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stalls_in_the_handshake_is_closed_at_the_timeout() {
    let h = Harness::with_limits(mem(), limits(|l| l.handshake_timeout = Duration::from_secs(1)));
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    // Half an option, then nothing.
    c.s.write_all(&proto::IHAVEOPT.to_be_bytes()).await.unwrap();
    c.expect_closed().await;
    let err = within(task).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("not in transmission after 1s"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn only_a_connection_that_never_sent_a_request_is_closed_as_idle() {
    let h = Harness::with_limits(mem(), limits(|l| l.idle_timeout = Duration::from_secs(5)));
    let (mut idle, idle_task) = h.connect();
    idle.go(EXPORT).await;
    idle.expect_closed().await;
    within(idle_task).await.unwrap().unwrap();

    let (mut busy, busy_task) = h.connect();
    busy.go(EXPORT).await;
    assert_eq!(busy.call(proto::CMD_READ, 0, 0, 8).await, (0, vec![0; 8]));
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(busy.call(proto::CMD_READ, 0, 0, 8).await, (0, vec![0; 8]), "quiet for an hour, still served");
    busy.disconnect(busy_task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_queued_and_later_requests_get_eshutdown_and_running_ones_finish() {
    // One device call at a time: the first read holds it, the second waits.
    let dev = GatedDevice::new();
    let h = Harness::with_limits(dev.clone(), limits(|l| l.device_calls = 1));
    let (mut c, task) = h.connect();
    c.go_with(EXPORT, Go { structured: true, meta: None }).await;
    c.request(proto::CMD_READ, 0, 1, 0, 512).await;
    dev.wait_until_blocked().await;
    c.request(proto::CMD_READ, 0, 2, 4096, 512).await;

    h.shutdown.cancel();
    let queued = c.answer(Some((4096, 512))).await;
    assert_eq!((queued.handle, queued.error), (2, proto::ESHUTDOWN), "{}", queued.message);
    // A request sent after shutdown, payload and all, is answered the same.
    c.write(3, 8192, &[7; 4096], 0).await;
    let later = c.answer(None).await;
    assert_eq!((later.handle, later.error), (3, proto::ESHUTDOWN));
    assert!(later.message.contains("shutting down"), "{}", later.message);

    dev.release();
    let running = c.answer(Some((0, 512))).await;
    assert_eq!((running.handle, running.error, running.data), (1, 0, vec![0; 512]));
    c.expect_closed().await;
    within(task).await.unwrap().unwrap();
    assert_eq!(dev.log(), ["read 0", "end read 0"], "the queued read never reached the device");
    assert!(dev.inner.contents()[8192..12288].iter().all(|&b| b == 0), "the late write was not applied");
}

#[tokio::test(start_paused = true)]
async fn at_shutdown_options_get_err_shutdown_and_a_silent_handshake_closes() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    let (mut silent, silent_task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    silent.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    h.shutdown.cancel();

    let (_, last) = c.info(proto::OPT_INFO, EXPORT, &[]).await;
    assert_eq!(last, proto::REP_ERR_SHUTDOWN);
    let (_, last) = c.info(proto::OPT_GO, EXPORT, &[]).await;
    assert_eq!(last, proto::REP_ERR_SHUTDOWN, "no transmission after shutdown");
    c.send_option(proto::OPT_ABORT, &[]).await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ACK);
    c.expect_closed().await;
    within(task).await.unwrap().unwrap();

    silent.expect_closed().await;
    within(silent_task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_calls_are_bounded_across_connections() {
    let dev = GatedDevice::slow(SIZE);
    let h = Harness::with_limits(dev.clone(), limits(|l| l.device_calls = 2));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut c, task) = h.connect();
        c.go(EXPORT).await;
        clients.push((c, task));
    }
    let runs = clients.iter_mut().map(|(c, _)| async move {
        for i in 0..20u64 {
            c.request(proto::CMD_READ, 0, i, 4096 * (i + 1), 4096).await;
        }
        for _ in 0..20 {
            assert_eq!(c.reply(4096).await.1, 0);
        }
    });
    futures::future::join_all(runs).await;
    assert!(dev.most_running() <= 2, "{} device calls ran at once, the limit is 2", dev.most_running());
    assert_eq!(dev.log().len(), 3 * 20 * 2, "every read ran");
    for (c, task) in clients {
        c.disconnect(task).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_waits_for_a_device_call_like_any_request() {
    let dev = GatedDevice::gating_flushes();
    let h = Harness::with_limits(dev.clone(), limits(|l| l.device_calls = 1));
    let (mut flusher, t1) = h.connect();
    let (mut reader, t2) = h.connect();
    flusher.go(EXPORT).await;
    reader.go(EXPORT).await;
    flusher.request(proto::CMD_FLUSH, 0, 1, 0, 0).await;
    dev.wait_until_blocked().await;
    reader.request(proto::CMD_READ, 0, 2, 4096, 512).await;
    // Long enough for an unbounded server to start the read meanwhile.
    tokio::time::sleep(Duration::from_millis(50)).await;
    dev.release();
    assert_eq!(flusher.reply(0).await.1, 0);
    assert_eq!(reader.reply(512).await.1, 0);
    assert_eq!(dev.log(), ["flush", "end flush", "read 4096", "end read 4096"]);
    flusher.disconnect(t1).await;
    reader.disconnect(t2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_memory_is_bounded_across_connections() {
    const BIG: u32 = 20 << 20;
    let dev = GatedDevice::slow(64 << 20);
    let h = Harness::with_limits(
        dev.clone(),
        limits(|l| {
            l.buffer_bytes = 32 << 20;
            l.buffer_bytes_per_connection = 32 << 20;
        }),
    );
    let (mut a, ta) = h.connect();
    let (mut b, tb) = h.connect();
    a.go(EXPORT).await;
    b.go(EXPORT).await;
    async fn read(c: &mut Client, offset: u64) -> u32 {
        c.request(proto::CMD_READ, 0, 1, offset, BIG).await;
        c.reply(BIG as usize).await.1
    }
    let (ea, eb) = tokio::join!(read(&mut a, 4096), read(&mut b, 32 << 20));
    assert_eq!((ea, eb), (0, 0));
    assert_eq!(dev.most_running(), 1, "two 20 MiB reads never held their buffers at once under a 32 MiB limit");
    a.disconnect(ta).await;
    b.disconnect(tb).await;
}

#[tokio::test(start_paused = true)]
async fn a_request_that_stops_half_way_is_closed_at_the_idle_timeout() {
    let h = Harness::with_limits(mem(), limits(|l| l.idle_timeout = Duration::from_secs(5)));
    let (mut c, task) = h.connect();
    c.go(EXPORT).await;
    assert_eq!(c.call(proto::CMD_READ, 0, 0, 8).await.0, 0);
    // A whole WRITE, then one of 4 KiB that sends 100 bytes of its payload and stops.
    c.write(1, 0, &[1; 100], 0).await;
    let mut r = Request { flags: 0, command: proto::CMD_WRITE, handle: 2, offset: 0, len: 4096 }.encode().to_vec();
    r.extend_from_slice(&[2; 100]);
    c.s.write_all(&r).await.unwrap();
    assert_eq!(c.reply(0).await.1, 0);
    c.expect_closed().await;
    let err = within(task).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("request WRITE payload incomplete after 5s"), "{err}");
}
