//! The VM actor: one per protected VM. It routes messages to the
//! [`VmCore`] and carries out the commands the core returns.
//!
//! Overview: the actor owns the VM's disks (their write path runs outside
//! the mailbox: NBD and the embedded API call [`Disk`] directly), its
//! timers and the reply channels of `replicate_now` callers. Every decision
//! (which task runs, with which point number and epoch, what a result
//! means, when to retry) is the core's; every task (snapshot, copy, cycle,
//! resync, discard, commit; see [`super::tasks`]) runs on the engine's
//! runtime and comes back as an [`Input`]. The core's epoch is mirrored
//! into the VM's [`ChainFence`] before any command of it is carried out, so
//! a task the core has superseded can neither change the log chain nor
//! commit.
//!
//! Nothing here blocks the mailbox: jobs and state commits run in the
//! tasks; the lifecycle is persisted by a writer task, in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::capture::disk::{Disk, DiskSignal};
use crate::config::AutoResync;
use crate::error::{Error, ErrorClass, Result};
use crate::host::Host;
use crate::model::{RecoveryPoint, VmSpec};
use crate::runtime::blocking;
use crate::state::VmRecord;
use crate::vm::lifecycle::{Event, Failover, Lifecycle, Transition, VmState};

use super::core::{Answer, Command, Input, Start, VmCore, WaiterId};
use super::open::OpenedDisks;
use super::tasks::{self, VmIo};
use super::ChainFence;

/// What a VM looks like from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub spec: VmSpec,
    pub state: VmState,
    pub reason: Option<String>,
    pub transitions: Vec<Transition>,
    /// The failover of a `FailedOver` VM.
    pub failover: Option<Failover>,
    pub generation: u64,
    pub last_point_seq: u64,
    pub disks: Vec<DiskInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub path: std::path::PathBuf,
    pub size: u64,
    /// NBD export name, `<vm>/<disk>`.
    pub export: String,
    pub active_log_bytes: u64,
    pub pending_log_bytes: u64,
    pub snapshot_bytes: u64,
}

/// Where the answer to a waiting caller goes.
enum Reply {
    /// `replicate_now`: the point that holds the caller's writes.
    Point(oneshot::Sender<Result<Option<RecoveryPoint>>>),
    /// A failover: the number of the point failed over to.
    Failover(oneshot::Sender<Result<u64>>),
}

pub struct VmActor {
    host: Arc<Host>,
    rec: VmRecord,
    core: VmCore,
    /// What the tasks work with (disks, kept hashes, fence).
    io: VmIo,
    /// How the VM starts, handed to the core once the actor runs.
    start: Option<Start>,
    signals: Option<tokio::sync::mpsc::UnboundedReceiver<DiskSignal>>,
    /// Cancels this VM's running tasks (unprotect, shutdown).
    cancel: CancellationToken,
    /// Lifecycle changes go to one writer task, in order, numbered.
    persist: UnboundedSender<(u64, Lifecycle)>,
    /// The number of the latest lifecycle sent to the writer.
    version: u64,
    /// The number of the latest lifecycle the writer has stored.
    persisted: tokio::sync::watch::Receiver<u64>,
    /// `version`, for a task that must see changes made after it started
    /// (a Stop waits for what the VM changed while its disks closed).
    latest_version: Arc<std::sync::atomic::AtomicU64>,
    /// Why the writer could not store the latest lifecycle, while it retries.
    store_error: Arc<std::sync::Mutex<Option<String>>>,
    replies: HashMap<WaiterId, Reply>,
    next_waiter: WaiterId,
    retry_timer: Option<SpawnHandle>,
    /// The auto-resync timer, while a VM waits for its window.
    resync_timer: Option<SpawnHandle>,
}

impl VmActor {
    pub fn new(host: Arc<Host>, rec: VmRecord, opened: OpenedDisks) -> Self {
        let (persist, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Lifecycle)>();
        let (stored, persisted) = tokio::sync::watch::channel(0u64);
        let (state, name, generation) = (host.state.clone(), rec.spec.name.clone(), rec.generation);
        let store_error = Arc::new(std::sync::Mutex::new(None::<String>));
        let last_error = store_error.clone();
        host.runtime.spawn(async move {
            let mut failed = 0u32;
            while let Some(mut latest) = rx.recv().await {
                loop {
                    while let Ok(newer) = rx.try_recv() {
                        latest = newer; // only the latest matters
                    }
                    let (version, lc) = latest.clone();
                    let (state, n) = (state.clone(), name.clone());
                    // Only into this protection's record: after an unprotect
                    // and a new protect the name is another record's.
                    let store = move || {
                        state.update_vm(&n, |r| {
                            if r.generation == generation {
                                r.lifecycle = lc
                            }
                        })
                    };
                    match blocking(store).await {
                        // Only a stored state may be waited for: a resync or a
                        // discard that went ahead on an unstored one could leave a
                        // restart trusting a chain they changed.
                        Ok(_) => {
                            failed = 0;
                            *last_error.lock().expect("store error lock") = None;
                            stored.send_replace(version);
                            break;
                        }
                        // Unprotected meanwhile: nothing to store into.
                        Err(Error::NotFound { .. }) => break,
                        // The store is the daemon's own (a full or failing data
                        // folder): retried until it takes the state, 0.1 s to 5 s apart.
                        Err(e) => {
                            if failed == 0 {
                                tracing::error!(vm = %name, error = %e, "could not store the VM's state; retrying");
                            }
                            *last_error.lock().expect("store error lock") = Some(e.to_string());
                            let wait = Duration::from_millis(100u64 << failed.min(6)).min(Duration::from_secs(5));
                            failed += 1;
                            tokio::time::sleep(wait).await;
                            if rx.is_closed() && rx.is_empty() && stored.is_closed() {
                                break; // the actor is gone and nobody waits
                            }
                        }
                    }
                }
            }
        });
        let core = VmCore::new(&rec.spec.name, opened.disks.len(), rec.lifecycle.clone(), rec.last_point_seq);
        let io = VmIo {
            host: host.clone(),
            vm: rec.spec.name.clone(),
            generation: rec.generation,
            workers: rec.spec.upload_workers,
            disks: opened.disks,
            caches: opened.hashes.into_iter().map(|h| Arc::new(std::sync::Mutex::new(h))).collect(),
            fence: Arc::new(ChainFence::default()),
        };
        VmActor {
            host,
            rec,
            core,
            io,
            start: Some(opened.start),
            signals: Some(opened.signals),
            cancel: CancellationToken::new(),
            persist,
            version: 0,
            persisted,
            store_error,
            latest_version: Default::default(),
            replies: HashMap::new(),
            next_waiter: 0,
            retry_timer: None,
            resync_timer: None,
        }
    }

    /// Names a caller waiting for the core's answer, kept with its reply channel.
    fn waiter(&mut self, reply: Reply) -> WaiterId {
        self.next_waiter += 1;
        self.replies.insert(self.next_waiter, reply);
        self.next_waiter
    }

    fn name(&self) -> &str {
        &self.rec.spec.name
    }

    /// Feeds the core and carries out what it decides.
    fn apply(&mut self, input: Input, ctx: &mut Context<Self>) {
        let before = self.core.lifecycle().clone();
        let commands = self.core.on(input, self.host.clock.now_ms());
        self.io.fence.advance_to(self.core.epoch());
        let after = self.core.lifecycle();
        if *after != before {
            if after.state != before.state {
                tracing::info!(vm = %self.name(), from = %before.state, to = %after.state,
                    reason = ?after.transitions.last().map(|t| &t.reason), "state change");
            }
            self.version += 1;
            self.latest_version.store(self.version, std::sync::atomic::Ordering::Release);
            let _ = self.persist.send((self.version, after.clone()));
        }
        self.rec.lifecycle = after.clone();
        self.rec.last_point_seq = self.core.last_point();
        for c in commands {
            self.carry_out(c, ctx);
        }
    }

    /// Runs a task on the engine runtime; its result comes back to the core.
    fn spawn(&self, ctx: &mut Context<Self>, task: impl std::future::Future<Output = Input> + Send + 'static) {
        let (addr, cancel) = (ctx.address(), self.cancel.clone());
        self.host.runtime.spawn(async move {
            tokio::select! {
                input = task => addr.do_send(TaskDone(input)),
                _ = cancel.cancelled() => {}
            }
        });
    }

    /// Runs a task whose end the core does not wait for.
    fn spawn_detached(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.host.runtime.spawn(task);
    }

    fn carry_out(&mut self, command: Command, ctx: &mut Context<Self>) {
        let io = self.io.clone();
        match command {
            Command::TakeSnapshot { epoch } => {
                let protected_since = ctx.address();
                self.spawn(ctx, async move {
                    let input = io.take_snapshot(epoch).await;
                    if let Input::SnapshotTaken { result: Ok(at), .. } = &input {
                        protected_since.do_send(SnapshotAt(*at));
                    }
                    input
                })
            }
            Command::CopyBase { epoch, seq } => self.spawn(ctx, io.copy_base(epoch, seq)),
            Command::CommitBase { epoch, seq, time_ms, base } => {
                self.spawn(ctx, io.commit_base(epoch, seq, time_ms, base))
            }
            Command::RunCycle { epoch, seq, parent, pending } => {
                self.spawn(ctx, io.run_cycle(epoch, seq, parent, pending))
            }
            Command::RunResync { epoch, seq, parent, resume_at } => {
                // Resynchronizing must be stored before the resync drops the logs and starts a new chain.
                let stored = (self.persisted.clone(), self.version);
                self.spawn(ctx, io.run_resync(epoch, seq, parent, resume_at, stored))
            }
            Command::DiscardLogs { epoch } => {
                // ResyncRequired must be stored before the logs stop describing the disk.
                let stored = (self.persisted.clone(), self.version);
                self.spawn(ctx, io.discard_logs(epoch, stored))
            }
            Command::DeleteLogs { logs } => self.spawn_detached(io.delete_logs(logs)),
            Command::ReleaseSnapshots => self.spawn_detached(io.release_snapshots()),
            Command::ScheduleRetry { at_ms } => {
                let wait = std::time::Duration::from_millis(at_ms.saturating_sub(self.host.clock.now_ms()));
                let delay = self.host.clock.real(wait);
                tracing::info!(vm = %self.name(), retry = self.core.retries(), ?delay, "retry scheduled");
                if let Some(h) = self.retry_timer.take() {
                    ctx.cancel_future(h);
                }
                self.retry_timer = Some(ctx.run_later(delay, |act, ctx| {
                    act.retry_timer = None;
                    act.apply(Input::RetryDue, ctx);
                }));
            }
            Command::CancelRetry => {
                if let Some(h) = self.retry_timer.take() {
                    ctx.cancel_future(h);
                }
            }
            Command::ScheduleAutoResync => self.schedule_auto_resync(ctx),
            Command::CancelAutoResync => {
                if let Some(h) = self.resync_timer.take() {
                    ctx.cancel_future(h);
                }
            }
            Command::StopWrites => self.io.disks.iter().for_each(|d| d.stop_writes()),
            Command::ResumeWrites => self.io.disks.iter().for_each(|d| d.resume_writes()),
            Command::Answer { waiter, answer } => {
                let refused = |answer: Answer| match answer {
                    Answer::Refused(why) => Error::FailedPrecondition(why),
                    Answer::Failed(f) if f.class == ErrorClass::Cancelled => Error::Cancelled(f.reason),
                    Answer::Failed(f) => Error::Internal(f.reason),
                    other => Error::Internal(format!("unexpected answer {other:?}")),
                };
                match (self.replies.remove(&waiter), answer) {
                    (None, _) => {}
                    (Some(Reply::Point(tx)), Answer::Point(p)) => drop(tx.send(Ok(p))),
                    (Some(Reply::Point(tx)), a) => drop(tx.send(Err(refused(a)))),
                    (Some(Reply::Failover(tx)), Answer::FailedOver(seq)) => {
                        // FailedOver must be stored before anyone acts on it: a
                        // restart before that would take writes again.
                        let (mut stored, need) = (self.persisted.clone(), self.version);
                        let store_error = self.store_error.clone();
                        self.spawn_detached(async move {
                            let waited = tokio::time::timeout(STORE_WAIT, stored.wait_for(|v| *v >= need)).await;
                            let r = match waited {
                                Ok(Ok(_)) => Ok(seq),
                                Ok(Err(_)) => {
                                    Err(Error::Cancelled("the VM stopped before its state was stored".into()))
                                }
                                Err(_) => Err(Error::FailedPrecondition(format!(
                                    "the failover to point {seq} is not stored yet ({}); writes stay stopped, \
                                     and it is stored as soon as the state store takes it",
                                    store_error.lock().expect("store error lock").as_deref().unwrap_or("no error yet")
                                ))),
                            };
                            let _ = tx.send(r);
                        });
                    }
                    (Some(Reply::Failover(tx)), a) => drop(tx.send(Err(refused(a)))),
                }
            }
        }
    }

    /// Starts the automatic resync of a VM in `ResyncRequired` when the
    /// configured window allows.
    fn schedule_auto_resync(&mut self, ctx: &mut Context<Self>) {
        if self.core.state() != VmState::ResyncRequired || self.resync_timer.is_some() {
            return;
        }
        let wait_minutes = match self.host.config.auto_resync {
            AutoResync::Manual => return,
            AutoResync::Immediately => 0,
            AutoResync::OffHours => {
                self.host.throttle.policy().schedule.minutes_until_off_hours(self.host.clock.local_now())
            }
        };
        let delay = self.host.clock.real(std::time::Duration::from_secs(wait_minutes as u64 * 60));
        tracing::info!(vm = %self.name(), ?delay, "automatic resync scheduled");
        self.resync_timer = Some(ctx.run_later(delay, |act, ctx| {
            act.resync_timer = None;
            // The window may have moved (schedule changed): check again.
            if act.host.config.auto_resync == AutoResync::OffHours
                && act.host.throttle.policy().schedule.minutes_until_off_hours(act.host.clock.local_now()) > 0
            {
                return act.schedule_auto_resync(ctx);
            }
            act.apply(Input::AutoResyncDue, ctx);
        }));
    }

    fn info(&self) -> VmInfo {
        let lc = self.core.lifecycle();
        VmInfo {
            spec: self.rec.spec.clone(),
            state: lc.state,
            reason: lc.reason.clone(),
            transitions: lc.transitions.clone(),
            failover: lc.failover.clone(),
            generation: self.rec.generation,
            last_point_seq: self.core.last_point(),
            disks: self
                .io
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

impl Actor for VmActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(mut rx) = self.signals.take() {
            ctx.add_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        }
        ctx.run_interval(self.rec.spec.frequency, |act, ctx| act.apply(Input::Tick, ctx));
        if let Some(start) = self.start.take() {
            self.apply(Input::Start(start), ctx);
        }
        tracing::info!(vm = %self.name(), state = %self.core.state(), "VM actor started");
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.cancel.cancel();
    }
}

impl StreamHandler<DiskSignal> for VmActor {
    fn handle(&mut self, signal: DiskSignal, ctx: &mut Context<Self>) {
        match signal {
            DiskSignal::ResyncNeeded { disk, reason, chain } => {
                // A signal queued before a resync started a new chain is moot.
                if self.io.disks.iter().any(|d| d.name == disk && !d.signal_is_current(chain)) {
                    tracing::debug!(vm = %self.name(), %disk, %reason, "stale resync signal ignored");
                    return;
                }
                self.apply(Input::NeedsResync { reason }, ctx)
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // Disks keep a sender; the stream only ends when the actor is stopping.
    }
}

/// A task's result, for the core.
#[derive(Message)]
#[rtype(result = "()")]
struct TaskDone(Input);

impl Handler<TaskDone> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: TaskDone, ctx: &mut Context<Self>) {
        self.apply(msg.0, ctx);
    }
}

/// The snapshot instant: the protection's start, as reported.
#[derive(Message)]
#[rtype(result = "()")]
struct SnapshotAt(u64);

impl Handler<SnapshotAt> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: SnapshotAt, _ctx: &mut Context<Self>) {
        self.rec.protected_since_ms = msg.0;
    }
}

/// A restore found the replica damaged (an object missing or corrupt): the
/// VM needs a resync, which sends a full copy if its chain is broken.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReplicaDamaged(pub String);

impl Handler<ReplicaDamaged> for VmActor {
    type Result = ();
    fn handle(&mut self, msg: ReplicaDamaged, ctx: &mut Context<Self>) {
        self.apply(Input::NeedsResync { reason: msg.0 }, ctx);
    }
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

/// How long a failover's caller waits for FailedOver to be stored before
/// it is told that it is not yet (the writer keeps retrying).
const STORE_WAIT: Duration = Duration::from_secs(30);

/// Asks for a recovery point that includes every write acknowledged before
/// this message; the receiver fires when it is committed (`None`: nothing to ship).
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<Result<Option<RecoveryPoint>>>")]
pub struct ReplicateNow;

impl Handler<ReplicateNow> for VmActor {
    type Result = MessageResult<ReplicateNow>;
    fn handle(&mut self, _: ReplicateNow, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let id = self.waiter(Reply::Point(tx));
        self.apply(Input::ReplicateNow(id), ctx);
        MessageResult(rx)
    }
}

/// Fails the VM over: planned (cut a final point with every acknowledged
/// write, with the disks' writes stopped) or unplanned (onto `point`,
/// default the latest). The receiver fires with the point's number once
/// the VM is `FailedOver`; the restore is the caller's.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<Result<u64>>")]
pub struct FailOver {
    pub planned: bool,
    pub point: Option<u64>,
    pub out_dir: std::path::PathBuf,
}

impl Handler<FailOver> for VmActor {
    type Result = MessageResult<FailOver>;
    fn handle(&mut self, msg: FailOver, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let waiter = self.waiter(Reply::Failover(tx));
        self.apply(Input::Failover { waiter, planned: msg.planned, point: msg.point, out_dir: msg.out_dir }, ctx);
        MessageResult(rx)
    }
}

/// Operator pause, resume and resync.
#[derive(Message)]
#[rtype(result = "Result<VmInfo>")]
pub struct Operator(pub Event);

impl Handler<Operator> for VmActor {
    type Result = Result<VmInfo>;
    fn handle(&mut self, msg: Operator, ctx: &mut Context<Self>) -> Self::Result {
        if self.core.is_stopping() {
            return Err(Error::FailedPrecondition(format!("VM {} is stopping", self.name())));
        }
        let before = self.core.state();
        let input = match &msg.0 {
            Event::Pause => Input::Pause,
            Event::Resume => Input::Resume,
            Event::StartResync => Input::Resync,
            other => return Err(Error::Internal(format!("not an operator event: {other:?}"))),
        };
        self.apply(input, ctx);
        if self.core.state() == before {
            return Err(Error::FailedPrecondition(format!("VM {} is {before}: cannot {:?}", self.name(), msg.0)));
        }
        Ok(self.info())
    }
}

/// Stops the actor. `unprotect`: delete local logs (the replica on the
/// target is kept); otherwise seal the active logs so a restart trusts them.
/// Either way the disks are closed: a connection that outlives the VM gets
/// errors, never an unlogged write.
#[derive(Message)]
#[rtype(result = "Result<()>")]
pub struct Stop {
    pub unprotect: bool,
}

impl Handler<Stop> for VmActor {
    type Result = ResponseActFuture<Self, Result<()>>;
    fn handle(&mut self, msg: Stop, ctx: &mut Context<Self>) -> Self::Result {
        self.apply(Input::Stop, ctx);
        self.cancel.cancel();
        let state = self.core.state();
        let close = match state {
            _ if msg.unprotect => Close::Unprotect,
            // A copy under way (or ended, its point not committed) is kept
            // for the restart to resume (`vm::restart`).
            VmState::InitialReplication | VmState::FinalizingProtection | VmState::Resynchronizing => Close::KeepCopy,
            VmState::EnablingProtection => Close::DropLogs,
            _ => Close::Seal,
        };
        let (disks, fence, epoch) = (self.io.disks.clone(), self.io.fence.clone(), self.core.epoch());
        let (mut stored, latest, store_error) =
            (self.persisted.clone(), self.latest_version.clone(), self.store_error.clone());
        let fut = async move {
            let closed = blocking(move || fence.change(epoch, || close_disks(&disks, close))).await;
            if close == Close::Unprotect {
                return closed; // the record goes too
            }
            // A restart must find the state the VM stopped in (FailedOver
            // above all: stored late, a restart would take writes again).
            // Read after the close: what changed meanwhile (a NeedsResync) counts.
            let need = latest.load(std::sync::atomic::Ordering::Acquire);
            let stored = match tokio::time::timeout(STORE_WAIT, stored.wait_for(|v| *v >= need)).await {
                Ok(_) => Ok(()),
                Err(_) => Err(Error::FailedPrecondition(format!(
                    "VM stopped, but its last state is not stored: {}",
                    store_error
                        .lock()
                        .expect("store error lock")
                        .as_deref()
                        .unwrap_or("the state store does not answer")
                ))),
            };
            closed.and(stored)
        };
        Box::pin(fut.into_actor(self).map(|r, _act, ctx| {
            ctx.stop();
            r
        }))
    }
}

/// What a stop leaves beside each disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    /// Unprotect: logs, snapshot and side files removed.
    Unprotect,
    /// A protection that has not copied anything yet (Enabling): it starts
    /// over, the logs are not needed.
    DropLogs,
    /// A copy under way (initial copy or resync, or a base copied but not
    /// committed): the snapshot's side file and the disk are synced and the
    /// log sealed, so a restart (even after a reboot) finds a trusted chain
    /// and a durable side file, and resumes the copy.
    KeepCopy,
    /// Seal the active log for the next cycle (the disk synced first: its
    /// image holds the bytes of the in-image records).
    Seal,
}

/// Closes every disk, even after one failed (the first error is returned).
fn close_disks(disks: &[Arc<Disk>], close: Close) -> Result<()> {
    disks.iter().map(|d| close_disk(d, close)).fold(Ok(()), |first, r| first.and(r))
}

fn close_disk(d: &Arc<Disk>, close: Close) -> Result<()> {
    let snap = d.snapshot();
    if close != Close::KeepCopy {
        let _ = tasks::release_snapshot(d);
    }
    let log = d.close(); // no change in flight from here on
    match close {
        Close::Unprotect => {
            drop(log);
            super::open::remove_local_files(&d.path)?;
        }
        Close::DropLogs => drop(log),
        Close::KeepCopy | Close::Seal => {
            // Durable before the seal: after a reboot a sealed chain is
            // trusted, and its in-image records' bytes are in the image.
            // (A failed sync leaves the log unsealed: not trusted after a reboot.)
            if let Some(s) = snap.filter(|_| close == Close::KeepCopy) {
                s.sync()?;
            }
            d.file().sync_data().map_err(|e| Error::io(format!("sync {}", d.path.display()), e))?;
            if let Some(log) = log {
                log.seal()?;
            }
        }
    }
    Ok(())
}
