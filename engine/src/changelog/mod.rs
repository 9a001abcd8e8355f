//! HRL change logs: every guest write to a protected disk, in order.
//!
//! # Overview
//!
//! Each protected disk has one active log, beside the disk, named
//! `<disk file name>.<seq:08>.hrl` (`/vms/a.img` seq 3 is
//! `/vms/a.img.00000003.hrl`, see [`log_path`] and [`list_logs`]). A
//! replication cycle seals the active log ([`LogWriter::seal`]) and creates
//! the next one; the logs of a disk form a chain through `prev_log_id`
//! ([`check_chain`]). Sealed logs are [`scan`]ned, their records
//! [coalesced](Coalescer) (last write wins) and uploaded.
//!
//! - `format`: the byte layout (below), pure encode/decode.
//! - `writer`: [`LogWriter`], buffered appends, sync, seal.
//! - `reader`: [`scan`], [`recover`], [`read_payload`].
//! - `coalesce`: [`Coalescer`], records to disjoint [`Extent`]s.
//!
//! # Layout (version 1, all integers little endian)
//!
//! Header, 4096 bytes at offset 0:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 8 | magic `b"FERRYHRL"` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 64 | vm id: u16 byte length (1..=62), UTF-8 bytes, zero padding |
//! | 80 | 64 | disk id, same encoding |
//! | 144 | 8 | seq (also in the file name) |
//! | 152 | 8 | log_id, random, nonzero |
//! | 160 | 8 | prev_log_id, 0 for the first log of a chain |
//! | 168 | 8 | created_unix_ms |
//! | 176 | 4 | crc32c of bytes 0..176 |
//! | 180 | 3852 | reserved, 0 |
//! | 4032 | 64 | close block |
//!
//! Close block (all zeros while the log is open), offsets from 4032:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 4 | clean marker, `0x44534c43` (`b"CLSD"`) once sealed |
//! | 4 | 4 | reserved, 0 |
//! | 8 | 8 | record_count |
//! | 16 | 8 | end_offset: file length at close |
//! | 24 | 8 | last_record_seq |
//! | 32 | 4 | crc32c of bytes 0..32 of the block |
//! | 36 | 28 | reserved, 0 |
//!
//! Records follow the header back to back, each a 40-byte record header and,
//! for a write, `len` payload bytes:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 4 | magic `0x524c5248` (`b"HRLR"`) |
//! | 4 | 1 | kind: 1 write (payload follows), 2 zero range (no payload) |
//! | 5 | 3 | reserved, 0 |
//! | 8 | 8 | seq: 1 for the first record, then +1 per record |
//! | 16 | 8 | offset: disk byte offset |
//! | 24 | 8 | len: byte length of the range, > 0 |
//! | 32 | 4 | reserved, 0 |
//! | 36 | 4 | crc32c, seeded with crc32c(log_id as 8 LE bytes), over bytes 0..36 then the payload |
//!
//! Seeding the record crc with the log id means a record only verifies in the
//! log that wrote it: stale bytes from another log cannot pass for a record.
//!
//! # Crash consistency
//!
//! - **Create** writes the whole header with an all-zero close block to a
//!   file made with `O_EXCL`, fsyncs the file and then the directory, and
//!   only then returns. A log the caller holds therefore always has a valid
//!   header and a durable name; a crash inside `create` leaves at most a
//!   short or header-only file that the caller never wrote to (removed on
//!   error when possible).
//! - **Appends** are buffered and written with `pwrite` at the end of what
//!   was already written, in order, with no holes. Nothing is durable until
//!   [`LogWriter::sync`] (flush + fdatasync) or a group commit through
//!   [`LogWriter::file_for_sync`]; the engine acknowledges a guest FLUSH/FUA
//!   only after that. After a crash, the file is a durable prefix (every
//!   synced record) followed by any mix of later records, partial records or
//!   garbage/zeros: the torn tail.
//! - **Scan** accepts records while each has the record magic, a known kind,
//!   the next seq and a matching crc, and stops at the first that does not.
//!   Because records are contiguous and the synced prefix is intact, the
//!   accepted records include every synced one; the rest is the torn tail,
//!   which [`recover`] truncates (and fsyncs). It can never accept a record
//!   out of place: seq must be exactly the next one and the crc is tied to
//!   this log.
//! - **Seal** flushes and fdatasyncs the records *before* writing the close
//!   block, then fdatasyncs again. So a valid close block only ever describes
//!   records already durable: a sealed log must verify completely and match
//!   the block's record count, last seq and end offset, or it is corrupt
//!   (`Error::Corrupt`, never "repaired"). The close block is 64 bytes inside
//!   one 512-byte sector; if a crash tears it anyway, its crc fails and the
//!   log reads as not cleanly closed.
//! - **Failures**: after any failed append, flush or sync the writer is
//!   poisoned (a later append would follow a gap, and after a failed fsync
//!   the kernel may have dropped the dirty pages) and every call fails with
//!   class `NeedsResync`. A log that was not cleanly closed, or a broken
//!   chain, likewise means resync: the engine never trusts it as a complete
//!   record of the disk's writes.

mod coalesce;
mod format;
mod reader;
mod writer;

use std::path::{Path, PathBuf};

pub use coalesce::{Coalescer, Extent, ExtentSource};
pub use format::{
    LogHeader, RecordKind, RecordMeta, CLEAN_MARKER, CLOSE_BLOCK_OFFSET, FORMAT_VERSION, HEADER_SIZE, MAGIC,
    MAX_ID_LEN, RECORD_HEADER_SIZE, RECORD_MAGIC,
};
pub use reader::{read_payload, read_payload_into, recover, scan, LogScan};
pub use writer::{LogWriter, SealedLog, WRITE_BUFFER_SIZE};

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
        let Some(seq) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|n| n.strip_suffix(".hrl")) else {
            continue;
        };
        if !seq.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Only the canonical spelling, so each seq maps to one file.
        match seq.parse::<u64>() {
            Ok(n) if format!("{n:08}") == seq => logs.push((n, dir.join(&name))),
            _ => continue,
        }
    }
    logs.sort();
    Ok(logs)
}

/// Deletes every log beside the disk at `disk_path` (the one owner of that
/// policy). A log already gone counts as deleted, so two tasks racing to
/// drop the same chain never fail each other.
pub fn remove_logs(disk_path: &Path) -> Result<()> {
    for (_, p) in list_logs(disk_path)? {
        remove_file_if_present(&p)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
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
}
