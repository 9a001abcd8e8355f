//! Restore: rebuild a recovery point's disks from the target into plain
//! image files (test failover, failover).
//!
//! It reads only the target, so it works when the source host is gone: the
//! chosen point's manifest, then its parents back to the nearest base. Every
//! object's checksum is verified before it is decompressed. Base objects and
//! the parts of one delta point do not overlap, so each of those sets is
//! applied with `parallelism` downloads in flight; points are applied in
//! order, oldest first.
//!
//! Crash safety: images are built as `<disk>.img.partial`, fsynced, then
//! renamed to `<disk>.img`; an interrupted restore leaves no image that looks
//! complete.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::model::PointKind;
use crate::replica::bundle::{self, ExtentData};
use crate::replica::manifest::{manifest_key, Manifest, ObjectRef};
use crate::target::Target;

/// Loads the manifests from the nearest base up to `seq`, oldest first.
pub async fn load_chain(target: &Target, vm: &str, generation: u64, seq: u64) -> Result<Vec<Manifest>> {
    let mut chain = Vec::new();
    let mut next = Some(seq);
    while let Some(s) = next {
        let key = manifest_key(vm, generation, s);
        let m = Manifest::decode(&key, &get_with_retries(target, &key).await?)?;
        if m.seq != s || m.vm != vm {
            return Err(Error::corrupt(format!("manifest {key}"), "names another point"));
        }
        next =
            match m.kind {
                PointKind::Base => None,
                PointKind::Delta => Some(m.parent.filter(|p| *p < s).ok_or_else(|| {
                    Error::corrupt(format!("manifest {key}"), "delta point without an earlier parent")
                })?),
            };
        chain.push(m);
    }
    chain.reverse();
    Ok(chain)
}

/// Tries of one download before a restore gives up on a recoverable error.
pub const RESTORE_TRIES: u32 = 6;

/// A restore runs during an outage: a flaky target gets a few quick retries
/// per object (0.1, 0.2, 0.4 ... s) before the restore fails.
async fn get_with_retries(target: &Target, key: &str) -> Result<bytes::Bytes> {
    let mut delay = std::time::Duration::from_millis(100);
    for _ in 1..RESTORE_TRIES {
        match target.get(key).await {
            Err(e) if e.class() == crate::ErrorClass::Recoverable => {
                tracing::debug!(key, error = %e, "restore download failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    target.get(key).await
}

#[derive(Debug, Clone)]
pub struct RestoredDisk {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

/// What to rebuild and how.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOpts<'a> {
    /// Downloads in flight.
    pub parallelism: usize,
    /// Only this disk (resync's replica hashing); `None` = every disk.
    pub only: Option<&'a str>,
    /// fsync the images before renaming them into place. Off only for
    /// scratch copies that are read once and deleted.
    pub durable: bool,
}

/// Rebuilds every disk of point `seq` (or only `opts.only`) as `<out_dir>/<disk>.img`.
#[allow(clippy::too_many_arguments)]
pub async fn restore_point(
    target: &Target,
    vm: &str,
    generation: u64,
    seq: u64,
    out_dir: &Path,
    opts: RestoreOpts<'_>,
    progress: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
) -> Result<Vec<RestoredDisk>> {
    let chain = load_chain(target, vm, generation, seq).await?;
    let last = chain.last().expect("a chain has at least its own point");
    total.store(chain.iter().map(|m| m.bytes_logical()).sum(), Ordering::Relaxed);
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(format!("create {}", out_dir.display()), e))?;
    let mut files = Vec::new();
    for d in last.disks.iter().filter(|d| opts.only.is_none_or(|o| o == d.name)) {
        let partial = out_dir.join(format!("{}.img.partial", d.name));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| Error::io(format!("create {}", partial.display()), e))?;
        f.set_len(d.size).map_err(|e| Error::io(format!("size {}", partial.display()), e))?;
        files.push((d.name.clone(), partial, Arc::new(f), d.size));
    }
    for m in &chain {
        let mut work: Vec<(Arc<File>, u64, ObjectRef)> = Vec::new();
        for d in &m.disks {
            let Some((_, _, f, size)) = files.iter().find(|(n, ..)| *n == d.name) else {
                continue; // a disk the chosen point no longer has
            };
            work.extend(d.objects.iter().map(|o| (f.clone(), *size, o.clone())));
        }
        futures::stream::iter(work)
            .map(|(f, size, o)| {
                let progress = progress.clone();
                async move {
                    let bytes = get_with_retries(target, &o.key).await?;
                    let logical = o.logical_len;
                    tokio::task::spawn_blocking(move || apply_object(&f, size, &o, &bytes))
                        .await
                        .map_err(|e| Error::Internal(format!("restore task failed: {e}")))??;
                    progress.fetch_add(logical, Ordering::Relaxed);
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(opts.parallelism)
            .try_collect::<()>()
            .await?;
    }
    let mut out = Vec::new();
    for (name, partial, f, size) in files {
        if opts.durable {
            f.sync_all().map_err(|e| Error::io(format!("sync {}", partial.display()), e))?;
        }
        let path = out_dir.join(format!("{name}.img"));
        std::fs::rename(&partial, &path).map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
        out.push(RestoredDisk { name, path, size });
    }
    if opts.durable {
        File::open(out_dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync restore folder", e))?;
    }
    Ok(out)
}

fn apply_object(f: &File, size: u64, o: &ObjectRef, bytes: &[u8]) -> Result<()> {
    for e in bundle::decode(&o.key, bytes, o.checksum)? {
        if e.offset.checked_add(e.data.len()).is_none_or(|end| end > size) {
            return Err(Error::corrupt(format!("object {}", o.key), "extent beyond the end of the disk"));
        }
        match e.data {
            ExtentData::Data(d) => f.write_all_at(&d, e.offset),
            ExtentData::Zero(n) => crate::capture::extents::zero_range(f, e.offset, n),
        }
        .map_err(|err| Error::io("write restored image", err))?;
    }
    Ok(())
}
