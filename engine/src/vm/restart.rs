//! How a VM starts when the engine opens: one pure decision from the
//! persisted record and what was found beside its disks.
//!
//! Overview: the opener scans every disk's change logs (read only, see
//! [`super::open`]) into a [`LogsFound`] per disk, [`decide`] picks the
//! start, and the opener carries it out (removes logs that are not kept,
//! opens the next log of each chain).
//!
//! Rules, in order:
//! - An initial copy (InitialReplication) resumes where it stopped when
//!   everything it rests on is found and trusted ([`CopyFound::Resumable`]):
//!   the progress journal of its snapshot (`replicate::progress`) is
//!   readable and for this generation, part size and disks; each disk's
//!   snapshot side file is there; and every disk's logs pass the trust
//!   check (same boot, chain intact, back to the log the snapshot was taken
//!   in). Generation and logs are kept (open logs are replayed and sealed
//!   as below), the snapshot is rebuilt from its side file
//!   (`capture::snapshot::rebuild_blocks`), and only the parts the journal
//!   lacks are copied. Why that copy still equals the disk at snapshot time:
//!   the write path saves a block in the side file before it logs the change
//!   (`capture::disk`), and a kill leaves the page cache, so a block any
//!   change since the snapshot touched is in the side file (or its part is
//!   on the target), and a block none touched is unchanged on the disk.
//!   What cannot be trusted is not assumed: a part missing from the journal
//!   is copied again; a missing or damaged journal or side file, or logs
//!   not trusted (a reboot lost the page cache), start protection over.
//!   A clean stop mid-copy syncs the side file and the disk and seals the
//!   logs (`vm::actor`), so it resumes the same way, even after a reboot.
//!   A copy that ended but whose base point was not committed
//!   (FinalizingProtection with no point) resumes the same way: the
//!   snapshot and the journal are released only after that commit, so its
//!   journal lists every part and the resumed copy puts nothing before it
//!   commits the base.
//! - Any other protection that had not committed its base (Unprotected,
//!   EnablingProtection, a copy that cannot resume, a Critical VM
//!   that failed in one of those or in InitialReplication) starts over
//!   under a new generation. A Critical VM is judged by the state it failed
//!   in (the one a resume returns to).
//! - A base committed whose state change was not recorded
//!   (FinalizingProtection with a point) counts as Protected.
//! - A VM waiting for a resync drops its logs again (they are not needed).
//! - A VM stopped mid-resync goes on with it by the same rule as an
//!   initial copy: its snapshot is rebuilt from the side file, the logs of
//!   the chain it started (writes during the resync) are kept for the cycle
//!   after it, and only the parts its journal lacks are compared and put.
//!   If anything it rests on is missing or untrusted, the resync runs again
//!   (its point was never committed; it starts a new chain and snapshot).
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

/// What the opener found of an initial copy in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFound {
    /// Not looked for (the VM is not in InitialReplication).
    NotLooked,
    /// Journal, side files and snapshot-time log positions found and
    /// consistent; the copy put its parts under `seq` (None: no part yet).
    /// `resync`: the copy is a resync's (else an initial copy's).
    Resumable { seq: Option<u64>, snapshot_ms: u64, resync: bool },
    /// Why the copy cannot resume (protection starts over).
    Unusable(String),
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
        matches!(self.start, Start::Resume { .. } | Start::ContinueCopy { .. })
    }
}

/// The trusted logs of every disk, or why some disk's cannot be trusted.
fn trusted(found: &[(String, LogsFound)]) -> std::result::Result<Vec<Vec<PendingLog>>, String> {
    found
        .iter()
        .map(|(disk, f)| match f {
            LogsFound::Trusted(logs) => Ok(logs.clone()),
            LogsFound::Missing => Err(format!("no change log found for disk {disk}: the chain is broken")),
            LogsFound::Untrusted(reason) => Err(reason.clone()),
        })
        .collect()
}

pub fn decide(lifecycle: &Lifecycle, last_point: u64, found: &[(String, LogsFound)], copy: &CopyFound) -> Restart {
    use VmState as S;
    if let (CopyFound::Resumable { seq, snapshot_ms, resync }, Ok(pending)) = (copy, trusted(found)) {
        let copying = match (lifecycle.state, *resync) {
            (S::Resynchronizing, true) => true,
            (S::InitialReplication, false) => true,
            (S::FinalizingProtection, false) => last_point == 0,
            _ => false,
        };
        if copying {
            let start = Start::ContinueCopy { pending, seq: *seq, snapshot_ms: *snapshot_ms };
            return Restart { start_over: false, base_committed: false, start };
        }
    }
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
    match trusted(found) {
        Ok(pending) => Restart { base_committed, ..plain(Start::Resume { pending }) },
        Err(reason) => Restart { base_committed, ..plain(Start::ResyncNeeded { reason }) },
    }
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
            // FailedOver goes on as it was: the core ignores what the logs say (and cuts no points).
            (S::FailedOver, 4, &ok, plain(resume(&ok))),
            (S::FailedOver, 4, &unclean, plain(Start::ResyncNeeded { reason: "b unclean".into() })),
        ];
        for (state, last, found, want) in table {
            let lc = Lifecycle { state, ..Default::default() };
            assert_eq!(decide(&lc, last, found, &CopyFound::NotLooked), want, "{state} last={last} {found:?}");
        }
        let at = |state| Lifecycle { state, ..Default::default() };
        assert!(decide(&at(S::Protected), 4, &ok, &CopyFound::NotLooked).keeps_logs());
        assert!(!decide(&at(S::Protected), 4, &unclean, &CopyFound::NotLooked).keeps_logs());
        // Critical: judged by the state a resume returns to.
        let critical = |to| Lifecycle { state: S::Critical, resume_to: Some(to), ..Default::default() };
        assert_eq!(decide(&critical(S::InitialReplication), 0, &ok, &CopyFound::NotLooked), protect);
        assert_eq!(decide(&critical(S::FinalizingProtection), 0, &ok, &CopyFound::NotLooked), protect);
        assert_eq!(
            decide(&critical(S::FinalizingProtection), 1, &ok, &CopyFound::NotLooked),
            Restart { base_committed: true, ..plain(resume(&ok)) }
        );
        assert_eq!(decide(&critical(S::Protected), 4, &ok, &CopyFound::NotLooked), plain(resume(&ok)));
    }

    #[test]
    fn a_copy_or_resync_resumes_only_when_everything_it_rests_on_is_trusted() {
        let ok = vec![("a".to_string(), trusted(1)), ("b".to_string(), trusted(0))];
        let unclean = vec![("a".to_string(), trusted(1)), ("b".to_string(), LogsFound::Untrusted("b unclean".into()))];
        let missing = vec![("a".to_string(), LogsFound::Missing)];
        let resumable = CopyFound::Resumable { seq: Some(3), snapshot_ms: 77, resync: false };
        let resync = CopyFound::Resumable { seq: Some(3), snapshot_ms: 77, resync: true };
        let unusable = CopyFound::Unusable("no side file".into());
        let protect = Restart { start_over: true, base_committed: false, start: Start::Protect };
        let plain = |start| Restart { start_over: false, base_committed: false, start };
        let pending = |found: &[(String, LogsFound)]| trusted_logs(found);
        let cont = |found: &[(String, LogsFound)], seq| Restart {
            start_over: false,
            base_committed: false,
            start: Start::ContinueCopy { pending: pending(found), seq, snapshot_ms: 77 },
        };
        type Row<'a> = (VmState, &'a [(String, LogsFound)], &'a CopyFound, Restart);
        let table: Vec<Row> = vec![
            (S::InitialReplication, &ok, &resumable, cont(&ok, Some(3))),
            (
                S::InitialReplication,
                &ok,
                &CopyFound::Resumable { seq: None, snapshot_ms: 77, resync: false },
                cont(&ok, None),
            ),
            // Logs not trusted (a reboot, a broken chain): the side file may lack saves.
            (S::InitialReplication, &unclean, &resumable, protect.clone()),
            (S::InitialReplication, &missing, &resumable, protect.clone()),
            (S::InitialReplication, &ok, &unusable, protect.clone()),
            (S::InitialReplication, &ok, &CopyFound::NotLooked, protect.clone()),
            // Only a copy in progress resumes.
            (S::EnablingProtection, &ok, &resumable, protect.clone()),
            (S::Unprotected, &ok, &resumable, protect.clone()),
            // A resync goes on with its own journal, under the same rules.
            (S::Resynchronizing, &ok, &resync, cont(&ok, Some(3))),
            (S::Resynchronizing, &unclean, &resync, plain(Start::ResyncAgain)),
            (S::Resynchronizing, &ok, &unusable, plain(Start::ResyncAgain)),
            (S::Resynchronizing, &ok, &resumable, plain(Start::ResyncAgain)),
            (S::InitialReplication, &ok, &resync, protect.clone()),
            // A copy that ended but whose base was not committed goes on with its journal.
            (S::FinalizingProtection, &ok, &resumable, cont(&ok, Some(3))),
            (S::FinalizingProtection, &unclean, &resumable, protect.clone()),
            (S::FinalizingProtection, &ok, &unusable, protect.clone()),
            (S::FinalizingProtection, &ok, &resync, protect.clone()),
        ];
        for (state, found, copy, want) in table {
            let lc = Lifecycle { state, ..Default::default() };
            let got = decide(&lc, 0, found, copy);
            assert_eq!(got, want, "{state} {found:?} {copy:?}");
            assert_eq!(got.keeps_logs(), matches!(got.start, Start::ContinueCopy { .. }));
        }
        let critical = Lifecycle { state: S::Critical, resume_to: Some(S::InitialReplication), ..Default::default() };
        assert_eq!(decide(&critical, 0, &ok, &resumable), protect, "the operator's resume starts over");
        // The base committed (the state change not stored): no copy goes on.
        let finalizing = Lifecycle { state: S::FinalizingProtection, ..Default::default() };
        assert_eq!(
            decide(&finalizing, 1, &ok, &resumable),
            Restart { base_committed: true, ..plain(Start::Resume { pending: pending(&ok) }) }
        );
    }

    fn trusted_logs(found: &[(String, LogsFound)]) -> Vec<Vec<PendingLog>> {
        found
            .iter()
            .map(|(_, f)| match f {
                LogsFound::Trusted(l) => l.clone(),
                _ => unreachable!(),
            })
            .collect()
    }
}
