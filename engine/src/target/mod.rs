//! The target store: where replicas live.
//!
//! One small trait, [`TargetStore`], with a local-folder backend (the
//! embedded default) and a blob store backend ([`blob::BlobTarget`]: Azure
//! Blob, S3 and S3-compatible stores through `object_store`), chosen by a
//! URL ([`url::TargetUrl`]). One contract suite ([`contract::run_contract`])
//! is run against every backend (the blob ones against Azurite and moto,
//! in the root crate's `tests/target_backends.rs`).
//!
//! Object layout under the store root (all keys are relative, `/`-separated;
//! for a blob store the root is the URL's container and prefix):
//!
//! ```text
//! hosts/<host>/vms/<vm>/<generation>/points/<seq:010>.manifest      recovery point manifest (JSON), the commit record
//! hosts/<host>/vms/<vm>/<generation>/disks/<disk>/p<seq:010>/<part:06>  extent bundles of that point (zstd)
//! ```
//!
//! `<host>` is the daemon's host id ([`HostTarget`]): every host that
//! shares a store has its own tree, and the engine sees keys from `vms/` on.
//! `<vm>` and `<disk>` are [`TargetStore::name_segment`]s: the names, or in
//! an encrypted store ids derived from them and the key
//! ([`sealed::SealedTarget`]), so keys and listings reveal only ids.
//!
//! `generation` is the protection's start time in ms, so protecting a VM
//! again never mixes with an older replica. Keys depend only on the point
//! sequence number and the part index, so a retried upload writes the same
//! keys (idempotent). A manifest is written only after every object it lists
//! was put; a put is durable when it returns (local: file and directory
//! fsynced, then renamed into place).

pub mod blob;
pub mod sealed;
pub mod unreliable;
pub mod url;

pub use blob::{install_tls_provider, BlobOptions, BlobTarget};
pub use url::TargetUrl;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::error::{Error, ErrorClass, Result};

/// A flat key/value object store with durable, atomic puts.
pub trait TargetStore: Send + Sync + 'static {
    /// Stores `data` under `key`, replacing any previous object. Durable and
    /// atomic when it returns: a reader sees the old or the new object whole.
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<()>>;
    /// Reads a whole object. A missing object is `Corrupt` with class `NeedsResync`.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes>>;
    /// Keys that start with `prefix`, sorted.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>>;
    /// Deletes an object; deleting a missing object is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
    /// For logs and `show`: e.g. `local:/srv/ferry-target`.
    fn describe(&self) -> String;
    /// How a VM's or disk's name appears in keys: the name itself, or, in
    /// an encrypted store, an id derived from it and the key that reveals
    /// nothing of it ([`sealed::SealedTarget`]). Wrappers pass it on.
    fn name_segment(&self, name: &str) -> String {
        name.to_string()
    }
}

pub type Target = Arc<dyn TargetStore>;

/// Refuses keys that could escape the store root or are not ours.
pub fn check_key(key: &str) -> Result<()> {
    let ok_chars = key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    let ok_parts = key.split('/').all(|p| !p.is_empty() && p != "." && p != "..");
    if key.is_empty() || !ok_chars || !ok_parts {
        return Err(Error::invalid("object key", format!("{key:?} is not a valid key")));
    }
    Ok(())
}

/// The local-folder target: one file per object under `root`.
#[derive(Debug)]
pub struct LocalTarget {
    root: PathBuf,
}

impl LocalTarget {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        crate::paths::create_private_dirs(&root)
            .map_err(|e| Error::io(format!("create target folder {}", root.display()), e))?;
        Ok(LocalTarget { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Moves replicas of the layout before host ids (`<root>/vms/...`,
    /// written by one daemon into its own folder) to where `host_id`'s
    /// daemon finds them (`<root>/hosts/<host_id>/vms/...`): one rename,
    /// made durable. Only the daemon that wrote them adopts them: one of
    /// `ours` (this daemon's VMs, by name and generation) must have its
    /// replica there (names in keys were plain then). Nothing moves if the
    /// host's folder already holds replicas: both stay, and a warning names
    /// them. Returns whether it moved anything.
    pub fn adopt_unhosted_replicas(&self, host_id: &str, ours: &[(String, u64)]) -> Result<bool> {
        let old = self.root.join("vms");
        if !ours.iter().any(|(vm, generation)| old.join(vm).join(generation.to_string()).is_dir()) {
            return Ok(false);
        }
        let hosts = self.root.join("hosts");
        let host = self.root.join(host_prefix(host_id));
        let new = host.join("vms");
        if new.exists() {
            tracing::warn!(old = %old.display(), new = %new.display(),
                "replicas of the layout before host ids are left where they are: this host already has replicas");
            return Ok(false);
        }
        let ctx = |what: &str| format!("{what} (moving {} to {})", old.display(), new.display());
        crate::paths::create_private_dirs(&host).map_err(|e| Error::io(ctx("create the host folder"), e))?;
        // The new folders first, durable, then the rename, then both parents.
        for dir in [&hosts, &self.root, &host] {
            sync_dir(dir).map_err(|e| Error::io(ctx(&format!("sync {}", dir.display())), e))?;
        }
        match std::fs::rename(&old, &new) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && new.is_dir() => return Ok(false), // moved meanwhile
            r => r.map_err(|e| Error::io(ctx("rename"), e))?,
        }
        for dir in [&host, &self.root] {
            sync_dir(dir).map_err(|e| Error::io(ctx(&format!("sync {}", dir.display())), e))?;
        }
        tracing::info!(from = %old.display(), to = %new.display(), "moved replicas into this host's folder");
        Ok(true)
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> BoxFuture<'static, Result<T>> {
    Box::pin(crate::runtime::blocking(f))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl TargetStore for LocalTarget {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<()>> {
        let path = self.path(key);
        blocking(move || {
            let path = path?;
            let dir = path.parent().expect("a checked key has a parent under the root").to_path_buf();
            let ctx = |what: &str| format!("target {what} {}", path.display());
            crate::paths::create_private_dirs(&dir).map_err(|e| Error::io(ctx("mkdir for"), e))?;
            let tmp = dir.join(format!(
                ".{}.tmp-{:016x}",
                path.file_name().expect("checked key").to_string_lossy(),
                rand::random::<u64>()
            ));
            let result = (|| {
                let mut f = crate::paths::create_private(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                sync_dir(&dir)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result.map_err(|e| Error::io(ctx("put"), e))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        let path = self.path(key);
        let key = key.to_string();
        blocking(move || {
            let path = path?;
            match std::fs::read(&path) {
                Ok(v) => Ok(Bytes::from(v)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing(&key)),
                Err(e) => Err(Error::io(format!("target get {}", path.display()), e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || {
            // Walk only the deepest folder the prefix names.
            let dir_part = match prefix.rfind('/') {
                Some(i) => &prefix[..i],
                None => "",
            };
            if !dir_part.is_empty() {
                check_key(dir_part)?;
            }
            let mut out = Vec::new();
            let mut stack = vec![root.join(dir_part)];
            while let Some(dir) = stack.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(format!("target list {}", dir.display()), e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io(format!("target list {}", dir.display()), e))?;
                    let path = entry.path();
                    let name = entry.file_name();
                    if name.to_string_lossy().starts_with('.') {
                        continue; // temporary files of puts in progress
                    }
                    let ft = entry.file_type().map_err(|e| Error::io("target list", e))?;
                    if ft.is_dir() {
                        stack.push(path);
                    } else if let Ok(rel) = path.strip_prefix(&root) {
                        let key = rel.to_string_lossy().replace('\\', "/");
                        if key.starts_with(&prefix) {
                            out.push(key);
                        }
                    }
                }
            }
            out.sort();
            Ok(out)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        let path = self.path(key);
        blocking(move || {
            let path = path?;
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(format!("target delete {}", path.display()), e)),
            }
        })
    }

    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }
}

/// One host's part of a shared store: every key goes under
/// `hosts/<host_id>/`, and listings come back without it. Hosts that share
/// a store (one container, N daemons) see only their own objects, so one
/// host's retention or unprotect never touches another's.
pub struct HostTarget {
    inner: Target,
    prefix: String,
}

impl HostTarget {
    pub fn new(inner: Target, host_id: &str) -> Result<Arc<HostTarget>> {
        crate::model::validate_name("host_id", host_id)?;
        Ok(Arc::new(HostTarget { inner, prefix: host_prefix(host_id) }))
    }

    fn full(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

/// A store as one host's engine (or a restore on its behalf) uses it: the
/// whole store, then encryption ([`sealed::SealedTarget`], which refuses
/// encrypted objects when `key` is `None`) over the full keys, then the
/// host's part ([`HostTarget`]).
pub fn for_host(store: Target, key: Option<&sealed::EncryptionKey>, host_id: &str) -> Result<Target> {
    Ok(HostTarget::new(sealed::SealedTarget::new(store, key), host_id)?)
}

/// Opens the store a URL names for `host_id`, as a restore on another
/// machine does: a local folder or a blob store (never created: a restore
/// only reads), then [`for_host`].
pub async fn open_url(
    url: &str,
    options: &BlobOptions,
    key: Option<&sealed::EncryptionKey>,
    host_id: &str,
) -> Result<Target> {
    let store: Target = match url.parse::<TargetUrl>()? {
        TargetUrl::Local(path) => {
            if !path.is_dir() {
                return Err(Error::not_found("target folder", path.display().to_string()));
            }
            Arc::new(LocalTarget::open(path)?)
        }
        blob => Arc::new(BlobTarget::open(&blob, options, false).await?),
    };
    for_host(store, key, host_id)
}

/// Where a host's objects live in a store: `hosts/<host_id>/`.
pub fn host_prefix(host_id: &str) -> String {
    format!("hosts/{host_id}/")
}

impl TargetStore for HostTarget {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.inner.put(&self.full(key)?, data).await })
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move { self.inner.get(&self.full(key)?).await })
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let keys = self.inner.list(&format!("{}{prefix}", self.prefix)).await?;
            Ok(keys.into_iter().filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_string)).collect())
        })
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.inner.delete(&self.full(key)?).await })
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn name_segment(&self, name: &str) -> String {
        self.inner.name_segment(name)
    }
}

/// A missing remote object: the replica cannot be trusted any more.
pub fn missing(key: &str) -> Error {
    Error::Corrupt {
        what: format!("target object {key}"),
        reason: "missing from the target".into(),
        class: ErrorClass::NeedsResync,
    }
}

/// The contract every [`TargetStore`] must meet; run by each backend's tests.
pub mod contract {
    use super::*;

    pub async fn run_contract(store: &dyn TargetStore) {
        // put / get round trip, overwrite is whole.
        store.put("vms/a/1/points/0000000001.manifest", Bytes::from_static(b"one")).await.unwrap();
        assert_eq!(&store.get("vms/a/1/points/0000000001.manifest").await.unwrap()[..], b"one");
        store.put("vms/a/1/points/0000000001.manifest", Bytes::from_static(b"second")).await.unwrap();
        assert_eq!(&store.get("vms/a/1/points/0000000001.manifest").await.unwrap()[..], b"second");
        // Empty objects are objects.
        store.put("vms/a/1/disks/d/p0000000001/000000", Bytes::new()).await.unwrap();
        assert!(store.get("vms/a/1/disks/d/p0000000001/000000").await.unwrap().is_empty());
        // Missing objects are NeedsResync, named.
        let e = store.get("vms/a/1/nope").await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::NeedsResync);
        assert!(e.to_string().contains("vms/a/1/nope"), "{e}");
        // List is by prefix and sorted, and does not leak other VMs.
        store.put("vms/a/1/points/0000000002.manifest", Bytes::from_static(b"2")).await.unwrap();
        store.put("vms/ab/1/points/0000000001.manifest", Bytes::from_static(b"x")).await.unwrap();
        let keys = store.list("vms/a/1/points/").await.unwrap();
        assert_eq!(keys, vec!["vms/a/1/points/0000000001.manifest", "vms/a/1/points/0000000002.manifest"]);
        assert_eq!(store.list("vms/zz/").await.unwrap(), Vec::<String>::new());
        // Delete is idempotent.
        store.delete("vms/a/1/points/0000000002.manifest").await.unwrap();
        store.delete("vms/a/1/points/0000000002.manifest").await.unwrap();
        assert_eq!(store.list("vms/a/1/points/").await.unwrap().len(), 1);
        // Keys that escape are refused, never touched.
        for bad in ["../x", "vms/../../etc/passwd", "/abs", "a//b", "", "a/./b", "sp ace"] {
            let e = store.put(bad, Bytes::from_static(b"x")).await.unwrap_err();
            assert_eq!(e.class(), ErrorClass::NonRecoverable, "{bad}");
            assert!(store.get(bad).await.is_err());
        }
        // Large objects survive intact.
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        store.put("vms/a/1/disks/d/p0000000001/000001", Bytes::from(big.clone())).await.unwrap();
        assert_eq!(store.get("vms/a/1/disks/d/p0000000001/000001").await.unwrap(), big);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hosts_sharing_a_store_see_only_their_own_objects() {
        let dir = tempfile::tempdir().unwrap();
        let shared: Target = Arc::new(LocalTarget::open(dir.path().join("t")).unwrap());
        let (h1, h2) = (HostTarget::new(shared.clone(), "h1").unwrap(), HostTarget::new(shared.clone(), "h2").unwrap());
        contract::run_contract(h1.as_ref()).await;
        h2.put("vms/a/1/points/0000000001.manifest", Bytes::from_static(b"h2's")).await.unwrap();
        assert_eq!(&h1.get("vms/a/1/points/0000000001.manifest").await.unwrap()[..], b"second");
        assert_eq!(h2.list("vms/").await.unwrap(), vec!["vms/a/1/points/0000000001.manifest"]);
        h2.delete("vms/a/1/points/0000000001.manifest").await.unwrap();
        assert_eq!(&h1.get("vms/a/1/points/0000000001.manifest").await.unwrap()[..], b"second");
        assert!(shared.get("hosts/h1/vms/a/1/points/0000000001.manifest").await.is_ok(), "layout: hosts/<id>/...");
        for bad in ["", "../x", "a/b", ".h"] {
            assert!(HostTarget::new(shared.clone(), bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn local_target_meets_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalTarget::open(dir.path().join("target")).unwrap();
        contract::run_contract(&store).await;
        // No temporary files are left behind.
        let leftovers: Vec<_> = walk(dir.path()).into_iter().filter(|p| p.contains(".tmp-")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn walk(p: &Path) -> Vec<String> {
        let mut out = vec![];
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
        out
    }
}
