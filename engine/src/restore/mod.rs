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
//!
//! Safe to point anywhere: disk names read from a manifest are validated
//! like names a user gives (a `../x` in a tampered manifest is an error
//! naming the manifest, never a path); the partial file is created with
//! `O_EXCL | O_NOFOLLOW` after any leftover is unlinked (a planted symlink
//! is removed, never followed); and an existing `<disk>.img` is replaced
//! only when [`RestoreOpts::replace`] says so (the final rename is
//! `RENAME_NOREPLACE` otherwise). Decompression is bounded by the largest
//! valid bundle (`replica::bundle`), so a zstd bomb is an error, not an OOM.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::error::{Error, Result};
use crate::model::PointKind;
use crate::replica::bundle::{self, ExtentData};
use crate::replica::manifest::{Keys, Manifest, ObjectRef};
use crate::target::Target;

/// Loads the manifests from the nearest base up to `seq`, oldest first.
pub async fn load_chain(target: &Target, vm: &str, generation: u64, seq: u64) -> Result<Vec<Manifest>> {
    let mut chain = Vec::new();
    let mut next = Some(seq);
    while let Some(s) = next {
        let key = Keys::new(&**target, vm).manifest(generation, s);
        let bytes = match get_with_retries(target, &key).await {
            // Under another key (or none) the name finds nothing: say why, if that is why.
            Err(e) if e.class() == crate::error::ErrorClass::NeedsResync => {
                explain_no_replica(target).await?;
                return Err(e);
            }
            r => r?,
        };
        let m = Manifest::decode(&key, &bytes)?;
        if m.seq != s || m.vm != vm {
            return Err(Error::corrupt(format!("manifest {key}"), "names another point"));
        }
        // Names become file names: checked exactly like names a user gives.
        for d in &m.disks {
            crate::model::validate_name("disk name", &d.name).map_err(|e| Error::Corrupt {
                what: format!("manifest {key}"),
                reason: format!("bad disk name: {e}"),
                class: crate::ErrorClass::NonRecoverable,
            })?;
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

/// A recovery point as the store alone shows it (no daemon, no state store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPoint {
    pub generation: u64,
    pub seq: u64,
    pub kind: PointKind,
    pub time_ms: crate::model::UnixMillis,
    pub bytes_logical: u64,
    pub bytes_stored: u64,
    pub disks: Vec<String>,
}

/// Why a VM's name finds nothing, when the reason is the key: an
/// encrypted store keys VMs by ids derived from its key, so without the key
/// (or with another) no name is found. Opening any manifest of the host
/// says which ("the replica is encrypted", "wrong encryption key", "written
/// without encryption"); Ok when the manifests open (the VM is not there).
async fn explain_no_replica(target: &Target) -> Result<()> {
    // A few manifests: one host's store may hold replicas of both kinds.
    for key in target.list("vms/").await?.iter().filter(|k| k.ends_with(".manifest")).take(16) {
        match get_with_retries(target, key).await {
            Err(e) if e.class() == crate::error::ErrorClass::NonRecoverable => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The recovery points of `vm`'s latest replica (its newest protection
/// generation) in `target`, oldest first, each read and checked from its
/// manifest. A VM with no replica there is `NotFound`.
pub async fn stored_points(target: &Target, vm: &str) -> Result<Vec<StoredPoint>> {
    crate::model::validate_name("VM name", vm)?;
    let keys = Keys::new(&**target, vm);
    let prefix = keys.root();
    let mut points: Vec<(u64, u64)> = Vec::new();
    for key in target.list(&prefix).await? {
        let rest = &key[prefix.len()..];
        let mut parts = rest.split('/');
        let (Some(generation), Some("points"), Some(file), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue; // a bundle
        };
        let parsed = (generation.parse::<u64>(), file.strip_suffix(".manifest").map(str::parse::<u64>));
        if let (Ok(g), Some(Ok(seq))) = parsed {
            points.push((g, seq));
        }
    }
    let Some(latest) = points.iter().map(|(g, _)| *g).max() else {
        explain_no_replica(target).await?;
        return Err(Error::not_found("replica of VM", format!("{vm} in {}", target.describe())));
    };
    points.retain(|(g, _)| *g == latest);
    points.sort();
    let mut out = Vec::with_capacity(points.len());
    for (generation, seq) in points {
        let key = keys.manifest(generation, seq);
        let m = Manifest::decode(&key, &get_with_retries(target, &key).await?)?;
        if m.seq != seq || m.vm != vm || m.generation != generation {
            return Err(Error::corrupt(format!("manifest {key}"), "names another point"));
        }
        out.push(StoredPoint {
            generation,
            seq,
            kind: m.kind,
            time_ms: m.time_ms,
            bytes_logical: m.bytes_logical(),
            bytes_stored: m.bytes_stored(),
            disks: m.disks.iter().map(|d| d.name.clone()).collect(),
        });
    }
    Ok(out)
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
    /// An existing `<disk>.img` is replaced; else the restore refuses it
    /// (before downloading anything) and never overwrites it.
    pub replace: bool,
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
    crate::paths::create_private_dirs(out_dir).map_err(|e| Error::io(format!("create {}", out_dir.display()), e))?;
    let wanted: Vec<_> = last.disks.iter().filter(|d| opts.only.is_none_or(|o| o == d.name)).collect();
    for d in &wanted {
        let image = out_dir.join(format!("{}.img", d.name));
        if !opts.replace && std::fs::symlink_metadata(&image).is_ok() {
            return Err(Error::AlreadyExists { what: "restored image", name: image.display().to_string() });
        }
    }
    let mut files = Vec::new();
    for d in wanted {
        let partial = out_dir.join(format!("{}.img.partial", d.name));
        let f = create_private_new(&partial)?;
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
        rename_into_place(&partial, &path, opts.replace)?;
        out.push(RestoredDisk { name, path, size });
    }
    if opts.durable {
        File::open(out_dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync restore folder", e))?;
    }
    Ok(out)
}

/// Creates `path` anew, mode 0600, never through a symlink: a leftover
/// (an interrupted restore's, or a planted link) is unlinked first, then
/// `O_CREAT | O_EXCL | O_NOFOLLOW` fails rather than follow anything that
/// appears meanwhile.
fn create_private_new(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove leftover {}", path.display()), e)),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))
}

/// Renames `from` to `to`; unless `replace`, fails if `to` exists
/// (`renameat2(RENAME_NOREPLACE)`), whatever it is.
fn rename_into_place(from: &Path, to: &Path, replace: bool) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let err = |e| Error::io(format!("rename to {}", to.display()), e);
    if replace {
        return std::fs::rename(from, to).map_err(err);
    }
    let c =
        |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::invalid("path", "contains NUL"));
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(Error::AlreadyExists { what: "restored image", name: to.display().to_string() });
        }
        return Err(err(e));
    }
    Ok(())
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
