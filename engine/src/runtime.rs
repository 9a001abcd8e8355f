//! Running blocking work (file I/O, compression, state commits) off the
//! async workers and the actor thread.

use crate::error::{Error, Result};

/// Runs `f` on the blocking pool; a panic in it becomes an internal error.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}
