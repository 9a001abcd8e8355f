//! The upload pipeline: snapshot chunks and sealed change logs become
//! bundles on the target.
//!
//! Overview: one pipeline for every point, [`put_parts`]: plan (pure: cut
//! the work of one disk into parts, leave out zeros or matching blocks) ->
//! build and compress each part on the blocking pool -> charge it to the
//! host-wide throttle -> put it with retries under a key fixed by (point,
//! disk, part), so a retry writes the same keys. `workers` parts are in
//! flight at once (the VM's worker pool). A part is a chunk of the snapshot
//! for the base copy ([`upload_base`]) and the resync
//! ([`crate::resync::resync_disk`]), or a run of coalesced log extents of at
//! most `chunk_size` data bytes for a delta ([`upload_logs`]).
//!
//! Consistency: this module only puts objects. The commit (manifest after
//! every object, then the index, then the logs deleted) is one path, stated
//! with its crash argument in `vm::tasks`.
//!
//! Cancellation: dropping the future stops scheduling new parts; objects
//! already put are harmless (no manifest names them) and are overwritten by
//! the retry.
//!
//! Resume: a snapshot copy marks a part's blocks copied in the snapshot
//! only after its put returned (and, for the base copy, after the part is
//! in the progress journal, [`progress`]), so a copy interrupted by a crash
//! of ferryd goes on with the parts the journal lacks (see `vm::restart`).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::capture::disk::Disk;
use crate::capture::held::HeldImage;
use crate::capture::snapshot::CowSnapshot;
use crate::changelog::{self, Coalescer, Extent, ExtentSource};
use crate::error::{Error, Result};
use crate::replica::bundle::{self, BundleExtent, ExtentData};
use crate::replica::manifest::{Keys, ObjectRef};
use crate::runtime::{background, blocking};
use crate::schedule::throttle::Throttle;
use crate::target::Target;

pub mod progress;

use progress::{PartDone, ProgressJournal};

/// What every upload needs to know; shared by a VM's jobs.
#[derive(Clone)]
pub struct UploadCtx {
    pub target: Target,
    pub throttle: Arc<Throttle>,
    pub vm: String,
    pub generation: u64,
    /// Largest logical bytes in one object.
    pub chunk_size: u64,
    pub zstd_level: i32,
    pub workers: usize,
    /// Bytes done and bytes planned, for the job's progress.
    pub progress: Arc<AtomicU64>,
    pub total: Arc<AtomicU64>,
    /// Block size of the replica hashes kept for resync ([`crate::replica::hashes`]).
    pub hash_block: u64,
}

async fn put_part(ctx: &UploadCtx, key: String, enc: bundle::EncodedBundle) -> Result<ObjectRef> {
    let stored_len = enc.bytes.len() as u64;
    put_with_retries(ctx, &key, Bytes::from(enc.bytes)).await?;
    Ok(ObjectRef { key, checksum: enc.checksum, stored_len, logical_len: enc.logical_len })
}

/// Quick tries of one put before the step fails (and the step-level backoff
/// of [`crate::schedule::retry`] takes over): transient errors of one request should
/// not restart a whole cycle.
pub const PUT_TRIES: u32 = 4;

/// Puts one object, charged to the throttle, retrying recoverable errors
/// after 0.1, 0.2, 0.4 s. The key is the same on every try.
pub async fn put_with_retries(ctx: &UploadCtx, key: &str, data: Bytes) -> Result<()> {
    ctx.throttle.acquire(&ctx.vm, data.len() as u64).await;
    put_retrying(&ctx.target, key, data).await
}

/// Puts one object, retrying recoverable errors after 0.1, 0.2, 0.4 s
/// (`PUT_TRIES` in all). The key is the same on every try.
pub async fn put_retrying(target: &Target, key: &str, data: Bytes) -> Result<()> {
    let mut delay = std::time::Duration::from_millis(100);
    for _ in 1..PUT_TRIES {
        match target.put(key, data.clone()).await {
            Err(e) if e.class() == crate::ErrorClass::Recoverable => {
                tracing::debug!(key, error = %e, "put failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    target.put(key, data).await
}

/// Builds part `i` of a point on the blocking pool: the extents to put
/// (none: the part needs no object), the disk bytes it accounts for (job
/// progress), and a by-product for the caller (block hashes).
pub type BuildPart<T> = Arc<dyn Fn(u64) -> Result<(Vec<BundleExtent>, u64, T)> + Send + Sync>;

/// Runs on the blocking pool once part `i` is durably on the target (its
/// put returned), with what the part became; gives the by-product back.
pub type AfterPut<T> = Arc<dyn Fn(u64, &Option<ObjectRef>, T) -> Result<T> + Send + Sync>;

/// The one upload loop of every point (base copy, delta, resync): each of
/// the `parts` (part numbers) is built on the blocking pool, compressed,
/// charged to the throttle and put with retries under the key of (point,
/// disk, part), then handed to `after`, with `ctx.workers` parts in flight;
/// results come back in the order of `parts`.
pub async fn put_parts<T: Send + 'static>(
    ctx: &UploadCtx,
    disk: &str,
    seq: u64,
    parts: Vec<u64>,
    build: BuildPart<T>,
    after: Option<AfterPut<T>>,
) -> Result<Vec<(Option<ObjectRef>, T)>> {
    futures::stream::iter(parts)
        .map(|i| {
            let (ctx, build, after) = (ctx.clone(), build.clone(), after.clone());
            let key = Keys::new(&*ctx.target, &ctx.vm).object(ctx.generation, disk, seq, i);
            async move {
                let level = ctx.zstd_level;
                // The reads take locks the guests' writes need (snapshot,
                // held image): they run at the daemon's priority. Only the
                // compression yields to the guests' I/O (`runtime::background`).
                let (extents, covered, extra) = blocking(move || build(i)).await?;
                let enc = match extents.is_empty() {
                    true => None,
                    false => Some(background(move || bundle::encode(&extents, level)).await?),
                };
                let object = match enc {
                    Some(enc) => Some(put_part(&ctx, key, enc).await?),
                    None => None,
                };
                let (object, extra) = match after {
                    Some(after) => {
                        blocking(move || {
                            let extra = after(i, &object, extra)?;
                            Ok((object, extra))
                        })
                        .await?
                    }
                    None => (object, extra),
                };
                ctx.progress.fetch_add(covered, Ordering::Relaxed);
                Ok::<_, Error>((object, extra))
            }
        })
        .buffered(ctx.workers)
        .try_collect()
        .await
}

/// Which ranges of a snapshot chunk to send: given the chunk's offset, its
/// bytes and the hash of each of its blocks, the extents to put (none: the
/// chunk needs no object). Pure; the base copy sends what is not zero, a
/// resync what differs from the replica.
pub type ChunkPlan = Arc<dyn Fn(u64, &[u8], &[u64]) -> Vec<BundleExtent> + Send + Sync>;

/// A snapshot copied to the target as point `seq`: the objects put (in disk
/// order) and the hash of every block of the snapshot (the replica's block
/// hashes once the point commits).
pub struct SnapshotCopy {
    pub objects: Vec<ObjectRef>,
    pub hashes: Vec<u64>,
}

/// A base copy resumed after a crash: the parts of this disk already on the
/// target (from the progress journal), and the journal to record new ones in.
#[derive(Clone, Default)]
pub struct Resume {
    /// Parts already on the target, by part number (not copied again).
    pub done: std::collections::BTreeMap<u64, PartDone>,
    /// Each part put is recorded here (as disk `disk_index`) before its
    /// blocks are marked copied.
    pub journal: Option<(Arc<ProgressJournal>, usize)>,
}

/// The one pipeline for snapshot copies (base copy and resync): read a
/// chunk through the snapshot, hash its blocks, plan what to send (pure),
/// compress, put with retries under the key of (point, disk, chunk), with
/// `ctx.workers` chunks in flight, then record the part in the journal (if
/// any) and mark its blocks copied. Chunk `i` is always part `i`, so a
/// retry writes the same keys; the parts in `resume.done` are not copied
/// again.
pub async fn copy_snapshot(
    ctx: &UploadCtx,
    disk: Arc<Disk>,
    snap: Arc<CowSnapshot>,
    seq: u64,
    plan: ChunkPlan,
    resume: Resume,
) -> Result<SnapshotCopy> {
    let (size, chunk, block) = (disk.size(), ctx.chunk_size, ctx.hash_block as usize);
    let name = disk.name.clone();
    let parts = size.div_ceil(chunk);
    let per_part = chunk.div_ceil(block as u64) as usize;
    for (i, p) in &resume.done {
        let len = if *i < parts { chunk.min(size - i * chunk) } else { 0 };
        if *i >= parts || p.hashes.len() != len.div_ceil(block as u64) as usize || p.hashes.len() > per_part {
            return Err(Error::corrupt(
                format!("the copy progress of disk {name}"),
                format!("part {i} does not fit a {size}-byte disk in {chunk}-byte parts"),
            ));
        }
        ctx.progress.fetch_add(len, Ordering::Relaxed);
    }
    let todo: Vec<u64> = (0..parts).filter(|i| !resume.done.contains_key(i)).collect();
    let reader = snap.clone();
    let build: BuildPart<Vec<u64>> = Arc::new(move |i| {
        let offset = i * chunk;
        let len = chunk.min(size - offset);
        let mut buf = vec![0u8; len as usize];
        reader.read_for_copy(disk.file(), offset, &mut buf)?;
        let hashes: Vec<u64> = buf.chunks(block).map(crate::replica::hashes::hash_block).collect();
        Ok((plan(offset, &buf, &hashes), len, hashes))
    });
    let journal = resume.journal.clone();
    let after: AfterPut<Vec<u64>> = Arc::new(move |i, object, hashes| {
        if let Some((journal, disk)) = &journal {
            journal.append(&PartDone { seq, disk: *disk, part: i, object: object.clone(), hashes: hashes.clone() })?;
        }
        snap.mark_copied(i * chunk, chunk);
        Ok(hashes)
    });
    let mut put = put_parts(ctx, &name, seq, todo.clone(), build, Some(after)).await?.into_iter();
    let mut done = resume.done.into_iter().peekable();
    let mut copy = SnapshotCopy { objects: Vec::new(), hashes: Vec::new() };
    // Merge both in part order.
    for i in 0..parts {
        let (o, h) = match done.peek() {
            Some((d, _)) if *d == i => done.next().map(|(_, p)| (p.object, p.hashes)).expect("peeked"),
            _ => put.next().ok_or_else(|| Error::Internal(format!("part {i} of disk {name} was not copied")))?,
        };
        copy.objects.extend(o);
        copy.hashes.extend(h);
    }
    Ok(copy)
}

/// Copies a disk as of its snapshot, leaving out zero blocks (a restored
/// image stays sparse); `resume` names the parts already on the target.
pub async fn upload_base(
    ctx: &UploadCtx,
    disk: Arc<Disk>,
    snap: Arc<CowSnapshot>,
    seq: u64,
    resume: Resume,
) -> Result<SnapshotCopy> {
    copy_snapshot(ctx, disk, snap, seq, Arc::new(|offset, buf, _| non_zero_extents(offset, buf)), resume).await
}

/// Granularity at which a base chunk leaves out zeros: a restored image
/// stays sparse there, and the point counts only the data it holds.
pub const ZERO_SKIP_BLOCK: usize = 64 << 10;

/// The runs of a chunk that are not all zeros, in `ZERO_SKIP_BLOCK` steps.
fn non_zero_extents(offset: u64, buf: &[u8]) -> Vec<BundleExtent> {
    let mut out: Vec<BundleExtent> = Vec::new();
    let mut run: Option<usize> = None;
    let mut pos = 0;
    for block in buf.chunks(ZERO_SKIP_BLOCK) {
        match (is_zero(block), run) {
            (false, None) => run = Some(pos),
            (true, Some(start)) => {
                out.push(BundleExtent {
                    offset: offset + start as u64,
                    data: ExtentData::Data(buf[start..pos].to_vec()),
                });
                run = None;
            }
            _ => {}
        }
        pos += block.len();
    }
    if let Some(start) = run {
        out.push(BundleExtent { offset: offset + start as u64, data: ExtentData::Data(buf[start..].to_vec()) });
    }
    out
}

fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes(w.try_into().expect("chunks of 8")) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

/// One part of a delta: extents to read from the logs.
type Part = Vec<Extent>;

/// Scans and coalesces a disk's sealed logs (in chain order) and cuts the
/// result into parts of at most `chunk_size` bytes of data.
pub fn plan_parts(logs: &[PathBuf], chunk_size: u64) -> Result<(Vec<Part>, u64)> {
    let mut c = Coalescer::new();
    for (i, path) in logs.iter().enumerate() {
        let scan = changelog::scan(path).map_err(untrusted_log)?;
        if !scan.clean {
            return Err(Error::corrupt(format!("change log {}", path.display()), "sealed log is not closed cleanly"));
        }
        for r in &scan.records {
            c.push(i, r);
        }
    }
    let extents = c.finish();
    let total = extents.iter().map(|e| e.len).sum();
    Ok((cut_parts(extents, chunk_size), total))
}

/// The held blocks each part reads, as (log index, block) pairs, and how
/// many parts read each (pure). A block is read for good once every part
/// that reads it is built (`capture::held`, shipped blocks).
fn held_reads(parts: &[Part]) -> (Vec<Vec<(usize, u64)>>, HashMap<(usize, u64), u32>) {
    let block = crate::capture::snapshot::SNAPSHOT_BLOCK;
    let mut readers: HashMap<(usize, u64), u32> = HashMap::new();
    let per_part = parts
        .iter()
        .map(|part| {
            let mut blocks: Vec<(usize, u64)> = part
                .iter()
                .filter_map(|e| match e.source {
                    ExtentSource::Image { log_index } if e.len > 0 => Some((log_index, e)),
                    _ => None,
                })
                .flat_map(|(log, e)| (e.offset / block..=(e.offset + e.len - 1) / block).map(move |b| (log, b)))
                .collect();
            blocks.sort_unstable();
            blocks.dedup();
            for b in &blocks {
                *readers.entry(*b).or_default() += 1;
            }
            blocks
        })
        .collect();
    (per_part, readers)
}

/// A sealed log that cannot be read (gone, damaged) breaks the chain: the
/// replica can only catch up by a resync, whatever the OS error was.
fn untrusted_log(e: Error) -> Error {
    match e {
        Error::Io { context, source, .. } => Error::Io { context, source, class: crate::ErrorClass::NeedsResync },
        Error::Corrupt { what, reason, .. } => Error::Corrupt { what, reason, class: crate::ErrorClass::NeedsResync },
        other => other,
    }
}

/// Splits extents into parts whose data bytes stay within `chunk_size`
/// (zero ranges cost nothing to carry) and whose extents stay within
/// [`bundle::MAX_EXTENTS`]: every part is a bundle restore accepts.
pub fn cut_parts(extents: Vec<Extent>, chunk_size: u64) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut cur: Part = Vec::new();
    let mut cur_bytes = 0u64;
    for mut e in extents {
        loop {
            if cur.len() == bundle::MAX_EXTENTS as usize {
                parts.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            let cost = if matches!(e.source, ExtentSource::Zero) { 0 } else { e.len };
            if cur_bytes + cost <= chunk_size {
                cur_bytes += cost;
                cur.push(e);
                break;
            }
            let room = chunk_size - cur_bytes;
            if room > 0 {
                let (head, tail) = split_extent(e, room);
                cur.push(head);
                e = tail;
            }
            parts.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

fn split_extent(e: Extent, at: u64) -> (Extent, Extent) {
    let tail_source = match e.source {
        ExtentSource::Log { log_index, pos } => ExtentSource::Log { log_index, pos: pos + at },
        other @ (ExtentSource::Zero | ExtentSource::Image { .. }) => other,
    };
    (
        Extent { offset: e.offset, len: at, source: e.source },
        Extent { offset: e.offset + at, len: e.len - at, source: tail_source },
    )
}

/// A disk's sealed logs to upload, and where their in-image records' bytes
/// are: the disk's image, through each log's held image (`capture::held`).
pub struct SealedLogs {
    pub logs: Vec<PathBuf>,
    pub image: Arc<Disk>,
    /// Per log (same order), the bytes held for it since its rotation.
    pub held: Vec<Option<Arc<HeldImage>>>,
    /// Per log, the upload attempt its held image is read for, taken with
    /// it at the attempt's start (`capture::held`, shipped blocks).
    pub attempts: Vec<Option<u64>>,
}

/// Uploads a disk's sealed logs as the parts of point `seq`. Also returns
/// how the replica's block hashes change ([`crate::replica::hashes`]).
pub async fn upload_logs(
    ctx: &UploadCtx,
    disk: &str,
    sealed: SealedLogs,
    seq: u64,
) -> Result<(Vec<ObjectRef>, crate::replica::hashes::HashUpdates)> {
    let SealedLogs { logs, image, held, attempts } = sealed;
    let chunk = ctx.chunk_size;
    let logs2 = logs.clone();
    let (parts, planned) = blocking(move || plan_parts(&logs2, chunk)).await?;
    ctx.total.fetch_add(planned, Ordering::Relaxed);
    let files: Arc<Vec<File>> = Arc::new(
        logs.iter()
            .map(|p| File::open(p).map_err(|e| untrusted_log(Error::io(format!("open change log {}", p.display()), e))))
            .collect::<Result<_>>()?,
    );
    let block = ctx.hash_block;
    let count = parts.len() as u64;
    let (part_blocks, readers) = held_reads(&parts);
    let readers = std::sync::Mutex::new(readers);
    let parts = Arc::new(parts);
    let build: BuildPart<crate::replica::hashes::HashUpdates> = Arc::new(move |i| {
        let mut updates = Vec::new();
        let extents = parts[i as usize]
            .iter()
            .map(|e| {
                let data = match e.source {
                    ExtentSource::Zero => ExtentData::Zero(e.len),
                    ExtentSource::Log { log_index, pos } => {
                        let mut buf = vec![0u8; e.len as usize];
                        std::os::unix::fs::FileExt::read_exact_at(&files[log_index], &mut buf, pos)
                            .map_err(|err| untrusted_log(Error::io("read change log payload", err)))?;
                        ExtentData::Data(buf)
                    }
                    ExtentSource::Image { log_index } => {
                        let h = held.get(log_index).and_then(|h| h.as_ref()).ok_or_else(|| Error::Corrupt {
                            what: format!("change log {}", logs[log_index].display()),
                            reason: "it names bytes in the disk image, but nothing held them since its rotation".into(),
                            class: crate::ErrorClass::NeedsResync,
                        })?;
                        let mut buf = vec![0u8; e.len as usize];
                        h.read(image.file(), e.offset, &mut buf)?;
                        ExtentData::Data(buf)
                    }
                };
                let bytes = match &data {
                    ExtentData::Data(d) => Some(&d[..]),
                    ExtentData::Zero(_) => None,
                };
                crate::replica::hashes::updates_for(e.offset, bytes, e.len, block, &mut updates);
                Ok(BundleExtent { offset: e.offset, data })
            })
            .collect::<Result<Vec<_>>>()?;
        // Held blocks no other part of this point still has to read are
        // read for good: the guest may change them without a save.
        let mut done: Vec<Vec<u64>> = vec![Vec::new(); held.len()];
        {
            let mut readers = readers.lock().expect("held readers lock is never poisoned");
            for key in &part_blocks[i as usize] {
                if let Some(n) = readers.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        done[key.0].push(key.1);
                    }
                }
            }
        }
        for ((h, attempt), blocks) in held.iter().zip(&attempts).zip(&done) {
            if let (Some(h), Some(attempt), false) = (h, attempt, blocks.is_empty()) {
                h.shipped(*attempt, blocks);
            }
        }
        let covered = extents.iter().map(|e| e.data.len()).sum();
        Ok((extents, covered, updates))
    });
    let mut objects = Vec::new();
    let mut updates = Vec::new();
    for (o, u) in put_parts(ctx, disk, seq, (0..count).collect(), build, None).await? {
        objects.extend(o);
        updates.extend(u);
    }
    Ok((objects, updates))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, len: u64, pos: u64) -> Extent {
        Extent { offset, len, source: ExtentSource::Log { log_index: 0, pos } }
    }

    #[test]
    fn held_blocks_are_counted_once_per_part_that_reads_them() {
        const B: u64 = crate::capture::snapshot::SNAPSHOT_BLOCK;
        let image = |offset, len, log_index| Extent { offset, len, source: ExtentSource::Image { log_index } };
        let parts = vec![
            // Block 0 twice in one part, block 1 shared with the next part.
            vec![image(0, 100, 0), image(200, 100, 0), image(B + 10, 10, 0), data(5 * B, 10, 0)],
            vec![image(B + 100, B, 0), image(0, 10, 1)],
            vec![Extent { offset: 9 * B, len: B, source: ExtentSource::Zero }],
        ];
        let (per_part, readers) = held_reads(&parts);
        assert_eq!(per_part, vec![vec![(0, 0), (0, 1)], vec![(0, 1), (0, 2), (1, 0)], vec![]]);
        let mut counts: Vec<_> = readers.into_iter().collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![((0, 0), 1), ((0, 1), 2), ((0, 2), 1), ((1, 0), 1)]);
    }

    #[test]
    fn parts_respect_the_chunk_size_and_keep_every_byte() {
        let extents = vec![
            data(0, 10, 100),
            Extent { offset: 10, len: 1000, source: ExtentSource::Zero },
            data(2000, 25, 500),
            data(3000, 3, 900),
        ];
        let parts = cut_parts(extents, 8);
        let mut covered = vec![];
        for p in &parts {
            let bytes: u64 = p.iter().filter(|e| !matches!(e.source, ExtentSource::Zero)).map(|e| e.len).sum();
            assert!(bytes <= 8, "{p:?}");
            covered.extend(p.iter().cloned());
        }
        // Re-joined, the pieces are the original extents, positions advanced with offsets.
        for e in &covered {
            if let ExtentSource::Log { pos, .. } = e.source {
                // Original extents: (offset, pos) = (0, 100), (2000, 500), (3000, 900).
                let (o, p) =
                    [(3000u64, 900u64), (2000, 500), (0, 100)].into_iter().find(|(o, _)| e.offset >= *o).unwrap();
                assert_eq!(pos - p, e.offset - o);
            }
        }
        let total: u64 = covered.iter().map(|e| e.len).sum();
        assert_eq!(total, 10 + 1000 + 25 + 3);
    }

    /// The bundle extents a part becomes (data read as a pattern of its position).
    fn bundle_extents(part: &Part) -> Vec<BundleExtent> {
        part.iter()
            .map(|e| BundleExtent {
                offset: e.offset,
                data: match e.source {
                    ExtentSource::Zero => ExtentData::Zero(e.len),
                    ExtentSource::Log { pos, .. } => ExtentData::Data((0..e.len).map(|i| (pos + i) as u8).collect()),
                    // The data an image extent stands for: a pattern of its offset.
                    ExtentSource::Image { .. } => ExtentData::Data((0..e.len).map(|i| (e.offset + i) as u8).collect()),
                },
            })
            .collect()
    }

    /// Random disks' worth of coalesced extents, in order and disjoint: data
    /// runs up to 256 KiB and zero runs up to 1 TiB (merged TRIMs).
    fn extent_lists() -> impl Strategy<Value = Vec<Extent>> {
        proptest::collection::vec((any::<bool>(), 1u64..1 << 18, 1u64..1 << 40, 0u64..1 << 20), 0..40).prop_map(|v| {
            let mut offset = 0u64;
            v.into_iter()
                .map(|(zero, data_len, zero_len, gap)| {
                    offset += gap;
                    let e = if zero {
                        Extent { offset, len: zero_len, source: ExtentSource::Zero }
                    } else {
                        Extent { offset, len: data_len, source: ExtentSource::Log { log_index: 0, pos: offset } }
                    };
                    offset += e.len;
                    e
                })
                .collect()
        })
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the planner cuts, the encoder accepts and the decoder
        /// (restore) reads back exactly: nothing is committed that restore refuses.
        #[test]
        fn every_planned_part_encodes_and_decodes(extents in extent_lists(), chunk_kib in 64u64..1024) {
            let chunk = chunk_kib << 10;
            let want: u64 = extents.iter().map(|e| e.len).sum();
            let mut got = 0;
            for part in cut_parts(extents, chunk) {
                let bundle = bundle_extents(&part);
                let enc = bundle::encode(&bundle, 1).expect("a planned part encodes");
                let dec = bundle::decode("part", &enc.bytes, enc.checksum).expect("restore reads what was committed");
                prop_assert_eq!(&dec, &bundle);
                got += enc.logical_len;
            }
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_zero_range_larger_than_any_chunk_restores() {
        // qemu-io `write -z 0 300M`, or many TRIMs merged by the coalescer.
        let part = cut_parts(vec![Extent { offset: 0, len: 300 << 20, source: ExtentSource::Zero }], 4 << 20);
        assert_eq!(part.len(), 1);
        let enc = bundle::encode(&bundle_extents(&part[0]), 3).unwrap();
        let dec = bundle::decode("p", &enc.bytes, enc.checksum).unwrap();
        assert_eq!(dec, vec![BundleExtent { offset: 0, data: ExtentData::Zero(300 << 20) }]);
    }

    #[test]
    fn parts_hold_at_most_max_extents() {
        // Tiny writes between trims: every extent costs a header even when its data is small.
        let n = bundle::MAX_EXTENTS as u64 * 2 + 5;
        let extents: Vec<Extent> = (0..n)
            .map(|i| match i % 2 {
                0 => Extent { offset: i * 2, len: 1, source: ExtentSource::Log { log_index: 0, pos: i } },
                _ => Extent { offset: i * 2, len: 2, source: ExtentSource::Zero },
            })
            .collect();
        let parts = cut_parts(extents, 4 << 20);
        assert_eq!(parts.len(), 3);
        for p in &parts {
            assert!(p.len() <= bundle::MAX_EXTENTS as usize);
            let enc = bundle::encode(&bundle_extents(p), 1).unwrap();
            assert_eq!(bundle::decode("p", &enc.bytes, enc.checksum).unwrap().len(), p.len());
        }
    }

    #[test]
    fn base_chunks_leave_out_zero_blocks() {
        let b = ZERO_SKIP_BLOCK;
        let mut buf = vec![0u8; 5 * b + 100];
        buf[b + 3] = 1; // block 1
        buf[2 * b] = 2; // block 2 (joins block 1)
        buf[5 * b + 99] = 3; // the short tail
        let got: Vec<(u64, u64)> = non_zero_extents(1000, &buf).iter().map(|e| (e.offset, e.data.len())).collect();
        assert_eq!(got, vec![(1000 + b as u64, 2 * b as u64), (1000 + 5 * b as u64, 100)]);
        assert!(non_zero_extents(0, &vec![0u8; 3 * b]).is_empty());
        let all: Vec<u8> = (0..b * 2).map(|i| i as u8 | 1).collect();
        assert_eq!(non_zero_extents(0, &all).len(), 1);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&vec![0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v));
    }
}
