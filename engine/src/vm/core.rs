//! The VM core: every decision about one protected VM, with no I/O.
//!
//! Overview: [`VmCore`] holds the VM's lifecycle, the sealed logs waiting
//! for a recovery point, the point-number allocator, the epoch of the newest
//! tasks, the retry backoff and the callers waiting for a point. The actor
//! feeds it an [`Input`] (an operator's ask, a timer, a task's result) with
//! the time, and carries out the [`Command`]s it returns; commands carry
//! everything the task needs (its point number, parent, epoch, logs).
//!
//! Point numbers: a task that can commit a point gets the next number when
//! it starts. A retry of a failed task reuses it (a retried upload writes
//! the same keys); a task superseded while running may still put objects
//! under its number, so the next task takes a new one. Numbers never go
//! back; a point committed by a superseded task is still a valid point and
//! its number is never reused.
//!
//! Epochs: a resync, a discard of the logs or a stop supersedes every
//! running task by bumping the epoch. A task's result carries the epoch it
//! started with; a stale result changes nothing but the number allocator.
//! The actor mirrors the epoch into the VM's [`super::ChainFence`], so a
//! stale task also cannot change the log chain or commit.
//!
//! Waiters: a `replicate_now` caller waits for a cycle that starts after
//! its call (so the point holds every write it made before); the cycle takes
//! the waiters with it and answers them when it ends. Callers are refused
//! at once when the VM cannot cut a point (Paused, Critical,
//! ResyncRequired), and when it stops being able to.
//!
//! Failover: a planned one stops the disks' writes at once, then waits for
//! a cycle that starts after that (the final point: every write
//! acknowledged before the stop is in a log it rotates, since rotation
//! waits for the writes in flight), and only when that point commits goes
//! `FailedOver`. If the final cycle fails or is superseded, or the VM stops
//! being Protected first, the failover is called off and writes resume.
//! An unplanned one supersedes whatever runs and goes `FailedOver` at once
//! on a committed point. Writes stay stopped in `FailedOver`; the commands
//! that stop and resume them are ordered so that a stop always comes
//! before the cycle it protects (see [`VmCore::on`]).
//!
//! About 620 lines, kept together: every rule above touches the same few
//! fields, and splitting the state machine would scatter its invariants.
//! Its tests are in `core/tests.rs`.

use std::path::PathBuf;

use crate::error::ErrorClass;
use crate::model::{RecoveryPoint, UnixMillis};
use crate::replica::manifest::ObjectRef;
use crate::schedule::retry::RetryState;
use crate::vm::lifecycle::{Action, Event, Failover, Lifecycle, VmState};

/// Names a `replicate_now` caller; the actor keeps its reply channel.
pub type WaiterId = u64;

/// A sealed log waiting to be part of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLog {
    pub path: PathBuf,
    pub bytes: u64,
    /// When it was sealed: the moment the point that includes it describes.
    pub sealed_ms: u64,
}

/// What the initial copy put on the target, per disk: its objects and the
/// hash of every block (kept for resync once the base commits).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BaseCopy {
    pub objects: Vec<Vec<ObjectRef>>,
    pub hashes: Vec<Vec<u64>>,
}

/// Why a task failed, classified where the I/O happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: ErrorClass,
    pub reason: String,
}

/// The tasks whose result the core awaits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Snapshot,
    InitialCopy,
    CommitBase,
    Cycle,
    Resync,
}

/// How the VM starts (see [`super::restart`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A new protection (or one that starts over): snapshot, copy, base.
    Protect,
    /// Go on from the persisted state with these sealed logs per disk.
    Resume { pending: Vec<Vec<PendingLog>> },
    /// An initial copy interrupted by a crash goes on where it stopped: the
    /// snapshot (taken at `snapshot_ms`) was rebuilt, the parts already put
    /// under point `seq` (None: none yet) are not copied again.
    ContinueCopy { pending: Vec<Vec<PendingLog>>, seq: Option<u64>, snapshot_ms: UnixMillis },
    /// The logs found cannot be trusted.
    ResyncNeeded { reason: String },
    /// Stopped while waiting for a resync: drop what logs there are again.
    DiscardLogs,
    /// Stopped mid-resync: its point was never committed; run it again.
    ResyncAgain,
}

/// Something that happened to the VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Start(Start),
    /// The replication timer fired.
    Tick,
    ReplicateNow(WaiterId),
    Pause,
    Resume,
    /// An operator asked for a resync, or the auto-resync window came.
    Resync,
    AutoResyncDue,
    /// A disk's log can no longer describe it (failed write or sync, 50%
    /// rule), or the replica is damaged (a restore found an object missing
    /// or corrupt).
    NeedsResync {
        reason: String,
    },
    RetryDue,
    /// The VM is stopping: nothing running may commit any more.
    Stop,
    /// Fail over into `out_dir`: planned (a final point first, `point`
    /// ignored) or unplanned (onto `point`, default the latest committed).
    Failover {
        waiter: WaiterId,
        planned: bool,
        point: Option<u64>,
        out_dir: PathBuf,
    },
    SnapshotTaken {
        epoch: u64,
        result: Result<UnixMillis, Failure>,
    },
    BaseCopied {
        epoch: u64,
        result: Result<BaseCopy, Failure>,
    },
    BaseCommitted {
        epoch: u64,
        result: Result<RecoveryPoint, Failure>,
    },
    /// A cycle ended; `sealed` are the logs it rotated out, per disk
    /// (they join the backlog whatever happened).
    CycleEnded {
        epoch: u64,
        sealed: Vec<Vec<PendingLog>>,
        result: Result<Option<RecoveryPoint>, Failure>,
    },
    ResyncEnded {
        epoch: u64,
        result: Result<RecoveryPoint, Failure>,
    },
    LogsDiscarded {
        epoch: u64,
        result: Result<(), Failure>,
    },
}

/// The answer to a `replicate_now` caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The point that holds the caller's writes (`None`: nothing was written).
    Point(Option<RecoveryPoint>),
    /// The VM cannot cut a point now (its state says why).
    Refused(String),
    Failed(Failure),
    /// The VM failed over to this recovery point.
    FailedOver(u64),
}

/// What the actor must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Release any snapshot left, then snapshot every disk at one instant.
    TakeSnapshot {
        epoch: u64,
    },
    /// Copy every disk from the snapshot to the target as point `seq`.
    CopyBase {
        epoch: u64,
        seq: u64,
    },
    /// Release the snapshot, then commit the base point (seq, snapshot time, objects).
    CommitBase {
        epoch: u64,
        seq: u64,
        time_ms: UnixMillis,
        base: BaseCopy,
    },
    /// Rotate every disk's log at one instant, then upload `pending` plus
    /// what was rotated out as point `seq` on top of `parent`, and commit.
    RunCycle {
        epoch: u64,
        seq: u64,
        parent: u64,
        pending: Vec<Vec<PendingLog>>,
    },
    /// Start a new log chain and snapshot, compare every disk with the
    /// replica as of `parent` and commit the differences as point `seq`.
    RunResync {
        epoch: u64,
        seq: u64,
        parent: u64,
        /// Go on with the resync whose snapshot (taken then) a restart
        /// installed, instead of starting a new one.
        resume_at: Option<UnixMillis>,
    },
    /// Stop logging and drop every log and snapshot (a resync will compare whole disks).
    DiscardLogs {
        epoch: u64,
    },
    /// These sealed logs are in a committed point: delete them, per disk.
    DeleteLogs {
        logs: Vec<Vec<PendingLog>>,
    },
    /// The snapshot is no longer needed.
    ReleaseSnapshots,
    ScheduleRetry {
        at_ms: UnixMillis,
    },
    CancelRetry,
    /// Every disk refuses writes from now on (those in flight finish).
    StopWrites,
    /// The disks take writes again (a planned failover was called off).
    ResumeWrites,
    /// Start a resync when the auto-resync policy allows (the actor knows the window).
    ScheduleAutoResync,
    CancelAutoResync,
    Answer {
        waiter: WaiterId,
        answer: Answer,
    },
}

/// The task whose result is awaited (at most one runs unsuperseded).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Running {
    step: Step,
    seq: u64,
    /// The `replicate_now` callers a cycle answers.
    waiters: Vec<WaiterId>,
    /// The final cycle of a planned failover: its caller and folder.
    final_for: Option<(WaiterId, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct VmCore {
    name: String,
    disks: usize,
    lifecycle: Lifecycle,
    /// The newest committed point (0: none yet).
    last_point: u64,
    /// The number the next task takes; always above every number handed out
    /// to a task that may still put objects.
    next_seq: u64,
    epoch: u64,
    running: Option<Running>,
    /// The epoch of the discard whose result is awaited, if any.
    discarding: Option<u64>,
    /// Per disk: sealed logs not yet in a committed point.
    pending: Vec<Vec<PendingLog>>,
    /// Snapshot time of the base copy in progress.
    snapshot_ms: UnixMillis,
    /// The initial copy's result, kept until the base commits (retries reuse it).
    base: Option<BaseCopy>,
    retry: RetryState,
    /// A retry is scheduled: timer ticks do not start cycles meanwhile.
    retry_scheduled: bool,
    /// Callers waiting for the next cycle to start.
    waiting: Vec<WaiterId>,
    /// A planned failover waiting for its final cycle to start.
    final_cycle: Option<(WaiterId, PathBuf)>,
    /// Whether the last write command sent was StopWrites.
    writes_stopped: bool,
    /// A Stop was handled: the actor is closing its disks, and nothing new
    /// starts (no cycle, retry or resync; callers are refused).
    stopping: bool,
}

impl VmCore {
    /// A VM as persisted: its lifecycle and newest committed point.
    pub fn new(name: &str, disks: usize, mut lifecycle: Lifecycle, last_point: u64) -> Self {
        // Nothing runs yet: a cycle persisted as in flight was cut short by the stop.
        lifecycle.cycle_in_flight = false;
        let writes_stopped = lifecycle.state == VmState::FailedOver; // the opener stopped them
        VmCore {
            name: name.to_string(),
            disks,
            lifecycle,
            last_point,
            next_seq: last_point + 1,
            epoch: 0,
            running: None,
            discarding: None,
            pending: vec![Vec::new(); disks],
            snapshot_ms: 0,
            base: None,
            retry: RetryState::default(),
            retry_scheduled: false,
            waiting: Vec::new(),
            final_cycle: None,
            writes_stopped,
            stopping: false,
        }
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    pub fn state(&self) -> VmState {
        self.lifecycle.state
    }

    /// A Stop was handled: the actor is closing its disks.
    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    pub fn last_point(&self) -> u64 {
        self.last_point
    }

    /// The epoch tasks started now carry (mirrored into the chain fence).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Snapshot time of the base copy (the first point's time).
    #[cfg(test)]
    pub fn snapshot_ms(&self) -> UnixMillis {
        self.snapshot_ms
    }

    pub fn retries(&self) -> u32 {
        self.retry.retries()
    }

    /// Handles one input. Writes are stopped while the VM is `FailedOver`
    /// or a planned failover is under way: a StopWrites goes first among the
    /// commands (before the final cycle it protects), a ResumeWrites last.
    pub fn on(&mut self, input: Input, now: UnixMillis) -> Vec<Command> {
        let mut out = self.handle(input, now);
        let stop = self.lifecycle.state == VmState::FailedOver
            || self.final_cycle.is_some()
            || self.running.as_ref().is_some_and(|r| r.final_for.is_some());
        if stop && !self.writes_stopped {
            out.insert(0, Command::StopWrites);
        } else if !stop && self.writes_stopped {
            out.push(Command::ResumeWrites);
        }
        self.writes_stopped = stop;
        out
    }

    fn handle(&mut self, input: Input, now: UnixMillis) -> Vec<Command> {
        let mut out = Vec::new();
        if self.stopping {
            // Task results are dropped with their epoch (the Stop superseded them).
            match input {
                Input::ReplicateNow(waiter) | Input::Failover { waiter, .. } => {
                    out.push(Command::Answer { waiter, answer: Answer::Refused("the VM is stopping".into()) })
                }
                // A damaged replica leaves no trace but this: the state is
                // kept for the restart (nothing runs now).
                Input::NeedsResync { reason } if self.lifecycle.state != VmState::FailedOver => {
                    let _ = self.lifecycle.on_event(Event::ResyncNeeded { reason }, now);
                }
                _ => {}
            }
            return out;
        }
        match input {
            Input::Start(start) => self.start(start, now, &mut out),
            Input::Tick => {
                // While a retry is pending the backoff decides, not the timer.
                if !self.retry_scheduled {
                    self.event(Event::CycleDue, now, &mut out);
                }
            }
            Input::ReplicateNow(waiter) => match self.lifecycle.state {
                VmState::Critical | VmState::ResyncRequired | VmState::Paused | VmState::FailedOver => {
                    out.push(Command::Answer { waiter, answer: Answer::Refused(self.why_not()) })
                }
                _ => {
                    self.waiting.push(waiter);
                    self.event(Event::CycleDue, now, &mut out);
                }
            },
            Input::Pause => self.event(Event::Pause, now, &mut out),
            Input::Resume => self.event(Event::Resume, now, &mut out),
            Input::Resync => self.event(Event::StartResync, now, &mut out),
            Input::AutoResyncDue => {
                if self.lifecycle.state == VmState::ResyncRequired {
                    self.event(Event::StartResync, now, &mut out);
                }
            }
            Input::NeedsResync { reason } => self.event(Event::ResyncNeeded { reason }, now, &mut out),
            Input::RetryDue => {
                self.retry_scheduled = false;
                self.retry_step(now, &mut out);
            }
            Input::Stop => {
                self.stopping = true;
                self.supersede(&mut out);
                let waiters = std::mem::take(&mut self.waiting).into_iter().chain(self.final_cycle.take().map(|f| f.0));
                for waiter in waiters {
                    out.push(Command::Answer { waiter, answer: Answer::Refused("the VM is stopping".into()) });
                }
            }
            Input::Failover { waiter, planned, point, out_dir } => {
                self.failover(waiter, planned, point, out_dir, now, &mut out)
            }
            Input::SnapshotTaken { epoch, result } => {
                if !self.awaits(epoch, Step::Snapshot) {
                    return out; // a newer task released it
                }
                self.running = None;
                match result {
                    Ok(at) => {
                        self.snapshot_ms = at;
                        match self.lifecycle.state {
                            VmState::EnablingProtection => self.event(Event::SnapshotTaken, now, &mut out),
                            // A retried initial copy, on a fresh snapshot.
                            VmState::InitialReplication => self.copy_base(&mut out),
                            _ => out.push(Command::ReleaseSnapshots),
                        }
                    }
                    Err(f) => self.failed(f, now, &mut out),
                }
            }
            Input::BaseCopied { epoch, result } => {
                let state = self.lifecycle.state;
                let copying = matches!(state, VmState::InitialReplication | VmState::FinalizingProtection);
                if !self.awaits(epoch, Step::InitialCopy) || !copying {
                    return out; // superseded (logs discarded for a resync, or stopped)
                }
                self.running = None;
                match result {
                    Ok(base) => {
                        self.base = Some(base);
                        self.succeeded(&mut out);
                        match state {
                            VmState::InitialReplication => self.event(Event::InitialCopyDone, now, &mut out),
                            // The base rebuilt from the journal of a copy that had ended.
                            _ => self.commit_base(&mut out),
                        }
                    }
                    Err(f) => self.failed(f, now, &mut out),
                }
            }
            Input::BaseCommitted { epoch, result } => {
                if let Ok(p) = &result {
                    self.note_point(p.seq);
                }
                if !self.awaits(epoch, Step::CommitBase) {
                    return out;
                }
                self.running = None;
                match result {
                    Ok(p) => {
                        self.last_point = p.seq;
                        self.base = None;
                        self.succeeded(&mut out);
                        self.event(Event::PointCommitted, now, &mut out);
                        // Writes made during the copy are in the logs: ship them now.
                        self.event(Event::CycleDue, now, &mut out);
                    }
                    Err(f) => self.failed(f, now, &mut out),
                }
            }
            Input::CycleEnded { epoch, sealed, result } => self.cycle_ended(epoch, sealed, result, now, &mut out),
            Input::ResyncEnded { epoch, result } => {
                if let Ok(p) = &result {
                    self.note_point(p.seq);
                }
                if !self.awaits(epoch, Step::Resync) {
                    return out; // a newer resync (or discard) superseded this one
                }
                self.running = None;
                match result {
                    Ok(p) => {
                        self.last_point = p.seq;
                        self.succeeded(&mut out);
                        self.event(Event::ResyncDone, now, &mut out);
                        // Writes made during the resync are in the new logs: ship them now.
                        self.event(Event::CycleDue, now, &mut out);
                    }
                    Err(f) => self.failed(f, now, &mut out),
                }
            }
            Input::LogsDiscarded { epoch, result } => {
                if epoch != self.epoch || self.discarding != Some(epoch) {
                    return out; // a newer task changed the chain first
                }
                self.discarding = None;
                match result {
                    Ok(()) if self.lifecycle.state == VmState::ResyncRequired => out.push(Command::ScheduleAutoResync),
                    Ok(()) => {}
                    Err(f) => {
                        let reason = format!("discarding logs failed: {}", f.reason);
                        self.event(Event::Failed { class: ErrorClass::NonRecoverable, reason }, now, &mut out)
                    }
                }
            }
        }
        out
    }

    fn start(&mut self, start: Start, now: UnixMillis, out: &mut Vec<Command>) {
        match start {
            Start::Protect => self.event(Event::Protect, now, out),
            Start::Resume { pending } => {
                debug_assert_eq!(pending.len(), self.disks);
                self.pending = pending;
            }
            Start::ContinueCopy { pending, seq, snapshot_ms } => {
                debug_assert_eq!(pending.len(), self.disks);
                self.pending = pending;
                self.snapshot_ms = snapshot_ms;
                // The parts on the target are keyed by the copy's point number.
                if let Some(seq) = seq {
                    self.next_seq = self.next_seq.max(seq);
                }
                match self.lifecycle.state {
                    VmState::InitialReplication | VmState::FinalizingProtection => self.copy_base(out),
                    VmState::Resynchronizing => self.resume_resync(snapshot_ms, out),
                    _ => {}
                }
            }
            Start::ResyncNeeded { reason } => self.event(Event::ResyncNeeded { reason }, now, out),
            Start::DiscardLogs => self.discard(out),
            Start::ResyncAgain => self.resync(out),
        }
    }

    fn cycle_ended(
        &mut self,
        epoch: u64,
        sealed: Vec<Vec<PendingLog>>,
        result: Result<Option<RecoveryPoint>, Failure>,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        if let Ok(Some(p)) = &result {
            self.note_point(p.seq);
        }
        if !self.awaits(epoch, Step::Cycle) {
            return; // its logs were discarded; its callers were answered then
        }
        let (waiters, final_for) = self.running.take().map(|r| (r.waiters, r.final_for)).unwrap_or_default();
        // Newly sealed logs join the backlog whatever happened.
        for (pending, new) in self.pending.iter_mut().zip(sealed) {
            for l in new {
                if !pending.iter().any(|p| p.path == l.path) {
                    pending.push(l);
                }
            }
        }
        let answer = match &result {
            Ok(p) => Answer::Point(p.clone()),
            Err(f) => Answer::Failed(f.clone()),
        };
        out.extend(waiters.into_iter().map(|waiter| Command::Answer { waiter, answer: answer.clone() }));
        match result {
            Ok(point) => {
                self.succeeded(out);
                if let Some(p) = point {
                    self.last_point = p.seq;
                    // The point holds every pending log: they are no longer needed.
                    let logs = std::mem::replace(&mut self.pending, vec![Vec::new(); self.disks]);
                    out.push(Command::DeleteLogs { logs });
                }
                self.event(Event::PointCommitted, now, out);
                if let Some((waiter, out_dir)) = final_for {
                    // The final point: the last committed one holds every acknowledged write.
                    let point = self.last_point;
                    self.event(Event::FailedOver(Failover { planned: true, point, out_dir, at_ms: now }), now, out);
                    out.push(Command::Answer { waiter, answer: Answer::FailedOver(point) });
                }
            }
            Err(f) => {
                if let Some((waiter, _)) = final_for {
                    let why =
                        Failure { class: f.class, reason: format!("the final recovery point failed: {}", f.reason) };
                    out.push(Command::Answer { waiter, answer: Answer::Failed(why) });
                }
                self.failed(f, now, out)
            }
        }
        if !self.waiting.is_empty() || self.final_cycle.is_some() {
            self.event(Event::CycleDue, now, out);
        }
    }

    /// A planned failover waits for a final cycle; an unplanned one (or a
    /// repeated one) goes `FailedOver` at once.
    fn failover(
        &mut self,
        waiter: WaiterId,
        planned: bool,
        point: Option<u64>,
        out_dir: PathBuf,
        now: UnixMillis,
        out: &mut Vec<Command>,
    ) {
        let refuse =
            |out: &mut Vec<Command>, why: String| out.push(Command::Answer { waiter, answer: Answer::Refused(why) });
        if self.lifecycle.state == VmState::FailedOver {
            // Again (the restore failed, or another folder): the same point
            // for a planned one, the chosen one for an unplanned one.
            let before = self.lifecycle.failover.clone();
            let point = point.or(before.as_ref().map(|f| f.point)).unwrap_or(self.last_point);
            let planned = planned && before.is_some_and(|f| f.planned);
            self.event(Event::FailedOver(Failover { planned, point, out_dir, at_ms: now }), now, out);
            return out.push(Command::Answer { waiter, answer: Answer::FailedOver(point) });
        }
        if planned {
            if self.lifecycle.state != VmState::Protected {
                return refuse(
                    out,
                    format!(
                        "{}: a planned failover needs a Protected VM (an unplanned one restores its latest point)",
                        self.why_not()
                    ),
                );
            }
            if self.final_cycle.is_some() || self.running.as_ref().is_some_and(|r| r.final_for.is_some()) {
                return refuse(out, format!("a planned failover of VM {} is already under way", self.name));
            }
            self.final_cycle = Some((waiter, out_dir));
            // Starts now, or when the cycle in flight ends (`cycle_ended`).
            return self.event(Event::CycleDue, now, out);
        }
        let Some(point) = point.or((self.last_point > 0).then_some(self.last_point)) else {
            return refuse(out, format!("VM {} has no recovery point to fail over to", self.name));
        };
        self.supersede(out);
        if let Some((w, _)) = self.final_cycle.take() {
            let answer = Answer::Refused(format!("an unplanned failover of VM {} came first", self.name));
            out.push(Command::Answer { waiter: w, answer });
        }
        self.retry_scheduled = false;
        out.extend([Command::CancelRetry, Command::CancelAutoResync]);
        self.event(Event::FailedOver(Failover { planned: false, point, out_dir, at_ms: now }), now, out);
        out.push(Command::Answer { waiter, answer: Answer::FailedOver(point) });
    }

    /// Whether a result of `step` started in `epoch` is the one awaited: a
    /// result of a superseded task, or of a task that is not running, is stale.
    fn awaits(&self, epoch: u64, step: Step) -> bool {
        epoch == self.epoch && self.running.as_ref().is_some_and(|r| r.step == step)
    }

    /// A point was committed (by a current task or a superseded one): its
    /// number is never handed out again.
    fn note_point(&mut self, seq: u64) {
        self.last_point = self.last_point.max(seq);
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Every running task is stale from now on.
    fn supersede(&mut self, out: &mut Vec<Command>) {
        self.epoch += 1;
        if let Some(r) = self.running.take() {
            // It may still put objects under its number (a snapshot puts none).
            if r.step != Step::Snapshot {
                self.next_seq = self.next_seq.max(r.seq + 1);
            }
            let answer = Answer::Refused(format!("VM {} needs a resync: its cycle was superseded", self.name));
            let waiters = r.waiters.into_iter().chain(r.final_for.map(|f| f.0));
            out.extend(waiters.map(|waiter| Command::Answer { waiter, answer: answer.clone() }));
        }
    }

    fn run(&mut self, step: Step, waiters: Vec<WaiterId>) -> u64 {
        let seq = self.next_seq;
        self.running = Some(Running { step, seq, waiters, final_for: None });
        seq
    }

    fn copy_base(&mut self, out: &mut Vec<Command>) {
        let seq = self.run(Step::InitialCopy, Vec::new());
        out.push(Command::CopyBase { epoch: self.epoch, seq });
    }

    fn commit_base(&mut self, out: &mut Vec<Command>) {
        let Some(base) = self.base.clone() else {
            // Never commit a base without its objects (it would restore as
            // zeros): the copy's journal names them, a resumed copy reads it
            // (its snapshot and journal stay until the base is committed).
            return self.copy_base(out);
        };
        // Normally the number its objects were put under; a higher one if a
        // point took that number meanwhile (the manifest names the keys).
        let seq = self.run(Step::CommitBase, Vec::new());
        out.push(Command::CommitBase { epoch: self.epoch, seq, time_ms: self.snapshot_ms, base });
    }

    fn discard(&mut self, out: &mut Vec<Command>) {
        self.supersede(out);
        self.pending.iter_mut().for_each(Vec::clear);
        self.base = None;
        self.discarding = Some(self.epoch);
        out.push(Command::DiscardLogs { epoch: self.epoch });
    }

    fn resync(&mut self, out: &mut Vec<Command>) {
        self.supersede(out);
        self.pending.iter_mut().for_each(Vec::clear);
        out.push(Command::CancelAutoResync);
        let seq = self.run(Step::Resync, Vec::new());
        out.push(Command::RunResync { epoch: self.epoch, seq, parent: self.last_point, resume_at: None });
    }

    /// Goes on with a resync a restart found (its snapshot and logs kept,
    /// the logs pending for the cycle after it).
    fn resume_resync(&mut self, snapshot_ms: UnixMillis, out: &mut Vec<Command>) {
        out.push(Command::CancelAutoResync);
        let seq = self.run(Step::Resync, Vec::new());
        out.push(Command::RunResync { epoch: self.epoch, seq, parent: self.last_point, resume_at: Some(snapshot_ms) });
    }

    fn why_not(&self) -> String {
        let reason = self.lifecycle.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
        format!("VM {} is {}{reason}", self.name, self.lifecycle.state)
    }

    fn failed(&mut self, f: Failure, now: UnixMillis, out: &mut Vec<Command>) {
        self.event(Event::Failed { class: f.class, reason: f.reason }, now, out);
    }

    /// A step succeeded: the backoff starts over and a pending retry is moot.
    fn succeeded(&mut self, out: &mut Vec<Command>) {
        self.retry.on_success();
        if self.retry_scheduled {
            self.retry_scheduled = false;
            out.push(Command::CancelRetry);
        }
    }

    /// Feeds the lifecycle and turns its actions into commands with their data.
    fn event(&mut self, event: Event, now: UnixMillis, out: &mut Vec<Command>) {
        for action in self.lifecycle.on_event(event, now) {
            match action {
                Action::TakeSnapshot => {
                    self.run(Step::Snapshot, Vec::new());
                    out.push(Command::TakeSnapshot { epoch: self.epoch });
                }
                Action::StartInitialCopy => self.copy_base(out),
                Action::CommitBasePoint => self.commit_base(out),
                Action::StartCycle => {
                    let waiters = std::mem::take(&mut self.waiting);
                    let seq = self.run(Step::Cycle, waiters);
                    if let Some(r) = self.running.as_mut() {
                        r.final_for = self.final_cycle.take();
                    }
                    let pending = self.pending.clone();
                    out.push(Command::RunCycle { epoch: self.epoch, seq, parent: self.last_point, pending });
                }
                Action::ScheduleRetry => {
                    let at_ms = self.retry.on_failure(now);
                    self.retry_scheduled = true;
                    out.push(Command::ScheduleRetry { at_ms });
                }
                Action::RetryNow => {
                    self.retry.on_success();
                    self.retry_scheduled = false;
                    out.push(Command::CancelRetry);
                    self.retry_step(now, out);
                }
                Action::DiscardLogs => self.discard(out),
                Action::StartResync => self.resync(out),
            }
        }
        if matches!(self.lifecycle.state, VmState::Critical | VmState::ResyncRequired | VmState::FailedOver) {
            let answer = Answer::Refused(self.why_not());
            for waiter in std::mem::take(&mut self.waiting) {
                out.push(Command::Answer { waiter, answer: answer.clone() });
            }
        }
        // A planned failover waits only while the VM stays Protected.
        if self.lifecycle.state != VmState::Protected {
            if let Some((waiter, _)) = self.final_cycle.take() {
                let answer = Answer::Refused(format!("{}: the planned failover was called off", self.why_not()));
                out.push(Command::Answer { waiter, answer });
            }
        }
    }

    /// Runs the failed step again (its backlog was kept). The state alone
    /// says which step that is, so a retry also fires after a restart or
    /// after the retry itself failed in another step.
    fn retry_step(&mut self, now: UnixMillis, out: &mut Vec<Command>) {
        use VmState as S;
        if self.running.is_some() {
            return; // something started meanwhile (an operator's ask): the retry is moot
        }
        match self.lifecycle.state {
            // A failed copy is retried on a new snapshot (and a new progress
            // journal; the logs since the first one replay idempotently on
            // top). Only a restart resumes a copy on its own snapshot.
            S::EnablingProtection | S::InitialReplication => {
                self.run(Step::Snapshot, Vec::new());
                out.push(Command::TakeSnapshot { epoch: self.epoch });
            }
            S::FinalizingProtection => self.commit_base(out),
            S::Resynchronizing => self.resync(out),
            S::Protected => self.event(Event::CycleDue, now, out),
            S::ResyncRequired => out.push(Command::ScheduleAutoResync),
            S::Unprotected | S::Paused | S::Critical | S::FailedOver => {} // the retry no longer applies
        }
    }
}

#[cfg(test)]
mod tests;
