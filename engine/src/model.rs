//! The nouns of the domain: names, VM and disk specifications, recovery points, jobs.
//!
//! Names of VMs and disks become parts of file names, object keys and NBD
//! export names (`<vm>/<disk>`), so they are validated once, here, and are
//! plain strings of `[A-Za-z0-9._-]` everywhere after that.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest VM or disk name accepted (it must fit the change-log header field).
pub const MAX_NAME_LEN: usize = crate::changelog::MAX_ID_LEN;

/// Checks a VM or disk name: 1..=62 of `[A-Za-z0-9._-]`, not starting with a
/// dot or dash (so `..`, `.hidden` and `-flag` are refused).
pub fn validate_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(field, format!("{name:?} is longer than {MAX_NAME_LEN} bytes")));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::invalid(field, format!("{name:?} contains {c:?}; use letters, digits, '.', '_' and '-'")));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(Error::invalid(field, format!("{name:?} must not start with '.' or '-'")));
    }
    Ok(())
}

/// One disk of a protected VM: a raw image file on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Name within the VM; part of the NBD export name and of object keys.
    pub name: String,
    /// The raw image. Change logs live beside it, in the same folder.
    pub path: PathBuf,
}

/// Replication frequency presets of the policy (any duration >= 1 s is accepted).
pub const FREQUENCY_PRESETS: [Duration; 3] =
    [Duration::from_secs(30), Duration::from_secs(300), Duration::from_secs(900)];
/// Shortest accepted replication frequency.
pub const MIN_FREQUENCY: Duration = Duration::from_secs(1);
/// Default replication frequency: 5 minutes, as Hyper-V Replica.
pub const DEFAULT_FREQUENCY: Duration = Duration::from_secs(300);

/// What an operator asks to protect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub disks: Vec<DiskSpec>,
    /// How often a recovery point is cut (>= 1 s; presets 30 s, 5 min, 15 min).
    #[serde(with = "humantime_serde")]
    pub frequency: Duration,
    /// Upload workers for this VM: default 4, 1..=32.
    pub upload_workers: usize,
}

/// Default and bound of [`VmSpec::upload_workers`].
pub const DEFAULT_UPLOAD_WORKERS: usize = 4;
pub const MAX_UPLOAD_WORKERS: usize = 32;

impl VmSpec {
    pub fn new(name: impl Into<String>, disks: Vec<DiskSpec>) -> Self {
        VmSpec { name: name.into(), disks, frequency: DEFAULT_FREQUENCY, upload_workers: DEFAULT_UPLOAD_WORKERS }
    }

    pub fn with_frequency(mut self, frequency: Duration) -> Self {
        self.frequency = frequency;
        self
    }

    /// Checks everything that does not need the file system; names the bad field.
    pub fn validate(&self) -> Result<()> {
        validate_name("vm name", &self.name)?;
        if self.disks.is_empty() {
            return Err(Error::invalid("disks", "a VM needs at least one disk"));
        }
        let mut seen_names = std::collections::HashSet::new();
        let mut seen_paths = std::collections::HashSet::new();
        for d in &self.disks {
            validate_name("disk name", &d.name)?;
            if !seen_names.insert(d.name.as_str()) {
                return Err(Error::invalid("disk name", format!("{:?} is used twice", d.name)));
            }
            if d.path.as_os_str().is_empty() {
                return Err(Error::invalid("disk path", format!("disk {:?} has an empty path", d.name)));
            }
            if !seen_paths.insert(d.path.clone()) {
                return Err(Error::invalid("disk path", format!("{} is listed twice", d.path.display())));
            }
        }
        if self.frequency < MIN_FREQUENCY {
            return Err(Error::invalid(
                "frequency",
                format!("{:?} is below the minimum of 1s (presets: 30s, 5m, 15m)", self.frequency),
            ));
        }
        if !(1..=MAX_UPLOAD_WORKERS).contains(&self.upload_workers) {
            return Err(Error::invalid(
                "upload_workers",
                format!("{} is outside 1..={MAX_UPLOAD_WORKERS}", self.upload_workers),
            ));
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch: how times are stored and shown.
pub type UnixMillis = u64;

pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A committed recovery point, as kept in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPoint {
    pub vm: String,
    /// Increasing per VM, starting at 1 (the initial replication's point).
    pub seq: u64,
    /// Moment the disks were captured: snapshot time or log rotation time.
    pub time_ms: UnixMillis,
    /// Target key of the manifest (the commit record).
    pub manifest_key: String,
    /// Logical bytes the point added (uncompressed), and bytes stored.
    pub bytes_logical: u64,
    pub bytes_stored: u64,
    pub kind: PointKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointKind {
    /// Full copy of the disks (initial replication or resync).
    Base,
    /// Changes on top of the previous point.
    Delta,
}

pub type JobId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    InitialReplication,
    DeltaReplication,
    Resync,
    TestFailover,
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A long operation and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub vm: String,
    pub kind: JobKind,
    pub status: JobStatus,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub started_ms: UnixMillis,
    pub ended_ms: Option<UnixMillis>,
    pub error: Option<String>,
    /// What the job produced or targeted, e.g. the recovery point seq or output folder.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["vm1", "a", "web-01.prod", "disk_0", &"x".repeat(62)] {
            validate_name("vm name", ok).unwrap();
        }
        for bad in ["", "..", "../x", "a/b", ".hidden", "-rf", "a b", "é", &"x".repeat(63), "a\0b"] {
            let e = validate_name("vm name", bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid vm name"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn spec_validation_names_the_field() {
        let disk = |n: &str, p: &str| DiskSpec { name: n.into(), path: p.into() };
        let ok = VmSpec::new("vm", vec![disk("a", "/x/a.img"), disk("b", "/x/b.img")]);
        ok.validate().unwrap();
        let cases: Vec<(VmSpec, &str)> = vec![
            (VmSpec::new("vm", vec![]), "disks"),
            (VmSpec::new("v/m", vec![disk("a", "/a")]), "vm name"),
            (VmSpec::new("vm", vec![disk("..", "/a")]), "disk name"),
            (VmSpec::new("vm", vec![disk("a", "/a"), disk("a", "/b")]), "disk name"),
            (VmSpec::new("vm", vec![disk("a", "/a"), disk("b", "/a")]), "disk path"),
            (VmSpec::new("vm", vec![disk("a", "/a")]).with_frequency(Duration::ZERO), "frequency"),
            (VmSpec { upload_workers: 33, ..ok.clone() }, "upload_workers"),
            (VmSpec { upload_workers: 0, ..ok.clone() }, "upload_workers"),
        ];
        for (spec, field) in cases {
            let e = spec.validate().unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { field: f, .. } if f == field), "{field}: {e}");
        }
    }
}
