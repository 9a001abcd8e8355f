//! Many hosts, one store, and restore from any machine.
//!
//! Three ferryd processes (separate data folders, one moto bucket) each
//! protect a VM named `vm1` with different data; a second process with only
//! the URL, the host id (and the key) lists and restores each, byte for byte
//! and sparse; unprotecting one host's VM leaves the others restorable.
//!
//! Failover through ferryd into the same kind of store: planned (writes
//! acknowledged through NBD and never replicated by hand are in the final
//! point, the open NBD connection's next write is refused) and unplanned
//! (onto an older point), each also restored by a second process with only
//! the URL, the host id and the key.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::harness::nbd::{NbdClient, CMD_WRITE};
use ferry::harness::{
    allocated_bytes, assert_same_bytes, binaries, qemu_io, random_disk, read_file, require_tool, run, write_image,
    BlobKind, BlobServer, Daemon, Ran, MIB,
};

/// `ferryctl` with no daemon: only the store's URL, its options, a host id and a key.
fn standalone(server: &BlobServer, url: &str, host: &str, key: Option<&Path>, args: &[&str]) -> Ran {
    let mut cmd = Command::new(&binaries().ferryctl);
    cmd.args(args).args(["--target", url, "--host", host]);
    for (k, v) in server.options() {
        cmd.arg("--target-option").arg(format!("{k}={v}"));
    }
    if let Some(k) = key {
        cmd.arg("--encryption-key-file").arg(k);
    }
    // No daemon anywhere: a wrong endpoint proves it is not used.
    cmd.env("FERRY_ENDPOINT", "http://127.0.0.1:1");
    run(&mut cmd, Duration::from_secs(120))
}

fn daemon_into(server: &BlobServer, url: &str, host: &str, key: &Path) -> Daemon {
    let mut args = vec!["--target".to_string(), url.to_string(), "--host-id".to_string(), host.to_string()];
    for (k, v) in server.options() {
        args.extend(["--target-option".to_string(), format!("{k}={v}")]);
    }
    args.extend(["--encryption-key-file".to_string(), key.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::builder().args(&args).start()
}

#[test]
fn three_hosts_share_a_bucket_and_each_restores_from_the_store_alone() {
    require_tool("qemu-io");
    let server = BlobServer::start(BlobKind::Moto);
    let url = server.url("ferry-hosts", Some("fleet"));
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("key");
    std::fs::write(&key, ferry::harness::random_bytes(32)).unwrap();

    let hosts = ["hv-01", "hv-02", "hv-03"];
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut sources: Vec<PathBuf> = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let d = daemon_into(&server, &url, host, &key);
        // 32 MiB, mostly holes: a sparse restore stays small.
        let disk = d.disks().join("a.img");
        write_image(&disk, 32 * MIB, |mib| mib % 8 == i as u64);
        d.ctl_json(&["protect", "vm1", "--disk", &format!("a={}", disk.display()), "--frequency", "1h"]);
        d.wait_state("vm1", "Protected", Duration::from_secs(120));
        let pattern = format!("write -P {:#04x} {} 64k", 0x51 + i, (i as u64 + 1) * MIB);
        qemu_io(&d.uri("vm1", "a"), &[pattern.as_str(), "flush"]);
        d.replicate_now("vm1");
        sources.push(disk);
        daemons.push(d);
    }

    let out = tempfile::tempdir().unwrap();
    for (i, host) in hosts.iter().enumerate() {
        let points = standalone(&server, &url, host, Some(&key), &["--json", "points", "vm1"]);
        assert!(points.ok(), "points of {host}: {}", points.text());
        let list: serde_json::Value = serde_json::from_str(&points.stdout).unwrap();
        assert!(list.as_array().unwrap().len() >= 2, "{host}: {list}");
        let dir = out.path().join(host);
        let dir_s = dir.display().to_string();
        let r = standalone(
            &server,
            &url,
            host,
            Some(&key),
            &["--json", "restore", "vm1", "--out", &dir_s, "--workers", "4"],
        );
        assert!(r.ok(), "restore of {host}: {}", r.text());
        let image = dir.join("a.img");
        assert_same_bytes(
            &format!("{host} restored from the store alone"),
            &read_file(&image),
            &read_file(&sources[i]),
        );
        assert!(
            allocated_bytes(&image) < 16 * MIB,
            "{host}: the restore is not sparse ({} bytes)",
            allocated_bytes(&image)
        );
        // Again without --force: the image is kept and the refusal says why.
        let again = standalone(&server, &url, host, Some(&key), &["restore", "vm1", "--out", &dir_s]);
        assert!(!again.ok() && again.text().contains("already exists"), "{}", again.text());
        let forced = standalone(&server, &url, host, Some(&key), &["restore", "vm1", "--out", &dir_s, "--force"]);
        assert!(forced.ok(), "{}", forced.text());
    }

    // Without the key, or with another: refused, saying which.
    let no_key = standalone(&server, &url, hosts[0], None, &["points", "vm1"]);
    assert!(!no_key.ok() && no_key.text().contains("is encrypted"), "{}", no_key.text());
    let other = keys.path().join("other");
    std::fs::write(&other, ferry::harness::random_bytes(32)).unwrap();
    let wrong = standalone(&server, &url, hosts[0], Some(&other), &["points", "vm1"]);
    assert!(!wrong.ok() && wrong.text().contains("wrong encryption key"), "{}", wrong.text());
    // A host that never wrote here: not found, naming the VM.
    let none = standalone(&server, &url, "hv-99", Some(&key), &["points", "vm1"]);
    assert!(!none.ok() && none.text().contains("vm1"), "{}", none.text());

    // One host unprotects its vm1: the other two still restore.
    daemons[1].ctl_ok(&["unprotect", "vm1"]);
    for (i, host) in hosts.iter().enumerate().filter(|(i, _)| *i != 1) {
        let dir = out.path().join(format!("{host}-after"));
        let r = standalone(&server, &url, host, Some(&key), &["restore", "vm1", "--out", &dir.display().to_string()]);
        assert!(r.ok(), "restore of {host} after hv-02's unprotect: {}", r.text());
        assert_same_bytes(&format!("{host} after"), &read_file(&dir.join("a.img")), &read_file(&sources[i]));
    }
    for d in daemons.iter_mut() {
        d.assert_healthy();
        d.stop();
    }
}

#[test]
fn planned_and_unplanned_failover_through_ferryd_and_restore_from_the_store_alone() {
    require_tool("qemu-io");
    let server = BlobServer::start(BlobKind::Moto);
    let url = server.url("ferry-failover", None);
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("key");
    std::fs::write(&key, ferry::harness::random_bytes(32)).unwrap();
    let mut d = daemon_into(&server, &url, "hv-a", &key);
    let (pa, pb, pc) = (d.disks().join("a.img"), d.disks().join("b.img"), d.disks().join("c.img"));
    random_disk(&pa, 16 * MIB);
    random_disk(&pb, 8 * MIB);
    random_disk(&pc, 8 * MIB);
    let (da, db, dc) = (format!("a={}", pa.display()), format!("b={}", pb.display()), format!("c={}", pc.display()));
    d.ctl_json(&["protect", "vm1", "--disk", &da, "--disk", &db, "--frequency", "1h"]);
    d.ctl_json(&["protect", "vm2", "--disk", &dc, "--frequency", "1h"]);
    d.wait_state("vm1", "Protected", Duration::from_secs(120));
    d.wait_state("vm2", "Protected", Duration::from_secs(120));

    // Planned: writes acknowledged (no flush, no replicate-now) are in the final point.
    let mut nbd = NbdClient::open(&d.socket, "vm1/a");
    nbd.write(3 * MIB, &ferry::harness::random_bytes(256 << 10)).unwrap();
    qemu_io(&d.uri("vm1", "b"), &["write -P 0x5a 1M 64k", "write -z 2M 1M"]);
    let out = d.dir().join("migrated");
    let job = d.failover("vm1", None, &out);
    for (name, src) in [("a", &pa), ("b", &pb)] {
        let got = read_file(&out.join(format!("{name}.img")));
        assert_same_bytes(&format!("vm1/{name} after a planned failover ({job})"), &got, &read_file(src));
    }
    let show = d.show("vm1");
    assert_eq!(show["state"], "FailedOver", "{show}");
    assert_eq!(show["failover"]["planned"], true, "{show}");
    let point = show["failover"]["recovery_point"].as_u64().expect("the point is shown");
    assert_eq!(show["failover"]["out_dir"], out.to_str().unwrap(), "{show}");
    // The connection opened before the failover takes no more writes (EPERM); reads go on.
    let (errno, _) = nbd.call(CMD_WRITE, 0, 4096, &[0u8; 4096]).unwrap();
    assert_eq!(errno, 1, "a write after a planned failover must be refused with EPERM");
    assert_eq!(nbd.read(3 * MIB, 4096).unwrap(), read_file(&pa)[3 * MIB as usize..][..4096]);
    drop(nbd);
    let text = d.ctl_ok(&["show", "vm1"]);
    assert!(text.contains("failed over (planned)") && text.contains(&format!("recovery point {point}")), "{text}");
    // Replication has stopped: no point can be cut.
    d.ctl_err(&["replicate-now", "vm1"], "FailedPrecondition");

    // A second process with only the URL, the host id and the key restores the same point.
    let elsewhere = tempfile::tempdir().unwrap();
    let dir_s = elsewhere.path().display().to_string();
    let r = standalone(&server, &url, "hv-a", Some(&key), &["restore", "vm1", "--out", &dir_s]);
    assert!(r.ok(), "{}", r.text());
    for (name, src) in [("a", &pa), ("b", &pb)] {
        let got = read_file(&elsewhere.path().join(format!("{name}.img")));
        assert_same_bytes(&format!("vm1/{name} restored elsewhere"), &got, &read_file(src));
    }

    // Unplanned, onto an older point: what came after it is not in the image.
    qemu_io(&d.uri("vm2", "c"), &["write -P 0x61 0 64k", "flush"]);
    let older = d.replicate_now("vm2");
    let at_older = read_file(&pc);
    qemu_io(&d.uri("vm2", "c"), &["write -P 0x62 0 64k", "flush"]);
    d.replicate_now("vm2");
    let dr = d.dir().join("dr");
    d.failover("vm2", Some(&older.to_string()), &dr);
    assert_same_bytes(
        "vm2/c after an unplanned failover onto an older point",
        &read_file(&dr.join("c.img")),
        &at_older,
    );
    let show = d.show("vm2");
    assert_eq!((show["state"].as_str(), show["failover"]["planned"].as_bool()), (Some("FailedOver"), Some(false)));

    // A restart keeps both FailedOver, their exports refusing writes.
    d.restart();
    assert_eq!(d.state("vm1"), "FailedOver");
    assert_eq!(d.state("vm2"), "FailedOver");
    let mut nbd = NbdClient::open(&d.socket, "vm2/c");
    assert_eq!(nbd.call(CMD_WRITE, 0, 512, &[0u8; 512]).unwrap().0, 1, "writes stay refused after a restart");
    drop(nbd);
    // Unprotect clears it; the replica stays restorable from the store alone.
    d.ctl_ok(&["unprotect", "vm1"]);
    d.ctl_err(&["show", "vm1"], "NotFound");
    let again = tempfile::tempdir().unwrap();
    let r = standalone(
        &server,
        &url,
        "hv-a",
        Some(&key),
        &["restore", "vm1", "--out", &again.path().display().to_string()],
    );
    assert!(r.ok(), "{}", r.text());
    d.assert_healthy();
    d.stop();
}
