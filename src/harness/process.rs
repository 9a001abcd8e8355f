//! Child processes under a deadline: [`run`] for tools that finish, [`Proc`]
//! for servers that run until stopped. Every process started here is killed
//! when its owner drops it, on panic too.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished tool did.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// From start to exit.
    pub elapsed: Duration,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// stdout then stderr, for messages.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A child process that is stopped when dropped: SIGTERM, a grace period,
/// then SIGKILL.
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { name: name.to_string(), child: Some(child) }
    }

    /// The pid (0 once stopped).
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

    /// Waits up to `timeout` for the process to exit by itself; `None` if it
    /// is still running (it is kept).
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_timeout(self.child.as_mut()?, timeout)?;
        self.child = None;
        Some(status)
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet.
            let rc = unsafe { libc::kill(c.id() as libc::pid_t, signal) };
            assert_eq!(rc, 0, "signal {signal} to {}: {}", self.name, std::io::Error::last_os_error());
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status
    /// (`None` if it was already reaped).
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            self.child = None;
            return Some(status);
        }
        self.child.as_ref()?;
        self.signal(libc::SIGTERM);
        if let Some(status) = self.wait(grace) {
            return Some(status);
        }
        eprintln!("{} did not stop within {grace:?} of SIGTERM: killing it", self.name);
        self.kill()
    }

    /// SIGKILL at once, and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
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
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads a child's pipe to the end on a thread (so a full pipe cannot
/// stall the child); join the handle for the text.
pub fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut s);
        }
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// Runs a tool to completion with stdin closed, capturing stdout and
/// stderr; kills it and panics (with its stderr) if it overruns `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Ran {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut p = Proc::spawn(&shown, cmd);
    let out = drain(p.child_mut().stdout.take());
    let err = drain(p.child_mut().stderr.take());
    let Some(status) = p.wait(timeout) else {
        p.kill();
        let err = err.join().unwrap_or_default();
        panic!("{shown} did not finish within {timeout:?}; killed. stderr:\n{err}");
    };
    let elapsed = start.elapsed();
    Ran { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default(), elapsed }
}

/// Like [`run`], and panics unless the tool exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Ran {
    let shown = format!("{cmd:?}");
    let r = run(cmd, timeout);
    assert!(r.ok(), "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}", r.status, r.stdout, r.stderr);
    r
}

/// Removes from `cmd` what cargo sets for the test or benchmark being run
/// (`CARGO_PKG_*`, `CARGO_MANIFEST_*`, `CARGO_CRATE_*`, `OUT_DIR`, ...), so a
/// cargo started from it sees the environment of a plain build. Build
/// scripts watch some of them (ring's: `rerun-if-env-changed=CARGO_PKG_NAME`),
/// and a nested build that inherits them rebuilds ring, rustls and
/// everything above them each time it follows a build without them.
pub fn scrub_cargo_env(cmd: &mut Command) -> &mut Command {
    const SET_FOR_THE_CRATE: [&str; 5] =
        ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_TARGET_TMPDIR"];
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if SET_FOR_THE_CRATE.iter().any(|p| k.starts_with(p)) || k == "CARGO_PRIMARY_PACKAGE" || k == "OUT_DIR" {
            cmd.env_remove(&key);
        }
    }
    cmd
}
