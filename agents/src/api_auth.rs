//! Who may call ferryd's gRPC API: a bearer token, TLS, and client
//! certificates.
//!
//! The API protects and exports disks and writes failovers: whoever can
//! call it can read every disk under the disk roots. So:
//!
//! - **Token** (`--token-file FILE`): every RPC of `ferry.v1` and of server
//!   reflection must carry `authorization: Bearer <token>`, or gets
//!   `Unauthenticated`. Health does not (load balancers and service
//!   managers probe it without secrets; it reveals only serving or not).
//!   The token is compared in constant time. The file must not be readable
//!   by other users (as ssh treats private keys): a token others can read
//!   protects nothing.
//! - **TLS** (`--tls-cert FILE --tls-key FILE`, PEM): rustls with ring, the
//!   tree's one TLS stack. With `--tls-client-ca FILE` every client must
//!   present a certificate signed by that CA (mutual TLS); the handshake
//!   refuses others before any RPC.
//! - **Listen address**: ferryd refuses a non-loopback `--listen` unless
//!   both a token and TLS are configured, since a token sent in clear over
//!   a network is no secret.

use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Shortest token accepted: a secret, not a password.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (a header value), and the most read of its file.
pub const MAX_TOKEN_LEN: usize = 1024;
const MAX_TOKEN_FILE: u64 = 4096;

/// Reads a bearer token from `path` (`flag` names it in errors): trimmed,
/// at least [`MIN_TOKEN_LEN`] visible ASCII characters, from a file that
/// only its owner may read or write.
pub fn read_token(flag: &str, path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    // One open, following no symlink, and never blocking on a FIFO; then
    // the checks on what was opened.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("{flag} {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{flag} {}: not a regular file", path.display());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        anyhow::bail!("{flag} {}: owned by uid {}, not by this user or root", path.display(), meta.uid());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "{flag} {}: other users may read or write it (mode {mode:03o}); make it private: chmod 600 {}",
            path.display(),
            path.display()
        );
    }
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE)
        .read_to_string(&mut text)
        .with_context(|| format!("{flag} {}: not a text file", path.display()))?;
    let token = text.trim();
    if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "{flag} {}: a token is {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} visible ASCII characters without spaces \
             (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// The interceptor in front of every service but health: passes a request
/// with the right bearer token, or every request when no token is set.
#[derive(Clone)]
pub struct TokenCheck {
    expected: Option<Arc<[u8]>>,
}

impl TokenCheck {
    pub fn new(token: Option<String>) -> Self {
        TokenCheck { expected: token.map(|t| Arc::from(t.into_bytes())) }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        let given = req.metadata().get("authorization").map(|v| v.as_bytes());
        match given.and_then(|v| v.strip_prefix(b"Bearer ")) {
            Some(token) if constant_time_eq(token, expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the bearer token is not this ferryd's")),
            None => Err(Status::unauthenticated(
                "this ferryd requires a bearer token (`authorization: Bearer <token>`; ferryctl --token-file)",
            )),
        }
    }
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Time a gRPC client has for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS settings from `--tls-cert`, `--tls-key` and `--tls-client-ca`:
/// none, or a server certificate with its key, optionally a CA for client
/// certificates. An error names the flag and the file.
pub fn server_tls(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    let read = |flag: &str, p: &Path| std::fs::read(p).with_context(|| format!("{flag} {}", p.display()));
    let (cert, key) = match (cert, key) {
        (None, None) if client_ca.is_some() => anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key"),
        (None, None) => return Ok(None),
        (Some(_), None) => anyhow::bail!("--tls-cert needs --tls-key (the certificate's private key)"),
        (None, Some(_)) => anyhow::bail!("--tls-key needs --tls-cert"),
        (Some(c), Some(k)) => (c, k),
    };
    let (cert_pem, key_pem) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
    // A client gets as long for its TLS handshake as an NBD client for its.
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)).timeout(HANDSHAKE_TIMEOUT);
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("--tls-client-ca", ca)?));
    }
    Ok(Some(tls))
}

/// Refuses a non-loopback gRPC address unless a token and TLS guard it.
pub fn check_listen(addr: &SocketAddr, token: bool, tls: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || (token && tls) {
        return Ok(());
    }
    anyhow::bail!(
        "--listen {addr} is not a loopback address: listening on a network needs --token-file and \
         --tls-cert/--tls-key (anyone who can call the API can read every protected disk)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let mut check = TokenCheck::new(Some("s3cret-token-0123456789".into()));
        let cases = [
            (Some("Bearer s3cret-token-0123456789"), None),
            (None, Some("requires a bearer token")),
            (Some("Bearer s3cret-token-012345678"), Some("not this ferryd's")),
            (Some("Bearer s3cret-token-0123456789x"), Some("not this ferryd's")),
            (Some("bearer s3cret-token-0123456789"), Some("requires a bearer token")),
            (Some("s3cret-token-0123456789"), Some("requires a bearer token")),
        ];
        for (header, refusal) in cases {
            match (check.call(with_auth(header)), refusal) {
                (Ok(_), None) => {}
                (Err(s), Some(why)) => {
                    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{header:?}");
                    assert!(s.message().contains(why), "{header:?}: {}", s.message());
                }
                (r, want) => panic!("{header:?}: got {:?}, wanted refusal {want:?}", r.map(|_| ())),
            }
        }
        // No token configured: everything passes.
        assert!(TokenCheck::new(None).call(with_auth(None)).is_ok());
    }

    #[test]
    fn token_files_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        assert_eq!(
            read_token("--token-file", &write("ok", "abcdefghijklmnop0123\n", 0o600)).unwrap(),
            "abcdefghijklmnop0123"
        );
        for (name, text, mode, why) in [
            ("open", "abcdefghijklmnop0123", 0o644, "chmod 600"),
            ("group", "abcdefghijklmnop0123", 0o640, "chmod 600"),
            ("short", "abc", 0o600, "16 to 1024"),
            ("spaces", "abcdefgh ijklmnop0123", 0o600, "without spaces"),
            ("empty", "\n", 0o600, "16 to 1024"),
        ] {
            let e = read_token("--token-file", &write(name, text, mode)).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--token-file") && e.contains(name), "{name}: {e}");
        }
        let e = read_token("--token-file", &dir.path().join("missing")).unwrap_err();
        assert!(format!("{e:#}").contains("missing"), "{e:#}");
        // A symlink to a private token is not followed; a folder is no file.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("ok"), &link).unwrap();
        assert!(read_token("--token-file", &link).is_err());
        let e = read_token("--token-file", dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn tls_flags_come_in_pairs_and_networks_need_token_and_tls() {
        let p = Path::new("/nonexistent/x.pem");
        for (cert, key, ca, why) in [
            (Some(p), None, None, "--tls-cert needs --tls-key"),
            (None, Some(p), None, "--tls-key needs --tls-cert"),
            (None, None, Some(p), "--tls-client-ca needs"),
            (Some(p), Some(p), None, "--tls-cert /nonexistent/x.pem"),
        ] {
            let e = format!("{:#}", server_tls(cert, key, ca).unwrap_err());
            assert!(e.contains(why), "{e}");
        }
        assert!(server_tls(None, None, None).unwrap().is_none());
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let net: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(check_listen(&lo, false, false).is_ok());
        assert!(check_listen(&net, true, true).is_ok());
        for (token, tls) in [(false, false), (true, false), (false, true)] {
            let e = check_listen(&net, token, tls).unwrap_err().to_string();
            assert!(e.contains("--token-file") && e.contains("0.0.0.0:1"), "{e}");
        }
    }
}
