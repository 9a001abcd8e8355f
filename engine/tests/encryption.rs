//! Encryption at rest through the engine: guest data never reaches the
//! store in clear, restores verify every object (a flipped byte fails
//! naming the object), a wrong key or a missing one is a clear
//! non-recoverable error, and a plain replica is refused by an engine with
//! a key. Restores here read the store alone, as another machine would.

mod support;

use std::path::Path;
use std::sync::Arc;

use ferry_engine::target::sealed::EncryptionKey;
use ferry_engine::target::{self, LocalTarget, Target};
use ferry_engine::ErrorClass;
use support::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn keyed(dir: &Path, key: u8) -> ferry_engine::EngineConfig {
    let mut c = config(dir);
    c.encryption_key = Some(EncryptionKey::from_bytes([key; 32]));
    c
}

/// Every file under `dir`.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// The store as a restore on another machine opens it: the whole store,
/// the host id and the key.
fn store_for(dir: &Path, key: Option<u8>) -> Target {
    let store: Target = Arc::new(LocalTarget::open(dir.join("data").join("target")).unwrap());
    let key = key.map(|k| EncryptionKey::from_bytes([k; 32]));
    target::for_host(store, key.as_ref(), HOST_ID).unwrap()
}

async fn restore(store: &Target, generation: u64, seq: u64, out: &Path) -> ferry_engine::Result<()> {
    restore_from(store, generation, seq, out, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_encrypted_replica_hides_guest_data_and_restores_only_with_its_key_and_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", 4 * MIB, 1);
    let engine = open_engine(keyed(tmp.path(), 7)).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    assert!(engine.target_description().contains("(encrypted)"), "{}", engine.target_description());
    // A known random 64 KiB block, written as a guest would.
    let block = random_bytes(64 * KIB as usize, 99);
    engine.write("vm", "a", MIB + 4096, block.clone()).await.unwrap();
    let seq = replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
    drop(engine);

    // Neither the block (any 256-byte window of it) nor the base copy's bytes are in any object.
    let disk = std::fs::read(&a).unwrap();
    let objects = files(&tmp.path().join("data").join("target"));
    assert!(objects.len() >= 3, "{objects:?}");
    // Indexed by their first 16 bytes, so each object is scanned once.
    let needles: std::collections::HashMap<&[u8], &[u8]> =
        block.chunks(256).chain(disk.chunks(64 * KIB as usize).map(|c| &c[..256])).map(|n| (&n[..16], n)).collect();
    for path in &objects {
        let bytes = std::fs::read(path).unwrap();
        for (i, w) in bytes.windows(16).enumerate() {
            if let Some(n) = needles.get(w) {
                assert!(!bytes[i..].starts_with(n), "guest bytes in clear in {}", path.display());
            }
        }
        assert!(!bytes.windows(4).any(|w| w == b"\"vm\""), "a manifest in clear: {}", path.display());
    }

    // From the store alone, with the key: byte-identical.
    let out = tmp.path().join("elsewhere");
    restore(&store_for(tmp.path(), Some(7)), generation, seq, &out).await.unwrap();
    assert!(std::fs::read(out.join("a.img")).unwrap() == disk, "restored image differs");

    // A wrong key, and no key: non-recoverable, saying which.
    let e = restore(&store_for(tmp.path(), Some(8)), generation, seq, &tmp.path().join("w")).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
    assert!(e.to_string().contains("wrong encryption key"), "{e}");
    let e = restore(&store_for(tmp.path(), None), generation, seq, &tmp.path().join("n")).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
    assert!(e.to_string().contains("is encrypted"), "{e}");

    // One flipped byte in one bundle: the restore fails naming that object.
    let bundle = objects.iter().find(|p| p.to_string_lossy().contains("/disks/")).expect("a bundle").clone();
    let mut bytes = std::fs::read(&bundle).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&bundle, &bytes).unwrap();
    let e = restore(&store_for(tmp.path(), Some(7)), generation, seq, &tmp.path().join("t")).await.unwrap_err();
    let name = bundle.strip_prefix(tmp.path().join("data").join("target")).unwrap().to_string_lossy().into_owned();
    assert!(e.to_string().contains(&name), "the error does not name {name}: {e}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plain_replica_is_refused_by_an_engine_with_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 2);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    let seq = replicate(&engine, "vm").await;
    engine.shutdown().await.unwrap();
    drop(engine);
    let e = restore(&store_for(tmp.path(), Some(7)), generation, seq, &tmp.path().join("o")).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
    assert!(e.to_string().contains("written without encryption"), "{e}");
    restore(&store_for(tmp.path(), None), generation, seq, &tmp.path().join("ok")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_of_an_encrypted_replica_reveal_only_ids_and_a_restore_still_finds_the_vm_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = random_disk(tmp.path(), "ledger", MIB, 5);
    let engine = open_engine(keyed(tmp.path(), 7)).await.unwrap();
    protect(&engine, "payroll-db", &[&disk]).await;
    engine.write("payroll-db", "ledger", 0, random_bytes(4096, 6)).await.unwrap();
    let seq = replicate(&engine, "payroll-db").await;
    engine.shutdown().await.unwrap();
    drop(engine);
    let root = tmp.path().join("data").join("target");
    let keys: Vec<String> =
        files(&root).iter().map(|p| p.strip_prefix(&root).unwrap().to_string_lossy().into_owned()).collect();
    assert!(keys.len() >= 3, "{keys:?}");
    for k in &keys {
        assert!(!k.contains("payroll") && !k.contains("ledger"), "a name in a key: {k}");
    }
    // A restore with the key finds the VM by its name.
    let points = ferry_engine::restore::stored_points(&store_for(tmp.path(), Some(7)), "payroll-db").await.unwrap();
    assert_eq!(points.last().map(|p| (p.seq, p.disks.clone())), Some((seq, vec!["ledger".to_string()])));
    // Without it, or with another, the name finds nothing: the error says why.
    let e = ferry_engine::restore::stored_points(&store_for(tmp.path(), Some(8)), "payroll-db").await.unwrap_err();
    assert!(e.to_string().contains("wrong encryption key"), "{e}");
    assert_eq!(e.class(), ErrorClass::NonRecoverable);
    let e = ferry_engine::restore::stored_points(&store_for(tmp.path(), None), "payroll-db").await.unwrap_err();
    assert!(e.to_string().contains("is encrypted"), "{e}");
    // And a VM that is not there is just not found.
    let e = ferry_engine::restore::stored_points(&store_for(tmp.path(), Some(7)), "other").await.unwrap_err();
    assert!(e.to_string().contains("other") && e.to_string().contains("not found"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_refuses_to_go_on_with_a_replica_under_another_key_and_says_which() {
    async fn reopen(dir: &Path, key: Option<u8>) -> (ferry_engine::Engine, ferry_engine::VmInfo) {
        let c = match key {
            Some(k) => keyed(dir, k),
            None => config(dir),
        };
        let engine = open_engine(c).await.unwrap();
        let info = engine.vm("vm").await.unwrap();
        (engine, info)
    }
    let tmp = tempfile::tempdir().unwrap();
    let a = random_disk(tmp.path(), "a", MIB, 3);
    let engine = open_engine(keyed(tmp.path(), 7)).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    engine.shutdown().await.unwrap();
    drop(engine);
    for (key, says) in [(Some(8), "wrong encryption key"), (None, "is encrypted")] {
        let (engine, info) = reopen(tmp.path(), key).await;
        assert_eq!(info.state, ferry_engine::lifecycle::VmState::Critical, "{info:?}");
        assert!(info.reason.as_deref().is_some_and(|r| r.contains(says)), "{key:?}: {:?}", info.reason);
        assert!(engine.replicate_now("vm").await.is_err(), "no cycle under the wrong key");
        engine.shutdown().await.unwrap();
    }
    // With its key again: the operator resumes it and it goes on.
    let (engine, _) = reopen(tmp.path(), Some(7)).await;
    engine.resume("vm").await.unwrap();
    engine.write("vm", "a", 0, random_bytes(4096, 4)).await.unwrap();
    replicate(&engine, "vm").await;
    assert_latest_equals_sources(&engine, "vm", &[&a], &tmp.path().join("out")).await;
    engine.shutdown().await.unwrap();
    drop(engine);

    // A plain replica, then a key.
    let plain = tempfile::tempdir().unwrap();
    let b = random_disk(plain.path(), "b", MIB, 5);
    let engine = open_engine(config(plain.path())).await.unwrap();
    protect(&engine, "vm", &[&b]).await;
    engine.shutdown().await.unwrap();
    drop(engine);
    let (engine, info) = reopen(plain.path(), Some(7)).await;
    assert!(info.reason.as_deref().is_some_and(|r| r.contains("written without encryption")), "{:?}", info.reason);
    engine.shutdown().await.unwrap();
}
