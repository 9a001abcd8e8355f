//! A running `ferryd` with its own data, target, socket and disks folders,
//! started, stopped, killed and restarted as an operator would.
//!
//! Folder layout (a temp dir, or one the caller owns):
//! `data/` (state), `target/` (replicas), `disks/` (source images for the
//! test), `nbd.sock`, and `ferryd.stderr` (every run's log, appended). gRPC
//! listens on 127.0.0.1 port 0 and NBD TCP is off (ferryd's default; a test
//! that wants it passes `--nbd-listen 127.0.0.1:0`), so tests never collide;
//! the ports are learnt from the ready line ([`Ready`]).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_agents::ready::{self, Ready};

use super::binaries::binaries;
use super::process::Proc;
use super::{READY_TIMEOUT, STOP_TIMEOUT};

/// The host id the harness gives every daemon (unless its flags name one).
pub const HOST_ID: &str = "e2e-host";

/// A process's stdout, read line by line on a thread.
pub struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    pub fn read(stdout: ChildStdout) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    /// Waits for ferryd's ready line; `Err` with the lines seen when it
    /// prints none within `timeout`, closes stdout first, or prints a
    /// ready line that does not parse.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Ready, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => match Ready::from_line(&line) {
                    Some(Ok(ready)) => return Ok(ready),
                    Some(Err(e)) => return Err(format!("{e}; stdout before it: {seen:?}")),
                    None => seen.push(line),
                },
                Err(e) => return Err(format!("no ready line ({e:?} after {timeout:?}); stdout: {seen:?}")),
            }
        }
    }

    /// The lines printed so far and not yet taken.
    pub fn taken(&self) -> Vec<String> {
        self.rx.try_iter().collect()
    }
}

/// Where the daemon's folders live.
enum Root {
    Temp(tempfile::TempDir),
    Given(PathBuf),
}

/// How to start a [`Daemon`]: `Daemon::builder().args(..).log(..).start()`.
pub struct DaemonBuilder {
    dir: Option<PathBuf>,
    args: Vec<String>,
    log: String,
    nofile: Option<u64>,
}

impl DaemonBuilder {
    /// Extra ferryd flags (e.g. `--auto-resync immediately`), kept for every restart.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Starts ferryd with this soft limit on open descriptors (the hard
    /// limit is kept), as a host with `ulimit -n` set low would.
    pub fn nofile(mut self, soft: u64) -> Self {
        self.nofile = Some(soft);
        self
    }

    /// ferryd's log filter (RUST_LOG syntax); `info` unless set.
    pub fn log(mut self, filter: &str) -> Self {
        self.log = filter.to_string();
        self
    }

    /// Keeps the folders in `dir` (created if missing, kept afterwards)
    /// instead of a fresh temp dir.
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    pub fn start(self) -> Daemon {
        let root = match self.dir {
            Some(dir) => Root::Given(dir),
            None => Root::Temp(tempfile::Builder::new().prefix("ferry-e2e").tempdir().expect("temp dir")),
        };
        let dir = match &root {
            Root::Temp(t) => t.path().to_path_buf(),
            Root::Given(d) => d.clone(),
        };
        std::fs::create_dir_all(dir.join("disks")).expect("disks folder");
        let mut d = Daemon {
            socket: dir.join("nbd.sock"),
            root,
            endpoint: String::new(),
            proc: None,
            stdout: None,
            starts: 0,
            args: self.args,
            log: self.log,
            nofile: self.nofile,
            nbd_tcp: None,
        };
        d.spawn();
        d
    }
}

/// A running `ferryd`. Dropping it kills the daemon (SIGKILL) and, when
/// the test is failing, prints its log.
pub struct Daemon {
    root: Root,
    /// `http://127.0.0.1:<port>` from the ready line of the current run.
    pub endpoint: String,
    pub socket: PathBuf,
    /// The NBD TCP address of the current run, when `--nbd-listen` was given.
    pub nbd_tcp: Option<SocketAddr>,
    proc: Option<Proc>,
    stdout: Option<Lines>,
    starts: u32,
    /// Extra ferryd flags, given on every (re)start.
    args: Vec<String>,
    log: String,
    /// Soft descriptor limit for ferryd, if the test set one.
    nofile: Option<u64>,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder { dir: None, args: Vec::new(), log: "info".to_string(), nofile: None }
    }

    pub fn start() -> Daemon {
        Daemon::builder().start()
    }

    /// Starts ferryd with extra flags, kept for every restart.
    pub fn start_with(extra_args: &[&str]) -> Daemon {
        Daemon::builder().args(extra_args).start()
    }

    /// How many times ferryd was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn dir(&self) -> &Path {
        match &self.root {
            Root::Temp(t) => t.path(),
            Root::Given(d) => d,
        }
    }

    /// The folder for source disk images.
    pub fn disks(&self) -> PathBuf {
        self.dir().join("disks")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// This daemon's objects in its local target: `<target>/hosts/<host id>`
    /// (the default [`HOST_ID`]).
    pub fn replica_dir(&self) -> PathBuf {
        self.target_dir().join("hosts").join(HOST_ID)
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

    /// The pid of the running ferryd.
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("ferryd is running").id()
    }

    fn spawn(&mut self) {
        let ferryd = &binaries().ferryd;
        self.starts += 1;
        let stderr =
            std::fs::OpenOptions::new().create(true).append(true).open(self.stderr_path()).expect("stderr file");
        let mut cmd = Command::new(ferryd);
        cmd.arg("--data-dir").arg(self.data_dir());
        // The local target folder and host id, unless the extra flags name them.
        let given = |flag: &str| self.args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if !given("--target") {
            cmd.arg("--target").arg(self.target_dir());
        }
        if !given("--host-id") {
            cmd.args(["--host-id", HOST_ID]);
        }
        cmd.args(["--listen", "127.0.0.1:0", "--log", &self.log])
            .arg("--nbd-socket")
            .arg(&self.socket)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        if let Some(soft) = self.nofile {
            // SAFETY: the closure only calls getrlimit/setrlimit, which are
            // async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut proc = Proc::spawn("ferryd", &mut cmd);
        let lines = Lines::read(proc.child_mut().stdout.take().expect("stdout"));
        let ready = lines.wait_ready(READY_TIMEOUT);
        let ready = ready.unwrap_or_else(|e| {
            let status = proc.child_mut().try_wait().ok().flatten();
            panic!("ferryd: {e} (exit: {status:?}); stderr:\n{}", self.stderr())
        });
        assert!(ready.grpc.ip().is_loopback() && ready.grpc.port() != 0, "{ready}");
        assert_eq!(ready.nbd_socket, self.socket, "{ready}");
        let tcp_asked = self.args.iter().any(|a| a == "--nbd-listen" || a.starts_with("--nbd-listen="));
        assert_eq!(ready.nbd_tcp.is_some(), tcp_asked, "NBD TCP only when --nbd-listen is given: {ready}");
        self.nbd_tcp = ready.nbd_tcp;
        self.endpoint = ready.endpoint();
        self.proc = Some(proc);
        self.stdout = Some(lines);
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::running)
    }

    /// SIGTERM, wait (bounded), and assert a clean exit: status 0, the
    /// stopped line, the socket removed.
    pub fn stop(&mut self) {
        let mut proc = self.proc.take().expect("ferryd is running");
        proc.signal(libc::SIGTERM);
        let Some(status) = proc.wait(STOP_TIMEOUT) else {
            proc.kill();
            panic!("ferryd did not stop within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}", self.stderr());
        };
        assert!(status.success(), "ferryd exited with {status} after SIGTERM; stderr:\n{}", self.stderr());
        let lines = self.stdout.take().map(|l| l.taken()).unwrap_or_default();
        assert!(lines.iter().any(|l| l == ready::STOPPED), "no {:?} line: {lines:?}", ready::STOPPED);
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
        let mut proc = self.proc.take().expect("ferryd is running");
        assert!(proc.running(), "ferryd died before the kill; stderr:\n{}", self.stderr());
        proc.signal(libc::SIGKILL);
        let status = proc.wait(STOP_TIMEOUT).expect("ferryd reaped after SIGKILL");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{status}");
        self.stdout = None;
    }

    /// Starts ferryd again on the same folders after [`Daemon::kill9`].
    pub fn start_again(&mut self) {
        assert!(self.proc.is_none(), "ferryd is still running");
        self.spawn();
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
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- ferryd stderr ({}) ---\n{}", self.stderr_path().display(), self.stderr());
        }
    }
}
