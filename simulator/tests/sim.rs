//! Runs the `ferry-sim` binary end to end: two VMs with two small disks
//! churn for a few seconds under 1 s cycles, and both must restore to
//! exactly their source disks.

use std::process::Command;
use std::time::Duration;

use ferry::harness::run;

/// Bound on the whole run (setup, 3 s of churn, replication, verification).
const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn two_vms_churn_replicate_and_verify() {
    let workdir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-sim"));
    cmd.args(["--vms", "2", "--disks-per-vm", "2", "--disk-size", "8MiB", "--duration", "3s", "--frequency", "1s"])
        .args(["--write-size", "4KiB..64KiB", "--rate", "100", "--seed", "3", "--json"])
        .arg("--workdir")
        .arg(workdir.path().join("run"));
    let ran = run(&mut cmd, TIMEOUT);
    let out = &ran.stdout;
    assert!(ran.ok(), "ferry-sim exited with {}\nstdout:\n{out}\nstderr:\n{}", ran.status, ran.stderr);

    let summary: serde_json::Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
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
