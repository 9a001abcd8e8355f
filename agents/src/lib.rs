//! Ferry's binaries and what only they need.
//!
//! - [`daemon`]: `ferryd`, the engine with its gRPC API and NBD export.
//! - [`api_auth`]: who may call the gRPC API (bearer token, TLS, client certificates).
//! - [`service`]: the `ferry.v1` gRPC service over the engine.
//! - [`convert`]: wire <-> domain conversion and error -> status mapping.
//! - [`ready`]: the line `ferryd` prints once it listens, and its parser.
//! - [`socket`]: the NBD Unix socket, bound private (0600, or 0660 for a group).
//! - [`cli`]: `ferryctl`, the command-line client.
//! - [`units`]: parsing sizes, rates and durations as operators type them.

pub mod api_auth;
pub mod cli;
pub mod convert;
pub mod daemon;
pub mod ready;
pub mod service;
pub mod socket;
pub mod units;

/// Where `ferryd` listens for gRPC by default, and where `ferryctl` connects.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50551";
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:50551";
