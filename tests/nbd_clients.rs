//! The engine's NBD server, on an in-memory device, against real clients:
//! qemu-io, qemu-img, nbdinfo, nbdcopy and fio's nbd engine, over a Unix
//! socket, on an export whose name has a slash in it (`vm1/disk0`, addressed
//! as `nbd+unix:///vm1/disk0?socket=...`). Tools are found and run through
//! the shared harness (`ferry::harness`).
//!
//! These tools are required: a missing one fails its test with the package
//! to install (qemu-utils; libnbd-bin and fio). Every client runs under a
//! timeout and is killed if it overruns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::harness::{random_bytes, require_tool, Ran, CLIENT_TIMEOUT};
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
