//! Files are private: under umask 022 every file the engine creates (change
//! logs, snapshot and held side files, hashes, the state store, the host id,
//! copy progress, local target objects) is 0600 and every folder it creates
//! 0700. (umask is process-wide: nextest runs each test in its own process.)

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use support::*;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(&p, out);
        }
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_the_engine_creates_is_private_under_umask_022() {
    // SAFETY: umask only sets this process's file creation mask.
    unsafe { libc::umask(0o022) };
    let tmp = tempfile::tempdir().unwrap();
    let disks = tmp.path().join("disks");
    std::fs::create_dir(&disks).unwrap();
    let a = random_disk(&disks, "a", 1 << 20, 3);
    let engine = open_engine(config(tmp.path())).await.unwrap();
    protect(&engine, "vm", &[&a]).await;
    engine.write("vm", "a", 4096, random_bytes(8192, 4)).await.unwrap();
    replicate(&engine, "vm").await;
    // Logs beside the disk (the active one, at least).
    let logs = logs(&a);
    assert!(!logs.is_empty());

    let mut made = Vec::new();
    walk(&tmp.path().join("data"), &mut made);
    made.extend(logs);
    assert!(made.iter().any(|p| p.ends_with("state.redb")), "{made:?}");
    assert!(made.iter().any(|p| p.ends_with("host-id")), "{made:?}");
    assert!(made.iter().any(|p| p.to_string_lossy().contains(".manifest")), "{made:?}");
    assert!(made.iter().any(|p| p.extension().is_some_and(|e| e == "hashes")), "{made:?}");
    let mut wrong = Vec::new();
    for p in &made {
        // The cycle deletes the logs its point holds in the background: one
        // listed above may be gone by now (nothing left to be private).
        let meta = match std::fs::symlink_metadata(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && p.extension().is_some_and(|e| e == "hrl") => continue,
            m => m.unwrap(),
        };
        let (want, got) = (if meta.is_dir() { 0o700 } else { 0o600 }, meta.permissions().mode() & 0o777);
        if got != want {
            wrong.push(format!("{} {got:o}", p.display()));
        }
    }
    engine.shutdown().await.unwrap();
    assert!(wrong.is_empty(), "not private: {wrong:#?}");

    // A snapshot's side file (held side files are made the same way).
    let side = tmp.path().join("side");
    drop(ferry_engine::snapshot::CowSnapshot::create(&side, 1 << 20).unwrap());
    let sides: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("side."))
        .collect();
    assert_eq!(sides.len(), 1, "{sides:?}");
    assert_eq!(mode(&sides[0]), 0o600, "{}", sides[0].display());
}
