//! One test harness for the end-to-end tests and the benchmarks.
//!
//! - [`binaries`]: builds `ferryd` and `ferryctl` once per process, in the
//!   caller's own profile, and finds them.
//! - [`daemon`]: a running `ferryd` in its own folders ([`Daemon`]), started
//!   and stopped as an operator would, its ready line parsed with
//!   [`ferry_agents::ready::Ready`].
//! - [`ctl`]: `ferryctl` against a [`Daemon`]: JSON, refusals, waiting for
//!   states and jobs, test failovers compared with their sources.
//! - [`process`]: running a tool under a timeout, and a guard that stops a
//!   long-running one.
//! - [`tools`]: finding the client tools (qemu-io, qemu-img, fio ...) and
//!   running qemu-io and qemu-img on an export.
//! - [`nbd`]: a minimal NBD client with exact control of what was acknowledged.
//! - [`images`]: random disk images and byte-for-byte comparison.
//! - [`bench`]: what only the benchmarks need (tables, sizes, temp folders).
//! - [`blob_servers`]: Azurite and moto, started on loopback for the blob
//!   target tests.
//!
//! Nothing here skips a test: a missing tool or a daemon that does not come
//! up fails with what to install or what it printed.

pub mod bench;
pub mod binaries;
pub mod blob_servers;
pub mod ctl;
pub mod daemon;
pub mod images;
pub mod nbd;
pub mod process;
pub mod tools;

use std::time::Duration;

pub use binaries::{binaries, Binaries};
pub use blob_servers::{BlobKind, BlobServer};
pub use ctl::ResyncDetail;
pub use daemon::Daemon;
pub use images::{
    allocated_bytes, assert_same_bytes, assert_same_files, random_bytes, random_disk, read_file, target_objects,
    write_image,
};
pub use process::{run, Proc, Ran};
pub use tools::{installed_tool, qemu_io, read_export, require_tool, tools_dir};

pub const MIB: u64 = 1 << 20;
/// Longest any client process (ferryctl, qemu-io, qemu-img) may run unless
/// its caller says otherwise.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long ferryd may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ferryd may take to stop after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
