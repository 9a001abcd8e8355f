//! fio over NBD, side by side: a disk protected by ferryd (its NBD export
//! `bench/d` on a Unix socket) against qemu-nbd serving a byte-identical
//! copy of the same raw image (default cache = writeback, --aio=threads).
//!
//!     cargo bench --bench nbd_fio
//!
//! Environment: FERRY_BENCH_DISK_MIB (disk size, default 1024),
//! FERRY_BENCH_SECS (fio time per workload and tool, default 20),
//! FERRY_BENCH_ROUNDS (default 1), FERRY_BENCH_SLICE_PCT (write volume of one
//! fio run in a write workload, in % of the disk, default 40; 0 = a single
//! `--time_based` run), FERRY_BENCH_DIR (where the temp folder goes).
//!
//! Runs alternate ferry, qemu-nbd per workload. ferry writes every WRITE to
//! the disk and to its change log; when pending logs reach 50% of the disk
//! the VM needs a resync. A 20 s write run moves many times the disk size,
//! so write workloads run as slices of at most SLICE_PCT% of the disk, each
//! with `--io_size` (and `--runtime` = what is left of FERRY_BENCH_SECS),
//! until their fio runtimes add up to FERRY_BENCH_SECS; before each ferry
//! slice `ferryctl replicate-now` cuts a recovery point (uploads and deletes
//! the logs, untimed) and the state must be Protected. qemu-nbd runs the same
//! slices (no recovery point). MiB/s and IOPS = bytes and I/Os summed over the
//! slices / fio runtimes summed. Reads run once, `--time_based`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::harness::bench::{bench_dir, env_u64, mib, print_table, sync_all};
use ferry::harness::process::run_ok;
use ferry::harness::{require_tool, write_image, Daemon, Proc};

const VM: &str = "bench";

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    writes: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload { name: "seq write 1M qd16", rw: "write", bs: "1M", iodepth: 16, writes: true },
    Workload { name: "rand write 4k qd32", rw: "randwrite", bs: "4k", iodepth: 32, writes: true },
    Workload { name: "rand read 4k qd32", rw: "randread", bs: "4k", iodepth: 32, writes: false },
];

#[derive(Default, Clone, Copy)]
struct FioSum {
    bytes: u64,
    ios: u64,
    runtime_ms: u64,
    runs: u32,
}

impl FioSum {
    fn mib_s(&self) -> f64 {
        if self.runtime_ms == 0 {
            return 0.0;
        }
        mib(self.bytes) / (self.runtime_ms as f64 / 1000.0)
    }
    fn iops(&self) -> f64 {
        if self.runtime_ms == 0 {
            return 0.0;
        }
        self.ios as f64 / (self.runtime_ms as f64 / 1000.0)
    }
}

enum Limit {
    /// `--time_based --runtime=S`.
    Time(u64),
    /// `--io_size=B --runtime=S` (whichever ends first).
    Bytes(u64, u64),
}

fn fio_args(uri: &str, w: &Workload, size: u64, limit: &Limit) -> Vec<String> {
    let mut a = vec![
        "--name=bench".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.iodepth),
        format!("--size={size}"),
        "--numjobs=1".to_string(),
        "--output-format=json".to_string(),
    ];
    match limit {
        Limit::Time(s) => a.extend(["--time_based".to_string(), format!("--runtime={s}")]),
        Limit::Bytes(b, s) => a.extend([format!("--io_size={b}"), format!("--runtime={s}")]),
    }
    a
}

/// One fio run; its bytes, I/Os and runtime for the workload's direction.
fn fio_once(fio: &Path, uri: &str, w: &Workload, size: u64, limit: Limit) -> FioSum {
    let secs = match limit {
        Limit::Time(s) | Limit::Bytes(_, s) => s,
    };
    let args = fio_args(uri, w, size, &limit);
    let r = run_ok(Command::new(fio).args(&args), Duration::from_secs(secs + 120));
    // fio may print notices before the JSON document.
    let json_start = r.stdout.find('{').unwrap_or_else(|| panic!("no JSON from fio: {}{}", r.stdout, r.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&r.stdout[json_start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{}", r.stdout));
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "fio reported an error: {job}\n{}", r.stderr);
    let dir = if w.writes { &job["write"] } else { &job["read"] };
    FioSum {
        bytes: dir["io_bytes"].as_u64().unwrap_or(0),
        ios: dir["total_ios"].as_u64().unwrap_or(0),
        runtime_ms: dir["runtime"].as_u64().unwrap_or(0),
        runs: 1,
    }
}

/// What happened to the VM during ferry's runs of one workload.
#[derive(Default)]
struct FerryNotes {
    cut_points: u32,
    cut_time: Duration,
    problems: Vec<String>,
}

fn check_protected(ferryd: &Daemon, when: &str, notes: &mut FerryNotes) -> bool {
    let v = ferryd.show(VM);
    let state = v["state"].as_str().unwrap_or("?");
    if state != "Protected" {
        let msg = format!("{when}: state {state} ({})", v["reason"]);
        eprintln!("WARNING: {msg}");
        notes.problems.push(msg);
        return false;
    }
    true
}

/// Runs one workload on one server. `ferry`: cut a recovery point before
/// every write slice and check the state.
#[allow(clippy::too_many_arguments)]
fn run_workload(
    fio: &Path,
    uri: &str,
    w: &Workload,
    size: u64,
    secs: u64,
    slice: u64,
    ferry: Option<&Daemon>,
    notes: &mut FerryNotes,
) -> FioSum {
    if !w.writes || slice == 0 {
        if let (true, Some(f)) = (w.writes, ferry) {
            cut_point(f, notes);
        }
        sync_all();
        let r = fio_once(fio, uri, w, size, Limit::Time(secs));
        if let Some(f) = ferry {
            check_protected(f, &format!("after {}", w.name), notes);
        }
        return r;
    }
    let budget_ms = secs * 1000;
    let mut sum = FioSum::default();
    while sum.runtime_ms < budget_ms {
        if let Some(f) = ferry {
            if !cut_point(f, notes) {
                break;
            }
        }
        sync_all();
        let left_s = (budget_ms - sum.runtime_ms).div_ceil(1000).max(1);
        let r = fio_once(fio, uri, w, size, Limit::Bytes(slice, left_s));
        sum.bytes += r.bytes;
        sum.ios += r.ios;
        sum.runtime_ms += r.runtime_ms.max(1);
        sum.runs += 1;
        if let Some(f) = ferry {
            if !check_protected(f, &format!("after slice {} of {}", sum.runs, w.name), notes) {
                break;
            }
        }
    }
    sum
}

/// `ferryctl replicate-now`, then the VM must still be Protected.
fn cut_point(f: &Daemon, notes: &mut FerryNotes) -> bool {
    if !check_protected(f, "before replicate-now", notes) {
        return false;
    }
    let t = Instant::now();
    let r = f.ctl_timeout(&["replicate-now", VM, "--json"], Duration::from_secs(600));
    notes.cut_time += t.elapsed();
    if !r.ok() {
        let msg = format!("replicate-now failed: {}{}", r.stdout, r.stderr);
        eprintln!("WARNING: {msg}");
        notes.problems.push(msg);
        return false;
    }
    notes.cut_points += 1;
    check_protected(f, "after replicate-now", notes)
}

fn start_qemu_nbd(qemu_nbd: &Path, image: &Path, socket: &Path) -> Proc {
    let mut cmd = Command::new(qemu_nbd);
    cmd.args(["-f", "raw", "-x", "d", "--aio=threads", "--persistent"])
        .arg(format!("--socket={}", socket.display()))
        .arg(image)
        .stdin(std::process::Stdio::null());
    let mut p = Proc::spawn("qemu-nbd", &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(p.running(), "qemu-nbd exited at start");
        assert!(Instant::now() < deadline, "qemu-nbd socket not ready within 30s");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn main() {
    // `cargo bench` passes --bench; we take no arguments.
    let disk_mib = env_u64("FERRY_BENCH_DISK_MIB", 1024);
    let secs = env_u64("FERRY_BENCH_SECS", 20).max(1);
    let rounds = env_u64("FERRY_BENCH_ROUNDS", 1).max(1);
    let slice_pct = env_u64("FERRY_BENCH_SLICE_PCT", 40);
    assert!(slice_pct < 50, "FERRY_BENCH_SLICE_PCT must stay below the 50% resync rule");
    let size = disk_mib << 20;
    let slice = (size * slice_pct / 100) & !((1 << 20) - 1);

    let fio = require_tool("fio");
    let qemu_nbd = require_tool("qemu-nbd");
    let dir = bench_dir("ferry-bench-nbd-");
    let ferry_img = dir.path().join("ferry.img");
    let qemu_img: PathBuf = dir.path().join("qemu.img");

    eprintln!("writing a {disk_mib} MiB random image and its copy in {}", dir.path().display());
    write_image(&ferry_img, size, |_| true);
    run_ok(Command::new("cp").arg("--sparse=never").arg(&ferry_img).arg(&qemu_img), Duration::from_secs(600));
    sync_all();

    let mut ferryd = Daemon::builder().in_dir(&dir.path().join("ferry")).log("warn").start();
    eprintln!("ferryd pid {} at {}", ferryd.pid(), ferryd.endpoint);
    let disk_arg = format!("d={}", ferry_img.display());
    ferryd.ctl_ok(&["protect", VM, "--disk", &disk_arg, "--frequency", "30s"]);
    let t = Instant::now();
    ferryd.wait_state_every(VM, "Protected", Duration::from_millis(100), Duration::from_secs(900));
    let waited = t.elapsed();
    eprintln!("initial replication done: Protected after {:.1}s", waited.as_secs_f64());

    let qemu_sock = dir.path().join("qemu-nbd.sock");
    let qemu = start_qemu_nbd(&qemu_nbd, &qemu_img, &qemu_sock);
    eprintln!("qemu-nbd pid {}", qemu.id());

    let ferry_uri = format!("nbd+unix:///{VM}/d?socket={}", ferryd.socket.display());
    let qemu_uri = format!("nbd+unix:///d?socket={}", qemu_sock.display());

    let mut rows = Vec::new();
    let mut notes_all = Vec::new();
    for round in 1..=rounds {
        for w in &WORKLOADS {
            eprintln!("round {round}: {} on ferry...", w.name);
            let mut notes = FerryNotes::default();
            let f = run_workload(&fio, &ferry_uri, w, size, secs, slice, Some(&ferryd), &mut notes);
            eprintln!("round {round}: {} on qemu-nbd...", w.name);
            let mut unused = FerryNotes::default();
            let q = run_workload(&fio, &qemu_uri, w, size, secs, slice, None, &mut unused);
            let ratio = if q.mib_s() > 0.0 { f.mib_s() / q.mib_s() } else { f64::NAN };
            let state = if notes.problems.is_empty() { "Protected".to_string() } else { "NOT Protected".to_string() };
            rows.push(vec![
                if rounds > 1 { format!("{} #{round}", w.name) } else { w.name.to_string() },
                format!("{:.1}", f.mib_s()),
                format!("{:.0}", f.iops()),
                format!("{:.1}", q.mib_s()),
                format!("{:.0}", q.iops()),
                format!("{ratio:.2}"),
                format!("{}/{}", f.runs, q.runs),
                format!("{:.1}", f.runtime_ms as f64 / 1000.0),
                format!("{:.1}", q.runtime_ms as f64 / 1000.0),
                format!("{} ({:.1}s)", notes.cut_points, notes.cut_time.as_secs_f64()),
                state,
            ]);
            notes_all.push((w.name, notes));
        }
    }

    let final_show = ferryd.show(VM);
    drop(qemu);
    ferryd.stop();

    println!("\nfio --ioengine=nbd over Unix sockets, {disk_mib} MiB disk, {secs}s of fio runtime per cell,");
    println!(
        "write slices of {slice_pct}% of the disk ({} MiB) with a recovery point cut before each ferry slice",
        slice >> 20
    );
    println!("ferry:    {}", fio_args(&ferry_uri, &WORKLOADS[1], size, &Limit::Bytes(slice, secs)).join(" "));
    println!("qemu-nbd: qemu-nbd -f raw -x d --aio=threads --persistent --socket=SOCK IMG (cache=writeback)");
    println!("          {}", fio_args(&qemu_uri, &WORKLOADS[2], size, &Limit::Time(secs)).join(" "));
    print_table(
        "ferry vs qemu-nbd (ratio = ferry MiB/s / qemu-nbd MiB/s)",
        &[
            "workload",
            "ferry MiB/s",
            "ferry IOPS",
            "qemu MiB/s",
            "qemu IOPS",
            "ratio",
            "fio runs f/q",
            "ferry s",
            "qemu s",
            "points cut (time)",
            "ferry state",
        ],
        &rows,
    );
    for (name, notes) in &notes_all {
        for p in &notes.problems {
            println!("  {name}: {p}");
        }
    }
    println!(
        "\nferry VM at the end: state {}, last recovery point {}, pending logs {} B",
        final_show["state"], final_show["last_recovery_point"], final_show["disks"][0]["pending_log_bytes"]
    );
}
