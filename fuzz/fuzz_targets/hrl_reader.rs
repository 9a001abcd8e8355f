//! The HRL change-log reader (scan, recover, payload reads, coalescing) on
//! arbitrary bytes; the first byte picks how much of a valid log comes
//! first (see `ferry_fuzz::hrl_log`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::hrl_log(data);
});
