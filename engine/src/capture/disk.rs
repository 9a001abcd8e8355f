//! The per-disk write path: every write reaches its change log and the disk
//! before it is acknowledged.
//!
//! All three ways in (embedded API, NBD export, simulator) call [`Disk`].
//!
//! # A change
//!
//! A write (or zeroing) holds the disk's gate shared and its byte range
//! ([`super::ranges`]), then: saves snapshot blocks if a copy is running
//! (copy-before-write), appends its record to the active change log (one
//! `pwritev` under the log mutex, so it is in the kernel when the append
//! returns), writes the disk (page cache), and returns. Changes
//! to disjoint ranges run in parallel (only the append is serialized);
//! overlapping ones run one at a time, so their records are in the order
//! they reached the disk. Nothing on this path waits for the network.
//! Changes that arrive together ([`Disk::write_many`], an NBD client's
//! pipelined writes) go as groups of disjoint ranges: one range lock for
//! the group (taken whole, so two groups never deadlock), one log append
//! (one `pwritev`) for all its records, then each disk write; a change
//! that overlaps one earlier in the batch starts the next group, so the
//! order argument below holds for batches too.
//!
//! A write of at least [`IN_IMAGE_MIN`] bytes is logged by range (an
//! in-image record), its bytes written once, to the disk only: at the
//! rotation that seals its log, the blocks it touched start to be held
//! (`capture::held`), and every later change saves such a block before it
//! changes it, in the same step as the snapshot saves, so the point reads
//! them as they were at the rotation.
//!
//! What must see no change in flight takes the gate exclusively: rotation
//! (a record and its disk write always belong to the same log), the start
//! of a snapshot or a resync, and close.
//!
//! # Why a restarted daemon can trust the log (kill -9, panic, OOM kill)
//!
//! The kernel keeps what was handed to it when the process dies; only a
//! reboot loses the page cache. Each record is appended before its disk
//! write, and the write is acknowledged after both, so after a crash of the
//! daemon with the host up: every acknowledged write is in the log; the
//! log is whole records plus at most one partial record at its end (appends
//! are serialized and written front to back); and the disk may lack the
//! disk writes of the last records (in flight at the kill), never has a
//! write the log lacks. The restart ([`crate::changelog`]'s trust check,
//! then `vm::open`) cuts the torn tail and replays the unsealed log onto
//! the disk in order, which gives the disk every logged write (overlapping
//! records are in disk order, see above); the log is sealed as found and
//! shipped with the next cycle. No resync, no full read of the disk. The log
//! header keeps the boot id: after a reboot an unsealed log is not trusted.
//!
//! The same order makes an initial copy resumable: a change saves its
//! snapshot blocks before its record is appended, so every record logged
//! since the snapshot names blocks whose protection-time bytes are in the
//! side file (or already on the target), and a block no such record names
//! is unchanged on the disk. A restart rebuilds the snapshot from exactly
//! that (`capture::snapshot`, `vm::restart`).
//!
//! # Durability
//!
//! [`Disk::flush`] is a group commit: a caller takes a ticket and either
//! waits for a sync that started after it, or runs one for every ticket
//! taken so far: the log's bytes written out, then one fdatasync of the
//! disk whose device cache flush covers both, where that is safe
//! ([`shared_flush`]: ext4, same device, the records over bytes a finished
//! fdatasync prepared), otherwise an fdatasync of the log and one of the
//! disk at once (two threads). FUA is the change, then a flush. A reply to FLUSH therefore means every
//! acknowledged write is durable in the log and in the disk image: the
//! image alone is right after a power loss, even if the daemon never runs
//! again.
//!
//! # Failure
//!
//! A failed log append poisons the log. The write still reaches the disk and
//! is acknowledged; the disk stops logging and signals the VM, which goes to
//! `ResyncRequired` (a resync compares whole disks, so nothing is lost). The
//! same signal fires once when pending logs reach 50% of the disk. A failed
//! snapshot save fails the write before anything is logged or written. A
//! failed disk write may leave part of the range changed while the log says
//! otherwise: the write gets an error and the disk is flagged for a resync
//! the same way. A failed disk fdatasync is sticky (as in redb
//! and PostgreSQL): the kernel may have dropped the dirty pages, so every
//! later flush fails too, until a resync re-establishes what the disk
//! holds. Whenever logging stops for a failure, the log's magic is
//! overwritten (best effort, no new space needed) so that a restart before
//! the VM's new state is stored still finds the log untrustworthy.
//!
//! # Writes stopped (failover)
//!
//! [`Disk::stop_writes`] makes every change that has not yet looked at the
//! flag fail, then waits (gate taken exclusively) for those that already
//! passed it, so when it returns every acknowledged change has its record
//! in the active log and the next rotation seals it. A planned failover stops writes, then rotates for its final
//! point: every acknowledged write is in that point, and none is
//! acknowledged after it. Reads and flushes go on.
//!
//! Zero-length requests are legal (NBD and the embedded API): they succeed
//! and log nothing. A closed disk (its VM was unprotected or stopped)
//! refuses every request, so an NBD connection that outlives its VM can
//! never write unlogged.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use tokio::sync::mpsc::UnboundedSender;

use crate::capture::extents;
use crate::capture::held::HeldImage;
use crate::capture::ranges::{self, RangeLocks};
use crate::capture::shared_flush::{self, ImageDevice, SyncMode};
use crate::capture::snapshot::CowSnapshot;
use crate::changelog::{self, LogHeader, LogSync, LogWriter, Record};
use crate::error::{Error, Result};
use crate::model::now_millis;

/// Largest single write or read accepted through any entry point.
pub const MAX_IO: u64 = 32 << 20;

/// Writes of at least this many bytes are logged by range, their bytes
/// left in the image alone ([`crate::capture::held`]): one write of the
/// data instead of two, and a FLUSH that syncs a small log. Smaller writes
/// carry their bytes in the log, where appending them is cheaper than
/// holding a 64 KiB block for each. 128 KiB: a guest's sequential writes
/// (file system writeback, `dd`, a database's bulk load) are 128 KiB to
/// 1 MiB; its random ones 4 to 64 KiB.
pub const IN_IMAGE_MIN: u64 = 128 << 10;

/// What a disk tells its VM from the write path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSignal {
    /// Logs can no longer describe the changes (failed write, 50% rule);
    /// `chain` numbers the disk's log chain then (a resync starts a new one).
    ResyncNeeded { disk: String, reason: String, chain: u64 },
}

pub struct Disk {
    pub vm: String,
    pub name: String,
    pub path: PathBuf,
    size: u64,
    file: File,
    /// Where the image is, for the group commit's [`SyncMode`].
    device: ImageDevice,
    /// Shared by every change while it runs; exclusive for what must see
    /// none in flight (rotation, snapshot and resync start, close).
    gate: RwLock<()>,
    /// Orders overlapping changes (see the module header).
    ranges: RangeLocks,
    inner: Mutex<Inner>,
    sync: GroupSync,
    /// Bytes of sealed logs not yet committed to a recovery point (50% rule, reporting).
    sealed_bytes: AtomicU64,
    /// Bytes of the blocks held for sealed logs ([`HeldImage::protected_bytes`], 50% rule).
    held_bytes: AtomicU64,
    signals: UnboundedSender<DiskSignal>,
    /// The VM stopped or was unprotected: every request fails. Set with the
    /// gate held exclusively, so no change is in flight when it is set and
    /// every later one sees it; reads check it without any lock.
    closed: AtomicBool,
    /// Changes are refused (the VM failed over, or is failing over); reads
    /// and flushes go on. Checked under the gate (see the module header).
    writes_stopped: AtomicBool,
}

struct Inner {
    /// The active change log; `None` once a log write failed (until resync).
    log: Option<LogWriter>,
    snapshot: Option<Arc<CowSnapshot>>,
    /// The image bytes held for sealed logs with in-image records, oldest
    /// first: every change saves their blocks before it changes them.
    held: Vec<Arc<HeldImage>>,
    /// The resync signal was sent; it is sent once per episode.
    signalled: bool,
    /// Why a disk fdatasync failed: every flush fails until a resync begins.
    sync_failed: Option<String>,
    /// Numbers the log chain: a resync starts a new one, so a signal about
    /// an older chain is moot.
    chain: u64,
}

/// Group commit state: tickets taken, tickets covered by a finished sync.
#[derive(Default)]
struct GroupSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Tickets taken so far (a flush takes the next one).
    taken: u64,
    /// Every ticket up to this one is covered by a finished sync.
    covered: u64,
    /// Every ticket up to this one was covered by a sync that failed (or by
    /// a later one): those flushes fail even if a resync cleared the flag.
    failed_upto: u64,
    running: bool,
}

/// Ends a running sync even if it unwinds, so waiters are never stranded.
struct SyncRun<'a> {
    sync: &'a GroupSync,
    upto: u64,
    failed: bool,
}

impl Drop for SyncRun<'_> {
    fn drop(&mut self) {
        let mut st = self.sync.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running = false;
        st.covered = st.covered.max(self.upto);
        if self.failed || std::thread::panicking() {
            st.failed_upto = st.failed_upto.max(self.upto);
        }
        drop(st);
        self.sync.done.notify_all();
    }
}

/// One change of the disk, as the write path takes it.
#[derive(Clone, Copy)]
enum Change<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    /// Zeroes (punching a hole where the file allows, unless `keep_allocated`).
    Zero {
        offset: u64,
        len: u64,
        keep_allocated: bool,
    },
}

impl<'a> Change<'a> {
    /// `(offset, len)`.
    fn range(&self) -> (u64, u64) {
        match *self {
            Change::Write { offset, data } => (offset, data.len() as u64),
            Change::Zero { offset, len, .. } => (offset, len),
        }
    }

    /// `[start, end)`, for overlap checks.
    fn span(&self) -> (u64, u64) {
        let (offset, len) = self.range();
        (offset, offset.saturating_add(len))
    }

    fn record(&self) -> Record<'a> {
        match *self {
            Change::Write { offset, data } if data.len() as u64 >= IN_IMAGE_MIN => {
                Record::in_image(offset, data.len() as u64)
            }
            Change::Write { offset, data } => Record::write(offset, data),
            Change::Zero { offset, len, .. } => Record::zero(offset, len),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Change::Write { .. } => "write",
            Change::Zero { .. } => "zero",
        }
    }

    fn apply(&self, file: &File) -> std::io::Result<()> {
        match *self {
            Change::Write { offset, data } => file.write_all_at(data, offset),
            Change::Zero { offset, len, keep_allocated: false } => extents::zero_range(file, offset, len),
            Change::Zero { offset, len, keep_allocated: true } => extents::zero_allocated(file, offset, len),
        }
    }
}

/// Opens a disk image for the write path, checking it exists and is usable.
///
/// No symbolic link is followed anywhere on the path (`openat2`'s
/// `RESOLVE_NO_SYMLINKS`): a disk's path is resolved and judged when it is
/// protected (`crate::disk_roots`) and stored resolved, so a link found on
/// it later (a folder swapped for a link to `/etc`, before a restart or
/// between the check and the open) is refused instead of followed.
pub fn open_image(path: &Path) -> Result<(File, u64)> {
    let file = open_no_symlinks(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found("disk file", path.display().to_string()),
        _ if e.raw_os_error() == Some(libc::ELOOP) => Error::PermissionDenied(format!(
            "disk {}: a symbolic link is on its path; a disk's path is resolved when it is protected and must \
             stay free of links",
            path.display()
        )),
        _ => Error::io(format!("open disk {}", path.display()), e),
    })?;
    let meta = file.metadata().map_err(|e| Error::io(format!("stat disk {}", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::invalid("disk path", format!("{} is not a regular file", path.display())));
    }
    if meta.len() == 0 {
        return Err(Error::invalid("disk path", format!("{} is empty (size 0)", path.display())));
    }
    Ok((file, meta.len()))
}

/// Opens `path` read-write following no symbolic link on it. Where the
/// kernel has no `openat2` (before 5.6, or filtered), the path must equal
/// its resolved form instead (a check, then the open: a narrower guard).
fn open_no_symlinks(path: &Path) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDWR | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: a valid C string and open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just gave us, owned from here on.
        return Ok(unsafe { File::from_raw_fd(fd as i32) });
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) {
        return Err(e);
    }
    let abs = std::path::absolute(path)?;
    if std::fs::canonicalize(&abs)? != abs {
        return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
    }
    OpenOptions::new().read(true).write(true).open(path)
}

impl Disk {
    /// A disk whose active log is `log` (already created or recovered).
    pub fn new(
        vm: &str,
        name: &str,
        path: &Path,
        log: LogWriter,
        sealed_bytes: u64,
        signals: UnboundedSender<DiskSignal>,
    ) -> Result<Self> {
        let (file, size) = open_image(path)?;
        Ok(Disk {
            vm: vm.to_string(),
            name: name.to_string(),
            path: path.to_path_buf(),
            size,
            device: ImageDevice::of(&file, path),
            file,
            gate: RwLock::new(()),
            ranges: RangeLocks::new(),
            inner: Mutex::new(Inner {
                log: Some(log),
                snapshot: None,
                held: Vec::new(),
                signalled: false,
                sync_failed: None,
                chain: 0,
            }),
            sync: GroupSync::default(),
            sealed_bytes: AtomicU64::new(sealed_bytes),
            held_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            writes_stopped: AtomicBool::new(false),
            signals,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn export_name(&self) -> String {
        format!("{}/{}", self.vm, self.name)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("disk lock is never poisoned: no panics under it")
    }

    /// Waits for every change in flight to finish and keeps new ones out.
    fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().expect("disk gate is never poisoned: no panics under it")
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::invalid(
                "range",
                format!("{len} bytes at {offset} go past the end of disk {} ({} bytes)", self.name, self.size),
            )),
        }
    }

    fn closed_error(&self) -> Error {
        Error::FailedPrecondition(format!(
            "disk {} of VM {} is no longer protected (the VM was unprotected or stopped)",
            self.name, self.vm
        ))
    }

    fn stopped_error(&self) -> Error {
        Error::WritesRefused(format!(
            "VM {} has failed over: disk {} takes no writes (unprotect the VM or protect it again to write here)",
            self.vm, self.name
        ))
    }

    /// Refuses every change from now on; a change already past the check
    /// finishes (the next rotation waits for it). Reads and flushes go on.
    pub fn stop_writes(&self) {
        self.writes_stopped.store(true, Ordering::SeqCst);
        // Wait for the changes already past the check: once this returns,
        // every acknowledged change has its record in the active log (a
        // final cycle that finds no record then rightly ships nothing).
        drop(self.quiesce());
    }

    /// Takes changes again (a planned failover was called off).
    pub fn resume_writes(&self) {
        self.writes_stopped.store(false, Ordering::SeqCst);
    }

    pub fn writes_stopped(&self) -> bool {
        self.writes_stopped.load(Ordering::SeqCst)
    }

    /// Why a change cannot run now, if it cannot.
    fn refusal(&self) -> Option<Error> {
        if self.closed.load(Ordering::Acquire) {
            Some(self.closed_error())
        } else if self.writes_stopped.load(Ordering::SeqCst) {
            Some(self.stopped_error())
        } else {
            None
        }
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        self.file.read_exact_at(buf, offset).map_err(|e| Error::io(format!("read {}", self.path.display()), e))
    }

    pub fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.change(Change::Write { offset, data }, fua)
    }

    /// Writes that arrived together (an NBD client's pipelined requests),
    /// each with its own result, in order. Disjoint neighbours share one
    /// log append (one `pwritev`); each is acknowledged like a
    /// [`Disk::write_at`] without FUA.
    pub fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<Result<()>> {
        let changes: Vec<Change<'_>> = writes.iter().map(|&(offset, data)| Change::Write { offset, data }).collect();
        self.apply_all(&changes)
    }

    /// Zeroes a range (NBD WRITE_ZEROES and TRIM): the replica reads zeros there too.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.change(Change::Zero { offset, len, keep_allocated: false }, fua)
    }

    /// [`Disk::write_zeroes`] that keeps the range allocated (NBD `NO_HOLE`); the log records the same zero range.
    pub fn write_zeroes_allocated(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.change(Change::Zero { offset, len, keep_allocated: true }, fua)
    }

    /// One change, then a flush if `fua`.
    fn change(&self, change: Change<'_>, fua: bool) -> Result<()> {
        let applied = self.apply_all(&[change]).pop().expect("one result per change");
        applied?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Applies changes in order (see the module header), each with its own
    /// result. Changes out of range fail alone; zero-length ones succeed
    /// and log nothing. The rest go in groups of disjoint ranges, each group
    /// with one log append.
    fn apply_all(&self, changes: &[Change<'_>]) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(changes.len());
        let mut live = Vec::with_capacity(changes.len());
        for (i, c) in changes.iter().enumerate() {
            let (offset, len) = c.range();
            results.push(match self.check_range(offset, len) {
                Err(e) => Some(Err(e)),
                Ok(()) if len == 0 => Some(self.refusal().map_or(Ok(()), Err)),
                Ok(()) => {
                    live.push(i);
                    None
                }
            });
        }
        let mut group: Vec<usize> = Vec::new();
        for i in live {
            let overlaps_group = group.iter().any(|&g| ranges::overlaps(changes[g].span(), changes[i].span()));
            if overlaps_group || group.len() == changelog::MAX_BATCH {
                self.apply_group(changes, &group, &mut results);
                group.clear();
            }
            group.push(i);
        }
        if !group.is_empty() {
            self.apply_group(changes, &group, &mut results);
        }
        results.into_iter().map(|r| r.expect("every change has a result")).collect()
    }

    /// Changes `group` (disjoint, in range, non-empty): snapshot blocks
    /// saved, one log append for all, then each disk write.
    fn apply_group(&self, changes: &[Change<'_>], group: &[usize], results: &mut [Option<Result<()>>]) {
        let _gate = self.gate.read().expect("disk gate is never poisoned: no panics under it");
        if let Some(e) = self.refusal() {
            let refused = matches!(e, Error::WritesRefused(_));
            for &i in group {
                let why = e.to_string();
                results[i] =
                    Some(Err(if refused { Error::WritesRefused(why) } else { Error::FailedPrecondition(why) }));
            }
            return;
        }
        let spans: Vec<(u64, u64)> = group.iter().map(|&i| changes[i].range()).collect();
        let _ranges = self.ranges.lock_all(&spans);
        // Copy-before-write first: a change whose record is in the log
        // has its snapshot blocks saved (a resumed copy relies on it).
        // A failed save changes nothing: that change fails, unlogged.
        let mut saved = Vec::with_capacity(group.len());
        // The snapshots are taken out first: the saves run without the disk lock.
        let (snapshot, held) = {
            let inner = self.lock();
            (inner.snapshot.clone(), inner.held.clone())
        };
        match snapshot {
            None => saved.extend_from_slice(group),
            Some(s) => {
                for &i in group {
                    let (offset, len) = changes[i].range();
                    match s.preserve(&self.file, offset, len) {
                        Ok(()) => saved.push(i),
                        Err(e) => results[i] = Some(Err(e)),
                    }
                }
            }
        }
        // Bytes held for sealed logs: a failed save gives up the logs (a
        // resync), not the guest's write.
        let held_failure = held.iter().find_map(|h| {
            saved.iter().find_map(|&i| {
                let (offset, len) = changes[i].range();
                h.preserve(&self.file, offset, len).err()
            })
        });
        if let Some(e) = held_failure {
            let reason = format!("bytes of disk {} held for a sealed change log could not be saved: {e}", self.name);
            self.untrust(&mut self.lock(), reason);
        }
        {
            let records: Vec<Record<'_>> = saved.iter().map(|&i| changes[i].record()).collect();
            let mut inner = self.lock();
            let logged = inner.log.as_mut().map(|log| log.append_all(&records));
            self.after_append(&mut inner, logged);
        }
        for i in saved {
            let c = &changes[i];
            let (offset, len) = c.range();
            let what = c.what();
            let applied = crate::failpoint::check("disk.write", &self.path)
                .and_then(|()| c.apply(&self.file))
                .map_err(|e| Error::io(format!("{what} {len} bytes at {offset} of {}", self.path.display()), e));
            if let Err(err) = &applied {
                // The log has the change, the disk may have part of it.
                let reason = format!("a {what} to disk {} failed: {err}", self.name);
                self.untrust(&mut self.lock(), reason);
            }
            results[i] = Some(applied);
        }
    }

    /// The log can no longer describe the disk: stop logging, ask for a resync.
    fn untrust(&self, inner: &mut Inner, reason: String) {
        self.signal_resync(inner, reason);
        if let Some(log) = inner.log.take() {
            log.mark_untrusted();
        }
        self.give_up_held(inner);
    }

    /// The sealed logs' held bytes are no longer kept (logging stopped: a
    /// resync follows): reads of them fail from now on, and their side
    /// files go with the logs.
    fn give_up_held(&self, inner: &mut Inner) {
        for h in inner.held.drain(..) {
            h.give_up();
            if let Err(e) = h.release() {
                tracing::warn!(vm = %self.vm, disk = %self.name, error = %e, "could not delete a held side file");
            }
        }
        self.held_bytes.store(0, Ordering::Relaxed);
    }

    /// Tells the VM a resync is needed, once per episode.
    fn signal_resync(&self, inner: &mut Inner, reason: String) {
        if !inner.signalled {
            inner.signalled = true;
            tracing::warn!(vm = %self.vm, disk = %self.name, %reason, "resync needed");
            let chain = inner.chain;
            let _ = self.signals.send(DiskSignal::ResyncNeeded { disk: self.name.clone(), reason, chain });
        }
    }

    /// Whether a signal about log chain `chain` still concerns this disk:
    /// not if a resync started a new chain since (it reads the disk afresh).
    pub fn signal_is_current(&self, chain: u64) -> bool {
        self.lock().chain == chain
    }

    fn after_append(&self, inner: &mut Inner, logged: Option<Result<()>>) {
        match logged {
            Some(Ok(())) => {
                let pending = self.sealed_log_bytes() + inner.log.as_ref().map_or(0, |l| l.len() + l.in_image_bytes());
                if pending >= self.size / 2 {
                    let reason = format!("change logs of disk {} reached {pending} bytes, 50% of its size", self.name);
                    self.signal_resync(inner, reason);
                }
            }
            Some(Err(e)) => self.untrust(inner, format!("change log write failed on disk {}: {e}", self.name)),
            None => {} // not logging until the resync
        }
    }

    /// Makes every acknowledged write durable in the log and on the disk
    /// (group commit, see the module header).
    pub fn flush(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        self.check_sync_failed()?;
        let mut st = self.sync.state.lock().expect("sync state is never poisoned");
        st.taken += 1;
        let ticket = st.taken;
        loop {
            if st.covered >= ticket {
                let failed = st.failed_upto >= ticket;
                drop(st);
                if failed {
                    return Err(Error::io(
                        format!("sync {}: the sync that covered this flush failed", self.path.display()),
                        std::io::Error::from_raw_os_error(libc::EIO),
                    ));
                }
                // A sync that failed since makes every later flush fail too.
                return self.check_sync_failed();
            }
            if !st.running {
                st.running = true;
                let mut run = SyncRun { sync: &self.sync, upto: st.taken, failed: false };
                drop(st);
                let synced = self.sync_now();
                run.failed = synced.is_err();
                drop(run);
                return synced;
            }
            st = self.sync.done.wait(st).expect("sync state is never poisoned");
        }
    }

    fn check_sync_failed(&self) -> Result<()> {
        match &self.lock().sync_failed {
            None => Ok(()),
            Some(why) => Err(Error::io(
                format!("sync {}: an earlier sync failed ({why}); writes since may be lost", self.path.display()),
                std::io::Error::from_raw_os_error(libc::EIO),
            )),
        }
    }

    /// Makes the active log and the disk durable: one device cache flush
    /// for both where it is safe, else two fdatasyncs at once
    /// ([`shared_flush`]).
    fn sync_now(&self) -> Result<()> {
        let plan = self.lock().log.as_ref().map(|l| l.sync_plan());
        let sync_disk = || crate::failpoint::check("disk.sync", &self.path).and_then(|()| self.file.sync_data());
        let (log_synced, disk_synced) = match plan {
            None => (None, sync_disk()),
            Some(Err(e)) => (Some(Err(e)), sync_disk()),
            Some(Ok(plan)) => match shared_flush::mode(self.device, plan.device, plan.data_only) {
                SyncMode::OneFlush => {
                    shared_flush::start_writing(&plan.file);
                    shared_flush::start_writing(&self.file);
                    let written = crate::failpoint::check("log.sync", &plan.path)
                        .and_then(|()| shared_flush::write_out(&plan.file, plan.upto))
                        .map_err(|e| Error::io(format!("writing out HRL log {}", plan.path.display()), e));
                    let disk = sync_disk();
                    if written.is_ok() && disk.is_ok() {
                        if let Some(log) = self.lock().log.as_mut() {
                            log.written_out(&plan);
                        }
                    }
                    (Some(written), disk)
                }
                SyncMode::TwoSyncs => {
                    let (logged, disk) = self.sync_log_beside_disk(&plan, sync_disk);
                    if logged.is_ok() {
                        if let Some(log) = self.lock().log.as_mut() {
                            log.synced(&plan);
                        }
                    }
                    (Some(logged), disk)
                }
            },
        };
        if let Some(Err(e)) = log_synced {
            let mut inner = self.lock();
            self.after_append(&mut inner, Some(Err(e)));
        }
        if let Err(e) = disk_synced {
            // The kernel may have dropped the pages: never report them durable later.
            let err = Error::io(format!("sync {}", self.path.display()), e);
            let mut inner = self.lock();
            inner.sync_failed = Some(err.to_string());
            self.untrust(&mut inner, format!("disk {} could not be synced: {err}", self.name));
            return Err(err);
        }
        Ok(())
    }

    /// fdatasyncs the log on a thread of its own while the disk's runs
    /// (one after the other if no thread can be made).
    fn sync_log_beside_disk(
        &self,
        plan: &LogSync,
        sync_disk: impl FnOnce() -> std::io::Result<()>,
    ) -> (Result<()>, std::io::Result<()>) {
        let sync_log = || {
            crate::failpoint::check("log.sync", &plan.path)
                .and_then(|()| plan.file.sync_data())
                .map_err(|e| Error::io(format!("fdatasync of HRL log {}", plan.path.display()), e))
        };
        std::thread::scope(|s| {
            let spawned = std::thread::Builder::new().name("ferry-log-sync".into()).spawn_scoped(s, sync_log);
            let disk = sync_disk();
            let logged = match spawned {
                Ok(t) => {
                    t.join().unwrap_or_else(|_| Err(Error::Internal("the change-log sync thread panicked".into())))
                }
                Err(_) => sync_log(),
            };
            (logged, disk)
        })
    }

    /// Closes the disk for good (the VM stops or is unprotected): every later
    /// request fails, so no write reaches the image unlogged. Returns the
    /// active log, if any.
    pub fn close(&self) -> Option<LogWriter> {
        let _quiet = self.quiesce();
        let mut inner = self.lock();
        self.closed.store(true, Ordering::Release);
        inner.snapshot = None;
        // A closed disk takes no writes, so nothing more needs saving; a
        // restart holds the sealed logs' bytes afresh (`capture::held`).
        inner.held.clear();
        inner.log.take()
    }

    /// The held images of these sealed logs (None where a log holds nothing).
    pub fn held_for(&self, logs: &[PathBuf]) -> Vec<Option<Arc<HeldImage>>> {
        let inner = self.lock();
        logs.iter().map(|l| inner.held.iter().find(|h| h.log() == l.as_path()).cloned()).collect()
    }

    /// Every held image, oldest first.
    #[cfg(test)]
    pub(crate) fn held_images(&self) -> Vec<Arc<HeldImage>> {
        self.lock().held.clone()
    }

    /// Installs the held images a restart rebuilt, before the disk accepts any write.
    pub fn install_held(&self, held: Vec<HeldImage>) {
        let mut inner = self.lock();
        for h in held {
            self.held_bytes.fetch_add(h.protected_bytes(), Ordering::Relaxed);
            inner.held.push(Arc::new(h));
        }
    }

    /// These sealed logs are in a committed point: their bytes need no
    /// holding any more (side files deleted).
    pub fn release_held(&self, logs: &[PathBuf]) {
        let mut inner = self.lock();
        let (done, kept): (Vec<_>, Vec<_>) = inner.held.drain(..).partition(|h| logs.iter().any(|l| l == h.log()));
        inner.held = kept;
        let released: u64 = done.iter().map(|h| h.protected_bytes()).sum();
        let _ =
            self.held_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(released)));
        drop(inner);
        for h in done {
            // Nothing saves for it any more: a late reader must not read the image.
            h.give_up();
            if let Err(e) = h.release() {
                tracing::warn!(vm = %self.vm, disk = %self.name, error = %e, "could not delete a held side file");
            }
        }
    }

    /// The snapshot copy-before-write preserves for, if any.
    pub fn snapshot(&self) -> Option<Arc<CowSnapshot>> {
        self.lock().snapshot.clone()
    }

    /// Installs a snapshot a crashed daemon left (rebuilt from its side
    /// file), before the disk accepts any write.
    pub fn resume_snapshot(&self, snap: Arc<CowSnapshot>) {
        self.lock().snapshot = Some(snap);
    }

    /// Stops copy-before-write; the caller releases the snapshot's space.
    pub fn end_snapshot(&self) -> Option<Arc<CowSnapshot>> {
        self.lock().snapshot.take()
    }

    /// Stops copy-before-write only if `snap` is still the disk's snapshot.
    pub fn end_snapshot_if(&self, snap: &Arc<CowSnapshot>) {
        let mut inner = self.lock();
        if inner.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap)) {
            inner.snapshot = None;
        }
    }

    /// The file the snapshot reads the disk through.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes the active log stands for: its length (header included) and
    /// the bytes its in-image records left in the image (what the 50% rule
    /// counts), for reporting.
    pub fn active_log_bytes(&self) -> u64 {
        self.lock().log.as_ref().map_or(0, |l| l.len() + l.in_image_bytes())
    }

    /// Bytes the sealed logs waiting for a point stand for: their lengths
    /// and the blocks held for them (what the 50% rule counts).
    pub fn sealed_log_bytes(&self) -> u64 {
        self.sealed_bytes.load(Ordering::Relaxed) + self.held_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the side files: the copy's snapshot and the blocks held for sealed logs.
    pub fn snapshot_bytes(&self) -> u64 {
        let inner = self.lock();
        inner.snapshot.as_ref().map_or(0, |s| s.space_used()) + inner.held.iter().map(|h| h.space_used()).sum::<u64>()
    }

    /// Records in the active log (0: nothing to replicate since the last rotation).
    pub fn active_records(&self) -> u64 {
        self.lock().log.as_ref().map_or(0, |l| l.records())
    }

    /// Header of the active log, if logging.
    pub fn active_header(&self) -> Option<LogHeader> {
        self.lock().log.as_ref().map(|l| l.header().clone())
    }

    /// Creates the next log file (seq + 1, chained to the active one) off the
    /// write path; [`rotate_all`] swaps it in.
    pub fn prepare_next_log(&self) -> Result<LogWriter> {
        let cur = self
            .active_header()
            .ok_or_else(|| Error::corrupt(format!("change log of disk {}", self.name), "not logging"))?;
        new_log(&self.path, &self.vm, &self.name, cur.seq + 1, cur.log_id)
    }

    /// A log of this disk was sealed and waits for upload.
    pub fn sealed_added(&self, bytes: u64) {
        self.sealed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Logs were committed to a recovery point or discarded: stop counting them.
    pub fn sealed_released(&self, bytes: u64) {
        let _ = self.sealed_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }

    /// Stops logging (logs discarded for a resync). Writes still reach the
    /// disk; the resync finds them by comparison. The active log is marked
    /// untrusted first: from here on it misses writes, so a restart must
    /// never replay or ship it.
    pub fn stop_logging(&self) {
        let _quiet = self.quiesce();
        let mut inner = self.lock();
        self.sealed_bytes.store(0, Ordering::Relaxed);
        if let Some(log) = inner.log.take() {
            log.mark_untrusted();
        }
        self.give_up_held(&mut inner);
    }
}

/// The NBD export serves protected disks through the same write path.
impl crate::nbd::BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Disk::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        Disk::write_at(self, offset, data, fua)
    }
    fn write_many(&self, writes: &[(u64, &[u8])]) -> Vec<Result<()>> {
        Disk::write_many(self, writes)
    }
    fn write_zeroes(&self, offset: u64, len: u64, how: crate::nbd::Zeroing) -> Result<()> {
        if how.fast_only && !crate::capture::extents::zeroing_is_fast(&self.file) {
            let refused = std::io::Error::from(std::io::ErrorKind::Unsupported);
            return Err(Error::io(format!("fast zero on {}", self.path.display()), refused));
        }
        if how.keep_allocated {
            Disk::write_zeroes_allocated(self, offset, len, how.fua)
        } else {
            Disk::write_zeroes(self, offset, len, how.fua)
        }
    }
    /// A trimmed range reads back as zeros, here and on the replica.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Disk::write_zeroes(self, offset, len, fua)
    }
    fn flush(&self) -> Result<()> {
        Disk::flush(self)
    }
    /// Holes of the image file read as zeroes (`HOLE | ZERO`); the rest is data.
    fn block_status(&self, offset: u64, len: u64, max: usize) -> Result<Vec<crate::nbd::Extent>> {
        self.check_range(offset, len)?;
        if self.closed.load(Ordering::Acquire) {
            return Err(self.closed_error());
        }
        let runs = crate::capture::extents::allocation(&self.file, offset, len, max)
            .map_err(|e| Error::io(format!("find the holes of {}", self.path.display()), e))?;
        Ok(runs.into_iter().map(crate::nbd::Extent::from).collect())
    }
}

/// Creates a new, empty, durable log file for a disk.
pub fn new_log(disk_path: &Path, vm: &str, disk: &str, seq: u64, prev_log_id: u64) -> Result<LogWriter> {
    let header = LogHeader::new(vm, disk, seq, prev_log_id, now_millis());
    LogWriter::create(&changelog::log_path(disk_path, seq), &header)
}

/// Where a disk's change log stood at a snapshot instant: the active log's
/// seq and the records in it (None: not logging). Every later record is a
/// change since the snapshot, and was preserved for it.
pub type LogPosition = Option<(u64, u64)>;

/// Starts copy-before-write snapshots of all disks at one instant (every
/// disk's lock held), so the base point is crash-consistent across disks.
/// Also returns where each disk's log stood then.
pub fn snapshot_all(disks: &[Arc<Disk>]) -> Result<(Vec<Arc<CowSnapshot>>, u64, Vec<LogPosition>)> {
    let _quiet: Vec<_> = disks.iter().map(|d| d.quiesce()).collect();
    let mut guards: Vec<_> = disks.iter().map(|d| d.lock()).collect();
    let at = now_millis();
    let mut snaps = Vec::new();
    let mut positions = Vec::new();
    for (d, g) in disks.iter().zip(guards.iter_mut()) {
        match CowSnapshot::create(&d.path, d.size) {
            Ok(s) => {
                let s = Arc::new(s);
                g.snapshot = Some(s.clone());
                snaps.push(s);
                positions.push(g.log.as_ref().map(|l| (l.header().seq, l.records())));
            }
            Err(e) => {
                for g in guards.iter_mut() {
                    g.snapshot = None;
                }
                return Err(e);
            }
        }
    }
    Ok((snaps, at, positions))
}

/// Starts a resync on every disk at one instant: the old logs are dropped,
/// a new log chain starts (writes made during the resync go there and are
/// shipped after it), and a copy-before-write snapshot is taken. Also
/// returns where each disk's log stood then: the new log, empty.
pub fn begin_resync(disks: &[Arc<Disk>]) -> Result<(Vec<Arc<CowSnapshot>>, u64, Vec<LogPosition>)> {
    let mut logs = Vec::new();
    let mut snaps = Vec::new();
    for d in disks {
        d.stop_logging();
        let next_seq = changelog::list_logs(&d.path)?.last().map_or(1, |(s, _)| s + 1);
        changelog::remove_logs(&d.path)?;
        logs.push(new_log(&d.path, &d.vm, &d.name, next_seq, 0)?);
        snaps.push(Arc::new(CowSnapshot::create(&d.path, d.size)?));
    }
    let _quiet: Vec<_> = disks.iter().map(|d| d.quiesce()).collect();
    let mut guards: Vec<_> = disks.iter().map(|d| d.lock()).collect();
    let at = now_millis();
    let mut replaced = Vec::new();
    let mut positions = Vec::new();
    for ((d, g), (log, snap)) in disks.iter().zip(guards.iter_mut()).zip(logs.into_iter().zip(snaps.iter())) {
        positions.push(Some((log.header().seq, log.records())));
        g.log = Some(log);
        replaced.extend(g.snapshot.replace(snap.clone()));
        g.signalled = false;
        // The resync reads what the disk holds now: syncs can be trusted again.
        g.sync_failed = None;
        g.chain += 1;
        d.sealed_bytes.store(0, Ordering::Relaxed);
    }
    drop(guards);
    drop(_quiet);
    // A snapshot this one replaced (an initial copy or resync it supersedes) is not needed.
    for old in replaced {
        if let Err(e) = crate::changelog::remove_file_if_present(old.path()) {
            tracing::warn!(error = %e, "could not remove a superseded snapshot's side file");
        }
    }
    Ok((snaps, at, positions))
}

/// Starts a new upload attempt of the pending logs without a rotation, if
/// no disk has logged a change since the last one (else returns false: the
/// caller rotates, which starts the attempt). Under the quiesced gates, so
/// every held image's marks of the attempt before are dropped before any
/// new change (`capture::held`).
pub fn new_attempt_if_unchanged(disks: &[Arc<Disk>]) -> bool {
    let logged =
        |guards: &[MutexGuard<'_, Inner>]| guards.iter().any(|g| g.log.as_ref().is_some_and(|l| l.records() > 0));
    {
        // Most cycles: something was logged (a rotation follows), or nothing
        // is held (nothing to guard again). Only rotations add held images,
        // and they come from the caller's cycles, one at a time.
        let guards: Vec<_> = disks.iter().map(|d| d.lock()).collect();
        if logged(&guards) {
            return false;
        }
        if guards.iter().all(|g| g.held.is_empty()) {
            return true;
        }
    }
    let _quiet: Vec<_> = disks.iter().map(|d| d.quiesce()).collect();
    let guards: Vec<_> = disks.iter().map(|d| d.lock()).collect();
    if logged(&guards) {
        return false;
    }
    for h in guards.iter().flat_map(|g| g.held.iter()) {
        h.next_attempt();
    }
    true
}

/// Swaps in the prepared logs of all disks at one instant, so a recovery
/// point is crash-consistent across the VM's disks. Returns the old logs
/// (still to be sealed) and the instant.
///
/// Refuses (and gives back) the prepared logs unless each one follows its
/// disk's current log: a resync that started a new chain meanwhile, or a
/// disk that stopped logging, must not have its log sealed by a cycle.
pub fn rotate_all(
    disks: &[Arc<Disk>],
    next: Vec<LogWriter>,
) -> std::result::Result<(Vec<LogWriter>, u64), (Error, Vec<LogWriter>)> {
    // No change in flight: a record and its disk write belong to one log.
    let _quiet: Vec<_> = disks.iter().map(|d| d.quiesce()).collect();
    let mut guards: Vec<_> = disks.iter().map(|d| d.lock()).collect();
    for ((d, g), n) in disks.iter().zip(&guards).zip(&next) {
        let follows = g.log.as_ref().is_some_and(|cur| cur.header().log_id == n.header().prev_log_id);
        if !follows {
            let why = Error::Cancelled(format!(
                "the change log of disk {} changed while its rotation was prepared (a resync started?)",
                d.name
            ));
            drop(guards);
            return Err((why, next));
        }
    }
    // The bytes the outgoing logs name in the images are held from this
    // instant (`capture::held`); nothing rotates unless all are.
    let mut held = Vec::new();
    for (d, g) in disks.iter().zip(&guards) {
        let cur = g.log.as_ref().expect("checked above");
        if cur.in_image_ranges().is_empty() {
            held.push(None);
            continue;
        }
        match HeldImage::create(cur.path(), d.size, cur.in_image_ranges()) {
            Ok(h) => held.push(Some(h)),
            Err(e) => {
                for h in held.into_iter().flatten() {
                    let _ = h.release();
                }
                drop(guards);
                return Err((e, next));
            }
        }
    }
    let at = now_millis();
    let mut old = Vec::new();
    for ((d, g), (n, h)) in disks.iter().zip(guards.iter_mut()).zip(next.into_iter().zip(held)) {
        // A new upload attempt: what the last one read is guarded again.
        for older in &g.held {
            older.next_attempt();
        }
        if let Some(h) = h {
            d.held_bytes.fetch_add(h.protected_bytes(), Ordering::Relaxed);
            g.held.push(Arc::new(h));
        }
        old.push(g.log.replace(n).expect("checked above"));
    }
    drop(guards);
    Ok((old, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, size: u64) -> Disk {
        let path = dir.join("d.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let log = new_log(&path, "vm", "d", 1, 0).unwrap();
        Disk::new("vm", "d", &path, log, 0, tx).unwrap()
    }

    #[test]
    fn a_batch_applies_and_logs_in_order_with_one_result_each() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(dir.path(), 1 << 20);
        let (a, b, c) = (vec![1u8; 8192], vec![2u8; 4096], vec![3u8; 10]);
        let writes: Vec<(u64, &[u8])> = vec![(0, &a), (4096, &b), (100_000, &c), (1 << 20, &[9]), (5, &[])];
        let results = d.write_many(&writes);
        let ok: Vec<bool> = results.iter().map(|r| r.is_ok()).collect();
        assert_eq!(ok, [true, true, true, false, true], "only the write past the end fails");
        let mut image = vec![0u8; 1 << 20];
        d.file().read_exact_at(&mut image, 0).unwrap();
        assert!(
            image[..4096] == [1; 4096] && image[4096..8192] == [2; 4096],
            "the later of two overlapping writes wins"
        );
        assert!(image[100_000..100_010] == [3; 10]);
        // The log holds the three, in order: replayed onto zeros it gives the image.
        let log = d.close().unwrap();
        let path = log.path().to_path_buf();
        log.seal().unwrap();
        let scan = changelog::scan(&path).unwrap();
        let got: Vec<(u64, u64)> = scan.records.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(got, [(0, 8192), (4096, 4096), (100_000, 10)]);
        let f = File::open(&path).unwrap();
        let mut replayed = vec![0u8; 1 << 20];
        for r in &scan.records {
            let p = changelog::read_payload(&f, r).unwrap();
            replayed[r.offset as usize..][..p.len()].copy_from_slice(&p);
        }
        assert!(replayed == image, "the log replays to the image");
    }

    #[test]
    fn flushes_use_the_mode_the_log_allows_and_a_failed_log_sync_gives_the_log_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let log = new_log(&path, "vm", "d", 1, 0).unwrap();
        let log_path = log.path().to_path_buf();
        let d = Disk::new("vm", "d", &path, log, 0, tx).unwrap();
        let plan = || d.lock().log.as_ref().unwrap().sync_plan().unwrap();
        let mode = || shared_flush::mode(d.device, plan().device, plan().data_only);
        d.write_at(0, &[1u8; 4096], false).unwrap();
        assert_eq!(mode(), SyncMode::TwoSyncs, "the filler ahead was never synced");
        d.flush().unwrap();
        d.write_at(4096, &[2u8; 4096], false).unwrap();
        let expected = if d.device.flush_on_every_sync { SyncMode::OneFlush } else { SyncMode::TwoSyncs };
        assert_eq!(mode(), expected, "over prepared filler: one flush where the image's file system allows it");
        d.flush().unwrap();
        // A log sync that fails (in either mode): the image is synced and the
        // flush succeeds (the write is durable there), the log is given up
        // and the VM told to resync.
        d.write_at(8192, &[3u8; 4096], true).unwrap();
        crate::failpoint::arm("log.sync", &log_path, 1, libc::EIO);
        d.write_at(12288, &[4u8; 4096], false).unwrap();
        let flushed = d.flush();
        crate::failpoint::disarm(&log_path);
        flushed.unwrap();
        assert!(matches!(rx.try_recv(), Ok(DiskSignal::ResyncNeeded { .. })), "the VM is told to resync");
        assert!(d.lock().log.is_none(), "the log is no longer written");
        assert!(changelog::scan(&log_path).unwrap_err().to_string().contains("bad magic"), "marked untrusted");
        let mut image = vec![0u8; 16384];
        d.file().read_exact_at(&mut image, 0).unwrap();
        assert!(image[12288..] == [4u8; 4096], "the write reached the image");
    }

    /// What shipping `logs` (oldest first) puts on the replica: the
    /// coalesced extents, read from the log payloads or through the held
    /// images, applied to `replica` (the upload pipeline's reads, without
    /// the target).
    fn ship(d: &Disk, logs: &[PathBuf], replica: &mut [u8]) {
        let held = d.held_for(logs);
        let mut c = changelog::Coalescer::new();
        for (i, l) in logs.iter().enumerate() {
            let scan = changelog::scan(l).unwrap();
            assert!(scan.clean, "{l:?} sealed");
            for r in &scan.records {
                c.push(i, r);
            }
        }
        let files: Vec<File> = logs.iter().map(|l| File::open(l).unwrap()).collect();
        for e in c.finish() {
            let out = &mut replica[e.offset as usize..e.end() as usize];
            match e.source {
                changelog::ExtentSource::Zero => out.fill(0),
                changelog::ExtentSource::Log { log_index, pos } => files[log_index].read_exact_at(out, pos).unwrap(),
                changelog::ExtentSource::Image { log_index } => held[log_index]
                    .as_ref()
                    .expect("a held image for a log with in-image records")
                    .read(d.file(), e.offset, out)
                    .unwrap(),
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A write of `len` bytes of `v` (logged in the image when large).
        Write(u64, u64, u8),
        Zero(u64, u64),
        /// Rotate, sealing the active log.
        Rotate,
        /// Ship the `n` oldest sealed logs as one point, then release them.
        Ship(usize),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..size, 1u64..IN_IMAGE_MIN, any::<u8>()).prop_map(move |(o, l, v)| Op::Write(o, l.min(size - o), v)),
            4 => (0..size, IN_IMAGE_MIN..4 * IN_IMAGE_MIN, any::<u8>()).prop_map(move |(o, l, v)| Op::Write(o, l.min(size - o), v)),
            1 => (0..size, 1u64..200_000).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o))),
            2 => Just(Op::Rotate),
            2 => (1usize..3).prop_map(Op::Ship),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Whatever the guest writes, large (bytes left in the image) or
        /// small (bytes in the log), and whenever logs are rotated and
        /// shipped, each shipment brings the replica to the disk as it was
        /// at the rotation that sealed the newest log shipped.
        #[test]
        fn each_shipment_is_the_disk_at_its_last_rotation(ops in proptest::collection::vec(op(1 << 20), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let size = 1u64 << 20;
            let d = Arc::new(disk(dir.path(), size));
            let mut model = vec![0u8; size as usize];
            let mut replica = model.clone();
            // Sealed logs waiting, each with the disk at its rotation.
            let mut pending: Vec<(PathBuf, Vec<u8>)> = Vec::new();
            for op in ops.into_iter().chain([Op::Rotate, Op::Ship(usize::MAX)]) {
                match op {
                    Op::Write(o, l, v) => {
                        d.write_at(o, &vec![v; l as usize], false).unwrap();
                        model[o as usize..(o + l) as usize].fill(v);
                    }
                    Op::Zero(o, l) => {
                        d.write_zeroes(o, l, false).unwrap();
                        model[o as usize..(o + l) as usize].fill(0);
                    }
                    Op::Rotate => {
                        if d.active_records() == 0 {
                            continue;
                        }
                        let next = d.prepare_next_log().unwrap();
                        let (old, _) = rotate_all(std::slice::from_ref(&d), vec![next]).map_err(|(e, _)| e).unwrap();
                        for log in old {
                            let sealed = log.seal().unwrap();
                            pending.push((sealed.path, model.clone()));
                        }
                    }
                    Op::Ship(n) => {
                        let n = n.min(pending.len());
                        if n == 0 {
                            continue;
                        }
                        let batch: Vec<_> = pending.drain(..n).collect();
                        let logs: Vec<PathBuf> = batch.iter().map(|(p, _)| p.clone()).collect();
                        ship(&d, &logs, &mut replica);
                        prop_assert!(replica == batch.last().unwrap().1, "shipped {logs:?}");
                        d.release_held(&logs);
                        for l in &logs {
                            prop_assert!(!changelog::held_path(l).exists(), "released");
                        }
                    }
                }
            }
            prop_assert!(replica == model);
            prop_assert!(d.held_images().is_empty());
        }
    }

    #[test]
    fn a_large_write_is_logged_by_range_and_a_small_one_with_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(dir.path(), 1 << 20);
        d.write_at(0, &vec![1u8; IN_IMAGE_MIN as usize], false).unwrap();
        d.write_at(IN_IMAGE_MIN, &vec![2u8; IN_IMAGE_MIN as usize - 1], false).unwrap();
        let log = d.close().unwrap();
        assert_eq!(log.in_image_bytes(), IN_IMAGE_MIN);
        let path = log.path().to_path_buf();
        let sealed = log.seal().unwrap();
        let scan = changelog::scan(&path).unwrap();
        let kinds: Vec<_> = scan.records.iter().map(|r| (r.kind, r.len)).collect();
        assert_eq!(
            kinds,
            [(changelog::RecordKind::InImage, IN_IMAGE_MIN), (changelog::RecordKind::Write, IN_IMAGE_MIN - 1)]
        );
        assert!(sealed.end_offset < 2 * IN_IMAGE_MIN, "the large write's bytes are not in the log");
    }

    #[test]
    fn a_failed_held_save_asks_for_a_resync_and_the_write_still_lands() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let path = dir.path().join("d.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let d = Arc::new(Disk::new("vm", "d", &path, new_log(&path, "vm", "d", 1, 0).unwrap(), 0, tx).unwrap());
        d.write_at(0, &vec![1u8; IN_IMAGE_MIN as usize], false).unwrap();
        let next = d.prepare_next_log().unwrap();
        let (old, _) = rotate_all(std::slice::from_ref(&d), vec![next]).map_err(|(e, _)| e).unwrap();
        let sealed = old.into_iter().next().unwrap().seal().unwrap();
        let held = d.held_for(std::slice::from_ref(&sealed.path)).pop().unwrap().expect("held");
        crate::failpoint::arm("held.save", &changelog::held_path(&sealed.path), 1, libc::ENOSPC);
        d.write_at(10, &[9u8; 100], false).unwrap();
        let mut image = vec![0u8; 110];
        d.file().read_exact_at(&mut image, 0).unwrap();
        assert!(image[10..] == [9u8; 100], "the guest's write landed");
        let DiskSignal::ResyncNeeded { reason, .. } = rx.try_recv().expect("a resync is asked for");
        assert!(reason.contains("could not be saved"), "{reason}");
        let e = held.read(d.file(), 0, &mut [0u8; 16]).unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::NeedsResync, "{e}");
        assert!(d.held_images().is_empty(), "the held bytes were given up");
        assert!(!changelog::held_path(&sealed.path).exists());
    }

    #[test]
    fn a_batch_saves_snapshot_blocks_before_it_changes_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk(dir.path(), 1 << 20);
        d.write_at(0, &[7; 8192], false).unwrap();
        let d = Arc::new(d);
        let (snaps, _, _) = snapshot_all(std::slice::from_ref(&d)).unwrap();
        let results = d.write_many(&[(0, &[1; 4096][..]), (4096, &[2; 4096][..])]);
        assert!(results.iter().all(|r| r.is_ok()));
        let mut seen = vec![0u8; 8192];
        snaps[0].read_for_copy(d.file(), 0, &mut seen).unwrap();
        assert!(seen == [7; 8192], "the snapshot still reads the bytes of its instant");
        assert!(d.close().is_some());
    }
}
