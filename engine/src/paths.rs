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

use std::path::{Path, PathBuf};

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
