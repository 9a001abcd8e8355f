//! Jobs: long operations with an id and live progress.
//!
//! A running job's counters are atomics shared with the task doing the work;
//! the job is persisted when it starts and when it ends, so `jobs` after a
//! restart shows what ran (a job that was running when the daemon stopped
//! is shown as failed: interrupted).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::model::{now_millis, Job, JobId, JobKind, JobStatus};
use crate::state::StateStore;

/// The counters a running job's task updates.
#[derive(Clone)]
pub struct JobProgress {
    pub id: JobId,
    pub done: Arc<AtomicU64>,
    pub total: Arc<AtomicU64>,
}

pub struct Jobs {
    state: StateStore,
    running: Mutex<BTreeMap<JobId, (Job, JobProgress)>>,
}

impl Jobs {
    /// Loads finished jobs; jobs left running by a previous process are marked interrupted.
    pub fn open(state: StateStore) -> Result<Self> {
        for mut job in state.list_jobs()? {
            if job.status == JobStatus::Running {
                job.status = JobStatus::Failed;
                job.error = Some("interrupted: the daemon stopped while the job ran".into());
                job.ended_ms = Some(now_millis());
                state.put_job(&job)?;
            }
        }
        Ok(Jobs { state, running: Mutex::new(BTreeMap::new()) })
    }

    pub fn start(&self, vm: &str, kind: JobKind, total: u64, detail: String) -> Result<JobProgress> {
        let id = self.state.next_job_id()?;
        let job = Job {
            id,
            vm: vm.to_string(),
            kind,
            status: JobStatus::Running,
            bytes_done: 0,
            bytes_total: total,
            started_ms: now_millis(),
            ended_ms: None,
            error: None,
            detail,
        };
        self.state.put_job(&job)?;
        let p = JobProgress { id, done: Arc::new(AtomicU64::new(0)), total: Arc::new(AtomicU64::new(total)) };
        self.running.lock().expect("jobs lock").insert(id, (job, p.clone()));
        Ok(p)
    }

    /// Ends a job; `detail` replaces the job's detail when given.
    pub fn finish(&self, id: JobId, outcome: std::result::Result<Option<String>, (JobStatus, String)>) {
        let Some((mut job, p)) = self.running.lock().expect("jobs lock").remove(&id) else {
            return;
        };
        job.bytes_done = p.done.load(Ordering::Relaxed);
        job.bytes_total = p.total.load(Ordering::Relaxed);
        job.ended_ms = Some(now_millis());
        match outcome {
            Ok(detail) => {
                job.status = JobStatus::Succeeded;
                if let Some(d) = detail {
                    job.detail = d;
                }
            }
            Err((status, error)) => {
                job.status = status;
                job.error = Some(error);
            }
        }
        if let Err(e) = self.state.put_job(&job) {
            tracing::warn!(job = id, error = %e, "could not persist job end");
        }
    }

    fn live(job: &Job, p: &JobProgress) -> Job {
        Job { bytes_done: p.done.load(Ordering::Relaxed), bytes_total: p.total.load(Ordering::Relaxed), ..job.clone() }
    }

    pub fn get(&self, id: JobId) -> Result<Option<Job>> {
        if let Some((job, p)) = self.running.lock().expect("jobs lock").get(&id) {
            return Ok(Some(Self::live(job, p)));
        }
        Ok(self.state.list_jobs()?.into_iter().find(|j| j.id == id))
    }

    /// All kept jobs, oldest first, running ones with live progress.
    pub fn list(&self) -> Result<Vec<Job>> {
        let running = self.running.lock().expect("jobs lock");
        let mut jobs = self.state.list_jobs()?;
        for j in &mut jobs {
            if let Some((job, p)) = running.get(&j.id) {
                *j = Self::live(job, p);
            }
        }
        Ok(jobs)
    }
}
