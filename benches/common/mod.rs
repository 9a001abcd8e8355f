//! Shared plumbing of the side-by-side benchmarks: building and starting
//! ferryd, running ferryctl and peer tools under timeouts, and guards that
//! kill every child process we start, on panic too.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `u64` from the environment, or `default` when unset or empty.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a non-negative integer"))
        }
        _ => default,
    }
}

/// Fails with the package to install when a tool is missing.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("`{tool}` is needed by this benchmark: run `bash scripts/bench.sh` or apt-get install -y {package}")
    })
}

/// A temporary folder for one benchmark: under $FERRY_BENCH_DIR if set
/// (pick a real disk; /tmp is used otherwise).
pub fn bench_dir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    match std::env::var_os("FERRY_BENCH_DIR").filter(|v| !v.is_empty()) {
        Some(d) => b.tempdir_in(d),
        None => b.tempdir(),
    }
    .expect("creating the benchmark temp dir")
}

/// A child process that is stopped when dropped: SIGTERM, a grace period,
/// then SIGKILL. Holds every long-running process the benchmarks start.
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_string(), child: Some(child) }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("process still held")
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!("{} did not stop within {grace:?} of SIGTERM: killing it", self.name);
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL at once (for short-lived tools that overran).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

/// Output of a finished tool.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Runs a tool to completion with stdin closed, killing it (SIGKILL) if it
/// overruns `timeout`. `Err` on overrun or when it cannot start.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Ran, String> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("cannot run {shown}: {e}"))?;
    let mut p = Proc { name: shown.clone(), child: Some(child) };
    let out = drain(p.child_mut().stdout.take());
    let err = drain(p.child_mut().stderr.take());
    let deadline = start + timeout;
    let status = loop {
        match p.child_mut().try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                p.kill();
                return Err(format!("{shown} did not finish within {timeout:?}: killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let elapsed = start.elapsed();
    p.child = None; // reaped
    Ok(Ran { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default(), elapsed })
}

/// Like [`run_timeout`] but panics unless the tool succeeds.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Ran {
    let shown = format!("{cmd:?}");
    let r = run_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.ok(), "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}", r.status, r.stdout, r.stderr);
    r
}

/// `sync`: start a measurement with no dirty pages left by the previous one.
pub fn sync_all() {
    run_ok(&mut Command::new("sync"), Duration::from_secs(300));
}

/// ferryd and ferryctl, built in release by the benchmark itself.
pub struct Bins {
    pub ferryd: PathBuf,
    pub ferryctl: PathBuf,
}

/// `cargo build --release --bins -p ferry-agents`; binaries in target/release.
pub fn build_agents() -> Bins {
    eprintln!("building ferryd and ferryctl (release)...");
    run_ok(
        Command::new(env!("CARGO"))
            .args(["build", "--release", "--bins", "-p", "ferry-agents"])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
        Duration::from_secs(1800),
    );
    // This benchmark runs as <target>/release/deps/<name>-<hash>, next to them.
    let exe = std::env::current_exe().expect("current exe");
    let mut dirs: Vec<PathBuf> = exe.parent().and_then(Path::parent).map(Path::to_path_buf).into_iter().collect();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    dirs.push(target.join("release"));
    let dir = dirs
        .into_iter()
        .find(|d| d.join("ferryd").is_file() && d.join("ferryctl").is_file())
        .expect("ferryd/ferryctl not found in target/release after the build");
    Bins { ferryd: dir.join("ferryd"), ferryctl: dir.join("ferryctl") }
}

/// A running ferryd on 127.0.0.1 (port 0) and a Unix socket in `dir`.
pub struct Ferryd {
    proc: Proc,
    pub endpoint: String,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub target: PathBuf,
    pub log: PathBuf,
    ferryctl: PathBuf,
}

pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

impl Ferryd {
    pub fn start(bins: &Bins, dir: &Path) -> Ferryd {
        Ferryd::start_with(bins, dir, &[], "warn")
    }

    /// Like [`Ferryd::start`], with more ferryd flags (`extra`, e.g.
    /// `["--auto-resync", "manual"]`) and a log filter (`log_filter`, RUST_LOG
    /// syntax) for its log file.
    pub fn start_with(bins: &Bins, dir: &Path, extra: &[&str], log_filter: &str) -> Ferryd {
        let data = dir.join("data");
        let target = dir.join("target");
        let socket = dir.join("nbd.sock");
        let log = dir.join("ferryd.log");
        std::fs::create_dir_all(&data).expect("data dir");
        let stderr = std::fs::File::create(&log).expect("ferryd log file");
        let mut cmd = Command::new(&bins.ferryd);
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--target")
            .arg(&target)
            .args(["--listen", "127.0.0.1:0", "--nbd-listen", "off", "--log", log_filter])
            .arg("--nbd-socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut proc = Proc::spawn("ferryd", &mut cmd);
        let stdout = proc.child_mut().stdout.take().expect("ferryd stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let endpoint = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("ferryd ready: ") {
                        let grpc = rest
                            .split_whitespace()
                            .find_map(|f| f.strip_prefix("grpc="))
                            .unwrap_or_else(|| panic!("no grpc= in {line:?}"));
                        break grpc.to_string();
                    }
                }
                Err(_) => {
                    let logged = std::fs::read_to_string(&log).unwrap_or_default();
                    panic!("ferryd did not print its ready line within 60s; its log:\n{logged}");
                }
            }
        };
        Ferryd { proc, endpoint, socket, data, target, log, ferryctl: bins.ferryctl.clone() }
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// `ferryctl --endpoint E ARGS`, under a timeout.
    pub fn ctl(&self, args: &[&str], timeout: Duration) -> Result<Ran, String> {
        run_timeout(Command::new(&self.ferryctl).arg("--endpoint").arg(&self.endpoint).args(args), timeout)
    }

    /// `ferryctl ... --json`, which must succeed; its JSON output.
    pub fn ctl_json(&self, args: &[&str], timeout: Duration) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let r = self.ctl(&all, timeout).unwrap_or_else(|e| panic!("{e}"));
        assert!(r.ok(), "ferryctl {args:?} failed ({}): {}{}", r.status, r.stdout, r.stderr);
        serde_json::from_str(r.stdout.trim())
            .unwrap_or_else(|e| panic!("ferryctl {args:?}: bad JSON ({e}): {}", r.stdout))
    }

    /// `show VM --json`.
    pub fn show(&self, vm: &str) -> serde_json::Value {
        self.ctl_json(&["show", vm], CTL_TIMEOUT)
    }

    pub fn state(&self, vm: &str) -> String {
        self.show(vm)["state"].as_str().unwrap_or("?").to_string()
    }

    /// Polls `show --json` every `every` until the state is `want`; panics on
    /// timeout or on a state that cannot lead there. Returns the time waited.
    pub fn wait_state(&self, vm: &str, want: &str, every: Duration, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let v = self.show(vm);
            let state = v["state"].as_str().unwrap_or("?");
            if state == want {
                return start.elapsed();
            }
            if matches!(state, "Critical" | "ResyncRequired" | "Paused" | "Unprotected") {
                panic!("{vm} went to {state} while waiting for {want}: {v}");
            }
            if start.elapsed() > timeout {
                panic!("{vm} not {want} within {timeout:?} (state {state}): {v}");
            }
            std::thread::sleep(every);
        }
    }

    /// Graceful stop (SIGTERM: seals logs), then the guard is done.
    pub fn stop(mut self) {
        self.proc.stop(Duration::from_secs(60));
    }
}

/// Prints a table with right-aligned columns (the first left-aligned).
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .enumerate()
            .map(
                |(i, c)| {
                    if i == 0 {
                        format!("{c:<width$}", width = w[i])
                    } else {
                        format!("{c:>width$}", width = w[i])
                    }
                },
            )
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n{title}");
    let head = line(header.to_vec());
    let _ = writeln!(out, "{head}");
    let _ = writeln!(out, "{}", "-".repeat(head.len()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
    let _ = out.flush();
}

/// Writes `len` bytes to `path`, chunk by chunk (1 MiB), as `random(i)`
/// says: random data for chunk `i` if true, explicit zeros otherwise. The
/// file is fully allocated either way.
pub fn write_image(path: &Path, len: u64, random: impl Fn(u64) -> bool) {
    use rand::RngCore;
    const CHUNK: u64 = 1 << 20;
    let f = std::fs::File::create(path).expect("create image");
    let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
    let mut rng = rand::rng();
    let mut buf = vec![0u8; CHUNK as usize];
    let zeros = vec![0u8; CHUNK as usize];
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        if random(i) {
            rng.fill_bytes(&mut buf[..n]);
            w.write_all(&buf[..n]).expect("write image");
        } else {
            w.write_all(&zeros[..n]).expect("write image");
        }
        done += n as u64;
        i += 1;
    }
    w.into_inner().expect("flush image").sync_all().expect("sync image");
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Bytes allocated under a path (du -sb would count apparent sizes).
pub fn disk_usage(path: &Path) -> u64 {
    let r = run_ok(Command::new("du").arg("-s").arg("--block-size=1").arg(path), Duration::from_secs(60));
    r.stdout.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}
