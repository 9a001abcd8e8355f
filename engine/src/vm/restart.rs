//! How a VM starts when the engine opens: one pure decision from the
//! persisted record and what was found beside its disks.
//!
//! Overview: the opener scans every disk's change logs (read only, see
//! [`super::open`]) into a [`LogsFound`] per disk, [`decide`] picks the
//! start, and the opener carries it out (removes logs that are not kept,
//! opens the next log of each chain).
//!
//! Rules, in order:
//! - A protection that had not committed its base (Unprotected,
//!   EnablingProtection, InitialReplication, FinalizingProtection with no
//!   point) starts over: the snapshot did not survive the stop. A Critical
//!   VM is judged by the state it failed in (the one a resume returns to).
//! - A base committed whose state change was not recorded
//!   (FinalizingProtection with a point) counts as Protected.
//! - A VM waiting for a resync drops its logs again (they are not needed).
//! - A VM stopped mid-resync runs the resync again (its point was never
//!   committed; it starts a new chain and snapshot).
//! - Otherwise the logs found are trusted only if every disk's pass the
//!   chain's trust check (sealed, or left open by a daemon that died on
//!   this boot, see `changelog::check_logs`): they wait for the next cycle
//!   (the opener replays and seals the open ones first). Else the VM needs a
//!   resync, with the first disk's reason.

use crate::vm::lifecycle::{Lifecycle, VmState};

use super::core::{PendingLog, Start};

/// What a scan found beside one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogsFound {
    /// Every log is cleanly closed and chained: these sealed logs (oldest first).
    Trusted(Vec<PendingLog>),
    /// No log at all: the chain is broken (the active log is always there).
    Missing,
    /// Why the logs cannot be trusted (unclean, unreadable, broken chain).
    Untrusted(String),
}

/// The start [`decide`] picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    /// Protection starts over: new generation, no point, old logs removed.
    pub start_over: bool,
    /// The base point was committed but the state still says Finalizing.
    pub base_committed: bool,
    pub start: Start,
}

impl Restart {
    /// Whether the logs found beside a disk are kept (as pending).
    pub fn keeps_logs(&self) -> bool {
        matches!(self.start, Start::Resume { .. })
    }
}

pub fn decide(lifecycle: &Lifecycle, last_point: u64, found: &[(String, LogsFound)]) -> Restart {
    use VmState as S;
    // A Critical VM goes back to the state it failed in: decide for that one.
    let effective = match lifecycle.state {
        S::Critical => lifecycle.resume_to.unwrap_or(S::Protected),
        s => s,
    };
    let start_over = match effective {
        S::Unprotected | S::EnablingProtection | S::InitialReplication => true,
        S::FinalizingProtection => last_point == 0,
        _ => false,
    };
    let state = lifecycle.state;
    let plain = |start| Restart { start_over: false, base_committed: false, start };
    if start_over {
        return Restart { start_over, base_committed: false, start: Start::Protect };
    }
    let base_committed = effective == S::FinalizingProtection;
    match state {
        S::ResyncRequired => return plain(Start::DiscardLogs),
        S::Resynchronizing => return plain(Start::ResyncAgain),
        _ => {}
    }
    let mut pending = Vec::new();
    for (disk, f) in found {
        match f {
            LogsFound::Trusted(logs) => pending.push(logs.clone()),
            LogsFound::Missing => {
                let reason = format!("no change log found for disk {disk}: the chain is broken");
                return Restart { base_committed, ..plain(Start::ResyncNeeded { reason }) };
            }
            LogsFound::Untrusted(reason) => {
                return Restart { base_committed, ..plain(Start::ResyncNeeded { reason: reason.clone() }) }
            }
        }
    }
    Restart { base_committed, ..plain(Start::Resume { pending }) }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use VmState as S;

    fn trusted(n: usize) -> LogsFound {
        LogsFound::Trusted(
            (0..n).map(|i| PendingLog { path: PathBuf::from(format!("l{i}")), bytes: 1, sealed_ms: 1 }).collect(),
        )
    }

    #[test]
    fn decision_table() {
        let ok = vec![("a".to_string(), trusted(1)), ("b".to_string(), trusted(0))];
        let unclean = vec![("a".to_string(), trusted(1)), ("b".to_string(), LogsFound::Untrusted("b unclean".into()))];
        let missing = vec![("a".to_string(), LogsFound::Missing)];
        let protect = Restart { start_over: true, base_committed: false, start: Start::Protect };
        let resume = |found: &[(String, LogsFound)]| Start::Resume {
            pending: found
                .iter()
                .map(|(_, f)| match f {
                    LogsFound::Trusted(l) => l.clone(),
                    _ => unreachable!(),
                })
                .collect(),
        };
        let plain = |start| Restart { start_over: false, base_committed: false, start };
        type Row<'a> = (VmState, u64, &'a [(String, LogsFound)], Restart);
        let table: Vec<Row> = vec![
            (S::Unprotected, 0, &ok, protect.clone()),
            (S::EnablingProtection, 0, &ok, protect.clone()),
            (S::InitialReplication, 0, &unclean, protect.clone()),
            (S::FinalizingProtection, 0, &ok, protect.clone()),
            (S::FinalizingProtection, 1, &ok, Restart { base_committed: true, ..plain(resume(&ok)) }),
            (S::Protected, 4, &ok, plain(resume(&ok))),
            (S::Paused, 4, &ok, plain(resume(&ok))),
            (S::Critical, 4, &ok, plain(resume(&ok))),
            (S::Protected, 4, &unclean, plain(Start::ResyncNeeded { reason: "b unclean".into() })),
            (S::Critical, 4, &unclean, plain(Start::ResyncNeeded { reason: "b unclean".into() })),
            (
                S::Protected,
                4,
                &missing,
                plain(Start::ResyncNeeded { reason: "no change log found for disk a: the chain is broken".into() }),
            ),
            (S::ResyncRequired, 4, &unclean, plain(Start::DiscardLogs)),
            (S::Resynchronizing, 4, &ok, plain(Start::ResyncAgain)),
        ];
        for (state, last, found, want) in table {
            let lc = Lifecycle { state, ..Default::default() };
            assert_eq!(decide(&lc, last, found), want, "{state} last={last} {found:?}");
        }
        let at = |state| Lifecycle { state, ..Default::default() };
        assert!(decide(&at(S::Protected), 4, &ok).keeps_logs());
        assert!(!decide(&at(S::Protected), 4, &unclean).keeps_logs());
        // Critical: judged by the state a resume returns to.
        let critical = |to| Lifecycle { state: S::Critical, resume_to: Some(to), ..Default::default() };
        assert_eq!(decide(&critical(S::InitialReplication), 0, &ok), protect);
        assert_eq!(decide(&critical(S::FinalizingProtection), 0, &ok), protect);
        assert_eq!(
            decide(&critical(S::FinalizingProtection), 1, &ok),
            Restart { base_committed: true, ..plain(resume(&ok)) }
        );
        assert_eq!(decide(&critical(S::Protected), 4, &ok), plain(resume(&ok)));
    }
}
