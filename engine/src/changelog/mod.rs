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
//! - `writer`: [`LogWriter`], appends (in the kernel on return), sync, seal,
//!   and [`seal_found`] for a log a crashed daemon left open.
//! - `reader`: [`scan`], [`recover`], [`read_payload`].
//! - `coalesce`: [`Coalescer`], records to disjoint [`Extent`]s.
//!
//! # Layout (version 2, all integers little endian)
//!
//! Header, 4096 bytes at offset 0:
//!
//! | offset | size | field |
//! | ---: | ---: | --- |
//! | 0 | 8 | magic `b"FERRYHRL"` |
//! | 8 | 4 | format version, 2 (version 1 logs, without a boot id, are refused: resync) |
//! | 12 | 4 | reserved, 0 |
//! | 16 | 64 | vm id: u16 byte length (1..=62), UTF-8 bytes, zero padding |
//! | 80 | 64 | disk id, same encoding |
//! | 144 | 8 | seq (also in the file name) |
//! | 152 | 8 | log_id, random, nonzero |
//! | 160 | 8 | prev_log_id, 0 for the first log of a chain |
//! | 168 | 8 | created_unix_ms |
//! | 176 | 16 | boot id of the host when created (`/proc/sys/kernel/random/boot_id`), 0 if unknown |
//! | 192 | 4 | crc32c of bytes 0..192 |
//! | 196 | 3836 | reserved, 0 |
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
//! | 4 | 1 | kind: 1 write (payload follows), 2 zero range (no payload), 3 write whose bytes are in the disk image (no payload, see `capture::held`) |
//! | 5 | 3 | reserved, 0 |
//! | 8 | 8 | seq: 1 for the first record, then +1 per record |
//! | 16 | 8 | offset: disk byte offset |
//! | 24 | 8 | len: byte length of the range, > 0 |
//! | 32 | 4 | reserved, 0 |
//! | 36 | 4 | crc32c, seeded with crc32c(log_id as 8 LE bytes), over bytes 0..36 then the payload |
//!
//! Kind 3 came after the first version-2 logs; a reader that does not know
//! it stops there (a damaged log: resync), so the version stays 2.
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
//! - **Appends** are one `pwritev` each (record header and payload), made
//!   one after the other at the end of what was written, with no holes.
//!   When an append returns, the record is in the kernel: a crash of the
//!   daemon with the host up loses none of it. Durable against power loss
//!   after [`LogWriter::sync`] or a group commit through
//!   [`LogWriter::sync_plan`]; the engine acknowledges a guest FLUSH/FUA
//!   only after that. The file is kept longer than its records, filler
//!   ahead of them (so that appends overwrite and a sync needs no
//!   metadata, see `writer`). After a crash, the file is every appended
//!   record, then at most one partial record ([`Tail::Torn`]), then filler
//!   ([`Tail::Filler`] if there is no partial record);
//!   after a power loss, a durable prefix (every synced record) then
//!   anything: the boot id in the header tells the two apart, and only the
//!   first is trusted.
//! - **Scan** accepts records while each has the record magic, a known kind,
//!   the next seq and a matching crc, and stops at the first that does not.
//!   Because records are contiguous and the synced prefix is intact, the
//!   accepted records include every synced one; the rest is the torn tail,
//!   which [`recover`] truncates (and fsyncs) with the filler after it. It can never accept a record
//!   out of place: seq must be exactly the next one and the crc is tied to
//!   this log.
//! - **Seal** cuts the filler ahead, then fdatasyncs the records *before* writing the close
//!   block, then fdatasyncs again. So a valid close block only ever describes
//!   records already durable: a sealed log must verify completely and match
//!   the block's record count, last seq and end offset, or it is corrupt
//!   (`Error::Corrupt`, never "repaired"). The close block is 64 bytes inside
//!   one 512-byte sector; if a crash tears it anyway, its crc fails and the
//!   log reads as not cleanly closed.
//! - **Failures**: after any failed append, flush or sync the writer is
//!   poisoned (a later append would follow a gap, and after a failed fsync
//!   the kernel may have dropped the dirty pages) and every call fails with
//!   class `NeedsResync`; the engine then overwrites the log's magic
//!   ([`LogWriter::mark_untrusted`]) so a restart never trusts it. A log
//!   left open is trusted at a restart only under [`check_logs`]'s rules
//!   (same boot, at most a torn tail, unbroken chain); anything else means
//!   resync.

mod chain;
mod coalesce;
pub(crate) mod format;
mod reader;
mod writer;

pub use chain::{
    check_chain, check_logs, held_files, held_path, list_logs, log_path, remove_file_if_present, remove_logs,
    TrustedLog,
};
pub use coalesce::{Coalescer, Extent, ExtentSource};
pub use format::{
    boot_id, LogHeader, RecordKind, RecordMeta, CLEAN_MARKER, CLOSE_BLOCK_OFFSET, FORMAT_VERSION, HEADER_SIZE, MAGIC,
    MAX_ID_LEN, RECORD_HEADER_SIZE, RECORD_MAGIC,
};
pub use reader::{read_payload, read_payload_into, recover, scan, LogScan, Tail};
pub use writer::{seal_found, LogSync, LogWriter, Record, SealedLog, MAX_BATCH, PREALLOC_MIN, PREALLOC_STEP_MAX};
