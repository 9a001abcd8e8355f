//! Every path under the engine's data folder, in one place.
//!
//! ```text
//! <data-dir>/state.redb                 the state store (VMs, points, jobs)
//! <data-dir>/target/                    the local target, when no other is configured
//! <data-dir>/hashes/<vm>/<disk>.hashes  the replica's block hashes kept for resync
//! <data-dir>/scratch/<vm>/              a resync's temporary rebuild of the replica
//! <data-dir>/progress/<vm>.copy         the parts of an initial copy on the target
//! <data-dir>/nbd.sock                   ferryd's NBD socket, by default
//! ```
//!
//! Change logs and snapshot side files live beside the disks, not here
//! (see [`crate::changelog`] and [`crate::capture::snapshot`]). Every VM and
//! disk name in a path was validated ([`crate::model::validate_name`]), so no
//! path leaves its folder.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of every file Ferry creates (change logs, side files, hashes, the
/// state store, local target objects, restored images): they hold guest
/// data or what points at it, so the daemon's user only, whatever the umask.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of every folder Ferry creates.
pub const PRIVATE_DIR: u32 = 0o700;

/// `create_dir_all` with [`PRIVATE_DIR`] for the folders it makes.
pub fn create_private_dirs(path: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(PRIVATE_DIR).create(path)
}

/// Options that create files [`PRIVATE_FILE`].
pub fn private_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE);
    o
}

/// Creates or truncates `path` ([`PRIVATE_FILE`]) for writing.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    private_options().write(true).create(true).truncate(true).open(path)
}

/// The data folder and the paths under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir(root.into())
    }

    pub fn root(&self) -> &Path {
        &self.0
    }

    pub fn state_store(&self) -> PathBuf {
        self.0.join("state.redb")
    }

    pub fn default_target(&self) -> PathBuf {
        self.0.join("target")
    }

    /// The kept hashes of every disk of `vm`.
    pub fn vm_hashes(&self, vm: &str) -> PathBuf {
        self.0.join("hashes").join(vm)
    }

    pub fn disk_hashes(&self, vm: &str, disk: &str) -> PathBuf {
        self.vm_hashes(vm).join(format!("{disk}.hashes"))
    }

    pub fn resync_scratch(&self, vm: &str) -> PathBuf {
        self.0.join("scratch").join(vm)
    }

    /// The progress journal of `vm`'s initial copy (`replicate::progress`).
    pub fn copy_progress(&self, vm: &str) -> PathBuf {
        self.0.join("progress").join(format!("{vm}.copy"))
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.0.join("nbd.sock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_under_the_data_folder() {
        let d = DataDir::new("/var/lib/ferry");
        for p in [
            d.state_store(),
            d.default_target(),
            d.disk_hashes("vm", "os"),
            d.resync_scratch("vm"),
            d.nbd_socket(),
            d.copy_progress("vm"),
        ] {
            assert!(p.starts_with(d.root()), "{}", p.display());
        }
        assert_eq!(d.disk_hashes("web01", "os"), PathBuf::from("/var/lib/ferry/hashes/web01/os.hashes"));
    }
}
