//! `ferryd`: the engine, its gRPC API (with health and reflection) and the
//! NBD export of every protected disk: gRPC on loopback (elsewhere only
//! with a token and TLS, [`crate::api_auth`]), NBD on a Unix socket only
//! its user (or one group) may use, and on TCP only if asked.
//!
//! Shutdown (SIGINT/SIGTERM): stop accepting, let NBD requests in flight
//! finish, stop gRPC, then stop the engine, which seals every active change
//! log cleanly so the next start trusts them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use ferry_engine::nbd::{NbdLimits, NbdServer};
use ferry_engine::{Engine, EngineConfig};
use ferry_proto::v1::ferry_server::FerryServer;
use tokio_util::sync::CancellationToken;

use crate::api_auth;
use crate::ready::{self, Ready};
use crate::service::FerryService;
use crate::units;

#[derive(Debug, Parser)]
#[command(
    name = "ferryd",
    version,
    about = "Ferry replication daemon: protects VM disks by shipping their change logs"
)]
pub struct Args {
    /// State folder (state store, default NBD socket). Default: $XDG_DATA_HOME/ferry or ~/.local/share/ferry.
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the replicas go: a folder (a path or file:///path), az://CONTAINER[/PREFIX] (Azure
    /// Blob) or s3://BUCKET[/PREFIX] (S3 and S3-compatible stores). Blob stores read the standard
    /// AZURE_STORAGE_* / AWS_* environment variables; a missing container or bucket is created.
    /// Default: the folder <data-dir>/target.
    #[arg(long, env = "FERRY_TARGET")]
    pub target: Option<String>,
    /// A blob store setting, KEY=VALUE with object_store's configuration keys (e.g.
    /// aws_endpoint=http://127.0.0.1:9000); repeatable; overrides the environment. Values are never
    /// printed, but the command line is visible to other users (ps): give secrets in the
    /// environment (AWS_SECRET_ACCESS_KEY, AZURE_STORAGE_ACCOUNT_KEY).
    #[arg(long = "target-option", value_name = "KEY=VALUE")]
    pub target_options: Vec<String>,
    /// This host's name in the target: its replicas go under hosts/<ID>/, so daemons on many
    /// hosts can share one container or bucket. Letters, digits, '.', '_', '-'. Default: the hostname.
    #[arg(long, env = "FERRY_HOST_ID")]
    pub host_id: Option<String>,
    /// Encryption at rest: a file of 32 random bytes (e.g. `head -c 32 /dev/urandom`) or 64 hex
    /// digits. Every object and manifest is sealed with AES-256-GCM; a replica written without
    /// encryption is refused, and so is an encrypted one when no key is given. Keep the key
    /// elsewhere too: without it the replica cannot be restored.
    #[arg(long, env = "FERRY_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// gRPC listen address (loopback by default; port 0 picks a free port). A non-loopback
    /// address needs --token-file and --tls-cert/--tls-key.
    #[arg(long, env = "FERRY_LISTEN", default_value = crate::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// A bearer token every gRPC call but health must carry (`authorization: Bearer <token>`):
    /// a file of at least 16 visible characters that only its owner may read. Default: none.
    #[arg(long, env = "FERRY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate (PEM, with its chain). Default: plain HTTP/2.
    #[arg(long, env = "FERRY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "FERRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. Needs --tls-cert.
    #[arg(long, env = "FERRY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// NBD Unix socket, mode 0600 (0660 with --nbd-socket-group). Default: <data-dir>/nbd.sock.
    #[arg(long, env = "FERRY_NBD_SOCKET")]
    pub nbd_socket: Option<PathBuf>,
    /// Group that may use the NBD socket too (mode 0660), e.g. the one QEMU runs as; a name or an id.
    #[arg(long, env = "FERRY_NBD_SOCKET_GROUP")]
    pub nbd_socket_group: Option<String>,
    /// Also serve NBD on TCP at this address (e.g. 127.0.0.1:10809). Off by default: NBD has no
    /// authentication, so anyone who can reach the port can read and write every protected disk.
    #[arg(long, env = "FERRY_NBD_LISTEN", default_value = "off")]
    pub nbd_listen: String,
    /// NBD connections open at once, Unix and TCP together (1..=16384); more are closed at accept.
    #[arg(long, default_value_t = NbdLimits::default().max_connections)]
    pub nbd_max_connections: usize,
    /// NBD connections per export (<vm>/<disk>) at once (1..=16384).
    #[arg(long, default_value_t = NbdLimits::default().max_connections_per_export)]
    pub nbd_max_connections_per_export: usize,
    /// Time an NBD client has from connecting to starting transmission (1s..=10m).
    #[arg(long, default_value = "10s")]
    pub nbd_handshake_timeout: String,
    /// An NBD connection that sends no request for this long after its handshake is closed (1s..=24h).
    #[arg(long, default_value = "5m")]
    pub nbd_idle_timeout: String,
    /// Host-wide upload limit: 512Kbps..1023Mbps or "unlimited".
    #[arg(long, default_value = "unlimited")]
    pub bandwidth_limit: String,
    /// When a VM that needs a resync starts it: off-hours (outside --work-hours/--work-days), immediately, or manual.
    #[arg(long, default_value = "off-hours")]
    pub auto_resync: String,
    /// Work hours for the bandwidth limits and the off-hours resync window, local time.
    #[arg(long, default_value = "08:00-18:00")]
    pub work_hours: String,
    /// Work days: mon-fri, mon,wed,fri, all or none.
    #[arg(long, default_value = "mon-fri")]
    pub work_days: String,
    /// Upload limit during work hours (overrides --bandwidth-limit then): 512Kbps..1023Mbps or unlimited.
    #[arg(long)]
    pub work_limit: Option<String>,
    /// Upload limit outside work hours (overrides --bandwidth-limit then).
    #[arg(long)]
    pub off_limit: Option<String>,
    /// Runs policy time (retry backoff, work hours, auto-resync windows) this
    /// many times faster than wall time, 1..=1000000, for drills, tests and
    /// the simulator (1000: a 30-minute retry comes after 1.8 s). Replication
    /// frequency and recovery-point times stay wall time. Hidden from --help:
    /// not for production.
    #[arg(long, default_value_t = 1.0, hide = true)]
    pub policy_time_factor: f64,
    /// Fault injection: a JSON file of target faults (error_rate, fail_first, outages, down,
    /// latency_ms, auth_failure, seed), re-read every second while ferryd runs.
    #[arg(long)]
    pub faults: Option<PathBuf>,
    /// Host-wide memory for the image bytes held for sealed change logs until
    /// their recovery point commits (0..=64GiB; beyond it they go to a side
    /// file beside the disk).
    #[arg(long, env = "FERRY_HELD_MEMORY", default_value = "256MiB")]
    pub held_memory: String,
    /// Nice value (0..=19) of the threads that compress uploads and hash disks
    /// for a resync, so they yield to the guests' write path.
    #[arg(long, env = "FERRY_BACKGROUND_NICE", default_value_t = ferry_engine::runtime::DEFAULT_BACKGROUND_NICE)]
    pub background_nice: i32,
    /// A folder under which disks may be protected and test failovers,
    /// failovers and restores may write (repeatable; absolute and existing;
    /// `FERRY_DISK_ROOTS` takes a `:`-separated list). Default: anywhere but
    /// the system folders (/etc, /usr, /boot, /proc, /sys, /dev, ...); the
    /// data folder is refused either way.
    #[arg(long = "disk-root", env = "FERRY_DISK_ROOTS", value_delimiter = ':')]
    pub disk_roots: Vec<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("ferry");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/ferry"),
        None => PathBuf::from("ferry-data"),
    }
}

/// `--target` and `--target-option` into the engine's target; an error
/// names the flag (and never a value: it may be a secret).
fn target_config(args: &Args) -> anyhow::Result<Option<ferry_engine::config::TargetConfig>> {
    let options = target_options(&args.target_options)?;
    match &args.target {
        None if !args.target_options.is_empty() => anyhow::bail!("--target-option needs a blob store --target"),
        None => Ok(None),
        Some(url) => {
            let t = ferry_engine::config::TargetConfig::from_url(url, options)
                .map_err(|e| anyhow::anyhow!("--target: {e}"))?;
            if matches!(t, ferry_engine::config::TargetConfig::Local { .. }) && !args.target_options.is_empty() {
                anyhow::bail!("--target-option applies to az:// and s3:// targets, not to a folder");
            }
            Ok(Some(t))
        }
    }
}

/// `--target-option KEY=VALUE` flags as blob store options; an error never
/// shows a value.
pub fn target_options(flags: &[String]) -> anyhow::Result<ferry_engine::target::BlobOptions> {
    let mut options = ferry_engine::target::BlobOptions::default();
    for o in flags {
        let Some((k, v)) = o.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
            anyhow::bail!("--target-option: expected KEY=VALUE, got a value without a key");
        };
        options = options.with(k.trim(), v);
    }
    Ok(options)
}

/// The key from `--encryption-key-file`, else from `FERRY_ENCRYPTION_KEY`
/// (64 hex digits); none if neither is set. An error names where it came
/// from, never the key.
pub fn encryption_key(
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<ferry_engine::target::sealed::EncryptionKey>> {
    use ferry_engine::target::sealed::EncryptionKey;
    if let Some(path) = file {
        return Ok(Some(EncryptionKey::from_file(path).map_err(|e| anyhow::anyhow!("--encryption-key-file: {e}"))?));
    }
    match std::env::var("FERRY_ENCRYPTION_KEY") {
        Ok(text) => Ok(Some(EncryptionKey::from_hex(&text).map_err(|e| anyhow::anyhow!("FERRY_ENCRYPTION_KEY: {e}"))?)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        // Never "no key" for a key that is set but unreadable: that would store in clear.
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("FERRY_ENCRYPTION_KEY: not 64 hex digits"),
    }
}

/// `--held-memory` and `--background-nice` into `config`, checked with the
/// engine's own bounds; an error names the flag.
fn apply_tuning(args: &Args, config: &mut EngineConfig) -> anyhow::Result<()> {
    config.held_memory = units::parse_bytes(&args.held_memory).map_err(|e| anyhow::anyhow!("--held-memory: {e}"))?;
    config.background_nice = args.background_nice;
    config.disk_roots = args.disk_roots.clone();
    config.validate().map_err(|e| {
        let message = e
            .to_string()
            .replace("held_memory", "--held-memory")
            .replace("background_nice", "--background-nice")
            .replace("disk_roots", "--disk-root");
        anyhow::anyhow!("{message}")
    })
}

fn loopback_only(addr: &SocketAddr, flag: &str) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        tracing::warn!("{flag} {addr} is not a loopback address: NBD has no authentication");
    }
    Ok(())
}

/// The NBD limits from the flags; an error names the flag out of bounds.
fn nbd_limits(args: &Args) -> anyhow::Result<NbdLimits> {
    let duration = |flag: &str, v: &str| units::parse_duration(v).map_err(|e| anyhow::anyhow!("{flag}: {e}"));
    let limits = NbdLimits {
        max_connections: args.nbd_max_connections,
        max_connections_per_export: args.nbd_max_connections_per_export,
        handshake_timeout: duration("--nbd-handshake-timeout", &args.nbd_handshake_timeout)?,
        idle_timeout: duration("--nbd-idle-timeout", &args.nbd_idle_timeout)?,
        ..NbdLimits::default()
    };
    limits.validate().map_err(|e| {
        let flag = match &e {
            ferry_engine::Error::InvalidArgument { field, .. } => format!("--nbd-{}", field.replace('_', "-")),
            _ => "NBD limits".to_string(),
        };
        anyhow::anyhow!("{flag}: {e}")
    })?;
    Ok(limits)
}

fn read_faults(path: &std::path::Path) -> anyhow::Result<ferry_engine::target::unreliable::Faults> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --faults {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing --faults {}", path.display()))
}

/// Re-reads the faults file every second, so a drill can change faults live.
fn watch_faults(engine: Arc<Engine>, path: PathBuf, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            match read_faults(&path) {
                Ok(f) if last.as_ref() != Some(&f) => {
                    match engine.set_faults(f.clone()) {
                        Ok(()) => tracing::info!(faults = ?f, "fault injection changed"),
                        Err(e) => tracing::warn!(error = %e, "faults file refused"),
                    }
                    last = Some(f);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "faults file unreadable"),
            }
        }
    });
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let mut config = EngineConfig::new(&data_dir);
    config.target = target_config(&args)?;
    config.host_id = args.host_id.clone();
    config.encryption_key = encryption_key(args.encryption_key_file.as_deref())?;
    let flat = units::parse_bandwidth(&args.bandwidth_limit).map_err(|e| anyhow::anyhow!("--bandwidth-limit: {e}"))?;
    let limit = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<u64>> {
        match v {
            Some(s) => units::parse_bandwidth(s).map_err(|e| anyhow::anyhow!("{flag}: {e}")),
            None => Ok(flat),
        }
    };
    config.bandwidth = ferry_engine::throttle::BandwidthPolicy {
        schedule: ferry_engine::schedule::WorkSchedule::parse(&args.work_hours, &args.work_days)?,
        work_limit_bps: limit("--work-limit", &args.work_limit)?,
        off_limit_bps: limit("--off-limit", &args.off_limit)?,
    };
    config.auto_resync = match args.auto_resync.as_str() {
        "off-hours" => ferry_engine::config::AutoResync::OffHours,
        "immediately" => ferry_engine::config::AutoResync::Immediately,
        "manual" => ferry_engine::config::AutoResync::Manual,
        other => anyhow::bail!("--auto-resync {other:?}: expected off-hours, immediately or manual"),
    };
    if let Some(path) = &args.faults {
        config.faults = Some(read_faults(path)?);
    }
    apply_tuning(&args, &mut config)?;
    let token = args.token_file.as_deref().map(|p| api_auth::read_token("--token-file", p)).transpose()?;
    let tls = api_auth::server_tls(args.tls_cert.as_deref(), args.tls_key.as_deref(), args.tls_client_ca.as_deref())?;
    api_auth::check_listen(&args.listen, token.is_some(), tls.is_some())?;
    // The TLS files are parsed here, before the engine opens: a bad one
    // stops ferryd before anything else starts.
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        ferry_engine::target::install_tls_provider();
        server = server.tls_config(tls).context("--tls-cert/--tls-key/--tls-client-ca")?;
    }
    let nbd_limits = nbd_limits(&args)?;

    let clock: Arc<dyn ferry_engine::clock::Clock> = if args.policy_time_factor == 1.0 {
        Arc::new(ferry_engine::clock::SystemClock)
    } else {
        Arc::new(ferry_engine::clock::AcceleratedClock::new(args.policy_time_factor).context("--policy-time-factor")?)
    };
    let engine = Arc::new(Engine::open_with_clock(config, clock).await.context("opening the engine")?);
    let shutdown = CancellationToken::new();
    if let Some(path) = &args.faults {
        watch_faults(engine.clone(), path.clone(), shutdown.clone());
    }

    // NBD export.
    let nbd = NbdServer::with_limits(engine.export_catalog(), nbd_limits, shutdown.clone())?;
    let socket = args.nbd_socket.clone().unwrap_or_else(|| ferry_engine::paths::DataDir::new(&data_dir).nbd_socket());
    let unix = crate::socket::bind(&socket, args.nbd_socket_group.as_deref())?;
    let mut tasks = tokio::task::JoinSet::new();
    {
        let nbd = nbd.clone();
        tasks.spawn(async move { nbd.serve_unix(unix).await.map_err(anyhow::Error::from) });
    }
    let mut nbd_tcp = None;
    if args.nbd_listen != "off" {
        let addr: SocketAddr =
            args.nbd_listen.parse().with_context(|| format!("--nbd-listen {:?} is not an address", args.nbd_listen))?;
        loopback_only(&addr, "--nbd-listen")?;
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding NBD on {addr}"))?;
        nbd_tcp = Some(l.local_addr()?);
        let nbd = nbd.clone();
        tasks.spawn(async move { nbd.serve_tcp(l).await.map_err(anyhow::Error::from) });
    }

    // gRPC: health (open), reflection v1 and v1alpha and ferry.v1 (behind
    // the token, if one is set), over TLS if configured.
    let grpc = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let grpc_addr = grpc.local_addr()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<FerryServer<FerryService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let check = api_auth::TokenCheck::new(token);
    use tonic::service::interceptor::InterceptedService;
    let reflection_v1 = InterceptedService::new(reflection().build_v1().context("reflection v1")?, check.clone());
    let reflection_v1alpha =
        InterceptedService::new(reflection().build_v1alpha().context("reflection v1alpha")?, check.clone());
    {
        let svc = FerryServer::with_interceptor(FerryService::new(engine.clone()), check.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            server
                .add_service(health)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc),
                    stop.cancelled_owned(),
                )
                .await
                .map_err(anyhow::Error::from)
        });
    }

    let ready = Ready {
        grpc: grpc_addr,
        nbd_socket: socket.clone(),
        nbd_tcp,
        data_dir: data_dir.clone(),
        target: engine.target_description(),
    };
    println!("{ready}");
    tracing::info!(%grpc_addr, socket = %socket.display(), "ferryd ready");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut failure = None;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        Some(r) = tasks.join_next() => {
            failure = Some(match r {
                Ok(Ok(())) => anyhow::anyhow!("a server stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::anyhow!("a server task failed: {e}"),
            });
        }
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&socket);
    engine.shutdown().await.context("stopping the engine")?;
    println!("{}", ready::STOPPED);
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut all = vec!["ferryd"];
        all.extend_from_slice(extra);
        Args::try_parse_from(all).expect("flags parse")
    }

    #[test]
    fn nbd_tcp_is_off_and_limits_are_the_defaults_unless_asked() {
        let a = args(&[]);
        assert_eq!(a.nbd_listen, "off");
        assert_eq!(a.nbd_socket_group, None);
        assert_eq!(nbd_limits(&a).unwrap(), NbdLimits::default());
        let a = args(&["--nbd-max-connections", "8", "--nbd-idle-timeout", "90s", "--nbd-handshake-timeout", "2s"]);
        let l = nbd_limits(&a).unwrap();
        assert_eq!((l.max_connections, l.idle_timeout.as_secs(), l.handshake_timeout.as_secs()), (8, 90, 2));
    }

    #[test]
    fn held_memory_and_background_nice_are_applied_or_refused_naming_their_flag() {
        let mut config = EngineConfig::new(std::path::Path::new("/tmp/x"));
        apply_tuning(&args(&[]), &mut config).unwrap();
        assert_eq!((config.held_memory, config.background_nice), (256 << 20, 10), "the documented defaults");
        apply_tuning(&args(&["--held-memory", "1GiB", "--background-nice", "15"]), &mut config).unwrap();
        assert_eq!((config.held_memory, config.background_nice), (1 << 30, 15));
        for (flags, flag) in [
            (&["--held-memory", "65GiB"][..], "--held-memory"),
            (&["--held-memory", "lots"][..], "--held-memory"),
            (&["--background-nice", "20"][..], "--background-nice"),
        ] {
            let err = apply_tuning(&args(flags), &mut config).unwrap_err().to_string();
            assert!(err.contains(flag), "{flags:?}: {err}");
        }
    }

    #[test]
    fn nbd_limits_out_of_bounds_name_their_flag() {
        let err = nbd_limits(&args(&["--nbd-max-connections", "0"])).unwrap_err();
        assert!(err.to_string().starts_with("--nbd-max-connections: "), "{err}");
        let err = nbd_limits(&args(&["--nbd-handshake-timeout", "1h"])).unwrap_err();
        assert!(err.to_string().starts_with("--nbd-handshake-timeout: "), "{err}");
        let err = nbd_limits(&args(&["--nbd-idle-timeout", "soon"])).unwrap_err();
        assert!(err.to_string().starts_with("--nbd-idle-timeout: "), "{err}");
    }
}
