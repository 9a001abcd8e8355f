//! The on-disk layout of an HRL file: header, close block and record header.
//!
//! Everything here is pure (bytes in, bytes out); the writer and the reader
//! do the I/O. The byte-level layout is documented in the parent module.

use crate::{Error, Result};

/// Size of the fixed header at offset 0; the first record starts here.
pub const HEADER_SIZE: u64 = 4096;
/// First eight bytes of every HRL file.
pub const MAGIC: [u8; 8] = *b"FERRYHRL";
/// The only format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 2;
/// Longest VM or disk id, in UTF-8 bytes (a 64-byte field minus its u16 length).
pub const MAX_ID_LEN: usize = ID_FIELD_SIZE - 2;
/// File offset of the close block. It is the last 64 bytes of the header and
/// lies inside one 512-byte sector, so devices write it atomically in practice;
/// its crc catches the case where one does not.
pub const CLOSE_BLOCK_OFFSET: u64 = HEADER_SIZE - CLOSE_BLOCK_SIZE as u64;
/// Clean-close marker ("CLSD" little endian); 0 while the log is open.
pub const CLEAN_MARKER: u32 = u32::from_le_bytes(*b"CLSD");
/// First four bytes of every record ("HRLR" little endian).
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"HRLR");
/// Size of the fixed record header that precedes each payload.
pub const RECORD_HEADER_SIZE: u64 = 40;

pub(crate) const CLOSE_BLOCK_SIZE: usize = 64;
const ID_FIELD_SIZE: usize = 64;

// Header field offsets.
const H_VERSION: usize = 8;
const H_VM: usize = 16;
const H_DISK: usize = H_VM + ID_FIELD_SIZE; // 80
const H_SEQ: usize = H_DISK + ID_FIELD_SIZE; // 144
const H_LOG_ID: usize = H_SEQ + 8; // 152
const H_PREV_LOG_ID: usize = H_LOG_ID + 8; // 160
const H_CREATED: usize = H_PREV_LOG_ID + 8; // 168
const H_BOOT_ID: usize = H_CREATED + 8; // 176
const H_CRC: usize = H_BOOT_ID + 16; // 192

// Close block field offsets, relative to CLOSE_BLOCK_OFFSET.
const C_MARKER: usize = 0;
const C_RECORD_COUNT: usize = 8;
const C_END_OFFSET: usize = 16;
const C_LAST_SEQ: usize = 24;
const C_CRC: usize = 32;

// Record header field offsets.
const R_KIND: usize = 4;
const R_SEQ: usize = 8;
const R_OFFSET: usize = 16;
const R_LEN: usize = 24;
const R_CRC: usize = 36;

/// Identity of one log: who it belongs to and where it sits in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LogHeader {
    /// VM id, at most [`MAX_ID_LEN`] UTF-8 bytes.
    pub vm: String,
    /// Disk id within the VM, at most [`MAX_ID_LEN`] UTF-8 bytes.
    pub disk: String,
    /// Position of this log in the disk's chain; also in its file name.
    pub seq: u64,
    /// Random, nonzero; the next log names it in `prev_log_id`.
    pub log_id: u64,
    /// `log_id` of the previous log of the chain, 0 for the first log.
    pub prev_log_id: u64,
    /// Wall-clock creation time, informational.
    pub created_unix_ms: u64,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`) when the
    /// log was created; 0 when unknown. A log that was not sealed is trusted
    /// after a crash of the daemon only while the host has not rebooted since:
    /// the page cache, which holds every record handed to the kernel, then
    /// still stands.
    pub boot_id: u128,
}

impl LogHeader {
    /// The first log of a chain (or any log with an explicit predecessor id),
    /// with a fresh random `log_id`. Time is an input so tests control it.
    pub fn new(
        vm: impl Into<String>,
        disk: impl Into<String>,
        seq: u64,
        prev_log_id: u64,
        created_unix_ms: u64,
    ) -> LogHeader {
        LogHeader {
            vm: vm.into(),
            disk: disk.into(),
            seq,
            log_id: random_log_id(),
            prev_log_id,
            created_unix_ms,
            boot_id: boot_id(),
        }
    }

    /// The header of the log that follows this one in the chain.
    pub fn successor(&self, created_unix_ms: u64) -> LogHeader {
        LogHeader::new(self.vm.clone(), self.disk.clone(), self.seq + 1, self.log_id, created_unix_ms)
    }

    /// Checks what the encoding cannot represent, before any file exists.
    pub(crate) fn validate(&self) -> Result<()> {
        for (field, value) in [("vm", &self.vm), ("disk", &self.disk)] {
            if value.is_empty() {
                return Err(Error::invalid(field, "empty id"));
            }
            if value.len() > MAX_ID_LEN {
                return Err(Error::invalid(
                    field,
                    format!("{} bytes, at most {MAX_ID_LEN} fit in an HRL header", value.len()),
                ));
            }
        }
        if self.log_id == 0 {
            return Err(Error::invalid("log_id", "must be nonzero"));
        }
        Ok(())
    }

    /// The full 4096-byte header with an all-zero (open) close block.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, H_VERSION, FORMAT_VERSION);
        put_id(&mut b, H_VM, &self.vm);
        put_id(&mut b, H_DISK, &self.disk);
        put_u64(&mut b, H_SEQ, self.seq);
        put_u64(&mut b, H_LOG_ID, self.log_id);
        put_u64(&mut b, H_PREV_LOG_ID, self.prev_log_id);
        put_u64(&mut b, H_CREATED, self.created_unix_ms);
        b[H_BOOT_ID..H_BOOT_ID + 16].copy_from_slice(&self.boot_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..H_CRC]);
        put_u32(&mut b, H_CRC, crc);
        Ok(b)
    }

    /// Parses the identity part of a header; the reason names the bad field.
    pub(crate) fn decode(b: &[u8]) -> std::result::Result<LogHeader, String> {
        if b.len() < HEADER_SIZE as usize {
            return Err(format!("header is {} bytes, expected {HEADER_SIZE}", b.len()));
        }
        if b[..8] != MAGIC {
            return Err(format!("bad magic {:02x?}, expected \"FERRYHRL\"", &b[..8]));
        }
        let version = get_u32(b, H_VERSION);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported format version {version}, expected {FORMAT_VERSION}"));
        }
        let stored = get_u32(b, H_CRC);
        let actual = crc32c::crc32c(&b[..H_CRC]);
        if stored != actual {
            return Err(format!("header checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"));
        }
        let header = LogHeader {
            vm: get_id(b, H_VM).map_err(|r| format!("vm id: {r}"))?,
            disk: get_id(b, H_DISK).map_err(|r| format!("disk id: {r}"))?,
            seq: get_u64(b, H_SEQ),
            log_id: get_u64(b, H_LOG_ID),
            prev_log_id: get_u64(b, H_PREV_LOG_ID),
            created_unix_ms: get_u64(b, H_CREATED),
            boot_id: u128::from_le_bytes(b[H_BOOT_ID..H_BOOT_ID + 16].try_into().expect("16 bytes")),
        };
        if header.log_id == 0 {
            return Err("log_id is 0".into());
        }
        Ok(header)
    }
}

/// This boot of the host: `/proc/sys/kernel/random/boot_id` as a number,
/// read once; 0 when it cannot be read (then no unsealed log is trusted).
pub fn boot_id() -> u128 {
    static BOOT_ID: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().and_then(|s| parse_boot_id(&s)).unwrap_or(0)
    })
}

/// A boot id as the kernel prints it (a UUID with dashes) as a number.
fn parse_boot_id(s: &str) -> Option<u128> {
    let hex: String = s.trim().chars().filter(|c| *c != '-').collect();
    (hex.len() == 32).then(|| u128::from_str_radix(&hex, 16).ok()).flatten()
}

fn random_log_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// What the writer records when it seals a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseBlock {
    pub record_count: u64,
    pub end_offset: u64,
    pub last_record_seq: u64,
}

/// The state of the close block as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseState {
    /// All zeros: the log was never sealed.
    Open,
    /// Marker and crc are valid.
    Clean(CloseBlock),
    /// Neither zero nor valid: a seal torn by a crash, or damage.
    Invalid(String),
}

impl CloseBlock {
    pub(crate) fn encode(&self) -> [u8; CLOSE_BLOCK_SIZE] {
        let mut b = [0u8; CLOSE_BLOCK_SIZE];
        put_u32(&mut b, C_MARKER, CLEAN_MARKER);
        put_u64(&mut b, C_RECORD_COUNT, self.record_count);
        put_u64(&mut b, C_END_OFFSET, self.end_offset);
        put_u64(&mut b, C_LAST_SEQ, self.last_record_seq);
        let crc = crc32c::crc32c(&b[..C_CRC]);
        put_u32(&mut b, C_CRC, crc);
        b
    }

    /// `b` is the whole header; the close block is read at its fixed offset.
    pub(crate) fn decode(header: &[u8]) -> CloseState {
        let b = &header[CLOSE_BLOCK_OFFSET as usize..HEADER_SIZE as usize];
        if b.iter().all(|&x| x == 0) {
            return CloseState::Open;
        }
        let marker = get_u32(b, C_MARKER);
        if marker != CLEAN_MARKER {
            return CloseState::Invalid(format!("close marker {marker:#010x}"));
        }
        let stored = get_u32(b, C_CRC);
        let actual = crc32c::crc32c(&b[..C_CRC]);
        if stored != actual {
            return CloseState::Invalid(format!(
                "close block checksum mismatch: stored {stored:#010x}, computed {actual:#010x}"
            ));
        }
        CloseState::Clean(CloseBlock {
            record_count: get_u64(b, C_RECORD_COUNT),
            end_offset: get_u64(b, C_END_OFFSET),
            last_record_seq: get_u64(b, C_LAST_SEQ),
        })
    }
}

/// What a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// `len` bytes of data, stored as the payload.
    Write,
    /// `len` bytes of zeros (WRITE_ZEROES, TRIM); no payload.
    Zero,
    /// `len` bytes written whose bytes are in the disk image, not in the
    /// log (a large write: see `capture::held`); no payload. A sealed
    /// log's in-image ranges are read from the image through its held
    /// side file, as they were when the log was rotated out.
    InImage,
}

impl RecordKind {
    fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Zero => 2,
            RecordKind::InImage => 3,
        }
    }

    fn from_code(code: u8) -> Option<RecordKind> {
        match code {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::InImage),
            _ => None,
        }
    }
}

/// One record found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordMeta {
    /// 1, 2, 3 ... within one log.
    pub seq: u64,
    pub kind: RecordKind,
    /// Disk byte offset of the range.
    pub offset: u64,
    /// Byte length of the range (and of the payload, for a write).
    pub len: u64,
    /// File offset of the payload in the log, for a write; for a zero record,
    /// where a payload would start (nothing is stored there).
    pub payload_pos: u64,
}

impl RecordMeta {
    /// Bytes the record takes in the log file.
    pub fn stored_len(&self) -> u64 {
        RECORD_HEADER_SIZE + self.payload_len()
    }

    /// Bytes of payload stored in the log (0 for a zero or in-image record).
    pub fn payload_len(&self) -> u64 {
        match self.kind {
            RecordKind::Write => self.len,
            RecordKind::Zero | RecordKind::InImage => 0,
        }
    }
}

/// A record header as parsed, before its crc is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: RecordKind,
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// Record crcs start from the crc of the log id, so a record can only
/// validate inside the log that wrote it (a stale block of another log, or a
/// record copied between logs, fails its check).
pub(crate) fn record_crc_seed(log_id: u64) -> u32 {
    crc32c::crc32c(&log_id.to_le_bytes())
}

/// The 8-byte pattern an open log's writer writes ahead of its records
/// (`writer`): byte `o` of the file is `filler(log_id)[o % 8]`. Derived from
/// the log id and without zero bytes, so neither zeros (a record's own
/// zero bytes, a zeroed block) nor another log's filler pass for it; it
/// cannot pass for a record either (a record verifies only with the log's
/// crc seed and the next seq).
pub(crate) fn filler(log_id: u64) -> [u8; 8] {
    let mut b = (log_id.rotate_left(23) ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
    for x in &mut b {
        if *x == 0 {
            *x = 0x5a;
        }
    }
    b
}

/// `len` bytes of the filler of `log_id` as they lie from file offset `at`
/// (tests: what a writer leaves ahead of its records).
#[cfg(test)]
pub(crate) fn filler_bytes(log_id: u64, at: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    fill_at(log_id, at, &mut b);
    b
}

/// Fills `buf` with the filler of `log_id` as it lies at file offset `at`.
pub(crate) fn fill_at(log_id: u64, at: u64, buf: &mut [u8]) {
    let pat = filler(log_id);
    for (i, x) in buf.iter_mut().enumerate() {
        *x = pat[((at + i as u64) % 8) as usize];
    }
}

/// Encodes a record header and returns it with its crc filled in.
pub(crate) fn encode_record_header(
    seed: u32,
    kind: RecordKind,
    seq: u64,
    offset: u64,
    len: u64,
    payload: &[u8],
) -> [u8; RECORD_HEADER_SIZE as usize] {
    let mut b = [0u8; RECORD_HEADER_SIZE as usize];
    put_u32(&mut b, 0, RECORD_MAGIC);
    b[R_KIND] = kind.code();
    put_u64(&mut b, R_SEQ, seq);
    put_u64(&mut b, R_OFFSET, offset);
    put_u64(&mut b, R_LEN, len);
    let crc = crc32c::crc32c_append(record_header_crc(seed, &b), payload);
    put_u32(&mut b, R_CRC, crc);
    b
}

/// Crc of the header fields (everything before the crc), to be continued
/// with the payload.
pub(crate) fn record_header_crc(seed: u32, b: &[u8; RECORD_HEADER_SIZE as usize]) -> u32 {
    crc32c::crc32c_append(seed, &b[..R_CRC])
}

/// Parses a record header; the reason says why it cannot be a record.
pub(crate) fn decode_record_header(b: &[u8; RECORD_HEADER_SIZE as usize]) -> std::result::Result<RecordHeader, String> {
    let magic = get_u32(b, 0);
    if magic != RECORD_MAGIC {
        return Err(format!("bad record magic {magic:#010x}"));
    }
    let kind = RecordKind::from_code(b[R_KIND]).ok_or_else(|| format!("unknown record kind {}", b[R_KIND]))?;
    if b[R_KIND + 1..R_SEQ] != [0; 3] || b[R_LEN + 8..R_CRC] != [0; 4] {
        return Err("nonzero reserved bytes".into());
    }
    let offset = get_u64(b, R_OFFSET);
    let len = get_u64(b, R_LEN);
    if len == 0 {
        return Err("zero-length record".into());
    }
    if offset.checked_add(len).is_none() {
        return Err(format!("range {offset}+{len} overflows"));
    }
    Ok(RecordHeader { kind, seq: get_u64(b, R_SEQ), offset, len, crc: get_u32(b, R_CRC) })
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("slice of 4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// An id field: u16 byte length, then the UTF-8 bytes, zero padded to 64.
/// The caller has checked the length against MAX_ID_LEN.
fn put_id(b: &mut [u8], at: usize, id: &str) {
    let len = u16::try_from(id.len()).expect("id length checked against MAX_ID_LEN");
    b[at..at + 2].copy_from_slice(&len.to_le_bytes());
    b[at + 2..at + 2 + id.len()].copy_from_slice(id.as_bytes());
}

fn get_id(b: &[u8], at: usize) -> std::result::Result<String, String> {
    let len = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    if len == 0 || len > MAX_ID_LEN {
        return Err(format!("length {len} out of 1..={MAX_ID_LEN}"));
    }
    let bytes = &b[at + 2..at + 2 + len];
    String::from_utf8(bytes.to_vec()).map_err(|e| format!("not UTF-8: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LogHeader {
        LogHeader {
            vm: "vm-1".into(),
            disk: "disk-ü".into(),
            seq: 7,
            log_id: 0xdead_beef,
            prev_log_id: 42,
            created_unix_ms: 1_700_000_000_000,
            boot_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        }
    }

    #[test]
    fn the_boot_id_is_read_from_the_kernel() {
        assert_eq!(
            parse_boot_id("6f1e9a51-0b9c-4d3e-8f00-123456789abc\n"),
            Some(0x6f1e9a51_0b9c_4d3e_8f00_123456789abc)
        );
        assert_eq!(parse_boot_id("not a uuid"), None);
        assert_ne!(boot_id(), 0, "Linux has /proc/sys/kernel/random/boot_id");
        assert_eq!(LogHeader::new("vm", "d", 1, 0, 0).boot_id, boot_id());
    }

    #[test]
    fn header_round_trips_and_starts_open() {
        let h = sample();
        let b = h.encode().unwrap();
        assert_eq!(b.len(), HEADER_SIZE as usize);
        assert_eq!(&b[..8], b"FERRYHRL");
        assert_eq!(LogHeader::decode(&b).unwrap(), h);
        assert_eq!(CloseBlock::decode(&b), CloseState::Open);
    }

    #[test]
    fn ids_longer_than_the_field_are_rejected() {
        let mut h = sample();
        h.vm = "v".repeat(MAX_ID_LEN);
        assert_eq!(LogHeader::decode(&h.encode().unwrap()).unwrap().vm, h.vm);
        h.vm.push('v');
        let err = h.encode().unwrap_err().to_string();
        assert!(err.contains("vm") && err.contains("at most 62"), "{err}");
        let mut h = sample();
        h.disk = String::new();
        assert!(h.encode().unwrap_err().to_string().contains("disk"));
    }

    #[test]
    fn every_header_byte_is_covered() {
        let b = sample().encode().unwrap();
        for i in 0..H_CRC + 4 {
            let mut bad = b.clone();
            bad[i] ^= 0x01;
            assert!(LogHeader::decode(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
    }

    #[test]
    fn close_block_round_trips_and_detects_damage() {
        let mut b = sample().encode().unwrap();
        let cb = CloseBlock { record_count: 3, end_offset: 9000, last_record_seq: 3 };
        b[CLOSE_BLOCK_OFFSET as usize..].copy_from_slice(&cb.encode());
        assert_eq!(CloseBlock::decode(&b), CloseState::Clean(cb));
        // The identity part is untouched by the close block.
        assert_eq!(LogHeader::decode(&b).unwrap(), sample());
        for i in 0..C_CRC + 4 {
            let mut bad = b.clone();
            bad[CLOSE_BLOCK_OFFSET as usize + i] ^= 0x80;
            assert!(matches!(CloseBlock::decode(&bad), CloseState::Invalid(_)), "byte {i}");
        }
    }

    #[test]
    fn record_header_round_trips() {
        let seed = record_crc_seed(99);
        let b = encode_record_header(seed, RecordKind::Write, 5, 4096, 3, b"abc");
        let r = decode_record_header(&b).unwrap();
        assert_eq!((r.kind, r.seq, r.offset, r.len), (RecordKind::Write, 5, 4096, 3));
        assert_eq!(crc32c::crc32c_append(record_header_crc(seed, &b), b"abc"), r.crc);
        // Another log's seed does not validate it.
        assert_ne!(crc32c::crc32c_append(record_header_crc(record_crc_seed(98), &b), b"abc"), r.crc);
    }
}
