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
    d.catch_up_and_compare(vm, &[(disk, path)], Duration::from_secs(90));
    assert_same_bytes(&format!("{vm}/{disk}: source vs model"), &read_file(path), model);
}

#[test]
fn logs_over_half_the_disk_lead_to_an_automatic_resync_that_sends_only_changes() {
    const SIZE: u64 = 16 * MIB;
    let mut d = Daemon::start_with(&["--auto-resync", "immediately", "--policy-time-factor", "1000"]);
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
        to_rr.iter().any(|t| t["reason"].as_str().unwrap_or_default().ends_with("bytes, 50% of its size")),
        "a transition to ResyncRequired naming the 50% rule: {v:#}"
    );
    assert!(!transitions_to(&v, "Resynchronizing").is_empty(), "{v:#}");

    replicate_and_compare(&d, "vm1", "os", &path, &model);
    d.assert_healthy();
    d.stop();
}

/// Local wall-clock time as ferryd's schedule reads it (the same TZ):
/// (minutes since local midnight, milliseconds into that minute, Unix time in ms).
fn local_clock() -> (u32, u64, u64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    let secs = now.as_secs() as libc::time_t;
    // SAFETY: localtime_r writes into the tm we own; a zeroed tm is valid input.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    assert!(!unsafe { libc::localtime_r(&secs, &mut tm) }.is_null(), "localtime_r failed");
    let into_minute = tm.tm_sec.min(59) as u64 * 1000 + u64::from(now.subsec_millis());
    ((tm.tm_hour * 60 + tm.tm_min) as u32, into_minute, now.as_millis() as u64)
}

fn unix_ms() -> u64 {
    local_clock().2
}

/// Fills a VM's logs past 50% of its 8 MiB disk (three 2 MiB writes) and
/// waits for ResyncRequired.
fn pass_half_the_disk(d: &Daemon, vm: &str, disk: &str, model: &mut [u8]) {
    let mut c = NbdClient::open(&d.socket, &format!("{vm}/{disk}"));
    for _ in 0..3 {
        nbd_write_random(&mut c, MIB, 2 * MIB, model); // 6 MiB of logs > 4 MiB
    }
    c.flush().expect("FLUSH");
    drop(c);
    let v = d.wait_state(vm, "ResyncRequired", Duration::from_secs(30));
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("change logs of disk {disk} reached "))
            && reason.ends_with(" bytes, 50% of its size"),
        "ResyncRequired names the 50% rule for disk {disk}: {v:#}"
    );
}

#[test]
fn auto_resync_starts_by_itself_when_off_hours_begin() {
    const SIZE: u64 = 8 * MIB;
    // Work hours end at the next whole minute, or the one after when less
    // than 30 s are left for the set-up; a window that would reach midnight
    // (24:00 ends nothing: 00:00 starts the next day's work hours) waits
    // for the new day.
    let (mut minute, mut into_minute_ms, mut now_ms) = local_clock();
    while minute + 2 >= 24 * 60 {
        std::thread::sleep(Duration::from_secs(5));
        (minute, into_minute_ms, now_ms) = local_clock();
    }
    let end = if into_minute_ms <= 30_000 { minute + 1 } else { minute + 2 };
    let off_hours_at = now_ms - into_minute_ms + u64::from(end - minute) * 60_000;
    let hours = format!("00:00-{:02}:{:02}", end / 60, end % 60);
    let mut d = Daemon::start_with(&["--auto-resync", "off-hours", "--work-hours", &hours, "--work-days", "all"]);
    let (path, mut model) = protect_one(&d, "vm6", "data", SIZE);
    pass_half_the_disk(&d, "vm6", "data", &mut model);
    let ready = unix_ms();
    assert!(ready < off_hours_at, "set-up took past the end of work hours ({hours}): nothing left to show");
    eprintln!("ResyncRequired {} ms before work hours ({hours}) end", off_hours_at - ready);

    // Until off-hours begin: ResyncRequired, no Resync job.
    loop {
        let v = d.show("vm6");
        let jobs = d.jobs_of("vm6");
        if unix_ms() >= off_hours_at {
            break;
        }
        assert_eq!(v["state"], "ResyncRequired", "no automatic resync during work hours ({hours}): {v:#}");
        assert!(jobs.iter().all(|j| j["kind"] != "Resync"), "no Resync job during work hours: {jobs:#?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Then it starts by itself: ferryd waits whole minutes, so within a
    // minute of off-hours beginning (plus slack for a loaded machine).
    let job = d.wait_job_ended("vm6", "Resync", Duration::from_secs(150));
    assert_eq!(job["status"], "Succeeded", "{job:#}");
    let started = job["started_ms"].as_u64().expect("started_ms");
    assert!(started >= off_hours_at, "the resync started {} ms before off-hours: {job:#}", off_hours_at - started);
    assert!(started <= off_hours_at + 75_000, "the resync started {} ms after off-hours began", started - off_hours_at);
    let v = d.wait_state("vm6", "Protected", Duration::from_secs(60));
    let to_resync = transitions_to(&v, "Resynchronizing");
    assert_eq!(to_resync.len(), 1, "{v:#}");
    assert_eq!(to_resync[0]["from"], "ResyncRequired", "{v:#}");
    assert!(to_resync[0]["at_ms"].as_u64().unwrap_or(0) >= off_hours_at, "{v:#}");
    eprintln!("resync started {} ms after off-hours began", started - off_hours_at);
    replicate_and_compare(&d, "vm6", "data", &path, &model);
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
    pass_half_the_disk(&d, "vm2", "data", &mut model);
    // It stays there: no resync during work hours.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let v = d.ctl_json(&["show", "vm2"]);
        assert_eq!(v["state"], "ResyncRequired", "no automatic resync during work hours: {v:#}");
        let jobs = d.jobs_of("vm2");
        assert!(jobs.iter().all(|j| j["kind"] != "Resync"), "no Resync job during work hours: {jobs:#?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let e = d.ctl_err(&["replicate-now", "vm2"], "FailedPrecondition");
    assert!(e.contains("ResyncRequired"), "the refusal names the state: {e}");

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
    assert_eq!(show["work_hours"], "00:00-24:00", "{show}");

    // Out of range: refused, naming the bounds; nothing changes.
    for (args, want) in [
        (["--work-limit", "100Kbps"], "invalid work limit: 100000 bit/s is outside 512 Kbps..=1023 Mbps"),
        (["--off-limit", "2Gbps"], "invalid off-hours limit: 2000000000 bit/s is outside 512 Kbps..=1023 Mbps"),
    ] {
        let mut all = vec!["throttle", "set"];
        all.extend(args);
        let e = d.ctl_err(&all, "InvalidArgument");
        assert!(e.contains(want), "{args:?}: {e}");
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
    assert!(e.contains("Paused"), "the refusal names the state: {e}");
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
    let mut d = Daemon::start_with(&["--policy-time-factor", "1000", "--faults", faults.to_str().unwrap()]);
    let path = d.disks().join("app.img");
    let mut model = random_disk(&path, SIZE);
    d.ctl_json(&["protect", "vm5", "--disk", &format!("app={}", path.display()), "--frequency", "1h"]);
    let v = d.wait_state("vm5", "Critical", Duration::from_secs(60));
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("target authentication failed"), "Critical names the authentication failure: {v:#}");
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
