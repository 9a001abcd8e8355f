//! Ferry's end-to-end tests (`tests/`) and benchmarks (`benches/`) live in
//! this package; this library is what they share.
//!
//! - [`harness`]: builds and starts `ferryd`, runs `ferryctl` and the real
//!   clients (qemu-io, qemu-img, fio ...) under timeouts, a small NBD client,
//!   random disk images and byte comparisons.

pub mod harness;
