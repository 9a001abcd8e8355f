//! End to end into blob stores: `ferryd --target az://...` (Azurite) and
//! `--target s3://...` (moto) protect a two-disk VM, qemu-io writes through
//! NBD during and after the initial replication, and a test failover is
//! byte-identical to the sources, plain and with encryption on
//! (`--encryption-key-file`). `ferryctl show` and `list` name the target,
//! never a secret.

use std::path::Path;
use std::time::Duration;

use ferry::harness::{qemu_io, random_disk, require_tool, BlobKind, BlobServer, Daemon, MIB};

fn protect_into(kind: BlobKind, encrypted: bool) {
    require_tool("qemu-io");
    let server = BlobServer::start(kind);
    let url = server.url("ferry-e2e", Some("site-a"));
    let mut args = vec!["--target".to_string(), url.clone()];
    for (k, v) in server.options() {
        args.extend(["--target-option".to_string(), format!("{k}={v}")]);
    }
    let keys = tempfile::tempdir().unwrap();
    let shown = if encrypted {
        let key_file = keys.path().join("key");
        std::fs::write(&key_file, ferry::harness::random_bytes(32)).unwrap();
        args.extend(["--encryption-key-file".to_string(), key_file.display().to_string()]);
        format!("{url} (encrypted)")
    } else {
        url.clone()
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut d = Daemon::builder().args(&args).start();
    let (pa, pb) = (d.disks().join("a.img"), d.disks().join("b.img"));
    random_disk(&pa, 32 * MIB);
    random_disk(&pb, 32 * MIB);
    let (da, db) = (format!("a={}", pa.display()), format!("b={}", pb.display()));
    d.ctl_json(&["protect", "vm1", "--disk", &da, "--disk", &db, "--frequency", "1h"]);
    // During the initial replication (or right after it, on a fast machine).
    qemu_io(&d.uri("vm1", "a"), &["write -P 0x11 0 1M", "write -z 8M 2M", "flush"]);
    qemu_io(&d.uri("vm1", "b"), &["write -P 0x21 31M 1M", "flush"]);
    d.wait_state("vm1", "Protected", Duration::from_secs(120));
    qemu_io(&d.uri("vm1", "a"), &["write -P 0x31 4096 777", "write -P 0x32 20M 3M", "flush"]);
    qemu_io(&d.uri("vm1", "b"), &["write -z 1M 256k", "write -P 0x42 0 4096", "flush"]);
    d.catch_up_and_compare("vm1", &[("a", Path::new(&pa)), ("b", Path::new(&pb))], Duration::from_secs(120));

    let show = d.ctl_ok(&["show", "vm1"]);
    assert!(show.contains(&format!("target: {shown}")), "{show}");
    let list = d.ctl_ok(&["list"]);
    assert!(list.contains(&format!("target: {shown}")), "{list}");
    assert_eq!(d.show("vm1")["target"], shown.as_str());
    let stderr = d.stderr();
    for (key, value) in server.options() {
        if key.contains("key") && !key.contains("key_id") {
            for text in [&show, &list, &stderr] {
                assert!(!text.contains(&value), "the {key} value is printed:\n{text}");
            }
        }
    }
    d.assert_healthy();
    d.stop();
}

#[test]
fn a_vm_protected_into_azurite_fails_over_byte_identical() {
    protect_into(BlobKind::Azurite, false);
}

#[test]
fn a_vm_protected_into_moto_s3_fails_over_byte_identical() {
    protect_into(BlobKind::Moto, false);
}

#[test]
fn an_encrypted_vm_in_azurite_fails_over_byte_identical() {
    protect_into(BlobKind::Azurite, true);
}

#[test]
fn an_encrypted_vm_in_moto_s3_fails_over_byte_identical() {
    protect_into(BlobKind::Moto, true);
}
