//! Extent bundles: the one object format on the target.
//!
//! A bundle is a list of extents of one disk, each either data or a zeroed
//! range, zstd-compressed as a whole. Base chunks (initial replication) and
//! delta parts (coalesced change logs) are both bundles, so restore has one
//! decoder. The manifest keeps each bundle's xxh3-64 checksum of the stored
//! bytes, verified before decompression.
//!
//! Uncompressed layout (little endian):
//! `b"FRYB"`, version u32 = 1, count u32, then per extent: offset u64,
//! len u64, kind u8 (1 = data, followed by `len` bytes; 2 = zeros).
//!
//! Validity is one definition, [`Limits`], used by the encoder (which
//! refuses to produce what the decoder would refuse: nothing is committed
//! that restore cannot read) and by the decoder (which guards against
//! hostile input). A bundle holds at most [`MAX_EXTENTS`] extents and
//! [`MAX_DATA_BYTES`] bytes of data; a zero extent may cover any range that
//! does not overflow the 64-bit address space (a TRIM or WRITE_ZEROES can be
//! GiBs, and adjacent ones coalesce). Decompression stops at the largest
//! valid size, so a hostile object cannot inflate without bound.
//!
//! Effort: a bundle is compressed only where that pays ([`effort`]): a few
//! slices spread over it are compressed first, and if they shrink by less
//! than an eighth (ZFS's early-abort rule) the bundle is stored as it is,
//! in a standard zstd frame of raw blocks ([`stored_frame`]), so the one
//! decoder reads both. Data that is nearly incompressible but full of
//! short matches (already compressed files, fio's default buffers) costs
//! zstd's level 3 about 110 MB/s of one core for a saving of a tenth; on a
//! busy host that CPU is the guests'.

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"FRYB";
const VERSION: u32 = 1;
const HEADER_BYTES: u64 = 12;
/// Bytes each extent takes before its data: offset, len, kind.
pub const EXTENT_HEADER_BYTES: u64 = 17;
/// Most extents one bundle may hold (parts are cut to stay within it).
pub const MAX_EXTENTS: u32 = 1 << 16;
/// Most data bytes one bundle may hold: the largest chunk size.
pub const MAX_DATA_BYTES: u64 = 64 << 20;
/// Largest uncompressed bundle.
const MAX_RAW_BYTES: u64 = HEADER_BYTES + MAX_EXTENTS as u64 * EXTENT_HEADER_BYTES + MAX_DATA_BYTES;

/// What makes a list of extents a valid bundle, checked extent by extent.
#[derive(Debug, Default)]
pub struct Limits {
    extents: u64,
    data_bytes: u64,
}

impl Limits {
    /// Accepts one more extent, or says why it makes the bundle invalid.
    pub fn admit(&mut self, offset: u64, len: u64, is_data: bool) -> std::result::Result<(), &'static str> {
        self.extents += 1;
        if self.extents > MAX_EXTENTS as u64 {
            return Err("too many extents");
        }
        if offset.checked_add(len).is_none() {
            return Err("extent range overflows");
        }
        if is_data {
            self.data_bytes += len;
            if self.data_bytes > MAX_DATA_BYTES {
                return Err("data larger than a bundle may hold");
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    Data(Vec<u8>),
    Zero(u64),
}

impl ExtentData {
    pub fn len(&self) -> u64 {
        match self {
            ExtentData::Data(d) => d.len() as u64,
            ExtentData::Zero(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleExtent {
    pub offset: u64,
    pub data: ExtentData,
}

/// A bundle ready to put: compressed bytes and their checksum.
#[derive(Debug, Clone)]
pub struct EncodedBundle {
    pub bytes: Vec<u8>,
    pub checksum: u64,
    /// Bytes of disk the bundle covers (data and zero ranges).
    pub logical_len: u64,
}

pub fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

pub fn encode(extents: &[BundleExtent], zstd_level: i32) -> Result<EncodedBundle> {
    let data_len: usize =
        extents.iter().map(|e| 17 + if let ExtentData::Data(d) = &e.data { d.len() } else { 0 }).sum();
    let mut raw = Vec::with_capacity(12 + data_len);
    raw.extend_from_slice(MAGIC);
    raw.extend_from_slice(&VERSION.to_le_bytes());
    raw.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    let mut logical_len = 0u64;
    let mut limits = Limits::default();
    for e in extents {
        limits
            .admit(e.offset, e.data.len(), matches!(e.data, ExtentData::Data(_)))
            .map_err(|why| Error::Internal(format!("refusing to encode an unreadable bundle: {why}")))?;
        raw.extend_from_slice(&e.offset.to_le_bytes());
        raw.extend_from_slice(&e.data.len().to_le_bytes());
        logical_len = logical_len.saturating_add(e.data.len());
        match &e.data {
            ExtentData::Data(d) => {
                raw.push(1);
                raw.extend_from_slice(d);
            }
            ExtentData::Zero(_) => raw.push(2),
        }
    }
    let bytes = match effort(&raw, zstd_level)? {
        Effort::Level(level) => zstd::bulk::compress(&raw, level).map_err(|e| Error::io("zstd compress", e))?,
        Effort::Stored => stored_frame(&raw),
    };
    Ok(EncodedBundle { checksum: checksum(&bytes), bytes, logical_len })
}

/// How a bundle's bytes are stored ([`effort`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    /// Compressed at this zstd level.
    Level(i32),
    /// Stored as they are, in a zstd frame of raw blocks ([`stored_frame`]).
    Stored,
}

/// Slices compressed to judge a bundle: this many, of [`SAMPLE_SLICE`]
/// bytes each, spread evenly; bundles under four times their total are
/// compressed at the configured level without sampling (cheap either way).
const SAMPLE_SLICES: usize = 4;
const SAMPLE_SLICE: usize = 32 << 10;

/// How to store `raw`: compressed at `level`, unless compressing sample
/// slices at it saves less than an eighth of their size, then stored. The
/// sample is at most a quarter of the bundle (128 KiB of a 4 MiB part:
/// 3%), each slice compressed on its own.
pub fn effort(raw: &[u8], level: i32) -> Result<Effort> {
    let sample = SAMPLE_SLICES * SAMPLE_SLICE;
    if raw.len() < 4 * sample {
        return Ok(Effort::Level(level));
    }
    let step = (raw.len() - SAMPLE_SLICE) / (SAMPLE_SLICES - 1);
    let mut compressor = zstd::bulk::Compressor::new(level).map_err(|e| Error::io("zstd compress", e))?;
    let mut compressed = 0usize;
    for i in 0..SAMPLE_SLICES {
        let slice = &raw[i * step..i * step + SAMPLE_SLICE];
        compressed += compressor.compress(slice).map_err(|e| Error::io("zstd compress", e))?.len();
    }
    Ok(if compressed * 8 > sample * 7 { Effort::Stored } else { Effort::Level(level) })
}

/// Largest raw block of a zstd frame (RFC 8878, Block_Maximum_Size).
const RAW_BLOCK: usize = 128 << 10;

/// `raw` as one standard zstd frame of raw blocks (RFC 8878): any zstd
/// decoder reads it back, and writing it is one copy. Header: magic, a
/// descriptor (8-byte content size, a window descriptor, no checksum, no
/// dictionary), a 128 KiB window (only raw blocks follow, none larger), the
/// content size; then 3-byte block headers (last flag, type 0 = raw, size).
pub fn stored_frame(raw: &[u8]) -> Vec<u8> {
    let blocks = raw.len().div_ceil(RAW_BLOCK).max(1);
    let mut out = Vec::with_capacity(14 + 3 * blocks + raw.len());
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    out.push(0b1100_0000); // Frame_Content_Size: 8 bytes; not single segment.
    out.push(7 << 3); // Window_Descriptor: 2^(10 + 7) = 128 KiB.
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    let mut chunks = raw.chunks(RAW_BLOCK).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]); // one empty last raw block
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none() as u32;
        let header = last | ((chunk.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(chunk);
    }
    out
}

/// Verifies the checksum, decompresses and parses; `what` names the object in errors.
pub fn decode(what: &str, bytes: &[u8], expected_checksum: u64) -> Result<Vec<BundleExtent>> {
    let got = checksum(bytes);
    if got != expected_checksum {
        return Err(Error::corrupt(
            what,
            format!("checksum {got:016x} does not match the manifest's {expected_checksum:016x}"),
        ));
    }
    let raw = decompress_bounded(bytes).map_err(|e| Error::corrupt(what, format!("zstd: {e}")))?;
    let bad = |reason: &str| Error::corrupt(what, reason.to_string());
    let mut r = Reader { buf: &raw, pos: 0 };
    if r.take(4).ok_or_else(|| bad("short header"))? != MAGIC {
        return Err(bad("bad magic"));
    }
    let version = r.u32().ok_or_else(|| bad("short header"))?;
    if version != VERSION {
        return Err(bad(&format!("unknown version {version}")));
    }
    let count = r.u32().ok_or_else(|| bad("short header"))?;
    if count > MAX_EXTENTS {
        return Err(bad("too many extents"));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut limits = Limits::default();
    for _ in 0..count {
        let offset = r.u64().ok_or_else(|| bad("truncated extent"))?;
        let len = r.u64().ok_or_else(|| bad("truncated extent"))?;
        let kind = r.take(1).ok_or_else(|| bad("truncated extent"))?[0];
        limits.admit(offset, len, kind == 1).map_err(bad)?;
        let data = match kind {
            1 => ExtentData::Data(r.take(len as usize).ok_or_else(|| bad("truncated data"))?.to_vec()),
            2 => ExtentData::Zero(len),
            k => return Err(bad(&format!("unknown extent kind {k}"))),
        };
        out.push(BundleExtent { offset, data });
    }
    if r.pos != raw.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

/// Decompresses at most the largest valid bundle (and one byte more, to tell).
fn decompress_bounded(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut raw = Vec::new();
    zstd::stream::read::Decoder::new(bytes)?.take(MAX_RAW_BYTES + 1).read_to_end(&mut raw)?;
    if raw.len() as u64 > MAX_RAW_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "larger than any valid bundle"));
    }
    Ok(raw)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;

    /// Bytes from a fixed-seed xorshift: incompressible.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn bundles_are_compressed_only_where_it_pays() {
        let text: Vec<u8> =
            b"the quick brown fox jumps over the lazy dog; ".iter().copied().cycle().take(4 << 20).collect();
        // Mostly noise with a short repeat in every 64 bytes: zstd finds
        // matches everywhere and saves little (fio's buffers look so).
        let mut short_matches = noise(4 << 20, 7);
        for chunk in short_matches.chunks_mut(64) {
            chunk[..8].copy_from_slice(b"ferry-00");
        }
        let mut half = noise(4 << 20, 9);
        half[..2 << 20].fill(0);
        let cases: &[(&str, &[u8], i32, Effort)] = &[
            ("text", &text, 3, Effort::Level(3)),
            ("noise", &noise(4 << 20, 3), 3, Effort::Stored),
            ("short matches only", &short_matches, 3, Effort::Stored),
            // Slices at 0 and a third are zeros, two are noise: saves half.
            ("half zeros", &half, 3, Effort::Level(3)),
            ("noise under the sampling size", &noise(511 << 10, 3), 3, Effort::Level(3)),
            ("level 19 on noise", &noise(1 << 20, 5), 19, Effort::Stored),
        ];
        for (name, raw, level, want) in cases {
            assert_eq!(effort(raw, *level).unwrap(), *want, "{name}");
        }
    }

    proptest! {
        /// Any bytes, stored: the standard zstd decoder gives them back.
        #[test]
        fn stored_frames_are_standard_zstd(len in prop_oneof![0usize..1000, 130_000usize..300_000], seed: u64) {
            let raw = noise(len, seed);
            let frame = stored_frame(&raw);
            prop_assert!(starts_a_zstd_frame(&frame));
            prop_assert_eq!(frame.len(), 14 + 3 * len.div_ceil(RAW_BLOCK).max(1) + len);
            prop_assert_eq!(decompress_bounded(&frame).unwrap(), raw.clone());
            prop_assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), raw);
        }
    }

    #[test]
    fn a_stored_bundle_decodes_the_same() {
        let data = noise(2 << 20, 11);
        let extents = vec![
            BundleExtent { offset: 0, data: ExtentData::Data(data.clone()) },
            BundleExtent { offset: 8 << 20, data: ExtentData::Zero(1 << 30) },
        ];
        let enc = encode(&extents, 3).unwrap();
        assert_eq!(enc.bytes.len(), stored_frame(&[0u8; 12 + 17 + (2 << 20) + 17]).len(), "stored");
        assert_eq!(decode("p", &enc.bytes, enc.checksum).unwrap(), extents);
    }

    /// A zstd frame starts with one of these (little endian): a data frame,
    /// or a skippable frame (0x184D2A50..=0x184D2A5F, low nibble masked).
    fn starts_a_zstd_frame(bytes: &[u8]) -> bool {
        match bytes.get(..4) {
            Some(m) => {
                let m = u32::from_le_bytes(m.try_into().expect("4 bytes"));
                m == 0xFD2F_B528 || m & 0xFFFF_FFF0 == 0x184D_2A50
            }
            None => false,
        }
    }

    /// The decoder's answer to bytes it must refuse: a corrupt-object error
    /// naming the object (class NeedsResync), never a panic, never extents.
    fn assert_refused(what: &str, bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
        match decode(what, bytes, checksum(bytes)) {
            Ok(extents) => Err(TestCaseError::fail(format!("garbage decoded as {extents:?}"))),
            Err(e) => {
                prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", e);
                prop_assert!(e.to_string().starts_with(&format!("corrupt {what}: ")), "{}", e);
                Ok(())
            }
        }
    }

    /// Bytes that reach the parser (a valid zstd frame) may happen to be a
    /// valid bundle. Either they are refused as [`assert_refused`] says, or
    /// what they decode to is something the encoder accepts and writes back
    /// to the same extents: the decoder accepts nothing the encoder refuses.
    fn assert_refused_or_valid(what: &str, bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
        match decode(what, bytes, checksum(bytes)) {
            Err(e) => {
                prop_assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", e);
                prop_assert!(e.to_string().starts_with(&format!("corrupt {what}: ")), "{}", e);
                Ok(())
            }
            Ok(extents) => {
                let enc = encode(&extents, 1)
                    .map_err(|e| TestCaseError::fail(format!("decoded {extents:?}, which the encoder refuses: {e}")))?;
                prop_assert_eq!(decode(what, &enc.bytes, enc.checksum).expect("re-encoded bundle"), extents);
                Ok(())
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(extents in proptest::collection::vec(
            (any::<u32>(), prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300).prop_map(ExtentData::Data),
                (0u64..1 << 20).prop_map(ExtentData::Zero),
            ]).prop_map(|(o, data)| BundleExtent { offset: o as u64, data }),
            0..20,
        )) {
            let enc = encode(&extents, 3).unwrap();
            prop_assert_eq!(decode("b", &enc.bytes, enc.checksum).unwrap(), extents);
        }

        #[test]
        fn corruption_is_detected_never_a_panic(flip in any::<prop::sample::Index>(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let enc = encode(&[BundleExtent { offset: 4096, data: ExtentData::Data(vec![7; 5000]) }], 3).unwrap();
            let mut b = enc.bytes.clone();
            let i = flip.index(b.len());
            b[i] ^= 0x40;
            prop_assert!(decode("b", &b, enc.checksum).is_err());
            // Garbage with a matching checksum: not a zstd frame, so refused
            // as corrupt (naming the object) before any parsing.
            prop_assume!(!starts_a_zstd_frame(&bytes));
            assert_refused("b", &bytes)?;
        }

        /// Garbage inside a valid zstd frame reaches the parser: refused, or
        /// (when it happens to parse) a bundle the encoder would write too.
        #[test]
        fn garbage_that_decompresses_is_refused_or_a_valid_bundle(
            raw in proptest::collection::vec(any::<u8>(), 0..200),
            count in 0u32..4,
            body in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            // Without the bundle magic: refused, whatever follows.
            prop_assume!(!raw.starts_with(MAGIC));
            assert_refused("b", &zstd::bulk::compress(&raw, 1).unwrap())?;
            // A valid header and a random extent list: the extent parser decides.
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&VERSION.to_le_bytes());
            framed.extend_from_slice(&count.to_le_bytes());
            framed.extend_from_slice(&body);
            assert_refused_or_valid("b", &zstd::bulk::compress(&framed, 1).unwrap())?;
        }
    }

    #[test]
    fn a_valid_header_with_garbage_extents_is_refused_naming_the_object() {
        let mut raw = MAGIC.to_vec();
        raw.extend_from_slice(&VERSION.to_le_bytes());
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.extend_from_slice(&0u64.to_le_bytes());
        raw.extend_from_slice(&16u64.to_le_bytes());
        raw.push(9); // no such extent kind
        let bytes = zstd::bulk::compress(&raw, 1).unwrap();
        let e = decode("vms/a/odd", &bytes, checksum(&bytes)).unwrap_err();
        assert_eq!(e.to_string(), "corrupt vms/a/odd: unknown extent kind 9");
        raw.truncate(raw.len() - 1);
        raw.push(1); // data, but the 16 bytes are missing
        let bytes = zstd::bulk::compress(&raw, 1).unwrap();
        let e = decode("vms/a/short", &bytes, checksum(&bytes)).unwrap_err();
        assert_eq!(e.to_string(), "corrupt vms/a/short: truncated data");
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let too_many: Vec<_> =
            (0..=MAX_EXTENTS as u64).map(|i| BundleExtent { offset: i, data: ExtentData::Zero(1) }).collect();
        assert!(encode(&too_many, 1).is_err());
        let overflow = [BundleExtent { offset: u64::MAX - 1, data: ExtentData::Zero(2) }];
        assert!(encode(&overflow, 1).is_err());
        let huge_zero = [BundleExtent { offset: 1 << 40, data: ExtentData::Zero(1 << 50) }];
        let enc = encode(&huge_zero, 1).unwrap();
        assert_eq!(decode("b", &enc.bytes, enc.checksum).unwrap(), huge_zero);
    }

    #[test]
    fn a_bundle_that_inflates_past_any_valid_size_is_refused() {
        let raw = vec![0u8; (MAX_RAW_BYTES + 10) as usize];
        let bytes = zstd::bulk::compress(&raw, 1).unwrap();
        let e = decode("vms/a/bomb", &bytes, checksum(&bytes)).unwrap_err();
        assert!(e.to_string().contains("vms/a/bomb") && e.to_string().contains("larger than any valid bundle"), "{e}");
    }

    #[test]
    fn checksum_mismatch_names_the_object() {
        let enc = encode(&[], 1).unwrap();
        let e = decode("vms/a/x", &enc.bytes, enc.checksum ^ 1).unwrap_err();
        assert!(e.to_string().contains("vms/a/x") && e.to_string().contains("checksum"), "{e}");
    }
}
