//! Fault injection at named I/O calls of the write path, for tests and the
//! simulator: make the next N disk writes or syncs of one disk fail as the
//! kernel would (EIO, ENOSPC), to check what the engine does then.
//!
//! Unarmed (always, in production) a check is one relaxed atomic load. A
//! fault is scoped by a path prefix, so tests running in parallel in one
//! process only hit their own disks.
//!
//! Points: `disk.write` (a disk write or zeroing, before it reaches the
//! image), `disk.sync` (a disk fdatasync), `log.sync` (a group commit's
//! fdatasync or write-out of the change log; scoped by the log file),
//! `log.append` (the write of a log's records), `log.filler` (the filler
//! a log writes ahead of its records) and
//! `held.save` (a save of a block a sealed log holds, `capture::held`;
//! scoped by its side file).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static ARMED: AtomicBool = AtomicBool::new(false);
static FAULTS: Mutex<Vec<Fault>> = Mutex::new(Vec::new());

struct Fault {
    point: &'static str,
    under: PathBuf,
    /// How many more calls fail.
    times: u32,
    errno: i32,
}

/// Makes the next `times` calls of `point` on files under `under` fail with `errno`.
pub fn arm(point: &'static str, under: &Path, times: u32, errno: i32) {
    let mut f = FAULTS.lock().expect("failpoint lock");
    f.push(Fault { point, under: under.to_path_buf(), times, errno });
    ARMED.store(true, Ordering::SeqCst);
}

/// Removes every fault under `under`.
pub fn disarm(under: &Path) {
    let mut f = FAULTS.lock().expect("failpoint lock");
    f.retain(|x| !x.under.starts_with(under));
    ARMED.store(!f.is_empty(), Ordering::SeqCst);
}

/// Fails if a fault is armed for `point` on `path`.
pub(crate) fn check(point: &'static str, path: &Path) -> std::io::Result<()> {
    if !ARMED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut faults = FAULTS.lock().expect("failpoint lock");
    let Some(i) = faults.iter().position(|f| f.point == point && path.starts_with(&f.under)) else {
        return Ok(());
    };
    let errno = faults[i].errno;
    faults[i].times -= 1;
    if faults[i].times == 0 {
        faults.remove(i);
    }
    Err(std::io::Error::from_raw_os_error(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_hits_its_point_and_path_the_given_number_of_times() {
        let dir = Path::new("/nonexistent/failpoint-test");
        arm("disk.sync", dir, 2, libc::EIO);
        assert!(check("disk.sync", Path::new("/elsewhere/d.img")).is_ok());
        assert!(check("disk.write", &dir.join("d.img")).is_ok());
        assert_eq!(check("disk.sync", &dir.join("d.img")).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(check("disk.sync", &dir.join("d.img")).is_err());
        assert!(check("disk.sync", &dir.join("d.img")).is_ok());
        arm("disk.write", dir, 5, libc::ENOSPC);
        disarm(dir);
        assert!(check("disk.write", &dir.join("d.img")).is_ok());
    }
}
