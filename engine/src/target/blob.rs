//! Blob store targets (Azure Blob, S3 and S3-compatible stores) through the
//! `object_store` crate: [`BlobTarget`] adapts an `ObjectStore` to
//! [`TargetStore`].
//!
//! Configuration: the builders start from the standard environment
//! variables (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! `AZURE_STORAGE_USE_EMULATOR`, `AZURE_STORAGE_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
//! ...); [`BlobOptions`] (object_store's own configuration keys, e.g.
//! `azure_storage_account_key` or `aws_endpoint`) override them. Option
//! values are never printed: `Debug` shows the keys only.
//!
//! Durability and atomicity: a put is one PUT request, or above
//! [`MULTIPART_THRESHOLD`] a multipart upload that becomes visible only
//! when it completes, so a reader sees the old or the new object whole,
//! as the trait requires; the store has it durably when the request
//! returns. Integrity is end to end in our own bytes (every bundle's
//! checksum is in its manifest, verified before it is decompressed), so
//! the backend stays a plain byte store.
//!
//! Errors are classified here, where the HTTP status is known: a missing
//! object is `NeedsResync` (the replica lost a piece), throttling (429),
//! timeouts, 5xx and network failures are `Recoverable` (after
//! object_store's own short retries), 401/403 are `Unauthenticated`
//! (non-recoverable: `Critical` until an operator acts), and a missing
//! container or bucket is an operator error, never a resync.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer, AwsCredential};
use object_store::azure::{AzureAccessKey, AzureAuthorizer, AzureConfigKey, AzureCredential, MicrosoftAzureBuilder};
use object_store::client::{HttpConnector, HttpRequest, HttpRequestBody, ReqwestConnector};
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};

use super::url::TargetUrl;
use super::{check_key, missing, TargetStore};
use crate::error::{Error, ErrorClass, Result};

/// Objects larger than this go up as a multipart upload.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
pub const MULTIPART_PART: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
const MULTIPART_IN_FLIGHT: usize = 4;

/// Whole-request timeout when neither the environment nor the options set
/// one: a 64 MiB object at 10 Mbit/s takes about a minute.
const DEFAULT_TIMEOUT: &str = "10m";
const DEFAULT_CONNECT_TIMEOUT: &str = "10s";

/// object_store configuration keys and values for a blob target, applied
/// over the environment. Secrets may be among the values: `Debug` and
/// errors show keys only.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlobOptions(pub BTreeMap<String, String>);

impl fmt::Debug for BlobOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl BlobOptions {
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.0.insert(key.to_string(), value.into());
        self
    }
}

/// Installs ring as the process's rustls provider (the tree's one TLS
/// stack) before any HTTP client or TLS server is built; harmless if one
/// is installed.
pub fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A blob store target.
pub struct BlobTarget {
    store: Arc<dyn ObjectStore>,
    /// The URL, which carries no secret ([`TargetUrl`]).
    url: String,
}

impl fmt::Debug for BlobTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobTarget({})", self.url)
    }
}

/// What the container/bucket creation needs, read back from the builder.
enum Creator {
    Azure {
        endpoint: String,
        account: String,
        key: String,
        container: String,
    },
    S3 {
        endpoint: String,
        region: String,
        bucket: String,
        credential: AwsCredential,
    },
    /// No static key to sign with (SAS, token or instance credentials): the
    /// container must exist; a missing one is reported at first use.
    Cannot,
}

fn config_error(url: &TargetUrl, e: object_store::Error) -> Error {
    // object_store's builder errors name the key, never a secret value.
    Error::invalid("target configuration", format!("{url}: {e}"))
}

fn unknown_option(url: &TargetUrl, key: &str) -> Error {
    Error::invalid("target option", format!("{url}: unknown option {key:?} (object_store configuration keys)"))
}

impl BlobTarget {
    /// Opens the store `url` names; with `create`, a missing container or
    /// bucket is created first (when a static key is configured to sign
    /// the request with).
    pub async fn open(url: &TargetUrl, options: &BlobOptions, create: bool) -> Result<BlobTarget> {
        install_tls_provider();
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            // The engine retries on its own schedule (minutes): keep these short.
            max_retries: 3,
            retry_timeout: Duration::from_secs(60),
        };
        let (store, creator): (Arc<dyn ObjectStore>, Creator) = match url {
            TargetUrl::Local(_) => return Err(Error::invalid("target URL", format!("{url} is a local folder"))),
            TargetUrl::Azure { container, .. } => {
                let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container);
                for (key, default) in [("timeout", DEFAULT_TIMEOUT), ("connect_timeout", DEFAULT_CONNECT_TIMEOUT)] {
                    let k = AzureConfigKey::Client(key.parse().expect("a client key"));
                    if b.get_config_value(&k).is_none() {
                        b = b.with_config(k, default);
                    }
                }
                for (k, v) in &options.0 {
                    let key: AzureConfigKey = k.parse().map_err(|_| unknown_option(url, k))?;
                    b = b.with_config(key, v);
                }
                let creator = azure_creator(&b, container);
                (Arc::new(b.with_retry(retry).build().map_err(|e| config_error(url, e))?), creator)
            }
            TargetUrl::S3 { bucket, .. } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                for (key, default) in [("timeout", DEFAULT_TIMEOUT), ("connect_timeout", DEFAULT_CONNECT_TIMEOUT)] {
                    let k = AmazonS3ConfigKey::Client(key.parse().expect("a client key"));
                    if b.get_config_value(&k).is_none() {
                        b = b.with_config(k, default);
                    }
                }
                for (k, v) in &options.0 {
                    let key: AmazonS3ConfigKey = k.parse().map_err(|_| unknown_option(url, k))?;
                    b = b.with_config(key, v);
                }
                let creator = s3_creator(&b, bucket);
                (Arc::new(b.with_retry(retry).build().map_err(|e| config_error(url, e))?), creator)
            }
        };
        if create {
            if let Err(e) = create_container(&creator).await {
                let e = classify("create the container or bucket of", &url.to_string(), e);
                // Credentials that may use objects but not create containers
                // (403 on the create) are fine if the container is there; a
                // network blip is reported by the first real request instead.
                let there = store.list_with_delimiter(None).await.is_ok();
                match e.class() {
                    _ if there => tracing::debug!(target = %url, error = %e, "container not created; it exists"),
                    ErrorClass::Recoverable => {
                        tracing::warn!(target = %url, error = %e, "could not check or create the container; going on")
                    }
                    _ => return Err(e),
                }
            }
        }
        let (_, _, prefix) = url.blob().expect("a blob URL");
        let store: Arc<dyn ObjectStore> = match prefix {
            Some(p) => Arc::new(PrefixStore::new(store, p)),
            None => store,
        };
        Ok(BlobTarget { store, url: url.to_string() })
    }
}

fn azure_creator(b: &MicrosoftAzureBuilder, container: &str) -> Creator {
    let get = |k: AzureConfigKey| b.get_config_value(&k).filter(|v| !v.is_empty());
    let emulator = get(AzureConfigKey::UseEmulator).is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    let account = get(AzureConfigKey::AccountName).or_else(|| emulator.then(|| "devstoreaccount1".to_string()));
    let key = get(AzureConfigKey::AccessKey).or_else(|| emulator.then(|| AZURITE_KEY.to_string()));
    let (Some(account), Some(key)) = (account, key) else { return Creator::Cannot };
    let endpoint = match get(AzureConfigKey::Endpoint) {
        Some(e) => e,
        None if emulator => {
            let base = std::env::var("AZURITE_BLOB_STORAGE_URL").unwrap_or_else(|_| "http://127.0.0.1:10000".into());
            format!("{}/{account}", base.trim_end_matches('/'))
        }
        None => format!("https://{account}.blob.core.windows.net"),
    };
    Creator::Azure { endpoint, account, key, container: container.to_string() }
}

fn s3_creator(b: &AmazonS3Builder, bucket: &str) -> Creator {
    let get = |k: AmazonS3ConfigKey| b.get_config_value(&k).filter(|v| !v.is_empty());
    let (Some(key_id), Some(secret_key)) =
        (get(AmazonS3ConfigKey::AccessKeyId), get(AmazonS3ConfigKey::SecretAccessKey))
    else {
        return Creator::Cannot;
    };
    let region = get(AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
    let endpoint = get(AmazonS3ConfigKey::Endpoint).unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let credential = AwsCredential { key_id, secret_key, token: get(AmazonS3ConfigKey::Token) };
    Creator::S3 { endpoint, region, bucket: bucket.to_string(), credential }
}

/// The emulator's well-known account key (public, documented by Microsoft).
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn generic(store: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic { store, source: Box::new(e) }
}

/// Creates the container or bucket if it is missing. object_store has no
/// call for it, so this is one request signed with object_store's own
/// signers: Azure `PUT {endpoint}/{container}?restype=container` (SharedKey),
/// S3 `PUT {endpoint}/{bucket}` (SigV4). "Already there" is success.
async fn create_container(creator: &Creator) -> object_store::Result<()> {
    let client_for = |endpoint: &str| {
        ReqwestConnector::default().connect(&ClientOptions::new().with_allow_http(endpoint.starts_with("http://")))
    };
    let (store, what, status, body) = match creator {
        Creator::Cannot => return Ok(()),
        Creator::Azure { endpoint, account, key, container } => {
            let client = client_for(endpoint)?;
            let url = format!("{}/{container}?restype=container", endpoint.trim_end_matches('/'));
            let mut req: HttpRequest = http::Request::builder()
                .method(http::Method::PUT)
                .uri(url.as_str())
                .header(http::header::CONTENT_LENGTH, "0")
                .body(HttpRequestBody::from(Bytes::new()))
                .map_err(|e| generic("MicrosoftAzure", e))?;
            let credential = AzureCredential::AccessKey(AzureAccessKey::try_new(key)?);
            AzureAuthorizer::new(&credential, account).try_authorize(&mut req)?;
            let resp = client.execute(req).await.map_err(|e| generic("MicrosoftAzure", e))?;
            let status = resp.status().as_u16();
            // 201 created, 409 ContainerAlreadyExists.
            if status == 201 || status == 409 {
                return Ok(());
            }
            (
                "MicrosoftAzure",
                format!("container {container}"),
                status,
                resp.into_body().bytes().await.unwrap_or_default(),
            )
        }
        Creator::S3 { endpoint, region, bucket, credential } => {
            let client = client_for(endpoint)?;
            let body = if region == "us-east-1" {
                Bytes::new()
            } else {
                Bytes::from(format!(
                    "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                     <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
                ))
            };
            let mut req: HttpRequest = http::Request::builder()
                .method(http::Method::PUT)
                .uri(format!("{}/{bucket}", endpoint.trim_end_matches('/')).as_str())
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(HttpRequestBody::from(body))
                .map_err(|e| generic("S3", e))?;
            AwsAuthorizer::new(credential, "s3", region).try_authorize(&mut req, None)?;
            let resp = client.execute(req).await.map_err(|e| generic("S3", e))?;
            let status = resp.status().as_u16();
            // 200 created (or already ours in us-east-1), 409 BucketAlreadyOwnedByYou.
            if status == 200 || status == 409 {
                return Ok(());
            }
            ("S3", format!("bucket {bucket}"), status, resp.into_body().bytes().await.unwrap_or_default())
        }
    };
    let text = format!("creating {what}: HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(512)]));
    Err(match status {
        401 => object_store::Error::Unauthenticated { path: what, source: text.into() },
        403 => object_store::Error::PermissionDenied { path: what, source: text.into() },
        _ => generic(store, std::io::Error::other(text)),
    })
}

fn store_path(key: &str) -> Result<StorePath> {
    check_key(key)?;
    StorePath::parse(key).map_err(|e| Error::invalid("object key", format!("{key:?}: {e}")))
}

/// Turns an object_store error into ours, with its class ([module docs](self)).
fn classify(op: &str, key: &str, e: object_store::Error) -> Error {
    use object_store::Error as E;
    let text = e.to_string();
    match &e {
        E::NotFound { .. } if text.contains("NoSuchBucket") || text.contains("ContainerNotFound") => {
            Error::FailedPrecondition(format!("target {op} {key}: the container or bucket does not exist: {text}"))
        }
        // Only a read says an object is missing; a 404 while putting (S3's
        // NoSuchUpload of a multipart upload) is a failed put, retried.
        E::NotFound { .. } if op == "get" => missing(key),
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => Error::Unauthenticated(format!("{op} {key}: {text}")),
        _ if DENIED.iter().any(|c| text.contains(c)) => Error::Unauthenticated(format!("{op} {key}: {text}")),
        _ => Error::Io {
            context: format!("target {op} {key}"),
            class: class_of(&e, &text),
            source: std::io::Error::other(e),
        },
    }
}

/// Error codes in a response body that mean "not allowed", for requests
/// whose status object_store does not map (a batch delete's per-key results).
const DENIED: [&str; 4] = ["AccessDenied", "AuthorizationFailure", "AuthorizationPermissionMismatch", "(code: 403)"];

/// Error codes stores send with a 4xx (or a conflict) for what a retry cures.
const TRANSIENT: [&str; 6] =
    ["RequestTimeout", "IncompleteBody", "OperationAborted", "SlowDown", "ServerBusy", "OperationTimedOut"];

fn class_of(e: &object_store::Error, text: &str) -> ErrorClass {
    use object_store::Error as E;
    if TRANSIENT.iter().any(|c| text.contains(c)) {
        return ErrorClass::Recoverable;
    }
    if matches!(
        e,
        E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::UnknownConfigurationKey { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
    ) {
        return ErrorClass::NonRecoverable;
    }
    // Network: refused, reset, timed out, a body cut short: later may work.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<object_store::client::HttpError>().is_some() {
            return ErrorClass::Recoverable;
        }
        source = s.source();
    }
    match http_status(text) {
        Some(s) if s == 408 || s == 429 || s >= 500 => ErrorClass::Recoverable,
        Some(s) if (400..500).contains(&s) => ErrorClass::NonRecoverable,
        _ => ErrorClass::Recoverable,
    }
}

/// The status object_store puts in its message ("... status code: 503 ...").
fn http_status(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

impl TargetStore for BlobTarget {
    fn put<'a>(&'a self, key: &'a str, data: Bytes) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let path = store_path(key)?;
            if data.len() <= MULTIPART_THRESHOLD {
                let put = self.store.put_opts(&path, PutPayload::from(data), PutOptions::default()).await;
                return put.map(|_| ()).map_err(|e| classify("put", key, e));
            }
            let upload = self
                .store
                .put_multipart_opts(&path, PutMultipartOptions::default())
                .await
                .map_err(|e| classify("put (multipart start)", key, e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART);
            let mut at = 0;
            while at < data.len() {
                if let Err(e) = w.wait_for_capacity(MULTIPART_IN_FLIGHT).await {
                    let _ = w.abort().await;
                    return Err(classify("put (multipart part)", key, e));
                }
                let end = (at + MULTIPART_PART).min(data.len());
                w.put(data.slice(at..end));
                at = end;
            }
            // finish aborts the upload itself if a part failed.
            w.finish().await.map(|_| ()).map_err(|e| classify("put (multipart)", key, e))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            let path = store_path(key)?;
            let got = self.store.get_opts(&path, GetOptions::default()).await.map_err(|e| classify("get", key, e))?;
            got.bytes().await.map_err(|e| classify("get", key, e))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            // object_store lists by whole segments; the trait by text: list
            // the deepest folder the prefix names, then filter.
            let dir = prefix.rfind('/').map_or("", |i| &prefix[..i]);
            let dir = if dir.is_empty() { None } else { Some(store_path(dir)?) };
            let mut keys: Vec<String> = self
                .store
                .list(dir.as_ref())
                .map_ok(|m| m.location.as_ref().to_string())
                .try_collect()
                .await
                .map_err(|e| classify("list", prefix, e))?;
            keys.retain(|k| k.starts_with(prefix));
            keys.sort();
            Ok(keys)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let path = store_path(key)?;
            let mut deleted = self.store.delete_stream(futures::stream::iter([Ok(path)]).boxed());
            match deleted.try_next().await {
                Ok(_) => Ok(()),
                Err(e @ object_store::Error::NotFound { .. }) => {
                    // Deleting a missing object is fine; a missing container is not.
                    let text = e.to_string();
                    if text.contains("NoSuchBucket") || text.contains("ContainerNotFound") {
                        return Err(classify("delete", key, e));
                    }
                    Ok(())
                }
                Err(e) => Err(classify("delete", key, e)),
            }
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_never_show_their_values() {
        let o = BlobOptions::default().with("azure_storage_account_key", "s3cr3t").with("aws_endpoint", "http://x");
        let shown = format!("{o:?}");
        assert!(shown.contains("azure_storage_account_key") && !shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn statuses_in_object_store_messages_are_classified() {
        let table = [
            ("Server returned non-2xx status code: 503 Service Unavailable: slow down", ErrorClass::Recoverable),
            ("Server returned non-2xx status code: 429 Too Many Requests", ErrorClass::Recoverable),
            ("Server returned non-2xx status code: 408 Request Timeout", ErrorClass::Recoverable),
            ("Server returned non-2xx status code: 400 Bad Request: InvalidArgument", ErrorClass::NonRecoverable),
            ("Server returned non-2xx status code: 413 Payload Too Large", ErrorClass::NonRecoverable),
            (
                "Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>",
                ErrorClass::Recoverable,
            ),
            (
                "Server returned non-2xx status code: 409 Conflict: <Code>OperationAborted</Code>",
                ErrorClass::Recoverable,
            ),
            ("something without a status", ErrorClass::Recoverable),
        ];
        for (text, want) in table {
            let e = generic("S3", std::io::Error::other(text));
            assert_eq!(class_of(&e, &e.to_string()), want, "{text}");
        }
        let denied = object_store::Error::PermissionDenied { path: "k".into(), source: "403".into() };
        assert_eq!(classify("put", "k", denied).class(), ErrorClass::NonRecoverable);
        let gone = object_store::Error::NotFound { path: "k".into(), source: "NoSuchKey".into() };
        assert_eq!(classify("get", "k", gone).class(), ErrorClass::NeedsResync);
        let upload_gone = object_store::Error::NotFound { path: "k".into(), source: "NoSuchUpload".into() };
        assert_eq!(classify("put (multipart)", "k", upload_gone).class(), ErrorClass::Recoverable);
        let batch = generic("S3", std::io::Error::other("DeleteFailed: k: AccessDenied: Access Denied"));
        assert_eq!(classify("delete", "k", batch).kind(), crate::error::ErrorKind::Unauthenticated);
        let no_bucket = object_store::Error::NotFound { path: "k".into(), source: "NoSuchBucket".into() };
        let e = classify("get", "k", no_bucket);
        assert_eq!((e.class(), e.kind()), (ErrorClass::NonRecoverable, crate::error::ErrorKind::FailedPrecondition));
    }

    #[tokio::test]
    async fn unknown_options_and_local_urls_are_refused_by_name() {
        let url: TargetUrl = "s3://bucket".parse().unwrap();
        let e = BlobTarget::open(&url, &BlobOptions::default().with("aws_no_such_key", "v"), false).await.unwrap_err();
        assert!(e.to_string().contains("aws_no_such_key") && !e.to_string().contains("\"v\""), "{e}");
        let e = BlobTarget::open(&"/srv".parse().unwrap(), &BlobOptions::default(), false).await.unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
    }
}
