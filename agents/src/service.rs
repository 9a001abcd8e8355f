//! The `ferry.v1.Ferry` gRPC service: validates wire input, calls the
//! engine, converts the answer. Field-level checks that need no state
//! happen here so a bad request never reaches the engine.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_engine::model::{DiskSpec, VmSpec, DEFAULT_UPLOAD_WORKERS};
use ferry_engine::{Engine, PointSelector};
use ferry_proto::v1 as pb;
use ferry_proto::v1::ferry_server::Ferry;
use tonic::{Request, Response, Status};

use crate::convert::{self, status};
use crate::units;

pub struct FerryService {
    engine: Arc<Engine>,
}

impl FerryService {
    pub fn new(engine: Arc<Engine>) -> Self {
        FerryService { engine }
    }

    /// A VM on the wire, with the target its replica goes to.
    fn vm(&self, info: ferry_engine::VmInfo) -> pb::Vm {
        pb::Vm { target: self.engine.target_description(), ..convert::vm(info) }
    }

    fn throttle(&self) -> pb::Throttle {
        let p = self.engine.bandwidth_policy();
        pb::Throttle {
            work_hours: p.schedule.hours_string(),
            work_days: p.schedule.days_string(),
            work_limit: units::format_bandwidth(p.work_limit_bps),
            off_limit: units::format_bandwidth(p.off_limit_bps),
            limit_now: units::format_bandwidth(self.engine.bandwidth_limit()),
        }
    }
}

fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("invalid {field}: {why}"))
}

/// Turns a ProtectVm request into a spec; names the bad field.
pub fn spec_from(req: pb::ProtectVmRequest) -> Result<VmSpec, Status> {
    let frequency = if req.frequency.trim().is_empty() {
        ferry_engine::model::DEFAULT_FREQUENCY
    } else {
        units::parse_duration(&req.frequency).map_err(|e| invalid("frequency", e))?
    };
    let disks = req
        .disks
        .into_iter()
        .map(|d| {
            if d.path.is_empty() {
                return Err(invalid("disk path", format!("disk {:?} has no path", d.name)));
            }
            let path = PathBuf::from(&d.path);
            if !path.is_absolute() {
                return Err(invalid("disk path", format!("{} must be absolute (the daemon resolves it)", d.path)));
            }
            Ok(DiskSpec { name: d.name, path })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let workers = if req.upload_workers == 0 { DEFAULT_UPLOAD_WORKERS } else { req.upload_workers as usize };
    let spec = VmSpec { name: req.name, disks, frequency, upload_workers: workers };
    spec.validate().map_err(status)?;
    Ok(spec)
}

#[tonic::async_trait]
impl Ferry for FerryService {
    async fn protect_vm(&self, req: Request<pb::ProtectVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let spec = spec_from(req.into_inner())?;
        let info = self.engine.protect(spec).await.map_err(status)?;
        Ok(Response::new(self.vm(info)))
    }

    async fn unprotect_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::UnprotectVmResponse>, Status> {
        self.engine.unprotect(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(pb::UnprotectVmResponse {}))
    }

    async fn get_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let info = self.engine.vm(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(self.vm(info)))
    }

    async fn list_vms(&self, _req: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.engine.list().await.map_err(status)?;
        Ok(Response::new(pb::ListVmsResponse { vms: vms.into_iter().map(|i| self.vm(i)).collect() }))
    }

    async fn pause_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let info = self.engine.pause(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(self.vm(info)))
    }

    async fn resume_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let info = self.engine.resume(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(self.vm(info)))
    }

    async fn replicate_now(&self, req: Request<pb::VmRef>) -> Result<Response<pb::ReplicateNowResponse>, Status> {
        let name = req.into_inner().name;
        let created = self.engine.replicate_now(&name).await.map_err(status)?;
        let (point, created) = match created {
            Some(p) => (Some(p), true),
            // Nothing new: the latest point already holds every acknowledged write.
            None => (self.engine.recovery_points(&name).await.map_err(status)?.pop(), false),
        };
        Ok(Response::new(pb::ReplicateNowResponse { point: point.map(convert::point), created }))
    }

    async fn list_recovery_points(
        &self,
        req: Request<pb::VmRef>,
    ) -> Result<Response<pb::ListRecoveryPointsResponse>, Status> {
        let points = self.engine.recovery_points(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(pb::ListRecoveryPointsResponse { points: points.into_iter().map(convert::point).collect() }))
    }

    async fn test_failover(&self, req: Request<pb::TestFailoverRequest>) -> Result<Response<pb::Job>, Status> {
        let req = req.into_inner();
        let out = absolute_out_dir(&req.out_dir)?;
        let sel = if req.recovery_point == 0 { PointSelector::Latest } else { PointSelector::Seq(req.recovery_point) };
        let id = self.engine.test_failover(&req.vm, sel, &out).await.map_err(status)?;
        Ok(Response::new(convert::job(self.engine.job(id).await.map_err(status)?)))
    }

    async fn failover(&self, req: Request<pb::FailoverRequest>) -> Result<Response<pb::Job>, Status> {
        let req = req.into_inner();
        let out = absolute_out_dir(&req.out_dir)?;
        let sel = if req.recovery_point == 0 { PointSelector::Latest } else { PointSelector::Seq(req.recovery_point) };
        let id = self.engine.failover(&req.vm, sel, &out, !req.unplanned).await.map_err(status)?;
        Ok(Response::new(convert::job(self.engine.job(id).await.map_err(status)?)))
    }

    async fn resync_vm(&self, req: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let info = self.engine.resync(&req.into_inner().name).await.map_err(status)?;
        Ok(Response::new(self.vm(info)))
    }

    async fn get_throttle(&self, _req: Request<pb::GetThrottleRequest>) -> Result<Response<pb::Throttle>, Status> {
        Ok(Response::new(self.throttle()))
    }

    async fn set_throttle(&self, req: Request<pb::Throttle>) -> Result<Response<pb::Throttle>, Status> {
        let req = req.into_inner();
        let mut p = self.engine.bandwidth_policy();
        if !req.work_hours.is_empty() || !req.work_days.is_empty() {
            let hours = if req.work_hours.is_empty() { p.schedule.hours_string() } else { req.work_hours.clone() };
            let days = if req.work_days.is_empty() { p.schedule.days_string() } else { req.work_days.clone() };
            p.schedule = ferry_engine::schedule::WorkSchedule::parse(&hours, &days).map_err(status)?;
        }
        if !req.work_limit.is_empty() {
            p.work_limit_bps = units::parse_bandwidth(&req.work_limit).map_err(|e| invalid("work_limit", e))?;
        }
        if !req.off_limit.is_empty() {
            p.off_limit_bps = units::parse_bandwidth(&req.off_limit).map_err(|e| invalid("off_limit", e))?;
        }
        self.engine.set_bandwidth_policy(p).map_err(status)?;
        Ok(Response::new(self.throttle()))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(convert::job(self.engine.job(req.into_inner().id).await.map_err(status)?)))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let vm = req.into_inner().vm;
        let jobs = self.engine.jobs().await.map_err(status)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().filter(|j| vm.is_empty() || j.vm == vm).map(convert::job).collect(),
        }))
    }
}

/// The output folder of a (test) failover: given, and absolute (the daemon resolves it).
fn absolute_out_dir(out_dir: &str) -> Result<PathBuf, Status> {
    if out_dir.is_empty() {
        return Err(invalid("out_dir", "an output folder is required"));
    }
    let out = PathBuf::from(out_dir);
    if !out.is_absolute() {
        return Err(invalid("out_dir", format!("{out_dir} must be absolute (the daemon resolves it)")));
    }
    Ok(out)
}
