//! `ferryctl`: the command-line client of `ferryd`'s gRPC API.
//!
//! Human-readable output by default, `--json` on every command. Exit codes
//! ([`exit`]): 0 done, 1 refused or failed (message on stderr), 2 usage,
//! 3 ferryd unreachable or unavailable, 4 not found, 5 not allowed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use ferry_proto::v1 as pb;
use ferry_proto::v1::ferry_client::FerryClient;
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::units::{format_bytes, parse_duration};

/// `println!` that ends ferryctl quietly when stdout is a closed pipe
/// (`ferryctl list | head -1`) instead of panicking; SIGPIPE stays ignored,
/// so a dropped connection to ferryd is an error, not a silent death.
macro_rules! out {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))
    };
}

fn print_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit::OK as i32);
        }
        eprintln!("ferryctl: writing to stdout: {e}");
        std::process::exit(exit::FAILED as i32);
    }
}

#[derive(Debug, Parser)]
#[command(name = "ferryctl", version, about = "Control a Ferry daemon (ferryd)", after_help = EXIT_CODES)]
pub struct Args {
    /// ferryd's gRPC endpoint.
    #[arg(long, env = "FERRY_ENDPOINT", default_value = crate::DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// A file holding ferryd's bearer token (ferryd --token-file); private to its owner.
    #[arg(long, env = "FERRY_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed ferryd's TLS certificate; needs an https:// endpoint.
    #[arg(long, env = "FERRY_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM), for a ferryd that requires them (ferryd --tls-client-ca).
    #[arg(long, env = "FERRY_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, env = "FERRY_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Protect a VM: snapshot, initial replication, then a recovery point every FREQUENCY.
    Protect {
        vm: String,
        /// A disk as [NAME=]PATH (repeat for each disk); NAME defaults to the file name without extension.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// Replication frequency: 30s, 5m, 15m or any duration >= 1s.
        #[arg(long, default_value = "5m")]
        frequency: String,
        /// Upload workers for this VM (1..32).
        #[arg(long, default_value_t = 4)]
        workers: u32,
    },
    /// Stop protecting a VM (its change logs are deleted; the replica is kept).
    Unprotect { vm: String },
    /// List protected VMs.
    List,
    /// Show one VM: state, reason, disks, space used, transitions.
    Show { vm: String },
    /// Pause replication of a VM (writes stay tracked).
    Pause { vm: String },
    /// Resume a paused or Critical VM.
    Resume { vm: String },
    /// Resynchronize a VM now by fixed-block checksums (only differing blocks are sent).
    Resync { vm: String },
    /// Show or change the host-wide upload bandwidth limits.
    Throttle {
        #[command(subcommand)]
        action: ThrottleCmd,
    },
    /// Cut a recovery point now and wait for it.
    ReplicateNow { vm: String },
    /// List a VM's recovery points.
    RecoveryPoints { vm: String },
    /// Rebuild a recovery point's disks as <out>/<disk>.img; replication keeps running.
    TestFailover {
        vm: String,
        #[command(flatten)]
        to: RestoreTo,
    },
    /// Fail a VM over into <out>/<disk>.img. Planned (the default, a migration): stop its writes,
    /// cut a final point with every acknowledged write, restore it. --unplanned (the source is
    /// lost): restore a committed point at once. The VM is FailedOver afterwards: replication
    /// stops and its exports refuse writes until it is unprotected or protected again.
    Failover {
        vm: String,
        /// The source is lost: no final point, restore the chosen committed one
        /// (--recovery-point only with it: a planned failover restores its final point).
        #[arg(long)]
        unplanned: bool,
        #[command(flatten)]
        to: RestoreTo,
    },
    /// List jobs (initial replication, cycles, failovers).
    Jobs {
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show one job.
    Job { id: u64 },
    /// List what can be restored of a VM, reading only the store (no daemon needed).
    Points {
        vm: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Rebuild a recovery point's disks as sparse <out>/<disk>.img from the store alone, in this
    /// process (no daemon needed: on any machine with the URL, the host id and the key).
    Restore {
        vm: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Recovery point number, or "latest".
        #[arg(long, default_value = "latest")]
        recovery_point: String,
        /// Output folder (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Downloads in flight (1..=64).
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Replace images that already exist in the output folder.
        #[arg(long)]
        force: bool,
    },
}

/// Which point a (test) failover restores, and where.
#[derive(Debug, clap::Args)]
pub struct RestoreTo {
    /// Recovery point number, or "latest".
    #[arg(long, default_value = "latest")]
    recovery_point: String,
    /// Output folder (on the daemon's host).
    #[arg(long)]
    out: PathBuf,
    /// Return the job at once instead of waiting for it.
    #[arg(long)]
    no_wait: bool,
}

/// Where the standalone commands read a replica.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The target the daemon wrote to: a folder, az://CONTAINER[/PREFIX] or s3://BUCKET[/PREFIX]
    /// (credentials from the standard AZURE_STORAGE_* / AWS_* environment variables).
    #[arg(long)]
    pub target: String,
    /// Blob store setting KEY=VALUE (object_store keys), repeatable.
    #[arg(long = "target-option", value_name = "KEY=VALUE")]
    pub target_options: Vec<String>,
    /// The host whose replica to read (its ferryd --host-id). Default: this machine's hostname.
    #[arg(long)]
    pub host: Option<String>,
    /// The replica's key, if it was written encrypted (32 bytes or 64 hex digits).
    #[arg(long, env = "FERRY_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

impl StoreArgs {
    async fn open(&self) -> anyhow::Result<ferry_engine::target::Target> {
        let options = crate::daemon::target_options(&self.target_options)?;
        let key = crate::daemon::encryption_key(self.encryption_key_file.as_deref())?;
        let host = match &self.host {
            Some(h) => h.clone(),
            None => ferry_engine::config::hostname()?,
        };
        Ok(ferry_engine::target::open_url(&self.target, &options, key.as_ref(), &host).await?)
    }
}

fn stored_point_json(p: &ferry_engine::restore::StoredPoint) -> serde_json::Value {
    json!({
        "seq": p.seq, "generation": p.generation, "time_ms": p.time_ms, "kind": crate::convert::point_kind(p.kind),
        "bytes_logical": p.bytes_logical, "bytes_stored": p.bytes_stored, "disks": p.disks,
    })
}

/// `points` and `restore`: the store alone, no daemon.
async fn standalone(command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Points { vm, store } => {
            let points = ferry_engine::restore::stored_points(&store.open().await?, &vm).await?;
            if json {
                out!("{}", json!(points.iter().map(stored_point_json).collect::<Vec<_>>()));
            } else {
                out!("{:>6}  {:<26} {:<6} {:>12} {:>12}  DISKS", "ID", "TIME", "KIND", "CHANGED", "STORED");
                for p in &points {
                    out!(
                        "{:>6}  {:<26} {:<6} {:>12} {:>12}  {}",
                        p.seq,
                        time(p.time_ms),
                        crate::convert::point_kind(p.kind),
                        format_bytes(p.bytes_logical),
                        format_bytes(p.bytes_stored),
                        p.disks.join(",")
                    );
                }
            }
        }
        Command::Restore { vm, store, recovery_point, out, workers, force } => {
            if !(1..=64).contains(&workers) {
                bail!("--workers {workers}: outside 1..=64");
            }
            let target = store.open().await?;
            let points = ferry_engine::restore::stored_points(&target, &vm).await?;
            let point = match recovery_point.as_str() {
                "latest" => points.last(),
                s => {
                    let seq: u64 = s.parse().map_err(|_| {
                        anyhow::anyhow!("--recovery-point {s:?}: expected a recovery point number or \"latest\"")
                    })?;
                    points.iter().find(|p| p.seq == seq)
                }
            };
            let Some(point) = point else {
                bail!("recovery point {recovery_point} of {vm} is not in the store (ferryctl points lists them)");
            };
            let started = std::time::Instant::now();
            let opts =
                ferry_engine::restore::RestoreOpts { parallelism: workers, only: None, durable: true, replace: force };
            let disks = ferry_engine::restore::restore_point(
                &target,
                &vm,
                point.generation,
                point.seq,
                &out,
                opts,
                Default::default(),
                Default::default(),
            )
            .await?;
            let secs = started.elapsed().as_secs_f64();
            if json {
                let disks: Vec<_> = disks
                    .iter()
                    .map(|d| json!({"name": d.name, "path": d.path.display().to_string(), "size": d.size}))
                    .collect();
                out!("{}", json!({"vm": vm, "recovery_point": point.seq, "disks": disks, "seconds": secs}));
            } else {
                out!("restored {vm} at recovery point {} in {secs:.1}s:", point.seq);
                for d in &disks {
                    out!("  {} {} ({})", d.name, d.path.display(), format_bytes(d.size));
                }
            }
        }
        _ => unreachable!("only the standalone commands come here"),
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ThrottleCmd {
    /// Show the limits and the one in force now.
    Show,
    /// Change limits at once; flags left out keep their value.
    Set {
        /// Work hours, local time, e.g. 08:00-18:00.
        #[arg(long)]
        work_hours: Option<String>,
        /// Work days: mon-fri, mon,wed,fri, all or none.
        #[arg(long)]
        work_days: Option<String>,
        /// Limit during work hours: 512Kbps..1023Mbps or unlimited.
        #[arg(long)]
        work_limit: Option<String>,
        /// Limit outside work hours: 512Kbps..1023Mbps or unlimited.
        #[arg(long)]
        off_limit: Option<String>,
    },
}

fn split_disk(s: &str) -> anyhow::Result<pb::DiskSpec> {
    let (name, path) = match s.split_once('=') {
        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
        None => {
            let p = PathBuf::from(s);
            let stem = p.file_stem().map(|x| x.to_string_lossy().to_string()).unwrap_or_default();
            (stem, p)
        }
    };
    if path.as_os_str().is_empty() {
        bail!("--disk {s:?}: no path given");
    }
    let path = std::path::absolute(&path).with_context(|| format!("resolving {}", path.display()))?;
    Ok(pb::DiskSpec { name, path: path.display().to_string() })
}

fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn vm_json(v: &pb::Vm) -> serde_json::Value {
    json!({
        "name": v.name, "state": v.state, "reason": v.reason, "frequency": v.frequency,
        "upload_workers": v.upload_workers, "last_recovery_point": v.last_recovery_point, "target": v.target,
        "failover": v.failover.as_ref().map(|f| json!({
            "planned": f.planned, "recovery_point": f.recovery_point, "out_dir": f.out_dir, "at_ms": f.at_ms,
        })),
        "disks": v.disks.iter().map(|d| json!({
            "name": d.name, "path": d.path, "size": d.size, "export": d.export,
            "active_log_bytes": d.active_log_bytes, "pending_log_bytes": d.pending_log_bytes,
            "snapshot_bytes": d.snapshot_bytes,
        })).collect::<Vec<_>>(),
        "transitions": v.transitions.iter().map(|t| json!({
            "from": t.from, "to": t.to, "reason": t.reason, "at_ms": t.at_ms,
        })).collect::<Vec<_>>(),
    })
}

fn point_json(p: &pb::RecoveryPoint) -> serde_json::Value {
    json!({"seq": p.seq, "time_ms": p.time_ms, "kind": p.kind, "bytes_logical": p.bytes_logical, "bytes_stored": p.bytes_stored})
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    json!({
        "id": j.id, "vm": j.vm, "kind": j.kind, "status": j.status, "bytes_done": j.bytes_done,
        "bytes_total": j.bytes_total, "started_ms": j.started_ms, "ended_ms": j.ended_ms,
        "error": j.error, "detail": j.detail,
    })
}

fn print_vm(v: &pb::Vm) {
    out!("VM {}: {}", v.name, v.state);
    if !v.reason.is_empty() {
        out!("  reason: {}", v.reason);
    }
    if let Some(f) = &v.failover {
        out!(
            "  failed over ({}) at {} to recovery point {}, restored into {}",
            if f.planned { "planned" } else { "unplanned" },
            time(f.at_ms),
            f.recovery_point,
            f.out_dir
        );
    }
    out!(
        "  frequency: {}, upload workers: {}, last recovery point: {}",
        v.frequency,
        v.upload_workers,
        v.last_recovery_point
    );
    out!("  target: {}", v.target);
    for d in &v.disks {
        out!(
            "  disk {} ({}) {}: export {}, active log {}, pending logs {}, snapshot {}",
            d.name,
            format_bytes(d.size),
            d.path,
            d.export,
            format_bytes(d.active_log_bytes),
            format_bytes(d.pending_log_bytes),
            format_bytes(d.snapshot_bytes)
        );
    }
    for t in v.transitions.iter().rev().take(10) {
        out!("  {} {} -> {}: {}", time(t.at_ms), t.from, t.to, t.reason);
    }
}

/// A `--recovery-point` value: a number, or "latest" (0).
fn point_number(s: &str) -> anyhow::Result<u64> {
    match s {
        "latest" => Ok(0),
        s => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("--recovery-point {s:?}: expected a recovery point number or \"latest\""),
        },
    }
}

/// An output folder for the daemon, which resolves paths on its own.
fn absolute(out: &std::path::Path) -> anyhow::Result<String> {
    let out = std::path::absolute(out).with_context(|| format!("resolving {}", out.display()))?;
    Ok(out.display().to_string())
}

/// Waits for a job to end (unless `no_wait`), prints it, and fails if it did.
async fn follow_job(c: &mut Client, mut j: pb::Job, no_wait: bool, json: bool, what: &str) -> anyhow::Result<()> {
    while !no_wait && j.status == "Running" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        j = c.get_job(pb::GetJobRequest { id: j.id }).await.map_err(rpc)?.into_inner();
    }
    if json {
        out!("{}", job_json(&j));
    } else {
        print_job(&j);
    }
    if j.status == "Failed" {
        bail!("{what} failed: {}", j.error);
    }
    Ok(())
}

fn print_job(j: &pb::Job) {
    let pct = if j.bytes_total > 0 {
        format!(" {:.0}%", 100.0 * j.bytes_done as f64 / j.bytes_total as f64)
    } else {
        String::new()
    };
    out!(
        "job {} {} {} {}{}: {} of {}, started {}{}{}",
        j.id,
        j.vm,
        j.kind,
        j.status,
        pct,
        format_bytes(j.bytes_done),
        format_bytes(j.bytes_total),
        time(j.started_ms),
        if j.detail.is_empty() { String::new() } else { format!(", {}", j.detail) },
        if j.error.is_empty() { String::new() } else { format!(", error: {}", j.error) },
    );
}

/// A client of ferryd's API that sends the bearer token, if one is given.
pub type Client = FerryClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The channel to `args.endpoint`: TLS for an https:// endpoint (with
/// `--ca`, and `--cert`/`--key` if ferryd asks for client certificates).
async fn connect(args: &Args) -> anyhow::Result<Client> {
    let endpoint = &args.endpoint;
    let token = match &args.token_file {
        Some(p) => {
            let t = crate::api_auth::read_token("--token-file", p)?;
            Some(format!("Bearer {t}").parse().context("--token-file: not a header value")?)
        }
        None => None,
    };
    let mut ep = Channel::from_shared(endpoint.to_string())
        .with_context(|| format!("bad endpoint {endpoint:?}"))?
        .connect_timeout(Duration::from_secs(5));
    let https = ep.uri().scheme_str() == Some("https");
    // The CA to trust: given exactly when the endpoint is https://.
    let ca = match (&args.ca, https) {
        (Some(ca), true) => Some(ca),
        (Some(_), false) => bail!("--ca is for TLS: give an https:// endpoint, not {endpoint}"),
        (None, true) => bail!("an https:// endpoint needs --ca, the CA certificate that signed ferryd's certificate"),
        (None, false) if args.cert.is_some() => bail!("--cert is for TLS: give an https:// endpoint and --ca"),
        (None, false) => None,
    };
    let host = ep.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if token.is_some() && !https && !loopback {
        bail!("--token-file over plain http:// to {host} would send the token in clear: use https:// and --ca");
    }
    if let Some(ca) = ca {
        ferry_engine::target::install_tls_provider();
        let read = |flag: &str, p: &PathBuf| std::fs::read(p).with_context(|| format!("{flag} {}", p.display()));
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca", ca)?));
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            tls = tls.identity(Identity::from_pem(read("--cert", cert)?, read("--key", key)?));
        }
        ep = ep.tls_config(tls).context("--ca/--cert/--key")?;
    }
    let ch = ep.connect().await.with_context(|| {
        Unreachable(format!("cannot reach ferryd at {endpoint} (is it running? see --endpoint / FERRY_ENDPOINT)"))
    })?;
    Ok(FerryClient::with_interceptor(ch, BearerToken(token)))
}

/// ferryctl's exit codes (also in `ferryctl --help`).
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// ferryd refused the request (bad input, wrong state), a job failed,
    /// or ferryctl refused its own arguments' values.
    pub const FAILED: u8 = 1;
    /// Usage: unknown command or flag, missing argument.
    pub const USAGE: u8 = 2;
    /// ferryd cannot be reached (not running, wrong endpoint, TLS refused)
    /// or is unavailable for now: retrying may help.
    pub const UNREACHABLE: u8 = 3;
    /// The VM, job or recovery point does not exist.
    pub const NOT_FOUND: u8 = 4;
    /// Not allowed: no or a wrong token (Unauthenticated), or a path
    /// outside the disk roots (PermissionDenied).
    pub const DENIED: u8 = 5;
}

const EXIT_CODES: &str = "Exit codes: 0 done; 1 refused or failed; 2 usage; 3 ferryd unreachable or \
unavailable (also a refused TLS handshake); 4 not found; 5 not allowed (bearer token, disk roots)";

/// A refusal from ferryd, shown as "NotFound: VM not found: x".
#[derive(Debug)]
struct RpcError(tonic::Status);

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for RpcError {}

/// ferryd could not be reached.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn rpc(s: tonic::Status) -> anyhow::Error {
    anyhow::Error::new(RpcError(s))
}

/// The exit code for an error [`run`] returned ([`exit`]).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    use tonic::Code;
    // (anyhow finds a context type at any depth of contexts.)
    if e.downcast_ref::<Unreachable>().is_some() {
        return exit::UNREACHABLE;
    }
    match e.chain().find_map(|c| c.downcast_ref::<RpcError>()).map(|r| r.0.code()) {
        Some(Code::NotFound) => exit::NOT_FOUND,
        Some(Code::Unauthenticated | Code::PermissionDenied) => exit::DENIED,
        Some(Code::Unavailable) => exit::UNREACHABLE,
        _ => exit::FAILED,
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.command, Command::Points { .. } | Command::Restore { .. }) {
        return standalone(args.command, args.json).await;
    }
    let mut c = connect(&args).await?;
    let json = args.json;
    match args.command {
        Command::Protect { vm, disks, frequency, workers } => {
            parse_duration(&frequency).map_err(|e| anyhow::anyhow!("--frequency: {e}"))?;
            let disks = disks.iter().map(|d| split_disk(d)).collect::<anyhow::Result<Vec<_>>>()?;
            let v = c
                .protect_vm(pb::ProtectVmRequest { name: vm, disks, frequency, upload_workers: workers })
                .await
                .map_err(rpc)?
                .into_inner();
            if json {
                out!("{}", vm_json(&v));
            } else {
                out!("protecting {}: {}", v.name, v.state);
                for d in &v.disks {
                    out!("  disk {} -> NBD export {}", d.name, d.export);
                }
            }
        }
        Command::Unprotect { vm } => {
            c.unprotect_vm(pb::VmRef { name: vm.clone() }).await.map_err(rpc)?;
            if json {
                out!("{}", json!({"unprotected": vm}));
            } else {
                out!("{vm} is no longer protected (its replica is kept on the target)");
            }
        }
        Command::List => {
            let vms = c.list_vms(pb::ListVmsRequest {}).await.map_err(rpc)?.into_inner().vms;
            if json {
                out!("{}", json!(vms.iter().map(vm_json).collect::<Vec<_>>()));
            } else if vms.is_empty() {
                out!("no protected VMs");
            } else {
                out!("target: {}", vms[0].target);
                out!("{:<24} {:<22} {:>6} {:>10}  REASON", "VM", "STATE", "DISKS", "LAST POINT");
                for v in &vms {
                    out!(
                        "{:<24} {:<22} {:>6} {:>10}  {}",
                        v.name,
                        v.state,
                        v.disks.len(),
                        v.last_recovery_point,
                        v.reason
                    );
                }
            }
        }
        Command::Show { vm } => {
            let v = c.get_vm(pb::VmRef { name: vm }).await.map_err(rpc)?.into_inner();
            if json {
                out!("{}", vm_json(&v));
            } else {
                print_vm(&v);
            }
        }
        Command::Pause { vm } => {
            let v = c.pause_vm(pb::VmRef { name: vm }).await.map_err(rpc)?.into_inner();
            if json {
                out!("{}", vm_json(&v))
            } else {
                out!("{}: {}", v.name, v.state)
            }
        }
        Command::Resume { vm } => {
            let v = c.resume_vm(pb::VmRef { name: vm }).await.map_err(rpc)?.into_inner();
            if json {
                out!("{}", vm_json(&v))
            } else {
                out!("{}: {}", v.name, v.state)
            }
        }
        Command::Resync { vm } => {
            let v = c.resync_vm(pb::VmRef { name: vm }).await.map_err(rpc)?.into_inner();
            if json {
                out!("{}", vm_json(&v))
            } else {
                out!("{}: {} (see `ferryctl jobs --vm {}` for progress)", v.name, v.state, v.name)
            }
        }
        Command::Throttle { action } => {
            let t = match action {
                ThrottleCmd::Show => c.get_throttle(pb::GetThrottleRequest {}).await.map_err(rpc)?.into_inner(),
                ThrottleCmd::Set { work_hours, work_days, work_limit, off_limit } => {
                    if work_hours.is_none() && work_days.is_none() && work_limit.is_none() && off_limit.is_none() {
                        bail!(
                            "throttle set: give at least one of --work-hours, --work-days, --work-limit, --off-limit"
                        );
                    }
                    let req = pb::Throttle {
                        work_hours: work_hours.unwrap_or_default(),
                        work_days: work_days.unwrap_or_default(),
                        work_limit: work_limit.unwrap_or_default(),
                        off_limit: off_limit.unwrap_or_default(),
                        limit_now: String::new(),
                    };
                    c.set_throttle(req).await.map_err(rpc)?.into_inner()
                }
            };
            if json {
                out!(
                    "{}",
                    json!({"work_hours": t.work_hours, "work_days": t.work_days, "work_limit": t.work_limit,
                           "off_limit": t.off_limit, "limit_now": t.limit_now})
                );
            } else {
                out!("work hours {} on {}: {}", t.work_hours, t.work_days, t.work_limit);
                out!("other hours: {}", t.off_limit);
                out!("in force now: {}", t.limit_now);
            }
        }
        Command::ReplicateNow { vm } => {
            let r = c.replicate_now(pb::VmRef { name: vm.clone() }).await.map_err(rpc)?.into_inner();
            match (json, r.point) {
                (true, p) => out!("{}", json!({"point": p.as_ref().map(point_json)})),
                (false, Some(p)) => out!(
                    "recovery point {} of {vm} at {} ({} stored)",
                    p.seq,
                    time(p.time_ms),
                    format_bytes(p.bytes_stored)
                ),
                (false, None) => out!("nothing written since the last recovery point of {vm}"),
            }
        }
        Command::RecoveryPoints { vm } => {
            let points = c.list_recovery_points(pb::VmRef { name: vm }).await.map_err(rpc)?.into_inner().points;
            if json {
                out!("{}", json!(points.iter().map(point_json).collect::<Vec<_>>()));
            } else {
                out!("{:>6}  {:<26} {:<6} {:>12} {:>12}", "ID", "TIME", "KIND", "CHANGED", "STORED");
                for p in &points {
                    out!(
                        "{:>6}  {:<26} {:<6} {:>12} {:>12}",
                        p.seq,
                        time(p.time_ms),
                        p.kind,
                        format_bytes(p.bytes_logical),
                        format_bytes(p.bytes_stored)
                    );
                }
            }
        }
        Command::TestFailover { vm, to: RestoreTo { recovery_point, out, no_wait } } => {
            let (seq, out) = (point_number(&recovery_point)?, absolute(&out)?);
            let j = c
                .test_failover(pb::TestFailoverRequest { vm, recovery_point: seq, out_dir: out })
                .await
                .map_err(rpc)?
                .into_inner();
            follow_job(&mut c, j, no_wait, json, "test failover").await?;
        }
        Command::Failover { vm, unplanned, to: RestoreTo { recovery_point, out, no_wait } } => {
            let (seq, out) = (point_number(&recovery_point)?, absolute(&out)?);
            if seq != 0 && !unplanned {
                bail!("--recovery-point: a planned failover restores the final point it cuts; add --unplanned to choose one");
            }
            let j = c
                .failover(pb::FailoverRequest { vm, recovery_point: seq, out_dir: out, unplanned })
                .await
                .map_err(rpc)?
                .into_inner();
            follow_job(&mut c, j, no_wait, json, "failover").await?;
        }
        Command::Jobs { vm } => {
            let jobs =
                c.list_jobs(pb::ListJobsRequest { vm: vm.unwrap_or_default() }).await.map_err(rpc)?.into_inner().jobs;
            if json {
                out!("{}", json!(jobs.iter().map(job_json).collect::<Vec<_>>()));
            } else {
                for j in &jobs {
                    print_job(j);
                }
            }
        }
        Command::Points { .. } | Command::Restore { .. } => unreachable!("run without a daemon above"),
        Command::Job { id } => {
            let j = c.get_job(pb::GetJobRequest { id }).await.map_err(rpc)?.into_inner();
            if json {
                out!("{}", job_json(&j));
            } else {
                print_job(&j);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_documented_exit_code() {
        use tonic::{Code, Status};
        let cases = [
            (rpc(Status::not_found("VM not found: x")), exit::NOT_FOUND),
            (rpc(Status::unauthenticated("token")), exit::DENIED),
            (rpc(Status::permission_denied("/etc")), exit::DENIED),
            (rpc(Status::unavailable("later")), exit::UNREACHABLE),
            (rpc(Status::invalid_argument("bad")), exit::FAILED),
            (rpc(Status::new(Code::FailedPrecondition, "state")), exit::FAILED),
            (rpc(Status::not_found("job")).context("waiting for the job"), exit::NOT_FOUND),
            (anyhow::anyhow!("transport error").context(Unreachable("cannot reach ferryd".into())), exit::UNREACHABLE),
            (anyhow::anyhow!("--frequency: not a duration"), exit::FAILED),
        ];
        for (e, code) in cases {
            assert_eq!(exit_code(&e), code, "{e:#}");
        }
        assert_eq!(rpc(Status::not_found("VM not found: x")).to_string(), "NotFound: VM not found: x");
    }

    #[test]
    fn disk_names_default_to_the_file_stem() {
        let d = split_disk("/vms/web01-os.img").unwrap();
        assert_eq!((d.name.as_str(), d.path.as_str()), ("web01-os", "/vms/web01-os.img"));
        let d = split_disk("data=/vms/x.raw").unwrap();
        assert_eq!(d.name, "data");
        assert!(split_disk("data=").is_err());
        assert!(split_disk("rel.img").unwrap().path.starts_with('/'));
    }
}
