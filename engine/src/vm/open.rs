//! Opening a VM's disks: scan what is beside them, decide how the VM starts
//! ([`super::restart::decide`]), then carry the decision out.
//!
//! Crash safety: the scan only reads. Logs are removed only when the
//! decision does not keep them (protection starts over, or they cannot be
//! trusted and a resync compares whole disks), and a new active log is
//! created durably (header, fsync, directory fsync) before any write is
//! accepted, chained to the last kept log or starting a new chain.
//!
//! An initial copy in progress ([`scan_copy`]): the scan also reads its
//! progress journal, checks its side files are there, and collects the
//! changes logged since the snapshot (records after the journal's log
//! position); from those and the parts on the target it rebuilds each
//! disk's snapshot block states (pure, `capture::snapshot::rebuild_blocks`).
//! If the copy resumes, the snapshot is reinstalled on each disk before the
//! disk accepts a write (the replay of open logs writes blocks that are
//! `Saved` or `Copied`, which the copy no longer reads from the disk). If
//! it does not, the journal and side files are removed with the logs.

use std::path::Path;
use std::sync::Arc;

use crate::capture::disk::{self, Disk, DiskSignal};
use crate::capture::snapshot;
use crate::changelog;
use crate::error::{Error, Result};
use crate::model::UnixMillis;
use crate::replica::hashes::{self, BlockHashes};
use crate::state::VmRecord;
use crate::vm::lifecycle::{Event, Lifecycle, VmState};

use super::core::{PendingLog, Start};
use super::restart::{self, CopyFound, LogsFound, Restart};
use crate::capture::snapshot::{Block, CowSnapshot};
use crate::replicate::progress;

/// Disks opened for a VM, and how it starts.
pub struct OpenedDisks {
    pub disks: Vec<Arc<Disk>>,
    pub signals: tokio::sync::mpsc::UnboundedReceiver<DiskSignal>,
    /// The replica's block hashes kept for resync, per disk (None: not known).
    pub hashes: Vec<Option<BlockHashes>>,
    pub start: Start,
}

/// What the scan of one disk found.
struct Scanned {
    found: LogsFound,
    /// The seq the next log of this disk takes (numbers never go back).
    next_seq: u64,
    /// The id of the newest trusted log (the next log chains to it).
    last_log_id: u64,
    /// Trusted logs a crashed daemon left open, oldest first.
    unsealed: Vec<std::path::PathBuf>,
    /// Logs the trust check left out (a creation cut short).
    left_out: Vec<std::path::PathBuf>,
}

/// Opens a VM's disks (blocking) and decides how it starts. `rec` is brought
/// up to the decision (a protection that starts over gets a new generation
/// and no point); the caller persists it.
pub fn open_vm(rec: &mut VmRecord, data_dir: &Path, now: UnixMillis) -> Result<OpenedDisks> {
    let scanned = rec.spec.disks.iter().map(|d| scan(&rec.spec.name, &d.name, &d.path)).collect::<Result<Vec<_>>>()?;
    let found: Vec<(String, LogsFound)> =
        rec.spec.disks.iter().zip(&scanned).map(|(d, s)| (d.name.clone(), s.found.clone())).collect();
    let (copy, rebuilt) = match rec.lifecycle.state {
        VmState::InitialReplication | VmState::Resynchronizing => match scan_copy(rec, data_dir, &scanned) {
            Ok((found, rebuilt)) => (found, rebuilt),
            Err(why) => (CopyFound::Unusable(why), Vec::new()),
        },
        _ => (CopyFound::NotLooked, Vec::new()),
    };
    let decision = restart::decide(&rec.lifecycle, rec.last_point_seq, &found, &copy);
    match (&copy, &decision.start) {
        (_, Start::ContinueCopy { .. }) => {
            tracing::info!(vm = %rec.spec.name, state = %rec.lifecycle.state, "the copy resumes where it stopped")
        }
        (CopyFound::Unusable(why), _) => {
            tracing::warn!(vm = %rec.spec.name, state = %rec.lifecycle.state, reason = %why,
                "the copy cannot resume: it starts over")
        }
        _ => {}
    }
    apply_to_record(rec, &decision, now);
    open(rec, scanned, decision, data_dir, rebuilt)
}

/// A disk's snapshot as rebuilt by the scan of an initial copy.
struct Rebuilt {
    side: std::path::PathBuf,
    blocks: Vec<Block>,
}

/// Reads what an interrupted initial copy left (read only): its journal,
/// its side files, the changes logged since its snapshot; and rebuilds each
/// disk's snapshot block states. `Err` says why the copy cannot resume.
fn scan_copy(
    rec: &VmRecord,
    data_dir: &Path,
    scanned: &[Scanned],
) -> std::result::Result<(CopyFound, Vec<Rebuilt>), String> {
    let vm = &rec.spec.name;
    let path = crate::paths::DataDir::new(data_dir).copy_progress(vm);
    let found = progress::load(&path).map_err(|e| e.to_string())?.ok_or("no copy progress was kept")?;
    let h = &found.header;
    if h.vm != *vm || h.generation != rec.generation {
        return Err(format!("the copy progress is for {} generation {}, not this protection", h.vm, h.generation));
    }
    let names: Vec<&str> = rec.spec.disks.iter().map(|d| d.name.as_str()).collect();
    if h.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>() != names {
        return Err("the copy progress names other disks".into());
    }
    let seq = found.seq();
    if let progress::CopyPurpose::Resync { compared_with } = h.purpose {
        // A resync whose point was committed (the state change was not
        // stored), or that compared with a point other than the last: its
        // parts do not build on the replica as it is. It runs again.
        if seq.is_some_and(|s| s <= rec.last_point_seq) {
            return Err("the resync's point was already committed".into());
        }
        if compared_with.is_some_and(|p| p != rec.last_point_seq) {
            return Err(format!("the resync compared with point {compared_with:?}, not the last one"));
        }
    }
    let mut rebuilt = Vec::new();
    for (i, ((spec, at), s)) in rec.spec.disks.iter().zip(&h.disks).zip(scanned).enumerate() {
        let disk = &spec.name;
        let owned = at.side.parent() == spec.path.parent() && snapshot::side_files(&spec.path).contains(&at.side);
        if !owned || !at.side.is_file() {
            return Err(format!("the snapshot side file {} of disk {disk} is gone", at.side.display()));
        }
        let log_seq = at.log_seq.ok_or_else(|| format!("disk {disk} was not logging at the snapshot"))?;
        let LogsFound::Trusted(kept) = &s.found else {
            return Err(format!("the change logs of disk {disk} are not trusted"));
        };
        let mut touched = Vec::new();
        let mut first_seq = None;
        for log in kept {
            let scan = changelog::scan(&log.path).map_err(|e| e.to_string())?;
            first_seq.get_or_insert(scan.header.seq);
            let since = match scan.header.seq {
                n if n < log_seq => continue,
                n if n == log_seq => at.log_records,
                _ => 0,
            };
            touched.extend(scan.records.iter().filter(|r| r.seq > since).map(|r| (r.offset, r.len)));
        }
        if first_seq.is_none_or(|f| f > log_seq) {
            return Err(format!("the change log of disk {disk} at the snapshot (seq {log_seq}) is gone"));
        }
        let (_, size) = disk::open_image(&spec.path).map_err(|e| e.to_string())?;
        if size != at.size {
            return Err(format!("disk {disk} is {size} bytes, it was {} at the snapshot", at.size));
        }
        let done: Vec<u64> = seq.map_or(Vec::new(), |seq| found.parts_of(i, seq).map(|p| p.part).collect());
        let blocks = snapshot::rebuild_blocks(size, h.chunk_size, &done, &touched).map_err(|e| e.to_string())?;
        rebuilt.push(Rebuilt { side: at.side.clone(), blocks });
    }
    let resync = matches!(h.purpose, progress::CopyPurpose::Resync { .. });
    Ok((CopyFound::Resumable { seq, snapshot_ms: h.snapshot_ms, resync }, rebuilt))
}

fn apply_to_record(rec: &mut VmRecord, decision: &Restart, now: UnixMillis) {
    if decision.start_over {
        rec.lifecycle = match rec.lifecycle.state {
            // Still the operator's: a resume starts protection over.
            VmState::Critical => Lifecycle { resume_to: Some(VmState::EnablingProtection), ..rec.lifecycle.clone() },
            _ => Lifecycle { transitions: rec.lifecycle.transitions.clone(), ..Lifecycle::default() },
        };
        rec.last_point_seq = 0;
        rec.generation = rec.generation.max(now);
    }
    if decision.base_committed {
        match rec.lifecycle.state {
            // Resumed, it goes on from the committed base.
            VmState::Critical => rec.lifecycle.resume_to = Some(VmState::Protected),
            _ => {
                rec.lifecycle.on_event(Event::PointCommitted, now);
            }
        }
    }
}

fn scan(vm: &str, disk: &str, path: &Path) -> Result<Scanned> {
    disk::open_image(path)?; // a clear error before any log is touched
    let logs = changelog::list_logs(path)?;
    for (_, p) in &logs {
        if let Ok(scan) = changelog::scan(p) {
            if scan.header.vm != vm || scan.header.disk != disk {
                return Err(Error::FailedPrecondition(format!(
                    "{} holds change logs of VM {:?} disk {:?}: the disk belongs to another protection",
                    path.display(),
                    scan.header.vm,
                    scan.header.disk
                )));
            }
        }
    }
    let next_seq = logs.last().map_or(1, |(s, _)| s + 1);
    if logs.is_empty() {
        return Ok(Scanned {
            found: LogsFound::Missing,
            next_seq,
            last_log_id: 0,
            unsealed: Vec::new(),
            left_out: Vec::new(),
        });
    }
    Ok(match changelog::check_logs(disk, &logs, changelog::boot_id()) {
        Ok(kept) if kept.is_empty() => {
            Scanned { found: LogsFound::Missing, next_seq, last_log_id: 0, unsealed: Vec::new(), left_out: Vec::new() }
        }
        Ok(kept) => Scanned {
            // A newest log left out (its creation was cut short) is removed
            // when the logs are kept, and its number is taken again.
            left_out: logs.iter().filter(|(_, p)| kept.iter().all(|k| &k.path != p)).map(|(_, p)| p.clone()).collect(),
            next_seq: kept.last().map_or(next_seq, |l| l.header.seq + 1),
            last_log_id: kept.last().map_or(0, |l| l.header.log_id),
            unsealed: kept.iter().filter(|l| !l.sealed).map(|l| l.path.clone()).collect(),
            found: LogsFound::Trusted(
                kept.into_iter().map(|l| PendingLog { path: l.path, bytes: l.bytes, sealed_ms: l.sealed_ms }).collect(),
            ),
        },
        Err(why) => Scanned {
            found: LogsFound::Untrusted(why),
            next_seq,
            last_log_id: 0,
            unsealed: Vec::new(),
            left_out: Vec::new(),
        },
    })
}

/// Writes every record of a log a crashed daemon left open onto the disk,
/// in order, then fdatasyncs the disk. The disk writes of the last records
/// may not have happened before the crash; replaying all of them is
/// idempotent and leaves the disk as the log says (see `capture::disk`).
fn replay_onto_disk(log: &Path, disk_path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let found = changelog::scan(log)?;
    let file = std::fs::File::open(log).map_err(|e| Error::io(format!("opening HRL log {}", log.display()), e))?;
    let (image, size) = disk::open_image(disk_path)?;
    let mut buf = Vec::new();
    for r in &found.records {
        if r.offset.checked_add(r.len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                format!("HRL log {}", log.display()),
                format!("record {} ({} bytes at {}) lies past the end of the {size}-byte disk", r.seq, r.len, r.offset),
            ));
        }
        match r.kind {
            changelog::RecordKind::Write => {
                buf.resize(r.len as usize, 0);
                changelog::read_payload_into(&file, r, &mut buf)?;
                image
                    .write_all_at(&buf, r.offset)
                    .map_err(|e| Error::io(format!("replaying a write onto {}", disk_path.display()), e))?;
            }
            changelog::RecordKind::Zero => crate::capture::extents::zero_range(&image, r.offset, r.len)
                .map_err(|e| Error::io(format!("replaying a zeroing onto {}", disk_path.display()), e))?,
        }
    }
    image.sync_data().map_err(|e| Error::io(format!("sync {}", disk_path.display()), e))?;
    tracing::info!(log = %log.display(), records = found.records.len(), torn_bytes = found.torn_bytes,
        "replayed a change log left open by a crash onto its disk");
    Ok(())
}

/// Deletes what protection kept beside a disk: its logs and snapshot side files.
pub(crate) fn remove_local_files(disk_path: &Path) -> Result<()> {
    changelog::remove_logs(disk_path)?;
    snapshot::side_files(disk_path).iter().try_for_each(|side| changelog::remove_file_if_present(side))
}

fn open(
    rec: &VmRecord,
    scanned: Vec<Scanned>,
    decision: Restart,
    data_dir: &Path,
    rebuilt: Vec<Rebuilt>,
) -> Result<OpenedDisks> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let vm = &rec.spec.name;
    let keep = decision.keeps_logs();
    let continues = matches!(decision.start, Start::ContinueCopy { .. });
    if !continues {
        progress::remove(&crate::paths::DataDir::new(data_dir).copy_progress(vm))?;
    }
    let mut rebuilt = rebuilt.into_iter();
    let mut disks = Vec::new();
    let mut hash_sets = Vec::new();
    for (spec, s) in rec.spec.disks.iter().zip(scanned) {
        let resumed = match continues {
            true => Some(
                rebuilt.next().ok_or_else(|| Error::Internal(format!("no snapshot rebuilt for disk {}", spec.name)))?,
            ),
            false => None,
        };
        if let Some(r) = &resumed {
            // The saves a crash left in the page cache are made durable
            // before any log is sealed: a sealed chain is trusted even after
            // a reboot, and its records say these blocks are in the side file.
            std::fs::File::open(&r.side)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(format!("sync snapshot side file {}", r.side.display()), e))?;
        }
        let (sealed, prev_id) = match (&s.found, keep) {
            (LogsFound::Trusted(kept), true) => {
                for log in &s.left_out {
                    changelog::remove_file_if_present(log)?;
                }
                for log in &s.unsealed {
                    replay_onto_disk(log, &spec.path)?;
                    changelog::seal_found(log)?;
                }
                let sealed = kept.iter().map(|p| std::fs::metadata(&p.path).map_or(p.bytes, |m| m.len())).sum();
                (sealed, s.last_log_id)
            }
            _ => {
                remove_local_files(&spec.path)?;
                (0, 0)
            }
        };
        let log = disk::new_log(&spec.path, vm, &spec.name, s.next_seq, prev_id)?;
        let d = Arc::new(Disk::new(vm, &spec.name, &spec.path, log, sealed, tx.clone())?);
        if let Some(r) = resumed {
            // Other side files of this disk belong to no snapshot.
            for side in snapshot::side_files(&spec.path).iter().filter(|f| **f != r.side) {
                changelog::remove_file_if_present(side)?;
            }
            d.resume_snapshot(Arc::new(CowSnapshot::reopen(&r.side, d.size(), r.blocks)?));
        }
        disks.push(d);
        let hpath = hashes::path(data_dir, vm, &spec.name);
        hash_sets.push(if decision.start_over {
            let _ = std::fs::remove_file(&hpath);
            None
        } else {
            BlockHashes::load(&hpath).filter(|h| h.generation == rec.generation)
        });
    }
    Ok(OpenedDisks { disks, signals: rx, hashes: hash_sets, start: decision.start })
}
