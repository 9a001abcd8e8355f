//! Running blocking work (file I/O, compression, state commits) off the
//! async workers and the actor thread.
//!
//! Two pools. [`blocking`] is tokio's blocking pool, at the daemon's own
//! CPU priority: the guests' I/O (NBD device calls), log syncs, state
//! commits. [`background`] is a pool of its own whose threads run at a
//! lower CPU priority (`nice`, [`EngineConfig::background_nice`], default
//! [`DEFAULT_BACKGROUND_NICE`]): compressing the parts of a point and
//! hashing disks for a resync, work that holds no lock a guest's write
//! needs (a low-priority thread holding one would stall the guest: the
//! reads of a part, under the snapshot's or held image's lock, stay on
//! [`blocking`]). Replication must not slow the guests down: on a busy
//! host the scheduler serves their I/O first and uploads take the CPU left
//! over (the 50% rule bounds how far they may fall behind); on an idle
//! host the background runs at full speed.
//!
//! [`EngineConfig::background_nice`]: crate::config::EngineConfig::background_nice

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// Runs `f` on the blocking pool; a panic in it becomes an internal error.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

/// The nice value of background threads unless configured.
pub const DEFAULT_BACKGROUND_NICE: i32 = 10;

static BACKGROUND_NICE: AtomicI32 = AtomicI32::new(DEFAULT_BACKGROUND_NICE);

/// Sets the nice value (0..=19) of background threads started from now on
/// (process-wide; the pool's idle threads end after a few seconds).
pub(crate) fn set_background_nice(nice: i32) {
    BACKGROUND_NICE.store(nice.clamp(0, 19), Ordering::Relaxed);
}

/// Runs `f` on the background pool, at the background CPU priority; a
/// panic in it becomes an internal error. Falls back to the blocking pool
/// if the background pool could not be made.
pub(crate) async fn background<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let Some(pool) = background_pool() else {
        return blocking(f).await;
    };
    pool.spawn_blocking(f).await.map_err(|e| Error::Internal(format!("background task failed: {e}")))?
}

fn background_pool() -> Option<&'static tokio::runtime::Handle> {
    static POOL: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    POOL.get_or_init(|| {
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-background")
            .on_thread_start(lower_priority)
            .build();
        match built {
            Ok(rt) => Some(rt),
            Err(e) => {
                tracing::warn!(error = %e, "no background pool: uploads run at the daemon's CPU priority");
                None
            }
        }
    })
    .as_ref()
    .map(|rt| rt.handle())
}

/// Lowers the calling thread's CPU priority to the background nice value
/// (on Linux a nice value is per thread), never raises it. A refusal
/// leaves it as it is.
fn lower_priority() {
    let nice = BACKGROUND_NICE.load(Ordering::Relaxed);
    // SAFETY: plain syscalls on the calling thread; the result is only a status.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        if libc::getpriority(libc::PRIO_PROCESS, tid) < nice {
            libc::setpriority(libc::PRIO_PROCESS, tid, nice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        // SAFETY: plain syscalls on the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[tokio::test]
    async fn background_work_runs_at_a_lower_priority_than_blocking_work() {
        let base = blocking(|| Ok(own_nice())).await.unwrap();
        let bg = background(|| Ok(own_nice())).await.unwrap();
        assert_eq!(bg, base.max(DEFAULT_BACKGROUND_NICE), "the daemon's threads run at nice {base}");
        let e = background(|| -> Result<()> { panic!("boom") }).await.unwrap_err();
        assert!(e.to_string().contains("background task failed"), "{e}");
    }
}
