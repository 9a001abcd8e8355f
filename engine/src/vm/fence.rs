//! The fence around a VM's log chain.
//!
//! Overview: several tasks of one VM change its log chain or commit what
//! they read from it: a cycle rotates the active logs, a discard drops them
//! (the VM needs a resync), a resync starts a new chain and a snapshot, the
//! initial copy takes a snapshot, a stop closes the disks. Each task is
//! started with the epoch current then; the VM core moves the epoch on
//! whenever a newer task supersedes the running ones (a resync, a discard,
//! a stop), and the actor mirrors it here before starting any newer task.
//!
//! Consistency: every change to the chain runs under the fence's lock and
//! only if the task's epoch is still current ([`ChainFence::change`]), so a
//! superseded task can never undo a newer one's work (a late discard ending
//! a running resync's snapshot, a late rotation sealing a resync's new log).
//! Changes of one VM are thus serialized in epoch order. Every commit
//! (cycle, base, resync) checks the epoch right before its manifest is put
//! ([`ChainFence::check`]): everything the task read came before that check,
//! so a task superseded before it cannot commit a point torn by the newer
//! one. A task superseded after the check read only a chain and snapshot
//! that were whole, so the point it commits is valid.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub(crate) struct ChainFence {
    epoch: AtomicU64,
    lock: Mutex<()>,
}

impl ChainFence {
    /// The VM core moved to `epoch` (it only grows): tasks of older epochs are superseded.
    pub(crate) fn advance_to(&self, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
    }

    pub(crate) fn current(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Ok while `mine` is the current epoch.
    pub(crate) fn check(&self, mine: u64) -> Result<()> {
        let now = self.current();
        if now == mine {
            Ok(())
        } else {
            Err(Error::Cancelled(format!("superseded by a newer task (epoch {mine}, now {now})")))
        }
    }

    /// Runs a change of the log chain (blocking) if `mine` is still current,
    /// with no other change of this VM's chain running meanwhile.
    pub(crate) fn change<T>(&self, mine: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _turn = self.lock.lock().expect("no panics while changing a log chain");
        self.check(mine)?;
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    #[test]
    fn a_superseded_task_neither_changes_the_chain_nor_commits() {
        let f = ChainFence::default();
        let (discard, resync) = (1, 2);
        f.advance_to(discard);
        f.advance_to(resync); // an operator resync accepted right after
        assert_eq!(f.change(resync, || Ok("new chain")).unwrap(), "new chain");
        let late = f.change(discard, || -> Result<()> { panic!("a late discard must not run") }).unwrap_err();
        assert_eq!(late.class(), ErrorClass::Cancelled);
        assert!(f.check(discard).is_err());
        assert!(f.check(resync).is_ok());
    }

    #[test]
    fn changes_are_serialized() {
        let f = std::sync::Arc::new(ChainFence::default());
        let e = 0;
        let inside = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (f, inside) = (f.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        f.change(e, || {
                            assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two changes at once");
                            inside.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    }
}
