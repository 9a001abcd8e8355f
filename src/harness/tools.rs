//! The client tools the tests drive (qemu-io, qemu-img, fio, nbdinfo ...):
//! found on PATH or the test fails, naming the package to install.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::{run, Ran};
use super::CLIENT_TIMEOUT;

/// The Debian package that ships `tool`.
fn package_of(tool: &str) -> &str {
    match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" | "nbdsh" => "libnbd-bin",
        other => other,
    }
}

/// The path of `tool`; fails (never skips) when it is not installed.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`{tool}` is required but not installed: apt-get install -y {} \
             (or run scripts/install-test-deps.sh, or scripts/bench.sh for benchmarks)",
            package_of(tool)
        )
    })
}

/// Where the project's install scripts put tools that are not Debian
/// packages (emulators, Python clients): `$FERRY_TOOLS`, default
/// `~/.cache/ferry-tools`.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("FERRY_TOOLS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/ferry-tools"),
    }
}

/// `rel` under [`tools_dir`]; fails (never skips) when `script` has not
/// installed it.
pub fn installed_tool(rel: &str, script: &str) -> PathBuf {
    let path = tools_dir().join(rel);
    assert!(path.exists(), "{} is missing: run {script} (the test command does)", path.display());
    path
}

/// Runs qemu-io on one NBD URI with the given commands (`-c` each); asserts
/// that it exits 0 and that no command reports a failure.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Ran {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run(&mut cmd, CLIENT_TIMEOUT);
    let shown = out.text();
    let lower = shown.to_lowercase();
    assert!(
        out.ok() && !lower.contains("failed") && !lower.contains("error") && !shown.contains("Pattern verification"),
        "qemu-io {uri} {commands:?} ({}):\n{shown}",
        out.status
    );
    out
}

/// Reads a whole export into a file with `qemu-img convert` and returns the bytes.
pub fn read_export(uri: &str, into: &Path) -> Vec<u8> {
    let mut cmd = Command::new(require_tool("qemu-img"));
    cmd.args(["convert", "-f", "raw", "-O", "raw", uri]).arg(into);
    let out = run(&mut cmd, CLIENT_TIMEOUT);
    assert!(out.ok(), "qemu-img convert {uri} ({}):\n{}", out.status, out.text());
    super::read_file(into)
}
