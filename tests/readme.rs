//! The README's commands, run as written: a newcomer's first try must work.
//!
//! The commands are read from README.md, never copied here:
//! 1. the first command of the first code block (`cargo run --release --bin
//!    ferryd`) starts a ferryd that answers and stops cleanly on SIGTERM (its
//!    folders and ports moved aside through ferryd's environment variables);
//! 2. the second is exactly what CI runs (`.ci/run`); running it here would
//!    run this suite inside itself;
//! 3. the "Quick start" block, pasted into bash with only its folder and its
//!    gRPC port replaced, prints `byte-identical` and exits 0.
//!
//! 1 and 3 build the release binaries as the README does (minutes on a cold
//! target); .config/nextest.toml gives them a longer timeout and the whole
//! machine. Each runs in its own process group, killed when the test ends,
//! so no ferryd outlives a failure.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::harness::daemon::Lines;
use ferry::harness::process::{drain, wait_timeout};
use ferry::harness::{binaries, require_tool, run, CLIENT_TIMEOUT, STOP_TIMEOUT};
use ferry_agents::ready;

/// A release build from scratch on a 2-core machine, with room to spare.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    let path = repo_root().join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fenced code block and the heading it sits under.
struct Block {
    heading: String,
    lines: Vec<String>,
}

fn code_blocks(markdown: &str) -> Vec<Block> {
    let (mut blocks, mut heading, mut open) = (Vec::new(), String::new(), None::<Block>);
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            match open.take() {
                Some(block) => blocks.push(block),
                None => open = Some(Block { heading: heading.clone(), lines: Vec::new() }),
            }
        } else if let Some(block) = &mut open {
            block.lines.push(line.to_string());
        } else if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim().to_string();
        }
    }
    assert!(open.is_none(), "README.md has an unclosed code block");
    blocks
}

/// A shell line without its trailing `# comment` (a `#` after whitespace,
/// outside quotes), trimmed.
fn strip_comment(line: &str) -> &str {
    let (mut quote, mut prev) = (None, ' ');
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return line[..i].trim(),
            _ => {}
        }
        prev = c;
    }
    line.trim()
}

/// The commands of the README's first code block (the two set-up commands).
fn setup_commands() -> Vec<String> {
    let blocks = code_blocks(&readme());
    let first = blocks.first().expect("README.md has no code block");
    first.lines.iter().map(|l| strip_comment(l).to_string()).filter(|l| !l.is_empty()).collect()
}

/// A process and its process group (it leads one of its own), killed with
/// every process left in it when dropped.
struct Group {
    child: Child,
}

impl Group {
    fn spawn(cmd: &mut Command) -> Group {
        let shown = format!("{cmd:?}");
        Group { child: cmd.process_group(0).spawn().unwrap_or_else(|e| panic!("cannot start {shown}: {e}")) }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the process group our child leads.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), signal) };
    }

    /// Live (not zombie) processes of the group: "pid (command)".
    fn members(&self) -> Vec<String> {
        let pgid = self.child.id().to_string();
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut found = Vec::new();
        for entry in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
            let Some(close) = stat.rfind(')') else { continue };
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            if fields.len() > 2 && fields[2] == pgid && fields[0] != "Z" {
                found.push(stat[..=close].to_string());
            }
        }
        found
    }

    /// Waits until no live process is left in the group.
    fn wait_empty(&self, timeout: Duration) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.members();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(left);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A command for bash at the repository root, with the environment of a
/// fresh clone: no CARGO_TARGET_DIR (the quick start runs
/// `$PWD/target/release`), no ferryd or ferryctl settings of ours.
fn bash_at_root(script: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(script).current_dir(repo_root()).stdin(Stdio::null()).env_remove("CARGO_TARGET_DIR");
    ferry::harness::process::scrub_cargo_env(&mut cmd);
    for var in [
        "FERRY_DATA_DIR",
        "FERRY_TARGET",
        "FERRY_LISTEN",
        "FERRY_NBD_SOCKET",
        "FERRY_NBD_SOCKET_GROUP",
        "FERRY_NBD_LISTEN",
        "FERRY_ENDPOINT",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn readme_test_command_is_what_ci_runs() {
    let commands = setup_commands();
    assert_eq!(commands.len(), 2, "the README's first block should hold the run and test commands: {commands:?}");
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).expect("reading .ci/run");
    let ci_runs: Vec<&str> =
        ci.lines().map(strip_comment).filter_map(|l| l.strip_prefix("exec ")).map(str::trim).collect();
    assert_eq!(ci_runs, [commands[1].as_str()], "the README's test command is what .ci/run runs:\n{ci}");
    assert!(
        ci.contains("cd \"$(dirname \"$0\")/..\""),
        ".ci/run runs it from the repository root, as the README:\n{ci}"
    );
}

#[test]
fn readme_run_command_starts_a_ferryd_that_answers_and_stops_cleanly() {
    let command = setup_commands().into_iter().next().expect("a run command");
    assert!(command.contains("ferryd"), "the README's first command should start ferryd: {command}");
    let dir = tempfile::Builder::new().prefix("ferry-readme-run").tempdir().expect("temp dir");
    let (data, socket, log) = (dir.path().join("data"), dir.path().join("nbd.sock"), dir.path().join("stderr"));
    let mut cmd = bash_at_root(&command);
    cmd.env("FERRY_DATA_DIR", &data)
        .env("FERRY_LISTEN", "127.0.0.1:0")
        .env("FERRY_NBD_SOCKET", &socket)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("stderr file"));
    let mut group = Group::spawn(&mut cmd);
    let lines = Lines::read(group.child.stdout.take().expect("stdout"));

    let ready = lines.wait_ready(BUILD_TIMEOUT).unwrap_or_else(|e| {
        panic!("`{command}`: {e}\nits stderr (last lines):\n{}", tail(&log, 40));
    });
    assert_eq!(ready.nbd_socket, socket, "FERRY_NBD_SOCKET is honoured: {ready}");
    assert_eq!(ready.nbd_tcp, None, "NBD over TCP is off unless asked for: {ready}");
    assert_eq!(ready.data_dir, data, "FERRY_DATA_DIR is honoured: {ready}");
    assert!(ready.grpc.ip().is_loopback() && ready.grpc.port() != 0, "FERRY_LISTEN is honoured: {ready}");

    // It answers: ferryctl lists no VMs.
    let mut ctl = Command::new(&binaries().ferryctl);
    ctl.args(["--endpoint", &ready.endpoint(), "--json", "list"]);
    let out = run(&mut ctl, CLIENT_TIMEOUT);
    assert!(out.ok(), "ferryctl list against `{command}` ({}):\n{}", out.status, out.text());
    let vms: serde_json::Value = serde_json::from_str(&out.stdout).expect("ferryctl list --json");
    assert_eq!(vms, serde_json::json!([]), "a fresh ferryd protects nothing");

    // SIGTERM: a clean stop.
    group.signal(libc::SIGTERM);
    let status = wait_timeout(&mut group.child, STOP_TIMEOUT)
        .unwrap_or_else(|| panic!("`{command}` did not stop within {STOP_TIMEOUT:?} of SIGTERM:\n{}", tail(&log, 40)));
    assert!(status.success(), "`{command}` exited with {status} after SIGTERM:\n{}", tail(&log, 40));
    let printed = lines.taken();
    assert!(printed.iter().any(|l| l == ready::STOPPED), "no {:?} line after SIGTERM: {printed:?}", ready::STOPPED);
    assert!(!socket.exists(), "ferryd left its socket {} behind", socket.display());
}

#[test]
fn readme_quick_start_pasted_into_bash_prints_byte_identical() {
    require_tool("qemu-io");
    let blocks = code_blocks(&readme());
    let block = blocks.iter().find(|b| b.heading == "Quick start").expect("a code block under \"## Quick start\"");
    let script = block.lines.join("\n");
    const FOLDER: &str = "/tmp/ferry-demo";
    const PORT: &str = "50551";
    assert!(
        script.contains(FOLDER) && script.contains(PORT),
        "the quick start uses {FOLDER} and port {PORT}:\n{script}"
    );

    let dir = tempfile::Builder::new().prefix("ferry-readme-quick").tempdir().expect("temp dir");
    let demo = dir.path().join("demo");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("bound address").port().to_string()
    };
    let script = script.replace(FOLDER, demo.to_str().expect("utf-8 temp path")).replace(PORT, &port);

    let mut cmd = bash_at_root(&script);
    cmd.env("FERRY_ENDPOINT", format!("http://127.0.0.1:{port}")).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut group = Group::spawn(&mut cmd);
    let out = drain(group.child.stdout.take());
    let err = drain(group.child.stderr.take());
    let status = wait_timeout(&mut group.child, BUILD_TIMEOUT);
    // `kill %1` stops ferryd as bash exits: give it time to seal its logs.
    let left = group.wait_empty(STOP_TIMEOUT);
    if left.is_err() {
        group.signal(libc::SIGKILL);
    }
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    let shown = format!("script:\n{script}\nstdout:\n{out}\nstderr:\n{err}");
    let status = status.unwrap_or_else(|| panic!("the quick start did not finish within {BUILD_TIMEOUT:?}\n{shown}"));
    assert!(status.success(), "the quick start exited with {status}\n{shown}");
    assert!(out.lines().any(|l| l.trim() == "byte-identical"), "the quick start did not print byte-identical\n{shown}");
    if let Err(left) = left {
        panic!("processes of the quick start still ran {STOP_TIMEOUT:?} after it ended: {left:?}\n{shown}");
    }
}
