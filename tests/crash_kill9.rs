//! Crash safety: `kill -9` of ferryd at random moments while a writer
//! issues WRITEs and FLUSHes through NBD, then a restart on the same folders.
//!
//! After every restart: (1) every write acknowledged by a FLUSH before the
//! kill reads back through NBD (writes not flushed may or may not be there:
//! their blocks are "unknown" and the bytes found after the restart become
//! the model's truth); the recovery points listed before are still listed.
//! On verification trials (and always at the end): (2) once replication
//! catches up (`--auto-resync immediately`: the unclean log leads straight
//! to a resync), `replicate-now` succeeds and a test failover at latest is
//! the source disks byte for byte; (3) a test failover of a random earlier
//! point succeeds (no point references a missing object) and, when the test
//! knows that point's contents, equals them.
//!
//! `FERRY_CRASH_TRIALS=N` sets the number of kill points (default 12);
//! `FERRY_CRASH_SEED=S` replays the random choices of the test (not the daemon's timing).

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
/// written without a FLUSH acknowledged after them.
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
    flushed_writes: u64,
    unflushed_writes: u64,
    error: Option<String>,
}

/// Writes random batches (1..6 writes of 4 KiB..128 KiB, then FLUSH) to both
/// disks until `stop` or until the server goes away. A batch enters the
/// model only once its FLUSH is acknowledged; until then its blocks are unknown.
fn writer(socket: PathBuf, stop: Arc<AtomicBool>, model: Arc<Mutex<Model>>, seed: u64) -> WriterStats {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut stats = WriterStats::default();
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
        let mut batch = Vec::new();
        let mut result = Ok(());
        for _ in 0..n {
            let first = rng.random_range(0..BLOCKS);
            let blocks = rng.random_range(1..=32).min(BLOCKS - first);
            let off = first as u64 * BLOCK;
            let mut data = vec![0u8; blocks * BLOCK as usize];
            rng.fill_bytes(&mut data);
            model.lock().unwrap().disks[i].known[first..first + blocks].fill(false);
            result = conns[i].write(off, &data);
            batch.push((off, data));
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = conns[i].flush();
        }
        match result {
            Ok(()) => {
                let mut m = model.lock().unwrap();
                let dm = &mut m.disks[i];
                for (off, data) in &batch {
                    dm.bytes[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                    let b = (*off / BLOCK) as usize;
                    dm.known[b..b + data.len() / BLOCK as usize].fill(true);
                }
                stats.flushes += 1;
                stats.flushed_writes += batch.len() as u64;
            }
            Err(e) => {
                stats.unflushed_writes += batch.len() as u64;
                stats.error = Some(e.to_string());
                return stats;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
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
fn check_flushed(d: &Daemon, model: &mut Model, paths: &[PathBuf]) -> (u64, u64, u64, Option<String>) {
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
    assert!(job["detail"].as_str().unwrap_or_default().contains(&format!("recovery point {latest}")), "{job}");
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
fn kill9_at_random_moments_loses_no_flushed_write() {
    let started = Instant::now();
    let trials: usize = std::env::var("FERRY_CRASH_TRIALS")
        .ok()
        .map(|v| v.parse().expect("FERRY_CRASH_TRIALS: a number"))
        .unwrap_or(12)
        .max(1);
    let seed: u64 = std::env::var("FERRY_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("crash test: {trials} trials, seed {seed} (FERRY_CRASH_SEED={seed} replays the kill delays)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut d = Daemon::start_with(&["--auto-resync", "immediately", "--retry-time-scale", "0.001"]);
    let paths: Vec<PathBuf> = DISKS.iter().map(|n| d.disks().join(format!("{n}.img"))).collect();
    let model = Model {
        disks: paths.iter().map(|p| DiskModel { bytes: random_disk(p, SIZE), known: vec![true; BLOCKS] }).collect(),
    };
    let model = Arc::new(Mutex::new(model));
    let specs: Vec<String> = DISKS.iter().zip(&paths).map(|(n, p)| format!("{n}={}", p.display())).collect();
    d.ctl_json(&["protect", VM, "--disk", &specs[0], "--disk", &specs[1], "--frequency", "1s"]);

    let mut seen = BTreeSet::new();
    let mut known = BTreeMap::new();
    let (mut total_lost, mut total_checked) = (0u64, 0u64);
    let mut losses = Vec::new();
    let mut kill_points = 0;
    for t in 0..trials {
        // Write, and kill at a random moment: trial 0 early, during the
        // initial replication; the others in the delta cycles (rotation,
        // upload, manifest commit) while the writer runs.
        let stop = Arc::new(AtomicBool::new(false));
        let w = {
            let (socket, stop, model, s) = (d.socket.clone(), stop.clone(), model.clone(), rng.random());
            std::thread::spawn(move || writer(socket, stop, model, s))
        };
        let delay = Duration::from_millis(if t == 0 { rng.random_range(0..600) } else { rng.random_range(300..2500) });
        std::thread::sleep(delay);
        let state = state_now(&d);
        d.kill9();
        kill_points += 1;
        stop.store(true, Ordering::Relaxed);
        let ws = w.join().expect("writer thread");
        d.start_again();

        // A third of the trials kill again at once, during the recovery
        // (the resync that an unclean log starts takes about half a second
        // here), with no writes in between: the check below covers both kills.
        let mut second = String::new();
        if t > 0 && rng.random_bool(1.0 / 3.0) {
            let delay = Duration::from_millis(rng.random_range(0..500));
            std::thread::sleep(delay);
            let state = state_now(&d);
            d.kill9();
            kill_points += 1;
            d.start_again();
            second = format!("; killed again {delay:?} after the restart in state {state}");
        }
        let after = state_now(&d);

        // (1) flushed writes survived; earlier points still listed.
        let (checked, lost, adopted, first) = check_flushed(&d, &mut model.lock().unwrap(), &paths);
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
            "trial {t}: kill {delay:?} after the writer started in state {state}{second}; after restart {after}; \
             writer: {} flushes, {} flushed writes, {} unflushed ({}); known blocks checked {checked}, unknown \
             adopted {adopted}, losses {lost}; {verified}",
            ws.flushes,
            ws.flushed_writes,
            ws.unflushed_writes,
            ws.error.as_deref().unwrap_or("stopped")
        );
    }
    // (3) at the end: every point listed restores (none references a missing object).
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
        "trials={trials} kill_points={kill_points} losses={total_lost} (known blocks checked {total_checked}, {:?})",
        started.elapsed()
    );
    assert!(losses.is_empty(), "acknowledged (flushed) writes lost after kill -9: {losses:#?}");
}
