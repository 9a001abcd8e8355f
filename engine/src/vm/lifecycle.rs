//! The VM lifecycle as a plain state machine.
//!
//! `Unprotected -> EnablingProtection -> InitialReplication ->
//! FinalizingProtection -> Protected`, then delta cycles. From `Protected`:
//! `ResyncRequired -> Resynchronizing -> Protected`, `Paused` (operator) and
//! `Critical` (operator needed). From any state with a recovery point:
//! `FailedOver` (the VM now runs from a restored copy; nothing leaves it but
//! unprotect or a new protection). The VM actor feeds it events and carries out
//! the [`Action`]s it returns; nothing here does I/O or reads a clock, so
//! every transition is covered by table tests.
//!
//! Invariants (tested): nothing leaves `Critical` or `Paused` on its own (only
//! operator events do); nothing at all leaves `FailedOver`; at most one
//! replication cycle is in flight; every failure yields a state change or a
//! retry.

use serde::{Deserialize, Serialize};

use crate::error::ErrorClass;
use crate::model::UnixMillis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    Unprotected,
    EnablingProtection,
    InitialReplication,
    FinalizingProtection,
    Protected,
    ResyncRequired,
    Resynchronizing,
    Paused,
    Critical,
    /// Failed over (planned or not): replication has stopped and the disks
    /// take no writes; the VM runs from the restored copy.
    FailedOver,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Unprotected => "Unprotected",
            VmState::EnablingProtection => "EnablingProtection",
            VmState::InitialReplication => "InitialReplication",
            VmState::FinalizingProtection => "FinalizingProtection",
            VmState::Protected => "Protected",
            VmState::ResyncRequired => "ResyncRequired",
            VmState::Resynchronizing => "Resynchronizing",
            VmState::Paused => "Paused",
            VmState::Critical => "Critical",
            VmState::FailedOver => "FailedOver",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Operator asked for protection (or the daemon restarted a VM mid-enable).
    Protect,
    /// The point-in-time snapshot of all disks exists; change logs are open.
    SnapshotTaken,
    /// Every disk was copied from the snapshot to the target.
    InitialCopyDone,
    /// A recovery point was committed (base or delta).
    PointCommitted,
    /// The replication timer fired.
    CycleDue,
    /// The replication cycle, initial copy or resync failed.
    Failed {
        class: ErrorClass,
        reason: String,
    },
    /// Logs can no longer be trusted or are too large.
    ResyncNeeded {
        reason: String,
    },
    /// Operator or auto-resync window: start resynchronizing now.
    StartResync,
    ResyncDone,
    Pause,
    Resume,
    /// The VM failed over to recovery point `point`, restored into `out_dir`
    /// (planned: after a final point with every acknowledged write).
    FailedOver(Failover),
}

/// The failover a `FailedOver` VM went through, for `show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub planned: bool,
    pub point: u64,
    pub out_dir: std::path::PathBuf,
    pub at_ms: UnixMillis,
}

/// What the VM actor must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    TakeSnapshot,
    StartInitialCopy,
    /// Release the snapshot and commit the base recovery point.
    CommitBasePoint,
    /// Seal the active logs and upload them as a delta recovery point.
    StartCycle,
    /// Retry the failed step after the backoff the retry policy computes.
    ScheduleRetry,
    /// Retry the failed step now (the operator resumed a Critical VM).
    RetryNow,
    /// Drop pending logs; new writes stay tracked.
    DiscardLogs,
    StartResync,
}

/// One recorded transition: kept with the VM so an operator sees why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: VmState,
    pub to: VmState,
    pub reason: String,
    pub at_ms: UnixMillis,
}

/// How many transitions are kept per VM.
pub const TRANSITIONS_KEPT: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    pub state: VmState,
    /// A delta cycle is running: no second one starts until it ends.
    pub cycle_in_flight: bool,
    /// Why the VM is in `Critical` or `ResyncRequired`, for `show`.
    pub reason: Option<String>,
    /// The state a `Critical` VM returns to when the operator resumes it.
    #[serde(default)]
    pub resume_to: Option<VmState>,
    pub transitions: Vec<Transition>,
    /// The failover of a `FailedOver` VM (the latest, when it was repeated).
    #[serde(default)]
    pub failover: Option<Failover>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: VmState::Unprotected,
            cycle_in_flight: false,
            reason: None,
            resume_to: None,
            transitions: Vec::new(),
            failover: None,
        }
    }
}

impl Lifecycle {
    /// Applies an event at `now`; returns the actions to carry out. Events
    /// that do not apply in the current state are ignored (no actions).
    pub fn on_event(&mut self, event: Event, now: UnixMillis) -> Vec<Action> {
        use Event as E;
        use VmState as S;
        match (self.state, event) {
            (S::Unprotected, E::FailedOver(_)) => vec![],
            (S::FailedOver, E::FailedOver(f)) => {
                // Failed over again (another point or folder): the record says which.
                self.failover = Some(f);
                vec![]
            }
            (_, E::FailedOver(f)) => {
                self.cycle_in_flight = false;
                self.resume_to = None;
                let how = if f.planned { "planned failover" } else { "unplanned failover" };
                self.go(S::FailedOver, &format!("{how} to recovery point {}", f.point), now);
                self.failover = Some(f);
                vec![]
            }
            (S::Unprotected, E::Protect) => {
                self.go(S::EnablingProtection, "protection requested", now);
                vec![Action::TakeSnapshot]
            }
            (S::EnablingProtection, E::SnapshotTaken) => {
                self.go(S::InitialReplication, "snapshot taken", now);
                vec![Action::StartInitialCopy]
            }
            (S::InitialReplication, E::InitialCopyDone) => {
                self.go(S::FinalizingProtection, "initial copy done", now);
                vec![Action::CommitBasePoint]
            }
            (S::FinalizingProtection, E::PointCommitted) => {
                self.go(S::Protected, "first recovery point committed", now);
                vec![]
            }
            (S::Protected, E::CycleDue) if !self.cycle_in_flight => {
                self.cycle_in_flight = true;
                vec![Action::StartCycle]
            }
            (S::Protected | S::Paused, E::PointCommitted) => {
                self.cycle_in_flight = false;
                self.reason = None; // a failure being retried is over
                vec![]
            }
            (S::Resynchronizing, E::ResyncDone) => {
                self.go(S::Protected, "resync done", now);
                vec![]
            }
            (S::ResyncRequired | S::Critical | S::Protected | S::Paused, E::StartResync) => {
                self.cycle_in_flight = false;
                self.go(S::Resynchronizing, "resync started", now);
                vec![Action::StartResync]
            }
            (S::Protected | S::Paused, E::Pause) => {
                self.go(S::Paused, "paused by operator", now);
                vec![]
            }
            (S::Paused, E::Resume) => {
                self.go(S::Protected, "resumed by operator", now);
                vec![]
            }
            (S::Critical, E::Resume) => {
                // The operator fixed the cause: retry from where it stopped.
                let to = self.resume_to.take().unwrap_or(S::Protected);
                self.go(to, "resumed by operator", now);
                vec![Action::RetryNow]
            }
            (
                S::EnablingProtection
                | S::InitialReplication
                | S::FinalizingProtection
                | S::Protected
                | S::Resynchronizing
                | S::Paused,
                E::ResyncNeeded { reason },
            ) => {
                self.cycle_in_flight = false;
                self.go(S::ResyncRequired, &reason, now);
                vec![Action::DiscardLogs]
            }
            (S::Critical, E::ResyncNeeded { reason }) => {
                // Stay Critical for the operator, but come back to a resync.
                self.resume_to = Some(S::ResyncRequired);
                self.transitions.push(Transition { from: S::Critical, to: S::Critical, reason, at_ms: now });
                vec![Action::DiscardLogs]
            }
            (state, E::Failed { class, reason }) if !matches!(state, S::Unprotected | S::Critical | S::FailedOver) => {
                match class {
                    ErrorClass::Recoverable => {
                        self.cycle_in_flight = false;
                        self.reason = Some(reason);
                        vec![Action::ScheduleRetry]
                    }
                    ErrorClass::NeedsResync if state == S::ResyncRequired => vec![],
                    ErrorClass::NeedsResync => {
                        self.cycle_in_flight = false;
                        self.go(S::ResyncRequired, &reason, now);
                        vec![Action::DiscardLogs]
                    }
                    ErrorClass::NonRecoverable => {
                        self.cycle_in_flight = false;
                        self.go(S::Critical, &reason, now);
                        vec![]
                    }
                    ErrorClass::Cancelled => {
                        self.cycle_in_flight = false;
                        vec![]
                    }
                }
            }
            _ => vec![],
        }
    }

    fn go(&mut self, to: VmState, reason: &str, now: UnixMillis) {
        let from = self.state;
        if to == VmState::Critical && from != VmState::Critical {
            self.resume_to = Some(from);
        }
        self.state = to;
        self.reason = match to {
            VmState::Critical | VmState::ResyncRequired => Some(reason.to_string()),
            _ => None,
        };
        self.transitions.push(Transition { from, to, reason: reason.to_string(), at_ms: now });
        if self.transitions.len() > TRANSITIONS_KEPT {
            let extra = self.transitions.len() - TRANSITIONS_KEPT;
            self.transitions.drain(..extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Action as A;
    use Event as E;
    use VmState as S;

    fn failed(class: ErrorClass) -> Event {
        Event::Failed { class, reason: "boom".into() }
    }

    fn at(state: VmState) -> Lifecycle {
        Lifecycle { state, ..Default::default() }
    }

    #[test]
    fn transition_table() {
        let table: Vec<(VmState, Event, VmState, Vec<Action>)> = vec![
            (S::Unprotected, E::Protect, S::EnablingProtection, vec![A::TakeSnapshot]),
            (S::EnablingProtection, E::SnapshotTaken, S::InitialReplication, vec![A::StartInitialCopy]),
            (S::InitialReplication, E::InitialCopyDone, S::FinalizingProtection, vec![A::CommitBasePoint]),
            (S::FinalizingProtection, E::PointCommitted, S::Protected, vec![]),
            (S::Protected, E::CycleDue, S::Protected, vec![A::StartCycle]),
            (S::Protected, E::Pause, S::Paused, vec![]),
            (S::Paused, E::Resume, S::Protected, vec![]),
            (S::Paused, E::CycleDue, S::Paused, vec![]),
            (S::Protected, E::ResyncNeeded { reason: "logs over 50%".into() }, S::ResyncRequired, vec![A::DiscardLogs]),
            (
                S::InitialReplication,
                E::ResyncNeeded { reason: "unclean log".into() },
                S::ResyncRequired,
                vec![A::DiscardLogs],
            ),
            (S::ResyncRequired, E::StartResync, S::Resynchronizing, vec![A::StartResync]),
            (S::Resynchronizing, E::ResyncDone, S::Protected, vec![]),
            (S::Protected, failed(ErrorClass::Recoverable), S::Protected, vec![A::ScheduleRetry]),
            (S::InitialReplication, failed(ErrorClass::Recoverable), S::InitialReplication, vec![A::ScheduleRetry]),
            (S::Protected, failed(ErrorClass::NeedsResync), S::ResyncRequired, vec![A::DiscardLogs]),
            (S::Protected, failed(ErrorClass::NonRecoverable), S::Critical, vec![]),
            (S::InitialReplication, failed(ErrorClass::NonRecoverable), S::Critical, vec![]),
            (S::Critical, failed(ErrorClass::Recoverable), S::Critical, vec![]),
            (S::Critical, E::CycleDue, S::Critical, vec![]),
            (S::Critical, E::Resume, S::Protected, vec![A::RetryNow]),
            (S::Protected, E::StartResync, S::Resynchronizing, vec![A::StartResync]),
            (S::Critical, E::StartResync, S::Resynchronizing, vec![A::StartResync]),
            (S::Critical, E::ResyncNeeded { reason: "log write failed".into() }, S::Critical, vec![A::DiscardLogs]),
            (S::Unprotected, E::CycleDue, S::Unprotected, vec![]),
            (S::Protected, E::Protect, S::Protected, vec![]),
        ];
        for (from, event, to, actions) in table {
            let mut lc = at(from);
            let got = lc.on_event(event.clone(), 7);
            assert_eq!((lc.state, &got), (to, &actions), "{from:?} + {event:?}");
            if from != to {
                let t = lc.transitions.last().expect("a transition is recorded");
                assert_eq!((t.from, t.to, t.at_ms), (from, to, 7));
            }
        }
    }

    fn failover(planned: bool) -> Event {
        E::FailedOver(Failover { planned, point: 3, out_dir: "/out".into(), at_ms: 7 })
    }

    #[test]
    fn a_failed_over_vm_stays_failed_over() {
        for from in [S::Protected, S::Paused, S::Critical, S::ResyncRequired, S::Resynchronizing] {
            let mut lc = at(from);
            assert_eq!(lc.on_event(failover(from == S::Protected), 7), vec![]);
            assert_eq!(lc.state, S::FailedOver, "from {from:?}");
            assert_eq!(lc.failover.as_ref().map(|f| f.point), Some(3));
            assert_eq!(lc.resume_to, None);
            for e in [
                E::CycleDue,
                E::PointCommitted,
                E::Resume,
                E::Pause,
                E::StartResync,
                E::Protect,
                E::ResyncNeeded { reason: "x".into() },
                failed(ErrorClass::NonRecoverable),
                failed(ErrorClass::NeedsResync),
                failed(ErrorClass::Recoverable),
            ] {
                assert_eq!(lc.on_event(e.clone(), 8), vec![], "{e:?}");
                assert_eq!(lc.state, S::FailedOver, "{e:?}");
            }
        }
        // Failing over again records the newer failover.
        let mut lc = at(S::FailedOver);
        lc.on_event(E::FailedOver(Failover { planned: false, point: 9, out_dir: "/b".into(), at_ms: 9 }), 9);
        assert_eq!(lc.failover.map(|f| (f.point, f.planned)), Some((9, false)));
        // A VM never protected has nothing to fail over to.
        let mut lc = at(S::Unprotected);
        lc.on_event(failover(true), 1);
        assert_eq!((lc.state, lc.failover), (S::Unprotected, None));
    }

    #[test]
    fn one_cycle_at_a_time() {
        let mut lc = at(S::Protected);
        assert_eq!(lc.on_event(E::CycleDue, 1), vec![A::StartCycle]);
        assert_eq!(lc.on_event(E::CycleDue, 2), vec![]);
        lc.on_event(E::PointCommitted, 3);
        assert_eq!(lc.on_event(E::CycleDue, 4), vec![A::StartCycle]);
        lc.on_event(failed(ErrorClass::Recoverable), 5);
        assert_eq!(lc.on_event(E::CycleDue, 6), vec![A::StartCycle]);
    }

    #[test]
    fn resume_returns_a_critical_vm_to_where_it_failed() {
        let mut lc = at(S::InitialReplication);
        lc.on_event(failed(ErrorClass::NonRecoverable), 1);
        assert_eq!(lc.state, S::Critical);
        assert_eq!(lc.on_event(E::CycleDue, 2), vec![]);
        assert_eq!(lc.on_event(E::Resume, 3), vec![A::RetryNow]);
        assert_eq!(lc.state, S::InitialReplication);
    }

    #[test]
    fn every_error_class_in_every_active_state() {
        let active = [
            S::EnablingProtection,
            S::InitialReplication,
            S::FinalizingProtection,
            S::Protected,
            S::Resynchronizing,
            S::Paused,
        ];
        for state in active {
            for (class, to, actions) in [
                (ErrorClass::Recoverable, state, vec![A::ScheduleRetry]),
                (ErrorClass::NeedsResync, S::ResyncRequired, vec![A::DiscardLogs]),
                (ErrorClass::NonRecoverable, S::Critical, vec![]),
                (ErrorClass::Cancelled, state, vec![]),
            ] {
                let mut lc = at(state);
                let got = lc.on_event(failed(class), 1);
                assert_eq!((lc.state, got), (to, actions), "{state:?} + {class:?}");
            }
        }
    }

    #[test]
    fn reasons_are_kept_for_the_operator() {
        let mut lc = at(S::Protected);
        lc.on_event(Event::Failed { class: ErrorClass::NonRecoverable, reason: "disk missing".into() }, 1);
        assert_eq!(lc.reason.as_deref(), Some("disk missing"));
        lc.on_event(E::Resume, 2);
        assert_eq!(lc.reason, None);
    }

    fn any_event() -> impl Strategy<Value = Event> {
        let class = prop_oneof![
            Just(ErrorClass::Recoverable),
            Just(ErrorClass::NeedsResync),
            Just(ErrorClass::NonRecoverable),
            Just(ErrorClass::Cancelled)
        ];
        prop_oneof![
            Just(E::Protect),
            Just(E::SnapshotTaken),
            Just(E::InitialCopyDone),
            Just(E::PointCommitted),
            Just(E::CycleDue),
            class.prop_map(|class| E::Failed { class, reason: "x".into() }),
            Just(E::ResyncNeeded { reason: "x".into() }),
            Just(E::StartResync),
            Just(E::ResyncDone),
        ]
    }

    proptest! {
        /// Without operator events (Resume, StartResync), nothing leaves Critical
        /// or Paused, and every non-cancelled failure changes state or retries.
        #[test]
        fn nothing_leaves_critical_on_its_own(events in proptest::collection::vec(any_event(), 1..60)) {
            let mut lc = Lifecycle::default();
            for (i, e) in events.into_iter().enumerate() {
                if e == E::StartResync { continue; }
                let before = lc.state;
                let is_failure = matches!(&e, E::Failed { class, .. } if *class != ErrorClass::Cancelled)
                    && !(before == S::ResyncRequired && matches!(&e, E::Failed { class: ErrorClass::NeedsResync, .. }));
                let actions = lc.on_event(e, i as u64);
                if before == S::Critical || before == S::Paused && lc.state != S::ResyncRequired {
                    prop_assert_eq!(lc.state, before);
                }
                if is_failure && before != S::Unprotected && before != S::Critical {
                    prop_assert!(lc.state != before || actions.contains(&A::ScheduleRetry));
                }
                prop_assert!(lc.transitions.len() <= TRANSITIONS_KEPT);
            }
        }
    }
}
