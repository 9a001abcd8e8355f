//! One simulation run: set up, protect, churn, replicate, verify.
//!
//! Overview: N VMs with D raw disks each are created under the workdir and
//! protected by an engine running in this process (local-folder target).
//! Once every VM has its first recovery point, one blocking thread per VM
//! issues the ops of its seeded [`Churn`] straight into the disks' write path
//! ([`Disk`]), paced to the configured rate, while the engine's timed cycles
//! cut recovery points at the VM frequency. A monitor samples the VMs
//! meanwhile (state, change-log space against the 50% rule).
//!
//! Consistency of the check: the source disk files are the model. Churn
//! stops before the final `replicate_now`, which cuts a point including every
//! acknowledged write, and nothing writes after it; so the latest point of a
//! healthy VM must restore to exactly the bytes of its disk files.
//!
//! Failure: a failed write ends that VM's churn and is reported; the others
//! go on. A VM that leaves `Protected` (e.g. the 50% rule sent it to
//! `ResyncRequired`) is reported with its reason and is not verified, since
//! its latest point is known to be behind its disks.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_engine::disk::Disk;
use ferry_engine::lifecycle::VmState;
use ferry_engine::model::{JobStatus, PointKind};
use ferry_engine::{DiskSpec, Engine, EngineConfig, PointSelector, VmSpec};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::churn::{vm_seed, Churn, ChurnShape, OpKind};
use crate::report::{ConfigEcho, Latency, Phases, Summary, Verification, VmReport};

/// Everything a run needs; built from the command line.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub vms: usize,
    pub disks_per_vm: usize,
    /// Bytes per disk.
    pub disk_size: u64,
    /// Percent of each disk filled with random data before protection.
    pub prefill_percent: u8,
    /// How long churn runs.
    pub duration: Duration,
    /// Replication frequency of every VM.
    pub frequency: Duration,
    /// Bytes per data or zero write, inclusive.
    pub write_size: RangeInclusive<u64>,
    /// Ops per second per VM; 0 = as fast as possible.
    pub rate: u32,
    pub zero_percent: u8,
    pub flush_percent: u8,
    pub seed: u64,
    /// Holds `disks/`, `data/` (engine state), `target/` and `restore/`.
    pub workdir: PathBuf,
    /// Keep restored images after a successful comparison (else removed at once,
    /// so a run with many VMs needs space for one VM's restore at a time).
    pub keep_restored: bool,
    /// How long to wait for every VM's initial replication.
    pub protect_timeout: Duration,
}

/// The folder a run works in: one the user named (kept), or a temporary
/// one (removed when dropped, unless `--keep`).
pub struct Workdir {
    path: PathBuf,
    /// Present while the folder is temporary and will be removed.
    temp: Option<tempfile::TempDir>,
}

impl Workdir {
    /// A named folder must be empty or absent: leftover engine state or
    /// disks would be resumed or clash with the new run.
    pub fn prepare(given: Option<&Path>, keep: bool) -> Result<Workdir> {
        if let Some(dir) = given {
            std::fs::create_dir_all(dir).with_context(|| format!("create workdir {}", dir.display()))?;
            let dir = std::fs::canonicalize(dir).with_context(|| format!("resolve workdir {}", dir.display()))?;
            if std::fs::read_dir(&dir)?.next().is_some() {
                bail!("workdir {} is not empty", dir.display());
            }
            return Ok(Workdir { path: dir, temp: None });
        }
        let temp = tempfile::Builder::new().prefix("ferry-sim-").tempdir().context("create a temporary workdir")?;
        if keep {
            return Ok(Workdir { path: temp.keep(), temp: None });
        }
        Ok(Workdir { path: temp.path().to_path_buf(), temp: Some(temp) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_kept(&self) -> bool {
        self.temp.is_none()
    }
}

/// How often the monitor samples the VMs during churn.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// Read size when comparing restored disks with their sources.
const COMPARE_CHUNK: usize = 1 << 20;

/// One VM as the simulator set it up.
struct SimVm {
    name: String,
    /// (disk name, source image path)
    disks: Vec<(String, PathBuf)>,
}

/// What one VM's churn thread did.
#[derive(Debug, Default)]
struct ChurnStats {
    data_writes: u64,
    zero_writes: u64,
    flushes: u64,
    bytes_written: u64,
    bytes_zeroed: u64,
    /// Microseconds per data or zero write (payload generation excluded).
    write_latencies_us: Vec<u32>,
    /// Microseconds per flush (fdatasync of log and disk).
    flush_latencies_us: Vec<u32>,
    /// The op that failed and why; churn of this VM stopped there.
    error: Option<String>,
}

/// What the monitor saw of one VM during churn.
#[derive(Debug, Default, Clone)]
struct Observed {
    /// Highest (sealed + active) change-log bytes of any disk, as a percent of its size.
    peak_log_percent: f64,
    /// First state other than `Protected` seen, with its reason.
    left_protected: Option<String>,
}

/// Runs the whole simulation and reports it. Errors are the simulator's
/// own (cannot create a disk, engine does not open, protection times out);
/// replication problems are outcomes, in the summary.
pub async fn run(cfg: &SimConfig) -> Result<Summary> {
    let wall = Instant::now();
    let shape = ChurnShape {
        disk_sizes: vec![cfg.disk_size; cfg.disks_per_vm],
        write_size: cfg.write_size.clone(),
        zero_percent: cfg.zero_percent,
        flush_percent: cfg.flush_percent,
    };
    shape.validate().map_err(anyhow::Error::msg).context("invalid churn settings")?;
    if cfg.write_size.end() > &ferry_engine::disk::MAX_IO {
        bail!("write-size: at most {} bytes per write", ferry_engine::disk::MAX_IO);
    }

    let vms = create_disks(cfg).await?;
    let engine =
        Engine::open(EngineConfig::new(cfg.workdir.join("data")).with_local_target(cfg.workdir.join("target")))
            .await
            .context("open engine")?;
    for vm in &vms {
        let disks = vm.disks.iter().map(|(name, path)| DiskSpec { name: name.clone(), path: path.clone() }).collect();
        engine
            .protect(VmSpec::new(&vm.name, disks).with_frequency(cfg.frequency))
            .await
            .with_context(|| format!("protect {}", vm.name))?;
    }
    // Initial replications run side by side; waiting in turn costs no more than the slowest.
    for vm in &vms {
        engine
            .wait_protected(&vm.name, cfg.protect_timeout)
            .await
            .with_context(|| format!("initial replication of {}", vm.name))?;
    }
    let setup = wall.elapsed();
    tracing::info!(vms = vms.len(), secs = setup.as_secs_f64(), "all VMs protected");

    let mut points_before = HashMap::new();
    for vm in &vms {
        points_before.insert(vm.name.clone(), engine.vm(&vm.name).await?.last_point_seq);
    }
    let churn_start = Instant::now();
    let (stats, observed) = churn_all(&engine, cfg, &shape, &vms).await?;
    let churn_time = churn_start.elapsed();

    let final_start = Instant::now();
    let mut finals = Vec::new();
    for vm in &vms {
        let r = engine.replicate_now(&vm.name).await;
        if let Err(e) = &r {
            tracing::warn!(vm = %vm.name, error = %e, "final replication failed");
        }
        finals.push(r);
    }
    let final_replication = final_start.elapsed();

    let verify_start = Instant::now();
    let failed_jobs =
        engine.jobs().await.context("list jobs")?.into_iter().filter(|j| j.status == JobStatus::Failed).fold(
            HashMap::<String, u64>::new(),
            |mut m, j| {
                *m.entry(j.vm).or_default() += 1;
                m
            },
        );
    let mut reports = Vec::new();
    for ((vm, stats), (final_point, observed)) in vms.iter().zip(stats).zip(finals.into_iter().zip(observed)) {
        let info = engine.vm(&vm.name).await?;
        let points = engine.recovery_points(&vm.name).await?;
        let final_seq = match &final_point {
            Ok(p) => Ok(p.as_ref().map(|p| p.seq)),
            Err(e) => Err(e.to_string()),
        };
        let verification = if info.state != VmState::Protected {
            Verification::skipped(format!("VM is {}: {}", info.state, info.reason.clone().unwrap_or_default()))
        } else if let Err(e) = &final_seq {
            Verification::failed(None, format!("final replication failed: {e}"))
        } else {
            verify(&engine, cfg, vm, final_seq.clone().unwrap_or(None)).await
        };
        if !verification.passed() {
            tracing::warn!(vm = %vm.name, ?verification, "verification did not pass");
        }
        let (mut writes_us, mut flushes_us) = (stats.write_latencies_us, stats.flush_latencies_us);
        reports.push(VmReport {
            name: vm.name.clone(),
            state: info.state.to_string(),
            reason: info.reason.clone(),
            ops: stats.data_writes + stats.zero_writes + stats.flushes,
            data_writes: stats.data_writes,
            zero_writes: stats.zero_writes,
            flushes: stats.flushes,
            bytes_written: stats.bytes_written,
            bytes_zeroed: stats.bytes_zeroed,
            churn_error: stats.error,
            write_latency_us: Latency::of(&mut writes_us),
            flush_latency_us: Latency::of(&mut flushes_us),
            points: points.len() as u64,
            base_points: points.iter().filter(|p| p.kind == PointKind::Base).count() as u64,
            // Timed cycles only: the final replicate_now's point is not one of them.
            points_during_churn: info
                .last_point_seq
                .saturating_sub(points_before[&vm.name])
                .saturating_sub(u64::from(matches!(final_seq, Ok(Some(_))))),
            final_point: final_seq.ok().flatten(),
            bytes_logical_on_target: points.iter().map(|p| p.bytes_logical).sum(),
            bytes_stored_on_target: points.iter().map(|p| p.bytes_stored).sum(),
            peak_log_percent: observed.peak_log_percent,
            left_protected_during_churn: observed.left_protected,
            failed_jobs: failed_jobs.get(&vm.name).copied().unwrap_or(0),
            verification,
        });
    }
    let verify_time = verify_start.elapsed();
    if let Err(e) = engine.shutdown().await {
        tracing::warn!(error = %e, "engine shutdown reported an error");
    }
    Ok(Summary::new(
        echo(cfg),
        reports,
        Phases {
            setup_secs: setup.as_secs_f64(),
            churn_secs: churn_time.as_secs_f64(),
            final_replication_secs: final_replication.as_secs_f64(),
            verify_secs: verify_time.as_secs_f64(),
            wall_secs: wall.elapsed().as_secs_f64(),
        },
    ))
}

fn echo(cfg: &SimConfig) -> ConfigEcho {
    ConfigEcho {
        vms: cfg.vms,
        disks_per_vm: cfg.disks_per_vm,
        disk_size: cfg.disk_size,
        prefill_percent: cfg.prefill_percent,
        duration_secs: cfg.duration.as_secs_f64(),
        frequency_secs: cfg.frequency.as_secs_f64(),
        write_size_min: *cfg.write_size.start(),
        write_size_max: *cfg.write_size.end(),
        rate: cfg.rate,
        zero_percent: cfg.zero_percent,
        flush_percent: cfg.flush_percent,
        seed: cfg.seed,
        workdir: cfg.workdir.clone(),
    }
}

/// Creates every VM's raw disks: sparse, with the first `prefill_percent`
/// of each filled with seeded random data.
async fn create_disks(cfg: &SimConfig) -> Result<Vec<SimVm>> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || {
        let mut vms = Vec::new();
        for i in 0..cfg.vms {
            let name = format!("vm{i:03}");
            let dir = cfg.workdir.join("disks").join(&name);
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let mut disks = Vec::new();
            for d in 0..cfg.disks_per_vm {
                let disk = format!("disk{d}");
                let path = dir.join(format!("{disk}.img"));
                let prefill = cfg.disk_size * u64::from(cfg.prefill_percent) / 100;
                let seed = vm_seed(cfg.seed, i) ^ (d as u64 + 1).rotate_left(32);
                write_image(&path, cfg.disk_size, prefill, seed)
                    .with_context(|| format!("create disk {}", path.display()))?;
                disks.push((disk, path));
            }
            vms.push(SimVm { name, disks });
        }
        Ok(vms)
    })
    .await
    .context("disk creation task")?
}

fn write_image(path: &Path, size: u64, prefill: u64, seed: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = File::options().write(true).create_new(true).open(path)?;
    f.set_len(size)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; COMPARE_CHUNK];
    let mut off = 0;
    while off < prefill {
        let n = (prefill - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()
}

/// Runs every VM's churn thread until the duration ends, sampling the VMs
/// meanwhile. Returns stats and observations in VM order.
async fn churn_all(
    engine: &Engine,
    cfg: &SimConfig,
    shape: &ChurnShape,
    vms: &[SimVm],
) -> Result<(Vec<ChurnStats>, Vec<Observed>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + cfg.duration;
    let mut handles = Vec::new();
    for (i, vm) in vms.iter().enumerate() {
        let disks = vm
            .disks
            .iter()
            .map(|(d, _)| engine.disk(&vm.name, d))
            .collect::<ferry_engine::Result<Vec<_>>>()
            .with_context(|| format!("disks of {}", vm.name))?;
        let churn = Churn::new(shape.clone(), vm_seed(cfg.seed, i)).map_err(anyhow::Error::msg)?;
        let (rate, stop) = (cfg.rate, stop.clone());
        handles.push(tokio::task::spawn_blocking(move || drive(&disks, churn, rate, deadline, &stop)));
    }
    let mut observed = vec![Observed::default(); vms.len()];
    while !handles.iter().all(|h| h.is_finished()) {
        tokio::time::sleep(SAMPLE_EVERY).await;
        for (vm, seen) in vms.iter().zip(observed.iter_mut()) {
            let info = match engine.vm(&vm.name).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %e, "cannot sample VM");
                    continue;
                }
            };
            for d in &info.disks {
                let pct = (d.pending_log_bytes + d.active_log_bytes) as f64 * 100.0 / d.size.max(1) as f64;
                seen.peak_log_percent = seen.peak_log_percent.max(pct);
            }
            if info.state != VmState::Protected && seen.left_protected.is_none() {
                tracing::warn!(vm = %vm.name, state = %info.state, reason = ?info.reason, "VM left Protected during churn");
                seen.left_protected = Some(format!("{}: {}", info.state, info.reason.unwrap_or_default()));
            }
        }
    }
    let mut stats = Vec::new();
    for h in handles {
        stats.push(h.await.context("churn thread panicked")?);
    }
    Ok((stats, observed))
}

/// One VM's churn loop (blocking): issues ops until `deadline` or `stop`.
/// With a rate, op k is due at start + k/rate (open loop: a slow op is
/// followed by catch-up ops, as a guest's queue would drain).
fn drive(disks: &[Arc<Disk>], mut churn: Churn, rate: u32, deadline: Instant, stop: &AtomicBool) -> ChurnStats {
    let mut stats = ChurnStats::default();
    let mut buf = vec![0u8; *churn.shape().write_size.end() as usize];
    let start = Instant::now();
    let mut issued: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::Relaxed) {
            break;
        }
        if rate > 0 {
            let due = start + Duration::from_secs_f64(issued as f64 / f64::from(rate));
            if due > now {
                std::thread::sleep(due.min(deadline) - now);
                continue;
            }
        }
        let op = churn.next_op();
        let disk = &disks[op.disk];
        if op.kind == OpKind::Data {
            churn.fill_payload(&mut buf[..op.len as usize]);
        }
        let t = Instant::now();
        let result = match op.kind {
            OpKind::Data => disk.write_at(op.offset, &buf[..op.len as usize], false),
            OpKind::Zeroes => disk.write_zeroes(op.offset, op.len, false),
            OpKind::Flush => disk.flush(),
        };
        let micros = t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        match op.kind {
            OpKind::Flush => stats.flush_latencies_us.push(micros),
            OpKind::Data | OpKind::Zeroes => stats.write_latencies_us.push(micros),
        }
        issued += 1;
        if let Err(e) = result {
            tracing::error!(vm = %disk.vm, disk = %disk.name, ?op, error = %e, "churn op failed; churn of this VM stops");
            stats.error = Some(format!("{:?} of {} bytes at {} on {}: {e}", op.kind, op.len, op.offset, disk.name));
            break;
        }
        match op.kind {
            OpKind::Data => {
                stats.data_writes += 1;
                stats.bytes_written += op.len;
            }
            OpKind::Zeroes => {
                stats.zero_writes += 1;
                stats.bytes_zeroed += op.len;
            }
            OpKind::Flush => stats.flushes += 1,
        }
    }
    stats
}

/// Restores the VM's latest point and compares each disk with its source.
async fn verify(engine: &Engine, cfg: &SimConfig, vm: &SimVm, final_seq: Option<u64>) -> Verification {
    let points = match engine.recovery_points(&vm.name).await {
        Ok(p) => p,
        Err(e) => return Verification::failed(None, format!("list recovery points: {e}")),
    };
    let Some(latest) = points.last().map(|p| p.seq) else {
        return Verification::failed(None, "no recovery point".into());
    };
    if let Some(seq) = final_seq {
        if seq != latest {
            return Verification::failed(Some(latest), format!("latest point is {latest}, the final one was {seq}"));
        }
    }
    let out = cfg.workdir.join("restore").join(&vm.name);
    let restored = match engine.restore(&vm.name, PointSelector::Latest, &out).await {
        Ok(r) => r,
        Err(e) => return Verification::failed(Some(latest), format!("restore: {e}")),
    };
    let mut pairs = Vec::new();
    for (name, source) in &vm.disks {
        match restored.iter().find(|r| &r.name == name) {
            Some(r) => pairs.push((name.clone(), source.clone(), r.path.clone())),
            None => return Verification::failed(Some(latest), format!("disk {name} missing from the restore")),
        }
    }
    if restored.len() != vm.disks.len() {
        return Verification::failed(
            Some(latest),
            format!("restore holds {} disks, not {}", restored.len(), pairs.len()),
        );
    }
    let compared = tokio::task::spawn_blocking(move || -> std::result::Result<u64, String> {
        let mut total = 0;
        for (name, source, image) in pairs {
            total += compare_files(&source, &image).map_err(|e| format!("disk {name}: {e}"))?;
        }
        Ok(total)
    })
    .await;
    let verdict = match compared {
        Ok(Ok(bytes)) => Verification::ok(latest, bytes),
        Ok(Err(e)) => Verification::failed(Some(latest), e),
        Err(e) => Verification::failed(Some(latest), format!("compare task: {e}")),
    };
    if verdict.passed() && !cfg.keep_restored {
        if let Err(e) = std::fs::remove_dir_all(&out) {
            tracing::warn!(dir = %out.display(), error = %e, "cannot remove restored images");
        }
    }
    verdict
}

/// Compares two files byte for byte; returns their size, or where they differ.
fn compare_files(source: &Path, restored: &Path) -> std::result::Result<u64, String> {
    let open = |p: &Path| File::open(p).map_err(|e| format!("open {}: {e}", p.display()));
    let (mut a, mut b) = (open(source)?, open(restored)?);
    let len = |f: &File, p: &Path| f.metadata().map(|m| m.len()).map_err(|e| format!("stat {}: {e}", p.display()));
    let (la, lb) = (len(&a, source)?, len(&b, restored)?);
    if la != lb {
        return Err(format!("size {lb} restored, {la} at the source"));
    }
    let (mut ba, mut bb) = (vec![0u8; COMPARE_CHUNK], vec![0u8; COMPARE_CHUNK]);
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(COMPARE_CHUNK as u64) as usize;
        a.read_exact(&mut ba[..n]).map_err(|e| format!("read {}: {e}", source.display()))?;
        b.read_exact(&mut bb[..n]).map_err(|e| format!("read {}: {e}", restored.display()))?;
        if ba[..n] != bb[..n] {
            let at = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).expect("slices differ");
            return Err(format!("first differing byte at offset {}", off + at as u64));
        }
        off += n as u64;
    }
    Ok(la)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_finds_the_first_difference_and_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data = vec![7u8; 3 * COMPARE_CHUNK + 5];
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        assert_eq!(compare_files(&a, &b), Ok(data.len() as u64));
        data[2 * COMPARE_CHUNK + 3] = 0;
        std::fs::write(&b, &data).unwrap();
        let e = compare_files(&a, &b).unwrap_err();
        assert!(e.contains(&format!("offset {}", 2 * COMPARE_CHUNK + 3)), "{e}");
        std::fs::write(&b, &data[..10]).unwrap();
        assert!(compare_files(&a, &b).unwrap_err().starts_with("size"));
    }

    #[test]
    fn images_are_sized_and_prefilled_reproducibly() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_image(&a, 4 << 20, 1 << 20, 5).unwrap();
        write_image(&b, 4 << 20, 1 << 20, 5).unwrap();
        let data = std::fs::read(&a).unwrap();
        assert_eq!(data.len(), 4 << 20);
        assert!(data[1 << 20..].iter().all(|&x| x == 0));
        assert!(data[..1 << 20].iter().filter(|&&x| x == 0).count() < 1 << 14);
        assert_eq!(data, std::fs::read(&b).unwrap());
        assert!(write_image(&a, 1, 0, 0).is_err(), "an existing image is not overwritten");
    }
}
