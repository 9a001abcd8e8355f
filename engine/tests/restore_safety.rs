//! A restore is safe to point anywhere: planted symlinks are never
//! followed, existing images are not overwritten unless asked, disk names
//! from a tampered manifest never become paths, and restored images are
//! private (0600) whatever the umask.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use ferry_engine::replica::manifest::manifest_key;
use ferry_engine::target::{LocalTarget, Target};
use ferry_engine::ErrorClass;
use support::*;

const MIB: u64 = 1 << 20;

/// A VM with one 1 MiB disk `a`, protected and stopped; (generation, seq, disk bytes).
async fn replica(dir: &Path) -> (u64, u64, Vec<u8>) {
    let a = random_disk(dir, "a", MIB, 4);
    let engine = open_engine(config(dir)).await.unwrap();
    let generation = protect(&engine, "vm", &[&a]).await.generation;
    let seq = replicate(&engine, "vm").await;
    engine.shutdown().await.unwrap();
    (generation, seq, std::fs::read(&a).unwrap())
}

async fn restore(dir: &Path, generation: u64, seq: u64, out: &Path, replace: bool) -> ferry_engine::Result<()> {
    let store: Target = Arc::new(LocalTarget::open(target_root(dir)).unwrap());
    restore_from(&store, generation, seq, out, replace).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_symlinks_are_never_followed_and_images_are_not_overwritten_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let (generation, seq, disk) = replica(tmp.path()).await;
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();

    // A link where the partial image goes: removed, not written through.
    std::os::unix::fs::symlink(&victim, out.join("a.img.partial")).unwrap();
    restore(tmp.path(), generation, seq, &out, false).await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::read(out.join("a.img")).unwrap() == disk);
    assert!(!out.join("a.img.partial").exists());

    // The image is there now: a second restore refuses it and changes nothing.
    std::fs::write(out.join("a.img"), b"mine").unwrap();
    let e = restore(tmp.path(), generation, seq, &out, false).await.unwrap_err();
    assert_eq!(e.kind(), ferry_engine::error::ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("a.img"), "{e}");
    assert_eq!(std::fs::read(out.join("a.img")).unwrap(), b"mine");
    // A link at the image's own name is refused the same way, its target untouched.
    std::fs::remove_file(out.join("a.img")).unwrap();
    std::os::unix::fs::symlink(&victim, out.join("a.img")).unwrap();
    assert!(restore(tmp.path(), generation, seq, &out, false).await.is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // Asked to replace: the link itself is replaced by the image.
    restore(tmp.path(), generation, seq, &out, true).await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(!std::fs::symlink_metadata(out.join("a.img")).unwrap().file_type().is_symlink());
    assert!(std::fs::read(out.join("a.img")).unwrap() == disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_name_in_a_tampered_manifest_never_becomes_a_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (generation, seq, _) = replica(tmp.path()).await;
    let key = manifest_key("vm", generation, seq);
    let path = target_root(tmp.path()).join(&key);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"name\": \"a\""), "{text}");
    std::fs::write(&path, text.replace("\"name\": \"a\"", "\"name\": \"../../escaped\"")).unwrap();
    let out = tmp.path().join("deep").join("out");
    let e = restore(tmp.path(), generation, seq, &out, false).await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::NonRecoverable, "{e}");
    assert!(e.to_string().contains(&key) && e.to_string().contains("disk name"), "{e}");
    assert!(!tmp.path().join("escaped.img").exists() && !tmp.path().join("escaped.img.partial").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restored_images_are_private_under_umask_022() {
    let tmp = tempfile::tempdir().unwrap();
    let (generation, seq, _) = replica(tmp.path()).await;
    // SAFETY: umask only sets the process's file creation mask.
    let old = unsafe { libc::umask(0o022) };
    let out = tmp.path().join("out");
    let r = restore(tmp.path(), generation, seq, &out, false).await;
    unsafe { libc::umask(old) };
    r.unwrap();
    let mode = std::fs::metadata(out.join("a.img")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "restored image mode {mode:o}");
}
