//! Resync, side by side: a protected disk that drifted by 1% (random 4 KiB
//! writes) brought back to its replica by `ferryctl resync` (fixed-block
//! checksums, 4 KiB blocks) and by `rsync --inplace --no-whole-file` (rolling
//! checksums) on the same two images, in the same run.
//!
//!     cargo bench --bench resync
//!
//! Steps: a disk of random data is protected by ferryd (`--auto-resync
//! manual`, frequency 1h so no cycle runs by itself) until Protected; the
//! disk is copied (`cp`) to `replica.img`, which then equals the target's
//! replica at the last recovery point; 1% of the disk is rewritten through
//! ferry's NBD export (fio `--ioengine=nbd --rw=randwrite --bs=4k
//! --io_size=1% --randrepeat=1 --refill_buffers --end_fsync=1`: distinct
//! blocks, fresh random data per write, then a flush); then
//!   * ferry: `ferryctl resync VM`, timed from the command until the Resync
//!     job is Succeeded (`jobs --json` polled every 50 ms), next to the job's
//!     own ended_ms - started_ms; bytes sent and blocks compared/sent come
//!     from the job detail. A watcher thread times the target-side phase:
//!     ferry restores the replica once into <data-dir>/scratch/VM and hashes
//!     it (the folder exists from the restore until the hashes are done).
//!     Then `replicate-now`, `test-failover --out DIR` and a byte compare of
//!     DIR/d.img with the source: any difference fails the bench.
//!   * rsync: `rsync --inplace --no-whole-file --ignore-times --stats SRC
//!     replica.img` (local to local; --no-whole-file forces the delta
//!     algorithm), wall time measured around the process, "Total bytes
//!     sent", "Literal data" and "Matched data" parsed from --stats; then a
//!     byte compare of replica.img with the source.
//!
//! Both start with `sync` done and every image in the page cache.
//! Environment: FERRY_BENCH_DISK_MIB (disk size, default 1024),
//! FERRY_BENCH_CHANGE_PERMILLE (share of the disk rewritten, in 1/1000,
//! default 10 = 1%), FERRY_BENCH_DIR (where the temp folder goes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::harness::bench::{bench_dir, env_u64, mib, print_table, sync_all};
use ferry::harness::process::run_ok;
use ferry::harness::{require_tool, write_image, Daemon, ResyncDetail};

const VM: &str = "resync";
const BLOCK: u64 = 4096;
/// ferry's resync block (engine `DEFAULT_RESYNC_BLOCK`).
const FERRY_BLOCK: u64 = 4 << 10; // ferry_engine::resync::DEFAULT_RESYNC_BLOCK

/// rsync's default block length for a file of `len` bytes (protocol >= 30):
/// the square root rounded down to a multiple of 8, within 700..=128 KiB.
fn rsync_block(len: u64) -> u64 {
    const MIN: u64 = 700;
    const MAX: u64 = 1 << 17;
    if len < MIN * MIN {
        return MIN;
    }
    let mut c: u64 = 1;
    let mut l = len;
    loop {
        l >>= 2;
        if l == 0 {
            break;
        }
        c <<= 1;
    }
    if c >= MAX {
        return MAX;
    }
    let mut b: u64 = 0;
    while c >= 8 {
        b |= c;
        if len < b * b {
            b &= !c;
        }
        c >>= 1;
    }
    b.max(MIN)
}

/// How two images of the same size differ: the 4 KiB blocks that differ
/// and how many distinct blocks of `coarse` sizes they touch.
struct Diff {
    blocks_4k: u64,
    first: Option<u64>,
    touched: Vec<(u64, u64)>,
}

fn compare(a: &Path, b: &Path, coarse: &[u64]) -> Diff {
    use std::io::Read;
    let la = std::fs::metadata(a).unwrap_or_else(|e| panic!("{}: {e}", a.display())).len();
    let lb = std::fs::metadata(b).unwrap_or_else(|e| panic!("{}: {e}", b.display())).len();
    assert_eq!(la, lb, "{} is {la} bytes, {} is {lb}", a.display(), b.display());
    let open = |p: &Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut d = Diff { blocks_4k: 0, first: None, touched: coarse.iter().map(|&c| (c, 0)).collect() };
    let mut last: Vec<Option<u64>> = vec![None; coarse.len()];
    let mut off = 0u64;
    while off < la {
        let n = ((la - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).expect("read image");
        fb.read_exact(&mut bb[..n]).expect("read image");
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(BLOCK as usize).zip(bb[..n].chunks(BLOCK as usize)).enumerate() {
                if x == y {
                    continue;
                }
                let at = off + i as u64 * BLOCK;
                d.blocks_4k += 1;
                d.first.get_or_insert(at);
                for (k, &c) in coarse.iter().enumerate() {
                    if last[k] != Some(at / c) {
                        last[k] = Some(at / c);
                        d.touched[k].1 += 1;
                    }
                }
            }
        }
        off += n as u64;
    }
    d
}

fn assert_same(what: &str, expected: &Path, got: &Path) {
    let d = compare(expected, got, &[]);
    assert!(
        d.blocks_4k == 0,
        "{what}: {} differs from {} in {} blocks of 4 KiB, first at byte {}",
        got.display(),
        expected.display(),
        d.blocks_4k,
        d.first.unwrap_or(0)
    );
}

/// A number after `label` in rsync's --stats ("Literal data: 1,234 bytes").
fn stat(out: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in rsync --stats output:\n{out}"));
    let digits: String = line
        .trim_start_matches(':')
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap_or_else(|_| panic!("{label}: cannot parse {line:?}"))
}

/// A log line without its ANSI colour sequences (ESC [ ... letter).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `ferryd`'s read and written bytes so far (rchar, wchar of /proc/PID/io:
/// page-cache hits included).
fn proc_io(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let get = |k: &str| s.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse().ok());
    Some((get("rchar:")?, get("wchar:")?))
}

/// When ferry's resync scratch folder appeared, when the restored image in
/// it was complete (`<disk>.img.partial` fsynced and renamed to
/// `<disk>.img`) and when the folder was removed (target hashes done).
#[derive(Default, Clone, Copy)]
struct ScratchTimes {
    appeared: Option<Instant>,
    restored: Option<Instant>,
    gone: Option<Instant>,
}

/// Polls ferry's resync scratch folder every 2 ms.
struct ScratchWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<ScratchTimes>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl ScratchWatch {
    fn start(dir: PathBuf, image: PathBuf) -> ScratchWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(ScratchTimes::default()));
        let (s, w) = (stop.clone(), seen.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let now = Instant::now();
                let exists = dir.exists();
                let ready = exists && image.exists();
                let mut g = w.lock().unwrap();
                if exists {
                    g.appeared.get_or_insert(now);
                    if ready {
                        g.restored.get_or_insert(now);
                    }
                    g.gone = None;
                } else if g.appeared.is_some() && g.gone.is_none() {
                    g.gone = Some(now);
                }
                drop(g);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        ScratchWatch { stop, seen, handle: Some(handle) }
    }

    fn finish(mut self) -> ScratchTimes {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        *self.seen.lock().unwrap()
    }
}

struct FerryResync {
    to_succeeded: Duration,
    job_secs: f64,
    point: u64,
    compared: u64,
    sent_blocks: u64,
    bytes_sent: u64,
    /// From the command: scratch folder appeared, restored image complete, folder removed.
    scratch: Option<(Duration, Option<Duration>, Duration)>,
    io: Option<(u64, u64)>,
    job: serde_json::Value,
}

fn ferry_resync(ferryd: &Daemon) -> FerryResync {
    let scratch_dir = ferryd.data_dir().join("scratch").join(VM);
    let jobs_before = ferryd
        .ctl_json(&["jobs", "--vm", VM])
        .as_array()
        .map_or(0, |a| a.iter().filter(|j| j["kind"] == "Resync").count());
    sync_all();
    let io0 = proc_io(ferryd.pid());
    let watch = ScratchWatch::start(scratch_dir.clone(), scratch_dir.join("d.img"));
    let t0 = Instant::now();
    ferryd.ctl_ok(&["resync", VM, "--json"]);
    let job = loop {
        let jobs = ferryd.ctl_json(&["jobs", "--vm", VM]);
        let resyncs: Vec<_> = jobs.as_array().into_iter().flatten().filter(|j| j["kind"] == "Resync").collect();
        if resyncs.len() > jobs_before {
            let j = resyncs.iter().max_by_key(|j| j["id"].as_u64().unwrap_or(0)).unwrap();
            match j["status"].as_str() {
                Some("Succeeded") => break (*j).clone(),
                Some("Failed") => panic!("the resync failed: {j}\n{}", ferryd.show(VM)),
                _ => {}
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(1800), "no Succeeded Resync job within 30 min: {jobs}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let to_succeeded = t0.elapsed();
    let seen = watch.finish();
    let io1 = proc_io(ferryd.pid());
    let detail = job["detail"].as_str().unwrap_or_default();
    let ResyncDetail { point, compared, sent_blocks, bytes_sent } = ResyncDetail::parse(detail);
    let started = job["started_ms"].as_u64().unwrap_or(0);
    let ended = job["ended_ms"].as_u64().unwrap_or(0);
    FerryResync {
        to_succeeded,
        job_secs: ended.saturating_sub(started) as f64 / 1000.0,
        point,
        compared,
        sent_blocks,
        bytes_sent,
        scratch: match (seen.appeared, seen.gone) {
            (Some(a), Some(g)) => Some((a - t0, seen.restored.map(|r| r - t0), g - t0)),
            _ => None,
        },
        io: match (io0, io1) {
            (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
            _ => None,
        },
        job,
    }
}

fn main() {
    let disk_mib = env_u64("FERRY_BENCH_DISK_MIB", 1024);
    let permille = env_u64("FERRY_BENCH_CHANGE_PERMILLE", 10);
    assert!((1..500).contains(&permille), "FERRY_BENCH_CHANGE_PERMILLE must be in 1..500");
    let size = disk_mib << 20;
    let writes = size / BLOCK * permille / 1000;
    assert!(writes > 0, "the disk is too small for one write");

    let fio = require_tool("fio");
    let rsync = require_tool("rsync");
    let dir = bench_dir("ferry-bench-resync-");
    let src = dir.path().join("disk.img");
    let replica = dir.path().join("replica.img");
    let failover = dir.path().join("failover");

    eprintln!("writing a {disk_mib} MiB random image in {}", dir.path().display());
    write_image(&src, size, |_| true);
    sync_all();

    let mut ferryd =
        Daemon::builder().in_dir(&dir.path().join("ferry")).args(&["--auto-resync", "manual"]).log("info").start();
    eprintln!("ferryd pid {} at {}", ferryd.pid(), ferryd.endpoint);
    let disk_arg = format!("d={}", src.display());
    ferryd.ctl_ok(&["protect", VM, "--disk", &disk_arg, "--frequency", "1h"]);
    let t = Instant::now();
    ferryd.wait_state_every(VM, "Protected", Duration::from_millis(100), Duration::from_secs(1800));
    let waited = t.elapsed();
    eprintln!("Protected after {:.1}s", waited.as_secs_f64());
    let base_point = ferryd.show(VM)["last_recovery_point"].as_u64().unwrap_or(0);

    // The replica at the last point, for rsync.
    run_ok(Command::new("cp").arg("--sparse=never").arg(&src).arg(&replica), Duration::from_secs(600));

    // 1% of the disk in random 4 KiB writes through ferry's NBD export, then a flush.
    let uri = format!("nbd+unix:///{VM}/d?socket={}", ferryd.socket.display());
    let fio_args = vec![
        "--name=drift".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=randwrite".to_string(),
        "--bs=4k".to_string(),
        format!("--size={size}"),
        format!("--io_size={}", writes * BLOCK),
        "--randrepeat=1".to_string(),
        "--refill_buffers".to_string(),
        "--iodepth=16".to_string(),
        "--end_fsync=1".to_string(),
    ];
    eprintln!("fio: {writes} random 4 KiB writes through NBD");
    run_ok(Command::new(&fio).args(&fio_args), Duration::from_secs(600));
    let state = ferryd.show(VM);
    assert_eq!(state["state"], "Protected", "after the writes: {state}");
    let pending = state["disks"][0]["pending_log_bytes"].as_u64().unwrap_or(0)
        + state["disks"][0]["active_log_bytes"].as_u64().unwrap_or(0);
    let rblock = rsync_block(size);
    let drift = compare(&src, &replica, &[FERRY_BLOCK, rblock]);
    assert_eq!(drift.blocks_4k, writes, "fio should have changed exactly {writes} distinct 4 KiB blocks");
    let touched_ferry = drift.touched[0].1;
    let touched_rsync = drift.touched[1].1;

    // ferry.
    eprintln!("ferry: resync...");
    let f = ferry_resync(&ferryd);
    ferryd.wait_state_every(VM, "Protected", Duration::from_millis(100), Duration::from_secs(600));
    let rn = ferryd.ctl_json_timeout(&["replicate-now", VM], Duration::from_secs(600));
    let t = Instant::now();
    let out = failover.display().to_string();
    let fo = ferryd.ctl_json_timeout(&["test-failover", VM, "--out", &out], Duration::from_secs(1800));
    let failover_secs = t.elapsed().as_secs_f64();
    assert_eq!(fo["status"], "Succeeded", "test-failover: {fo}");
    assert_same("ferry test failover after the resync", &src, &failover.join("d.img"));
    let show = ferryd.show(VM);
    let committed: Vec<String> =
        ferryd.stderr().lines().filter(|l| l.contains("resync committed")).map(strip_ansi).collect();
    ferryd.stop();
    std::fs::remove_dir_all(&failover).expect("remove the failover copy");

    // rsync on the same two images.
    eprintln!("rsync...");
    sync_all();
    let rs = run_ok(
        Command::new(&rsync)
            .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
            .arg(&src)
            .arg(&replica),
        Duration::from_secs(1800),
    );
    let rsync_secs = rs.elapsed.as_secs_f64();
    let t = Instant::now();
    sync_all();
    let rsync_sync_secs = rsync_secs + t.elapsed().as_secs_f64();
    let rs_sent = stat(&rs.stdout, "Total bytes sent");
    let rs_received = stat(&rs.stdout, "Total bytes received");
    let rs_literal = stat(&rs.stdout, "Literal data");
    let rs_matched = stat(&rs.stdout, "Matched data");
    assert_same("rsync", &src, &replica);

    // Report.
    let ferry_secs = f.to_succeeded.as_secs_f64();
    let pct = |b: u64| 100.0 * b as f64 / size as f64;
    let row = |tool: &str, secs: f64, bytes: Option<u64>| {
        vec![
            tool.to_string(),
            format!("{secs:.2}"),
            bytes.map_or("-".into(), |b| format!("{:.1}", mib(b))),
            bytes.map_or("-".into(), |b| format!("{:.2}", pct(b))),
            format!("{:.2}", secs / rsync_secs),
            bytes.map_or("-".into(), |b| format!("{:.2}", b as f64 / rs_sent as f64)),
        ]
    };
    let rows = vec![
        row("ferry: ferryctl resync -> job Succeeded", ferry_secs, Some(f.bytes_sent)),
        row("ferry: Resync job ended_ms - started_ms", f.job_secs, Some(f.bytes_sent)),
        row("rsync --inplace --no-whole-file", rsync_secs, Some(rs_sent)),
        row("rsync --inplace --no-whole-file + sync", rsync_sync_secs, Some(rs_sent)),
    ];
    println!(
        "\nresync of a {disk_mib} MiB random disk after {writes} random 4 KiB writes ({:.1}% of the disk, \
         {:.1} MiB), local target, page cache warm, 2 shared cores",
        permille as f64 / 10.0,
        mib(writes * BLOCK)
    );
    println!("drift:  fio {}", fio_args.join(" "));
    println!(
        "ferry:  ferryd --auto-resync manual; ferryctl resync {VM}; poll ferryctl jobs --vm {VM} --json every 50 ms"
    );
    println!("rsync:  rsync --inplace --no-whole-file --ignore-times --stats SRC REPLICA_COPY");
    print_table(
        "ferry resync vs rsync (ratios = this / rsync, bytes = ferry's bytes put on the target, rsync's Total bytes sent)",
        &["tool", "wall s", "bytes sent MiB", "% of disk", "time / rsync", "bytes / rsync"],
        &rows,
    );
    println!(
        "\n  changed: {} blocks of 4 KiB, touching {touched_ferry} of {} ferry blocks ({} KiB) and {touched_rsync} of {} \
         rsync blocks ({} B)",
        drift.blocks_4k,
        size.div_ceil(FERRY_BLOCK),
        FERRY_BLOCK >> 10,
        size.div_ceil(rblock),
        rblock
    );
    println!(
        "  ferry: job {} -> recovery point {} (on top of point {base_point}): compared {} blocks, sent {} blocks \
         ({:.1} MiB of disk), {} bytes sent ({:.1} MiB); change logs dropped at the start: {:.1} MiB",
        f.job["id"],
        f.point,
        f.compared,
        f.sent_blocks,
        mib(f.sent_blocks * FERRY_BLOCK),
        f.bytes_sent,
        mib(f.bytes_sent),
        mib(pending)
    );
    match f.scratch {
        Some((appeared, restored, gone)) => {
            let secs = |d: Duration| d.as_secs_f64();
            let target_side = secs(gone) - secs(appeared);
            println!(
                "  ferry phases (scratch folder polled every 2 ms, from the command): {:.2}s until the scratch \
                 restore starts; {target_side:.2}s restoring the target replica into <data-dir>/scratch and hashing \
                 it ({:.0}% of the wall time{}); {:.2}s hashing the source, sending blocks, committing, seen Succeeded",
                secs(appeared),
                100.0 * target_side / ferry_secs,
                match restored {
                    Some(r) => format!(
                        ": restore incl. fsync of the scratch image {:.2}s, hash {:.2}s",
                        secs(r) - secs(appeared),
                        secs(gone) - secs(r)
                    ),
                    None => String::new(),
                },
                ferry_secs - secs(gone)
            );
        }
        None => println!("  ferry phases: the scratch folder was not seen (restore too short for a 2 ms poll?)"),
    }
    if let Some((r, w)) = f.io {
        println!(
            "  ferryd I/O during the resync (/proc/PID/io rchar, wchar): read {:.0} MiB, wrote {:.0} MiB ({:.1}x and \
             {:.1}x the disk)",
            mib(r),
            mib(w),
            r as f64 / size as f64,
            w as f64 / size as f64
        );
    }
    for l in &committed {
        println!("  ferryd log: {}", l.trim());
    }
    println!(
        "  after: replicate-now {}, test-failover latest in {failover_secs:.2}s = source (byte compare), VM {} at \
         point {}",
        rn["point"], show["state"], show["last_recovery_point"]
    );
    println!(
        "  rsync: Literal data {rs_literal} B ({:.1} MiB), Matched data {rs_matched} B ({:.1} MiB), Total bytes sent \
         {rs_sent} B, Total bytes received {rs_received} B ({:.1} MiB of block checksums); copy = source (byte compare)",
        mib(rs_literal),
        mib(rs_matched),
        mib(rs_received)
    );
}
