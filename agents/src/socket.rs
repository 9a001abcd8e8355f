//! The NBD Unix socket, created with the permissions asked for: `0600`
//! (only ferryd's user may connect) or `0660` for one group
//! (`ferryd --nbd-socket-group NAME`, e.g. the group QEMU runs as). The NBD
//! protocol has no authentication of its own, so whoever can connect can
//! read and write every protected disk.
//!
//! The socket is bound inside a private (`0700`) staging folder beside its
//! path, given its mode and group there, and renamed into place: at no
//! moment does it exist at its path with looser permissions, and nothing
//! process-wide (the umask) changes while the engine's threads run.

use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

/// Binds the NBD socket at `path`: a stale socket left by a previous run is
/// removed, one that another process still serves is refused.
pub fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<tokio::net::UnixListener> {
    let gid = group.map(gid_of).transpose()?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use by another process", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let staging = staging_dir(path)?;
    let result = bind_in(&staging, path, gid);
    let _ = std::fs::remove_dir_all(&staging);
    let listener = result?;
    listener.set_nonblocking(true).context("making the NBD socket non-blocking")?;
    tokio::net::UnixListener::from_std(listener).context("registering the NBD socket")
}

fn bind_in(staging: &Path, path: &Path, gid: Option<u32>) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let temp = staging.join("nbd.sock");
    let listener =
        std::os::unix::net::UnixListener::bind(&temp).with_context(|| format!("binding {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&temp, None, Some(gid)).with_context(|| {
            format!("giving {} to group {gid} (ferryd must run as root or as a member of that group)", path.display())
        })?;
    }
    std::fs::rename(&temp, path).with_context(|| format!("moving the NBD socket into place at {}", path.display()))?;
    Ok(listener)
}

/// A new `0700` folder beside `path` (same file system, so the rename is atomic).
fn staging_dir(path: &Path) -> anyhow::Result<PathBuf> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    for attempt in 0..100u32 {
        let dir = parent.join(format!(".ferryd-nbd-{}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating a staging folder in {}", parent.display())),
        }
    }
    bail!("no free staging folder name in {}", parent.display())
}

/// The id of group `name` (a number is taken as an id).
fn gid_of(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name = CString::new(name).with_context(|| format!("--nbd-socket-group {name:?}: not a group name"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        let mut group = std::mem::MaybeUninit::<libc::group>::uninit();
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        let rc = unsafe {
            libc::getgrnam_r(c_name.as_ptr(), group.as_mut_ptr(), buf.as_mut_ptr().cast(), buf.len(), &mut found)
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            let e = std::io::Error::from_raw_os_error(rc);
            return Err(e).with_context(|| format!("--nbd-socket-group {name}: looking the group up"));
        }
        if found.is_null() {
            bail!("--nbd-socket-group {name}: no such group");
        }
        // SAFETY: getgrnam_r succeeded and `found` points at `group`, filled in.
        return Ok(unsafe { (*found).gr_gid });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[tokio::test]
    async fn the_socket_is_private_or_shared_with_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = bind(&path, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "only ferryd's user may connect");
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let _ = listener.accept().await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no staging folder left behind");
        assert!(bind(&path, None).unwrap_err().to_string().contains("in use by another process"));
        drop(listener);

        // A stale socket is replaced; a group (here our own, by id) gets 0660.
        // SAFETY: getgid cannot fail.
        let gid = unsafe { libc::getgid() };
        let listener = bind(&path, Some(&gid.to_string())).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid));
        drop(listener);
    }

    #[test]
    fn groups_are_looked_up_by_name() {
        assert_eq!(gid_of("root").unwrap(), 0);
        let err = gid_of("no-such-group-ferry").unwrap_err();
        assert!(err.to_string().contains("no-such-group-ferry: no such group"), "{err}");
    }
}
