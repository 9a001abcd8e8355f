//! The engine's NBD server against real clients: qemu-io, qemu-img,
//! nbdinfo, nbdcopy and fio's nbd engine, over a Unix socket, on exports
//! whose name has a slash in it (`vm1/disk0`, addressed as
//! `nbd+unix:///vm1/disk0?socket=...`). The first tests serve an in-memory
//! device in process; the last ones a protected disk of a real `ferryd`,
//! where block status comes from the holes of the disk file: `nbdinfo
//! --map` and `qemu-img map` see them, `qemu-img convert` and `nbdcopy`
//! copy a mostly sparse 1 GiB disk sparse, and fio verifies random writes
//! with fsyncs. Tools and ferryd are run through the shared harness
//! (`ferry::harness`).
//!
//! These tools are required: a missing one fails its test with the package
//! to install (qemu-utils; libnbd-bin and fio). Every client runs under a
//! timeout and is killed if it overruns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::harness::{
    allocated_bytes, assert_same_files, qemu_io, random_bytes, require_tool, Daemon, Ran, CLIENT_TIMEOUT, MIB,
};
use ferry_engine::nbd::{BlockDevice, MapCatalog, MemDevice, NbdServer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const EXPORT: &str = "vm1/disk0";
const SIZE: u64 = 64 << 20;

/// A server on a Unix socket in a temporary folder, exporting one MemDevice.
struct Served {
    dir: tempfile::TempDir,
    socket: PathBuf,
    device: Arc<MemDevice>,
    shutdown: CancellationToken,
    task: JoinHandle<ferry_engine::Result<()>>,
}

impl Served {
    async fn start(device: MemDevice) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("nbd.sock");
        let device = Arc::new(device);
        let catalog = MapCatalog::new()
            .with(EXPORT, device.clone() as Arc<dyn BlockDevice>)
            .with("vm2/disk0", Arc::new(MemDevice::new(1 << 20)) as Arc<dyn BlockDevice>);
        let shutdown = CancellationToken::new();
        let server = NbdServer::new(Arc::new(catalog), shutdown.clone());
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind unix socket");
        let task = tokio::spawn(async move { server.serve_unix(listener).await });
        Served { dir, socket, device, shutdown, task }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Shuts the server down and checks it ends cleanly.
    async fn stop(self) {
        self.shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        ended.expect("server stops after shutdown").expect("server task").expect("server result");
    }
}

/// Runs a client to completion under the harness's timeout, off the async
/// workers (they serve the export); it must exit 0.
async fn run(tool: &Path, args: &[&str]) -> Ran {
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args).stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || ferry::harness::process::run_ok(&mut cmd, CLIENT_TIMEOUT)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_reads_zeroes_discards_and_flushes() {
    let qemu_io = require_tool("qemu-io");
    let served = Served::start(MemDevice::new(SIZE)).await;
    let uri = served.uri();
    let out = run(
        &qemu_io,
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -f -P 0x11 1M 64k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "aio_write -P 0xc1 8M 256k",
            "-c",
            "aio_write -P 0xc2 9M 256k",
            "-c",
            "aio_write -P 0xc3 10M 256k",
            "-c",
            "aio_flush",
            "-c",
            "flush",
            "-c",
            "read -P 0xc2 9M 256k",
            "-c",
            "read -P 0x11 1M 64k",
        ],
    )
    .await;
    let shown = out.text();
    assert!(!shown.contains("Pattern verification failed"), "{shown}");
    assert!(!shown.to_lowercase().contains("error"), "{shown}");

    let disk = served.device.contents();
    assert!(disk[..1 << 20].iter().all(|&b| b == 0xab));
    assert!(disk[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 0x11));
    for (i, pattern) in [0xc1u8, 0xc2, 0xc3].into_iter().enumerate() {
        let start = (8 + i) << 20;
        assert!(disk[start..start + (256 << 10)].iter().all(|&b| b == pattern));
    }
    assert!(served.device.flush_count() >= 1, "flush reached the device");
    assert!(served.device.fua_write_count() >= 1, "write -f carried FUA to the device");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_processes_share_the_export_and_survive_a_failed_read() {
    let qemu_io = require_tool("qemu-io");
    let served = Served::start(MemDevice::new(SIZE)).await;
    let uri = served.uri();
    // Two processes at once on the same export, then one past the end.
    let first = ["-f", "raw", &uri, "-c", "write -P 0x01 0 4M"];
    let second = ["-f", "raw", &uri, "-c", "write -P 0x02 4M 4M"];
    tokio::join!(run(&qemu_io, &first), run(&qemu_io, &second));
    let disk = served.device.contents();
    assert!(disk[..4 << 20].iter().all(|&b| b == 1) && disk[4 << 20..8 << 20].iter().all(|&b| b == 2));

    // qemu's block layer refuses this read itself (EIO) before it reaches
    // us; the unit tests cover the server's own range errors. What matters
    // here is that the session goes on.
    let past_end = format!("read 0 {}", SIZE + 4096);
    let mut cmd = std::process::Command::new(&qemu_io);
    cmd.args(["-f", "raw", &uri, "-c", &past_end, "-c", "read -P 0x01 0 4k"]);
    let out = tokio::task::spawn_blocking(move || ferry::harness::run(&mut cmd, CLIENT_TIMEOUT)).await.unwrap();
    let shown = out.text();
    assert!(shown.contains("read failed"), "qemu-io refuses or reports the read past the end: {shown}");
    assert!(shown.contains("read 4096/4096 bytes"), "the following read still works: {shown}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_out_of_and_into_the_export() {
    let qemu_img = require_tool("qemu-img");
    let original = random_bytes(SIZE as usize);
    let served = Served::start(MemDevice::from_bytes(original.clone())).await;
    let uri = served.uri();

    let out_file = served.file("out.raw");
    let out_path = out_file.to_str().expect("utf-8 path");
    run(&qemu_img, &["convert", "-f", "raw", "-O", "raw", &uri, out_path]).await;
    assert!(std::fs::read(&out_file).expect("converted image") == original, "bytes out equal the disk");

    // Into the export, with out-of-order writes and 8 coroutines: pipelined.
    let mut source = random_bytes(SIZE as usize);
    source[5 << 20..6 << 20].fill(0); // a zero run, which qemu-img may send as WRITE_ZEROES
    let src_file = served.file("src.raw");
    std::fs::write(&src_file, &source).expect("write source");
    let src_path = src_file.to_str().expect("utf-8 path");
    run(&qemu_img, &["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw", src_path, &uri]).await;
    assert!(served.device.contents() == source, "bytes in equal the source image");

    let info = run(&qemu_img, &["info", "--output=json", &uri]).await;
    assert!(info.text().contains(&format!("\"virtual-size\": {SIZE}")), "{}", info.text());
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_exports_and_describes_one() {
    let nbdinfo = require_tool("nbdinfo");
    let served = Served::start(MemDevice::new(SIZE)).await;
    let info = run(&nbdinfo, &["--json", &served.uri()]).await;
    let json: serde_json::Value = serde_json::from_str(&info.stdout).expect("nbdinfo --json");
    let export = &json["exports"][0];
    assert_eq!(export["export-name"], EXPORT, "{json}");
    assert_eq!(export["export-size"], SIZE, "{json}");
    assert_eq!(export["can_multi_conn"], true, "{json}");
    assert_eq!(export["can_flush"], true, "{json}");
    assert_eq!(export["can_fua"], true, "{json}");
    assert_eq!(export["can_trim"], true, "{json}");
    assert_eq!(export["can_zero"], true, "{json}");
    assert_eq!(export["is_read_only"], false, "{json}");

    let list_uri = format!("nbd+unix://?socket={}", served.socket.display());
    let list = run(&nbdinfo, &["--list", "--json", &list_uri]).await;
    let json: serde_json::Value = serde_json::from_str(&list.stdout).expect("nbdinfo --list --json");
    let names: Vec<&str> =
        json["exports"].as_array().expect("exports").iter().filter_map(|e| e["export-name"].as_str()).collect();
    assert_eq!(names, vec!["vm1/disk0", "vm2/disk0"], "{json}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_with_several_connections_round_trips() {
    let nbdcopy = require_tool("nbdcopy");
    let served = Served::start(MemDevice::new(SIZE)).await;
    let uri = served.uri();
    let mut source = random_bytes(SIZE as usize);
    source[10 << 20..12 << 20].fill(0);
    let src_file = served.file("src.raw");
    std::fs::write(&src_file, &source).expect("write source");
    let src_path = src_file.to_str().expect("utf-8 path");

    // CAN_MULTI_CONN lets nbdcopy open several connections, each pipelined.
    run(&nbdcopy, &["--connections=4", "--requests=16", "--flush", src_path, &uri]).await;
    assert!(served.device.contents() == source, "bytes in equal the source");
    assert!(served.device.flush_count() >= 1, "--flush reached the device");

    let out_file = served.file("out.raw");
    let out_path = out_file.to_str().expect("utf-8 path");
    run(&nbdcopy, &["--connections=4", "--requests=16", &uri, out_path]).await;
    assert!(std::fs::read(&out_file).expect("copied image") == source, "bytes out equal the disk");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_writes_verify() {
    let fio = require_tool("fio");
    let served = Served::start(MemDevice::new(SIZE)).await;
    let uri_arg = format!("--uri={}", served.uri());
    let out = run(
        &fio,
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--numjobs=2",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--fsync=64",
            "--group_reporting",
        ],
    )
    .await;
    let shown = out.text();
    eprintln!("{shown}");
    assert!(shown.contains("err= 0"), "{shown}");
    assert!(!shown.contains("verify: bad"), "{shown}");
    assert!(served.device.flush_count() >= 1, "fio's fsync reached the device as FLUSH");
    served.stop().await;
}

/// A sparse image of `len` bytes with random data at `data` (offset, length).
fn sparse_image(path: &Path, len: u64, data: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(len).expect("set the image size");
    for &(offset, n) in data {
        f.write_all_at(&random_bytes(n as usize), offset).expect("write image data");
    }
    f.sync_all().expect("sync image");
}

/// Protects `vm1` with `disks` (name, image) and waits until it is Protected.
fn protect(d: &Daemon, disks: &[(&str, &Path)]) {
    let mut args = vec!["protect".to_string(), "vm1".to_string(), "--frequency".to_string(), "30s".to_string()];
    for (name, path) in disks {
        args.extend(["--disk".to_string(), format!("{name}={}", path.display())]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.ctl_json(&args);
    d.wait_state("vm1", "Protected", Duration::from_secs(300));
}

/// Runs a tool to completion (exit 0 asserted) under the harness's timeout.
fn run_tool(tool: &Path, args: &[&str]) -> Ran {
    let mut cmd = std::process::Command::new(tool);
    cmd.args(args);
    ferry::harness::process::run_ok(&mut cmd, CLIENT_TIMEOUT)
}

/// Merges `(offset, length, is_data)` runs into the ranges that are data.
fn data_ranges(runs: impl IntoIterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (offset, len, data) in runs {
        match out.last_mut() {
            Some(last) if data && last.0 + last.1 == offset => last.1 += len,
            _ if data => out.push((offset, len)),
            _ => {}
        }
    }
    out
}

#[test]
fn nbdinfo_map_shows_the_data_holes_and_zeroed_ranges_of_a_protected_disk() {
    let nbdinfo = require_tool("nbdinfo");
    require_tool("qemu-io");
    let d = Daemon::start();
    let path = d.disks().join("map.img");
    sparse_image(&path, 64 * MIB, &[(0, MIB), (8 * MIB, 4 * MIB)]);
    protect(&d, &[("map", &path)]);
    let uri = d.uri("vm1", "map");

    // Zero [9, 10) MiB letting the server punch a hole (-u: may unmap), and
    // [10, 11) MiB with NO_HOLE (what qemu sends for write -z without -u).
    let before = allocated_bytes(&path);
    qemu_io(&uri, &["write -z -u 9M 1M", "write -z 10M 1M", "flush", "read -P 0 9M 2M"]);
    let freed = before.saturating_sub(allocated_bytes(&path));
    assert!(
        (MIB - 64 * 1024..2 * MIB - 64 * 1024).contains(&freed),
        "the punched MiB was freed and the NO_HOLE MiB kept: {freed} bytes freed"
    );

    let out = run_tool(&nbdinfo, &["--map", "--json", &uri]);
    let map: serde_json::Value = serde_json::from_str(&out.stdout).expect("nbdinfo --map --json");
    let entries = map.as_array().unwrap_or_else(|| panic!("a JSON array: {map}"));
    let runs: Vec<(u64, u64, u64)> = entries
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect();
    let mut at = 0;
    for &(offset, len, _) in &runs {
        assert_eq!(offset, at, "the map is contiguous: {map}");
        at += len;
    }
    assert_eq!(at, 64 * MIB, "the map covers the disk: {map}");
    let flags_at = |x: u64| runs.iter().find(|&&(o, l, _)| o <= x && x < o + l).map(|r| r.2).expect("mapped");
    for x in [0, MIB / 2, 8 * MIB, 8 * MIB + MIB / 2, 11 * MIB, 12 * MIB - 1] {
        assert_eq!(flags_at(x), 0, "data at {x}: {map}");
    }
    // HOLE | ZERO: never written, and punched by WRITE_ZEROES.
    for x in [MIB, 4 * MIB, 8 * MIB - 1, 9 * MIB, 10 * MIB - 1, 12 * MIB, 64 * MIB - 1] {
        assert_eq!(flags_at(x), 3, "a hole that reads as zeroes at {x}: {map}");
    }
    // The NO_HOLE range is allocated; file systems report such a range as a
    // hole or as data (reading it gives zeroes either way, checked above).
    assert!([0, 3].contains(&flags_at(10 * MIB)), "{map}");
    assert_eq!(d.state("vm1"), "Protected");
}

#[test]
fn a_mostly_sparse_1_gib_export_maps_and_copies_sparse() {
    let qemu_img = require_tool("qemu-img");
    let nbdcopy = require_tool("nbdcopy");
    const GIB: u64 = 1 << 30;
    let d = Daemon::start();
    let path = d.disks().join("big.img");
    let data = [(0, MIB), (512 * MIB, 2 * MIB), (GIB - MIB, MIB)];
    sparse_image(&path, GIB, &data);
    protect(&d, &[("big", &path)]);
    let uri = d.uri("vm1", "big");

    // qemu-img map: data exactly where the file has data.
    let out = run_tool(&qemu_img, &["map", "--output=json", "-f", "raw", &uri]);
    let map: serde_json::Value = serde_json::from_str(&out.stdout).expect("qemu-img map --output=json");
    let runs = map.as_array().unwrap_or_else(|| panic!("a JSON array: {map}")).iter().map(|e| {
        let data = e["data"].as_bool().unwrap();
        assert_eq!(e["zero"].as_bool().unwrap(), !data, "holes read as zeroes, data does not: {e}");
        (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), data)
    });
    assert_eq!(data_ranges(runs), data, "{map}");

    // qemu-img convert and nbdcopy: byte-identical copies that stay sparse.
    let converted = d.dir().join("convert.raw");
    run_tool(&qemu_img, &["convert", "-f", "raw", "-O", "raw", &uri, converted.to_str().unwrap()]);
    let copied = d.dir().join("nbdcopy.raw");
    run_tool(&nbdcopy, &[&uri, copied.to_str().unwrap()]);
    for out in [&converted, &copied] {
        assert_same_files("copy of the export", out, &path);
        let allocated = allocated_bytes(out);
        assert!(allocated <= 6 * MIB, "{} is sparse: {allocated} bytes allocated for 4 MiB of data", out.display());
    }
    assert_eq!(d.state("vm1"), "Protected");
}

#[test]
fn fio_verifies_random_writes_with_fsyncs_through_ferryd() {
    let fio = require_tool("fio");
    let d = Daemon::start();
    let path = d.disks().join("fio.img");
    // 32 MiB of writes: a quarter of the disk, so a cycle that comes late
    // does not meet the 50% rule.
    sparse_image(&path, 128 * MIB, &[]);
    protect(&d, &[("fio", &path)]);
    let uri_arg = format!("--uri={}", d.uri("vm1", "fio"));
    let out = run_tool(
        &fio,
        &[
            "--name=ferry-verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--numjobs=2",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--fsync=32",
            "--group_reporting",
        ],
    );
    let shown = out.text();
    assert!(shown.contains("err= 0"), "{shown}");
    assert!(!shown.contains("verify: bad"), "{shown}");
    // The writes went through the write path: a recovery point carries them.
    let seq = d.replicate_now("vm1");
    assert!(seq >= 2, "a point after the base: {seq}");
    assert_eq!(d.state("vm1"), "Protected");
}
