//! The engine handle: the public API for daemons and provider processes.
//!
//! [`Engine::open`] starts the actor system on a thread of its own (actix
//! actors need an arbiter; the caller's tokio runtime runs the I/O tasks)
//! and resumes every VM found in the state store.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::capture::disk::Disk;
use crate::config::{EngineConfig, TargetConfig};
use crate::disk_roots::DiskRoots;
use crate::error::{Error, ErrorClass, Result};
use crate::host::{DiskRegistry, Host};
use crate::model::{now_millis, DiskSpec, Job, JobId, JobKind, JobStatus, RecoveryPoint, VmSpec};
use crate::restore::{self, RestoredDisk};
use crate::runtime::blocking;
use crate::schedule::throttle::{BandwidthPolicy, Throttle};
use crate::state::jobs::Jobs;
use crate::state::{StateStore, VmRecord};
use crate::supervisor::{All, Lookup, StartVm, StopVm, Supervisor};
use crate::target::unreliable::{Faults, UnreliableTarget};
use crate::target::{BlobTarget, LocalTarget, Target};
use crate::vm::lifecycle::{Event, Lifecycle, VmState};
use crate::vm::{self, GetInfo, Operator, ReplicateNow, VmActor, VmInfo};

/// Which recovery point to restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSelector {
    Latest,
    Seq(u64),
}

pub struct Engine {
    host: Arc<Host>,
    supervisor: Addr<Supervisor>,
    system: std::sync::Mutex<Option<(actix_rt::System, std::thread::JoinHandle<()>)>>,
    /// One lock per VM name (one entry per name ever used), held by
    /// protect, unprotect and failover: each
    /// reads the VM's record, decides, then changes the record, the actor
    /// and the files beside the disks, so two at once could undo each other
    /// (an unprotect deleting what a protect just made).
    vm_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held by protect from its disk check to its record: two VMs never
    /// protect one disk.
    membership: tokio::sync::Mutex<()>,
    /// Output folders a restore is writing into now.
    outputs: Arc<std::sync::Mutex<HashSet<PathBuf>>>,
    /// Where disks and outputs may be (`crate::disk_roots`).
    disk_roots: DiskRoots,
}

/// An output folder claimed by one restore until it is dropped.
struct OutputClaim {
    outputs: Arc<std::sync::Mutex<HashSet<PathBuf>>>,
    dir: PathBuf,
}

impl Drop for OutputClaim {
    fn drop(&mut self) {
        self.outputs.lock().expect("outputs lock").remove(&self.dir);
    }
}

fn mailbox<T>(r: std::result::Result<T, MailboxError>) -> Result<T> {
    r.map_err(|e| Error::Internal(format!("actor mailbox: {e}")))
}

impl Engine {
    /// Opens the state store and target, starts the actors and resumes every
    /// protected VM. Must be called within a tokio runtime, which then runs
    /// the engine's I/O tasks.
    pub async fn open(config: EngineConfig) -> Result<Engine> {
        Engine::open_with_clock(config, Arc::new(crate::clock::SystemClock)).await
    }

    /// [`Engine::open`] on a given policy clock (tests and the simulator run
    /// policy time fast with [`crate::clock::AcceleratedClock`]).
    pub async fn open_with_clock(config: EngineConfig, clock: Arc<dyn crate::clock::Clock>) -> Result<Engine> {
        config.validate()?;
        crate::runtime::set_background_nice(config.background_nice);
        crate::capture::held::set_memory_budget(config.held_memory);
        let data_dir = config.data_dir.clone();
        crate::paths::create_private_dirs(&data_dir)
            .map_err(|e| Error::io(format!("create data folder {}", data_dir.display()), e))?;
        let local_target = match config.target() {
            TargetConfig::Local { path } => Some(path),
            TargetConfig::Blob { .. } => None,
        };
        let mut own: Vec<(&Path, &'static str)> = vec![(&data_dir, "data folder")];
        own.extend(local_target.as_deref().map(|p| (p, "local target")));
        let disk_roots = DiskRoots::new(&config.disk_roots, &own)?;
        // An engine of this process that was just dropped may still be
        // letting go of the store: give it a moment before refusing.
        let path = crate::paths::DataDir::new(&data_dir).state_store();
        let mut waited = 0;
        let state = loop {
            let p = path.clone();
            match blocking(move || StateStore::open(&p)).await {
                Err(Error::FailedPrecondition(_)) if waited < 40 => {
                    waited += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => break other?,
            }
        };
        let mut target: Target = match config.target() {
            TargetConfig::Local { path } => {
                let local = LocalTarget::open(path)?;
                let st = state.clone();
                let ours = blocking(move || st.list_vms()).await?;
                let ours: Vec<_> = ours.into_iter().map(|r| (r.spec.name, r.generation)).collect();
                local.adopt_unhosted_replicas(&config.resolve_host_id()?, &ours)?;
                Arc::new(local)
            }
            TargetConfig::Blob { url, options, create } => {
                Arc::new(BlobTarget::open(&url.parse()?, &options, create).await?)
            }
        };
        target = crate::target::for_host(target, config.encryption_key.as_ref(), &config.resolve_host_id()?)?;
        let unreliable = match &config.faults {
            Some(f) => {
                let u = UnreliableTarget::new(target, f.clone())?;
                target = u.clone();
                Some(u)
            }
            None => None,
        };
        let jobs = {
            let s = state.clone();
            blocking(move || Jobs::open(s)).await?
        };
        let host = Arc::new(Host {
            throttle: Arc::new(Throttle::with_clock(config.bandwidth.clone(), clock.clone())?),
            clock,
            unreliable,
            config,
            state,
            target,
            jobs,
            disks: Arc::new(DiskRegistry::default()),
            runtime: tokio::runtime::Handle::current(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let sup_host = host.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-actors".into())
            .spawn(move || {
                let sys = actix_rt::System::new();
                let addr = sys.block_on(async move { Supervisor::new(sup_host).start() });
                let _ = tx.send((addr, actix_rt::System::current()));
                let _ = sys.run();
            })
            .map_err(|e| Error::io("start actor thread", e))?;
        let (supervisor, system) = rx.recv().map_err(|_| Error::Internal("actor system did not start".into()))?;
        let engine = Engine {
            host,
            supervisor,
            system: std::sync::Mutex::new(Some((system, thread))),
            vm_locks: Default::default(),
            membership: Default::default(),
            outputs: Default::default(),
            disk_roots,
        };
        engine.resume_all().await?;
        Ok(engine)
    }

    async fn resume_all(&self) -> Result<()> {
        let state = self.host.state.clone();
        for rec in blocking(move || state.list_vms()).await? {
            let name = rec.spec.name.clone();
            let (dd, now) = (self.host.config.data_dir.clone(), self.host.clock.now_ms());
            let key = self.host.config.encryption_key.as_ref().map(|k| k.id_hex());
            let opened = blocking(move || {
                check_sealing(&rec, key.as_deref())?;
                let mut r = rec.clone();
                let opened = vm::open_vm(&mut r, &dd, now)?;
                Ok((r, opened))
            })
            .await;
            let (rec, opened) = match opened {
                Ok(o) => o,
                Err(e) => {
                    // The VM stays known (and Critical) so an operator sees why.
                    tracing::error!(vm = %name, error = %e, "cannot resume VM");
                    let (state, reason, now) = (self.host.state.clone(), e.to_string(), self.host.clock.now_ms());
                    blocking(move || {
                        state.update_vm(&name, |r| {
                            r.lifecycle.on_event(Event::Failed { class: ErrorClass::NonRecoverable, reason }, now);
                        })
                    })
                    .await?;
                    continue;
                }
            };
            // The decision may have started protection over, or recorded a committed base.
            let (state, r) = (self.host.state.clone(), rec.clone());
            blocking(move || state.put_vm(&r)).await?;
            mailbox(self.supervisor.send(StartVm { rec, opened }).await)??;
        }
        Ok(())
    }

    /// Starts protecting a VM: validates it, opens its disks, records it and
    /// starts initial replication. Nothing is created when it fails. A VM
    /// that is `FailedOver` is protected anew: its earlier protection ends
    /// first (as by unprotect; its replica is kept), once the new disks
    /// are found and free, so it is gone even if the new protection then
    /// fails.
    pub async fn protect(&self, mut spec: VmSpec) -> Result<VmInfo> {
        spec.validate()?;
        for d in &mut spec.disks {
            d.path = self.disk_roots.check_disk(&d.path)?;
            crate::capture::disk::open_image(&d.path)?;
        }
        spec.validate()?; // again: two spellings of one file are now the same path
        let _vm = self.lock_vm(&spec.name).await;
        let _membership = self.membership.lock().await;
        // A restore under way would replace the file under the protection.
        if let Some(d) = spec
            .disks
            .iter()
            .find(|d| d.path.parent().is_some_and(|dir| self.outputs.lock().expect("outputs lock").contains(dir)))
        {
            return Err(Error::FailedPrecondition(format!(
                "a restore is writing into the folder of {}: protect it once the restore has ended",
                d.path.display()
            )));
        }
        let (state, s) = (self.host.state.clone(), spec.clone());
        let replaces_failed_over = blocking(move || {
            // A VM that failed over is protected anew (its old replica is kept,
            // as after unprotect): typically from the disks it failed over to.
            let replaces = match state.get_vm(&s.name)? {
                Some(r) if r.lifecycle.state == VmState::FailedOver => true,
                Some(_) => return Err(Error::AlreadyExists { what: "VM", name: s.name.clone() }),
                None => false,
            };
            for other in state.list_vms()?.into_iter().filter(|o| !(replaces && o.spec.name == s.name)) {
                for d in &s.disks {
                    if other.spec.disks.iter().any(|o| o.path == d.path) {
                        return Err(Error::AlreadyExists {
                            what: "protected disk",
                            name: format!("{} (VM {})", d.path.display(), other.spec.name),
                        });
                    }
                }
            }
            Ok(replaces)
        })
        .await?;
        if replaces_failed_over {
            tracing::info!(vm = %spec.name, "protecting a failed-over VM again: its earlier protection ends");
            self.unprotect_locked(&spec.name).await?;
        }
        let rec = VmRecord {
            spec: spec.clone(),
            generation: now_millis(),
            lifecycle: Lifecycle::default(),
            last_point_seq: 0,
            protected_since_ms: 0,
            key_id: self.host.config.encryption_key.as_ref().map(|k| k.id_hex()),
            failover_restored: Vec::new(),
        };
        let (mut r, dd, now) = (rec.clone(), self.host.config.data_dir.clone(), self.host.clock.now_ms());
        let opened = match blocking(move || vm::open_vm(&mut r, &dd, now)).await {
            Ok(o) => o,
            Err(e) => {
                for d in &spec.disks {
                    remove_fresh_logs(&d.path, &spec.name);
                }
                return Err(e);
            }
        };
        let (state, r) = (self.host.state.clone(), rec.clone());
        if let Err(e) = blocking(move || state.insert_vm(&r)).await {
            for d in &spec.disks {
                remove_fresh_logs(&d.path, &spec.name);
            }
            return Err(e);
        }
        mailbox(self.supervisor.send(StartVm { rec, opened }).await)??;
        self.vm(&spec.name).await
    }

    async fn actor(&self, name: &str) -> Result<Addr<VmActor>> {
        mailbox(self.supervisor.send(Lookup(name.to_string())).await)?.ok_or_else(|| Error::not_found("VM", name))
    }

    /// Stops protecting a VM: its change logs are deleted; the replica on the
    /// target is kept (it can still be restored with the target's tools).
    pub async fn unprotect(&self, name: &str) -> Result<()> {
        crate::model::validate_name("vm name", name)?;
        let _vm = self.lock_vm(name).await;
        self.unprotect_locked(name).await
    }

    /// [`Engine::unprotect`], under the VM's lock.
    async fn unprotect_locked(&self, name: &str) -> Result<()> {
        match mailbox(self.supervisor.send(StopVm { name: name.to_string(), unprotect: true }).await)? {
            // Known but not running (its disks could not be opened): only its record goes.
            Err(Error::NotFound { .. }) => {
                let (state, n) = (self.host.state.clone(), name.to_string());
                if blocking(move || state.get_vm(&n)).await?.is_none() {
                    return Err(Error::not_found("VM", name));
                }
            }
            r => r?,
        }
        let (state, n) = (self.host.state.clone(), name.to_string());
        let kept_hashes = self.host.config.paths().vm_hashes(name);
        let progress = self.host.config.paths().copy_progress(name);
        blocking(move || {
            state.delete_vm(&n)?;
            crate::replicate::progress::remove(&progress)?;
            match std::fs::remove_dir_all(&kept_hashes) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("remove {}", kept_hashes.display()), e))
                }
                _ => Ok(()),
            }
        })
        .await
    }

    pub async fn vm(&self, name: &str) -> Result<VmInfo> {
        crate::model::validate_name("vm name", name)?;
        match mailbox(self.supervisor.send(Lookup(name.to_string())).await)? {
            Some(a) => mailbox(a.send(GetInfo).await),
            None => {
                // Known but not running (its disks could not be opened).
                let (state, n) = (self.host.state.clone(), name.to_string());
                let rec = blocking(move || state.get_vm(&n)).await?.ok_or_else(|| Error::not_found("VM", name))?;
                Ok(offline_info(rec))
            }
        }
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>> {
        let state = self.host.state.clone();
        let recs = blocking(move || state.list_vms()).await?;
        let running = mailbox(self.supervisor.send(All).await)?;
        let mut out = Vec::new();
        for rec in recs {
            match running.iter().find(|(n, _)| *n == rec.spec.name) {
                Some((_, a)) => out.push(mailbox(a.send(GetInfo).await)?),
                None => out.push(offline_info(rec)),
            }
        }
        Ok(out)
    }

    /// Operator pause: cycles stop, writes stay tracked.
    pub async fn pause(&self, name: &str) -> Result<VmInfo> {
        mailbox(self.actor(name).await?.send(Operator(Event::Pause)).await)?
    }

    /// Operator resume (from `Paused` or `Critical`).
    pub async fn resume(&self, name: &str) -> Result<VmInfo> {
        mailbox(self.actor(name).await?.send(Operator(Event::Resume)).await)?
    }

    /// A disk's write path, for provider processes and the NBD export.
    pub fn disk(&self, vm: &str, disk: &str) -> Result<Arc<Disk>> {
        crate::model::validate_name("vm name", vm)?;
        crate::model::validate_name("disk name", disk)?;
        self.host.disks.get(&format!("{vm}/{disk}")).ok_or_else(|| Error::not_found("disk", format!("{vm}/{disk}")))
    }

    /// Writes `data` at `offset` of a protected disk; logged before it returns.
    pub async fn write(&self, vm: &str, disk: &str, offset: u64, data: Vec<u8>) -> Result<()> {
        let d = self.disk(vm, disk)?;
        blocking(move || d.write_at(offset, &data, false)).await
    }

    /// Makes every acknowledged write of the disk durable (log and disk).
    pub async fn flush(&self, vm: &str, disk: &str) -> Result<()> {
        let d = self.disk(vm, disk)?;
        blocking(move || d.flush()).await
    }

    /// Export names (`<vm>/<disk>`) of every protected disk.
    pub fn exports(&self) -> Vec<String> {
        self.host.disks.names()
    }

    /// The protected disks as NBD exports (`<vm>/<disk>`), for [`crate::nbd::NbdServer`].
    pub fn export_catalog(&self) -> Arc<dyn crate::nbd::ExportCatalog> {
        self.host.disks.clone()
    }

    /// Cuts a recovery point now that includes every write acknowledged
    /// before the call, and waits for it (`None`: nothing was written).
    pub async fn replicate_now(&self, name: &str) -> Result<Option<RecoveryPoint>> {
        let rx = mailbox(self.actor(name).await?.send(ReplicateNow).await)?;
        rx.await.map_err(|_| Error::Cancelled("the VM stopped".into()))?
    }

    /// Waits until the VM has committed its first recovery point.
    pub async fn wait_protected(&self, name: &str, timeout: Duration) -> Result<VmInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.vm(name).await?;
            match info.state {
                VmState::Protected if info.last_point_seq > 0 => return Ok(info),
                VmState::Critical | VmState::ResyncRequired => {
                    return Err(Error::FailedPrecondition(format!(
                        "VM {name} is {}: {}",
                        info.state,
                        info.reason.unwrap_or_default()
                    )))
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Cancelled(format!("VM {name} still {} after {timeout:?}", info.state)))
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub async fn recovery_points(&self, vm: &str) -> Result<Vec<RecoveryPoint>> {
        crate::model::validate_name("vm name", vm)?;
        let (state, n) = (self.host.state.clone(), vm.to_string());
        blocking(move || {
            if state.get_vm(&n)?.is_none() {
                return Err(Error::not_found("VM", n));
            }
            state.list_points(&n)
        })
        .await
    }

    /// Starts a test failover: rebuilds every disk of the chosen point as
    /// `<out_dir>/<disk>.img` while replication keeps running. Returns the job.
    pub async fn test_failover(&self, vm: &str, point: PointSelector, out_dir: &Path) -> Result<JobId> {
        let (rec, point) = self.resolve_point(vm, point).await?;
        let claim = self.claim_output(&rec, out_dir, false).await?;
        self.start_restore_job(JobKind::TestFailover, rec, point, claim).await
    }

    /// Fails a VM over into `out_dir` and returns the restore's job.
    ///
    /// Planned (a migration, the source still up): the disks stop taking
    /// writes, a final recovery point with every acknowledged write is cut,
    /// the VM goes `FailedOver` and that point is restored; `point` must be
    /// `Latest`. If the final point cannot be cut, the failover is called
    /// off and writes go on. Unplanned (the source lost): the VM goes
    /// `FailedOver` at once on the chosen committed point, which is
    /// restored; this also works for a VM whose disks are gone (not
    /// running). Either way replication stops and the disks' exports refuse
    /// writes until the VM is unprotected or protected again. A failover of
    /// a `FailedOver` VM restores again (another folder, or after a failed
    /// restore).
    pub async fn failover(&self, vm: &str, point: PointSelector, out_dir: &Path, planned: bool) -> Result<JobId> {
        if planned && point != PointSelector::Latest {
            return Err(Error::invalid(
                "recovery_point",
                "a planned failover restores the final point it cuts; choose a point only for an unplanned one",
            ));
        }
        crate::model::validate_name("vm name", vm)?;
        let _vm = self.lock_vm(vm).await;
        let (state, n) = (self.host.state.clone(), vm.to_string());
        let rec = blocking(move || state.get_vm(&n)?.ok_or_else(|| Error::not_found("VM", n))).await?;
        let claim = self.claim_output(&rec, out_dir, true).await?;
        let out_dir = claim.dir.clone();
        let chosen = match (planned, point) {
            (false, PointSelector::Seq(_)) => Some(self.resolve_point(vm, point).await?.1.seq),
            _ => None,
        };
        let seq = match mailbox(self.supervisor.send(Lookup(vm.to_string())).await)? {
            Some(actor) => {
                let msg = vm::FailOver { planned, point: chosen, out_dir: out_dir.clone() };
                let rx = mailbox(actor.send(msg).await)?;
                rx.await.map_err(|_| Error::Cancelled("the VM stopped".into()))??
            }
            // Known but not running (its disks could not be opened): only an unplanned failover makes sense.
            None if planned => {
                return Err(Error::FailedPrecondition(format!(
                    "VM {vm} is not running ({}): a planned failover needs its disks; an unplanned one restores its latest point",
                    rec.lifecycle.state
                )))
            }
            None => {
                let (_, latest) = self.resolve_point(vm, point).await?;
                let (state, n, now, dir) = (self.host.state.clone(), vm.to_string(), self.host.clock.now_ms(), out_dir.clone());
                let f = crate::vm::lifecycle::Failover { planned: false, point: latest.seq, out_dir: dir, at_ms: now };
                blocking(move || state.update_vm(&n, |r| drop(r.lifecycle.on_event(Event::FailedOver(f), now)))).await?;
                latest.seq
            }
        };
        let (rec, point) = self.resolve_point(vm, PointSelector::Seq(seq)).await?;
        tracing::info!(vm, point = seq, planned, out = %out_dir.display(), "failed over; restoring");
        self.start_restore_job(JobKind::Failover, rec, point, claim).await
    }

    /// Restores `point` into `out_dir` as a job (test failover, failover).
    async fn start_restore_job(
        &self,
        kind: JobKind,
        rec: VmRecord,
        point: RecoveryPoint,
        claim: OutputClaim,
    ) -> Result<JobId> {
        let out_dir = claim.dir.clone();
        let (host, name) = (self.host.clone(), rec.spec.name.clone());
        let detail = format!("recovery point {} -> {}", point.seq, out_dir.display());
        let total = point.bytes_logical;
        let job = blocking(move || host.jobs.start(&name, kind, total, detail)).await?;
        let (host, supervisor) = (self.host.clone(), self.supervisor.clone());
        let id = job.id;
        self.host.runtime.spawn(async move {
            let r = restore::restore_point(
                &host.target,
                &rec.spec.name,
                rec.generation,
                point.seq,
                &out_dir,
                restore::RestoreOpts {
                    parallelism: host.config.restore_parallelism,
                    only: None,
                    durable: true,
                    replace: true,
                },
                job.done.clone(),
                job.total.clone(),
            )
            .await;
            // The failed-over VM may run from these disks from now on: no
            // other restore may write there (`claim_output`). Recorded before
            // the claim is let go.
            let r = match r {
                Ok(disks) if kind == JobKind::Failover => {
                    let (state, vm, generation, dir) =
                        (host.state.clone(), rec.spec.name.clone(), rec.generation, out_dir.clone());
                    let recorded = blocking(move || {
                        state.update_vm(&vm, |r| {
                            if r.generation == generation && !r.failover_restored.contains(&dir) {
                                r.failover_restored.push(dir);
                            }
                        })
                    })
                    .await;
                    recorded.map(|_| disks).map_err(|e| {
                        Error::Internal(format!("restored, but the failover folder could not be recorded: {e}"))
                    })
                }
                r => r,
            };
            drop(claim);
            report_damage(&supervisor, &rec.spec.name, &r).await;
            job.done.store(job.total.load(Ordering::Relaxed).max(job.done.load(Ordering::Relaxed)), Ordering::Relaxed);
            let outcome = match r {
                Ok(disks) => Ok(Some(format!(
                    "recovery point {} restored: {}",
                    point.seq,
                    disks.iter().map(|d| d.path.display().to_string()).collect::<Vec<_>>().join(", ")
                ))),
                Err(e) => Err((JobStatus::Failed, e.to_string())),
            };
            let _ = blocking(move || {
                host.jobs.finish(id, outcome);
                Ok(())
            })
            .await;
        });
        Ok(id)
    }

    /// Restores a point and waits for it (the embedded form of test failover).
    pub async fn restore(&self, vm: &str, point: PointSelector, out_dir: &Path) -> Result<Vec<RestoredDisk>> {
        let (rec, point) = self.resolve_point(vm, point).await?;
        let claim = self.claim_output(&rec, out_dir, false).await?;
        let out_dir = claim.dir.clone();
        let r = restore::restore_point(
            &self.host.target,
            vm,
            rec.generation,
            point.seq,
            &out_dir,
            restore::RestoreOpts {
                parallelism: self.host.config.restore_parallelism,
                only: None,
                durable: true,
                replace: true,
            },
            Default::default(),
            Default::default(),
        )
        .await;
        report_damage(&self.supervisor, vm, &r).await;
        r
    }

    async fn lock_vm(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.vm_locks.lock().expect("vm locks").entry(name.to_string()).or_default().clone();
        lock.lock_owned().await
    }

    /// Resolves a restore's output folder, checks that nothing live is
    /// there, and claims it for this restore. Refused: a folder where an
    /// image would replace a protected disk; a folder another restore is
    /// writing into; a folder a `FailedOver` VM's disks were restored
    /// into (the VM may run from them). A failover whose restore failed
    /// may be tried again into its folder.
    async fn claim_output(&self, rec: &VmRecord, out_dir: &Path, failover: bool) -> Result<OutputClaim> {
        let out_dir = self.disk_roots.check_output(&absolute(out_dir)?)?;
        let out_dir = check_out_dir(&rec.spec, &out_dir, &self.protected_paths().await?)?;
        // Made now: judged again as it resolves (a link swapped in meanwhile).
        self.disk_roots.check("output folder", &out_dir)?;
        // Claimed first, checked then: a failover that records its folder
        // does so before it lets go of its claim, so this check sees it.
        if !self.outputs.lock().expect("outputs lock").insert(out_dir.clone()) {
            return Err(Error::FailedPrecondition(format!(
                "a restore is already writing into {}: wait for it, or choose another folder",
                out_dir.display()
            )));
        }
        let claim = OutputClaim { outputs: self.outputs.clone(), dir: out_dir };
        let state = self.host.state.clone();
        let vms = blocking(move || state.list_vms()).await?;
        for v in vms.iter().filter(|v| v.lifecycle.state == VmState::FailedOver) {
            let latest = v.lifecycle.failover.as_ref().map(|f| &f.out_dir);
            if v.failover_restored.contains(&claim.dir)
                || latest == Some(&claim.dir) && !(failover && failover_retry(v, rec))
            {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds the disks VM {} failed over to: restore into another folder",
                    claim.dir.display(),
                    v.spec.name,
                )));
            }
        }
        Ok(claim)
    }

    /// Every disk path of every protected VM.
    async fn protected_paths(&self) -> Result<Vec<PathBuf>> {
        let state = self.host.state.clone();
        let vms = blocking(move || state.list_vms()).await?;
        Ok(vms.into_iter().flat_map(|v| v.spec.disks.into_iter().map(|d| d.path)).collect())
    }

    async fn resolve_point(&self, vm: &str, sel: PointSelector) -> Result<(VmRecord, RecoveryPoint)> {
        crate::model::validate_name("vm name", vm)?;
        let (state, n) = (self.host.state.clone(), vm.to_string());
        let (rec, points) = blocking(move || {
            let rec = state.get_vm(&n)?.ok_or_else(|| Error::not_found("VM", n.clone()))?;
            Ok((rec, state.list_points(&n)?))
        })
        .await?;
        let point = match sel {
            PointSelector::Latest => points.last().cloned().ok_or_else(|| {
                Error::FailedPrecondition(format!("VM {vm} has no recovery point yet (state {})", rec.lifecycle.state))
            })?,
            PointSelector::Seq(s) => points
                .iter()
                .find(|p| p.seq == s)
                .cloned()
                .ok_or_else(|| Error::not_found("recovery point", format!("{vm}#{s}")))?,
        };
        Ok((rec, point))
    }

    pub async fn job(&self, id: JobId) -> Result<Job> {
        let host = self.host.clone();
        blocking(move || host.jobs.get(id)?.ok_or_else(|| Error::not_found("job", id.to_string()))).await
    }

    pub async fn jobs(&self) -> Result<Vec<Job>> {
        let host = self.host.clone();
        blocking(move || host.jobs.list()).await
    }

    /// Waits for a job to end and returns it.
    pub async fn wait_job(&self, id: JobId) -> Result<Job> {
        loop {
            let j = self.job(id).await?;
            if j.status != JobStatus::Running {
                return Ok(j);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The host-wide upload limit in force now, bit/s (`None` = unlimited).
    pub fn bandwidth_limit(&self) -> Option<u64> {
        self.host.throttle.limit()
    }

    /// Sets one limit for all hours.
    pub fn set_bandwidth_limit(&self, bps: Option<u64>) -> Result<()> {
        let mut p = self.host.throttle.policy();
        p.work_limit_bps = bps;
        p.off_limit_bps = bps;
        self.host.throttle.set_policy(p)
    }

    pub fn bandwidth_policy(&self) -> BandwidthPolicy {
        self.host.throttle.policy()
    }

    /// Changes the limits at once, without a restart; a refused policy changes nothing.
    pub fn set_bandwidth_policy(&self, policy: BandwidthPolicy) -> Result<()> {
        self.host.throttle.set_policy(policy)
    }

    /// Changes the injected faults (only when the engine was opened with `faults`).
    pub fn set_faults(&self, faults: Faults) -> Result<()> {
        match &self.host.unreliable {
            Some(u) => u.set_faults(faults),
            None => Err(Error::FailedPrecondition("fault injection is not configured".into())),
        }
    }

    /// Operations the fault injector failed so far (`None` without fault injection).
    pub fn injected_faults(&self) -> Option<u64> {
        self.host.unreliable.as_ref().map(|u| u.injected())
    }

    /// Starts a resync now (operator), whatever the off-hours window.
    pub async fn resync(&self, name: &str) -> Result<VmInfo> {
        mailbox(self.actor(name).await?.send(Operator(Event::StartResync)).await)?
    }

    pub fn target_description(&self) -> String {
        self.host.target.describe()
    }

    /// Stops every VM actor (sealing active logs so a restart trusts them)
    /// and the actor system.
    pub async fn shutdown(&self) -> Result<()> {
        let vms = mailbox(self.supervisor.send(All).await)?;
        // All at once: one VM's slow close (or state store) does not keep
        // the others' logs unsealed.
        let stops = vms.into_iter().map(|(name, _)| async move {
            let r = mailbox(self.supervisor.send(StopVm { name: name.clone(), unprotect: false }).await);
            (name, r.and_then(|r| r))
        });
        let mut first_err = None;
        for (name, r) in futures::future::join_all(stops).await {
            if let Err(e) = r {
                tracing::warn!(vm = %name, error = %e, "stopping VM failed");
                first_err.get_or_insert(e);
            }
        }
        self.stop_system();
        first_err.map_or(Ok(()), Err)
    }

    fn stop_system(&self) {
        let taken = self.system.lock().expect("system lock").take();
        if let Some((sys, thread)) = taken {
            sys.stop();
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_system();
    }
}

/// Refuses to go on with a replica under another key than the daemon's:
/// its points would be unreadable together (names in keys and sealing
/// both depend on the key).
fn check_sealing(rec: &VmRecord, key_id: Option<&str>) -> Result<()> {
    let vm = &rec.spec.name;
    let why = match (rec.key_id.as_deref(), key_id) {
        (a, b) if a == b => return Ok(()),
        (None, Some(_)) => format!(
            "the replica of VM {vm} was written without encryption, and an encryption key is configured: \
             start ferryd without the key, or unprotect the VM and protect it again"
        ),
        (Some(id), None) => format!(
            "the replica of VM {vm} is encrypted (key id {id}): configure its key (--encryption-key-file)"
        ),
        (Some(id), Some(ours)) => format!(
            "wrong encryption key for the replica of VM {vm}: it is encrypted with key id {id}, the configured key is {ours}"
        ),
        (None, None) => unreachable!("equal"),
    };
    Err(Error::FailedPrecondition(why))
}

fn offline_info(rec: VmRecord) -> VmInfo {
    VmInfo {
        state: rec.lifecycle.state,
        reason: rec.lifecycle.reason.clone(),
        transitions: rec.lifecycle.transitions.clone(),
        failover: rec.lifecycle.failover.clone(),
        generation: rec.generation,
        last_point_seq: rec.last_point_seq,
        disks: rec
            .spec
            .disks
            .iter()
            .map(|d: &DiskSpec| vm::DiskInfo {
                name: d.name.clone(),
                path: d.path.clone(),
                size: std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0),
                export: format!("{}/{}", rec.spec.name, d.name),
                active_log_bytes: 0,
                pending_log_bytes: 0,
                snapshot_bytes: 0,
            })
            .collect(),
        spec: rec.spec,
    }
}

/// A restore that found the replica damaged (an object missing or corrupt)
/// tells the VM: it needs a resync (DESIGN: a missing remote object or a
/// checksum mismatch means `ResyncRequired`).
async fn report_damage<T>(supervisor: &Addr<Supervisor>, vm: &str, r: &Result<T>) {
    let Err(e) = r else { return };
    if e.class() != ErrorClass::NeedsResync {
        return;
    }
    if let Ok(Some(actor)) = supervisor.send(Lookup(vm.to_string())).await {
        actor.do_send(crate::vm::ReplicaDamaged(format!("a restore found the replica damaged: {e}")));
    }
}

/// Removes the logs a failed protect created beside a disk: only logs of
/// `vm` (the name is not in use, so they cannot belong to anyone else).
fn remove_fresh_logs(disk_path: &Path, vm: &str) {
    if let Ok(logs) = crate::changelog::list_logs(disk_path) {
        for (_, p) in logs {
            if crate::changelog::scan(&p).map(|s| s.header.vm == vm).unwrap_or(false) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.as_os_str().is_empty() {
        return Err(Error::invalid("out", "the output folder must not be empty"));
    }
    std::path::absolute(p).map_err(|e| Error::io(format!("resolve {}", p.display()), e))
}

/// Whether a failover of `rec` into the folder `v` last failed over to
/// may go on though `v` is not recorded as restored there: only one of
/// `v` itself (its restore there failed, or was never
/// recorded: a record from before `failover_restored`). Everything else
/// into that folder is refused.
fn failover_retry(v: &VmRecord, rec: &VmRecord) -> bool {
    v.spec.name == rec.spec.name && v.generation == rec.generation
}

/// Refuses an output folder where a restored image would replace a live disk.
/// The folder is created and resolved first (symlinks, `..`), so the
/// comparison is between real paths; every protected disk of every VM counts.
fn check_out_dir(spec: &VmSpec, out_dir: &Path, protected: &[PathBuf]) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(format!("create {}", out_dir.display()), e))?;
    let real = std::fs::canonicalize(out_dir).map_err(|e| Error::io(format!("resolve {}", out_dir.display()), e))?;
    for d in &spec.disks {
        for name in [format!("{}.img", d.name), format!("{}.img.partial", d.name)] {
            let img = real.join(name);
            let img_real = std::fs::canonicalize(&img).unwrap_or_else(|_| img.clone());
            if let Some(hit) = protected.iter().find(|p| **p == img || **p == img_real) {
                return Err(Error::invalid(
                    "out",
                    format!("{} would overwrite the protected disk {}", img.display(), hit.display()),
                ));
            }
        }
    }
    Ok(real)
}
