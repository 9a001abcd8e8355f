//! NBD transmission on arbitrary request bytes, after a valid handshake.
//! The first byte picks the handshake: simple or structured replies, with
//! or without `base:allocation` selected (so BLOCK_STATUS is reachable).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, requests)) = data.split_first() else {
        return;
    };
    let handshake = ferry_fuzz::Handshake::Go { structured: mode & 1 != 0, allocation: mode & 2 != 0 };
    ferry_fuzz::nbd_connection(requests, handshake);
});
