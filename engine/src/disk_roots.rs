//! Which files may be protected, and which folders restores may write into.
//!
//! ferryd usually runs as root, and a protected disk is served to every
//! client of its NBD export, so protecting a file hands it out: a
//! `ProtectVm` naming `/etc/shadow` would give any local user that reaches
//! the socket the password hashes (and the right to rewrite them). So a
//! disk, and the folder a test failover, failover or restore writes into,
//! must lie under one of the configured disk roots
//! ([`crate::config::EngineConfig::disk_roots`]); with none configured,
//! anywhere except the system folders ([`SYSTEM_FOLDERS`]). The daemon's
//! own data folder (its state store, hashes and, by default, the local
//! target) is refused either way.
//!
//! Paths are judged after symlinks are resolved (a link in `/tmp` to
//! `/etc/shadow` is `/etc/shadow`; for a folder that does not exist yet,
//! its nearest existing ancestor is resolved), and by whole components
//! (`/etcetera` is not under `/etc`). The caller resolves, then checks,
//! then opens the resolved path, so a link swapped in between changes
//! nothing it opens.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Refused when no disk roots are configured: the operating system's own
/// files, the kernel's virtual file systems, root's home, runtime state,
/// and the spools and logs that programs run by root read. (VM images
/// commonly live under `/var/lib`, which stays allowed; a host serving
/// untrusted API clients configures `disk_roots`.)
pub const SYSTEM_FOLDERS: &[&str] = &[
    "/etc",
    "/usr",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/root",
    "/run",
    "/var/spool",
    "/var/log",
];

/// The rule in force: the roots (resolved), and ferryd's own folders
/// (resolved), refused whatever the roots say.
#[derive(Debug, Clone)]
pub struct DiskRoots {
    roots: Vec<PathBuf>,
    /// (folder, what it is): the data folder, a local target.
    own: Vec<(PathBuf, &'static str)>,
}

impl DiskRoots {
    /// `roots` empty: anywhere but the system folders. `own` are ferryd's
    /// own folders (the data folder, a local target), each with what it is,
    /// refused whatever the roots say. Each root and own folder is resolved
    /// now (a root that does not exist is an error naming it).
    pub fn new(roots: &[PathBuf], own: &[(&Path, &'static str)]) -> Result<DiskRoots> {
        let mut resolved = Vec::with_capacity(roots.len());
        for r in roots {
            if !r.is_absolute() {
                return Err(Error::invalid("disk_roots", format!("{} is not an absolute path", r.display())));
            }
            resolved.push(
                std::fs::canonicalize(r).map_err(|e| Error::invalid("disk_roots", format!("{}: {e}", r.display())))?,
            );
        }
        let own = own.iter().map(|(p, what)| Ok((resolve_existing_prefix(p)?, *what))).collect::<Result<_>>()?;
        Ok(DiskRoots { roots: resolved, own })
    }

    /// Whether `resolved` (already free of symlinks, `..` and `.`) may be
    /// a disk (`what` = "disk") or an output folder ("output folder"); the
    /// error is PermissionDenied naming the path and the rule.
    pub fn check(&self, what: &str, resolved: &Path) -> Result<()> {
        if let Some((dir, which)) = self.own.iter().find(|(d, _)| resolved.starts_with(d)) {
            return Err(Error::PermissionDenied(format!(
                "{what} {} is inside ferryd's {which} {}",
                resolved.display(),
                dir.display()
            )));
        }
        if self.roots.is_empty() {
            if let Some(system) = SYSTEM_FOLDERS.iter().find(|s| resolved.starts_with(s)) {
                return Err(Error::PermissionDenied(format!(
                    "{what} {} is in the system folder {system}: configure disk_roots (--disk-root) to allow a \
                     folder",
                    resolved.display()
                )));
            }
            return Ok(());
        }
        if self.roots.iter().any(|r| resolved.starts_with(r)) {
            return Ok(());
        }
        let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        Err(Error::PermissionDenied(format!(
            "{what} {} is outside the disk roots ({})",
            resolved.display(),
            roots.join(", ")
        )))
    }

    /// Resolves an existing file and checks it as a disk. A file with
    /// more than one hard link is refused: another of its names could be a
    /// file the rule keeps out (where the host allows linking files one
    /// does not own, `fs.protected_hardlinks=0`).
    pub fn check_disk(&self, path: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let resolved = std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::not_found("disk file", path.display().to_string()),
            _ => Error::io(format!("resolve disk path {}", path.display()), e),
        })?;
        let named = |e: Error| match e {
            Error::PermissionDenied(m) if resolved != path => {
                Error::PermissionDenied(format!("{m} (given as {})", path.display()))
            }
            other => other,
        };
        self.check("disk", &resolved).map_err(named)?;
        let meta =
            std::fs::metadata(&resolved).map_err(|e| Error::io(format!("stat disk {}", resolved.display()), e))?;
        if meta.is_file() && meta.nlink() > 1 {
            return Err(named(Error::PermissionDenied(format!(
                "disk {} has {} hard links: a disk must have one name (another could be a file the disk roots keep out)",
                resolved.display(),
                meta.nlink()
            ))));
        }
        Ok(resolved)
    }

    /// Resolves a folder that may not exist yet (its nearest existing
    /// ancestor resolved, the rest appended) and checks it as an output.
    pub fn check_output(&self, dir: &Path) -> Result<PathBuf> {
        let resolved = resolve_existing_prefix(dir)?;
        self.check("output folder", &resolved)?;
        Ok(resolved)
    }
}

/// `path` made absolute with its longest existing prefix resolved
/// (symlinks followed) and the components after it applied to that: a
/// name appended, `..` its parent. The folders after the prefix do not
/// exist, so they are made as plain folders, and this is where the path
/// lands once they are.
fn resolve_existing_prefix(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::io(format!("resolve {}", path.display()), e))?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut real) => {
                for c in rest.iter().rev() {
                    match c {
                        Component::Normal(n) => real.push(n),
                        Component::ParentDir => {
                            real.pop();
                        }
                        _ => {}
                    }
                }
                return Ok(real);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(last)) = (existing.parent(), existing.components().next_back()) else {
                    return Err(Error::io(format!("resolve {}", path.display()), e));
                };
                rest.push(last);
                existing = parent;
            }
            Err(e) => return Err(Error::io(format!("resolve {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn the_rule_is_judged_on_resolved_paths_by_whole_components() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vms");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let open = DiskRoots::new(&[], &[(&data, "data folder")]).unwrap();
        let rooted = DiskRoots::new(std::slice::from_ref(&root), &[(&data, "data folder")]).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        let data = std::fs::canonicalize(&data).unwrap();
        // (rule, path, allowed)
        let table: Vec<(&DiskRoots, PathBuf, bool)> = vec![
            (&open, "/etc/shadow".into(), false),
            (&open, "/usr/lib/x.img".into(), false),
            (&open, "/dev/sda".into(), false),
            (&open, "/proc/kcore".into(), false),
            (&open, "/etcetera/x.img".into(), true),
            (&open, root.join("a.img"), true),
            (&open, data.join("state.redb"), false),
            (&open, data.clone(), false),
            (&rooted, root.join("a.img"), true),
            (&rooted, root.join("sub/b.img"), true),
            (&rooted, root.clone(), true),
            (&rooted, PathBuf::from(format!("{}2/a.img", root.display())), false),
            (&rooted, tmp.path().join("other.img"), false),
            (&rooted, "/etc/shadow".into(), false),
            (&rooted, data.join("x"), false),
        ];
        for (rule, path, allowed) in table {
            let got = rule.check("disk", &path);
            assert_eq!(got.is_ok(), allowed, "{}: {got:?}", path.display());
            if let Err(e) = got {
                assert_eq!(e.kind(), ErrorKind::PermissionDenied);
                assert!(e.to_string().contains(&path.display().to_string()), "names the path: {e}");
            }
        }
    }

    #[test]
    fn a_symlink_to_a_system_file_is_the_system_file_and_new_folders_resolve_through_their_ancestors() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let rule = DiskRoots::new(&[], &[(&data, "data folder")]).unwrap();
        let link = tmp.path().join("innocent.img");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let e = rule.check_disk(&link).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("/etc/passwd") && e.to_string().contains("system folder /etc"), "{e}");
        assert!(e.to_string().contains(&link.display().to_string()), "the name given is shown too: {e}");
        assert_eq!(rule.check_disk(&tmp.path().join("missing.img")).unwrap_err().kind(), ErrorKind::NotFound);

        // An output folder through a link into /etc, below folders not made yet.
        let out_link = tmp.path().join("out");
        std::os::unix::fs::symlink("/etc", &out_link).unwrap();
        let e = rule.check_output(&out_link.join("new/deeper")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("/etc/new/deeper"), "{e}");
        let fine = rule.check_output(&tmp.path().join("restores/r1")).unwrap();
        assert!(fine.ends_with("restores/r1") && fine.is_absolute(), "{}", fine.display());
        let real_tmp = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(rule.check_output(&tmp.path().join("nope/../up")).unwrap(), real_tmp.join("up"));
        let e = rule.check_output(&out_link.join("missing/../inside")).unwrap_err();
        assert!(e.to_string().contains("/etc/inside"), "{e}");
        assert_eq!(rule.check_output(&data.join("restore")).unwrap_err().kind(), ErrorKind::PermissionDenied);
    }

    #[test]
    fn a_hard_linked_file_and_a_local_target_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, target) = (tmp.path().join("data"), tmp.path().join("target"));
        std::fs::create_dir_all(&target).unwrap();
        let rule = DiskRoots::new(&[], &[(&data, "data folder"), (&target, "local target")]).unwrap();
        let a = tmp.path().join("a.img");
        std::fs::write(&a, [0u8; 4096]).unwrap();
        assert!(rule.check_disk(&a).is_ok());
        std::fs::hard_link(&a, tmp.path().join("b.img")).unwrap();
        let e = rule.check_disk(&a).unwrap_err();
        assert!(e.kind() == ErrorKind::PermissionDenied && e.to_string().contains("2 hard links"), "{e}");
        let e = rule.check_output(&target.join("hosts")).unwrap_err();
        assert!(e.to_string().contains("local target"), "{e}");
        let e = rule.check_output(&data.join("not-yet")).unwrap_err();
        assert!(e.to_string().contains("data folder"), "a data folder not made yet is still refused: {e}");
    }

    #[test]
    fn roots_must_be_absolute_and_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let e = DiskRoots::new(&[PathBuf::from("relative")], &[(tmp.path(), "data folder")]).unwrap_err();
        assert!(e.to_string().contains("disk_roots") && e.to_string().contains("absolute"), "{e}");
        let e = DiskRoots::new(&[tmp.path().join("missing")], &[(tmp.path(), "data folder")]).unwrap_err();
        assert!(e.to_string().contains("disk_roots") && e.to_string().contains("missing"), "{e}");
    }
}
