//! Resilience through the real binaries: auto-resync after the 50% rule
//! (immediately, and waiting for off-hours), the bandwidth throttle set
//! through ferryctl, pause / resume, and target faults injected through
//! ferryd's `--faults` file. Writes go through the NBD export.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry::harness::nbd::NbdClient;
use ferry::harness::{assert_same_bytes, random_bytes, random_disk, read_file, Daemon, ResyncDetail, MIB};

/// Protects `vm` with one random disk `name` of `size` and waits for Protected.
fn protect_one(d: &Daemon, vm: &str, name: &str, size: u64) -> (std::path::PathBuf, Vec<u8>) {
    let path = d.disks().join(format!("{name}.img"));
    let bytes = random_disk(&path, size);
    d.ctl_json(&["protect", vm, "--disk", &format!("{name}={}", path.display()), "--frequency", "1h"]);
    d.wait_state(vm, "Protected", Duration::from_secs(90));
    (path, bytes)
}

/// Writes `len` random bytes at `off` through NBD (no flush); applies them to `model`.
fn nbd_write_random(c: &mut NbdClient, off: u64, len: u64, model: &mut [u8]) {
    let data = random_bytes(len as usize);
    c.write(off, &data).unwrap_or_else(|e| panic!("NBD write at {off}: {e}"));
    model[off as usize..(off + len) as usize].copy_from_slice(&data);
}

fn transitions_to<'a>(v: &'a serde_json::Value, state: &str) -> Vec<&'a serde_json::Value> {
    v["transitions"].as_array().expect("transitions").iter().filter(|t| t["to"] == state).collect()
}

/// Catches up and checks a test failover at latest against the source and the model.
fn replicate_and_compare(d: &Daemon, vm: &str, disk: &str, path: &Path, model: &[u8]) {
    d.replicate_now_retry(vm, Duration::from_secs(90));
    assert_same_bytes(&format!("{vm}/{disk}: source vs model"), &read_file(path), model);
    let out = d.dir().join(format!("failover-{vm}-{}", Instant::now().elapsed().as_nanos()));
    d.assert_failover_equals_sources(vm, &out, &[(disk, path)]);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn logs_over_half_the_disk_lead_to_an_automatic_resync_that_sends_only_changes() {
    const SIZE: u64 = 16 * MIB;
    let mut d = Daemon::start_with(&["--auto-resync", "immediately", "--retry-time-scale", "0.001"]);
    let (path, mut model) = protect_one(&d, "vm1", "os", SIZE);
    let replica = model.clone(); // what the target holds: the base point

    // The same 2 MiB region written 5 times: 10 MiB of logs for 2 MiB changed.
    let mut c = NbdClient::open(&d.socket, "vm1/os");
    for _ in 0..5 {
        nbd_write_random(&mut c, 3 * MIB, 2 * MIB, &mut model);
    }
    c.flush().expect("FLUSH");
    drop(c);

    let job = d.wait_job_ended("vm1", "Resync", Duration::from_secs(90));
    assert_eq!(job["status"], "Succeeded", "{job:#}");
    let detail = job["detail"].as_str().unwrap_or_default();
    let ResyncDetail { compared, sent_blocks: sent, bytes_sent: bytes, .. } = ResyncDetail::parse(detail);
    eprintln!("resync: {detail} (compared {compared}, sent {sent}, {bytes} bytes)");
    // Every block of the disk is compared; exactly the blocks the writes
    // changed (the model against the replica) are sent.
    let block = ferry_engine::resync::DEFAULT_RESYNC_BLOCK;
    let changed = model.chunks(block as usize).zip(replica.chunks(block as usize)).filter(|(m, r)| m != r).count();
    assert_eq!(changed as u64, 2 * MIB / block, "random writes over 2 MiB change each of its blocks");
    assert_eq!(compared, SIZE / block, "{detail}");
    assert_eq!(sent, changed as u64, "{detail}");
    // Random blocks do not compress: the bytes sent are those blocks plus framing.
    let logical = sent * block;
    assert!(bytes >= logical && bytes <= logical + logical / 100, "{bytes} bytes for {logical} of blocks: {detail}");

    let v = d.wait_state("vm1", "Protected", Duration::from_secs(60));
    let to_rr = transitions_to(&v, "ResyncRequired");
    assert!(
        to_rr.iter().any(|t| t["reason"].as_str().unwrap_or_default().contains("50%")),
        "a transition to ResyncRequired naming the 50% rule: {v:#}"
    );
    assert!(!transitions_to(&v, "Resynchronizing").is_empty(), "{v:#}");

    replicate_and_compare(&d, "vm1", "os", &path, &model);
    d.assert_healthy();
    d.stop();
}

#[test]
fn auto_resync_waits_for_off_hours_and_an_operator_can_start_it_now() {
    const SIZE: u64 = 8 * MIB;
    // Work hours all day, every day: the off-hours window never comes.
    let mut d =
        Daemon::start_with(&["--auto-resync", "off-hours", "--work-hours", "00:00-24:00", "--work-days", "all"]);
    let (path, mut model) = protect_one(&d, "vm2", "data", SIZE);

    let mut c = NbdClient::open(&d.socket, "vm2/data");
    for _ in 0..3 {
        nbd_write_random(&mut c, MIB, 2 * MIB, &mut model); // 6 MiB of logs > 4 MiB
    }
    c.flush().expect("FLUSH");
    drop(c);

    let v = d.wait_state("vm2", "ResyncRequired", Duration::from_secs(30));
    assert!(v["reason"].as_str().unwrap_or_default().contains("50%"), "{v:#}");
    // It stays there: no resync during work hours.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let v = d.ctl_json(&["show", "vm2"]);
        assert_eq!(v["state"], "ResyncRequired", "no automatic resync during work hours: {v:#}");
        let jobs = d.jobs_of("vm2");
        assert!(jobs.iter().all(|j| j["kind"] != "Resync"), "no Resync job during work hours: {jobs:#?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    d.ctl_err(&["replicate-now", "vm2"], "FailedPrecondition");

    // The operator starts it now.
    let v = d.ctl_json(&["resync", "vm2"]);
    assert!(["Resynchronizing", "Protected"].contains(&v["state"].as_str().unwrap_or_default()), "{v:#}");
    let job = d.wait_job_ended("vm2", "Resync", Duration::from_secs(60));
    assert_eq!(job["status"], "Succeeded", "{job:#}");
    let bytes = ResyncDetail::parse(job["detail"].as_str().unwrap_or_default()).bytes_sent;
    assert!(bytes < SIZE, "{job:#}");
    d.wait_state("vm2", "Protected", Duration::from_secs(60));
    replicate_and_compare(&d, "vm2", "data", &path, &model);
    d.assert_healthy();
    d.stop();
}

#[test]
fn throttle_set_through_the_cli_bounds_the_initial_replication() {
    const SIZE: u64 = 8 * MIB;
    let mut d = Daemon::start();
    let t = d.ctl_json(&[
        "throttle",
        "set",
        "--work-hours",
        "00:00-24:00",
        "--work-days",
        "all",
        "--work-limit",
        "8Mbps",
        "--off-limit",
        "8Mbps",
    ]);
    let show = d.ctl_json(&["throttle", "show"]);
    assert_eq!(t, show, "set returns what show reports");
    assert_eq!(show["work_limit"], "8Mbps", "{show}");
    assert_eq!(show["off_limit"], "8Mbps", "{show}");
    assert_eq!(show["limit_now"], "8Mbps", "{show}");
    assert!(show["work_hours"].as_str().unwrap_or_default().contains("00:00"), "{show}");

    // Out of range: refused, naming the bounds; nothing changes.
    for args in [["--work-limit", "100Kbps"], ["--off-limit", "2Gbps"]] {
        let mut all = vec!["throttle", "set"];
        all.extend(args);
        let e = d.ctl_err(&all, "InvalidArgument");
        assert!(e.contains("512 Kbps") && e.contains("1023 Mbps"), "{args:?}: {e}");
    }
    assert_eq!(d.ctl_json(&["throttle", "show"]), show, "a refused set changes nothing");

    // 8 Mbps = 1 MB/s: an 8 MiB random (incompressible) disk takes >= ~7 s.
    let (path, mut model) = protect_one(&d, "vm3", "big", SIZE);
    let jobs = d.jobs_of("vm3");
    let job = jobs.iter().find(|j| j["kind"] == "InitialReplication").expect("an InitialReplication job");
    assert_eq!(job["status"], "Succeeded", "{job}");
    let points = d.ctl_json(&["recovery-points", "vm3"]);
    let stored = points[0]["bytes_stored"].as_u64().expect("bytes_stored");
    let ms = job["ended_ms"].as_u64().unwrap() - job["started_ms"].as_u64().unwrap();
    let rate = stored as f64 / (ms.max(1) as f64 / 1000.0);
    eprintln!("initial replication at 8 Mbps: {stored} bytes stored in {ms} ms = {:.0} B/s", rate);
    assert!(stored >= SIZE * 9 / 10, "random data does not compress: {stored} bytes stored ({points})");
    assert!(rate <= 1_500_000.0, "8 Mbps limit: {stored} bytes in {ms} ms is {rate:.0} B/s > 1.5 MB/s ({job})");

    // Unlimited again: the next point goes through.
    let t = d.ctl_json(&["throttle", "set", "--work-limit", "unlimited", "--off-limit", "unlimited"]);
    assert_eq!(t["limit_now"], "unlimited", "{t}");
    assert_eq!(t["work_hours"], show["work_hours"], "flags left out keep their value: {t}");
    let mut c = NbdClient::open(&d.socket, "vm3/big");
    nbd_write_random(&mut c, 0, MIB, &mut model);
    c.flush().expect("FLUSH");
    drop(c);
    let started = Instant::now();
    replicate_and_compare(&d, "vm3", "big", &path, &model);
    eprintln!("unlimited: replicate-now of 1 MiB + failover took {:?}", started.elapsed());
    d.assert_healthy();
    d.stop();
}

#[test]
fn pause_keeps_writes_and_refuses_replication_until_resume() {
    const SIZE: u64 = 8 * MIB;
    let mut d = Daemon::start();
    let (path, mut model) = protect_one(&d, "vm4", "sys", SIZE);

    let v = d.ctl_json(&["pause", "vm4"]);
    assert_eq!(v["state"], "Paused", "{v:#}");
    assert_eq!(d.state("vm4"), "Paused");
    // Writes are still accepted, and read back.
    let mut c = NbdClient::open(&d.socket, "vm4/sys");
    nbd_write_random(&mut c, 2 * MIB + 4096, 3 * MIB / 2, &mut model);
    nbd_write_random(&mut c, SIZE - 4096, 4096, &mut model);
    c.flush().expect("FLUSH while paused");
    assert!(c.read_all().expect("NBD read") == model, "reads while paused show the writes");
    drop(c);
    let e = d.ctl_err(&["replicate-now", "vm4"], "FailedPrecondition");
    assert!(e.contains("Paused"), "{e}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(d.state("vm4"), "Paused", "still paused");

    let v = d.ctl_json(&["resume", "vm4"]);
    assert!(v["state"] != "Paused", "{v:#}");
    let v = d.wait_state("vm4", "Protected", Duration::from_secs(30));
    assert!(!transitions_to(&v, "Paused").is_empty(), "{v:#}");
    replicate_and_compare(&d, "vm4", "sys", &path, &model);
    d.assert_healthy();
    d.stop();
}

#[test]
fn an_authentication_failure_goes_critical_without_retries_until_resume() {
    const SIZE: u64 = 4 * MIB;
    let fdir = tempfile::Builder::new().prefix("ferry-faults").tempdir().unwrap();
    let faults = fdir.path().join("faults.json");
    std::fs::write(&faults, r#"{"auth_failure":true}"#).unwrap();
    let mut d = Daemon::start_with(&["--retry-time-scale", "0.001", "--faults", faults.to_str().unwrap()]);
    let path = d.disks().join("app.img");
    let mut model = random_disk(&path, SIZE);
    d.ctl_json(&["protect", "vm5", "--disk", &format!("app={}", path.display()), "--frequency", "1h"]);
    let v = d.wait_state("vm5", "Critical", Duration::from_secs(60));
    let reason = v["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(reason.contains("auth"), "Critical names the authentication failure: {v:#}");
    // No retry: it stays Critical and no retry is scheduled (retries are scaled to milliseconds here).
    std::thread::sleep(Duration::from_secs(2));
    let v = d.ctl_json(&["show", "vm5"]);
    assert_eq!(v["state"], "Critical", "{v:#}");
    assert_eq!(transitions_to(&v, "Critical").len(), 1, "one failure, no retries: {v:#}");
    assert!(!d.stderr().contains("retry scheduled"), "no retry after an authentication failure:\n{}", d.stderr());
    d.ctl_err(&["replicate-now", "vm5"], "FailedPrecondition");
    // Writes still go through while Critical.
    let mut c = NbdClient::open(&d.socket, "vm5/app");
    nbd_write_random(&mut c, MIB, 64 << 10, &mut model);
    c.flush().expect("FLUSH while Critical");
    drop(c);

    // Credentials fixed: the daemon re-reads the faults file every second.
    std::fs::write(&faults, "{}").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    d.ctl_json(&["resume", "vm5"]);
    d.wait_state("vm5", "Protected", Duration::from_secs(60));
    replicate_and_compare(&d, "vm5", "app", &path, &model);
    d.assert_healthy();
    d.stop();
}
