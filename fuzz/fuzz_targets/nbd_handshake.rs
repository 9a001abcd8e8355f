//! The NBD handshake on arbitrary client bytes: client flags and options
//! (GO, INFO, LIST, STRUCTURED_REPLY, meta contexts, garbage), then
//! whatever follows if the bytes happen to enter transmission.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::nbd_connection(data, ferry_fuzz::Handshake::Raw);
});
