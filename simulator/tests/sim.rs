//! Runs the `ferry-sim` binary end to end: two VMs with two small disks
//! churn for a few seconds under 1 s cycles, and both must restore to
//! exactly their source disks.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound on the whole run (setup, 3 s of churn, replication, verification).
const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn two_vms_churn_replicate_and_verify() {
    let workdir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry-sim"))
        .args(["--vms", "2", "--disks-per-vm", "2", "--disk-size", "8MiB", "--duration", "3s", "--frequency", "1s"])
        .args(["--write-size", "4KiB..64KiB", "--rate", "100", "--seed", "3", "--json"])
        .arg("--workdir")
        .arg(workdir.path().join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry-sim");
    // Drain stdout on a thread so a full pipe cannot stall the child.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry-sim did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "ferry-sim exited with {status}\nstdout:\n{out}\nstderr:\n{err}");

    let summary: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(summary["ok"], true, "{out}");
    let vms = summary["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 2, "{out}");
    for vm in vms {
        assert_eq!(vm["state"], "Protected", "{vm}");
        assert_eq!(vm["verification"]["status"], "OK", "{vm}");
        // Every byte of both 8 MiB disks was compared.
        assert_eq!(vm["verification"]["bytes_compared"], 2 * (8 << 20), "{vm}");
        assert!(vm["data_writes"].as_u64().unwrap() > 0, "{vm}");
        // The initial point, the final one, and timed 1 s cycles during 3 s of churn.
        assert!(vm["points"].as_u64().unwrap() >= 3, "{vm}");
        assert!(vm["bytes_stored_on_target"].as_u64().unwrap() > 0, "{vm}");
    }
    assert_eq!(summary["totals"]["vms_verified"], 2, "{out}");
}
