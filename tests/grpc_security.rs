//! ferryd's API behind a bearer token and mutual TLS, set up as an operator
//! does (certificates made with openssl, files given by flag), driven by
//! ferryctl and by a tonic client: the right client gets in, every other
//! one is refused with a message naming what is missing, and health stays
//! open.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry::harness::{binaries, require_tool, run, Daemon, Ran};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Runs openssl in `dir`, asserting success.
fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new(require_tool("openssl"));
    cmd.args(args).current_dir(dir);
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.ok(), "openssl {args:?}:\n{}", out.text());
}

/// A CA (`<ca>.pem`, `<ca>.key`) and a certificate `<name>.pem`/`<name>.key` it signs.
fn ca(dir: &Path, ca: &str) {
    std::fs::write(
        dir.join(format!("{ca}.ext")),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n",
    )
    .unwrap();
    let (key, csr, pem, ext) = (format!("{ca}.key"), format!("{ca}.csr"), format!("{ca}.pem"), format!("{ca}.ext"));
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key]);
    openssl(dir, &["req", "-new", "-key", &key, "-subj", &format!("/CN={ca}"), "-out", &csr]);
    openssl(dir, &["x509", "-req", "-in", &csr, "-signkey", &key, "-days", "2", "-extfile", &ext, "-out", &pem]);
}

fn signed(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &key]);
    openssl(dir, &["req", "-new", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr]);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &pem,
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
    extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";

fn private_file(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

fn ferryctl(args: &[&str]) -> Ran {
    let mut cmd = Command::new(&binaries().ferryctl);
    cmd.args(args);
    run(&mut cmd, Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_client_with_the_token_and_a_certificate_of_the_ca_gets_in() {
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    ca(p, "ca");
    signed(p, "ca", "server", SERVER_EXT);
    signed(p, "ca", "client", CLIENT_EXT);
    ca(p, "rogue-ca");
    signed(p, "rogue-ca", "rogue", CLIENT_EXT);
    let token = private_file(&p.join("token"), "correct-horse-battery-staple-42\n");
    let wrong = private_file(&p.join("wrong"), "not-the-token-at-all-0000\n");
    let s = |name: &str| p.join(name).display().to_string();

    let mut d = Daemon::builder()
        .log("warn")
        .args(&[
            "--token-file",
            &s("token"),
            "--tls-cert",
            &s("server.pem"),
            "--tls-key",
            &s("server.key"),
            "--tls-client-ca",
            &s("ca.pem"),
        ])
        .start();
    let https = d.endpoint.replace("http://", "https://");
    let disk = d.disks().join("a.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let disk_arg = format!("a={}", disk.display());
    let (ca_pem, client_pem, client_key) = (s("ca.pem"), s("client.pem"), s("client.key"));
    let tls: [&str; 8] = ["--endpoint", &https, "--ca", &ca_pem, "--cert", &client_pem, "--key", &client_key];
    let with = |extra: &[&str]| -> Ran { ferryctl(&[&tls[..], extra].concat()) };

    // The right client: token, the CA, a client certificate of the CA.
    let tok = token.display().to_string();
    let out = with(&["--token-file", &tok, "protect", "vm1", "--disk", &disk_arg, "--frequency", "30s"]);
    assert!(out.ok(), "{}", out.text());
    let out = with(&["--token-file", &tok, "--json", "show", "vm1"]);
    assert!(out.ok() && out.stdout.contains("\"vm1\""), "{}", out.text());

    // Refusals, each naming what is wrong, and never the VM's data.
    let wrong_s = wrong.display().to_string();
    let (rogue_pem, rogue_key) = (s("rogue.pem"), s("rogue.key"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![&tls[..], &["list"]].concat(), "Unauthenticated: this ferryd requires a bearer token"),
        (
            vec![&tls[..], &["--token-file", &wrong_s, "list"]].concat(),
            "Unauthenticated: the bearer token is not this ferryd's",
        ),
        // No client certificate, or one of another CA: the TLS handshake fails.
        (vec!["--endpoint", &https, "--ca", &ca_pem, "--token-file", &tok, "list"], "ferryctl: "),
        (
            vec![
                "--endpoint",
                &https,
                "--ca",
                &ca_pem,
                "--cert",
                &rogue_pem,
                "--key",
                &rogue_key,
                "--token-file",
                &tok,
                "list",
            ],
            "ferryctl: ",
        ),
        // Plain HTTP/2 to the TLS port.
        (vec!["--endpoint", &d.endpoint, "--token-file", &tok, "list"], "ferryctl: "),
        // ferryctl's own refusals of flag mixes that cannot work.
        (vec!["--endpoint", &https, "--token-file", &tok, "list"], "an https:// endpoint needs --ca"),
        (vec!["--endpoint", &d.endpoint, "--ca", &ca_pem, "list"], "--ca is for TLS: give an https:// endpoint"),
        (
            vec!["--endpoint", "http://192.0.2.1:50551", "--token-file", &tok, "list"],
            "--token-file over plain http:// to 192.0.2.1 would send the token in clear",
        ),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let out = ferryctl(args);
        assert!(!out.ok() && out.stderr.contains(want), "ferryctl {args:?}: wanted {want:?}, got:\n{}", out.text());
        // Exit codes: 5 not allowed (the token), 3 a refused TLS handshake
        // or plain HTTP/2 to TLS (ferryd unreachable as asked), 1 ferryctl's own refusals.
        let exit = match i {
            0 | 1 => vec![5],
            2..=4 => vec![3, 1],
            _ => vec![1],
        };
        assert!(
            out.status.code().is_some_and(|c| exit.contains(&c)),
            "ferryctl {args:?}: exit {:?}, wanted one of {exit:?}: {}",
            out.status.code(),
            out.text()
        );
        assert!(!out.stdout.contains("vm1"), "ferryctl {args:?} got an answer: {}", out.stdout);
    }

    // A tonic client with the CA and a client certificate: health answers
    // without the token; reflection (v1 and v1alpha) and ferry.v1 need it.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(p.join("ca.pem")).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(p.join("client.pem")).unwrap(),
            std::fs::read(p.join("client.key")).unwrap(),
        ));
    ferry_engine::target::install_tls_provider();
    let channel: Channel =
        Channel::from_shared(https.clone()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: "ferry.v1.Ferry".into() }).await.unwrap();
    assert_eq!(r.into_inner().status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
    use tonic_reflection::pb::v1alpha::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let e = refl.server_reflection_info(tokio_stream::iter(vec![list()])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let bearer: tonic::metadata::MetadataValue<_> = "Bearer correct-horse-battery-staple-42".parse().unwrap();
    let mut req = tonic::Request::new(tokio_stream::iter(vec![list()]));
    req.metadata_mut().insert("authorization", bearer.clone());
    let mut answers = refl.server_reflection_info(req).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(services)) = answer.message_response else {
        panic!("unexpected reflection answer: {answer:?}");
    };
    assert!(services.service.iter().any(|s| s.name == "ferry.v1.Ferry"), "{services:?}");
    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
            ServerReflectionRequest,
        };
        let list = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut v1 = ServerReflectionClient::new(channel.clone());
        let e = v1.server_reflection_info(tokio_stream::iter(vec![list.clone()])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "reflection v1 too: {e:?}");
        let mut req = tonic::Request::new(tokio_stream::iter(vec![list]));
        req.metadata_mut().insert("authorization", bearer.clone());
        assert!(v1.server_reflection_info(req).await.unwrap().into_inner().message().await.unwrap().is_some());
    }
    let mut c = ferry_proto::v1::ferry_client::FerryClient::new(channel);
    let e = c.list_vms(ferry_proto::v1::ListVmsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut req = tonic::Request::new(ferry_proto::v1::ListVmsRequest {});
    req.metadata_mut().insert("authorization", bearer);
    assert_eq!(c.list_vms(req).await.unwrap().into_inner().vms.len(), 1);
    d.stop();
}

/// ferryd refuses, before it serves anything, a network address without a
/// token and TLS, and a token file other users can read; each refusal
/// names the flag.
#[test]
fn ferryd_refuses_an_open_network_address_and_a_readable_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "correct-horse-battery-staple-42").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("data");
    let token_s = token.display().to_string();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").unwrap();
    let junk_s = junk.display().to_string();
    for (args, want) in [
        (vec!["--listen", "0.0.0.0:0"], "--listen 0.0.0.0:0 is not a loopback address"),
        (vec!["--listen", "127.0.0.1:0", "--token-file", &token_s], "chmod 600"),
        (vec!["--listen", "127.0.0.1:0", "--tls-cert", &junk_s, "--tls-key", &junk_s], "--tls-cert/--tls-key"),
    ] {
        let mut cmd = Command::new(&binaries().ferryd);
        cmd.arg("--data-dir").arg(&data).args(&args).args(["--nbd-socket"]).arg(dir.path().join("nbd.sock"));
        let out = run(&mut cmd, Duration::from_secs(60));
        assert!(!out.ok() && out.stderr.contains(want), "ferryd {args:?}: wanted {want:?}, got:\n{}", out.text());
        assert!(!data.join("state.redb").exists() && !dir.path().join("nbd.sock").exists(), "{args:?}: started anyway");
    }
}

/// `ferryctl list | head -0`: the pipe is closed before ferryctl writes;
/// it ends quietly (exit 0, no panic), and a dropped connection to ferryd
/// is still an error with a message, not a death by SIGPIPE.
#[test]
fn ferryctl_ends_quietly_when_its_output_pipe_is_closed() {
    let d = Daemon::builder().log("warn").start();
    let mut cmd = Command::new(&binaries().ferryctl);
    cmd.args(["--endpoint", &d.endpoint, "list"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take()); // the reader is gone before ferryctl writes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
