//! Wire <-> domain conversion, and engine errors -> gRPC status.

use ferry_engine::lifecycle::Transition;
use ferry_engine::model::{Job, PointKind, RecoveryPoint};
use ferry_engine::{Error, ErrorClass, VmInfo};
use ferry_proto::v1 as pb;
use tonic::{Code, Status};

use crate::units;

/// Maps an engine error to a status: bad input is `InvalidArgument` (the
/// message names the field), missing things `NotFound`, wrong state
/// `FailedPrecondition`; transient I/O is `Unavailable` (a retry can help).
pub fn status(e: Error) -> Status {
    use ferry_engine::error::ErrorKind as K;
    let code = match e.kind() {
        K::InvalidArgument => Code::InvalidArgument,
        K::NotFound => Code::NotFound,
        K::AlreadyExists => Code::AlreadyExists,
        K::FailedPrecondition => Code::FailedPrecondition,
        K::Unauthenticated => Code::Unauthenticated,
        K::PermissionDenied => Code::PermissionDenied,
        K::Cancelled => Code::Cancelled,
        K::Corrupt => Code::DataLoss,
        K::Internal => Code::Internal,
        K::Io if e.class() == ErrorClass::Recoverable => Code::Unavailable,
        K::Io => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub fn vm(v: VmInfo) -> pb::Vm {
    pb::Vm {
        name: v.spec.name.clone(),
        state: v.state.to_string(),
        reason: v.reason.unwrap_or_default(),
        frequency: units::format_duration(v.spec.frequency),
        upload_workers: v.spec.upload_workers as u32,
        disks: v
            .disks
            .into_iter()
            .map(|d| pb::Disk {
                name: d.name,
                path: d.path.display().to_string(),
                size: d.size,
                export: d.export,
                active_log_bytes: d.active_log_bytes,
                pending_log_bytes: d.pending_log_bytes,
                snapshot_bytes: d.snapshot_bytes,
            })
            .collect(),
        last_recovery_point: v.last_point_seq,
        transitions: v.transitions.into_iter().map(transition).collect(),
        // The service fills it in (the engine knows its target, a VmInfo does not).
        target: String::new(),
        failover: v.failover.map(|f| pb::FailoverInfo {
            planned: f.planned,
            recovery_point: f.point,
            out_dir: f.out_dir.display().to_string(),
            at_ms: f.at_ms,
        }),
    }
}

fn transition(t: Transition) -> pb::Transition {
    pb::Transition { from: t.from.to_string(), to: t.to.to_string(), reason: t.reason, at_ms: t.at_ms }
}

/// "base" or "delta", as the API and ferryctl name them.
pub fn point_kind(k: PointKind) -> &'static str {
    match k {
        PointKind::Base => "base",
        PointKind::Delta => "delta",
    }
}

pub fn point(p: RecoveryPoint) -> pb::RecoveryPoint {
    pb::RecoveryPoint {
        seq: p.seq,
        time_ms: p.time_ms,
        kind: point_kind(p.kind).into(),
        bytes_logical: p.bytes_logical,
        bytes_stored: p.bytes_stored,
    }
}

pub fn job(j: Job) -> pb::Job {
    pb::Job {
        id: j.id,
        vm: j.vm,
        kind: format!("{:?}", j.kind),
        status: format!("{:?}", j.status),
        bytes_done: j.bytes_done,
        bytes_total: j.bytes_total,
        started_ms: j.started_ms,
        ended_ms: j.ended_ms.unwrap_or(0),
        error: j.error.unwrap_or_default(),
        detail: j.detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_classes_map_to_codes() {
        let cases = [
            (Error::invalid("vm name", "bad"), Code::InvalidArgument),
            (Error::not_found("VM", "x"), Code::NotFound),
            (Error::AlreadyExists { what: "VM", name: "x".into() }, Code::AlreadyExists),
            (Error::FailedPrecondition("no point".into()), Code::FailedPrecondition),
            (Error::io("put", std::io::Error::from_raw_os_error(28)), Code::Unavailable),
            (Error::corrupt("object", "checksum"), Code::DataLoss),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = status(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
    }
}
