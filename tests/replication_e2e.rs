//! End to end: `ferryd` protects VMs, `ferryctl` drives it, qemu-io writes
//! through the NBD export, and test failover rebuilds byte-identical disks.

use std::time::{Duration, Instant};

use ferry::harness::{assert_same_bytes, qemu_io, random_disk, read_export, read_file, require_tool, Daemon, MIB};

/// A write a guest makes through NBD, applied to the model too.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// `write -P pattern offset len`
    Pattern(u8, u64, u64),
    /// `write -z offset len` (WRITE_ZEROES)
    Zero(u64, u64),
    /// `discard offset len` (TRIM): contents afterwards are the device's choice.
    Discard(u64, u64),
}

impl Op {
    fn command(self) -> String {
        match self {
            Op::Pattern(p, off, len) => format!("write -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) => format!("write -z {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    fn apply(self, model: &mut [u8]) {
        match self {
            Op::Pattern(p, off, len) => model[off as usize..(off + len) as usize].fill(p),
            Op::Zero(off, len) => model[off as usize..(off + len) as usize].fill(0),
            Op::Discard(..) => {}
        }
    }

    /// The read-back check qemu-io runs after the write (none for a discard).
    fn verify(self) -> Option<String> {
        match self {
            Op::Pattern(p, off, len) => Some(format!("read -P {p:#04x} {off} {len}")),
            Op::Zero(off, len) => Some(format!("read -P 0 {off} {len}")),
            Op::Discard(..) => None,
        }
    }
}

/// Writes `ops` through the export with qemu-io, then flushes and reads each back.
fn write_ops(d: &Daemon, vm: &str, disk: &str, ops: &[Op], model: &mut [u8]) {
    let mut cmds: Vec<String> = ops.iter().map(|o| o.command()).collect();
    cmds.push("flush".into());
    for op in ops {
        op.apply(model);
    }
    // Read back only what no later op overwrote.
    for (i, op) in ops.iter().enumerate() {
        if ops[i + 1..].iter().all(|later| !overlaps(*op, *later)) {
            cmds.extend(op.verify());
        }
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&d.uri(vm, disk), &cmds);
}

fn range(op: Op) -> (u64, u64) {
    match op {
        Op::Pattern(_, o, l) | Op::Zero(o, l) | Op::Discard(o, l) => (o, o + l),
    }
}

fn overlaps(a: Op, b: Op) -> bool {
    let ((a0, a1), (b0, b1)) = (range(a), range(b));
    a0 < b1 && b0 < a1
}

/// The model takes whatever the device left in discarded ranges (TRIM leaves
/// contents unspecified); everything else it predicts exactly.
fn settle_discards(ops: &[Op], model: &mut [u8], source: &[u8]) {
    for (i, op) in ops.iter().enumerate() {
        if let Op::Discard(off, len) = *op {
            assert!(ops[i + 1..].iter().all(|later| !overlaps(*op, *later)), "keep discards unwritten later");
            let r = off as usize..(off + len) as usize;
            model[r.clone()].copy_from_slice(&source[r]);
        }
    }
}

#[test]
fn protect_write_through_nbd_and_test_failover() {
    let started = Instant::now();
    require_tool("qemu-io");
    require_tool("qemu-img");
    const SIZE: u64 = 64 * MIB;
    let mut d = Daemon::start();
    let (pa, pb) = (d.disks().join("a.img"), d.disks().join("b.img"));
    let mut model_a = random_disk(&pa, SIZE);
    let mut model_b = random_disk(&pb, SIZE);

    let disk_a = format!("a={}", pa.display());
    let disk_b = format!("b={}", pb.display());
    let v = d.ctl_json(&["protect", "vm1", "--disk", &disk_a, "--disk", &disk_b, "--frequency", "1s"]);
    assert_eq!(v["name"], "vm1", "{v}");
    let exports: Vec<&str> = v["disks"].as_array().unwrap().iter().map(|x| x["export"].as_str().unwrap()).collect();
    assert_eq!(exports, ["vm1/a", "vm1/b"], "{v}");
    for disk in v["disks"].as_array().unwrap() {
        assert_eq!(disk["size"], SIZE, "{v}");
    }

    // Write at once: with 128 MiB to copy these land while the VM is still
    // being enabled or initially replicated (checked below only if observed).
    let before = d.state("vm1");
    let early_a = [Op::Pattern(0x11, 0, MIB), Op::Pattern(0x12, 40 * MIB + 512, 300_000), Op::Zero(8 * MIB, 2 * MIB)];
    let early_b = [Op::Pattern(0x21, 63 * MIB, MIB), Op::Pattern(0x22, 5 * MIB + 4096, 65536)];
    write_ops(&d, "vm1", "a", &early_a, &mut model_a);
    write_ops(&d, "vm1", "b", &early_b, &mut model_b);
    let after = d.state("vm1");
    eprintln!("state before the first writes: {before}, after: {after}");
    if before != "Protected" {
        assert!(
            ["EnablingProtection", "InitialReplication", "FinalizingProtection"].contains(&before.as_str()),
            "unexpected state right after protect: {before}"
        );
    }

    let v = d.wait_state("vm1", "Protected", Duration::from_secs(90));
    let transitions: Vec<(String, String)> = v["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["from"].as_str().unwrap().to_string(), t["to"].as_str().unwrap().to_string()))
        .collect();
    let tos: Vec<&str> = transitions.iter().map(|(_, to)| to.as_str()).collect();
    for s in ["EnablingProtection", "InitialReplication", "FinalizingProtection", "Protected"] {
        assert!(tos.contains(&s), "no transition to {s}: {transitions:?}");
    }
    let pos = |s: &str| tos.iter().position(|t| *t == s).unwrap();
    assert!(pos("InitialReplication") < pos("FinalizingProtection") && pos("FinalizingProtection") < pos("Protected"));

    // Delta writes: patterns, zeroes, a discard, unaligned ranges, the last 4K.
    let late_a = [
        Op::Pattern(0x31, 0, 4096),
        Op::Pattern(0x32, 12 * MIB + 1, 777),
        Op::Zero(20 * MIB, 3 * MIB),
        Op::Discard(30 * MIB, MIB),
        Op::Pattern(0x33, 40 * MIB, 100_000), // overlaps an early write
        Op::Pattern(0x34, SIZE - 4096, 4096),
    ];
    let late_b = [
        Op::Pattern(0x41, 1 << 20, 256 << 10),
        Op::Discard(10 * MIB, 64 << 10),
        Op::Zero(33 * MIB + 512, 4096),
        Op::Pattern(0x42, SIZE - 4096, 4096),
        Op::Pattern(0x43, SIZE - 8192, 1024),
    ];
    write_ops(&d, "vm1", "a", &late_a, &mut model_a);
    write_ops(&d, "vm1", "b", &late_b, &mut model_b);

    let seq = d.replicate_now("vm1");
    let src_a = read_file(&pa);
    let src_b = read_file(&pb);
    settle_discards(&late_a, &mut model_a, &src_a);
    settle_discards(&late_b, &mut model_b, &src_b);
    assert_same_bytes("source a vs model", &src_a, &model_a);
    assert_same_bytes("source b vs model", &src_b, &model_b);

    // The live exports read back as the source files.
    let live_a = read_export(&d.uri("vm1", "a"), &d.dir().join("live-a.raw"));
    let live_b = read_export(&d.uri("vm1", "b"), &d.dir().join("live-b.raw"));
    assert_same_bytes("NBD read of a", &live_a, &model_a);
    assert_same_bytes("NBD read of b", &live_b, &model_b);
    drop((live_a, live_b));

    // Test failover at latest: byte-identical to the source.
    let out = d.dir().join("failover");
    let job = d.test_failover("vm1", "latest", &out);
    assert!(job["detail"].as_str().unwrap_or_default().starts_with(&format!("recovery point {seq} ")), "{job}");
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["a.img", "b.img"], "only the restored images in the output folder");
    assert_same_bytes("restored a", &read_file(&out.join("a.img")), &model_a);
    assert_same_bytes("restored b", &read_file(&out.join("b.img")), &model_b);
    assert_same_bytes("restored a vs source", &read_file(&out.join("a.img")), &read_file(&pa));
    assert_same_bytes("restored b vs source", &read_file(&out.join("b.img")), &read_file(&pb));

    // Recovery points: a base and at least the one we cut, seq increasing.
    let pts = d.ctl_json(&["recovery-points", "vm1"]);
    let pts = pts.as_array().expect("array");
    assert!(pts.len() >= 2, "{pts:?}");
    assert_eq!(pts[0]["seq"], 1, "{pts:?}");
    assert_eq!(pts[0]["kind"], "base", "{pts:?}");
    for w in pts.windows(2) {
        assert!(w[0]["seq"].as_u64() < w[1]["seq"].as_u64(), "seq increases: {pts:?}");
        assert!(w[0]["time_ms"].as_u64() <= w[1]["time_ms"].as_u64(), "time increases: {pts:?}");
    }
    assert_eq!(pts.last().unwrap()["seq"], seq, "{pts:?}");

    // Jobs: the initial replication copied both disks, fully.
    let jobs = d.ctl_json(&["jobs"]);
    let initial: Vec<_> =
        jobs.as_array().unwrap().iter().filter(|j| j["kind"] == "InitialReplication" && j["vm"] == "vm1").collect();
    assert_eq!(initial.len(), 1, "{jobs:#}");
    let j = initial[0];
    assert_eq!(j["status"], "Succeeded", "{j}");
    assert_eq!(j["bytes_total"], 2 * SIZE, "{j}");
    assert_eq!(j["bytes_done"], 2 * SIZE, "{j}");
    assert!(j["ended_ms"].as_u64().unwrap() >= j["started_ms"].as_u64().unwrap(), "{j}");
    let per_vm = d.ctl_json(&["jobs", "--vm", "vm1"]);
    assert!(per_vm.as_array().unwrap().iter().any(|j| j["kind"] == "TestFailover"), "{per_vm:#}");

    // Human output.
    let list = d.ctl_ok(&["list"]);
    assert!(list.lines().any(|l| l.starts_with("vm1 ") && l.contains("Protected")), "{list}");
    let show = d.ctl_ok(&["show", "vm1"]);
    assert!(show.starts_with("VM vm1: Protected"), "{show}");
    assert!(show.contains("export vm1/a") && show.contains("export vm1/b"), "{show}");

    d.assert_healthy();
    d.stop();
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn restart_resumes_protection_with_nothing_lost() {
    let started = Instant::now();
    require_tool("qemu-io");
    const SIZE: u64 = 16 * MIB;
    let mut d = Daemon::start();
    let path = d.disks().join("os.img");
    let mut model = random_disk(&path, SIZE);
    // No NAME=: the disk is named after the file stem.
    let v = d.ctl_json(&["protect", "vm1", "--disk", path.to_str().unwrap(), "--frequency", "1h"]);
    assert_eq!(v["disks"][0]["name"], "os", "{v}");
    assert_eq!(v["disks"][0]["export"], "vm1/os", "{v}");
    d.wait_state("vm1", "Protected", Duration::from_secs(60));

    // A point before the restart, to check it is still listed and restorable after.
    write_ops(&d, "vm1", "os", &[Op::Pattern(0x50, 5 * MIB, 8192)], &mut model);
    let p1 = d.replicate_now("vm1");
    let copy_at_p1 = read_file(&path);
    assert_same_bytes("source at p1", &copy_at_p1, &model);

    let before_restart = [Op::Pattern(0x51, 0, MIB), Op::Zero(3 * MIB, 4096), Op::Pattern(0x52, SIZE - 4096, 4096)];
    write_ops(&d, "vm1", "os", &before_restart, &mut model);
    let points_before = d.point_seqs("vm1");
    assert_eq!(points_before, [1, p1], "{points_before:?}");

    // Graceful stop without cutting a point: the writes sit in the sealed log.
    d.restart();
    let v = d.ctl_json(&["show", "vm1"]);
    assert_eq!(v["state"], "Protected", "after restart: {v:#}\n{}", d.stderr());
    assert_eq!(d.point_seqs("vm1"), points_before, "recovery points survive the restart");
    // The export is back, with the pre-restart writes.
    qemu_io(&d.uri("vm1", "os"), &["read -P 0x51 0 1M", &format!("read -P 0x52 {} 4096", SIZE - 4096)]);

    let after_restart = [Op::Pattern(0x53, 2 * MIB, 64 << 10), Op::Pattern(0x54, 512, 512)];
    write_ops(&d, "vm1", "os", &after_restart, &mut model);
    let p2 = d.replicate_now("vm1");
    assert!(p2 > p1, "{p2} > {p1}");
    assert_same_bytes("source after restart", &read_file(&path), &model);

    let out = d.dir().join("failover");
    d.test_failover("vm1", "latest", &out);
    assert_same_bytes("restored after restart (both sides of it)", &read_file(&out.join("os.img")), &model);
    let out = d.dir().join("failover-p1");
    d.test_failover("vm1", &p1.to_string(), &out);
    assert_same_bytes("point from before the restart", &read_file(&out.join("os.img")), &copy_at_p1);

    d.assert_healthy();
    d.stop();
    eprintln!("took {:?}", started.elapsed());
}

#[test]
fn test_failover_at_an_older_point() {
    let started = Instant::now();
    require_tool("qemu-io");
    const SIZE: u64 = 8 * MIB;
    let mut d = Daemon::start();
    let path = d.disks().join("data.img");
    let mut model = random_disk(&path, SIZE);
    let disk = format!("data={}", path.display());
    d.ctl_json(&["protect", "vm2", "--disk", &disk, "--frequency", "1h"]);
    d.wait_state("vm2", "Protected", Duration::from_secs(60));
    let copy_at_1 = read_file(&path);
    assert_same_bytes("source at point 1", &copy_at_1, &model);

    write_ops(&d, "vm2", "data", &[Op::Pattern(0xa2, 0, 2 * MIB), Op::Zero(5 * MIB, MIB)], &mut model);
    let p2 = d.replicate_now("vm2");
    assert_eq!(p2, 2, "the first point after the base");
    let copy_at_2 = read_file(&path);
    assert_same_bytes("source at point 2", &copy_at_2, &model);

    write_ops(&d, "vm2", "data", &[Op::Pattern(0xa3, MIB, 2 * MIB), Op::Pattern(0xa4, SIZE - 4096, 4096)], &mut model);
    let p3 = d.replicate_now("vm2");
    assert_eq!(p3, 3);
    let copy_at_3 = read_file(&path);
    assert_ne!(copy_at_2, copy_at_3);
    // And writes after point 3 that no point includes.
    write_ops(&d, "vm2", "data", &[Op::Pattern(0xa5, 0, MIB)], &mut model);

    assert_eq!(d.point_seqs("vm2"), [1, 2, 3]);
    for (seq, want) in [("2", &copy_at_2), ("1", &copy_at_1), ("3", &copy_at_3), ("latest", &copy_at_3)] {
        let out = d.dir().join(format!("at-{seq}"));
        let job = d.test_failover("vm2", seq, &out);
        assert_same_bytes(&format!("point {seq} ({job})"), &read_file(&out.join("data.img")), want);
    }

    d.assert_healthy();
    d.stop();
    eprintln!("took {:?}", started.elapsed());
}
