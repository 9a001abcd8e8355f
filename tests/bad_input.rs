//! Bad input against a running `ferryd`: every refusal carries the right
//! gRPC code and names the field, leaves no trace (no VM, no change log
//! beside the disk), and the daemon keeps serving afterwards.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use ferry::harness::nbd::{NbdClient, CMD_READ, CMD_WRITE};
use ferry::harness::{qemu_io, random_disk, require_tool, Daemon, MIB};

const SIZE: u64 = 4 * MIB;

/// Files in `dir` whose name ends with `.hrl` (change logs).
fn change_logs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".hrl"))
        .collect()
}

fn listed(d: &Daemon) -> Vec<String> {
    let v = d.ctl_json(&["list"]);
    v.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect()
}

/// Protects `vm1` with one disk `ok` and waits until it is Protected.
fn protected_vm(d: &Daemon) -> std::path::PathBuf {
    let path = d.disks().join("ok.img");
    random_disk(&path, SIZE);
    let spec = format!("ok={}", path.display());
    d.ctl_json(&["protect", "vm1", "--disk", &spec, "--frequency", "1h"]);
    d.wait_state("vm1", "Protected", Duration::from_secs(60));
    path
}

#[test]
fn refusals_name_the_field_and_leave_no_trace() {
    require_tool("qemu-io");
    let mut d = Daemon::start();
    // A fresh disk in its own folder for the refused requests.
    let fresh_dir = d.dir().join("fresh");
    std::fs::create_dir_all(&fresh_dir).unwrap();
    let fresh = fresh_dir.join("fresh.img");
    let fresh_bytes = random_disk(&fresh, SIZE);
    let fresh_s = fresh.to_str().unwrap().to_string();

    // A missing disk file.
    let missing = d.dir().join("nowhere.img");
    let e = d.ctl_err(&["protect", "ghost", "--disk", missing.to_str().unwrap()], "NotFound");
    assert!(e.contains(&format!("disk file not found: {}", missing.display())), "{e}");
    assert!(listed(&d).is_empty(), "nothing protected after a refusal");

    // Bad VM names, with a valid disk: the field is named, nothing is created.
    for name in ["../x", "a/b", "..", "."] {
        let e = d.ctl_err(&["protect", name, "--disk", &format!("d={fresh_s}")], "InvalidArgument");
        assert!(e.contains(&format!("invalid vm name: {name:?} ")), "{name:?}: {e}");
    }
    // Bad disk names.
    for name in ["../x", "a/b", "..", "."] {
        let e = d.ctl_err(&["protect", "vmx", "--disk", &format!("{name}={fresh_s}")], "InvalidArgument");
        assert!(e.contains(&format!("invalid disk name: {name:?} ")), "{name:?}: {e}");
    }
    // A frequency below 1 s.
    let e = d.ctl_err(&["protect", "vmx", "--disk", &fresh_s, "--frequency", "0s"], "InvalidArgument");
    assert!(e.contains("invalid frequency: 0ns is below the minimum of 1s"), "{e}");
    // A disk listed twice: same argument, or same path under two names.
    let e = d.ctl_err(&["protect", "vmx", "--disk", &fresh_s, "--disk", &fresh_s], "InvalidArgument");
    assert!(e.contains(r#"invalid disk name: "fresh" is used twice"#), "{e}");
    let (one, two) = (format!("one={fresh_s}"), format!("two={fresh_s}"));
    let e = d.ctl_err(&["protect", "vmx", "--disk", &one, "--disk", &two], "InvalidArgument");
    assert!(e.contains(&format!("invalid disk path: {fresh_s} is listed twice")), "{e}");

    assert!(listed(&d).is_empty(), "nothing protected after the refusals: {:?}", listed(&d));
    assert!(change_logs(&fresh_dir).is_empty(), "no change log beside a refused disk: {:?}", change_logs(&fresh_dir));
    let entries: Vec<_> = std::fs::read_dir(&fresh_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, ["fresh.img"], "nothing created beside the disk");
    assert!(std::fs::read(&fresh).unwrap() == fresh_bytes, "the refused disk is untouched");

    // Unknown VMs and points.
    let out = d.dir().join("out");
    let out_s = out.to_str().unwrap();
    for args in [
        vec!["show", "nope"],
        vec!["unprotect", "nope"],
        vec!["replicate-now", "nope"],
        vec!["recovery-points", "nope"],
        vec!["pause", "nope"],
        vec!["resume", "nope"],
        vec!["test-failover", "nope", "--out", out_s],
        vec!["test-failover", "nope", "--recovery-point", "99", "--out", out_s],
    ] {
        let e = d.ctl_err(&args, "NotFound");
        assert!(e.contains("VM not found: nope"), "{args:?}: {e}");
    }
    let e = d.ctl_err(&["show", "../x"], "InvalidArgument");
    assert!(e.contains(r#"invalid vm name: "../x" "#), "{e}");

    // A protected VM; a second protect of the same name, or of its disk, is refused.
    let disk = protected_vm(&d);
    let disk_bytes = std::fs::read(&disk).unwrap();
    let e = d.ctl_err(&["protect", "vm1", "--disk", &fresh_s], "AlreadyExists");
    assert!(e.contains("VM already exists: vm1"), "{e}");
    let e = d.ctl_err(&["protect", "vm9", "--disk", &format!("x={}", disk.display())], "AlreadyExists");
    assert!(e.contains(&disk.display().to_string()), "the refusal names the protected disk: {e}");
    assert_eq!(listed(&d), ["vm1"]);
    let v = d.ctl_json(&["show", "vm1"]);
    assert_eq!(v["state"], "Protected", "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["disks"][0]["name"], "ok", "{v}");
    assert!(change_logs(&fresh_dir).is_empty(), "{:?}", change_logs(&fresh_dir));
    qemu_io(&d.uri("vm1", "ok"), &["write -P 0x5a 0 64k", "flush", "read -P 0x5a 0 64k"]);
    let mut want = disk_bytes.clone();
    want[..64 << 10].fill(0x5a);
    assert!(std::fs::read(&disk).unwrap() == want, "vm1's disk is intact after the refusals");

    // Unknown point of a known VM.
    let e = d.ctl_err(&["test-failover", "vm1", "--recovery-point", "99", "--out", out_s], "NotFound");
    assert!(e.contains("recovery point not found: vm1#99"), "{e}");
    assert!(!out.exists(), "a refused failover creates no output folder");
    let e = d.ctl_err(&["test-failover", "vm1", "--recovery-point", "0", "--out", out_s], "");
    assert!(e.contains("--recovery-point"), "{e}");

    // An output folder that is the disk's own folder.
    let before = std::fs::metadata(&disk).unwrap().ino();
    let e = d.ctl_err(&["test-failover", "vm1", "--out", d.disks().to_str().unwrap()], "InvalidArgument");
    assert!(e.contains("invalid out") && e.contains(&disk.display().to_string()), "{e}");
    assert_eq!(std::fs::metadata(&disk).unwrap().ino(), before, "the disk file was not replaced");
    assert!(std::fs::read(&disk).unwrap() == want, "the disk is untouched");

    d.assert_healthy();
    d.stop();
}

/// An output folder spelled so that it only resolves to the disks' folder
/// once created (`<disks>/missing/..`) must still be refused: a test
/// failover never replaces a protected disk.
#[test]
fn test_failover_refuses_an_out_folder_that_resolves_to_the_disk_folder() {
    let mut d = Daemon::start();
    let disk = protected_vm(&d);
    // A write after the last point: a restore would visibly roll it back.
    qemu_io(&d.uri("vm1", "ok"), &["write -P 0x77 0 64k", "flush"]);
    let want = std::fs::read(&disk).unwrap();
    let inode = std::fs::metadata(&disk).unwrap().ino();

    // ferryctl runs in the daemon's temp folder: a relative path, resolved
    // (without touching `..`) against it, that lands on the disks folder.
    let out = d.ctl(&["test-failover", "vm1", "--out", "disks/missing/.."]);
    let shown = out.text();
    let replaced = std::fs::metadata(&disk).unwrap().ino() != inode;
    let now = std::fs::read(&disk).unwrap();
    assert!(!replaced && now == want, "test failover replaced the protected disk {} ({shown})", disk.display());
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("ferryctl: InvalidArgument: invalid out"), "{shown}");
    assert!(shown.contains(&disk.display().to_string()), "the refusal names the protected disk: {shown}");
    d.assert_healthy();
    d.stop();
}

/// One file listed as two disks under two spellings (`dir/a.img` and
/// `dir/sub/../a.img`) is refused as InvalidArgument, leaves no change log
/// behind, and the file can then be protected normally.
#[test]
fn a_disk_listed_twice_under_an_alias_is_refused() {
    let mut d = Daemon::start();
    let path = d.disks().join("a.img");
    random_disk(&path, SIZE);
    std::fs::create_dir_all(d.disks().join("sub")).unwrap();
    let alias = d.disks().join("sub/../a.img");
    let (one, two) = (format!("one={}", path.display()), format!("two={}", alias.display()));
    let out = d.ctl(&["protect", "vmx", "--disk", &one, "--disk", &two]);
    let shown = out.text();
    let logs = change_logs(&d.disks());
    let vms = listed(&d);
    assert!(
        out.status.code() == Some(1)
            && shown
                .contains(&format!("ferryctl: InvalidArgument: invalid disk path: {} is listed twice", path.display()))
            && logs.is_empty()
            && vms.is_empty(),
        "one file as two disks: exit {:?}, {shown}, change logs left: {logs:?}, listed: {vms:?}",
        out.status.code()
    );
    // The same file can then be protected normally, under any name.
    d.ctl_json(&["protect", "vmz", "--disk", &format!("uno={}", path.display())]);
    d.wait_state("vmz", "Protected", Duration::from_secs(60));
    d.assert_healthy();
    d.stop();
}

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[test]
fn nbd_requests_past_the_end_get_einval_and_the_session_goes_on() {
    let mut d = Daemon::start();
    let disk = protected_vm(&d);
    let bytes = std::fs::read(&disk).unwrap();

    assert!(NbdClient::connect(&d.socket, "vm1/nope").unwrap().is_err(), "an unknown export is refused");
    assert!(NbdClient::connect(&d.socket, "../vm1/ok").unwrap().is_err(), "an odd export name is refused");

    let mut c = NbdClient::open(&d.socket, "vm1/ok");
    assert_eq!(c.size, SIZE);
    assert_eq!(c.call(CMD_READ, SIZE, 4096, &[]).unwrap().0, EINVAL, "READ at the end");
    assert_eq!(c.call(CMD_READ, SIZE - 4096, 8192, &[]).unwrap().0, EINVAL, "READ across the end");
    assert_eq!(c.call(CMD_READ, u64::MAX - 511, 512, &[]).unwrap().0, EINVAL, "READ where offset + length overflows");
    let (err, data) = c.call(CMD_READ, SIZE - 4096, 4096, &[]).unwrap();
    assert_eq!(err, 0, "an in-range READ after the errors");
    assert!(data == bytes[(SIZE - 4096) as usize..], "the last 4K read back");

    let junk = vec![0xeeu8; 4096];
    // The spec (like qemu-nbd) answers writes past the end with ENOSPC, and
    // a range that overflows u64 with EINVAL.
    assert_eq!(c.call(CMD_WRITE, SIZE, 4096, &junk).unwrap().0, ENOSPC, "WRITE at the end");
    assert_eq!(c.call(CMD_WRITE, SIZE - 2048, 4096, &junk).unwrap().0, ENOSPC, "WRITE across the end");
    assert_eq!(
        c.call(CMD_WRITE, u64::MAX - 511, 4096, &junk).unwrap().0,
        EINVAL,
        "WRITE where offset + length overflows"
    );
    let (err, data) = c.call(CMD_READ, 0, 4096, &[]).unwrap();
    assert_eq!(err, 0, "the session goes on after refused writes");
    assert!(data == bytes[..4096], "first 4K");
    drop(c);

    assert!(std::fs::read(&disk).unwrap() == bytes, "refused writes changed nothing");
    let v = d.ctl_json(&["show", "vm1"]);
    assert_eq!(v["state"], "Protected", "{v}");
    d.assert_healthy();
    d.stop();
}

/// ferryd usually runs as root and serves every protected disk over NBD,
/// so what it may protect is ruled (`--disk-root`): by default no system
/// file (named directly or through a symlink) and nothing in its own data
/// folder; with roots, nothing outside them. Test-failover outputs obey
/// the same rule. Each refusal is PermissionDenied naming the path, and
/// leaves nothing behind.
#[test]
fn disks_and_outputs_outside_the_disk_roots_are_permission_denied() {
    let mut d = Daemon::start();
    let e = d.ctl_err(&["protect", "evil", "--disk", "/etc/shadow"], "PermissionDenied");
    assert!(e.contains("/etc/shadow") && e.contains("system folder /etc"), "{e}");
    let link = d.disks().join("innocent.img");
    std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
    let e = d.ctl_err(&["protect", "evil", "--disk", link.to_str().unwrap()], "PermissionDenied");
    assert!(e.contains("/etc/passwd"), "the resolved path is named: {e}");
    let store = d.data_dir().join("state.redb");
    assert!(store.exists(), "{}", store.display());
    let e = d.ctl_err(&["protect", "evil", "--disk", store.to_str().unwrap()], "PermissionDenied");
    assert!(e.contains("data folder"), "{e}");
    assert!(listed(&d).is_empty(), "{:?}", listed(&d));
    assert!(change_logs(Path::new("/etc")).is_empty(), "no change log beside a refused disk");

    protected_vm(&d);
    let e = d.ctl_err(&["test-failover", "vm1", "--out", "/etc/ferry-restore"], "PermissionDenied");
    assert!(e.contains("/etc/ferry-restore"), "{e}");
    assert!(!Path::new("/etc/ferry-restore").exists(), "a refused output folder is not created");
    d.assert_healthy();
    d.stop();

    // With a root: only under it, disks and outputs alike.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("disks");
    std::fs::create_dir_all(&root).unwrap();
    let mut d = Daemon::builder().in_dir(tmp.path()).args(&["--disk-root", root.to_str().unwrap()]).start();
    let outside = tmp.path().join("elsewhere.img");
    random_disk(&outside, SIZE);
    let e = d.ctl_err(&["protect", "vm2", "--disk", outside.to_str().unwrap()], "PermissionDenied");
    assert!(e.contains(&outside.display().to_string()) && e.contains("outside the disk roots"), "{e}");
    protected_vm(&d);
    let out = tmp.path().join("out");
    let e = d.ctl_err(&["test-failover", "vm1", "--out", out.to_str().unwrap()], "PermissionDenied");
    assert!(e.contains("outside the disk roots"), "{e}");
    assert!(!out.exists());
    d.test_failover("vm1", "latest", &root.join("restored"));
    assert!(root.join("restored/ok.img").is_file(), "a test failover under the root works");
    d.assert_healthy();
    d.stop();
}
