//! Targets side by side: the initial replication of a VM-like disk into
//! the local folder, Azurite (Azure Blob) and moto (S3), each timed from
//! `ferryctl protect` to Protected, then a standalone `ferryctl restore` of
//! the point from the store alone (no daemon), checked byte for byte. Each
//! figure is printed next to the same run's local one as a ratio.
//!
//!     cargo bench --bench blob_targets
//!
//! The disk is one random MiB in every four, the rest written zeros (a
//! used VM disk: data and free space). Environment: FERRY_BENCH_BLOB_MIB
//! (disk size, default 1024), FERRY_BENCH_DIR. The emulators keep their
//! objects on the same local disk (Azurite with --location, moto in
//! memory), so the figures measure Ferry's client path and the protocol,
//! not a network.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::harness::bench::{bench_dir, env_u64, mib, print_table};
use ferry::harness::process::run_ok;
use ferry::harness::{assert_same_files, binaries, write_image, BlobKind, BlobServer, Daemon};

const VM: &str = "blobbench";
const HOST: &str = "bench-host";

struct Case {
    name: &'static str,
    protect_secs: f64,
    restore_secs: f64,
}

fn case(name: &'static str, dir: &Path, image: &Path, server: Option<&BlobServer>) -> Case {
    let (url, options) = match server {
        Some(s) => (s.url("ferry-bench", None), s.options()),
        None => (dir.join("target").display().to_string(), Vec::new()),
    };
    let mut store_args = vec!["--target".to_string(), url.clone()];
    for (k, v) in &options {
        store_args.extend(["--target-option".to_string(), format!("{k}={v}")]);
    }
    let mut daemon_args = store_args.clone();
    daemon_args.extend(["--host-id".to_string(), HOST.to_string()]);
    let daemon_args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
    let mut d = Daemon::builder().in_dir(&dir.join("daemon")).args(&daemon_args).log("warn").start();
    let disk_arg = format!("d={}", image.display());
    let t0 = Instant::now();
    d.ctl_ok(&["protect", VM, "--disk", &disk_arg, "--frequency", "1h"]);
    d.wait_state_every(VM, "Protected", Duration::from_millis(50), Duration::from_secs(3600));
    let protect_secs = t0.elapsed().as_secs_f64();
    d.stop();

    let out = dir.join("restored");
    let mut cmd = Command::new(&binaries().ferryctl);
    cmd.args(["restore", VM, "--host", HOST, "--out"]).arg(&out).args(&store_args);
    let t0 = Instant::now();
    run_ok(&mut cmd, Duration::from_secs(3600));
    let restore_secs = t0.elapsed().as_secs_f64();
    assert_same_files(&format!("{name}: restored vs source"), &out.join("d.img"), image);
    Case { name, protect_secs, restore_secs }
}

fn main() {
    let size = env_u64("FERRY_BENCH_BLOB_MIB", 1024) << 20;
    let root = bench_dir("ferry-bench-blob");
    let image = root.path().join("d.img");
    write_image(&image, size, |i| i % 4 == 0);
    eprintln!("building ferryd and ferryctl, starting Azurite and moto...");
    binaries();
    let azurite = BlobServer::start(BlobKind::Azurite);
    let moto = BlobServer::start(BlobKind::Moto);
    let cases = [
        case("local", &root.path().join("local"), &image, None),
        case("azurite", &root.path().join("azurite"), &image, Some(&azurite)),
        case("moto", &root.path().join("moto"), &image, Some(&moto)),
    ];
    let local = &cases[0];
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            vec![
                c.name.to_string(),
                format!("{:.2}", c.protect_secs),
                format!("{:.0}", mib(size) / c.protect_secs),
                format!("{:.2}", local.protect_secs / c.protect_secs),
                format!("{:.2}", c.restore_secs),
                format!("{:.0}", mib(size) / c.restore_secs),
                format!("{:.2}", local.restore_secs / c.restore_secs),
            ]
        })
        .collect();
    print_table(
        &format!("initial replication and restore of a {:.0} MiB disk (1 random MiB in 4)", mib(size)),
        &["target", "protect s", "MiB/s", "vs local", "restore s", "MiB/s", "vs local"],
        &rows,
    );
}
