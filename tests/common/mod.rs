//! End-to-end harness: builds `ferryd` and `ferryctl` once per test process,
//! starts a daemon in a temporary folder, runs the CLI and the real NBD
//! clients (qemu-io, qemu-img) under timeouts, and stops what it starts.
//!
//! The root package cannot use `CARGO_BIN_EXE_*` (the binaries belong to
//! `ferry-agents`), so the binaries are built with the test's own cargo and
//! profile and found beside the test executable (`target/<profile>/deps/..`).

#![allow(dead_code)]

pub mod nbd;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rand::RngCore;

pub const MIB: u64 = 1 << 20;
/// Longest any client process (ferryctl, qemu-io, qemu-img) may run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long ferryd may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ferryd may take to stop after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `target/<profile>`, derived from this test executable (`target/<profile>/deps/<test>-<hash>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let deps = exe.parent().expect("deps folder");
    let dir = if deps.ends_with("deps") { deps.parent().expect("profile folder") } else { deps };
    dir.to_path_buf()
}

/// Builds `ferryd` and `ferryctl` (same profile as the test) once per test
/// process and returns their paths.
pub fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = target_dir();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--bins", "-p", "ferry-agents"]).current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == "release" {
            cmd.arg("--release");
        } else if profile != "debug" {
            cmd.args(["--profile", &profile]);
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(900));
        assert!(
            out.status.success(),
            "building ferryd/ferryctl failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let (ferryd, ferryctl) = (dir.join("ferryd"), dir.join("ferryctl"));
        assert!(ferryd.is_file(), "{} missing after the build", ferryd.display());
        assert!(ferryctl.is_file(), "{} missing after the build", ferryctl.display());
        (ferryd, ferryctl)
    })
}

/// Fails the test (never skips) when a client tool is not installed.
pub fn require_tool(tool: &str) -> PathBuf {
    let package = match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        other => other,
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`{tool}` is required by this test but not installed: apt-get install -y {package} \
             (or run scripts/install-test-deps.sh)"
        )
    })
}

/// Runs a command to completion with stdin closed, capturing stdout and
/// stderr; kills it and panics if it overruns `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let err = err_reader.join().unwrap_or_default();
            panic!("{shown} did not finish within {timeout:?}; killed. stderr:\n{}", String::from_utf8_lossy(&err));
        }
    };
    Output { status, stdout: out_reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() }
}

/// Waits for a child up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A file of `size` random bytes; returns its contents.
pub fn random_disk(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    rand::rng().fill_bytes(&mut data);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    data
}

/// Panics with the first differing offset when two images differ.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).expect("a difference");
        let last = got.len() - 1 - got.iter().rev().zip(want.iter().rev()).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: bytes differ from offset {first} ({first:#x}) to {last} ({last:#x}): got {:#04x}, want {:#04x}",
            got[first], want[first]
        );
    }
}

/// Runs qemu-io on one NBD URI with the given commands (`-c` each); asserts
/// that it exits 0 and that no command reports a failure.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Output {
    let qemu_io = require_tool("qemu-io");
    let mut cmd = Command::new(qemu_io);
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_with_timeout(&mut cmd, CLIENT_TIMEOUT);
    let shown = text(&out);
    let lower = shown.to_lowercase();
    assert!(
        out.status.success()
            && !lower.contains("failed")
            && !lower.contains("error")
            && !shown.contains("Pattern verification"),
        "qemu-io {uri} {commands:?} ({}):\n{shown}",
        out.status
    );
    out
}

/// Reads a whole export into a file with `qemu-img convert` and returns the bytes.
pub fn read_export(uri: &str, into: &Path) -> Vec<u8> {
    let qemu_img = require_tool("qemu-img");
    let mut cmd = Command::new(qemu_img);
    cmd.args(["convert", "-f", "raw", "-O", "raw", uri]).arg(into);
    let out = run_with_timeout(&mut cmd, CLIENT_TIMEOUT);
    assert!(out.status.success(), "qemu-img convert {uri} ({}):\n{}", out.status, text(&out));
    std::fs::read(into).unwrap_or_else(|e| panic!("reading {}: {e}", into.display()))
}

/// A running `ferryd` with its own data, target, socket and disks folders.
pub struct Daemon {
    pub root: tempfile::TempDir,
    pub endpoint: String,
    pub socket: PathBuf,
    child: Option<Child>,
    stdout_lines: Option<mpsc::Receiver<String>>,
    starts: u32,
    /// Extra ferryd flags, given on every (re)start.
    extra_args: Vec<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    /// Starts ferryd with extra flags (e.g. `--auto-resync immediately`),
    /// kept for every restart.
    pub fn start_with(extra_args: &[&str]) -> Daemon {
        let root = tempfile::Builder::new().prefix("ferry-e2e").tempdir().expect("temp dir");
        std::fs::create_dir_all(root.path().join("disks")).expect("disks folder");
        let socket = root.path().join("nbd.sock");
        let mut d = Daemon {
            root,
            endpoint: String::new(),
            socket,
            child: None,
            stdout_lines: None,
            starts: 0,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        d.spawn();
        d
    }

    /// How many times ferryd was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// The folder for source disk images.
    pub fn disks(&self) -> PathBuf {
        self.dir().join("disks")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    pub fn target_dir(&self) -> PathBuf {
        self.dir().join("target")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir().join("ferryd.stderr")
    }

    /// Everything ferryd wrote to stderr so far (all runs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// `nbd+unix:///<vm>/<disk>?socket=...`
    pub fn uri(&self, vm: &str, disk: &str) -> String {
        format!("nbd+unix:///{vm}/{disk}?socket={}", self.socket.display())
    }

    fn spawn(&mut self) {
        let (ferryd, _) = binaries();
        self.starts += 1;
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(self.stderr_path()).expect("stderr file");
        let mut child = Command::new(ferryd)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--target")
            .arg(self.target_dir())
            .args(["--listen", "127.0.0.1:0", "--nbd-listen", "off", "--log", "info"])
            .arg("--nbd-socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", ferryd.display()));
        let stdout = child.stdout.take().expect("stdout");
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("ferryd ready: ") {
                        let grpc = rest
                            .split_whitespace()
                            .find_map(|kv| kv.strip_prefix("grpc="))
                            .unwrap_or_else(|| panic!("no grpc= in the ready line: {line}"));
                        assert!(grpc.starts_with("http://127.0.0.1:") && !grpc.ends_with(":0"), "{line}");
                        assert!(rest.contains(&format!("nbd-socket={}", self.socket.display())), "{line}");
                        assert!(rest.contains("nbd-tcp=off"), "{line}");
                        self.endpoint = grpc.to_string();
                        break;
                    }
                }
                Err(_) => {
                    let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                    panic!(
                        "ferryd printed no ready line within {READY_TIMEOUT:?} (exit: {status:?}); stderr:\n{}",
                        self.stderr()
                    );
                }
            }
        }
        self.stdout_lines = Some(rx);
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().expect("ferryd is running").id() as i32
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// SIGTERM, wait (bounded), and assert a clean exit.
    pub fn stop(&mut self) {
        let pid = self.pid();
        // SAFETY: plain syscall on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM to ferryd");
        let mut child = self.child.take().expect("child");
        let status = match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ferryd did not stop within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}", self.stderr());
            }
        };
        assert!(status.success(), "ferryd exited with {status} after SIGTERM; stderr:\n{}", self.stderr());
        let lines: Vec<String> = self.stdout_lines.take().map(|rx| rx.try_iter().collect()).unwrap_or_default();
        assert!(lines.iter().any(|l| l == "ferryd stopped"), "no 'ferryd stopped' line: {lines:?}");
        assert!(!self.socket.exists(), "ferryd left its socket {} behind", self.socket.display());
    }

    /// Graceful stop, then start again on the same folders (new gRPC port).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// `kill -9` ferryd (no cleanup at all: change logs stay open, the
    /// socket stays behind) and reap it; asserts it was still running.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("ferryd is running");
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "ferryd died before the kill; stderr:\n{}",
            self.stderr()
        );
        // SAFETY: plain syscall on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0, "SIGKILL to ferryd");
        let status = wait_timeout(&mut child, STOP_TIMEOUT).expect("ferryd reaped after SIGKILL");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{status}");
        self.stdout_lines = None;
    }

    /// Starts ferryd again on the same folders after [`Daemon::kill9`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "ferryd is still running");
        self.spawn();
    }

    /// Runs `ferryctl --endpoint URL <args>`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let (_, ferryctl) = binaries();
        let mut cmd = Command::new(ferryctl);
        cmd.args(["--endpoint", &self.endpoint]).args(args).current_dir(self.dir());
        run_with_timeout(&mut cmd, CLIENT_TIMEOUT)
    }

    /// Runs `ferryctl --json <args>`, asserts success, parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "ferryctl {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("ferryctl {args:?}: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs ferryctl, asserts success, returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(out.status.success(), "ferryctl {args:?} failed ({}):\n{}", out.status, text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs ferryctl expecting a refusal: exit code 1 and a
    /// "ferryctl: <Code>: ..." message on stderr; returns that message.
    pub fn ctl_err(&self, args: &[&str], code: &str) -> String {
        let out = self.ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "ferryctl {args:?} should fail with exit 1:\n{}", text(&out));
        // An empty code: a refusal by ferryctl itself (bad flag value), not the daemon.
        let prefix = if code.is_empty() { "ferryctl: ".to_string() } else { format!("ferryctl: {code}: ") };
        assert!(stderr.starts_with(&prefix), "ferryctl {args:?} should fail with {code}, got:\n{stderr}");
        stderr
    }

    pub fn state(&self, vm: &str) -> String {
        self.ctl_json(&["show", vm])["state"].as_str().expect("state").to_string()
    }

    /// Polls `show` until the VM reaches `state`; fails on timeout or on a
    /// state that needs an operator.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.ctl_json(&["show", vm]);
            let now = v["state"].as_str().unwrap_or_default();
            if now == state {
                return v;
            }
            assert!(
                !matches!(now, "Critical" | "ResyncRequired") || state == now,
                "{vm} went {now} while waiting for {state}: {v:#}\nstderr:\n{}",
                self.stderr()
            );
            assert!(Instant::now() < deadline, "{vm} not {state} within {timeout:?}: {v:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts the daemon is running and never panicked.
    pub fn assert_healthy(&mut self) {
        assert!(self.alive(), "ferryd died; stderr:\n{}", self.stderr());
        let err = self.stderr();
        assert!(!err.contains("panicked"), "ferryd panicked:\n{err}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                // SAFETY: plain syscall on our own child's pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            }
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- ferryd stderr ({}) ---\n{}", self.stderr_path().display(), self.stderr());
        }
    }
}

/// Reads a whole file, panicking with its path on failure.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

impl Daemon {
    /// `recovery-points --json`: the seqs listed, in order.
    pub fn point_seqs(&self, vm: &str) -> Vec<u64> {
        let v = self.ctl_json(&["recovery-points", vm]);
        v.as_array().expect("points array").iter().map(|p| p["seq"].as_u64().expect("seq")).collect()
    }

    /// `jobs --vm VM --json`.
    pub fn jobs_of(&self, vm: &str) -> Vec<serde_json::Value> {
        self.ctl_json(&["jobs", "--vm", vm]).as_array().expect("jobs array").clone()
    }

    /// `replicate-now --json`, retried while the VM is not ready for it
    /// (FailedPrecondition while ResyncRequired / Resynchronizing, or a
    /// cycle that failed and is retried). Returns the new point's seq
    /// (`None`: nothing written since the last point). Panics on Critical or
    /// at the deadline.
    pub fn replicate_now_retry(&self, vm: &str, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let out = self.ctl(&["--json", "replicate-now", vm]);
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .unwrap_or_else(|e| panic!("replicate-now: not JSON ({e}): {}", text(&out)));
                return v["point"]["seq"].as_u64();
            }
            let state = self.ctl_json(&["show", vm]);
            assert_ne!(state["state"], "Critical", "{vm} went Critical: {state:#}\n{}", text(&out));
            assert!(
                Instant::now() < deadline,
                "replicate-now {vm} still failing after {tries} tries in {timeout:?}: {}\nVM: {state:#}",
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `test-failover VM --recovery-point POINT --out OUT` (waits for the
    /// job); asserts it succeeded and returns the job.
    pub fn test_failover(&self, vm: &str, point: &str, out: &Path) -> serde_json::Value {
        let out_s = out.to_str().expect("utf-8 path");
        let job = self.ctl_json(&["test-failover", vm, "--recovery-point", point, "--out", out_s]);
        assert_eq!(job["kind"], "TestFailover", "{job}");
        assert_eq!(job["status"], "Succeeded", "test failover of {vm} at {point}: {job}");
        job
    }

    /// Test failover at latest into `out`, compared byte for byte with the
    /// source disk files `(name, path)`.
    pub fn assert_failover_equals_sources(&self, vm: &str, out: &Path, disks: &[(&str, &Path)]) {
        let job = self.test_failover(vm, "latest", out);
        for (name, path) in disks {
            let got = read_file(&out.join(format!("{name}.img")));
            assert_same_bytes(&format!("{vm}/{name} restored at latest ({job}) vs source"), &got, &read_file(path));
        }
    }
}
