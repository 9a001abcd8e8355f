//! Bad input against a running `ferryd`: every refusal carries the right
//! gRPC code and names the field, leaves no trace (no VM, no change log
//! beside the disk), and the daemon keeps serving afterwards.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{qemu_io, random_disk, Daemon, MIB};

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
    common::require_tool("qemu-io");
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
    assert!(e.contains("nowhere.img"), "{e}");
    assert!(listed(&d).is_empty(), "nothing protected after a refusal");

    // Bad VM names, with a valid disk: the field is named, nothing is created.
    for name in ["../x", "a/b", "..", "."] {
        let e = d.ctl_err(&["protect", name, "--disk", &format!("d={fresh_s}")], "InvalidArgument");
        assert!(e.contains("invalid vm name"), "{name:?}: {e}");
    }
    // Bad disk names.
    for name in ["../x", "a/b", "..", "."] {
        let e = d.ctl_err(&["protect", "vmx", "--disk", &format!("{name}={fresh_s}")], "InvalidArgument");
        assert!(e.contains("invalid disk name"), "{name:?}: {e}");
    }
    // A frequency below 1 s.
    let e = d.ctl_err(&["protect", "vmx", "--disk", &fresh_s, "--frequency", "0s"], "InvalidArgument");
    assert!(e.contains("frequency"), "{e}");
    // A disk listed twice: same argument, or same path under two names.
    let e = d.ctl_err(&["protect", "vmx", "--disk", &fresh_s, "--disk", &fresh_s], "InvalidArgument");
    assert!(e.contains("disk"), "{e}");
    let (one, two) = (format!("one={fresh_s}"), format!("two={fresh_s}"));
    let e = d.ctl_err(&["protect", "vmx", "--disk", &one, "--disk", &two], "InvalidArgument");
    assert!(e.contains("disk path"), "{e}");

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
        assert!(e.contains("nope"), "{args:?}: {e}");
    }
    let e = d.ctl_err(&["show", "../x"], "InvalidArgument");
    assert!(e.contains("vm name"), "{e}");

    // A protected VM; a second protect of the same name, or of its disk, is refused.
    let disk = protected_vm(&d);
    let disk_bytes = std::fs::read(&disk).unwrap();
    let e = d.ctl_err(&["protect", "vm1", "--disk", &fresh_s], "AlreadyExists");
    assert!(e.contains("vm1"), "{e}");
    let e = d.ctl_err(&["protect", "vm9", "--disk", &format!("x={}", disk.display())], "AlreadyExists");
    assert!(e.contains("ok.img"), "{e}");
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
    assert!(e.contains("99"), "{e}");
    assert!(!out.exists(), "a refused failover creates no output folder");
    let e = d.ctl_err(&["test-failover", "vm1", "--recovery-point", "0", "--out", out_s], "");
    assert!(e.contains("recovery-point"), "{e}");

    // An output folder that is the disk's own folder.
    let before = std::fs::metadata(&disk).unwrap().ino();
    let e = d.ctl_err(&["test-failover", "vm1", "--out", d.disks().to_str().unwrap()], "InvalidArgument");
    assert!(e.contains("out") && e.contains("ok.img"), "{e}");
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
    let shown = common::text(&out);
    let replaced = std::fs::metadata(&disk).unwrap().ino() != inode;
    let now = std::fs::read(&disk).unwrap();
    assert!(!replaced && now == want, "test failover replaced the protected disk {} ({shown})", disk.display());
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(shown.contains("ferryctl: InvalidArgument: invalid out"), "{shown}");
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
    let shown = common::text(&out);
    let logs = change_logs(&d.disks());
    let vms = listed(&d);
    assert!(
        out.status.code() == Some(1) && shown.contains("InvalidArgument") && logs.is_empty() && vms.is_empty(),
        "one file as two disks: exit {:?}, {shown}, change logs left: {logs:?}, listed: {vms:?}",
        out.status.code()
    );
    // The same file can then be protected normally, under any name.
    d.ctl_json(&["protect", "vmz", "--disk", &format!("uno={}", path.display())]);
    d.wait_state("vmz", "Protected", Duration::from_secs(60));
    d.assert_healthy();
    d.stop();
}

// ---- a minimal NBD client (fixed newstyle, simple replies) ----

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

struct Nbd {
    s: UnixStream,
    size: u64,
    handle: u64,
}

fn read_exact<const N: usize>(s: &mut UnixStream) -> [u8; N] {
    let mut b = [0u8; N];
    s.read_exact(&mut b).expect("NBD read");
    b
}

impl Nbd {
    /// Handshake with NBD_OPT_GO; `Err(reply type)` if the server refuses the export.
    fn connect(socket: &Path, export: &str) -> Result<Nbd, u32> {
        let mut s = UnixStream::connect(socket).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(&read_exact::<8>(&mut s), b"NBDMAGIC");
        assert_eq!(&read_exact::<8>(&mut s), b"IHAVEOPT");
        let flags = u16::from_be_bytes(read_exact::<2>(&mut s));
        assert!(flags & 1 == 1, "server is fixed newstyle");
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES (if offered).
        s.write_all(&(1u32 | (flags as u32 & 2)).to_be_bytes()).unwrap();
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes()); // no info requests
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).unwrap();
        let mut size = None;
        loop {
            assert_eq!(u64::from_be_bytes(read_exact::<8>(&mut s)), OPT_REPLY_MAGIC);
            assert_eq!(u32::from_be_bytes(read_exact::<4>(&mut s)), OPT_GO);
            let kind = u32::from_be_bytes(read_exact::<4>(&mut s));
            let len = u32::from_be_bytes(read_exact::<4>(&mut s)) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).unwrap();
            if kind & 0x8000_0000 != 0 {
                return Err(kind);
            }
            match kind {
                REP_INFO if payload.len() >= 12 && payload[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("unexpected option reply {other:#x}"),
            }
        }
        Ok(Nbd { s, size: size.expect("NBD_INFO_EXPORT before ACK"), handle: 0 })
    }

    /// Sends one request (with `payload` for a write) and reads its simple
    /// reply: (error, data read).
    fn call(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.handle += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.s.write_all(&req).unwrap();
        assert_eq!(u32::from_be_bytes(read_exact::<4>(&mut self.s)), SIMPLE_REPLY_MAGIC);
        let error = u32::from_be_bytes(read_exact::<4>(&mut self.s));
        assert_eq!(u64::from_be_bytes(read_exact::<8>(&mut self.s)), self.handle, "reply handle");
        let mut data = Vec::new();
        if error == 0 && cmd == CMD_READ {
            data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).unwrap();
        }
        (error, data)
    }
}

#[test]
fn nbd_requests_past_the_end_get_einval_and_the_session_goes_on() {
    let mut d = Daemon::start();
    let disk = protected_vm(&d);
    let bytes = std::fs::read(&disk).unwrap();

    assert!(Nbd::connect(&d.socket, "vm1/nope").is_err(), "an unknown export is refused");
    assert!(Nbd::connect(&d.socket, "../vm1/ok").is_err(), "an odd export name is refused");

    let mut c = Nbd::connect(&d.socket, "vm1/ok").expect("export vm1/ok");
    assert_eq!(c.size, SIZE);
    assert_eq!(c.call(CMD_READ, SIZE, 4096, &[]).0, EINVAL, "READ at the end");
    assert_eq!(c.call(CMD_READ, SIZE - 4096, 8192, &[]).0, EINVAL, "READ across the end");
    assert_eq!(c.call(CMD_READ, u64::MAX - 511, 512, &[]).0, EINVAL, "READ where offset + length overflows");
    let (err, data) = c.call(CMD_READ, SIZE - 4096, 4096, &[]);
    assert_eq!(err, 0, "an in-range READ after the errors");
    assert!(data == bytes[(SIZE - 4096) as usize..], "the last 4K read back");

    let junk = vec![0xeeu8; 4096];
    // The spec (like qemu-nbd) answers writes past the end with ENOSPC, and
    // a range that overflows u64 with EINVAL.
    assert_eq!(c.call(CMD_WRITE, SIZE, 4096, &junk).0, ENOSPC, "WRITE at the end");
    assert_eq!(c.call(CMD_WRITE, SIZE - 2048, 4096, &junk).0, ENOSPC, "WRITE across the end");
    assert_eq!(c.call(CMD_WRITE, u64::MAX - 511, 4096, &junk).0, EINVAL, "WRITE where offset + length overflows");
    let (err, data) = c.call(CMD_READ, 0, 4096, &[]);
    assert_eq!(err, 0, "the session goes on after refused writes");
    assert!(data == bytes[..4096], "first 4K");
    drop(c);

    assert!(std::fs::read(&disk).unwrap() == bytes, "refused writes changed nothing");
    let v = d.ctl_json(&["show", "vm1"]);
    assert_eq!(v["state"], "Protected", "{v}");
    d.assert_healthy();
    d.stop();
}
