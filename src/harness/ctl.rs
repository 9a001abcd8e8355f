//! `ferryctl` against a [`Daemon`], as an operator types it: plain runs,
//! `--json` answers, refusals with their gRPC code, and the waits built on
//! them (a state, a job, a recovery point, a test failover).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::binaries::binaries;
use super::daemon::Daemon;
use super::images::{assert_same_bytes, read_file};
use super::process::{run, Ran};
use super::CLIENT_TIMEOUT;

/// How often the waits below poll.
const POLL: Duration = Duration::from_millis(100);

impl Daemon {
    /// Runs `ferryctl --endpoint URL <args>` (in the daemon's folder) under
    /// [`CLIENT_TIMEOUT`].
    pub fn ctl(&self, args: &[&str]) -> Ran {
        self.ctl_timeout(args, CLIENT_TIMEOUT)
    }

    /// [`Daemon::ctl`] with its own timeout (long restores, big disks).
    pub fn ctl_timeout(&self, args: &[&str], timeout: Duration) -> Ran {
        let mut cmd = Command::new(&binaries().ferryctl);
        cmd.args(["--endpoint", &self.endpoint]).args(args).current_dir(self.dir());
        run(&mut cmd, timeout)
    }

    /// Runs `ferryctl --json <args>`, asserts success, parses stdout.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        self.ctl_json_timeout(args, CLIENT_TIMEOUT)
    }

    /// [`Daemon::ctl_json`] with its own timeout.
    pub fn ctl_json_timeout(&self, args: &[&str], timeout: Duration) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl_timeout(&all, timeout);
        assert!(
            out.ok(),
            "ferryctl {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ferryctl {args:?}: stdout is not JSON ({e}):\n{}", out.stdout))
    }

    /// Runs ferryctl, asserts success, returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(out.ok(), "ferryctl {args:?} failed ({}):\n{}", out.status, out.text());
        out.stdout
    }

    /// Runs ferryctl expecting a refusal: the exit code ferryctl documents
    /// for `code` (4 NotFound, 5 PermissionDenied or Unauthenticated, 3
    /// Unavailable, else 1) and a "ferryctl: <Code>: ..." message on
    /// stderr; returns that message. An empty `code`: a refusal by
    /// ferryctl itself (bad flag value), exit 1.
    pub fn ctl_err(&self, args: &[&str], code: &str) -> String {
        let out = self.ctl(args);
        let exit = match code {
            "NotFound" => 4,
            "PermissionDenied" | "Unauthenticated" => 5,
            "Unavailable" => 3,
            _ => 1,
        };
        assert_eq!(out.status.code(), Some(exit), "ferryctl {args:?} should fail with exit {exit}:\n{}", out.text());
        let prefix = if code.is_empty() { "ferryctl: ".to_string() } else { format!("ferryctl: {code}: ") };
        assert!(out.stderr.starts_with(&prefix), "ferryctl {args:?} should fail with {code}, got:\n{}", out.stderr);
        out.stderr
    }

    /// `show VM --json`.
    pub fn show(&self, vm: &str) -> Value {
        self.ctl_json(&["show", vm])
    }

    pub fn state(&self, vm: &str) -> String {
        self.show(vm)["state"].as_str().expect("state").to_string()
    }

    /// Polls `show` until the VM reaches `state`; fails on timeout or on a
    /// state that needs an operator. Returns the last `show`.
    pub fn wait_state(&self, vm: &str, state: &str, timeout: Duration) -> Value {
        self.wait_state_every(vm, state, POLL, timeout)
    }

    /// [`Daemon::wait_state`], polling every `every` (benchmarks time it).
    pub fn wait_state_every(&self, vm: &str, state: &str, every: Duration, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.show(vm);
            let now = v["state"].as_str().unwrap_or_default();
            if now == state {
                return v;
            }
            assert!(
                !matches!(now, "Critical" | "ResyncRequired"),
                "{vm} went {now} while waiting for {state}: {v:#}\nstderr:\n{}",
                self.stderr()
            );
            assert!(Instant::now() < deadline, "{vm} not {state} within {timeout:?}: {v:#}");
            std::thread::sleep(every);
        }
    }

    /// `recovery-points --json`: the seqs listed, in order.
    pub fn point_seqs(&self, vm: &str) -> Vec<u64> {
        let v = self.ctl_json(&["recovery-points", vm]);
        v.as_array().expect("points array").iter().map(|p| p["seq"].as_u64().expect("seq")).collect()
    }

    /// `jobs --vm VM --json`.
    pub fn jobs_of(&self, vm: &str) -> Vec<Value> {
        self.ctl_json(&["jobs", "--vm", vm]).as_array().expect("jobs array").clone()
    }

    /// The running job of `kind` of a VM now: (bytes done, bytes total).
    pub fn job_progress(&self, vm: &str, kind: &str) -> Option<(u64, u64)> {
        self.jobs_of(vm)
            .iter()
            .find(|j| j["kind"] == kind && j["status"] == "Running")
            .map(|j| (j["bytes_done"].as_u64().unwrap_or(0), j["bytes_total"].as_u64().unwrap_or(0)))
    }

    /// Polls the running job of `kind` until it has done `share` of its
    /// bytes (0..=1), calling `on_the_way` once when it passes half of
    /// that; panics after `timeout`.
    pub fn wait_job_share(&self, vm: &str, kind: &str, share: f64, timeout: Duration, mut on_the_way: impl FnMut()) {
        let deadline = Instant::now() + timeout;
        let mut called = false;
        loop {
            let (done, total) = self.job_progress(vm, kind).unwrap_or((0, u64::MAX));
            let reached = |s: f64| total != u64::MAX && done as f64 >= total as f64 * s;
            if !called && reached(share / 2.0) {
                on_the_way();
                called = true;
            }
            if called && reached(share) {
                return;
            }
            assert!(Instant::now() < deadline, "the {kind} job of {vm} did not reach {share}: {done} of {total}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls `jobs --vm VM` until a job of `kind` has ended; returns the
    /// latest such job.
    pub fn wait_job_ended(&self, vm: &str, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let jobs = self.jobs_of(vm);
            if let Some(j) = jobs.iter().rev().find(|j| j["kind"] == kind && j["status"] != "Running") {
                return j.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} job of {vm} ended within {timeout:?}: {jobs:#?}\nVM: {:#}",
                self.show(vm)
            );
            std::thread::sleep(POLL);
        }
    }

    /// `replicate-now --json`: the new point's seq; fails if none was cut.
    pub fn replicate_now(&self, vm: &str) -> u64 {
        let v = self.ctl_json(&["replicate-now", vm]);
        v["point"]["seq"].as_u64().unwrap_or_else(|| panic!("replicate-now cut no point: {v}"))
    }

    /// `replicate-now --json`, retried while the VM is not ready for it
    /// (FailedPrecondition while ResyncRequired / Resynchronizing, or a
    /// cycle that failed and is retried). Returns the new point's seq
    /// (`None`: nothing written since the last point). Panics on Critical or
    /// at the deadline.
    pub fn replicate_now_retry(&self, vm: &str, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let out = self.ctl(&["--json", "replicate-now", vm]);
            if out.ok() {
                let v: Value = serde_json::from_str(&out.stdout)
                    .unwrap_or_else(|e| panic!("replicate-now: not JSON ({e}): {}", out.text()));
                return v["point"]["seq"].as_u64();
            }
            let state = self.show(vm);
            assert_ne!(state["state"], "Critical", "{vm} went Critical: {state:#}\n{}", out.text());
            assert!(
                Instant::now() < deadline,
                "replicate-now {vm} still failing after {tries} tries in {timeout:?}: {}\nVM: {state:#}",
                out.text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `test-failover VM --recovery-point POINT --out OUT` (waits for the
    /// job); asserts it succeeded for this VM and returns the job.
    pub fn test_failover(&self, vm: &str, point: &str, out: &Path) -> Value {
        let out_s = out.to_str().expect("utf-8 path");
        let job = self.ctl_json(&["test-failover", vm, "--recovery-point", point, "--out", out_s]);
        assert_eq!(job["kind"], "TestFailover", "{job}");
        assert_eq!(job["status"], "Succeeded", "test failover of {vm} at {point}: {job}");
        assert_eq!(job["vm"], vm, "{job}");
        job
    }

    /// `failover VM --out OUT [--unplanned --recovery-point POINT]` (waits
    /// for the job); asserts it succeeded for this VM and returns the job.
    pub fn failover(&self, vm: &str, unplanned: Option<&str>, out: &Path) -> Value {
        let out_s = out.to_str().expect("utf-8 path");
        let mut args = vec!["failover", vm, "--out", out_s];
        if let Some(point) = unplanned {
            args.extend(["--unplanned", "--recovery-point", point]);
        }
        let job = self.ctl_json_timeout(&args, Duration::from_secs(180));
        assert_eq!(job["kind"], "Failover", "{job}");
        assert_eq!(job["status"], "Succeeded", "failover of {vm}: {job}");
        assert_eq!(job["vm"], vm, "{job}");
        job
    }

    /// Test failover at latest into `out`, compared byte for byte with the
    /// source disk files `(name, path)`.
    /// Cuts a point with every write so far ([`Self::replicate_now_retry`]),
    /// then checks that a test failover at latest equals the sources; the
    /// failover's output folder (under the daemon's folder) is removed after.
    pub fn catch_up_and_compare(&self, vm: &str, disks: &[(&str, &Path)], timeout: Duration) {
        self.replicate_now_retry(vm, timeout);
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = self.dir().join(format!("failover-{vm}-{n}"));
        self.assert_failover_equals_sources(vm, &out, disks);
        std::fs::remove_dir_all(&out).unwrap_or_else(|e| panic!("removing {}: {e}", out.display()));
    }

    pub fn assert_failover_equals_sources(&self, vm: &str, out: &Path, disks: &[(&str, &Path)]) {
        let job = self.test_failover(vm, "latest", out);
        for (name, path) in disks {
            let got = read_file(&out.join(format!("{name}.img")));
            assert_same_bytes(&format!("{vm}/{name} restored at latest ({job}) vs source"), &got, &read_file(path));
        }
    }
}

/// The numbers in a resync job's detail:
/// "recovery point N: compared X blocks, sent Y blocks, B bytes sent".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncDetail {
    pub point: u64,
    pub compared: u64,
    pub sent_blocks: u64,
    pub bytes_sent: u64,
}

impl ResyncDetail {
    /// Parses a Resync job's `detail`, panicking with it when a number is missing.
    pub fn parse(detail: &str) -> ResyncDetail {
        let after = |word: &str| -> u64 {
            let i = detail.find(word).unwrap_or_else(|| panic!("no {word:?} in job detail {detail:?}")) + word.len();
            let n: String = detail[i..].trim_start().chars().take_while(char::is_ascii_digit).collect();
            n.parse().unwrap_or_else(|_| panic!("job detail {detail:?}: no number after {word:?}"))
        };
        let bytes_sent = {
            let end = detail.find(" bytes sent").unwrap_or_else(|| panic!("no 'bytes sent' in job detail {detail:?}"));
            let start = detail[..end].rfind(' ').map_or(0, |i| i + 1);
            detail[start..end].parse().unwrap_or_else(|_| panic!("job detail {detail:?}: bad byte count"))
        };
        ResyncDetail {
            point: after("recovery point"),
            compared: after("compared"),
            sent_blocks: after("sent"),
            bytes_sent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ResyncDetail;

    #[test]
    fn a_resync_detail_gives_its_numbers() {
        let d = ResyncDetail::parse("recovery point 7: compared 8192 blocks, sent 12 blocks, 49210 bytes sent");
        assert_eq!(d, ResyncDetail { point: 7, compared: 8192, sent_blocks: 12, bytes_sent: 49210 });
    }
}
