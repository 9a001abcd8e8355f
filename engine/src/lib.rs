//! Ferry's replication engine: protects VM disks by capturing every write
//! into per-disk change logs, shipping them to a target store at the VM's
//! replication frequency, and rebuilding byte-identical disks at any
//! recovery point. It follows the Hyper-V Replica / Azure Site Recovery
//! model; `ferryd` embeds it, and so can any provider process.
//!
//! # Map
//!
//! | module | what lives there |
//! | --- | --- |
//! | [`model`] | names, VM and disk specs, recovery points, jobs |
//! | [`lifecycle`] | the VM state machine (pure; table-tested) |
//! | [`disk`] | the per-disk write path: disk + change log, group-committed flush |
//! | [`changelog`] | the HRL change-log format: writer, reader, torn-tail recovery, coalescing |
//! | [`snapshot`] | copy-before-write point-in-time snapshot for the initial copy |
//! | [`upload`] | cutting snapshots and logs into compressed bundles, the worker pool |
//! | [`bundle`], [`manifest`] | the object formats on the target, the commit record |
//! | [`target`] | the target-store trait, the local-folder backend, the contract suite |
//! | [`restore`] | rebuilding disks from the target (test failover, failover) |
//! | [`throttle`] | the host-wide upload bandwidth limit (governor) |
//! | [`state`] | persistent state in redb: VMs, recovery-point index, jobs |
//! | [`vm`], [`scheduler`] | the actors: one per VM, one scheduler |
//! | [`nbd`] | the NBD server that exports protected disks |
//! | [`config`], [`error`], [`jobs`] | configuration, error classes, job tracking |
//!
//! # Example
//!
//! Protect a VM with one disk, write to it, cut a recovery point and
//! restore it:
//!
//! ```
//! use std::time::Duration;
//! use ferry_engine::{DiskSpec, Engine, EngineConfig, PointSelector, VmSpec};
//!
//! # #[tokio::main] async fn main() -> ferry_engine::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let disk = dir.path().join("os.img");
//! std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
//!
//! let engine = Engine::open(EngineConfig::new(dir.path().join("data"))).await?;
//! let spec = VmSpec::new("web01", vec![DiskSpec { name: "os".into(), path: disk.clone() }])
//!     .with_frequency(Duration::from_secs(30));
//! engine.protect(spec).await?;
//! engine.wait_protected("web01", Duration::from_secs(30)).await?;
//!
//! // Provider processes write through the engine (NBD clients reach the same path).
//! engine.write("web01", "os", 4096, b"hello".to_vec()).await?;
//! engine.flush("web01", "os").await?;
//! let point = engine.replicate_now("web01").await?.expect("a write was made");
//!
//! let out = dir.path().join("restored");
//! engine.restore("web01", PointSelector::Seq(point.seq), &out).await?;
//! assert_eq!(std::fs::read(out.join("os.img")).unwrap(), std::fs::read(&disk).unwrap());
//! engine.shutdown().await
//! # }
//! ```
pub mod bundle;
pub mod changelog;
pub mod config;
pub mod disk;
mod engine;
pub mod error;
pub mod failpoint;
pub mod hashes;
pub mod jobs;
pub mod lifecycle;
pub mod manifest;
pub mod model;
pub mod nbd;
pub mod restore;
pub mod resync;
pub mod retry;
pub mod schedule;
pub mod scheduler;
mod shared;
pub mod snapshot;
pub mod state;
pub mod target;
mod task;
pub mod throttle;
pub mod upload;
pub mod vm;
pub use config::EngineConfig;
pub use engine::{Engine, PointSelector};
pub use error::{Error, ErrorClass, Result};
pub use model::{DiskSpec, VmSpec};
pub use vm::{DiskInfo, VmInfo};
