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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::capture::disk::{self, Disk, DiskSignal};
use crate::capture::held::HeldImage;
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
    /// The image bytes to hold again for the kept logs with in-image records.
    held: Vec<HeldPlan>,
}

impl Scanned {
    /// A scan that keeps no log (none found, or none trusted).
    fn without_logs(found: LogsFound, next_seq: u64) -> Scanned {
        Scanned { found, next_seq, last_log_id: 0, unsealed: Vec::new(), left_out: Vec::new(), held: Vec::new() }
    }
}

/// A kept log with in-image records: its bytes are held again, afresh (see `capture::held`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeldPlan {
    log: PathBuf,
    /// Its in-image records' ranges.
    ranges: Vec<(u64, u64)>,
}

/// The kept logs whose bytes a restart holds again, oldest first (pure).
fn plan_held(kept: &[changelog::TrustedLog]) -> Vec<HeldPlan> {
    kept.iter()
        .map(|log| HeldPlan { log: log.path.clone(), ranges: log.in_image.clone() })
        .filter(|p| !p.ranges.is_empty())
        .collect()
}

/// Opens a VM's disks (blocking) and decides how it starts. `rec` is brought
/// up to the decision (a protection that starts over gets a new generation
/// and no point); the caller persists it.
pub fn open_vm(rec: &mut VmRecord, data_dir: &Path, now: UnixMillis) -> Result<OpenedDisks> {
    let scanned = rec.spec.disks.iter().map(|d| scan(&rec.spec.name, &d.name, &d.path)).collect::<Result<Vec<_>>>()?;
    let found: Vec<(String, LogsFound)> =
        rec.spec.disks.iter().zip(&scanned).map(|(d, s)| (d.name.clone(), s.found.clone())).collect();
    // A base copied whose commit was not made resumes like a copy (with nothing left to put).
    let copying = match rec.lifecycle.state {
        VmState::InitialReplication | VmState::Resynchronizing => true,
        VmState::FinalizingProtection => rec.last_point_seq == 0,
        _ => false,
    };
    let (copy, rebuilt) = match copying {
        true => match scan_copy(rec, data_dir, &scanned) {
            Ok((found, rebuilt)) => (found, rebuilt),
            Err(why) => (CopyFound::Unusable(why), Vec::new()),
        },
        false => (CopyFound::NotLooked, Vec::new()),
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
    if h.purpose == progress::CopyPurpose::Base && seq.is_some_and(|s| s <= rec.last_point_seq) {
        // The base was committed (the state change was not stored): no copy goes on.
        return Err("the initial copy's base point was already committed".into());
    }
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
        if !owned || !std::fs::symlink_metadata(&at.side).is_ok_and(|m| m.is_file()) {
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
        return Ok(Scanned::without_logs(LogsFound::Missing, next_seq));
    }
    Ok(match changelog::check_logs(disk, &logs, changelog::boot_id()) {
        Ok(kept) if kept.is_empty() => Scanned::without_logs(LogsFound::Missing, next_seq),
        Ok(kept) => Scanned {
            held: plan_held(&kept),
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
        Err(why) => Scanned::without_logs(LogsFound::Untrusted(why), next_seq),
    })
}

/// Writes every record of `logs` (consecutive logs of the chain, from the
/// oldest one a crashed daemon left open to the newest) onto the disk, in
/// order, then fdatasyncs the disk. The disk writes of the last records
/// may not have happened before the crash; replaying all of them leaves the
/// disk as the logs say (see `capture::disk`). They are replayed as one
/// sequence: two logs are left open when a crash comes between a rotation
/// and the seal of the old log, and a large write logged by range in the
/// newer one must not get an older payload written over it.
fn replay_onto_disk(logs: &[PathBuf], disk_path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let (image, size) = disk::open_image(disk_path)?;
    let mut files = Vec::new();
    // Every record in order, and the log (index into `files`) it is in.
    let (mut records, mut owner) = (Vec::new(), Vec::new());
    for (i, log) in logs.iter().enumerate() {
        let found = changelog::scan(log)?;
        if let Some(r) = found.records.iter().find(|r| r.offset.checked_add(r.len).is_none_or(|end| end > size)) {
            return Err(Error::corrupt(
                format!("HRL log {}", log.display()),
                format!("record {} ({} bytes at {}) lies past the end of the {size}-byte disk", r.seq, r.len, r.offset),
            ));
        }
        tracing::info!(log = %log.display(), records = found.records.len(), torn_bytes = found.torn_bytes,
            "replaying a change log a crash left onto its disk");
        files.push(std::fs::File::open(log).map_err(|e| Error::io(format!("opening HRL log {}", log.display()), e))?);
        owner.extend(std::iter::repeat_n(i, found.records.len()));
        records.extend(found.records);
    }
    let mut buf = Vec::new();
    for (k, pieces) in replay_pieces(&records) {
        let (file, r) = (&files[owner[k]], &records[k]);
        for (offset, len) in pieces {
            match r.kind {
                changelog::RecordKind::Write => {
                    buf.resize(len as usize, 0);
                    let skip = offset - r.offset;
                    let piece = changelog::RecordMeta { offset, len, payload_pos: r.payload_pos + skip, ..*r };
                    changelog::read_payload_into(file, &piece, &mut buf)?;
                    image
                        .write_all_at(&buf, offset)
                        .map_err(|e| Error::io(format!("replaying a write onto {}", disk_path.display()), e))?;
                }
                changelog::RecordKind::Zero => crate::capture::extents::zero_range(&image, offset, len)
                    .map_err(|e| Error::io(format!("replaying a zeroing onto {}", disk_path.display()), e))?,
                changelog::RecordKind::InImage => unreachable!("replay_pieces leaves in-image records out"),
            }
        }
    }
    image.sync_data().map_err(|e| Error::io(format!("sync {}", disk_path.display()), e))
}

/// What replaying records onto their disk writes (pure): the index of each
/// write or zeroing record, in order, with the pieces of its range that no later in-image record
/// covers. An in-image record's bytes are in the image already (its write
/// came after its record, and the record is there), and an earlier
/// record's payload must not overwrite them; in-image records themselves
/// write nothing.
fn replay_pieces(records: &[changelog::RecordMeta]) -> Vec<(usize, Vec<(u64, u64)>)> {
    use std::collections::BTreeMap;
    // start -> end of the ranges later in-image records cover, disjoint.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for (k, r) in records.iter().enumerate().rev() {
        let (start, end) = (r.offset, r.offset + r.len);
        if r.kind == changelog::RecordKind::InImage {
            let (mut s, mut e) = (start, end);
            let overlapping: Vec<(u64, u64)> =
                covered.range(..=end).rev().take_while(|&(_, &ce)| ce >= start).map(|(&cs, &ce)| (cs, ce)).collect();
            for (cs, ce) in overlapping {
                covered.remove(&cs);
                s = s.min(cs);
                e = e.max(ce);
            }
            covered.insert(s, e);
            continue;
        }
        let mut pieces = Vec::new();
        let mut at = start;
        let first = covered.range(..=start).next_back().filter(|&(_, &ce)| ce > start).map(|(&cs, &ce)| (cs, ce));
        for (cs, ce) in first.into_iter().chain(covered.range(start + 1..end).map(|(&cs, &ce)| (cs, ce))) {
            if cs > at {
                pieces.push((at, cs - at));
            }
            at = at.max(ce);
        }
        if at < end {
            pieces.push((at, end - at));
        }
        out.push((k, pieces));
    }
    out.reverse();
    out
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
                // From the oldest open log on, every kept log is replayed.
                if let Some(first) = kept.iter().position(|p| s.unsealed.contains(&p.path)) {
                    let logs: Vec<PathBuf> = kept[first..].iter().map(|p| p.path.clone()).collect();
                    replay_onto_disk(&logs, &spec.path)?;
                }
                for log in &s.unsealed {
                    changelog::seal_found(log)?;
                }
                // What a crash left in held side files is not needed (`capture::held`).
                for side in changelog::held_files(&spec.path)? {
                    changelog::remove_file_if_present(&side)?;
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
        if keep && matches!(s.found, LogsFound::Trusted(_)) {
            let held =
                s.held.iter().map(|h| HeldImage::create(&h.log, d.size(), &h.ranges)).collect::<Result<Vec<_>>>()?;
            d.install_held(held);
        }
        if let Some(r) = resumed {
            // Other side files of this disk belong to no snapshot.
            for side in snapshot::side_files(&spec.path).iter().filter(|f| **f != r.side) {
                changelog::remove_file_if_present(side)?;
            }
            d.resume_snapshot(Arc::new(CowSnapshot::reopen(&r.side, d.size(), r.blocks)?));
        } else {
            // No snapshot goes on: side files left by one (a crash after a
            // commit, before its release) are removed.
            for side in snapshot::side_files(&spec.path) {
                changelog::remove_file_if_present(&side)?;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use changelog::{RecordKind, RecordMeta};

    fn rec(seq: u64, kind: RecordKind, offset: u64, len: u64) -> RecordMeta {
        RecordMeta { seq, kind, offset, len, payload_pos: 1000 * seq }
    }

    #[test]
    fn replay_leaves_out_what_a_later_in_image_record_covers() {
        use RecordKind::{InImage as I, Write as W, Zero as Z};
        type Row = (Vec<(RecordKind, u64, u64)>, Vec<Vec<(u64, u64)>>);
        let table: Vec<Row> = vec![
            (vec![(W, 0, 10)], vec![vec![(0, 10)]]),
            // A write then an in-image write over its middle: head and tail only.
            (vec![(W, 0, 10), (I, 3, 4)], vec![vec![(0, 3), (7, 3)]]),
            // An in-image write before the write does not hide it.
            (vec![(I, 0, 10), (W, 2, 2)], vec![vec![(2, 2)]]),
            // Several later in-image ranges, adjacent ones merged, a zeroing too.
            (
                vec![(Z, 0, 100), (I, 10, 10), (I, 20, 5), (W, 50, 10), (I, 90, 20)],
                vec![vec![(0, 10), (25, 65)], vec![(50, 10)]],
            ),
            // Covered entirely: nothing to write.
            (vec![(W, 5, 5), (I, 0, 20)], vec![vec![]]),
            (vec![(W, 5, 5), (I, 0, 6), (I, 8, 20)], vec![vec![(6, 2)]]),
        ];
        for (records, want) in table {
            let records: Vec<RecordMeta> =
                records.iter().enumerate().map(|(i, &(k, o, l))| rec(i as u64 + 1, k, o, l)).collect();
            let got: Vec<Vec<(u64, u64)>> = replay_pieces(&records).into_iter().map(|(_, p)| p).collect();
            assert_eq!(got, want, "{records:?}");
            for (k, _) in replay_pieces(&records) {
                assert_ne!(records[k].kind, RecordKind::InImage);
            }
        }
    }

    fn trusted(path: &str, records: Vec<RecordMeta>) -> changelog::TrustedLog {
        changelog::TrustedLog {
            path: PathBuf::from(path),
            bytes: 0,
            sealed_ms: 0,
            header: changelog::LogHeader::new("vm", "a", 1, 0, 0),
            sealed: true,
            in_image: records.iter().filter(|r| r.kind == RecordKind::InImage).map(|r| (r.offset, r.len)).collect(),
        }
    }

    #[test]
    fn a_restart_holds_again_the_bytes_of_every_kept_log_with_in_image_records() {
        let kept = vec![
            trusted("/d/a.img.00000001.hrl", vec![rec(1, RecordKind::Write, 0, 10)]),
            trusted(
                "/d/a.img.00000002.hrl",
                vec![rec(1, RecordKind::InImage, 200, 300), rec(2, RecordKind::Zero, 0, 5)],
            ),
            trusted(
                "/d/a.img.00000003.hrl",
                vec![rec(1, RecordKind::InImage, 9, 1), rec(2, RecordKind::InImage, 1, 2)],
            ),
        ];
        let plans = plan_held(&kept);
        let got: Vec<(&Path, &[(u64, u64)])> = plans.iter().map(|p| (p.log.as_path(), &p.ranges[..])).collect();
        assert_eq!(
            got,
            [
                (Path::new("/d/a.img.00000002.hrl"), &[(200, 300)][..]),
                (Path::new("/d/a.img.00000003.hrl"), &[(9, 1), (1, 2)][..])
            ]
        );
    }

    /// A crash between a rotation and the seal of the old log leaves two
    /// open logs: a small write in the older one, then a large write over
    /// it (logged by range) in the newer one. The restart must keep the
    /// large write's bytes on the disk, and hold them for the next point.
    #[test]
    fn a_restart_with_two_open_logs_keeps_a_large_write_over_an_older_small_one() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.img");
        let size = 1u64 << 20;
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        {
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            let log = disk::new_log(&path, "vm", "a", 1, 0).unwrap();
            let d = Arc::new(Disk::new("vm", "a", &path, log, 0, tx).unwrap());
            d.write_at(4096, &[1u8; 4096], false).unwrap();
            let next = d.prepare_next_log().unwrap();
            let (old, _) = disk::rotate_all(std::slice::from_ref(&d), vec![next]).map_err(|(e, _)| e).unwrap();
            drop(old); // killed before the seal: the old log stays open
            let big = vec![2u8; 2 * crate::capture::disk::IN_IMAGE_MIN as usize];
            d.write_at(0, &big, false).unwrap();
            drop(d.close()); // killed: the new log stays open too
        }
        let before: Vec<u8> = std::fs::read(&path).unwrap();
        assert!(before[4096..8192].iter().all(|&b| b == 2));
        let spec =
            crate::model::VmSpec::new("vm", vec![crate::model::DiskSpec { name: "a".into(), path: path.clone() }]);
        let mut rec = VmRecord {
            spec,
            generation: 1,
            lifecycle: Lifecycle { state: VmState::Protected, ..Lifecycle::default() },
            last_point_seq: 1,
            protected_since_ms: 0,
            key_id: None,
            failover_restored: Vec::new(),
        };
        let opened = open_vm(&mut rec, &dir.path().join("data"), 10).unwrap();
        let Start::Resume { pending } = &opened.start else { panic!("the logs are trusted: {:?}", opened.start) };
        assert_eq!(pending[0].len(), 2, "both logs wait for the next point");
        let mut after = vec![0u8; size as usize];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut after, 0).unwrap();
        assert!(after == before, "the replay kept the large write");
        let d = &opened.disks[0];
        assert_eq!(d.held_images().len(), 1, "the newer log's bytes are held for its point");
        assert_eq!(d.held_images()[0].log(), changelog::log_path(&path, 2));
        drop(opened);
    }
}
