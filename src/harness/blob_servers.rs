//! Blob store emulators for the target tests, each started on 127.0.0.1
//! with a free port and a temporary folder, and stopped when dropped:
//! Azurite (Azure Blob) and moto (S3). `scripts/install-blob-servers.sh`
//! installs them (the test command runs it); a missing one fails the test
//! with that instruction, never skips it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::Proc;

/// The emulator's well-known account (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    Azurite,
    Moto,
}

/// A running emulator.
pub struct BlobServer {
    pub kind: BlobKind,
    pub port: u16,
    proc: Proc,
    _dir: tempfile::TempDir,
}

fn tool(rel: &str) -> PathBuf {
    super::tools::installed_tool(rel, "scripts/install-blob-servers.sh")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// Whether an HTTP server answers on `port` (any status).
fn answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 8];
    s.read_exact(&mut head).is_ok() && &head[..5] == b"HTTP/"
}

impl BlobServer {
    pub fn start(kind: BlobKind) -> BlobServer {
        let mut last = String::new();
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("temp folder");
            let port = free_port();
            let mut cmd = match kind {
                BlobKind::Azurite => {
                    let mut c = Command::new(tool("azurite/node_modules/.bin/azurite-blob"));
                    c.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
                        .arg(dir.path())
                        // No telemetry: it would try to reach a public host.
                        .args(["--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry"]);
                    c
                }
                BlobKind::Moto => {
                    let mut c = Command::new(tool("moto/bin/moto_server"));
                    c.args(["-H", "127.0.0.1", "-p", &port.to_string()]).current_dir(dir.path());
                    c
                }
            };
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            let mut proc = Proc::spawn(&format!("{kind:?}"), &mut cmd);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if !proc.running() {
                    last = format!("{kind:?} exited at start (port {port})");
                    break;
                }
                if answers(port) {
                    return BlobServer { kind, port, proc, _dir: dir };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if proc.running() {
                last = format!("{kind:?} did not answer on port {port} within 60 s");
            }
        }
        panic!("cannot start {kind:?}: {last}");
    }

    /// The target URL of `container` (an Azure container or an S3 bucket), with `prefix` if given.
    pub fn url(&self, container: &str, prefix: Option<&str>) -> String {
        let scheme = match self.kind {
            BlobKind::Azurite => "az",
            BlobKind::Moto => "s3",
        };
        match prefix {
            Some(p) => format!("{scheme}://{container}/{p}"),
            None => format!("{scheme}://{container}"),
        }
    }

    /// object_store configuration keys for this server (`--target-option`).
    pub fn options(&self) -> Vec<(String, String)> {
        let port = self.port;
        let pairs: Vec<(&str, String)> = match self.kind {
            BlobKind::Azurite => vec![
                ("azure_storage_account_name", AZURITE_ACCOUNT.into()),
                ("azure_storage_account_key", AZURITE_KEY.into()),
                ("azure_storage_endpoint", format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}")),
                ("azure_allow_http", "true".into()),
            ],
            BlobKind::Moto => vec![
                ("aws_endpoint", format!("http://127.0.0.1:{port}")),
                ("aws_allow_http", "true".into()),
                ("aws_access_key_id", "testing".into()),
                ("aws_secret_access_key", "testing".into()),
                ("aws_region", "us-east-1".into()),
                ("aws_virtual_hosted_style_request", "false".into()),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// The same settings as the standard environment variables a daemon reads.
    pub fn env(&self) -> Vec<(String, String)> {
        self.options().into_iter().map(|(k, v)| (k.to_ascii_uppercase(), v)).collect()
    }

    /// Stops the server (a later request fails to connect); dropping does too.
    pub fn stop(&mut self) {
        self.proc.stop(Duration::from_secs(10));
    }
}
