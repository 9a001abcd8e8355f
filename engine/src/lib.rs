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
//! | `vm` | one protected VM: the lifecycle, the pure VM core, the restart decision, its tasks and actor |
//! | `supervisor` | the supervisor actor: starts, finds and stops the VM actors |
//! | `capture` | the per-disk write path (disk + change log, group-committed flush) and the copy-before-write snapshot |
//! | [`changelog`] | the HRL change-log format: writer, reader, torn-tail recovery, coalescing, the log chain beside a disk |
//! | `replicate` | cutting snapshots and logs into compressed bundles, the upload worker pool, the initial copy's progress journal (resume after a crash) |
//! | [`replica`] | what lives on the target: bundles, manifests and object keys, the replica's block hashes |
//! | [`target`] | the target-store trait, the local-folder backend, the unreliable wrapper, the contract suite |
//! | [`resync`] | resynchronization by fixed-block checksums |
//! | [`restore`] | rebuilding disks from the target (test failover, failover) |
//! | [`schedule`] | policy time: work hours, the host-wide bandwidth limit, the retry backoff |
//! | `state` | persistent state in redb: VMs, recovery-point index, jobs |
//! | [`nbd`] | the NBD server that exports protected disks |
//! | `host` | what every VM on the host shares (config, state, target, throttle, jobs, disk registry) |
//! | [`paths`] | every path under the data folder |
//! | [`clock`] | policy time: the system clock, or an accelerated one for tests and the simulator |
//! | [`config`], [`error`], [`failpoint`] | configuration, error classes, fault injection at I/O calls |
//! | `runtime` | running blocking work off the async workers |
//!
//! Modules named without a link are the engine's inside (`pub(crate)` in
//! effect): the VM actors and their core, the write path's internals, the
//! upload pipeline and the state store change without notice. What a
//! provider process or tool may build on is public: [`Engine`] and its
//! types, the target trait and backends, the change-log reader, the replica
//! format, restore, the NBD server, the clock, and the short paths below.
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
mod capture;
pub mod changelog;
pub mod clock;
pub mod config;
pub mod disk_roots;
mod engine;
pub mod error;
pub mod failpoint;
mod host;
pub mod model;
pub mod nbd;
pub mod paths;
pub mod replica;
mod replicate;
pub mod restore;
pub mod resync;
pub mod runtime;
pub mod schedule;
mod state;
mod supervisor;
pub mod target;
mod vm;

// Short paths for what users of the engine name most.
pub use capture::{disk, snapshot};
pub use config::EngineConfig;
pub use engine::{Engine, PointSelector};
pub use error::{Error, ErrorClass, Result};
pub use model::{DiskSpec, VmSpec};
pub use replica::hashes;
pub use replicate::PUT_TRIES;
pub use schedule::throttle;
pub use vm::lifecycle;
pub use vm::{DiskInfo, VmInfo};
