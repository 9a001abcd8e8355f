//! Daemon crashes: `kill -9` of ferryd at many moments while a writer
//! issues WRITEs and FLUSHes through NBD, then a restart on the same
//! folders. The host stays up throughout.
//!
//! What it proves, after every restart:
//! (1) no acknowledged write is lost across a daemon crash: every WRITE
//!     whose reply arrived before the kill reads back, through NBD and in
//!     the image file (only a write in flight at the kill, sent with no
//!     reply, may or may not be there: its blocks are "unknown" and the
//!     bytes found become the model's truth);
//! (2) the recovery points listed before are still listed;
//! (3) the change log left open by the kill was trusted: the VM is
//!     `Protected` again (or back in the initial replication or resync it
//!     was killed in) without ever passing through `ResyncRequired`;
//! (3b) an initial replication killed part-way resumes: the same protection
//!     goes on (one generation on the target, one `InitialReplication` in
//!     the VM's history) and the objects the first run put stay on the
//!     target (a few in flight at the kill may be put again).
//!
//! On verification trials (and always at the end): (4) `replicate-now`
//! succeeds and a test failover at latest is the source disks byte for
//! byte, so every flushed write made before the kill is in the next
//! recovery point; (5) every listed point restores (none references a
//! missing object) and, when the test kept that point's contents, equals
//! them.
//!
//! The kills hit the moments a crash is hardest on, and the daemon's own
//! records show it (a job running at a kill is marked "interrupted" at the
//! restart): trial 0 kills during the initial replication once 8 MiB of it
//! is on the target (slowed by the throttle so it is surely running; it
//! resumes after the restart), every third trial from trial 1 kills
//! again during a resync an operator starts after the restart (slowed by
//! target latency, and killed once `show` reports `Resynchronizing`), the
//! others at random moments of the delta cycles. The test requires at least one
//! interrupted InitialReplication job and one interrupted Resync job.
//!
//! What it does not prove: that FLUSH makes writes durable against power
//! loss. A kill -9 leaves the kernel's page cache in place, so a write
//! handed to the kernel survives it whether or not anything was synced:
//! this test passes even if FLUSH never called fdatasync. That needs a test
//! that loses unsynced data (a VM power cut, dm-log-writes or a device
//! that drops unsynced writes); the writer still sends FLUSHes, as a guest
//! does, so the kills also land in the flush path.
//!
//! `FERRY_CRASH_TRIALS=N` sets the number of kill trials (default 12, at
//! least 2); `FERRY_CRASH_SEED=S` replays the random choices of the test
//! (not the daemon's timing).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::harness::nbd::NbdClient;
use ferry::harness::{assert_same_bytes, random_disk, read_file, Daemon, MIB};
use rand::{Rng, RngCore, SeedableRng};

const SIZE: u64 = 32 * MIB;
const BLOCK: u64 = 4096;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
const DISKS: [&str; 2] = ["a", "b"];
const VM: &str = "vm1";
/// Known point contents kept on disk for comparison (older ones are dropped).
const KEEP_POINTS: usize = 4;

/// What a disk must contain: `bytes` wherever `known`; unknown blocks were
/// being written (sent, not yet acknowledged) when the daemon was killed.
struct DiskModel {
    bytes: Vec<u8>,
    known: Vec<bool>,
}

struct Model {
    disks: Vec<DiskModel>,
}

#[derive(Default, Debug)]
struct WriterStats {
    flushes: u64,
    acked_writes: u64,
    /// A write sent whose reply never came (the kill): 0 or 1.
    unacked_writes: u64,
    error: Option<String>,
}

/// The writer's pace: 4 MiB/s over both disks, a busy guest's churn. Faster,
/// a slow machine's cycles fall behind and a disk's pending logs reach the
/// 50% rule (16 MiB of a 32 MiB disk): a resync the kill did not cause.
const WRITER_BYTES_PER_SEC: f64 = 4.0 * MIB as f64;

/// Writes random batches (1..6 writes of 4 KiB..256 KiB, mostly at most
/// 32 KiB, then FLUSH) to both disks until `stop` or until the server goes
/// away, at most [`WRITER_BYTES_PER_SEC`]. A write enters the model when its
/// reply arrives; while it is in flight its blocks are unknown.
fn writer(socket: PathBuf, stop: Arc<AtomicBool>, model: Arc<Mutex<Model>>, seed: u64) -> WriterStats {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut stats = WriterStats::default();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut conns = Vec::new();
    for disk in DISKS {
        match NbdClient::connect(&socket, &format!("{VM}/{disk}")) {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(kind)) => panic!("export {VM}/{disk} refused ({kind:#x}) by a running ferryd"),
            Err(e) => {
                stats.error = Some(format!("connect: {e}"));
                return stats;
            }
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let i = rng.random_range(0..DISKS.len());
        let n = rng.random_range(1..=6);
        for _ in 0..n {
            let first = rng.random_range(0..BLOCKS);
            // One in eight large (128..256 KiB): logged by range, its bytes
            // left in the image (`capture::held`).
            let blocks = match rng.random_ratio(1, 8) {
                true => rng.random_range(32..=64),
                false => rng.random_range(1..=8),
            }
            .min(BLOCKS - first);
            sent += blocks as u64 * BLOCK;
            let off = first as u64 * BLOCK;
            let mut data = vec![0u8; blocks * BLOCK as usize];
            rng.fill_bytes(&mut data);
            model.lock().unwrap().disks[i].known[first..first + blocks].fill(false);
            // One request (at most 256 KiB): acknowledged whole or not at all.
            if let Err(e) = conns[i].write(off, &data) {
                stats.unacked_writes += 1;
                stats.error = Some(e.to_string());
                return stats;
            }
            let mut m = model.lock().unwrap();
            let dm = &mut m.disks[i];
            dm.bytes[off as usize..off as usize + data.len()].copy_from_slice(&data);
            dm.known[first..first + blocks].fill(true);
            stats.acked_writes += 1;
        }
        if let Err(e) = conns[i].flush() {
            stats.error = Some(e.to_string());
            return stats;
        }
        stats.flushes += 1;
        let due = Duration::from_secs_f64(sent as f64 / WRITER_BYTES_PER_SEC);
        let pause = due.saturating_sub(started.elapsed()).max(Duration::from_millis(rng.random_range(0..15)));
        std::thread::sleep(pause);
    }
    stats
}

/// The VM's state and running jobs now (one gRPC call), or "?" if the
/// daemon does not answer.
fn state_now(d: &Daemon) -> String {
    let out = d.ctl(&["--json", "jobs", "--vm", VM]);
    let running: Vec<String> = serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|j| j["status"] == "Running")
        .map(|j| j["kind"].as_str().unwrap_or("?").to_string())
        .collect();
    let out = d.ctl(&["--json", "show", VM]);
    let state = serde_json::from_str::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!("{state} (running jobs {running:?})")
}

/// Check (1): every known block reads back through NBD as the model says;
/// unknown blocks take the bytes found. Returns (known blocks checked,
/// blocks lost, adopted unknown blocks, description of the first loss).
fn check_acknowledged(d: &Daemon, model: &mut Model, paths: &[PathBuf]) -> (u64, u64, u64, Option<String>) {
    let (mut checked, mut lost, mut adopted, mut first) = (0, 0, 0, None);
    for (i, disk) in DISKS.iter().enumerate() {
        let mut c = NbdClient::open(&d.socket, &format!("{VM}/{disk}"));
        assert_eq!(c.size, SIZE);
        let got = c.read_all().unwrap_or_else(|e| panic!("NBD read of {VM}/{disk} after the restart: {e}"));
        drop(c);
        // The export and the file under it agree.
        assert_same_bytes(&format!("{disk}: NBD read vs source file"), &got, &read_file(&paths[i]));
        let dm = &mut model.disks[i];
        for b in 0..BLOCKS {
            let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
            if dm.known[b] {
                checked += 1;
                if got[r.clone()] != dm.bytes[r.clone()] {
                    lost += 1;
                    first.get_or_insert_with(|| format!("disk {disk} block {b} (offset {:#x})", r.start));
                }
            } else {
                dm.bytes[r.clone()].copy_from_slice(&got[r]);
                dm.known[b] = true;
                adopted += 1;
            }
        }
        // What was lost is gone: the model follows the disk from now on,
        // so one loss is not counted again at every trial.
        dm.bytes.copy_from_slice(&got);
    }
    (checked, lost, adopted, first)
}

/// Ids of the VM's jobs of `kind` that the daemon found running when it
/// started again (marked failed, "interrupted: ..."): a kill hit them.
fn interrupted(d: &Daemon, kind: &str) -> BTreeSet<u64> {
    d.jobs_of(VM)
        .iter()
        .filter(|j| {
            j["kind"] == kind
                && j["status"] == "Failed"
                && j["error"].as_str().is_some_and(|e| e.starts_with("interrupted: the daemon stopped"))
        })
        .map(|j| j["id"].as_u64().expect("job id"))
        .collect()
}

/// Polls `show` (as fast as ferryctl answers) until the VM is
/// Resynchronizing. `Err` with why there is nothing to kill: a resync
/// started at or after `since_ms` ended first, the initial replication a
/// kill interrupted still runs (a resync is refused meanwhile), or
/// `timeout` passed.
fn wait_resynchronizing(d: &Daemon, since_ms: u64, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut state = String::new();
    while Instant::now() < deadline {
        let out = d.ctl(&["--json", "show", VM]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        state = v["state"].as_str().unwrap_or("?").to_string();
        match state.as_str() {
            "Resynchronizing" => return Ok(()),
            "EnablingProtection" | "InitialReplication" | "FinalizingProtection" => {
                return Err(format!("no resync: the initial replication still runs ({state})"))
            }
            "Protected" => {
                let ended = d.jobs_of(VM).iter().any(|j| {
                    j["kind"] == "Resync" && j["status"] != "Running" && j["started_ms"].as_u64() >= Some(since_ms)
                });
                if ended {
                    return Err("the resync ended before it could be killed".into());
                }
            }
            _ => {}
        }
    }
    Err(format!("not Resynchronizing within {timeout:?} (last state {state})"))
}

/// Every object file under `dir` and its inode (a put writes a new file and
/// renames it over the key, so an object put again has a new inode).
fn stored_objects(dir: &Path) -> BTreeMap<String, u64> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if !e.file_name().to_string_lossy().starts_with('.') {
                out.insert(e.path().to_string_lossy().into_owned(), m.ino());
            }
        }
    }
    out
}

/// Polls `jobs` until a running job of `kind` has done `bytes`.
fn wait_job_bytes(d: &Daemon, kind: &str, bytes: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !d
        .jobs_of(VM)
        .iter()
        .any(|j| j["kind"] == kind && j["status"] == "Running" && j["bytes_done"].as_u64().is_some_and(|b| b >= bytes))
    {
        assert!(
            Instant::now() < deadline,
            "no {kind} job with {bytes} bytes done within {timeout:?}: {}",
            state_now(d)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main_points_still_listed(d: &Daemon, seen: &BTreeSet<u64>) -> Vec<u64> {
    let listed = d.point_seqs(VM);
    let missing: Vec<_> = seen.iter().filter(|s| !listed.contains(s)).collect();
    assert!(missing.is_empty(), "recovery points {missing:?} vanished after the restart; listed {listed:?}");
    listed
}

fn disks_equal(dir: &Path, paths: &[PathBuf], what: &str) {
    for (disk, src) in DISKS.iter().zip(paths) {
        assert_same_bytes(&format!("{what}: {disk}"), &read_file(&dir.join(format!("{disk}.img"))), &read_file(src));
    }
}

/// Checks (2) and (3). Returns the latest point and a description.
fn catch_up_and_verify(
    d: &Daemon,
    model: &Model,
    paths: &[PathBuf],
    seen: &mut BTreeSet<u64>,
    known: &mut BTreeMap<u64, PathBuf>,
    rng: &mut impl Rng,
    t: usize,
) -> String {
    let started = Instant::now();
    let point = d.replicate_now_retry(VM, Duration::from_secs(120));
    let listed = main_points_still_listed(d, seen);
    let latest = *listed.last().expect("a point after replicate-now");
    if let Some(p) = point {
        assert_eq!(p, latest, "replicate-now's point is the latest listed: {listed:?}");
    }
    for (i, disk) in DISKS.iter().enumerate() {
        assert_same_bytes(&format!("{disk}: source vs model"), &read_file(&paths[i]), &model.disks[i].bytes);
    }
    // (2) latest equals the source, byte for byte.
    let out = d.dir().join(format!("points/{latest}-t{t}"));
    let job = d.test_failover(VM, "latest", &out);
    assert!(job["detail"].as_str().unwrap_or_default().starts_with(&format!("recovery point {latest} ")), "{job}");
    disks_equal(&out, paths, &format!("test failover at latest ({latest})"));
    if let Some(old) = known.insert(latest, out) {
        let _ = std::fs::remove_dir_all(old);
    }
    while known.len() > KEEP_POINTS {
        let (_, dir) = known.pop_first().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
    seen.extend(listed.iter().copied());
    // (3) a random earlier point restores; compared when its contents are known.
    let mut older = "none".to_string();
    if listed.len() > 1 {
        let p = listed[rng.random_range(0..listed.len() - 1)];
        let out = d.dir().join(format!("older-t{t}"));
        d.test_failover(VM, &p.to_string(), &out);
        let compared = if let Some(dir) = known.get(&p) {
            for disk in DISKS {
                let f = format!("{disk}.img");
                assert_same_bytes(
                    &format!("point {p} restored again: {disk}"),
                    &read_file(&out.join(&f)),
                    &read_file(&dir.join(&f)),
                );
            }
            " (compared)"
        } else {
            ""
        };
        std::fs::remove_dir_all(&out).unwrap();
        older = format!("{p}{compared}");
    }
    let resyncs = d.jobs_of(VM).iter().filter(|j| j["kind"] == "Resync" && j["status"] == "Succeeded").count();
    format!(
        "caught up at point {latest} ({} points, {resyncs} resyncs so far) in {:?}, older point {older} restored",
        listed.len(),
        started.elapsed()
    )
}

#[test]
fn kill9_loses_no_acknowledged_write_and_every_point_restores() {
    let started = Instant::now();
    // Trial 0 aims at the initial replication and trial 1 at a resync: at least two.
    let trials: usize = std::env::var("FERRY_CRASH_TRIALS")
        .ok()
        .map(|v| v.parse().expect("FERRY_CRASH_TRIALS: a number"))
        .unwrap_or(12)
        .max(2);
    let seed: u64 = std::env::var("FERRY_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash test: {trials} trials, seed {seed} (FERRY_CRASH_SEED={seed} replays the kill delays)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // Target latency, switched on for the restarts that aim at a resync.
    let faults = tempfile::Builder::new().prefix("ferry-faults").tempdir().unwrap();
    let faults = faults.path().join("faults.json");
    std::fs::write(&faults, "{}").unwrap();
    let mut d = Daemon::start_with(&[
        "--auto-resync",
        "immediately",
        "--policy-time-factor",
        "1000",
        "--faults",
        faults.to_str().unwrap(),
    ]);
    let paths: Vec<PathBuf> = DISKS.iter().map(|n| d.disks().join(format!("{n}.img"))).collect();
    let model = Model {
        disks: paths.iter().map(|p| DiskModel { bytes: random_disk(p, SIZE), known: vec![true; BLOCKS] }).collect(),
    };
    let model = Arc::new(Mutex::new(model));
    // 8 Mbps: the first initial copy (64 MiB of random data) takes over a
    // minute, so trial 0's kill lands inside it. Not kept across a restart
    // (ferryd starts unlimited), so the copy after it runs at full speed.
    d.ctl_json(&["throttle", "set", "--work-limit", "8Mbps", "--off-limit", "8Mbps"]);
    let specs: Vec<String> = DISKS.iter().zip(&paths).map(|(n, p)| format!("{n}={}", p.display())).collect();
    d.ctl_json(&["protect", VM, "--disk", &specs[0], "--disk", &specs[1], "--frequency", "1s"]);

    let mut seen = BTreeSet::new();
    let mut known = BTreeMap::new();
    let (mut total_lost, mut total_checked) = (0u64, 0u64);
    let mut losses = Vec::new();
    let mut kill_points = 0;
    let (mut hit_initial, mut hit_resync) = (BTreeSet::new(), BTreeSet::new());
    let mut aimed_at_resync = 0;
    for t in 0..trials {
        // Write, and kill: trial 0 during the (throttled) initial
        // replication; the others at a random moment of the delta cycles
        // (rotation, upload, manifest commit) while the writer runs.
        if t == 0 {
            // Some parts on the target first, so the resume has something to keep
            // (the writer starts after: its changes would reach the 50% rule).
            wait_job_bytes(&d, "InitialReplication", 8 * MIB, Duration::from_secs(60));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (socket, stop, model, s) = (d.socket.clone(), stop.clone(), model.clone(), rng.random());
            std::thread::spawn(move || writer(socket, stop, model, s))
        };
        let vm_root = d.replica_dir().join("vms").join(VM);
        let delay = Duration::from_millis(if t == 0 { rng.random_range(0..600) } else { rng.random_range(300..2500) });
        std::thread::sleep(delay);
        let state = state_now(&d);
        d.kill9();
        kill_points += 1;
        stop.store(true, Ordering::Relaxed);
        let ws = w.join().expect("writer thread");
        // Every third trial from trial 1 kills again, during a resync an
        // operator starts after the restart: with target latency it runs
        // long enough to be caught by `show`.
        let aim_at_resync = t % 3 == 1;
        if aim_at_resync {
            std::fs::write(&faults, r#"{"latency_ms":40}"#).unwrap();
        }
        let put_before = stored_objects(&vm_root);
        let restarted_ms = unix_ms();
        d.start_again();
        let initial = interrupted(&d, "InitialReplication");
        if t == 0 {
            assert!(!initial.is_empty(), "trial 0's kill (in state {state}) hit no initial replication");
            // (3b) the copy resumes: same protection, the first run's objects kept.
            let v = d.wait_state(VM, "Protected", Duration::from_secs(120));
            let copies =
                v["transitions"].as_array().unwrap().iter().filter(|t| t["to"] == "InitialReplication").count();
            assert_eq!(copies, 1, "trial 0: the initial replication started over instead of resuming: {v:#}");
            let generations = std::fs::read_dir(&vm_root).unwrap().count();
            assert_eq!(generations, 1, "trial 0: one protection on the target");
            assert!(!put_before.is_empty(), "trial 0: the kill came after some parts were put");
            let after = stored_objects(&vm_root);
            let kept = put_before.iter().filter(|(k, v)| after.get(*k) == Some(v)).count();
            assert!(
                kept + 8 >= put_before.len(),
                "trial 0: {kept} of the {} objects put before the kill kept",
                put_before.len()
            );
            eprintln!(
                "trial 0: the initial copy resumed; {kept} of the {} objects put before the kill kept",
                put_before.len()
            );
        }
        hit_initial.extend(initial);

        let mut second = String::new();
        if aim_at_resync {
            aimed_at_resync += 1;
            // Refused while the initial copy trial 0's kill interrupted still runs.
            let _ = d.ctl(&["--json", "resync", VM]);
            let caught = wait_resynchronizing(&d, restarted_ms, Duration::from_secs(30));
            if caught.is_ok() {
                d.kill9(); // at once: the resync must still run
                kill_points += 1;
            }
            std::fs::write(&faults, "{}").unwrap();
            second = match caught {
                Ok(()) => {
                    d.start_again();
                    "; killed again once Resynchronizing".into()
                }
                Err(why) => format!("; not killed again: {why}"),
            };
        }
        let resyncs = interrupted(&d, "Resync");
        let new_resync_hits = resyncs.difference(&hit_resync).count();
        hit_resync.extend(resyncs);
        let after = state_now(&d);
        // (3) the open log was trusted: no resync was needed after any kill.
        let v = d.show(VM);
        let needed: Vec<_> =
            v["transitions"].as_array().expect("transitions").iter().filter(|t| t["to"] == "ResyncRequired").collect();
        assert!(needed.is_empty(), "trial {t}: a kill -9 (in state {state}) led to a resync: {needed:#?}");

        // (1) acknowledged writes survived; (2) earlier points still listed.
        let (checked, lost, adopted, first) = check_acknowledged(&d, &mut model.lock().unwrap(), &paths);
        main_points_still_listed(&d, &seen);
        total_checked += checked;
        total_lost += lost;
        if let Some(f) = &first {
            losses.push(format!("trial {t}: {lost} blocks, first at {f}"));
        }
        let verify = t % 2 == 1 || t + 1 == trials;
        let verified = if verify {
            let m = model.lock().unwrap();
            catch_up_and_verify(&d, &m, &paths, &mut seen, &mut known, &mut rng, t)
        } else {
            "not verified this trial".into()
        };
        eprintln!(
            "trial {t}: kill {delay:?} after the writer started in state {state}{second} (interrupted resyncs \
             +{new_resync_hits}); after restart {after}; writer: {} flushes, {} acknowledged writes, {} in flight \
             ({}); known blocks checked {checked}, unknown adopted {adopted}, losses {lost}; {verified}",
            ws.flushes,
            ws.acked_writes,
            ws.unacked_writes,
            ws.error.as_deref().unwrap_or("stopped")
        );
    }
    // (4) at the end: every point listed restores (none references a missing object).
    let listed = main_points_still_listed(&d, &seen);
    for p in &listed {
        let out = d.dir().join(format!("final-{p}"));
        d.test_failover(VM, &p.to_string(), &out);
        if let Some(dir) = known.get(p) {
            for disk in DISKS {
                let f = format!("{disk}.img");
                assert_same_bytes(&format!("point {p}: {disk}"), &read_file(&out.join(&f)), &read_file(&dir.join(&f)));
            }
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
    eprintln!("all {} points {listed:?} restore", listed.len());
    let durations: Vec<u64> = d
        .jobs_of(VM)
        .iter()
        .filter(|j| j["kind"] == "Resync" || j["kind"] == "InitialReplication")
        .map(|j| j["ended_ms"].as_u64().unwrap_or(0).saturating_sub(j["started_ms"].as_u64().unwrap_or(0)))
        .collect();
    eprintln!("initial replication and resync jobs took (ms): {durations:?}");
    d.assert_healthy();
    d.stop();
    eprintln!(
        "trials={trials} kill_points={kill_points} losses={total_lost} interrupted_initial={} interrupted_resync={} \
         (known blocks checked {total_checked}, {:?})",
        hit_initial.len(),
        hit_resync.len(),
        started.elapsed()
    );
    assert!(losses.is_empty(), "acknowledged writes lost after kill -9: {losses:#?}");
    assert!(!hit_initial.is_empty(), "no kill interrupted an initial replication");
    assert!(
        !hit_resync.is_empty(),
        "none of the {aimed_at_resync} kills aimed at a resync interrupted one (each resync ended first)"
    );
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as u64
}
