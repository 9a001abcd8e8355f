//! The target contract against every backend: the local folder, Azurite
//! (Azure Blob) and moto (S3), each also through the unreliable wrapper;
//! and what only blob stores have: container creation, prefixes that keep
//! targets apart, multipart uploads, and errors classified from what the
//! server said (wrong key: non-recoverable; server gone: recoverable).
//! The emulators are started here on 127.0.0.1 with free ports
//! (`ferry::harness::blob_servers`).

use std::sync::Arc;

use bytes::Bytes;
use ferry::harness::{BlobKind, BlobServer};
use ferry_engine::target::unreliable::{Faults, UnreliableTarget};
use ferry_engine::target::{contract, BlobOptions, BlobTarget, LocalTarget, Target, TargetStore, TargetUrl};
use ferry_engine::ErrorClass;

fn options(server: &BlobServer) -> BlobOptions {
    server.options().into_iter().fold(BlobOptions::default(), |o, (k, v)| o.with(&k, v))
}

async fn open(server: &BlobServer, container: &str, prefix: Option<&str>) -> BlobTarget {
    let url: TargetUrl = server.url(container, prefix).parse().unwrap();
    BlobTarget::open(&url, &options(server), true).await.unwrap_or_else(|e| panic!("open {url}: {e}"))
}

/// Through the unreliable wrapper with latency and no failures: the
/// wrapper passes every byte and error class through unchanged.
fn wrapped(store: Target) -> Target {
    UnreliableTarget::new(store, Faults { latency_ms: 2, ..Default::default() }).unwrap()
}

async fn contract_on(kind: BlobKind) {
    let server = BlobServer::start(kind);
    let store = open(&server, "ferry-contract", None).await;
    assert!(store.describe().starts_with(&server.url("ferry-contract", None)), "{}", store.describe());
    contract::run_contract(&store).await;
    let store: Target = Arc::new(open(&server, "ferry-wrapped", Some("under/here")).await);
    contract::run_contract(wrapped(store).as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_meets_the_target_contract_plain_and_wrapped() {
    contract_on(BlobKind::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_meets_the_target_contract_plain_and_wrapped() {
    contract_on(BlobKind::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_target_meets_the_contract_wrapped_too() {
    let dir = tempfile::tempdir().unwrap();
    let store: Target = Arc::new(LocalTarget::open(dir.path().join("t")).unwrap());
    contract::run_contract(wrapped(store).as_ref()).await;
}

async fn prefixes_and_large_objects_on(kind: BlobKind) {
    let server = BlobServer::start(kind);
    // Two targets in one (new) container, apart by prefix.
    let a = open(&server, "ferry-shared", Some("site-a")).await;
    let b = open(&server, "ferry-shared", Some("site-b")).await;
    a.put("vms/x/1/k", Bytes::from_static(b"from a")).await.unwrap();
    b.put("vms/x/1/k", Bytes::from_static(b"from b")).await.unwrap();
    assert_eq!(&a.get("vms/x/1/k").await.unwrap()[..], b"from a");
    assert_eq!(&b.get("vms/x/1/k").await.unwrap()[..], b"from b");
    b.delete("vms/x/1/k").await.unwrap();
    assert_eq!(a.list("vms/").await.unwrap(), vec!["vms/x/1/k"]);
    assert!(b.list("vms/").await.unwrap().is_empty());
    // The whole container sees both under their prefixes.
    let all = open(&server, "ferry-shared", None).await;
    assert_eq!(all.list("site-").await.unwrap(), vec!["site-a/vms/x/1/k"]);
    // Opening again (the container exists) is fine.
    open(&server, "ferry-shared", Some("site-a")).await;

    // Above the threshold: a multipart upload, whole on the way back.
    let len = ferry_engine::target::blob::MULTIPART_THRESHOLD + 3 * ferry_engine::target::blob::MULTIPART_PART / 2;
    let big: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    a.put("vms/x/1/big", Bytes::from(big.clone())).await.unwrap();
    assert!(a.get("vms/x/1/big").await.unwrap() == big, "multipart object differs");
    // A multipart put replaces the object whole, like a plain one.
    a.put("vms/x/1/big", Bytes::from_static(b"small now")).await.unwrap();
    assert_eq!(&a.get("vms/x/1/big").await.unwrap()[..], b"small now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_keeps_prefixes_apart_and_takes_multipart_objects() {
    prefixes_and_large_objects_on(BlobKind::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_keeps_prefixes_apart_and_takes_multipart_objects() {
    prefixes_and_large_objects_on(BlobKind::Moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_azure_key_is_non_recoverable_and_names_no_secret() {
    let server = BlobServer::start(BlobKind::Azurite);
    open(&server, "ferry-auth", None).await;
    // A valid base64 key that is not the account's.
    let wrong = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgd3Jvbmcga2V5IHdyb25nIGtleQ==";
    let url: TargetUrl = server.url("ferry-auth", None).parse().unwrap();
    // Creating the container with the wrong key is refused already.
    let e = BlobTarget::open(&url, &options(&server).with("azure_storage_account_key", wrong), true).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
    assert!(!e.to_string().contains(wrong), "the key is printed: {e}");
    // And so is every operation of a target opened without creating.
    let store =
        BlobTarget::open(&url, &options(&server).with("azure_storage_account_key", wrong), false).await.unwrap();
    let e = store.put("vms/a/1/k", Bytes::from_static(b"x")).await.unwrap_err();
    assert_eq!(
        (e.class(), e.kind()),
        (ErrorClass::NonRecoverable, ferry_engine::error::ErrorKind::Unauthenticated),
        "{e}"
    );
    assert!(!e.to_string().contains(wrong), "the key is printed: {e}");
}

async fn gone_and_missing_on(kind: BlobKind) {
    let mut server = BlobServer::start(kind);
    let store = open(&server, "ferry-gone", None).await;
    store.put("vms/a/1/k", Bytes::from_static(b"x")).await.unwrap();
    // A container that was never created is an operator's problem, not a resync.
    let url: TargetUrl = server.url("ferry-never-made", None).parse().unwrap();
    let never = BlobTarget::open(&url, &options(&server), false).await.unwrap();
    let e = never.get("vms/a/1/k").await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    // The server goes away: every operation is recoverable (retry later).
    server.stop();
    for e in [
        store.put("vms/a/1/k2", Bytes::from_static(b"y")).await.unwrap_err(),
        store.get("vms/a/1/k").await.unwrap_err(),
        store.list("vms/").await.unwrap_err(),
    ] {
        assert_eq!(e.class(), ErrorClass::Recoverable, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_gone_is_recoverable_and_a_missing_container_is_not_a_resync() {
    gone_and_missing_on(BlobKind::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_gone_is_recoverable_and_a_missing_bucket_is_not_a_resync() {
    gone_and_missing_on(BlobKind::Moto).await;
}
