//! Errors and their retry class.
//!
//! Every error that crosses a boundary of the engine carries an [`ErrorClass`]
//! decided where the I/O happened: the code that saw the failure knows best
//! whether a retry can help. The VM core turns classes into actions
//! (retry with backoff, `ResyncRequired`, `Critical`), the gRPC layer turns
//! them into status codes.

use std::io;

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorClass {
    /// Transient: network, timeouts, target throttling, low space or memory. Retry with backoff.
    Recoverable,
    /// The replica can no longer be advanced by logs: resynchronize.
    NeedsResync,
    /// An operator must act: bad input, missing VM or disk, auth failure, broken chain.
    NonRecoverable,
    /// The operation was cancelled (shutdown, unprotect); nothing to do.
    Cancelled,
}

/// The kind of a non-I/O failure, so that callers (the gRPC layer) can map it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Io,
    Corrupt,
    Unauthenticated,
    PermissionDenied,
    Internal,
    Cancelled,
}

/// The engine's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input from a caller; `field` names what was wrong.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{what} not found: {name}")]
    NotFound { what: &'static str, name: String },
    #[error("{what} already exists: {name}")]
    AlreadyExists { what: &'static str, name: String },
    /// The operation does not fit the current state (e.g. restore with no recovery point).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A write to a disk that takes none (its VM failed over): a
    /// FailedPrecondition that NBD answers with EPERM.
    #[error("{0}")]
    WritesRefused(String),
    /// A file or device operation failed; `context` says which one.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
        class: ErrorClass,
    },
    /// Data failed verification (checksum, magic, chain): never trusted.
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String, class: ErrorClass },
    /// The target refused our credentials.
    #[error("target authentication failed: {0}")]
    Unauthenticated(String),
    /// A path the daemon may not use (`disk_roots`); the text names it and the rule.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { field, reason: reason.into() }
    }

    pub fn not_found(what: &'static str, name: impl Into<String>) -> Self {
        Error::NotFound { what, name: name.into() }
    }

    /// An I/O error on local files: classified from the OS error.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let class = classify_io(&source);
        Error::Io { context: context.into(), source, class }
    }

    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into(), reason: reason.into(), class: ErrorClass::NeedsResync }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Error::InvalidArgument { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::FailedPrecondition(_)
            | Error::WritesRefused(_)
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::Internal(_) => ErrorClass::NonRecoverable,
            Error::Io { class, .. } | Error::Corrupt { class, .. } => *class,
            Error::Cancelled(_) => ErrorClass::Cancelled,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::FailedPrecondition(_) | Error::WritesRefused(_) => ErrorKind::FailedPrecondition,
            Error::Io { .. } => ErrorKind::Io,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Error::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Cancelled(_) => ErrorKind::Cancelled,
        }
    }
}

/// Local I/O: out of space or memory and interruptions pass; a missing file,
/// a permission problem or a bad descriptor needs an operator.
pub fn classify_io(e: &io::Error) -> ErrorClass {
    use io::ErrorKind as K;
    match e.kind() {
        K::NotFound | K::PermissionDenied | K::InvalidInput | K::InvalidData | K::Unsupported => {
            ErrorClass::NonRecoverable
        }
        _ => match e.raw_os_error() {
            Some(libc::EBADF) | Some(libc::EROFS) => ErrorClass::NonRecoverable,
            _ => ErrorClass::Recoverable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified_where_they_happen() {
        let cases = [
            (io::Error::from_raw_os_error(libc::ENOSPC), ErrorClass::Recoverable),
            (io::Error::from_raw_os_error(libc::ENOMEM), ErrorClass::Recoverable),
            (io::Error::from_raw_os_error(libc::ETIMEDOUT), ErrorClass::Recoverable),
            (io::Error::from_raw_os_error(libc::ENOENT), ErrorClass::NonRecoverable),
            (io::Error::from_raw_os_error(libc::EACCES), ErrorClass::NonRecoverable),
            (io::Error::from_raw_os_error(libc::EROFS), ErrorClass::NonRecoverable),
        ];
        for (err, class) in cases {
            let shown = err.to_string();
            assert_eq!(Error::io("write", err).class(), class, "{shown}");
        }
        assert_eq!(Error::corrupt("log", "bad crc").class(), ErrorClass::NeedsResync);
        assert_eq!(Error::invalid("vm", "empty").class(), ErrorClass::NonRecoverable);
    }
}
