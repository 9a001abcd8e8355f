//! fio over NBD, side by side: a disk protected by ferryd (its NBD export
//! `bench/d` on a Unix socket) against qemu-nbd serving an identical image
//! (`qemu-nbd -f raw --cache=writeback --aio=threads`).
//!
//!     cargo bench --bench nbd_fio
//!
//! The layout a user meets: a 16 GiB image, fallocated (as a hypervisor
//! creates a thick disk), replication every 10 s running in the background
//! during every ferry run (cycles rotate, upload and commit while fio
//! writes), and the two flush workloads (`--fsync=32`: a FLUSH every 32
//! writes, as a guest file system or database issues them) also on a
//! sparse (not preallocated) image. Runs are interleaved (ferry then
//! qemu-nbd in odd rounds, the other way in even rounds); each round's
//! ratio is printed, and the table gives medians.
//!
//! Environment: FERRY_BENCH_DISK_MIB (image size, default 16384),
//! FERRY_BENCH_SECS (fio runtime per run, default 10), FERRY_BENCH_ROUNDS
//! (default 3), FERRY_BENCH_FREQUENCY (the VM's replication frequency,
//! default 10s; `1h` measures the write path with no cycle during the
//! runs, which bounds what replication costs), FERRY_BENCH_IO_CAP_MIB (a write run also ends after this
//! much, default 2048, so the logs and the replica stay within the disk
//! space of a test machine; each run still measures MiB/s over its own
//! runtime), FERRY_BENCH_DIR (where the temp folder goes), FERRY_BENCH_ONLY
//! (only the cells whose "workload layout" name contains this text, e.g.
//! `rand write 4k qd32 fsync=32 sparse`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::harness::bench::{bench_dir, env_u64, mib, print_table, sync_all};
use ferry::harness::process::run_ok;
use ferry::harness::{require_tool, Daemon, Proc};

const VM: &str = "bench";

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    /// `--fsync=N`: a FLUSH every N writes (0: none).
    fsync: u32,
    writes: bool,
}

const WORKLOADS: [Workload; 5] = [
    Workload { name: "seq write 1M qd16", rw: "write", bs: "1M", iodepth: 16, fsync: 0, writes: true },
    Workload { name: "seq write 1M qd16 fsync=32", rw: "write", bs: "1M", iodepth: 16, fsync: 32, writes: true },
    Workload { name: "rand write 4k qd32", rw: "randwrite", bs: "4k", iodepth: 32, fsync: 0, writes: true },
    Workload { name: "rand write 4k qd32 fsync=32", rw: "randwrite", bs: "4k", iodepth: 32, fsync: 32, writes: true },
    Workload { name: "rand read 4k qd32", rw: "randread", bs: "4k", iodepth: 32, fsync: 0, writes: false },
];

#[derive(Default, Clone, Copy)]
struct FioSum {
    bytes: u64,
    runtime_ms: u64,
}

impl FioSum {
    fn mib_s(&self) -> f64 {
        if self.runtime_ms == 0 {
            return 0.0;
        }
        mib(self.bytes) / (self.runtime_ms as f64 / 1000.0)
    }
}

fn fio_args(uri: &str, w: &Workload, size: u64, secs: u64, cap: u64) -> Vec<String> {
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
    if w.fsync > 0 {
        a.push(format!("--fsync={}", w.fsync));
    }
    if w.writes {
        a.extend([format!("--io_size={cap}"), format!("--runtime={secs}")]);
    } else {
        a.extend(["--time_based".to_string(), format!("--runtime={secs}")]);
    }
    a
}

/// One fio run; its bytes and runtime for the workload's direction.
fn fio_once(fio: &Path, uri: &str, w: &Workload, size: u64, secs: u64, cap: u64) -> FioSum {
    let args = fio_args(uri, w, size, secs, cap);
    let r = run_ok(Command::new(fio).args(&args), Duration::from_secs(secs + 120));
    // fio may print notices before the JSON document.
    let json_start = r.stdout.find('{').unwrap_or_else(|| panic!("no JSON from fio: {}{}", r.stdout, r.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&r.stdout[json_start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{}", r.stdout));
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "fio reported an error: {job}\n{}", r.stderr);
    let dir = if w.writes { &job["write"] } else { &job["read"] };
    FioSum { bytes: dir["io_bytes"].as_u64().unwrap_or(0), runtime_ms: dir["runtime"].as_u64().unwrap_or(0) }
}

/// The VM's state after a ferry run; anything but Protected is reported.
fn ferry_state(ferryd: &Daemon) -> Option<String> {
    let v = ferryd.show(VM);
    let state = v["state"].as_str().unwrap_or("?");
    (state != "Protected").then(|| format!("state {state} ({})", v["reason"]))
}

fn start_qemu_nbd(qemu_nbd: &Path, image: &Path, socket: &Path) -> Proc {
    let mut cmd = Command::new(qemu_nbd);
    cmd.args(["-f", "raw", "-x", "d", "--cache=writeback", "--aio=threads", "--persistent"])
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

#[derive(Clone, Copy, PartialEq)]
enum Layout {
    Fallocated,
    Sparse,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Fallocated => "fallocated",
            Layout::Sparse => "sparse",
        }
    }
    fn make(self, path: &Path, size: u64) {
        let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        match self {
            Layout::Sparse => f.set_len(size).unwrap(),
            Layout::Fallocated => {
                use std::os::fd::AsRawFd;
                // SAFETY: fallocate on an open descriptor with in-range arguments.
                let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
                assert_eq!(rc, 0, "fallocate {}: {}", path.display(), std::io::Error::last_os_error());
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct to fill.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}

struct Cell {
    workload: &'static str,
    layout: Layout,
    ferry: Vec<f64>,
    qemu: Vec<f64>,
    problems: Vec<String>,
}

fn main() {
    // `cargo bench` passes --bench; we take no arguments.
    let disk_mib = env_u64("FERRY_BENCH_DISK_MIB", 16384);
    let secs = env_u64("FERRY_BENCH_SECS", 10).max(1);
    let rounds = env_u64("FERRY_BENCH_ROUNDS", 3).max(1);
    let cap = env_u64("FERRY_BENCH_IO_CAP_MIB", 2048).max(1) << 20;
    let size = disk_mib << 20;
    // FERRY_BENCH_ONLY: run only the cells whose "workload layout" contains this text.
    let frequency = std::env::var("FERRY_BENCH_FREQUENCY").unwrap_or_else(|_| "10s".into());
    let only = std::env::var("FERRY_BENCH_ONLY").ok().filter(|s| !s.is_empty());

    let fio = require_tool("fio");
    let qemu_nbd = require_tool("qemu-nbd");
    let mut cells: Vec<Cell> = Vec::new();
    for layout in [Layout::Fallocated, Layout::Sparse] {
        let workloads: Vec<&Workload> = WORKLOADS
            .iter()
            .filter(|w| layout == Layout::Fallocated || w.fsync > 0)
            .filter(|w| only.as_ref().is_none_or(|o| format!("{} {}", w.name, layout.name()).contains(o.as_str())))
            .collect();
        if workloads.is_empty() {
            continue;
        }
        let dir = bench_dir("ferry-bench-nbd-");
        // Images, a run's logs (deleted once a point commits) and the replica
        // (fio repeats its buffer contents, which compress well).
        let need = 2 * size * (layout == Layout::Fallocated) as u64 + 4 * cap;
        let free = free_bytes(dir.path());
        assert!(
            free > need + (2 << 30),
            "{} GiB free in {}, the {} layout needs about {} GiB: lower FERRY_BENCH_DISK_MIB, \
             FERRY_BENCH_ROUNDS or FERRY_BENCH_IO_CAP_MIB, or set FERRY_BENCH_DIR",
            free >> 30,
            dir.path().display(),
            layout.name(),
            need >> 30
        );
        let ferry_img = dir.path().join("ferry.img");
        let qemu_img: PathBuf = dir.path().join("qemu.img");
        layout.make(&ferry_img, size);
        layout.make(&qemu_img, size);
        let mut ferryd = Daemon::builder().in_dir(&dir.path().join("ferry")).log("warn").start();
        let disk_arg = format!("d={}", ferry_img.display());
        ferryd.ctl_ok(&["protect", VM, "--disk", &disk_arg, "--frequency", &frequency]);
        let t = Instant::now();
        ferryd.wait_state_every(VM, "Protected", Duration::from_millis(100), Duration::from_secs(1800));
        eprintln!("{} {disk_mib} MiB image: Protected after {:.1}s", layout.name(), t.elapsed().as_secs_f64());
        let qemu_sock = dir.path().join("qemu-nbd.sock");
        let qemu = start_qemu_nbd(&qemu_nbd, &qemu_img, &qemu_sock);
        let ferry_uri = format!("nbd+unix:///{VM}/d?socket={}", ferryd.socket.display());
        let qemu_uri = format!("nbd+unix:///d?socket={}", qemu_sock.display());
        let first = cells.len();
        for w in &workloads {
            cells.push(Cell { workload: w.name, layout, ferry: vec![], qemu: vec![], problems: vec![] });
        }
        for round in 1..=rounds {
            for (i, w) in workloads.iter().enumerate() {
                let cell = &mut cells[first + i];
                let mut run = |ferry: bool| {
                    sync_all();
                    let uri = if ferry { &ferry_uri } else { &qemu_uri };
                    let r = fio_once(&fio, uri, w, size, secs, cap);
                    if ferry {
                        cell.ferry.push(r.mib_s());
                        if let Some(p) = ferry_state(&ferryd) {
                            eprintln!("WARNING: after {} round {round}: {p}", w.name);
                            cell.problems.push(format!("round {round}: {p}"));
                        }
                    } else {
                        cell.qemu.push(r.mib_s());
                    }
                };
                if round % 2 == 1 {
                    run(true);
                    run(false);
                } else {
                    run(false);
                    run(true);
                }
                let (f, q) = (cell.ferry.last().unwrap(), cell.qemu.last().unwrap());
                eprintln!(
                    "round {round} {} {}: ferry {f:.1} MiB/s, qemu-nbd {q:.1} MiB/s, ratio {:.2}",
                    layout.name(),
                    w.name,
                    f / q
                );
            }
        }
        let show = ferryd.show(VM);
        eprintln!(
            "{} layout at the end: state {}, last recovery point {}, pending logs {} B",
            layout.name(),
            show["state"],
            show["last_recovery_point"],
            show["disks"][0]["pending_log_bytes"]
        );
        drop(qemu);
        ferryd.stop();
    }

    println!("\nfio --ioengine=nbd over Unix sockets, {disk_mib} MiB image, {secs}s per run (write runs end");
    println!(
        "after {} MiB at most), {rounds} rounds interleaved, ferry replicating every {frequency} meanwhile",
        cap >> 20
    );
    println!(
        "ferry:    {}",
        fio_args(&format!("nbd+unix:///{VM}/d?socket=SOCK"), &WORKLOADS[3], size, secs, cap).join(" ")
    );
    println!("qemu-nbd: qemu-nbd -f raw -x d --cache=writeback --aio=threads --persistent --socket=SOCK IMG");
    let rows: Vec<Vec<String>> = cells
        .iter()
        .map(|c| {
            let ratios: Vec<f64> = c.ferry.iter().zip(&c.qemu).map(|(f, q)| f / q).collect();
            vec![
                c.workload.to_string(),
                c.layout.name().to_string(),
                format!("{:.1}", median(c.ferry.clone())),
                format!("{:.1}", median(c.qemu.clone())),
                ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "),
                format!("{:.2}", median(ratios.clone())),
                if c.problems.is_empty() { "Protected".into() } else { c.problems.join("; ") },
            ]
        })
        .collect();
    print_table(
        "ferry vs qemu-nbd (ratio = ferry MiB/s / qemu-nbd MiB/s; medians over rounds)",
        &["workload", "image", "ferry MiB/s", "qemu MiB/s", "ratio per round", "median ratio", "ferry state"],
        &rows,
    );
}
