//! A restart after `kill -9`, side by side: the time from starting ferryd
//! again until its VM is `Protected`, when the change logs left open by the
//! kill are trusted (cut the torn tail, replay, go on with delta cycles),
//! against the same restart when they are not (what every kill -9 cost
//! before issue 7, and what a host reboot still costs: the logs' boot id is
//! rewritten to another boot's, so the VM resyncs, reading and hashing its
//! whole disks).
//!
//!     cargo bench --bench kill9_restart
//!
//! The layout: a VM with two 1 GiB disks, each one random MiB in four (a
//! used VM disk: data and written free space), protected into the local
//! target, replication every 30 s. Each round writes 4,000 random 4 KiB
//! blocks per disk through NBD, FLUSHes, writes 1,000 more without a FLUSH,
//! and kills ferryd; the two kinds of restart alternate which goes first.
//! The time includes process start and the wait for its ready line;
//! `show` is polled every 20 ms.
//!
//! Environment: FERRY_BENCH_KILL_MIB (disk size, default 1024),
//! FERRY_BENCH_ROUNDS (default 3), FERRY_BENCH_DIR.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::harness::bench::{bench_dir, env_u64, mib, print_table};
use ferry::harness::nbd::NbdClient;
use ferry::harness::{write_image, Daemon};
use rand::{Rng, RngCore, SeedableRng};

const VM: &str = "killbench";
const DISKS: [&str; 2] = ["a", "b"];
const BLOCK: u64 = 4096;

/// Random 4 KiB writes through NBD to each disk: `flushed` of them, a
/// FLUSH, then `unflushed` more.
fn churn(d: &Daemon, size: u64, flushed: u32, unflushed: u32, rng: &mut rand::rngs::StdRng) {
    let mut block = vec![0u8; BLOCK as usize];
    for disk in DISKS {
        let mut c = NbdClient::open(&d.socket, &format!("{VM}/{disk}"));
        for i in 0..flushed + unflushed {
            if i == flushed {
                c.flush().expect("FLUSH");
            }
            rng.fill_bytes(&mut block);
            c.write(rng.random_range(0..size / BLOCK) * BLOCK, &block).expect("WRITE");
        }
    }
}

/// Resync jobs of the VM that ended so far.
fn resyncs_ended(d: &Daemon) -> usize {
    d.jobs_of(VM).iter().filter(|j| j["kind"] == "Resync" && j["status"] != "Running").count()
}

/// Makes every disk's newest change log read as written before a host
/// reboot: another boot id in its header (bytes 176..192), the header crc
/// (192..196, over 0..192) fixed.
fn predate_reboot(disks: &[PathBuf]) {
    for disk in disks {
        let logs = ferry_engine::changelog::list_logs(disk).expect("list change logs");
        let (_, log) = logs.last().unwrap_or_else(|| panic!("no change log beside {}", disk.display()));
        let mut bytes = std::fs::read(log).expect("read log");
        let other = ferry_engine::changelog::boot_id() ^ 1;
        bytes[176..192].copy_from_slice(&other.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..192]);
        bytes[192..196].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(log, bytes).expect("rewrite log");
    }
}

/// Starts ferryd again and times it to `Protected`; when `resync`, also
/// until a Resync job beyond the `resyncs_before` that had ended has ended
/// (the state passes through ResyncRequired first). Returns seconds.
fn restart_timed(d: &mut Daemon, resync: bool, resyncs_before: usize) -> f64 {
    let t0 = Instant::now();
    d.start_again();
    let deadline = t0 + Duration::from_secs(1800);
    let ready = t0.elapsed().as_secs_f64();
    let mut seen = String::new();
    loop {
        let v = d.show(VM);
        let state = v["state"].as_str().unwrap_or_default().to_string();
        if !seen.ends_with(&state) {
            seen += &format!(" {:.2}:{state}", t0.elapsed().as_secs_f64());
        }
        assert_ne!(state, "Critical", "{v:#}");
        if !resync {
            assert_ne!(state, "ResyncRequired", "a trusted restart went ResyncRequired: {v:#}");
        }
        if state == "Protected" && (!resync || resyncs_ended(d) > resyncs_before) {
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("  ready line after {ready:.2} s; states seen:{seen}");
            if !resync {
                assert_eq!(resyncs_ended(d), resyncs_before, "a trusted restart resynced");
            }
            return secs;
        }
        assert!(Instant::now() < deadline, "{VM} not Protected within 30 min: {v:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let size = env_u64("FERRY_BENCH_KILL_MIB", 1024) << 20;
    let rounds = env_u64("FERRY_BENCH_ROUNDS", 3).max(1);
    let root = bench_dir("ferry-bench-kill9");
    let dir: &Path = root.path();
    let mut d = Daemon::builder().in_dir(dir).log("warn").args(&["--auto-resync", "immediately"]).start();
    let images: Vec<PathBuf> = DISKS.iter().map(|n| d.disks().join(format!("{n}.img"))).collect();
    for image in &images {
        write_image(image, size, |i| i % 4 == 0);
    }
    let mut protect = vec!["protect".to_string(), VM.to_string(), "--frequency".into(), "30s".into()];
    for (name, image) in DISKS.iter().zip(&images) {
        protect.extend(["--disk".to_string(), format!("{name}={}", image.display())]);
    }
    d.ctl_ok(&protect.iter().map(String::as_str).collect::<Vec<_>>());
    d.wait_state(VM, "Protected", Duration::from_secs(1800));

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut trusted, mut resynced) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for kind in if round % 2 == 0 { [false, true] } else { [true, false] } {
            churn(&d, size, 4000, 1000, &mut rng);
            let resyncs_before = resyncs_ended(&d);
            d.kill9();
            if kind {
                predate_reboot(&images);
            }
            let secs = restart_timed(&mut d, kind, resyncs_before);
            eprintln!("round {round}: {} restart {secs:.2} s", if kind { "untrusted (resync)" } else { "trusted" });
            if kind { &mut resynced } else { &mut trusted }.push(secs);
        }
    }
    d.stop();
    let per_round = |v: &[f64]| v.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(" ");
    let (t, r) = (median(trusted.clone()), median(resynced.clone()));
    print_table(
        &format!("kill -9, then ferryd again until Protected: 2 disks x {:.0} MiB", mib(size)),
        &["restart", "seconds per round", "median s", "vs resync"],
        &[
            vec!["logs trusted (now)".into(), per_round(&trusted), format!("{t:.2}"), format!("{:.1}x faster", r / t)],
            vec!["logs not trusted (resync)".into(), per_round(&resynced), format!("{r:.2}"), "1.0".into()],
        ],
    );
}
