//! Many hosts, one store, and restore from any machine.
//!
//! Three ferryd processes (separate data folders, one moto bucket) each
//! protect a VM named `vm1` with different data; a second process with only
//! the URL, the host id (and the key) lists and restores each, byte for byte
//! and sparse; unprotecting one host's VM leaves the others restorable.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::harness::{
    allocated_bytes, assert_same_bytes, binaries, qemu_io, read_file, require_tool, run, write_image, BlobKind,
    BlobServer, Daemon, Ran, MIB,
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
