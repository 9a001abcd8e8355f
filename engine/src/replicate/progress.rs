//! The progress journal of a snapshot copy (an initial copy, or a resync):
//! which parts of its point are durably on the target, so a copy
//! interrupted by a crash of ferryd resumes instead of starting over.
//!
//! Overview: one file per VM (`<data-dir>/progress/<vm>.copy`, see
//! [`crate::paths`]), JSON lines. The first line, written when the snapshot
//! is taken, binds the journal to that snapshot: generation, snapshot time,
//! part size, and per disk its side file and where its change log stood at
//! the snapshot instant (log seq, records in it). Each later line is one
//! part put: point seq, disk, part, the object descriptor the manifest needs
//! and the part's block hashes (the replica's hashes for resync).
//!
//! Why a journal, not a listing of the target: a listing shows which keys
//! exist, but the manifest needs each object's checksum and lengths, and
//! the kept hashes need the block hashes, which would mean reading every
//! object back (a 1 TB disk is 1 TB of reads); an object also exists on the
//! target before its put has returned, which says nothing about whether it
//! is whole. The journal is small (one line per part) and is written on
//! the copier's side, where the facts are known.
//!
//! Crash-consistency: a part's line is appended and fdatasynced after its
//! put returned and before its blocks are marked copied in the snapshot
//! (`capture::snapshot`), so a part the journal lists is whole on the
//! target, and a part it does not list is copied again (its blocks were
//! still preserved). The header is fsynced (file and folder) before any
//! part is put. A torn last line (a crash mid-append) is ignored: that part
//! is copied again. Any other damage makes the journal unreadable, and
//! protection starts over (`vm::restart`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::replica::manifest::ObjectRef;

pub const PROGRESS_FORMAT: u32 = 1;

/// Where a disk stood when its snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAtSnapshot {
    pub name: String,
    /// Bytes of the disk then (a disk resized since cannot resume).
    pub size: u64,
    /// The snapshot's side file.
    pub side: PathBuf,
    /// The active change log then (None: the disk was not logging, and the
    /// copy cannot be resumed).
    pub log_seq: Option<u64>,
    /// Records in that log then: later records are changes since the snapshot.
    pub log_records: u64,
}

/// What a snapshot copy makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CopyPurpose {
    /// The base point of a protection (initial replication).
    #[default]
    Base,
    /// A resync's point: each block compared with the replica as of point
    /// `compared_with` and only differing ones put (None: the replica
    /// could not be compared with, every block is put, as a new base).
    Resync { compared_with: Option<u64> },
}

/// The journal's first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressHeader {
    pub format: u32,
    /// Journals written before resyncs kept one are initial copies.
    #[serde(default)]
    pub purpose: CopyPurpose,
    pub vm: String,
    pub generation: u64,
    pub snapshot_ms: u64,
    /// Bytes of disk per part (the engine's chunk size then).
    pub chunk_size: u64,
    /// Block size of the hashes in each part line.
    pub hash_block: u64,
    pub disks: Vec<DiskAtSnapshot>,
}

/// One part durably on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDone {
    /// The point the part was put under (its key names it).
    pub seq: u64,
    /// Index of the disk in the header.
    pub disk: usize,
    pub part: u64,
    /// None: the part was all zeros and needs no object.
    pub object: Option<ObjectRef>,
    pub hashes: Vec<u64>,
}

/// A journal read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub header: ProgressHeader,
    pub parts: Vec<PartDone>,
}

impl Progress {
    /// The parts of `disk` put under point `seq`.
    pub fn parts_of(&self, disk: usize, seq: u64) -> impl Iterator<Item = &PartDone> {
        self.parts.iter().filter(move |p| p.disk == disk && p.seq == seq)
    }

    /// The point the copy put its parts under (the newest line's), if any.
    pub fn seq(&self) -> Option<u64> {
        self.parts.last().map(|p| p.seq)
    }
}

/// Parses a journal (pure). A last line without its newline is a torn
/// append and is left out; every other line must parse.
pub fn parse(what: &str, text: &[u8]) -> Result<Progress> {
    let complete = match text.iter().rposition(|b| *b == b'\n') {
        Some(i) => &text[..=i],
        None => &[][..],
    };
    let mut lines = complete.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let first = lines.next().ok_or_else(|| Error::corrupt(what, "no header"))?;
    let header: ProgressHeader =
        serde_json::from_slice(first).map_err(|e| Error::corrupt(what, format!("header: {e}")))?;
    if header.format != PROGRESS_FORMAT {
        return Err(Error::corrupt(what, format!("unknown format {}", header.format)));
    }
    let mut parts = Vec::new();
    for (i, line) in lines.enumerate() {
        let p: PartDone =
            serde_json::from_slice(line).map_err(|e| Error::corrupt(what, format!("line {}: {e}", i + 2)))?;
        if p.disk >= header.disks.len() {
            return Err(Error::corrupt(what, format!("line {}: disk {} is not in the header", i + 2, p.disk)));
        }
        parts.push(p);
    }
    Ok(Progress { header, parts })
}

/// Reads the journal at `path`; `Ok(None)` if there is none.
pub fn load(path: &Path) -> Result<Option<Progress>> {
    match std::fs::read(path) {
        Ok(text) => parse(&format!("copy progress {}", path.display()), &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read copy progress {}", path.display()), e)),
    }
}

/// Deletes the journal (the base committed, or protection starts over).
pub fn remove(path: &Path) -> Result<()> {
    crate::changelog::remove_file_if_present(path)
}

/// An open journal the copier appends to.
pub struct ProgressJournal {
    path: PathBuf,
    file: Mutex<File>,
}

impl ProgressJournal {
    /// Starts a journal for a new snapshot (replacing any older one),
    /// durably: header written, file and folder synced.
    pub fn create(path: &Path, header: &ProgressHeader) -> Result<Self> {
        let io = |what: &str, e| Error::io(format!("{what} copy progress {}", path.display()), e);
        let dir = path.parent().ok_or_else(|| Error::Internal(format!("{} has no folder", path.display())))?;
        crate::paths::create_private_dirs(dir).map_err(|e| io("create the folder of", e))?;
        let tmp = path.with_extension("copy.tmp");
        let mut line = serde_json::to_vec(header).map_err(|e| Error::Internal(format!("encode progress: {e}")))?;
        line.push(b'\n');
        {
            let mut f = crate::paths::create_private(&tmp).map_err(|e| io("create", e))?;
            f.write_all(&line).map_err(|e| io("write", e))?;
            f.sync_all().map_err(|e| io("sync", e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| io("rename", e))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("sync the folder of", e))?;
        Self::open(path)
    }

    /// Opens an existing journal to append to. A last line torn by a crash
    /// (no newline yet) is cut first, so the next line starts on its own.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |what: &str, e| Error::io(format!("{what} copy progress {}", path.display()), e);
        let bytes = std::fs::read(path).map_err(|e| io("read", e))?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let file = OpenOptions::new().append(true).open(path).map_err(|e| io("open", e))?;
        if whole < bytes.len() {
            file.set_len(whole as u64).and_then(|()| file.sync_data()).map_err(|e| io("cut the torn line of", e))?;
        }
        Ok(ProgressJournal { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    /// Records a part put, durably (blocking): appended, then fdatasynced.
    pub fn append(&self, part: &PartDone) -> Result<()> {
        let mut line = serde_json::to_vec(part).map_err(|e| Error::Internal(format!("encode progress: {e}")))?;
        line.push(b'\n');
        let mut f = self.file.lock().expect("journal lock is never poisoned");
        f.write_all(&line)
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io(format!("append to copy progress {}", self.path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ProgressHeader {
        ProgressHeader {
            format: PROGRESS_FORMAT,
            purpose: CopyPurpose::Resync { compared_with: Some(3) },
            vm: "vm".into(),
            generation: 7,
            snapshot_ms: 100,
            chunk_size: 1 << 20,
            hash_block: 64 << 10,
            disks: vec![DiskAtSnapshot {
                name: "a".into(),
                size: 1 << 30,
                side: "/d/a.ferry-snap.1".into(),
                log_seq: Some(1),
                log_records: 3,
            }],
        }
    }

    fn part(n: u64) -> PartDone {
        let object = ObjectRef { key: format!("k{n}"), checksum: n, stored_len: 10, logical_len: 20 };
        PartDone { seq: 1, disk: 0, part: n, object: Some(object), hashes: vec![n, n + 1] }
    }

    #[test]
    fn a_journal_reads_back_and_a_torn_last_line_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress").join("vm.copy");
        assert_eq!(load(&path).unwrap(), None);
        let j = ProgressJournal::create(&path, &header()).unwrap();
        j.append(&part(0)).unwrap();
        j.append(&part(2)).unwrap();
        let got = load(&path).unwrap().unwrap();
        assert_eq!(got, Progress { header: header(), parts: vec![part(0), part(2)] });
        assert_eq!(got.seq(), Some(1));
        assert_eq!(got.parts_of(0, 1).count(), 2);
        assert_eq!(got.parts_of(0, 2).count(), 0);
        // A crash mid-append leaves part of a line: that part is copied again.
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(br#"{"seq":1,"disk":0,"par"#);
        assert_eq!(parse("p", &text).unwrap().parts.len(), 2);
        // Reopened after that crash, the torn piece is cut: the next line
        // starts on its own and the journal stays readable.
        std::fs::write(&path, &text).unwrap();
        let j = ProgressJournal::open(&path).unwrap();
        j.append(&part(5)).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().parts, vec![part(0), part(2), part(5)]);
        // A new snapshot replaces the journal.
        ProgressJournal::create(&path, &header()).unwrap();
        assert!(load(&path).unwrap().unwrap().parts.is_empty());
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load(&path).unwrap(), None);
    }

    #[test]
    fn damage_is_named_not_trusted() {
        let mut good = serde_json::to_vec(&header()).unwrap();
        good.push(b'\n');
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "no header"),
            (b"{\n".to_vec(), "header"),
            (
                [good.clone(), b"garbage\n".to_vec(), serde_json::to_vec(&part(1)).unwrap(), b"\n".to_vec()].concat(),
                "line 2",
            ),
            (
                [good.clone(), serde_json::to_vec(&PartDone { disk: 3, ..part(1) }).unwrap(), b"\n".to_vec()].concat(),
                "disk 3",
            ),
            (
                serde_json::to_vec(&ProgressHeader { format: 9, ..header() })
                    .unwrap()
                    .into_iter()
                    .chain(*b"\n")
                    .collect(),
                "unknown format 9",
            ),
        ];
        for (text, want) in cases {
            let e = parse("copy progress p", &text).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("copy progress p"), "{e} lacks {want}");
        }
    }
}
