//! The VM actor: one per protected VM.
//!
//! Overview: it owns the VM's disks (write path, change-log rotation),
//! its snapshot during initial replication and its upload jobs. Handlers
//! feed the [`Lifecycle`] state machine and carry out the actions it
//! returns; anything slow (file I/O, compression, target puts, state
//! commits) runs as a task on the engine's runtime and comes back as a
//! message. Writes never pass through the mailbox: NBD and the embedded API
//! call [`Disk`] directly.
//!
//! Consistency: a recovery point is committed in this order: objects put,
//! manifest put, point added to the state store, local logs deleted. A crash
//! between any two steps leaves either an unreferenced object (overwritten by
//! the retry, same keys) or logs that are uploaded again under the same keys.
//!
//! Restart: logs found beside the disks are checked (clean, chained); clean
//! ones are uploaded by the next cycle. A log that is not clean (the daemon
//! was killed) or a broken chain means the logs cannot be trusted: the VM
//! goes to `ResyncRequired`. A VM that was still in initial replication
//! starts protection again with a new snapshot.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::changelog;
use crate::config::AutoResync;
use crate::disk::{self, Disk, DiskSignal};
use crate::error::{Error, ErrorClass, Result};
use crate::hashes::{self, BlockHashes, HashUpdates};
use crate::jobs::JobProgress;
use crate::lifecycle::{Action, Event, Lifecycle, Transition, VmState};
use crate::manifest::{manifest_key, DiskManifest, Manifest, ObjectRef, MANIFEST_FORMAT};
use crate::model::{now_millis, JobKind, JobStatus, PointKind, RecoveryPoint, VmSpec};
use crate::resync::{self, ResyncStats};
use crate::retry::RetryState;
use crate::shared::Shared;
use crate::snapshot::{self, CowSnapshot};
use crate::state::VmRecord;
use crate::task::blocking;
use crate::upload::{self, UploadCtx};

use super::ChainFence;

/// A sealed log waiting to be part of a recovery point.
#[derive(Debug, Clone)]
pub struct PendingLog {
    pub path: PathBuf,
    pub bytes: u64,
    /// When it was sealed: the moment the point that includes it describes.
    pub sealed_ms: u64,
}

/// What a VM looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub spec: VmSpec,
    pub state: VmState,
    pub reason: Option<String>,
    pub transitions: Vec<Transition>,
    pub generation: u64,
    pub last_point_seq: u64,
    pub disks: Vec<DiskInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// NBD export name, `<vm>/<disk>`.
    pub export: String,
    pub active_log_bytes: u64,
    pub pending_log_bytes: u64,
    pub snapshot_bytes: u64,
}

/// Disks opened for a VM, and what was found beside them.
pub struct OpenedDisks {
    pub disks: Vec<Arc<Disk>>,
    pub pending: Vec<Vec<PendingLog>>,
    /// Why the logs found cannot be trusted (unclean, broken chain, missing).
    pub distrust: Option<String>,
    pub signals: tokio::sync::mpsc::UnboundedReceiver<DiskSignal>,
    /// The replica's block hashes kept for resync, per disk (None: not known).
    pub hashes: Vec<Option<BlockHashes>>,
}

/// A disk's kept replica hashes, shared with the tasks that commit points.
type HashCache = Arc<std::sync::Mutex<Option<BlockHashes>>>;

/// How a committed point changes a disk's kept replica hashes.
enum HashChange {
    /// The point sent every block (base copy, resync).
    Replace(BlockHashes),
    /// A delta on top of `parent`.
    Apply { generation: u64, parent: u64, seq: u64, updates: HashUpdates },
}

/// After a point is committed, brings every disk's kept hashes up to it
/// (one change per disk, in disk order), off the async workers.
async fn keep_all_hashes(shared: &Arc<Shared>, disks: &[Arc<Disk>], caches: &[HashCache], changes: Vec<HashChange>) {
    let (shared, disks, caches) = (shared.clone(), disks.to_vec(), caches.to_vec());
    let _ = blocking(move || {
        for ((d, cache), change) in disks.iter().zip(&caches).zip(changes) {
            keep_hashes(&shared, &d.vm, &d.name, cache, change);
        }
        Ok(())
    })
    .await;
}

/// After a point is committed, brings a disk's kept hashes up to it (blocking).
fn keep_hashes(shared: &Shared, vm: &str, disk: &str, cache: &HashCache, change: HashChange) {
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
        if let Err(e) = h.save(&hashes::path(&shared.config.data_dir, vm, disk)) {
            tracing::warn!(vm, disk, error = %e, "could not keep replica hashes; the next resync reads the replica");
        }
    }
}

/// Deletes what protection kept beside a disk: its logs and snapshot side files.
fn remove_local_files(disk_path: &std::path::Path) -> Result<()> {
    changelog::remove_logs(disk_path)?;
    snapshot::side_files(disk_path).iter().try_for_each(|side| changelog::remove_file_if_present(side))
}

/// Opens a VM's disks (blocking). `fresh`: a new protection (or one restarted
/// from scratch): old logs of this VM are removed and each disk starts a new
/// chain. Otherwise existing logs are checked and kept as pending.
pub fn open_disks(rec: &VmRecord, fresh: bool, data_dir: &std::path::Path) -> Result<OpenedDisks> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let vm = &rec.spec.name;
    let mut disks = Vec::new();
    let mut pending = Vec::new();
    let mut distrust = None;
    let mut hash_sets = Vec::new();
    for spec in &rec.spec.disks {
        disk::open_image(&spec.path)?; // a clear error before any log is touched
        let logs = changelog::list_logs(&spec.path)?;
        for (_, p) in &logs {
            if let Ok(scan) = changelog::scan(p) {
                if scan.header.vm != *vm || scan.header.disk != spec.name {
                    return Err(Error::FailedPrecondition(format!(
                        "{} holds change logs of VM {:?} disk {:?}: the disk belongs to another protection",
                        spec.path.display(),
                        scan.header.vm,
                        scan.header.disk
                    )));
                }
            }
        }
        let (found, why) = if fresh { (Vec::new(), None) } else { check_logs(&spec.name, &logs) };
        let next_seq = logs.last().map_or(1, |(s, _)| s + 1);
        let (kept, prev_id) = match (why, found) {
            (None, found) if !found.is_empty() => {
                let prev = found.last().map(|(_, h)| h.log_id).expect("non-empty");
                (found.into_iter().map(|(p, _)| p).collect(), prev)
            }
            (why, _) => {
                if !fresh {
                    distrust = distrust.or(Some(why.unwrap_or_else(|| {
                        format!("no change log found for disk {}: the chain is broken", spec.name)
                    })));
                }
                remove_local_files(&spec.path)?;
                (Vec::new(), 0)
            }
        };
        let sealed: u64 = kept.iter().map(|p: &PendingLog| p.bytes).sum();
        let log = disk::new_log(&spec.path, vm, &spec.name, next_seq, prev_id)?;
        disks.push(Arc::new(Disk::new(vm, &spec.name, &spec.path, log, sealed, tx.clone())?));
        pending.push(kept);
        let hpath = hashes::path(data_dir, vm, &spec.name);
        hash_sets.push(if fresh {
            let _ = std::fs::remove_file(&hpath);
            None
        } else {
            BlockHashes::load(&hpath).filter(|h| h.generation == rec.generation)
        });
    }
    Ok(OpenedDisks { disks, pending, distrust, signals: rx, hashes: hash_sets })
}

/// Checks a disk's logs: all cleanly closed and chained. Returns them as
/// pending logs, or why they cannot be trusted.
fn check_logs(disk: &str, logs: &[(u64, PathBuf)]) -> (Vec<(PendingLog, changelog::LogHeader)>, Option<String>) {
    let mut out: Vec<(PendingLog, changelog::LogHeader)> = Vec::new();
    for (_, path) in logs {
        let scan = match changelog::scan(path) {
            Ok(s) => s,
            Err(e) => return (out, Some(format!("change log {} is unreadable: {e}", path.display()))),
        };
        if !scan.clean {
            return (out, Some(format!("change log {} of disk {disk} was not closed cleanly", path.display())));
        }
        if let Some((_, prev)) = out.last() {
            if let Err(e) = changelog::check_chain(prev, &scan.header) {
                return (out, Some(format!("broken change log chain on disk {disk}: {e}")));
            }
        }
        let sealed_ms = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(scan.header.created_unix_ms, |d| d.as_millis() as u64);
        out.push((PendingLog { path: path.clone(), bytes: scan.file_len, sealed_ms }, scan.header));
    }
    (out, None)
}

pub struct VmActor {
    shared: Arc<Shared>,
    rec: VmRecord,
    disks: Vec<Arc<Disk>>,
    pending: Vec<Vec<PendingLog>>,
    /// Set at start when the logs found cannot be trusted.
    distrust: Option<String>,
    signals: Option<tokio::sync::mpsc::UnboundedReceiver<DiskSignal>>,
    /// Cancels this VM's running tasks (unprotect, shutdown).
    cancel: CancellationToken,
    snapshots: Vec<Arc<CowSnapshot>>,
    snapshot_ms: u64,
    base_objects: Vec<Vec<ObjectRef>>,
    /// Lifecycle changes go to one writer task, in order.
    persist: UnboundedSender<Lifecycle>,
    /// Callers that need a cycle that starts after their call.
    waiting_next: Vec<oneshot::Sender<Result<Option<RecoveryPoint>>>>,
    timer: Option<SpawnHandle>,
    /// The epoch of the newest tasks: bumped when logs are discarded or a
    /// resync starts, so a task started before is stale.
    log_epoch: u64,
    /// Orders changes to the log chain and fences commits (see [`ChainFence`]).
    fence: Arc<ChainFence>,
    /// Backoff of the failing step, if any.
    retry: RetryState,
    /// A retry is scheduled: timer ticks do not start cycles meanwhile.
    retry_timer: Option<SpawnHandle>,
    /// The step a retry runs again.
    last_step: Step,
    /// The auto-resync timer, while a VM waits for its window.
    resync_timer: Option<SpawnHandle>,
    /// Point number the next task uses. A retry of the same step reuses it
    /// (same keys); a task started while a superseded one may still run
    /// takes a new one, so two tasks never write the same keys.
    next_seq: u64,
    /// A cycle, initial copy or resync task is running.
    task_running: bool,
    /// Per disk: the replica's block hashes, kept as points commit.
    hash_caches: Vec<HashCache>,
    /// Per disk: block hashes of the base copy, kept until the base commits.
    base_hashes: Vec<Vec<u64>>,
}

/// The steps that can fail and be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Snapshot,
    InitialCopy,
    CommitBase,
    Cycle,
    Resync,
}

impl VmActor {
    pub fn new(shared: Arc<Shared>, rec: VmRecord, opened: OpenedDisks) -> Self {
        let next_seq = rec.last_point_seq + 1;
        let (persist, mut rx) = tokio::sync::mpsc::unbounded_channel::<Lifecycle>();
        let (state, name) = (shared.state.clone(), rec.spec.name.clone());
        shared.runtime.spawn(async move {
            while let Some(mut lc) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    lc = newer; // only the latest matters
                }
                let (state, name) = (state.clone(), name.clone());
                let r = tokio::task::spawn_blocking(move || state.update_vm(&name, |r| r.lifecycle = lc)).await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(vm = %name_of(&e), error = %e, "could not persist VM state");
                }
            }
        });
        VmActor {
            shared,
            rec,
            disks: opened.disks,
            pending: opened.pending,
            distrust: opened.distrust,
            signals: Some(opened.signals),
            cancel: CancellationToken::new(),
            snapshots: Vec::new(),
            snapshot_ms: 0,
            base_objects: Vec::new(),
            persist,
            waiting_next: Vec::new(),
            timer: None,
            log_epoch: 0,
            fence: Default::default(),
            retry: RetryState::default(),
            retry_timer: None,
            last_step: Step::Cycle,
            resync_timer: None,
            next_seq,
            task_running: false,
            hash_caches: opened.hashes.into_iter().map(|h| Arc::new(std::sync::Mutex::new(h))).collect(),
            base_hashes: Vec::new(),
        }
    }

    fn name(&self) -> &str {
        &self.rec.spec.name
    }

    fn bump_epoch(&mut self) {
        self.log_epoch = self.fence.bump();
    }

    fn apply(&mut self, event: Event, ctx: &mut Context<Self>) {
        let before = self.rec.lifecycle.clone();
        let actions = self.rec.lifecycle.on_event(event, now_millis());
        if self.rec.lifecycle != before {
            if self.rec.lifecycle.state != before.state {
                tracing::info!(vm = %self.name(), from = %before.state, to = %self.rec.lifecycle.state,
                    reason = ?self.rec.lifecycle.transitions.last().map(|t| &t.reason), "state change");
            }
            let _ = self.persist.send(self.rec.lifecycle.clone());
        }
        if matches!(self.rec.lifecycle.state, VmState::Critical | VmState::ResyncRequired) {
            let reason = self.rec.lifecycle.reason.clone().unwrap_or_default();
            for w in self.waiting_next.drain(..) {
                let _ = w.send(Err(Error::FailedPrecondition(format!(
                    "VM {} is {}: {reason}",
                    self.rec.spec.name, self.rec.lifecycle.state
                ))));
            }
        }
        for a in actions {
            self.act(a, ctx);
        }
    }

    fn upload_ctx(&self, progress: &JobProgress) -> UploadCtx {
        UploadCtx {
            target: self.shared.target.clone(),
            throttle: self.shared.throttle.clone(),
            vm: self.rec.spec.name.clone(),
            generation: self.rec.generation,
            chunk_size: self.shared.config.chunk_size,
            zstd_level: self.shared.config.zstd_level,
            workers: self.rec.spec.upload_workers,
            progress: progress.done.clone(),
            total: progress.total.clone(),
            hash_block: self.shared.config.resync_block_size,
        }
    }

    /// Runs `fut` on the engine runtime and delivers its result as a message.
    fn spawn<M, F>(&self, ctx: &mut Context<Self>, fut: F)
    where
        F: std::future::Future<Output = M> + Send + 'static,
        M: Message + Send + 'static,
        M::Result: Send,
        Self: Handler<M>,
    {
        let addr = ctx.address();
        let cancel = self.cancel.clone();
        self.shared.runtime.spawn(async move {
            tokio::select! {
                m = fut => addr.do_send(m),
                _ = cancel.cancelled() => {}
            }
        });
    }

    fn start_job(&self, kind: JobKind, total: u64, detail: String) -> Result<JobProgress> {
        self.shared.jobs.start(self.name(), kind, total, detail)
    }

    fn finish_job(&self, job: &JobProgress, r: &Result<Option<String>>) {
        let outcome = match r {
            Ok(d) => Ok(d.clone()),
            Err(e) if e.class() == ErrorClass::Cancelled => Err((JobStatus::Cancelled, e.to_string())),
            Err(e) => Err((JobStatus::Failed, e.to_string())),
        };
        self.shared.jobs.finish(job.id, outcome);
    }

    fn act(&mut self, action: Action, ctx: &mut Context<Self>) {
        match action {
            Action::TakeSnapshot => {
                let (disks, fence, epoch) = (self.disks.clone(), self.fence.clone(), self.log_epoch);
                self.spawn(ctx, async move {
                    Snapshotted(blocking(move || fence.change(epoch, || disk::snapshot_all(&disks))).await)
                });
            }
            Action::StartInitialCopy => self.start_initial_copy(ctx),
            Action::CommitBasePoint => self.commit_base(ctx),
            Action::StartCycle => self.start_cycle(ctx),
            Action::ScheduleRetry => {
                let now = now_millis();
                let at = self.retry.on_failure(&self.shared.retry, now);
                let delay = std::time::Duration::from_millis(at.saturating_sub(now));
                tracing::info!(vm = %self.name(), step = ?self.last_step, retry = self.retry.retries(), ?delay, "retry scheduled");
                if let Some(h) = self.retry_timer.take() {
                    ctx.cancel_future(h);
                }
                self.retry_timer = Some(ctx.run_later(delay, |act, ctx| {
                    act.retry_timer = None;
                    act.retry_step(ctx);
                }));
            }
            Action::RetryNow => {
                self.retry.on_success();
                if let Some(h) = self.retry_timer.take() {
                    ctx.cancel_future(h);
                }
                self.retry_step(ctx);
            }
            Action::DiscardLogs => self.discard_logs(ctx),
            Action::StartResync => self.start_resync(ctx),
        }
    }

    /// Runs the failed step again (its backlog was kept).
    fn retry_step(&mut self, ctx: &mut Context<Self>) {
        use VmState as S;
        match (self.last_step, self.rec.lifecycle.state) {
            (Step::Snapshot, S::EnablingProtection) => self.act(Action::TakeSnapshot, ctx),
            (Step::InitialCopy, S::InitialReplication) => {
                // Blocks already copied are no longer preserved: a retry on the
                // same snapshot would mix times. Take a new one (the logs since
                // the first one replay idempotently on top).
                let (disks, fence, epoch) = (self.disks.clone(), self.fence.clone(), self.log_epoch);
                self.snapshots.clear();
                self.spawn(ctx, async move {
                    release_snapshots(&disks).await;
                    Snapshotted(blocking(move || fence.change(epoch, || disk::snapshot_all(&disks))).await)
                });
            }
            (_, S::ResyncRequired) => self.schedule_auto_resync(ctx),
            (Step::CommitBase, S::FinalizingProtection) => self.commit_base(ctx),
            (Step::Resync, S::Resynchronizing) => self.start_resync(ctx),
            (_, S::Protected) => self.apply(Event::CycleDue, ctx),
            (step, state) => tracing::debug!(vm = %self.name(), ?step, %state, "retry no longer applies"),
        }
    }

    fn failed(&mut self, step: Step, e: &Error, what: &str, ctx: &mut Context<Self>) {
        self.last_step = step;
        tracing::warn!(vm = %self.name(), ?step, error = %e, class = ?e.class(), "{what} failed");
        self.apply(Event::Failed { class: e.class(), reason: format!("{what} failed: {e}") }, ctx);
    }

    /// Schedules the automatic resync of a VM in `ResyncRequired`.
    fn schedule_auto_resync(&mut self, ctx: &mut Context<Self>) {
        if self.rec.lifecycle.state != VmState::ResyncRequired || self.resync_timer.is_some() {
            return;
        }
        let wait_minutes = match self.shared.config.auto_resync {
            AutoResync::Manual => return,
            AutoResync::Immediately => 0,
            AutoResync::OffHours => {
                self.shared.throttle.policy().schedule.minutes_until_off_hours(crate::schedule::local_now())
            }
        };
        let delay = std::time::Duration::from_secs(wait_minutes as u64 * 60);
        tracing::info!(vm = %self.name(), ?delay, "automatic resync scheduled");
        self.resync_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.resync_timer = None;
            if act.rec.lifecycle.state != VmState::ResyncRequired {
                return;
            }
            // The window may have moved (schedule changed): check again.
            if act.shared.config.auto_resync == AutoResync::OffHours
                && act.shared.throttle.policy().schedule.minutes_until_off_hours(crate::schedule::local_now()) > 0
            {
                return act.schedule_auto_resync(ctx);
            }
            act.apply(Event::StartResync, ctx);
        }));
    }

    /// Compares every disk with the replica block by block and sends only
    /// what differs (see [`crate::resync`]).
    fn start_resync(&mut self, ctx: &mut Context<Self>) {
        self.bump_epoch(); // a task still running is stale now
        self.pending.iter_mut().for_each(|p| p.clear());
        if let Some(h) = self.resync_timer.take() {
            ctx.cancel_future(h);
        }
        if self.task_running {
            // The superseded task may still put objects under its number.
            self.next_seq += 1;
        }
        self.task_running = true;
        let last = self.rec.last_point_seq;
        let seq = self.next_seq;
        let total = self.disks.iter().map(|d| d.size()).sum();
        let job = match self.start_job(JobKind::Resync, total, format!("recovery point {seq}")) {
            Ok(j) => j,
            Err(e) => return self.failed(Step::Resync, &e, "resync", ctx),
        };
        let uctx = self.upload_ctx(&job);
        let (disks, shared, epoch) = (self.disks.clone(), self.shared.clone(), self.log_epoch);
        let (vm, generation) = (self.rec.spec.name.clone(), self.rec.generation);
        let caches = self.hash_caches.clone();
        let fence = self.fence.clone();
        self.spawn(ctx, async move {
            let (d2, f2) = (disks.clone(), fence.clone());
            let r = match blocking(move || f2.change(epoch, || disk::begin_resync(&d2))).await {
                Ok((snaps, at)) => {
                    let fence = (&*fence, epoch);
                    let r =
                        resync_all(&shared, &uctx, &disks, &snaps, &caches, fence, vm, generation, last, seq, at).await;
                    release_own_snapshots(&disks, snaps).await;
                    r
                }
                Err(e) => Err(e),
            };
            ResyncEnded { job, epoch, result: r }
        });
    }

    fn start_initial_copy(&mut self, ctx: &mut Context<Self>) {
        let total = self.disks.iter().map(|d| d.size()).sum();
        let job = match self.start_job(JobKind::InitialReplication, total, "recovery point 1".into()) {
            Ok(j) => j,
            Err(e) => return self.failed(Step::InitialCopy, &e, "initial replication", ctx),
        };
        let uctx = self.upload_ctx(&job);
        let work: Vec<_> = self.disks.iter().cloned().zip(self.snapshots.iter().cloned()).collect();
        let epoch = self.log_epoch;
        self.task_running = true;
        self.spawn(ctx, async move {
            let mut all = Vec::new();
            let mut result = Ok(());
            // One disk after the other, as Hyper-V does; parts in parallel within a disk.
            for (d, s) in work {
                match upload::upload_base(&uctx, d, s, 1).await {
                    Ok(r) => all.push(r),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            InitialCopied { job, epoch, result: result.map(|_| all) }
        });
    }

    fn commit_base(&mut self, ctx: &mut Context<Self>) {
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            vm: self.rec.spec.name.clone(),
            generation: self.rec.generation,
            seq: 1,
            parent: None,
            kind: PointKind::Base,
            time_ms: self.snapshot_ms,
            disks: self
                .disks
                .iter()
                .zip(self.base_objects.clone())
                .map(|(d, objects)| DiskManifest { name: d.name.clone(), size: d.size(), objects })
                .collect(),
        };
        self.snapshots.clear();
        self.task_running = true;
        let (shared, disks) = (self.shared.clone(), self.disks.clone());
        let caches = self.hash_caches.clone();
        let (generation, block) = (self.rec.generation, self.shared.config.resync_block_size);
        let hash_sets = self.base_hashes.clone();
        let (fence, epoch) = (self.fence.clone(), self.log_epoch);
        self.spawn(ctx, async move {
            release_snapshots(&disks).await;
            let r = match fence.check(epoch) {
                Ok(()) => commit_manifest(&shared, manifest).await,
                Err(e) => Err(e),
            };
            if r.is_ok() {
                let changes = hash_sets
                    .into_iter()
                    .map(|hashes| HashChange::Replace(BlockHashes { generation, seq: 1, block, hashes }))
                    .collect();
                keep_all_hashes(&shared, &disks, &caches, changes).await;
            }
            BaseCommitted(r)
        });
    }

    fn start_cycle(&mut self, ctx: &mut Context<Self>) {
        let waiters = std::mem::take(&mut self.waiting_next);
        let seq = self.next_seq;
        let job = match self.start_job(JobKind::DeltaReplication, 0, format!("recovery point {seq}")) {
            Ok(j) => j,
            Err(e) => return self.failed(Step::Cycle, &e, "replication", ctx),
        };
        self.task_running = true;
        let uctx = self.upload_ctx(&job);
        let (disks, pending, shared) = (self.disks.clone(), self.pending.clone(), self.shared.clone());
        let (vm, generation, parent) = (self.rec.spec.name.clone(), self.rec.generation, self.rec.last_point_seq);
        let epoch = self.log_epoch;
        let caches = self.hash_caches.clone();
        let fence = self.fence.clone();
        self.spawn(ctx, async move {
            let (disks2, f2) = (disks.clone(), fence.clone());
            let sealed = match blocking(move || f2.change(epoch, || rotate_and_seal(&disks2))).await {
                Ok(s) => s,
                Err(e) => return CycleEnded { job, epoch, waiters, included: vec![], result: Err(e) },
            };
            let included: Vec<Vec<PendingLog>> = pending
                .into_iter()
                .zip(sealed)
                .map(|(mut p, s)| {
                    p.extend(s);
                    p
                })
                .collect();
            let fence = (&*fence, epoch);
            let result =
                upload_cycle(&shared, &uctx, &disks, &included, fence, vm, generation, seq, parent, &caches).await;
            CycleEnded { job, epoch, waiters, included, result }
        });
    }

    /// Drops every log: the resync compares whole disks, so per-write logs
    /// are not needed until it starts (it opens a fresh chain). Logging stops
    /// meanwhile, so a VM waiting for its resync does not fill the disk.
    fn discard_logs(&mut self, ctx: &mut Context<Self>) {
        let disks = self.disks.clone();
        self.bump_epoch();
        self.pending.iter_mut().for_each(|p| p.clear());
        self.snapshots.clear();
        let (fence, epoch) = (self.fence.clone(), self.log_epoch);
        self.spawn(ctx, async move {
            // Only if no newer task (an operator resync) changed the chain first.
            let r = blocking(move || {
                fence.change(epoch, || {
                    for d in &disks {
                        // A copy still running is superseded: stop preserving for it.
                        release_snapshot(d)?;
                        drop(d.stop_logging());
                        changelog::remove_logs(&d.path)?;
                    }
                    Ok(())
                })
            })
            .await;
            LogsDiscarded(r)
        });
    }

    fn info(&self) -> VmInfo {
        VmInfo {
            spec: self.rec.spec.clone(),
            state: self.rec.lifecycle.state,
            reason: self.rec.lifecycle.reason.clone(),
            transitions: self.rec.lifecycle.transitions.clone(),
            generation: self.rec.generation,
            last_point_seq: self.rec.last_point_seq,
            disks: self
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    path: d.path.clone(),
                    size: d.size(),
                    export: d.export_name(),
                    active_log_bytes: d.active_log_bytes(),
                    pending_log_bytes: d.sealed_log_bytes(),
                    snapshot_bytes: d.snapshot_bytes(),
                })
                .collect(),
        }
    }
}

fn name_of(e: &Error) -> String {
    match e {
        Error::NotFound { name, .. } => name.clone(),
        _ => String::new(),
    }
}

/// Rotates every disk's active log at one instant (if any was written) and
/// seals the old ones. Returns the sealed logs per disk.
fn rotate_and_seal(disks: &[Arc<Disk>]) -> Result<Vec<Vec<PendingLog>>> {
    // A protected disk that is not logging cannot describe its changes.
    if let Some(d) = disks.iter().find(|d| d.active_header().is_none()) {
        return Err(Error::corrupt(format!("change log of disk {}", d.name), "the disk is not logging"));
    }
    if disks.iter().all(|d| d.active_records() == 0) {
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

/// Uploads the included logs of every disk as point `seq` and commits it.
#[allow(clippy::too_many_arguments)]
async fn upload_cycle(
    shared: &Arc<Shared>,
    uctx: &UploadCtx,
    disks: &[Arc<Disk>],
    included: &[Vec<PendingLog>],
    fence: (&ChainFence, u64),
    vm: String,
    generation: u64,
    seq: u64,
    parent: u64,
    caches: &[HashCache],
) -> Result<Option<RecoveryPoint>> {
    if included.iter().all(|l| l.is_empty()) {
        return Ok(None);
    }
    let time_ms = included.iter().flatten().map(|l| l.sealed_ms).max().unwrap_or_else(now_millis);
    let mut manifest_disks = Vec::new();
    let mut all_updates = Vec::new();
    for (d, logs) in disks.iter().zip(included) {
        let paths = logs.iter().map(|l| l.path.clone()).collect();
        let (objects, updates) = upload::upload_logs(uctx, &d.name, paths, seq).await?;
        manifest_disks.push(DiskManifest { name: d.name.clone(), size: d.size(), objects });
        all_updates.push(updates);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        vm,
        generation,
        seq,
        parent: Some(parent),
        kind: PointKind::Delta,
        time_ms,
        disks: manifest_disks,
    };
    fence.0.check(fence.1)?;
    let point = commit_manifest(shared, manifest).await?;
    let changes =
        all_updates.into_iter().map(|updates| HashChange::Apply { generation, parent, seq, updates }).collect();
    keep_all_hashes(shared, disks, caches, changes).await;
    Ok(Some(point))
}

/// Puts the manifest (all its objects are durable already), then commits the point.
async fn commit_manifest(shared: &Arc<Shared>, manifest: Manifest) -> Result<RecoveryPoint> {
    let key = manifest_key(&manifest.vm, manifest.generation, manifest.seq);
    upload::put_retrying(&shared.target, &key, manifest.encode()?.into()).await?;
    let point = RecoveryPoint {
        vm: manifest.vm.clone(),
        seq: manifest.seq,
        time_ms: manifest.time_ms,
        manifest_key: key,
        bytes_logical: manifest.bytes_logical(),
        bytes_stored: manifest.bytes_stored(),
        kind: manifest.kind,
    };
    let (state, p) = (shared.state.clone(), point.clone());
    blocking(move || state.commit_point(&p)).await?;
    Ok(point)
}

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(rx) = self.signals.take() {
            ctx.add_stream(tokio_stream_from(rx));
        }
        self.timer = Some(ctx.run_interval(self.rec.spec.frequency, |act, ctx| {
            // While a retry is pending the backoff decides, not the timer.
            if act.retry_timer.is_none() {
                act.apply(Event::CycleDue, ctx);
            }
        }));
        match self.rec.lifecycle.state {
            VmState::Unprotected => self.apply(Event::Protect, ctx),
            VmState::ResyncRequired => self.discard_logs(ctx),
            // Stopped mid-resync: its point was never committed, so run it again
            // (it starts a new chain and snapshot; logs found now are not needed).
            VmState::Resynchronizing => self.start_resync(ctx),
            _ => {
                if let Some(reason) = self.distrust.take() {
                    self.apply(Event::ResyncNeeded { reason }, ctx);
                }
            }
        }
        tracing::info!(vm = %self.name(), state = %self.rec.lifecycle.state, "VM actor started");
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.cancel.cancel();
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<DiskSignal>,
) -> impl futures::Stream<Item = DiskSignal> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl StreamHandler<DiskSignal> for VmActor {
    fn handle(&mut self, signal: DiskSignal, ctx: &mut Context<Self>) {
        match signal {
            DiskSignal::ResyncNeeded { reason, .. } => self.apply(Event::ResyncNeeded { reason }, ctx),
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // Disks keep a sender; the stream only ends when the actor is stopping.
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Snapshotted(Result<(Vec<Arc<CowSnapshot>>, u64)>);

impl Handler<Snapshotted> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: Snapshotted, ctx: &mut Context<Self>) {
        match msg.0 {
            Ok((snaps, at)) => {
                self.snapshots = snaps;
                self.snapshot_ms = at;
                self.rec.protected_since_ms = at;
                match self.rec.lifecycle.state {
                    VmState::EnablingProtection => self.apply(Event::SnapshotTaken, ctx),
                    // A retried initial copy on a fresh snapshot.
                    VmState::InitialReplication => self.start_initial_copy(ctx),
                    _ => {
                        let disks = self.disks.clone();
                        self.snapshots.clear();
                        self.spawn(ctx, async move {
                            release_snapshots(&disks).await;
                            LogsDiscarded(Ok(()))
                        });
                    }
                }
            }
            Err(e) => self.failed(Step::Snapshot, &e, "snapshot", ctx),
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct InitialCopied {
    job: JobProgress,
    epoch: u64,
    /// Per disk: the objects put and the hash of every block.
    result: Result<Vec<(Vec<ObjectRef>, Vec<u64>)>>,
}

impl Handler<InitialCopied> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: InitialCopied, ctx: &mut Context<Self>) {
        self.finish_job(&msg.job, &msg.result.as_ref().map(|_| None).map_err(clone_err));
        if msg.epoch != self.log_epoch || self.rec.lifecycle.state != VmState::InitialReplication {
            return; // superseded (logs discarded for a resync, or stopped)
        }
        self.task_running = false;
        match msg.result {
            Ok(per_disk) => {
                (self.base_objects, self.base_hashes) = per_disk.into_iter().unzip();
                self.retry.on_success();
                self.apply(Event::InitialCopyDone, ctx);
            }
            Err(e) => self.failed(Step::InitialCopy, &e, "initial replication", ctx),
        }
    }
}

/// Errors are not `Clone` (they hold io::Error); jobs keep the message.
fn clone_err(e: &Error) -> Error {
    match e.class() {
        ErrorClass::Cancelled => Error::Cancelled(e.to_string()),
        _ => Error::Internal(e.to_string()),
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct BaseCommitted(Result<RecoveryPoint>);

impl Handler<BaseCommitted> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: BaseCommitted, ctx: &mut Context<Self>) {
        self.task_running = false;
        match msg.0 {
            Ok(p) => {
                tracing::info!(vm = %self.name(), seq = p.seq, "base recovery point committed");
                self.rec.last_point_seq = p.seq;
                self.next_seq = self.next_seq.max(p.seq + 1);
                self.base_objects.clear();
                self.base_hashes.clear();
                self.retry.on_success();
                self.apply(Event::PointCommitted, ctx);
                // Writes made during the copy are in the logs: ship them now.
                self.apply(Event::CycleDue, ctx);
            }
            Err(e) => self.failed(Step::CommitBase, &e, "committing the base point", ctx),
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct CycleEnded {
    job: JobProgress,
    epoch: u64,
    /// The `replicate_now` callers this cycle answers.
    waiters: Vec<oneshot::Sender<Result<Option<RecoveryPoint>>>>,
    included: Vec<Vec<PendingLog>>,
    result: Result<Option<RecoveryPoint>>,
}

impl Handler<CycleEnded> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: CycleEnded, ctx: &mut Context<Self>) {
        let CycleEnded { job, epoch, waiters, included, result } = msg;
        if let Ok(Some(p)) = &result {
            // Committed, stale or not: a valid point; never reuse its number.
            self.rec.last_point_seq = self.rec.last_point_seq.max(p.seq);
            self.next_seq = self.next_seq.max(p.seq + 1);
        }
        if epoch != self.log_epoch {
            // The logs this cycle read were discarded meanwhile (resync
            // needed); a newer task may be running, so the lifecycle's
            // in-flight flag is not this cycle's to clear.
            self.finish_job(&job, &Err(Error::Cancelled("logs discarded for a resync".into())));
            for w in waiters {
                let _ = w.send(Err(Error::FailedPrecondition("the VM needs a resync".into())));
            }
            if self.rec.lifecycle.state == VmState::ResyncRequired {
                // The stale cycle may have swapped in a fresh log: stop it again.
                self.discard_logs(ctx);
            }
            return;
        }
        let detail = match &result {
            Ok(Some(p)) => Ok(Some(format!("recovery point {} ({} bytes stored)", p.seq, p.bytes_stored))),
            Ok(None) => Ok(Some("nothing to replicate".into())),
            Err(e) => Err(clone_err(e)),
        };
        self.finish_job(&job, &detail);
        // Newly sealed logs join the backlog whatever happened.
        for (pending, inc) in self.pending.iter_mut().zip(&included) {
            for l in inc {
                if !pending.iter().any(|p| p.path == l.path) {
                    pending.push(l.clone());
                }
            }
        }
        let answer = |r: &Result<Option<RecoveryPoint>>| match r {
            Ok(p) => Ok(p.clone()),
            Err(e) => Err(clone_err(e)),
        };
        self.task_running = false;
        for w in waiters {
            let _ = w.send(answer(&result));
        }
        match result {
            Ok(point) => {
                self.retry.on_success();
                if let Some(p) = &point {
                    self.rec.last_point_seq = p.seq;
                    tracing::debug!(vm = %self.name(), seq = p.seq, bytes = p.bytes_stored, "recovery point committed");
                }
                // Committed (or empty): those logs are no longer needed.
                let mut done = Vec::new();
                for ((pending, inc), d) in self.pending.iter_mut().zip(&included).zip(&self.disks) {
                    pending.retain(|p| !inc.iter().any(|l| l.path == p.path));
                    d.sealed_released(inc.iter().map(|l| l.bytes).sum());
                    done.extend(inc.iter().map(|l| l.path.clone()));
                }
                self.shared.runtime.spawn_blocking(move || {
                    for p in done {
                        if let Err(e) = std::fs::remove_file(&p) {
                            tracing::warn!(path = %p.display(), error = %e, "could not delete a committed change log");
                        }
                    }
                });
                self.apply(Event::PointCommitted, ctx);
            }
            Err(e) => self.failed(Step::Cycle, &e, "replication", ctx),
        }
        if !self.waiting_next.is_empty() {
            self.apply(Event::CycleDue, ctx);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct LogsDiscarded(Result<()>);

impl Handler<LogsDiscarded> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: LogsDiscarded, ctx: &mut Context<Self>) {
        match msg.0 {
            Ok(()) => self.schedule_auto_resync(ctx),
            Err(e) if e.class() == ErrorClass::Cancelled => {} // a newer task changed the chain first
            Err(e) => self.apply(
                Event::Failed { class: ErrorClass::NonRecoverable, reason: format!("discarding logs failed: {e}") },
                ctx,
            ),
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ResyncEnded {
    job: JobProgress,
    epoch: u64,
    result: Result<(RecoveryPoint, ResyncStats)>,
}

impl Handler<ResyncEnded> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: ResyncEnded, ctx: &mut Context<Self>) {
        let ResyncEnded { job, epoch, result } = msg;
        let detail = match &result {
            Ok((p, s)) => Ok(Some(format!(
                "recovery point {}: compared {} blocks, sent {} blocks, {} bytes sent",
                p.seq, s.blocks_compared, s.blocks_sent, s.bytes_sent
            ))),
            Err(e) => Err(clone_err(e)),
        };
        self.finish_job(&job, &detail);
        if let Ok((p, _)) = &result {
            self.rec.last_point_seq = self.rec.last_point_seq.max(p.seq);
            self.next_seq = self.next_seq.max(p.seq + 1);
        }
        if epoch != self.log_epoch {
            return; // a newer resync (or discard) superseded this one
        }
        self.task_running = false;
        match result {
            Ok((p, s)) => {
                tracing::info!(vm = %self.name(), seq = p.seq, compared = s.blocks_compared, sent = s.blocks_sent,
                    bytes = s.bytes_sent, "resync committed");
                self.rec.last_point_seq = p.seq;
                self.retry.on_success();
                self.apply(Event::ResyncDone, ctx);
                // Writes made during the resync are in the new logs: ship them now.
                self.apply(Event::CycleDue, ctx);
            }
            Err(e) => self.failed(Step::Resync, &e, "resync", ctx),
        }
    }
}

/// Stops copy-before-write on a disk and deletes its side file.
fn release_snapshot(d: &Disk) -> Result<()> {
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
        Err(s) => match std::fs::remove_file(s.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", s.path().display()), e))
            }
            _ => Ok(()),
        },
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

/// The resync of every disk, committed as point `seq` (see [`crate::resync`]).
#[allow(clippy::too_many_arguments)]
async fn resync_all(
    shared: &Arc<Shared>,
    uctx: &UploadCtx,
    disks: &[Arc<Disk>],
    snaps: &[Arc<CowSnapshot>],
    caches: &[HashCache],
    fence: (&ChainFence, u64),
    vm: String,
    generation: u64,
    last: u64,
    seq: u64,
    at: u64,
) -> Result<(RecoveryPoint, ResyncStats)> {
    let block = shared.config.resync_block_size;
    let scratch = shared.config.data_dir.join("scratch").join(&vm);
    let mut stats = ResyncStats::default();
    let mut manifest_disks = Vec::new();
    // A replica whose chain is broken (a missing object) cannot be compared
    // with: the resync then sends every block as a new base.
    let mut full = last == 0;
    let mut hashes = Vec::new();
    for (d, cache) in disks.iter().zip(caches) {
        let kept = cache.lock().expect("hash cache lock").clone().filter(|h| {
            h.generation == generation
                && h.seq == last
                && h.block == block
                && h.hashes.len() as u64 == d.size().div_ceil(block)
        });
        let h = if full {
            Vec::new()
        } else if let Some(kept) = kept {
            // Kept as blocks were written: no need to read the replica.
            kept.hashes
        } else {
            match resync::target_hashes(
                &shared.target,
                &vm,
                generation,
                last,
                &d.name,
                d.size(),
                block,
                &scratch,
                shared.config.restore_parallelism,
            )
            .await
            {
                Ok(h) => h,
                Err(e) if e.class() == ErrorClass::NeedsResync => {
                    tracing::warn!(vm = %vm, error = %e, "replica chain broken: resync sends a full copy");
                    full = true;
                    Vec::new()
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&scratch);
                    return Err(e);
                }
            }
        };
        hashes.push(h);
    }
    if full {
        hashes.iter_mut().for_each(|h| h.clear());
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let mut source_hashes = Vec::new();
    for ((d, snap), h) in disks.iter().zip(snaps).zip(hashes) {
        let (objects, s, source) = resync::resync_disk(uctx, d.clone(), snap.clone(), Arc::new(h), block, seq).await?;
        stats.add(&s);
        manifest_disks.push(DiskManifest { name: d.name.clone(), size: d.size(), objects });
        source_hashes.push(source);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        vm,
        generation,
        seq,
        parent: if full { None } else { Some(last) },
        kind: if full { PointKind::Base } else { PointKind::Delta },
        time_ms: at,
        disks: manifest_disks,
    };
    fence.0.check(fence.1)?;
    let point = commit_manifest(shared, manifest).await?;
    // The replica now equals the snapshot block for block.
    let changes = source_hashes
        .into_iter()
        .map(|hashes| HashChange::Replace(BlockHashes { generation, seq, block, hashes }))
        .collect();
    keep_all_hashes(shared, disks, caches, changes).await;
    Ok((point, stats))
}

/// Returns the VM's current view.
#[derive(Message)]
#[rtype(result = "VmInfo")]
pub struct GetInfo;

impl Handler<GetInfo> for VmActor {
    type Result = MessageResult<GetInfo>;
    fn handle(&mut self, _: GetInfo, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.info())
    }
}

/// Asks for a recovery point that includes every write acknowledged before
/// this message; the receiver fires when it is committed (`None`: nothing to ship).
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<Result<Option<RecoveryPoint>>>")]
pub struct ReplicateNow;

impl Handler<ReplicateNow> for VmActor {
    type Result = MessageResult<ReplicateNow>;
    fn handle(&mut self, _: ReplicateNow, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        match self.rec.lifecycle.state {
            VmState::Critical | VmState::ResyncRequired | VmState::Paused => {
                let _ = tx.send(Err(Error::FailedPrecondition(format!(
                    "VM {} is {}{}",
                    self.name(),
                    self.rec.lifecycle.state,
                    self.rec.lifecycle.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                ))));
            }
            _ => {
                self.waiting_next.push(tx);
                self.apply(Event::CycleDue, ctx);
            }
        }
        MessageResult(rx)
    }
}

/// Operator pause / resume.
#[derive(Message)]
#[rtype(result = "Result<VmInfo>")]
pub struct Operator(pub Event);

impl Handler<Operator> for VmActor {
    type Result = Result<VmInfo>;
    fn handle(&mut self, msg: Operator, ctx: &mut Context<Self>) -> Self::Result {
        let before = self.rec.lifecycle.state;
        self.apply(msg.0.clone(), ctx);
        if self.rec.lifecycle.state == before && !matches!(msg.0, Event::CycleDue) {
            return Err(Error::FailedPrecondition(format!("VM {} is {before}: cannot {:?}", self.name(), msg.0)));
        }
        Ok(self.info())
    }
}

/// Stops the actor. `unprotect`: delete local logs (the replica on the
/// target is kept); otherwise seal the active logs so a restart trusts them.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Stop {
    pub unprotect: bool,
}

impl Handler<Stop> for VmActor {
    type Result = ResponseActFuture<Self, Result<()>>;
    fn handle(&mut self, msg: Stop, _ctx: &mut Context<Self>) -> Self::Result {
        self.cancel.cancel();
        self.bump_epoch();
        let (disks, fence, epoch) = (self.disks.clone(), self.fence.clone(), self.log_epoch);
        for w in self.waiting_next.drain(..) {
            let _ = w.send(Err(Error::Cancelled("the VM is stopping".into())));
        }
        let in_initial = matches!(
            self.rec.lifecycle.state,
            VmState::EnablingProtection | VmState::InitialReplication | VmState::FinalizingProtection
        );
        let fut = blocking(move || {
            let _turn = fence.change(epoch, || Ok(()));
            for d in &disks {
                let _ = release_snapshot(d);
                // Connections that outlive the VM get errors, never unlogged writes.
                let log = d.close();
                if msg.unprotect || in_initial {
                    drop(log);
                    if msg.unprotect {
                        remove_local_files(&d.path)?;
                    }
                } else if let Some(log) = log {
                    log.seal()?;
                }
            }
            Ok(())
        });
        Box::pin(fut.into_actor(self).map(|r, _act, ctx| {
            ctx.stop();
            r
        }))
    }
}
