//! Initial replication, side by side: the time from `ferryctl protect` until
//! the VM is Protected (polling `show --json` every 50 ms), and the
//! InitialReplication job's own started/ended times from `jobs --json`,
//! next to a copy-and-compress baseline of the same image: `cp
//! --sparse=always` and `zstd -3 -T0` (then `sync`, since ferry's target is
//! durable when the job ends).
//!
//!     cargo bench --bench initial_replication
//!
//! Cases: a disk of random data, and a disk that is 10% random and 90%
//! (written, allocated) zeros, one random MiB in every ten. Environment:
//! FERRY_BENCH_INIT_MIB (disk size, default 1024), FERRY_BENCH_DIR.
//! Every image is in the page cache for every contender (just written).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::harness::bench::{bench_dir, disk_usage, env_u64, mib, print_table, sync_all};
use ferry::harness::process::run_ok;
use ferry::harness::{require_tool, write_image, Daemon};

const VM: &str = "initrep";

struct Measure {
    label: String,
    secs: f64,
    stored: Option<u64>,
}

fn ferry_case(dir: &Path, image: &Path, size: u64) -> (Vec<Measure>, String) {
    let mut ferryd = Daemon::builder().in_dir(&dir.join("ferry")).log("warn").start();
    let disk_arg = format!("d={}", image.display());
    let t0 = Instant::now();
    ferryd.ctl_ok(&["protect", VM, "--disk", &disk_arg, "--frequency", "5m"]);
    ferryd.wait_state_every(VM, "Protected", Duration::from_millis(50), Duration::from_secs(1800));
    let to_protected = t0.elapsed();

    let jobs = ferryd.ctl_json(&["jobs", "--vm", VM]);
    let job = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["kind"] == "InitialReplication"))
        .unwrap_or_else(|| panic!("no InitialReplication job in {jobs}"))
        .clone();
    assert_eq!(job["status"], "Succeeded", "{job}");
    let started = job["started_ms"].as_u64().unwrap_or(0);
    let ended = job["ended_ms"].as_u64().unwrap_or(0);
    let job_secs = ended.saturating_sub(started) as f64 / 1000.0;
    let stored = disk_usage(&ferryd.target_dir());
    let points = ferryd.ctl_json(&["recovery-points", VM]);
    ferryd.stop();
    let note = format!(
        "job {}: bytes_total {} ({:.0} MiB), point {}",
        job["id"],
        job["bytes_total"],
        mib(job["bytes_total"].as_u64().unwrap_or(0)),
        points.as_array().and_then(|a| a.first()).cloned().unwrap_or_default()
    );
    let _ = size;
    (
        vec![
            Measure {
                label: "ferry protect -> Protected".into(),
                secs: to_protected.as_secs_f64(),
                stored: Some(stored),
            },
            Measure { label: "ferry job started -> ended".into(), secs: job_secs, stored: None },
        ],
        note,
    )
}

fn peers(dir: &Path, image: &Path) -> Vec<Measure> {
    let copy = dir.join("copy.img");
    let zst = dir.join("image.zst");
    sync_all();
    let cp = run_ok(Command::new("cp").arg("--sparse=always").arg(image).arg(&copy), Duration::from_secs(1200));
    let cp_stored = disk_usage(&copy);
    std::fs::remove_file(&copy).expect("remove copy");
    sync_all();

    let z = run_ok(
        Command::new("zstd").args(["-3", "-T0", "-q", "-f"]).arg(image).arg("-o").arg(&zst),
        Duration::from_secs(1200),
    );
    let t = Instant::now();
    sync_all();
    let z_sync = z.elapsed + t.elapsed();
    let z_stored = disk_usage(&zst);
    std::fs::remove_file(&zst).expect("remove zst");
    vec![
        Measure { label: "cp --sparse=always".into(), secs: cp.elapsed.as_secs_f64(), stored: Some(cp_stored) },
        Measure { label: "zstd -3 -T0".into(), secs: z.elapsed.as_secs_f64(), stored: Some(z_stored) },
        Measure { label: "zstd -3 -T0 + sync".into(), secs: z_sync.as_secs_f64(), stored: Some(z_stored) },
        Measure {
            label: "cp + zstd (sum)".into(),
            secs: cp.elapsed.as_secs_f64() + z.elapsed.as_secs_f64(),
            stored: None,
        },
    ]
}

fn main() {
    let size_mib = env_u64("FERRY_BENCH_INIT_MIB", 1024);
    let size = size_mib << 20;
    require_tool("zstd");
    let root = bench_dir("ferry-bench-init-");

    type Layout = fn(u64) -> bool;
    let cases: [(&str, Layout); 2] = [("100% random", |_| true), ("10% random, 90% zeros", |i| i % 10 == 0)];
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for (name, layout) in cases {
        let dir = root.path().join(name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
        std::fs::create_dir_all(&dir).expect("case dir");
        let image = dir.join("disk.img");
        eprintln!("{name}: writing a {size_mib} MiB image");
        write_image(&image, size, layout);
        sync_all();

        eprintln!("{name}: ferry...");
        let (ferry, note) = ferry_case(&dir, &image, size);
        notes.push(format!("{name}: {note}"));
        eprintln!("{name}: cp and zstd...");
        let peer = peers(&dir, &image);
        let zstd_secs = peer[1].secs;
        let ferry_secs = ferry[0].secs;
        for m in ferry.iter().chain(peer.iter()) {
            let rate = mib(size) / m.secs;
            rows.push(vec![
                name.to_string(),
                m.label.clone(),
                format!("{:.2}", m.secs),
                format!("{rate:.0}"),
                m.stored.map_or("-".into(), |b| format!("{:.1}", mib(b))),
                format!("{:.2}", ferry_secs / m.secs),
                format!("{:.2}", m.secs / zstd_secs),
            ]);
        }
        std::fs::remove_file(&image).expect("remove image");
    }
    println!("\ninitial replication of a {size_mib} MiB raw image (page cache warm), local target, 2 shared cores");
    print_table(
        "ferry vs copy + compress (MiB/s = disk size / seconds)",
        &["case", "what", "seconds", "MiB/s", "stored MiB", "ferry/this (time)", "this/zstd (time)"],
        &rows,
    );
    for n in notes {
        println!("  {n}");
    }
}
