//! The NBD server: accept loops, the connection caps, and one connection's
//! life: handshake ([`super::handshake`]), then transmission
//! ([`super::transmission`]). The protocol summary, the limits and the
//! durability argument are in the module header of [`crate::nbd`].

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{handshake, transmission, ExportCatalog, NbdLimits};
use crate::{Error, Result};

/// Largest option data we read during the handshake. Names are at most 4096
/// bytes, so real clients stay far below; longer gets `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// After shutdown, how long a connection in transmission may take to
/// finish its requests and write its last replies (to a client that
/// stopped reading) before it is dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// After shutdown, how long a connection in the handshake waits for its
/// client's next option (answered `NBD_REP_ERR_SHUTDOWN`) before closing.
pub const HANDSHAKE_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Pause after a failed accept (out of descriptors) so we do not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves the exports of a catalog over NBD until its token is cancelled.
/// Cheap to clone: clones share the catalog, the token and the limits.
#[derive(Clone)]
pub struct NbdServer {
    shared: Arc<Shared>,
}

/// What every connection of one server shares.
pub(super) struct Shared {
    /// Where export names are resolved, at each handshake.
    pub(super) catalog: Arc<dyn ExportCatalog>,
    /// Shutdown: stop accepting, answer what is queued with ESHUTDOWN, close.
    pub(super) shutdown: CancellationToken,
    pub(super) limits: NbdLimits,
    /// One permit per open connection (`limits.max_connections`).
    connections: Arc<Semaphore>,
    /// Connections in transmission per export name (`limits.max_connections_per_export`).
    exports: Mutex<HashMap<String, usize>>,
    /// Buffer bytes in flight on all connections (`limits.buffer_bytes`).
    pub(super) buffer_bytes: Arc<Semaphore>,
    /// Device calls running on the blocking pool (`limits.device_calls`).
    pub(super) device_calls: Arc<Semaphore>,
    /// Connections closed at accept for want of a slot, for the log.
    refused: AtomicU64,
}

impl NbdServer {
    /// A server with the default [`NbdLimits`].
    pub fn new(catalog: Arc<dyn ExportCatalog>, shutdown: CancellationToken) -> Self {
        Self::build(catalog, NbdLimits::default(), shutdown)
    }

    /// A server with the given limits; refuses limits outside their bounds.
    pub fn with_limits(
        catalog: Arc<dyn ExportCatalog>,
        limits: NbdLimits,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        limits.validate()?;
        Ok(Self::build(catalog, limits, shutdown))
    }

    fn build(catalog: Arc<dyn ExportCatalog>, limits: NbdLimits, shutdown: CancellationToken) -> Self {
        let shared = Shared {
            catalog,
            shutdown,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            exports: Mutex::new(HashMap::new()),
            buffer_bytes: Arc::new(Semaphore::new(limits.buffer_bytes)),
            device_calls: Arc::new(Semaphore::new(limits.device_calls)),
            refused: AtomicU64::new(0),
            limits,
        };
        NbdServer { shared: Arc::new(shared) }
    }

    pub fn limits(&self) -> &NbdLimits {
        &self.shared.limits
    }

    /// Accepts connections on a Unix socket until shutdown, then waits for
    /// its connections to finish.
    pub async fn serve_unix(&self, listener: tokio::net::UnixListener) -> Result<()> {
        let connections = TaskTracker::new();
        let result = loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => self.admit(&connections, stream, || "unix".to_string()),
                Err(e) => {
                    if let Err(e) = self.accept_failed(e).await {
                        break Err(e);
                    }
                }
            }
        };
        connections.close();
        connections.wait().await;
        result
    }

    /// Accepts connections on TCP until shutdown, then waits for its
    /// connections to finish.
    pub async fn serve_tcp(&self, listener: tokio::net::TcpListener) -> Result<()> {
        let connections = TaskTracker::new();
        let result = loop {
            let accepted = tokio::select! {
                _ = self.shared.shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Replies are small and latency-bound: do not let Nagle hold them.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "nbd: cannot set TCP_NODELAY");
                    }
                    self.admit(&connections, stream, || peer.to_string());
                }
                Err(e) => {
                    if let Err(e) = self.accept_failed(e).await {
                        break Err(e);
                    }
                }
            }
        };
        connections.close();
        connections.wait().await;
        result
    }

    /// Serves an accepted connection if a slot is free; otherwise drops it
    /// at once, before reading from it or spawning anything for it.
    fn admit<S>(&self, connections: &TaskTracker, stream: S, peer: impl FnOnce() -> String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(slot) = self.connection_slot() else {
            drop(stream);
            return;
        };
        let server = self.clone();
        let peer = peer();
        connections.spawn(async move {
            debug!(%peer, "nbd: connection accepted");
            match server.serve_in_slot(stream, slot).await {
                Ok(()) => debug!(%peer, "nbd: connection closed"),
                Err(e) => warn!(%peer, error = %e, "nbd: connection ended with an error"),
            }
        });
    }

    /// A connection slot, or `None` (counted and logged now and then) at the cap.
    fn connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        match self.shared.connections.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let n = self.shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
                // The 1st, 2nd, 4th, 8th ... refusal: a flood logs a few lines.
                if n.is_power_of_two() {
                    warn!(
                        limit = self.shared.limits.max_connections,
                        refused_so_far = n,
                        "nbd: connection limit reached, closing new connections"
                    );
                }
                None
            }
        }
    }

    /// Transient accept failures (a client that went away, no descriptors
    /// left) are logged and retried; anything else ends the accept loop.
    async fn accept_failed(&self, e: io::Error) -> Result<()> {
        let transient = matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock
        ) || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
        );
        if !transient {
            return Err(Error::io("nbd accept", e));
        }
        warn!(error = %e, "nbd: accept failed, retrying");
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => {}
            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
        }
        Ok(())
    }

    /// Serves one client on any byte stream: handshake, then transmission
    /// until the client disconnects or the server shuts down. `Ok` for a
    /// clean end (DISC, ABORT, EOF between messages, shutdown, idle), `Err`
    /// for a protocol violation, a timeout, an I/O failure, or no free
    /// connection slot; either way the stream is closed.
    pub async fn serve_connection<S>(&self, mut stream: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(slot) = self.connection_slot() else {
            let _ = stream.shutdown().await;
            return Err(Error::FailedPrecondition(format!(
                "nbd: {} connections are open, the limit: connection closed",
                self.shared.limits.max_connections
            )));
        };
        self.serve_in_slot(stream, slot).await
    }

    async fn serve_in_slot<S>(&self, mut stream: S, _slot: OwnedSemaphorePermit) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = self.shared.limits.handshake_timeout;
        let export = match tokio::time::timeout(timeout, handshake::handshake(&mut stream, &self.shared)).await {
            Ok(export) => export?,
            Err(_) => {
                return Err(Error::io(
                    "nbd handshake",
                    io::Error::new(io::ErrorKind::TimedOut, format!("not in transmission after {timeout:?}")),
                ))
            }
        };
        let Some(export) = export else {
            return Ok(());
        };
        debug!(export = %export.name, size = export.size, structured = export.structured, "nbd: entering transmission");
        let shutdown = self.shared.shutdown.clone();
        let transmission = transmission::transmit(stream, export, self.shared.clone());
        tokio::pin!(transmission);
        tokio::select! {
            result = &mut transmission => result,
            _ = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                warn!("nbd: connection still draining after shutdown grace, dropping it");
                Ok(())
            }
        }
    }
}

impl Shared {
    /// Claims a transmission slot on export `name`; `None` at its cap.
    pub(super) fn claim_export(self: &Arc<Self>, name: &str) -> Option<ExportSlot> {
        let mut exports = self.exports.lock().unwrap_or_else(|e| e.into_inner());
        let count = exports.entry(name.to_string()).or_insert(0);
        if *count >= self.limits.max_connections_per_export {
            return None;
        }
        *count += 1;
        Some(ExportSlot { shared: Arc::clone(self), name: name.to_string() })
    }
}

/// One connection's place among its export's connections; freed on drop.
pub(super) struct ExportSlot {
    shared: Arc<Shared>,
    name: String,
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        let mut exports = self.shared.exports.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = exports.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                exports.remove(&self.name);
            }
        }
    }
}
