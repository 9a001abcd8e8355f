//! What only the side-by-side benchmarks need: settings from the
//! environment, a temp folder on a chosen disk, `sync`, sizes and tables.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::process::run_ok;

/// A `u64` from the environment, or `default` when unset or empty.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a non-negative integer"))
        }
        _ => default,
    }
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

/// `sync`: start a measurement with no dirty pages left by the previous one.
pub fn sync_all() {
    run_ok(&mut Command::new("sync"), Duration::from_secs(300));
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Bytes allocated under a path (du -sb would count apparent sizes).
pub fn disk_usage(path: &Path) -> u64 {
    let r = run_ok(Command::new("du").arg("-s").arg("--block-size=1").arg(path), Duration::from_secs(60));
    r.stdout.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
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
