//! Engine configuration: one struct, each field with its default and bounds,
//! and [`EngineConfig::validate`] naming the bad field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::resync::DEFAULT_RESYNC_BLOCK;
use crate::schedule::throttle::BandwidthPolicy;
use crate::target::blob::BlobOptions;
use crate::target::sealed::EncryptionKey;
use crate::target::unreliable::Faults;
use crate::target::url::TargetUrl;

/// When a VM in `ResyncRequired` starts its resync by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoResync {
    /// At the next off-hours moment of the bandwidth schedule (default).
    #[default]
    OffHours,
    /// As soon as it is needed.
    Immediately,
    /// Only when an operator asks (`ferryctl resync`).
    Manual,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetConfig {
    /// A folder on this host (the embedded default: `<data_dir>/target`).
    Local { path: PathBuf },
    /// A blob store: `az://CONTAINER[/PREFIX]` or `s3://BUCKET[/PREFIX]`
    /// ([`crate::target::url`]), configured by the standard environment
    /// variables and then `options` (object_store keys; values never
    /// printed). `create` (default true): a missing container or bucket is
    /// created when the target opens.
    Blob {
        url: String,
        #[serde(default)]
        options: BlobOptions,
        #[serde(default = "yes")]
        create: bool,
    },
}

fn yes() -> bool {
    true
}

impl TargetConfig {
    /// The target a URL names ([`TargetUrl`]): a path or `file://` is a
    /// local folder, `az://` and `s3://` a blob store with `options`.
    pub fn from_url(url: &str, options: BlobOptions) -> Result<TargetConfig> {
        Ok(match url.parse::<TargetUrl>()? {
            TargetUrl::Local(path) => TargetConfig::Local { path },
            blob => TargetConfig::Blob { url: blob.to_string(), options, create: true },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Where the state store (`state.redb`) lives. Default `./ferry-data`.
    pub data_dir: PathBuf,
    /// Where replicas go. Default: local folder `<data_dir>/target`.
    pub target: Option<TargetConfig>,
    /// This host's name in the target: its replicas live under
    /// `hosts/<host_id>/`, so many hosts share one store without touching
    /// each other's objects. Validated like VM names. Default (`None`): the
    /// one kept in `<data_dir>/host-id`, else the machine's hostname; see
    /// [`EngineConfig::resolve_host_id`].
    pub host_id: Option<String>,
    /// Encryption at rest: every object is sealed with this key
    /// (AES-256-GCM, `target::sealed`). Default none: objects are stored
    /// compressed but in clear, and an encrypted replica is refused. Never
    /// serialized (give it from a key file).
    #[serde(skip)]
    pub encryption_key: Option<EncryptionKey>,
    /// Host-wide upload limits (work hours / off hours), each 512 Kbps..=1023 Mbps
    /// or unlimited. Default: unlimited; work hours 08:00-18:00 Monday to Friday.
    pub bandwidth: BandwidthPolicy,
    /// When a VM that needs a resync starts it. Default: off-hours.
    pub auto_resync: AutoResync,
    /// Resync block size. Default 4 KiB; a power of two, 4 KiB..=4 MiB.
    pub resync_block_size: u64,
    /// Fault injection: wraps the target in an unreliable one. Default none.
    pub faults: Option<Faults>,
    /// Largest logical bytes per uploaded object. Default 4 MiB, 64 KiB..=64 MiB.
    pub chunk_size: u64,
    /// zstd level for uploads. Default 3, 1..=19.
    pub zstd_level: i32,
    /// Downloads in flight during a restore. Default 8, 1..=64.
    pub restore_parallelism: usize,
    /// CPU nice value (absolute) of the threads that compress the parts of
    /// a point and hash disks for a resync (`runtime::background`): on a
    /// busy host the guests' I/O is served first. Default 10, 0..=19;
    /// process-wide; a thread already at a higher nice value (a daemon
    /// started niced) keeps its own.
    pub background_nice: i32,
    /// Memory, host-wide, for the blocks a guest overwrites while their
    /// recovery point is still uploading (`capture::held`); beyond it they
    /// are saved in side files beside the disks. Default 256 MiB, 0..=64 GiB.
    pub held_memory: u64,
    /// Folders under which disks may be protected and test failovers,
    /// failovers and restores may write (absolute, existing; symlinks
    /// resolved; `disk_roots`). Default empty: anywhere except the system
    /// folders (`/etc`, `/usr`, `/boot`, `/proc`, `/sys`, `/dev`, ...).
    /// The data folder is refused either way.
    pub disk_roots: Vec<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            data_dir: PathBuf::from("ferry-data"),
            target: None,
            host_id: None,
            encryption_key: None,
            bandwidth: BandwidthPolicy::default(),
            auto_resync: AutoResync::OffHours,
            resync_block_size: DEFAULT_RESYNC_BLOCK,
            faults: None,
            chunk_size: 4 << 20,
            zstd_level: 3,
            restore_parallelism: 8,
            background_nice: crate::runtime::DEFAULT_BACKGROUND_NICE,
            held_memory: crate::capture::held::DEFAULT_MEMORY_BUDGET,
            disk_roots: Vec::new(),
        }
    }
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        EngineConfig { data_dir: data_dir.into(), ..Default::default() }
    }

    pub fn with_local_target(mut self, path: impl Into<PathBuf>) -> Self {
        self.target = Some(TargetConfig::Local { path: path.into() });
        self
    }

    /// The paths under the data folder.
    pub fn paths(&self) -> crate::paths::DataDir {
        crate::paths::DataDir::new(&self.data_dir)
    }

    pub fn target(&self) -> TargetConfig {
        self.target.clone().unwrap_or_else(|| TargetConfig::Local { path: self.paths().default_target() })
    }

    /// The host id in force, kept in `<data_dir>/host-id` from the first
    /// start on: a configured id must match the kept one (a different one
    /// would start a new, empty tree in the target while the state store
    /// names points in the old one); with none configured the kept one is
    /// used, else the hostname (or, for a hostname that cannot tell hosts
    /// apart, like `localhost`, a generated `host-<random>`).
    pub fn resolve_host_id(&self) -> Result<String> {
        let file = self.data_dir.join("host-id");
        let kept = match std::fs::read_to_string(&file) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
        };
        let id = match (&self.host_id, &kept) {
            (Some(given), Some(k)) if given != k => {
                return Err(Error::FailedPrecondition(format!(
                    "this data folder's replicas are under host id {k:?}, not {given:?}: pass --host-id {k} \
                     (a new id needs a new data folder)"
                )))
            }
            (Some(given), _) => given.clone(),
            (None, Some(k)) => k.clone(),
            (None, None) => {
                let h = hostname()?;
                // Clones and containers share "localhost": a random id, kept, instead.
                let unique = !h.starts_with("localhost") && crate::model::validate_name("host_id", &h).is_ok();
                if unique {
                    h
                } else {
                    let id = format!("host-{:016x}", rand::random::<u64>());
                    tracing::warn!(hostname = %h, host_id = %id, "the hostname cannot name this host in the target; using a generated host id");
                    id
                }
            }
        };
        crate::model::validate_name("host_id", &id)?;
        if kept.is_none() {
            let write = (|| {
                let mut f = crate::paths::create_private(&file)?;
                std::io::Write::write_all(&mut f, format!("{id}\n").as_bytes())?;
                f.sync_all()?;
                std::fs::File::open(&self.data_dir)?.sync_all()
            })();
            write.map_err(|e| Error::io(format!("writing {}", file.display()), e))?;
        }
        Ok(id)
    }

    pub fn validate(&self) -> Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::invalid("data_dir", "must not be empty"));
        }
        if let Some(id) = &self.host_id {
            crate::model::validate_name("host_id", id)?;
        }
        self.bandwidth.validate()?;
        if !self.resync_block_size.is_power_of_two() || !(4 << 10..=4 << 20).contains(&self.resync_block_size) {
            return Err(Error::invalid(
                "resync_block_size",
                format!("{} is not a power of two in 4 KiB..=4 MiB", self.resync_block_size),
            ));
        }
        if !self.chunk_size.is_multiple_of(crate::capture::snapshot::SNAPSHOT_BLOCK) {
            return Err(Error::invalid(
                "chunk_size",
                format!("{} is not a multiple of the 64 KiB snapshot block", self.chunk_size),
            ));
        }
        if !self.chunk_size.is_multiple_of(self.resync_block_size) {
            return Err(Error::invalid(
                "chunk_size",
                format!("{} is not a multiple of resync_block_size {}", self.chunk_size, self.resync_block_size),
            ));
        }
        if let Some(f) = &self.faults {
            f.validate()?;
        }
        if !(64 << 10..=crate::replica::bundle::MAX_DATA_BYTES).contains(&self.chunk_size) {
            return Err(Error::invalid("chunk_size", format!("{} is outside 64 KiB..=64 MiB", self.chunk_size)));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(Error::invalid("zstd_level", format!("{} is outside 1..=19", self.zstd_level)));
        }
        if !(0..=19).contains(&self.background_nice) {
            return Err(Error::invalid("background_nice", format!("{} is outside 0..=19", self.background_nice)));
        }
        if self.held_memory > 64 << 30 {
            return Err(Error::invalid("held_memory", format!("{} is more than 64 GiB", self.held_memory)));
        }
        if let Some(r) = self.disk_roots.iter().find(|r| !r.is_absolute()) {
            return Err(Error::invalid("disk_roots", format!("{} is not an absolute path", r.display())));
        }
        if !(1..=64).contains(&self.restore_parallelism) {
            return Err(Error::invalid(
                "restore_parallelism",
                format!("{} is outside 1..=64", self.restore_parallelism),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_id_is_kept_by_the_data_folder_and_a_different_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let with = |id: Option<&str>| EngineConfig { host_id: id.map(Into::into), ..EngineConfig::new(dir.path()) };
        assert_eq!(with(Some("h1")).resolve_host_id().unwrap(), "h1");
        assert_eq!(std::fs::read_to_string(dir.path().join("host-id")).unwrap(), "h1\n");
        assert_eq!(with(None).resolve_host_id().unwrap(), "h1", "the kept id, not the hostname");
        assert_eq!(with(Some("h1")).resolve_host_id().unwrap(), "h1");
        let e = with(Some("h2")).resolve_host_id().unwrap_err();
        assert!(e.to_string().contains("\"h1\"") && e.to_string().contains("--host-id h1"), "{e}");
        assert!(with(Some("../x")).validate().is_err());
    }

    #[test]
    fn defaults_are_valid_and_bad_fields_are_named() {
        EngineConfig::default().validate().unwrap();
        let bad = [
            (EngineConfig { chunk_size: 1, ..Default::default() }, "chunk_size"),
            (EngineConfig { chunk_size: 100 << 10, ..Default::default() }, "chunk_size"),
            (EngineConfig { zstd_level: 0, ..Default::default() }, "zstd_level"),
            (EngineConfig { background_nice: 20, ..Default::default() }, "background_nice"),
            (EngineConfig { held_memory: 65 << 30, ..Default::default() }, "held_memory"),
            (EngineConfig { restore_parallelism: 65, ..Default::default() }, "restore_parallelism"),
            (EngineConfig { bandwidth: BandwidthPolicy::flat(Some(10)), ..Default::default() }, "work limit"),
            (EngineConfig { resync_block_size: 5000, ..Default::default() }, "resync_block_size"),
            (EngineConfig { data_dir: PathBuf::new(), ..Default::default() }, "data_dir"),
        ];
        for (c, field) in bad {
            let e = c.validate().unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { field: f, .. } if f == field), "{field}: {e}");
        }
    }
}

/// The machine's hostname (`gethostname(2)`).
pub fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the kernel NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(Error::io("gethostname", std::io::Error::last_os_error()));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).map_err(|_| Error::invalid("host_id", "the hostname is not UTF-8: set one"))
}
