//! Random bytes, in the handshake and after it, never panic or hang the
//! server (the cargo-fuzz targets in `fuzz/` go further).

use proptest::prelude::*;

use super::*;

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
