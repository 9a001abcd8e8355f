//! The host: what the supervisor, the VM actors and the engine handle share.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::capture::disk::Disk;
use crate::config::EngineConfig;
use crate::schedule::throttle::Throttle;
use crate::state::jobs::Jobs;
use crate::state::StateStore;
use crate::target::Target;

pub struct Host {
    pub config: EngineConfig,
    pub state: StateStore,
    pub target: Target,
    /// Host-wide upload limit; every VM's uploads are charged to it.
    pub throttle: Arc<Throttle>,
    /// The fault-injecting wrapper, when configured (tests, drills).
    pub unreliable: Option<Arc<crate::target::unreliable::UnreliableTarget>>,
    pub jobs: Jobs,
    /// Disks of protected VMs by export name `<vm>/<disk>`: the write path's
    /// entry for NBD and the embedded API, outside the actors' mailboxes.
    pub disks: Arc<DiskRegistry>,
    /// Policy time: what retries, windows and transitions read.
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Where I/O tasks run (the runtime the engine was opened on).
    pub runtime: tokio::runtime::Handle,
}

#[derive(Default)]
pub struct DiskRegistry {
    map: RwLock<BTreeMap<String, Arc<Disk>>>,
}

impl DiskRegistry {
    pub fn insert(&self, disk: Arc<Disk>) {
        self.map.write().expect("registry lock").insert(disk.export_name(), disk);
    }

    pub fn remove_vm(&self, vm: &str) {
        let prefix = format!("{vm}/");
        self.map.write().expect("registry lock").retain(|k, _| !k.starts_with(&prefix));
    }

    pub fn get(&self, export: &str) -> Option<Arc<Disk>> {
        self.map.read().expect("registry lock").get(export).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.map.read().expect("registry lock").keys().cloned().collect()
    }
}

impl crate::nbd::ExportCatalog for DiskRegistry {
    fn open(&self, name: &str) -> Option<Arc<dyn crate::nbd::BlockDevice>> {
        self.get(name).map(|d| d as Arc<dyn crate::nbd::BlockDevice>)
    }
    fn names(&self) -> Vec<String> {
        DiskRegistry::names(self)
    }
    fn describe(&self, name: &str) -> Option<String> {
        self.get(name).map(|d| format!("Ferry-protected disk {}", d.path.display()))
    }
}
