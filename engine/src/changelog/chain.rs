//! The log chain beside a disk: naming, listing, the trust check a
//! restart makes, and removal. The one owner of "which files are this
//! disk's logs" and "delete every log beside a disk".
//!
//! Trust: a disk's logs describe every write since its last recovery point
//! only if each names the previous one's id ([`check_chain`]) and each is
//! cleanly closed or was left open by a daemon that died while the host
//! stayed up ([`check_logs`] says exactly when). Anything else (a log from
//! before a reboot, an unreadable or damaged one, a gap, a log marked
//! untrusted after a failed write) means the chain cannot be trusted and
//! the VM needs a resync.

use std::path::{Path, PathBuf};

use super::{scan, LogHeader, Tail};
use crate::{Error, Result};

/// The path of log `seq` of the disk at `disk_path`: same folder,
/// `<disk file name>.<seq:08>.hrl`.
pub fn log_path(disk_path: &Path, seq: u64) -> PathBuf {
    let mut name = disk_path.as_os_str().to_owned();
    name.push(format!(".{seq:08}.hrl"));
    PathBuf::from(name)
}

/// The logs of the disk at `disk_path`, sorted by seq. Only names that
/// [`log_path`] would produce count; other files are ignored.
pub fn list_logs(disk_path: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let disk_name = disk_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid("disk_path", format!("{} has no UTF-8 file name", disk_path.display())))?;
    let dir = match disk_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let prefix = format!("{disk_name}.");
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing HRL logs in {}", dir.display()), e))?;
    let mut logs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing HRL logs in {}", dir.display()), e))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|n| log_seq(n, &prefix)) {
            logs.push((n, dir.join(&name)));
        }
    }
    logs.sort();
    Ok(logs)
}

/// The seq of a log file named `<prefix><seq:08>.hrl`; only the canonical
/// spelling counts, so each seq maps to one file.
fn log_seq(name: &str, prefix: &str) -> Option<u64> {
    let seq = name.strip_prefix(prefix)?.strip_suffix(".hrl")?;
    if !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse::<u64>().ok().filter(|n| format!("{n:08}") == seq)
}

/// Deletes every log beside the disk at `disk_path` (the one owner of that
/// policy). A log already gone counts as deleted, so two tasks racing to
/// drop the same chain never fail each other.
pub fn remove_logs(disk_path: &Path) -> Result<()> {
    for (_, p) in list_logs(disk_path)? {
        remove_file_if_present(&p)?;
    }
    // The bytes held for them (`capture::held`) go with them.
    for p in held_files(disk_path)? {
        remove_file_if_present(&p)?;
    }
    Ok(())
}

/// The side file that holds the image bytes sealed log `log` names
/// (`capture::held`): `<log>.held`, which [`list_logs`] never lists.
pub fn held_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".held");
    PathBuf::from(p)
}

/// The held side files beside the disk at `disk_path`, sorted: those of
/// its logs ([`held_path`] of a name [`list_logs`] would list).
pub fn held_files(disk_path: &Path) -> Result<Vec<PathBuf>> {
    let Some(disk_name) = disk_path.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let prefix = format!("{disk_name}.");
    let dir = match disk_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("listing held files in {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("listing held files in {}", dir.display()), e))?;
        let name = entry.file_name();
        if name.to_str().and_then(|n| n.strip_suffix(".held")).and_then(|n| log_seq(n, &prefix)).is_some() {
            out.push(dir.join(&name));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes a file; one that is already gone is not an error.
pub fn remove_file_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(format!("remove {}", path.display()), e)),
        _ => Ok(()),
    }
}

/// Checks that `next` directly follows `prev` in a disk's chain. A broken
/// chain is `Error::Corrupt` (class `NeedsResync`) naming the mismatch.
pub fn check_chain(prev: &LogHeader, next: &LogHeader) -> Result<()> {
    let what = || format!("HRL chain of {}/{} at seq {}", prev.vm, prev.disk, next.seq);
    if prev.vm != next.vm || prev.disk != next.disk {
        return Err(Error::corrupt(
            what(),
            format!("log {} belongs to {}/{}, expected {}/{}", next.seq, next.vm, next.disk, prev.vm, prev.disk),
        ));
    }
    if prev.seq.checked_add(1) != Some(next.seq) {
        return Err(Error::corrupt(what(), format!("seq {} does not follow seq {}", next.seq, prev.seq)));
    }
    if next.prev_log_id != prev.log_id {
        return Err(Error::corrupt(
            what(),
            format!(
                "prev_log_id {:#018x} is not the log_id {:#018x} of log {}",
                next.prev_log_id, prev.log_id, prev.seq
            ),
        ));
    }
    Ok(())
}

/// A log that passed the trust check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedLog {
    pub path: PathBuf,
    /// Its length on disk (header, records and close block).
    pub bytes: u64,
    /// When it was sealed (its modification time).
    pub sealed_ms: u64,
    pub header: LogHeader,
    /// False for a log a crashed daemon left open: the caller replays it
    /// onto the disk and seals it as found ([`super::seal_found`]).
    pub sealed: bool,
    /// The ranges of its in-image records, in order (`capture::held`).
    pub in_image: Vec<(u64, u64)>,
}

/// Checks a disk's logs (as [`list_logs`] gives them) against the rules of
/// a restart: every log chained to the one before, and each either sealed,
/// or left open by a daemon that died on this boot of the host (`boot_id`,
/// see [`super::boot_id`]) with nothing after its records but one torn
/// record. A log is rotated out only when no change is in flight, so only
/// the newest log with records can end torn; logs after it may exist only
/// as the next log a rotation had prepared (open and empty). A newest log
/// whose header was never completely written (a crash inside its creation:
/// no more than a header's bytes, not marked untrusted) holds nothing and
/// is left out. Returns the logs kept, or why they cannot be trusted.
pub fn check_logs(disk: &str, logs: &[(u64, PathBuf)], boot_id: u128) -> std::result::Result<Vec<TrustedLog>, String> {
    let mut scans = Vec::new();
    for (i, (_, path)) in logs.iter().enumerate() {
        match scan(path) {
            Ok(s) => scans.push(s),
            Err(e) if i + 1 == logs.len() && unfinished_create(path) => {
                tracing::info!(log = %path.display(), error = %e, "a log whose creation a crash cut short is left out");
            }
            Err(e) => return Err(format!("change log {} is unreadable: {e}", path.display())),
        }
    }
    let mut out: Vec<TrustedLog> = Vec::new();
    for (i, scan) in scans.iter().enumerate() {
        let path = &logs[i].1;
        let shown = path.display();
        if !scan.clean {
            if scan.header.boot_id == 0 || scan.header.boot_id != boot_id {
                return Err(format!(
                    "change log {shown} of disk {disk} was left open before the host restarted \
                     (boot id {:032x}, now {boot_id:032x}): the page cache that held it is gone",
                    scan.header.boot_id
                ));
            }
            let only_prepared_after = scans[i + 1..].iter().all(|later| {
                !later.clean && later.records.is_empty() && matches!(later.tail, Tail::None | Tail::Filler)
            });
            match &scan.tail {
                Tail::None | Tail::Filler => {}
                Tail::Torn if only_prepared_after => {}
                Tail::Torn => {
                    return Err(format!(
                        "change log {shown} of disk {disk} ends in a torn record but is not the newest"
                    ))
                }
                Tail::Damaged(why) => return Err(format!("change log {shown} of disk {disk} is damaged: {why}")),
            }
        }
        if let Some(prev) = out.last() {
            check_chain(&prev.header, &scan.header)
                .map_err(|e| format!("broken change log chain on disk {disk}: {e}"))?;
        }
        let sealed_ms = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(scan.header.created_unix_ms, |d| d.as_millis() as u64);
        out.push(TrustedLog {
            path: path.clone(),
            bytes: if scan.clean { scan.file_len } else { scan.valid_len },
            sealed_ms,
            header: scan.header.clone(),
            sealed: scan.clean,
            in_image: scan
                .records
                .iter()
                .filter(|r| r.kind == super::RecordKind::InImage)
                .map(|r| (r.offset, r.len))
                .collect(),
        });
    }
    Ok(out)
}

/// A log file no longer than its header, not marked untrusted: what a
/// crash inside [`super::LogWriter::create`] leaves.
fn unfinished_create(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    bytes.len() as u64 <= super::HEADER_SIZE && !bytes.starts_with(super::writer::UNTRUSTED_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::error::ErrorKind;
    use crate::ErrorClass;

    #[test]
    fn log_paths_sit_beside_the_disk() {
        assert_eq!(log_path(Path::new("/vms/a.img"), 3), PathBuf::from("/vms/a.img.00000003.hrl"));
        assert_eq!(log_path(Path::new("a.img"), 123_456_789), PathBuf::from("a.img.123456789.hrl"));
    }

    #[test]
    fn list_logs_finds_only_this_disks_logs_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("a.img");
        for seq in [10, 2, 9, 100_000_000] {
            std::fs::write(log_path(&disk, seq), b"").unwrap();
        }
        for other in [
            "a.img",
            "a.img.2.hrl",
            "a.img.0000000x.hrl",
            "a.img.00000003.hrl.tmp",
            "b.img.00000001.hrl",
            "aa.img.00000001.hrl",
            "a.img.x.00000001.hrl",
        ] {
            std::fs::write(dir.path().join(other), b"").unwrap();
        }
        let got = list_logs(&disk).unwrap();
        let want: Vec<_> = [2, 9, 10, 100_000_000].into_iter().map(|s| (s, log_path(&disk, s))).collect();
        assert_eq!(got, want);
        assert_eq!(list_logs(&dir.path().join("none.img")).unwrap(), vec![]);
        assert_eq!(list_logs(&dir.path().join("gone/a.img")).unwrap_err().kind(), ErrorKind::Io);
    }

    #[test]
    fn chain_check_names_the_break() {
        let first = LogHeader::new("vm", "d0", 1, 0, 0);
        let second = first.successor(10);
        check_chain(&first, &second).unwrap();
        check_chain(&second, &second.successor(20)).unwrap();

        let cases: Vec<(LogHeader, &str)> = vec![
            (LogHeader { vm: "other".into(), ..second.clone() }, "belongs to other/d0"),
            (LogHeader { disk: "d1".into(), ..second.clone() }, "belongs to vm/d1"),
            (LogHeader { seq: 3, ..second.clone() }, "seq 3 does not follow seq 1"),
            (LogHeader { seq: 1, ..second.clone() }, "seq 1 does not follow seq 1"),
            (LogHeader { prev_log_id: first.log_id ^ 1, ..second.clone() }, "prev_log_id"),
            (LogHeader::new("vm", "d0", 2, 0, 0), "prev_log_id 0x0000000000000000"),
        ];
        for (next, expect) in cases {
            let err = check_chain(&first, &next).unwrap_err();
            assert_eq!(err.class(), ErrorClass::NeedsResync);
            assert!(err.to_string().contains(expect), "{err}");
        }
        assert_ne!(first.log_id, second.log_id);
        assert_ne!(first.log_id, 0);
    }

    #[test]
    fn a_chain_of_logs_on_disk_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("a.img");
        let mut header = LogHeader::new("vm", "a", 1, 0, 0);
        for _ in 0..3 {
            let mut w = LogWriter::create(&log_path(&disk, header.seq), &header).unwrap();
            w.append_write(0, b"x").unwrap();
            w.seal().unwrap();
            header = header.successor(0);
        }
        let headers: Vec<_> = list_logs(&disk).unwrap().iter().map(|(_, p)| scan(p).unwrap().header).collect();
        assert_eq!(headers.len(), 3);
        for pair in headers.windows(2) {
            check_chain(&pair[0], &pair[1]).unwrap();
        }
        assert!(check_chain(&headers[0], &headers[2]).is_err());
    }

    /// Writes a chain of `n` logs beside `disk`, each with `records[i]`
    /// records, sealing the first `sealed`; returns their paths.
    fn chain_of(disk: &Path, records: &[usize], sealed: usize) -> Vec<(u64, PathBuf)> {
        let mut header = LogHeader::new("vm", "a", 1, 0, 0);
        for (i, n) in records.iter().enumerate() {
            let mut w = LogWriter::create(&log_path(disk, header.seq), &header).unwrap();
            for r in 0..*n {
                w.append_write(r as u64 * 4096, &[r as u8 + 1; 100]).unwrap();
            }
            if i < sealed {
                w.seal().unwrap();
            }
            header = header.successor(0);
        }
        list_logs(disk).unwrap()
    }

    /// Tears the last record of an open log: its last `by` bytes become
    /// the filler its writer wrote ahead (what a kill mid-append leaves).
    fn cut(path: &Path, by: u64) {
        use std::os::unix::fs::FileExt;
        let s = crate::changelog::scan(path).unwrap();
        let filler = crate::changelog::format::filler_bytes(s.header.log_id, s.valid_len - by, by as usize);
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&filler, s.valid_len - by).unwrap();
    }

    #[test]
    fn restart_trust_rules() {
        let boot = super::super::boot_id();
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        let mut disk = || {
            n += 1;
            dir.path().join(format!("d{n}.img"))
        };
        // Sealed, then open with a torn last record: trusted, the open one to replay.
        let d = disk();
        let logs = chain_of(&d, &[2, 3], 1);
        cut(&logs[1].1, 50);
        let kept = check_logs("a", &logs, boot).unwrap();
        assert_eq!(kept.iter().map(|l| l.sealed).collect::<Vec<_>>(), vec![true, false]);
        // The same after another boot: refused, naming it.
        let err = check_logs("a", &logs, boot ^ 1).unwrap_err();
        assert!(err.contains("left open before the host restarted"), "{err}");
        // Torn, then the empty log a rotation had prepared: trusted.
        let d = disk();
        let logs = chain_of(&d, &[2, 3, 0], 1);
        cut(&logs[1].1, 50);
        assert_eq!(check_logs("a", &logs, boot).unwrap().len(), 3);
        // Torn, then a log with records: not a crash shape.
        let d = disk();
        let logs = chain_of(&d, &[2, 3, 1], 1);
        cut(&logs[1].1, 50);
        let err = check_logs("a", &logs, boot).unwrap_err();
        assert!(err.contains("torn record but is not the newest"), "{err}");
        // A newest log whose creation was cut short is left out.
        let d = disk();
        let logs = chain_of(&d, &[2, 1], 1);
        std::fs::write(&logs[1].1, [0x46u8, 0x45, 0x52]).unwrap();
        let kept = check_logs("a", &logs, boot).unwrap();
        assert_eq!(kept.len(), 1);
        // ... but one marked untrusted is not.
        std::fs::write(&logs[1].1, b"FERRYBAD").unwrap();
        let err = check_logs("a", &logs, boot).unwrap_err();
        assert!(err.contains("unreadable"), "{err}");
        // A short file in the middle is not a creation cut short.
        let d = disk();
        let logs = chain_of(&d, &[2, 1, 1], 1);
        std::fs::write(&logs[1].1, [0u8; 10]).unwrap();
        assert!(check_logs("a", &logs, boot).unwrap_err().contains("unreadable"));
    }

    #[test]
    fn only_a_record_cut_short_at_the_end_is_a_torn_tail() {
        use crate::changelog::{scan, Tail, HEADER_SIZE, RECORD_HEADER_SIZE};
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("a.img");
        let logs = chain_of(&disk, &[3], 0);
        let path = &logs[0].1;
        // The records alone, without the filler the writer wrote ahead of them.
        let mut whole = std::fs::read(path).unwrap();
        let log_id = scan(path).unwrap().header.log_id;
        whole.truncate(scan(path).unwrap().valid_len as usize);
        let filler_to = |bytes: Vec<u8>, len: usize| {
            let at = bytes.len();
            [bytes, crate::changelog::format::filler_bytes(log_id, at as u64, len - at)].concat()
        };
        let rec = RECORD_HEADER_SIZE + 100;
        let third = HEADER_SIZE + 2 * rec;
        let tail_of = |bytes: &[u8]| {
            std::fs::write(path, bytes).unwrap();
            scan(path).unwrap().tail
        };
        assert_eq!(tail_of(&whole), Tail::None);
        assert_eq!(tail_of(&filler_to(whole.clone(), whole.len() + 5000)), Tail::Filler, "filler written ahead");
        let torn_over_filler = filler_to(whole[..(third + 60) as usize].to_vec(), whole.len() + 5000);
        assert_eq!(tail_of(&torn_over_filler), Tail::Torn, "a payload cut short over the filler written ahead");
        assert_eq!(tail_of(&whole[..(third + 20) as usize]), Tail::Torn, "a header cut short");
        assert_eq!(tail_of(&whole[..(third + 60) as usize]), Tail::Torn, "a payload cut short");
        // A complete last record that fails its check is damage.
        let mut bad = whole.clone();
        bad[(third + RECORD_HEADER_SIZE + 5) as usize] ^= 1;
        assert!(matches!(tail_of(&bad), Tail::Damaged(_)));
        // So is a record in the middle whose length was damaged to run past the end.
        let mut bad = whole.clone();
        let len_at = (HEADER_SIZE + rec + 24) as usize;
        bad[len_at..len_at + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(matches!(tail_of(&bad), Tail::Damaged(_)), "only the last record can be cut short");
        // And 40 bytes of garbage after the records.
        let mut bad = whole.clone();
        bad.extend_from_slice(&[0xAB; 40]);
        assert!(matches!(tail_of(&bad), Tail::Damaged(_)));
        let _ = std::fs::File::open(path).unwrap().read_at(&mut [0u8; 1], 0);
    }
}
