//! What one NBD client may take from the server, so that a hostile or
//! broken client cannot starve the other VMs' exports: connections,
//! time in the handshake, memory for request buffers, and device calls on
//! the blocking thread pool the engine's uploads and state commits share.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::nbd::proto;
use crate::{Error, Result};

/// Limits of one [`NbdServer`](super::NbdServer). Every field's doc gives
/// its default and bounds; [`NbdLimits::validate`] names a field outside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdLimits {
    /// Connections open at once, Unix and TCP together, in handshake or
    /// transmission. One more is closed right after accept, before the server
    /// reads or allocates anything for it. Default 256, 1..=16384: a host's
    /// VMs open one connection per disk (QEMU) or a few (nbdcopy, fio), and
    /// 256 descriptors leave most of a 1024 soft limit to the engine's disks,
    /// logs, snapshots and gRPC.
    pub max_connections: usize,
    /// Connections in transmission on one export (`<vm>/<disk>`) at once; a
    /// GO over the cap is refused with `NBD_REP_ERR_POLICY`, an
    /// `EXPORT_NAME` is closed. Default 16, 1..=16384 (at or above
    /// `max_connections` it adds no cap of its own): multi-connection
    /// clients use 4 to 8 (nbdcopy's default is 4), and 16 keeps one export
    /// from taking more than a sixteenth of the server.
    pub max_connections_per_export: usize,
    /// From accept until the client enters transmission. Default 10 s,
    /// 1 s..=10 min: real clients take milliseconds.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection that entered transmission but has sent no request for
    /// this long is closed: it holds a slot of its export and of the server
    /// without using it. Once a client has sent a request it is never closed
    /// for being quiet, because a guest's disk can go hours without I/O and
    /// closing its connection would fail the guest's next I/O. Also the
    /// time a request that has begun to arrive (header, WRITE payload) has
    /// to arrive whole. Default 5 min, 1 s..=24 h.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Requests in flight on one connection (running, or waiting for their
    /// reply to be written); the connection reads no more until one is
    /// answered. Default 64, 1..=1024.
    pub requests_per_connection: usize,
    /// READ/WRITE buffer bytes in flight on one connection. Default
    /// 128 MiB, 32 MiB (one largest request)..=`buffer_bytes`.
    pub buffer_bytes_per_connection: usize,
    /// READ/WRITE buffer bytes in flight on all connections together.
    /// Default 1 GiB, `buffer_bytes_per_connection`..=64 GiB.
    pub buffer_bytes: usize,
    /// Device calls (reads, large or FUA writes, zeroing, flushes, block
    /// status) running at once on tokio's blocking pool, all connections
    /// together; more wait their turn in arrival order. Default 32,
    /// 1..=256: the pool's 512 threads also run the engine's uploads and
    /// state commits, and more parallel file I/O than this gains nothing.
    pub device_calls: usize,
}

/// The largest READ/WRITE a client can send, which every buffer limit must hold.
const MIN_BUFFER: usize = proto::MAX_PAYLOAD as usize;

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            max_connections: 256,
            max_connections_per_export: 16,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            requests_per_connection: 64,
            buffer_bytes_per_connection: 128 << 20,
            buffer_bytes: 1 << 30,
            device_calls: 32,
        }
    }
}

impl NbdLimits {
    /// Checks every field against its bounds; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let count = |field: &'static str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(field, format!("{v} is outside {lo}..={hi}")))
            }
        };
        let time = |field: &'static str, v: Duration, lo: Duration, hi: Duration| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(field, format!("{v:?} is outside {lo:?}..={hi:?}")))
            }
        };
        count("max_connections", self.max_connections, 1, 16384)?;
        count("max_connections_per_export", self.max_connections_per_export, 1, 16384)?;
        time("handshake_timeout", self.handshake_timeout, Duration::from_secs(1), Duration::from_secs(600))?;
        time("idle_timeout", self.idle_timeout, Duration::from_secs(1), Duration::from_secs(24 * 3600))?;
        count("requests_per_connection", self.requests_per_connection, 1, 1024)?;
        count("buffer_bytes", self.buffer_bytes, MIN_BUFFER, 64 << 30)?;
        count("buffer_bytes_per_connection", self.buffer_bytes_per_connection, MIN_BUFFER, self.buffer_bytes)?;
        count("device_calls", self.device_calls, 1, 256)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn field_of(e: Error) -> String {
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        match e {
            Error::InvalidArgument { field, .. } => field.to_string(),
            other => panic!("not an invalid argument: {other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        NbdLimits::default().validate().unwrap();
    }

    #[test]
    fn validate_names_the_field_out_of_bounds() {
        type Spoil = fn(&mut NbdLimits);
        let bad: [(&str, Spoil); 10] = [
            ("max_connections", |l| l.max_connections = 0),
            ("max_connections", |l| l.max_connections = 16385),
            ("max_connections_per_export", |l| l.max_connections_per_export = 0),
            ("handshake_timeout", |l| l.handshake_timeout = Duration::from_millis(999)),
            ("idle_timeout", |l| l.idle_timeout = Duration::from_secs(24 * 3600 + 1)),
            ("requests_per_connection", |l| l.requests_per_connection = 0),
            ("buffer_bytes", |l| l.buffer_bytes = MIN_BUFFER - 1),
            ("buffer_bytes_per_connection", |l| l.buffer_bytes_per_connection = MIN_BUFFER - 1),
            ("buffer_bytes_per_connection", |l| l.buffer_bytes_per_connection = l.buffer_bytes + 1),
            ("device_calls", |l| l.device_calls = 257),
        ];
        for (field, spoil) in bad {
            let mut l = NbdLimits::default();
            spoil(&mut l);
            assert_eq!(field_of(l.validate().unwrap_err()), field, "{l:?}");
        }
    }

    #[test]
    fn limits_read_from_json_with_human_durations_and_defaults() {
        let l: NbdLimits = serde_json::from_str(r#"{"max_connections": 8, "handshake_timeout": "3s"}"#).unwrap();
        assert_eq!(l.max_connections, 8);
        assert_eq!(l.handshake_timeout, Duration::from_secs(3));
        assert_eq!(l.idle_timeout, NbdLimits::default().idle_timeout);
        assert!(serde_json::from_str::<NbdLimits>(r#"{"max_conections": 8}"#).is_err(), "a misspelt field is refused");
    }
}
