//! The I/O behind the VM core's commands: each task runs on the engine's
//! runtime (blocking work on the blocking pool), records its job, and ends
//! with the [`Input`] the core awaits.
//!
//! Commit protocol (one path for base, delta and resync points,
//! [`commit_point`]): every object is put first (retried puts write the same
//! keys), then the epoch is checked against the chain fence, then the
//! manifest is put, then the point is added to the state store; only then
//! does the core delete the logs it holds. A crash between any two steps
//! leaves either objects no manifest names (overwritten by the retry under
//! the same keys) or a manifest the index does not list yet (the retry puts
//! it again); never a listed point with a missing object, never a log
//! deleted before its point is listed. The replica's block hashes are
//! brought up to the point after it is committed (see [`crate::replica::hashes`]).
//!
//! Initial copy: [`VmIo::take_snapshot`] starts the copy's progress journal
//! with the snapshot (durably, before any part is put); [`VmIo::copy_base`]
//! leaves out the parts the journal lists for the current snapshot and
//! records each new one after its put (see [`crate::replicate::progress`]);
//! the journal is removed once the base commits. That is what lets a
//! restart resume the copy (`vm::restart`).

use std::sync::Arc;

use crate::capture::disk::{self, Disk};
use crate::capture::held::HeldImage;
use crate::capture::snapshot::CowSnapshot;
use crate::changelog;
use crate::error::{Error, ErrorClass, Result};
use crate::host::Host;
use crate::model::{now_millis, JobKind, JobStatus, PointKind, RecoveryPoint, UnixMillis};
use crate::replica::hashes::{self, BlockHashes, HashUpdates};
use crate::replica::manifest::{DiskManifest, Keys, Manifest, MANIFEST_FORMAT};
use crate::replicate::progress::{self, CopyPurpose, DiskAtSnapshot, ProgressHeader, ProgressJournal};
use crate::replicate::{self, UploadCtx};
use crate::resync::{self, ResyncStats};
use crate::runtime::blocking;
use crate::state::jobs::JobProgress;

use super::core::{BaseCopy, Failure, Input, PendingLog};
use super::ChainFence;

/// A disk's kept replica hashes, shared with the tasks that commit points.
pub(crate) type HashCache = Arc<std::sync::Mutex<Option<BlockHashes>>>;

/// What every task of one VM works with.
#[derive(Clone)]
pub(crate) struct VmIo {
    pub host: Arc<Host>,
    pub vm: String,
    pub generation: u64,
    pub workers: usize,
    pub disks: Vec<Arc<Disk>>,
    pub caches: Vec<HashCache>,
    pub fence: Arc<ChainFence>,
}

fn failure(what: &str, e: &Error) -> Failure {
    if e.class() != ErrorClass::Cancelled {
        tracing::warn!(what, error = %e, class = ?e.class(), "task failed");
    }
    Failure { class: e.class(), reason: format!("{what} failed: {e}") }
}

/// A job whose task has not finished it: dropped so, the job ends as
/// cancelled.
struct UnfinishedJob(Option<(Arc<Host>, crate::model::JobId)>);

impl Drop for UnfinishedJob {
    fn drop(&mut self) {
        let Some((host, id)) = self.0.take() else { return };
        let finish = move || host.jobs.finish(id, Err((JobStatus::Cancelled, "the VM stopped".into())));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(finish)),
            Err(_) => finish(),
        }
    }
}

impl VmIo {
    fn upload_ctx(&self, job: &JobProgress) -> UploadCtx {
        let c = &self.host.config;
        UploadCtx {
            target: self.host.target.clone(),
            throttle: self.host.throttle.clone(),
            vm: self.vm.clone(),
            generation: self.generation,
            chunk_size: c.chunk_size,
            zstd_level: c.zstd_level,
            workers: self.workers,
            progress: job.done.clone(),
            total: job.total.clone(),
            hash_block: c.resync_block_size,
        }
    }

    /// Runs `work` as a job of `kind`, given the job's progress counters;
    /// the job is started and finished off the actor thread.
    async fn job<T, Fut>(
        &self,
        kind: JobKind,
        total: u64,
        detail: String,
        work: impl FnOnce(JobProgress) -> Fut,
        done: impl FnOnce(&T) -> String,
    ) -> Result<T>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        // A task dropped part-way (the VM stopped: the actor cancels its
        // tasks) ends its job as cancelled instead of leaving it running.
        // The guard is made with the job, on the blocking thread: dropped
        // while the start is awaited, it is dropped there.
        let (host, vm) = (self.host.clone(), self.vm.clone());
        let (job, mut unfinished) = blocking(move || {
            let job = host.jobs.start(&vm, kind, total, detail)?;
            let unfinished = UnfinishedJob(Some((host, job.id)));
            Ok((job, unfinished))
        })
        .await?;
        let r = work(job.clone()).await;
        let outcome = match &r {
            Ok(v) => Ok(Some(done(v))),
            Err(e) if e.class() == ErrorClass::Cancelled => Err((JobStatus::Cancelled, e.to_string())),
            Err(e) => Err((JobStatus::Failed, e.to_string())),
        };
        let (host, id) = unfinished.0.take().expect("unfinished until here");
        let _ = blocking(move || {
            host.jobs.finish(id, outcome);
            Ok(())
        })
        .await;
        r
    }

    /// Releases any snapshot left, then snapshots every disk at one instant
    /// and starts the copy's progress journal for it (durably, before any
    /// part is put; see [`crate::replicate::progress`]).
    pub async fn take_snapshot(self, epoch: u64) -> Input {
        let (disks, fence) = (self.disks.clone(), self.fence.clone());
        let io = self.clone();
        let r = blocking(move || {
            fence.change(epoch, || {
                progress::remove(&io.host.config.paths().copy_progress(&io.vm))?;
                disks.iter().try_for_each(|d| release_snapshot(d))?;
                let (snaps, at, positions) = disk::snapshot_all(&disks)?;
                io.start_journal(CopyPurpose::Base, at, &snaps, positions)?;
                Ok(at)
            })
        })
        .await;
        Input::SnapshotTaken { epoch, result: r.map_err(|e| failure("snapshot", &e)) }
    }

    /// Writes the first line of a copy's progress journal (fsynced) and
    /// returns the journal, to record parts in.
    fn start_journal(
        &self,
        purpose: CopyPurpose,
        at: UnixMillis,
        snaps: &[Arc<CowSnapshot>],
        positions: Vec<disk::LogPosition>,
    ) -> Result<Arc<ProgressJournal>> {
        let c = &self.host.config;
        let header = ProgressHeader {
            format: progress::PROGRESS_FORMAT,
            purpose,
            vm: self.vm.clone(),
            generation: self.generation,
            snapshot_ms: at,
            chunk_size: c.chunk_size,
            hash_block: c.resync_block_size,
            disks: self
                .disks
                .iter()
                .zip(snaps)
                .zip(positions)
                .map(|((d, s), pos)| DiskAtSnapshot {
                    name: d.name.clone(),
                    size: d.size(),
                    side: s.path().to_path_buf(),
                    log_seq: pos.map(|p| p.0),
                    log_records: pos.map_or(0, |p| p.1),
                })
                .collect(),
        };
        ProgressJournal::create(&c.paths().copy_progress(&self.vm), &header).map(Arc::new)
    }

    /// The copy's progress journal, if it belongs to the disks' current
    /// snapshots: the parts already on the target per disk (under `seq`)
    /// and the journal to go on with. A journal for another snapshot (or
    /// none) gives nothing: every part is copied.
    fn copy_resume(&self, purpose: CopyPurpose, seq: u64) -> Result<Vec<replicate::Resume>> {
        let path = self.host.config.paths().copy_progress(&self.vm);
        let none = || vec![replicate::Resume::default(); self.disks.len()];
        let Some(found) = progress::load(&path)? else { return Ok(none()) };
        let c = &self.host.config;
        let h = &found.header;
        let matches = h.purpose == purpose
            && h.vm == self.vm
            && h.generation == self.generation
            && h.chunk_size == c.chunk_size
            && h.hash_block == c.resync_block_size
            && h.disks.len() == self.disks.len()
            && h.disks
                .iter()
                .zip(&self.disks)
                .all(|(hd, d)| hd.name == d.name && d.snapshot().is_some_and(|s| s.path() == hd.side.as_path()));
        if !matches {
            tracing::warn!(vm = %self.vm, "the copy progress is for another snapshot; every part is copied");
            return Ok(none());
        }
        let journal = Arc::new(ProgressJournal::open(&path)?);
        Ok((0..self.disks.len())
            .map(|i| replicate::Resume {
                done: found.parts_of(i, seq).map(|p| (p.part, p.clone())).collect(),
                journal: Some((journal.clone(), i)),
            })
            .collect())
    }

    /// Copies every disk from its snapshot, one disk after the other (as
    /// Hyper-V does), parts in parallel within a disk.
    pub async fn copy_base(self, epoch: u64, seq: u64) -> Input {
        let total = self.disks.iter().map(|d| d.size()).sum();
        let io = self.clone();
        let r = self
            .job(
                JobKind::InitialReplication,
                total,
                format!("recovery point {seq}"),
                |job| async move {
                    let uctx = io.upload_ctx(&job);
                    let io2 = io.clone();
                    let resume = blocking(move || io2.copy_resume(CopyPurpose::Base, seq)).await?;
                    let resumed: usize = resume.iter().map(|r| r.done.len()).sum();
                    if resumed > 0 {
                        tracing::info!(vm = %io.vm, parts = resumed, "initial copy resumed: parts already on the target are not copied again");
                    }
                    let mut base = BaseCopy::default();
                    for (d, resume) in io.disks.iter().zip(resume) {
                        let snap = d
                            .snapshot()
                            .ok_or_else(|| Error::Cancelled(format!("the snapshot of disk {} was released", d.name)))?;
                        let copy = replicate::upload_base(&uctx, d.clone(), snap, seq, resume).await?;
                        base.objects.push(copy.objects);
                        base.hashes.push(copy.hashes);
                    }
                    Ok(base)
                },
                |_| "copied".into(),
            )
            .await;
        Input::BaseCopied { epoch, result: r.map_err(|e| failure("initial replication", &e)) }
    }

    /// Commits the base point, then releases the snapshot and the copy's
    /// progress. In that order: until the point is committed, a crash finds
    /// the journal and the side file and the copy resumes (`vm::restart`),
    /// with nothing to put again.
    pub async fn commit_base(self, epoch: u64, seq: u64, time_ms: UnixMillis, base: BaseCopy) -> Input {
        let disks = self
            .disks
            .iter()
            .zip(base.objects)
            .map(|(d, objects)| DiskManifest { name: d.name.clone(), size: d.size(), objects })
            .collect();
        let draft = PointDraft { seq, parent: None, kind: PointKind::Base, time_ms, disks };
        let r = self.commit_point(epoch, draft).await;
        if r.is_ok() {
            // The base is committed: its snapshot and the copy's progress are
            // no longer needed. Only if not superseded: a newer resync's
            // snapshot and journal must stay.
            let (disks, fence) = (self.disks.clone(), self.fence.clone());
            let journal = self.host.config.paths().copy_progress(&self.vm);
            let released = blocking(move || {
                fence.change(epoch, || {
                    disks.iter().try_for_each(|d| release_snapshot(d))?;
                    progress::remove(&journal)
                })
            })
            .await;
            if let Err(e) = released {
                tracing::warn!(vm = %self.vm, error = %e, "could not release the snapshot and the copy progress");
            }
            let block = self.host.config.resync_block_size;
            let changes = base
                .hashes
                .into_iter()
                .map(|hashes| HashChange::Replace(BlockHashes { generation: self.generation, seq, block, hashes }))
                .collect();
            self.keep_all_hashes(changes).await;
        }
        Input::BaseCommitted { epoch, result: r.map_err(|e| failure("committing the base point", &e)) }
    }

    /// Rotates every disk's log at one instant, then uploads the backlog and
    /// what was rotated out as point `seq` on top of `parent`, and commits.
    pub async fn run_cycle(self, epoch: u64, seq: u64, parent: u64, pending: Vec<Vec<PendingLog>>) -> Input {
        let (disks, fence) = (self.disks.clone(), self.fence.clone());
        // The attempt starts here: its rotation, and the held images it reads
        // with the attempt they are read for, taken at once under the fence
        // (a task this epoch no longer runs never reads a later attempt's).
        let started = blocking(move || {
            fence.change(epoch, || {
                let sealed = rotate_and_seal(&disks)?;
                let included: Vec<Vec<PendingLog>> = pending
                    .into_iter()
                    .zip(&sealed)
                    .map(|(mut p, s)| {
                        p.extend(s.iter().cloned());
                        p
                    })
                    .collect();
                let held: Vec<AttemptHeld> = disks
                    .iter()
                    .zip(&included)
                    .map(|(d, logs)| {
                        let paths: Vec<_> = logs.iter().map(|l| l.path.clone()).collect();
                        let held = d.held_for(&paths);
                        let attempts = held.iter().map(|h| h.as_ref().map(|h| h.attempt())).collect();
                        (held, attempts)
                    })
                    .collect();
                Ok((sealed, included, held))
            })
        })
        .await;
        let (sealed, included, held) = match started {
            Ok(s) => s,
            Err(e) => {
                let result = Err(failure("replication", &e));
                return Input::CycleEnded { epoch, sealed: vec![Vec::new(); self.disks.len()], result };
            }
        };
        let io = self.clone();
        let result = self
            .job(
                JobKind::DeltaReplication,
                0,
                format!("recovery point {seq}"),
                |job| async move { io.upload_logs(&io.upload_ctx(&job), epoch, seq, parent, &included, held).await },
                |p| match p {
                    Some(p) => format!("recovery point {} ({} bytes stored)", p.seq, p.bytes_stored),
                    None => "nothing to replicate".into(),
                },
            )
            .await;
        Input::CycleEnded { epoch, sealed, result: result.map_err(|e| failure("replication", &e)) }
    }

    /// Uploads the included logs of every disk (with their held images, as
    /// taken at the attempt's start) as point `seq` and commits it.
    async fn upload_logs(
        &self,
        uctx: &UploadCtx,
        epoch: u64,
        seq: u64,
        parent: u64,
        included: &[Vec<PendingLog>],
        held: Vec<AttemptHeld>,
    ) -> Result<Option<RecoveryPoint>> {
        if included.iter().all(|l| l.is_empty()) {
            return Ok(None);
        }
        let time_ms = included.iter().flatten().map(|l| l.sealed_ms).max().unwrap_or_else(now_millis);
        let mut disks = Vec::new();
        let mut all_updates = Vec::new();
        for ((d, logs), (held, attempts)) in self.disks.iter().zip(included).zip(held) {
            let paths: Vec<_> = logs.iter().map(|l| l.path.clone()).collect();
            let sealed = replicate::SealedLogs { logs: paths, image: d.clone(), held, attempts };
            let (objects, updates) = replicate::upload_logs(uctx, &d.name, sealed, seq).await?;
            disks.push(DiskManifest { name: d.name.clone(), size: d.size(), objects });
            all_updates.push(updates);
        }
        let draft = PointDraft { seq, parent: Some(parent), kind: PointKind::Delta, time_ms, disks };
        let point = self.commit_point(epoch, draft).await?;
        let generation = self.generation;
        let changes =
            all_updates.into_iter().map(|updates| HashChange::Apply { generation, parent, seq, updates }).collect();
        self.keep_all_hashes(changes).await;
        Ok(Some(point))
    }

    /// Compares every disk with the replica block by block and sends only
    /// what differs (see [`crate::resync`]), as point `seq`.
    ///
    /// A restart must never find the resync's new chain under a state that
    /// trusts logs (it would ship it on top of `parent`, leaving out what the
    /// dropped logs held), so the resync waits until the writer stored the
    /// lifecycle version `stored.1` (Resynchronizing) before it starts.
    ///
    /// `resume_at`: a restart found this resync's snapshot (taken then) and
    /// progress journal, and installed the snapshot on the disks: only the
    /// parts the journal lacks are compared and put. Otherwise the resync
    /// starts a new log chain and snapshot, and a journal for them.
    pub async fn run_resync(
        self,
        epoch: u64,
        seq: u64,
        parent: u64,
        resume_at: Option<UnixMillis>,
        mut stored: (tokio::sync::watch::Receiver<u64>, u64),
    ) -> Input {
        let need = stored.1;
        if stored.0.wait_for(|v| *v >= need).await.is_err() {
            let e = Error::Cancelled("the VM stopped before its resync began".into());
            return Input::ResyncEnded { epoch, result: Err(failure("resync", &e)) };
        }
        let total = self.disks.iter().map(|d| d.size()).sum();
        let io = self.clone();
        let result = self
            .job(
                JobKind::Resync,
                total,
                format!("recovery point {seq}"),
                |job| async move {
                    // A resumed resync's snapshot is already installed: every
                    // way out below releases it.
                    let installed = match resume_at {
                        None => None,
                        Some(at) => {
                            let snaps = io.disks.iter().map(|d| {
                                d.snapshot().ok_or_else(|| {
                                    Error::Cancelled(format!("the resync snapshot of disk {} is gone", d.name))
                                })
                            });
                            Some((snaps.collect::<Result<Vec<_>>>()?, at))
                        }
                    };
                    // The replica as of `parent` does not change while the
                    // resync runs: read its hashes before the snapshot.
                    let against = match io.replica_hashes(parent).await {
                        Ok(a) => a,
                        Err(e) => {
                            if let Some((snaps, _)) = installed {
                                release_own_snapshots(&io.disks, snaps).await;
                            }
                            return Err(e);
                        }
                    };
                    let purpose = CopyPurpose::Resync { compared_with: against.is_some().then_some(parent) };
                    // A new resync records its parts in the journal it starts;
                    // a resumed one reads what its journal holds (below).
                    let (snaps, at, started) = match installed {
                        Some((snaps, at)) => (snaps, at, None),
                        None => {
                            let (disks, fence, io2) = (io.disks.clone(), io.fence.clone(), io.clone());
                            blocking(move || {
                                fence.change(epoch, || {
                                    progress::remove(&io2.host.config.paths().copy_progress(&io2.vm))?;
                                    let (snaps, at, positions) = disk::begin_resync(&disks)?;
                                    let journal = io2.start_journal(purpose, at, &snaps, positions)?;
                                    Ok((snaps, at, Some(journal)))
                                })
                            })
                            .await?
                        }
                    };
                    let r = async {
                        let resume = match started {
                            Some(journal) => (0..io.disks.len())
                                .map(|i| replicate::Resume { done: Default::default(), journal: Some((journal.clone(), i)) })
                                .collect(),
                            None => {
                                let io2 = io.clone();
                                let resume = blocking(move || io2.copy_resume(purpose, seq)).await?;
                                if resume.iter().any(|r| r.journal.is_none()) {
                                    // The rebuilt snapshot marks the journal's parts
                                    // as on the target; compared otherwise now, they
                                    // would be wrong: run the resync afresh (the
                                    // retry does).
                                    return Err(Error::Corrupt {
                                        what: format!("the resync progress of VM {}", io.vm),
                                        reason: "it no longer fits the replica or the settings; the resync starts again"
                                            .into(),
                                        class: ErrorClass::Recoverable,
                                    });
                                }
                                resume
                            }
                        };
                        let resumed: usize = resume.iter().map(|r| r.done.len()).sum();
                        if resumed > 0 {
                            tracing::info!(vm = %io.vm, parts = resumed, "resync resumed: parts already compared are not read again");
                        }
                        io.resync_all(&io.upload_ctx(&job), epoch, &snaps, (parent, against), seq, at, resume).await
                    }
                    .await;
                    release_own_snapshots(&io.disks, snaps).await;
                    r
                },
                |(p, s): &(RecoveryPoint, ResyncStats)| {
                    format!(
                        "recovery point {}: compared {} blocks, sent {} blocks, {} bytes sent",
                        p.seq, s.blocks_compared, s.blocks_sent, s.bytes_sent
                    )
                },
            )
            .await;
        if let Ok((p, s)) = &result {
            tracing::info!(vm = %self.vm, seq = p.seq, compared = s.blocks_compared, sent = s.blocks_sent,
                bytes = s.bytes_sent, "resync committed");
        }
        Input::ResyncEnded { epoch, result: result.map(|(p, _)| p).map_err(|e| failure("resync", &e)) }
    }

    /// The replica's block hashes of every disk as of point `last`, to
    /// compare with; None when there is nothing to compare with (no point,
    /// or a chain that lost an object): the resync then sends every block
    /// as a new base.
    async fn replica_hashes(&self, last: u64) -> Result<Option<Vec<Vec<u64>>>> {
        let host = &self.host;
        let (vm, generation) = (&self.vm, self.generation);
        let block = host.config.resync_block_size;
        if last == 0 {
            return Ok(None);
        }
        let broken = |e: &Error| {
            tracing::warn!(vm = %vm, error = %e, "replica chain broken: resync sends a full copy");
        };
        match resync::replica_intact(&host.target, vm, generation, last).await {
            Ok(()) => {}
            Err(e) if e.class() == ErrorClass::NeedsResync => {
                broken(&e);
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let scratch = host.config.paths().resync_scratch(vm);
        let mut hashes = Vec::new();
        for (d, cache) in self.disks.iter().zip(&self.caches) {
            let kept = cache.lock().expect("hash cache lock").clone().filter(|h| {
                h.generation == generation
                    && h.seq == last
                    && h.block == block
                    && h.hashes.len() as u64 == d.size().div_ceil(block)
            });
            if let Some(kept) = kept {
                hashes.push(kept.hashes); // kept as blocks were written: no need to read the replica
                continue;
            }
            let p = host.config.restore_parallelism;
            let read = resync::target_hashes(&host.target, vm, generation, last, &d.name, d.size(), block, &scratch, p);
            match read.await {
                Ok(h) => hashes.push(h),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&scratch);
                    if e.class() == ErrorClass::NeedsResync {
                        broken(&e);
                        return Ok(None);
                    }
                    return Err(e);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(Some(hashes))
    }

    #[allow(clippy::too_many_arguments)]
    async fn resync_all(
        &self,
        uctx: &UploadCtx,
        epoch: u64,
        snaps: &[Arc<CowSnapshot>],
        (last, against): (u64, Option<Vec<Vec<u64>>>),
        seq: u64,
        at: UnixMillis,
        resume: Vec<replicate::Resume>,
    ) -> Result<(RecoveryPoint, ResyncStats)> {
        let (vm, generation) = (&self.vm, self.generation);
        let block = self.host.config.resync_block_size;
        let full = against.is_none();
        let hashes = against.unwrap_or_else(|| vec![Vec::new(); self.disks.len()]);
        let mut stats = ResyncStats::default();
        let mut disks = Vec::new();
        let mut source_hashes = Vec::new();
        for (((d, snap), h), resume) in self.disks.iter().zip(snaps).zip(hashes).zip(resume) {
            let (objects, s, source) =
                resync::resync_disk(uctx, d.clone(), snap.clone(), Arc::new(h), seq, resume).await?;
            stats.add(&s);
            disks.push(DiskManifest { name: d.name.clone(), size: d.size(), objects });
            source_hashes.push(source);
        }
        let (parent, kind) = if full { (None, PointKind::Base) } else { (Some(last), PointKind::Delta) };
        let point = self.commit_point(epoch, PointDraft { seq, parent, kind, time_ms: at, disks }).await?;
        // The point is committed: its copy's progress is no longer needed.
        let journal = self.host.config.paths().copy_progress(vm);
        if let Err(e) = blocking(move || progress::remove(&journal)).await {
            tracing::warn!(vm = %vm, error = %e, "could not remove the resync progress");
        }
        // The replica now equals the snapshot block for block.
        let changes = source_hashes
            .into_iter()
            .map(|hashes| HashChange::Replace(BlockHashes { generation, seq, block, hashes }))
            .collect();
        self.keep_all_hashes(changes).await;
        Ok((point, stats))
    }

    /// Stops logging and drops every log and snapshot, unless a newer task
    /// changed the chain first. Waits until the writer stored the lifecycle
    /// version `stored.1` (ResyncRequired): writes after this go unlogged,
    /// so a restart must find a state that does not trust the logs (and the
    /// active log is marked untrusted as well, in case the state is lost).
    pub async fn discard_logs(self, epoch: u64, mut stored: (tokio::sync::watch::Receiver<u64>, u64)) -> Input {
        let need = stored.1;
        if stored.0.wait_for(|v| *v >= need).await.is_err() {
            let e = Error::Cancelled("the VM stopped before its logs were discarded".into());
            return Input::LogsDiscarded { epoch, result: Err(failure("discarding logs", &e)) };
        }
        let (disks, fence) = (self.disks.clone(), self.fence.clone());
        let r = blocking(move || {
            fence.change(epoch, || {
                for d in &disks {
                    // A copy still running is superseded: stop preserving for it.
                    release_snapshot(d)?;
                    d.stop_logging();
                    changelog::remove_logs(&d.path)?;
                }
                Ok(())
            })
        })
        .await;
        Input::LogsDiscarded { epoch, result: r.map_err(|e| failure("discarding logs", &e)) }
    }

    /// Deletes logs that are in a committed point (their bytes no longer count).
    pub async fn delete_logs(self, logs: Vec<Vec<PendingLog>>) {
        let disks = self.disks.clone();
        let _ = blocking(move || {
            for (d, logs) in disks.iter().zip(logs) {
                d.sealed_released(logs.iter().map(|l| l.bytes).sum());
                let paths: Vec<_> = logs.iter().map(|l| l.path.clone()).collect();
                for l in &paths {
                    if let Err(e) = changelog::remove_file_if_present(l) {
                        tracing::warn!(error = %e, "could not delete a committed change log");
                    }
                }
                // After the logs: a restart never finds a log without the
                // bytes it holds (an orphan side file is removed at open).
                d.release_held(&paths);
            }
            Ok(())
        })
        .await;
    }

    pub async fn release_snapshots(self) {
        release_snapshots(&self.disks).await
    }

    /// The one commit path (see the module header).
    async fn commit_point(&self, epoch: u64, draft: PointDraft) -> Result<RecoveryPoint> {
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            vm: self.vm.clone(),
            generation: self.generation,
            seq: draft.seq,
            parent: draft.parent,
            kind: draft.kind,
            time_ms: draft.time_ms,
            disks: draft.disks,
        };
        // Everything this task read came before this check (module header of the fence).
        self.fence.check(epoch)?;
        let key = Keys::new(&*self.host.target, &manifest.vm).manifest(manifest.generation, manifest.seq);
        replicate::put_retrying(&self.host.target, &key, manifest.encode()?.into()).await?;
        let point = RecoveryPoint {
            vm: manifest.vm.clone(),
            seq: manifest.seq,
            time_ms: manifest.time_ms,
            manifest_key: key,
            bytes_logical: manifest.bytes_logical(),
            bytes_stored: manifest.bytes_stored(),
            kind: manifest.kind,
        };
        let (state, p) = (self.host.state.clone(), point.clone());
        blocking(move || state.commit_point(&p)).await?;
        Ok(point)
    }

    /// After a point is committed, brings every disk's kept hashes up to it
    /// (one change per disk, in disk order), off the async workers.
    async fn keep_all_hashes(&self, changes: Vec<HashChange>) {
        let io = self.clone();
        let _ = blocking(move || {
            for ((d, cache), change) in io.disks.iter().zip(&io.caches).zip(changes) {
                keep_hashes(&io.host, &d.vm, &d.name, cache, change);
            }
            Ok(())
        })
        .await;
    }
}

/// A point about to be committed: everything its manifest says but the VM.
struct PointDraft {
    seq: u64,
    parent: Option<u64>,
    kind: PointKind,
    time_ms: UnixMillis,
    disks: Vec<DiskManifest>,
}

/// How a committed point changes a disk's kept replica hashes.
enum HashChange {
    /// The point sent every block (base copy, resync).
    Replace(BlockHashes),
    /// A delta on top of `parent`.
    Apply { generation: u64, parent: u64, seq: u64, updates: HashUpdates },
}

/// Brings a disk's kept hashes up to a committed point (blocking).
fn keep_hashes(host: &Host, vm: &str, disk: &str, cache: &HashCache, change: HashChange) {
    let mut c = cache.lock().expect("hash cache lock");
    match change {
        HashChange::Replace(h) => *c = Some(h),
        HashChange::Apply { generation, parent, seq, updates } => match c.as_mut() {
            Some(h) if h.generation == generation && h.seq == parent => {
                h.apply(&updates);
                h.seq = seq;
            }
            // Not known as of the parent: stay unknown (the file's seq no longer matches).
            _ => *c = None,
        },
    }
    if let Some(h) = c.as_ref() {
        if let Err(e) = h.save(&hashes::path(&host.config.data_dir, vm, disk)) {
            tracing::warn!(vm, disk, error = %e, "could not keep replica hashes; the next resync reads the replica");
        }
    }
}

/// Rotates every disk's active log at one instant (if any was written) and
/// seals the old ones. Returns the sealed logs per disk.
/// A disk's held images for the logs of one upload attempt (per log, in
/// order), and the attempt each is read for (`capture::held`).
type AttemptHeld = (Vec<Option<Arc<HeldImage>>>, Vec<Option<u64>>);

fn rotate_and_seal(disks: &[Arc<Disk>]) -> Result<Vec<Vec<PendingLog>>> {
    // A protected disk that is not logging cannot describe its changes.
    if let Some(d) = disks.iter().find(|d| d.active_header().is_none()) {
        return Err(Error::corrupt(format!("change log of disk {}", d.name), "the disk is not logging"));
    }
    // Nothing logged since the last rotation: the pending logs go again as
    // they are (a new upload attempt all the same, `capture::held`).
    if disk::new_attempt_if_unchanged(disks) {
        return Ok(vec![Vec::new(); disks.len()]);
    }
    // Nothing rotated yet on failure: remove what was prepared, so a retry starts clean.
    let discard_prepared = |next: Vec<changelog::LogWriter>| {
        for l in next {
            let p = l.path().to_path_buf();
            drop(l);
            let _ = std::fs::remove_file(p);
        }
    };
    let mut next = Vec::new();
    for d in disks {
        match d.prepare_next_log() {
            Ok(l) => next.push(l),
            Err(e) => {
                discard_prepared(next);
                return Err(e);
            }
        }
    }
    let (old, at) = disk::rotate_all(disks, next).map_err(|(e, next)| {
        discard_prepared(next);
        e
    })?;
    let mut out = Vec::new();
    for (d, log) in disks.iter().zip(old) {
        // A log that cannot be sealed breaks its disk's chain: resync, never
        // a cycle that would skip it (its siblings were rotated already).
        let sealed = log.seal().map_err(|e| Error::Corrupt {
            what: format!("change log of disk {}", d.name),
            reason: format!("sealing failed: {e}"),
            class: ErrorClass::NeedsResync,
        })?;
        d.sealed_added(sealed.end_offset);
        out.push(vec![PendingLog { path: sealed.path, bytes: sealed.end_offset, sealed_ms: at }]);
    }
    Ok(out)
}

/// Stops copy-before-write on a disk and deletes its side file.
pub(crate) fn release_snapshot(d: &Disk) -> Result<()> {
    match d.end_snapshot() {
        Some(s) => release_snapshot_arc(s),
        None => Ok(()),
    }
}

/// Deletes a snapshot's side file, even while a finishing copy task still
/// holds the snapshot (its reads then fail; its result is stale anyway).
fn release_snapshot_arc(s: Arc<CowSnapshot>) -> Result<()> {
    match Arc::try_unwrap(s) {
        Ok(s) => s.release(),
        Err(s) => changelog::remove_file_if_present(s.path()),
    }
}

/// Ends and releases the given snapshots on their disks only if they are
/// still the disks' current ones (a newer resync may have replaced them).
async fn release_own_snapshots(disks: &[Arc<Disk>], own: Vec<Arc<CowSnapshot>>) {
    let disks = disks.to_vec();
    let r = blocking(move || {
        for (d, s) in disks.iter().zip(own) {
            d.end_snapshot_if(&s);
            release_snapshot_arc(s)?;
        }
        Ok(())
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not release a snapshot");
    }
}

/// Stops copy-before-write on every disk and deletes the side files (their
/// space is reclaimed). A side file that cannot be deleted is only logged:
/// it is ours, holds nothing needed, and the next protection removes it.
async fn release_snapshots(disks: &[Arc<Disk>]) {
    let disks = disks.to_vec();
    let r = blocking(move || disks.iter().try_for_each(|d| release_snapshot(d))).await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "could not release a snapshot");
    }
}
