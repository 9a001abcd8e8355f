//! Recovery point manifests: the commit records on the target.
//!
//! A manifest lists, per disk, the bundles its point adds, with each
//! bundle's checksum. A base point lists the whole disk (all-zero chunks are
//! left out: a restored image starts as zeros); a delta point lists the
//! coalesced changes since its parent. Restore walks `parent` links from the
//! chosen point back to the nearest base.
//!
//! A manifest is put only after every object it lists was put (durable), so
//! a manifest on the target never names a missing object.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{PointKind, UnixMillis};

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub key: String,
    /// xxh3-64 of the stored (compressed) bytes.
    pub checksum: u64,
    pub stored_len: u64,
    /// Bytes of disk the object covers.
    pub logical_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    pub name: String,
    pub size: u64,
    pub objects: Vec<ObjectRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub vm: String,
    pub generation: u64,
    pub seq: u64,
    pub parent: Option<u64>,
    pub kind: PointKind,
    pub time_ms: UnixMillis,
    pub disks: Vec<DiskManifest>,
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(format!("encode manifest: {e}")))
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::corrupt(format!("manifest {key}"), e.to_string()))?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::corrupt(format!("manifest {key}"), format!("unknown format {}", m.format)));
        }
        Ok(m)
    }

    pub fn bytes_stored(&self) -> u64 {
        self.disks.iter().flat_map(|d| &d.objects).map(|o| o.stored_len).sum()
    }

    pub fn bytes_logical(&self) -> u64 {
        self.disks.iter().flat_map(|d| &d.objects).map(|o| o.logical_len).sum()
    }
}

// The keys below take a VM's and a disk's *key segments*: what the target
// makes of their names (`TargetStore::name_segment`: the names themselves,
// or ids in an encrypted store). `Keys` applies it.

/// Every generation of a VM: `vms/<vm>/`.
pub fn vm_root(vm: &str) -> String {
    format!("vms/{vm}/")
}

pub fn vm_prefix(vm: &str, generation: u64) -> String {
    format!("vms/{vm}/{generation}")
}

pub fn manifest_key(vm: &str, generation: u64, seq: u64) -> String {
    format!("{}/points/{seq:010}.manifest", vm_prefix(vm, generation))
}

/// Key of part `part` of disk `disk` in point `seq`: stable across retries.
pub fn object_key(vm: &str, generation: u64, disk: &str, seq: u64, part: u64) -> String {
    format!("{}/disks/{disk}/p{seq:010}/{part:06}", vm_prefix(vm, generation))
}

/// The keys of one VM's replica in one target, from names.
pub struct Keys<'a> {
    target: &'a dyn crate::target::TargetStore,
    vm: String,
}

impl<'a> Keys<'a> {
    pub fn new(target: &'a dyn crate::target::TargetStore, vm: &str) -> Self {
        Keys { target, vm: target.name_segment(vm) }
    }
    pub fn root(&self) -> String {
        vm_root(&self.vm)
    }
    pub fn prefix(&self, generation: u64) -> String {
        vm_prefix(&self.vm, generation)
    }
    pub fn manifest(&self, generation: u64, seq: u64) -> String {
        manifest_key(&self.vm, generation, seq)
    }
    pub fn object(&self, generation: u64, disk: &str, seq: u64, part: u64) -> String {
        object_key(&self.vm, generation, &self.target.name_segment(disk), seq, part)
    }
}
