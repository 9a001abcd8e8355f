//! Coalescing log records into the extents to upload: last write wins.
//!
//! Records are fed in log order (across several logs, oldest first). The
//! result says, for every disk byte that any record touched, where its final
//! content lives: at a file offset in one of the logs, or zero. Extents are
//! sorted, disjoint, and merged when contiguous on disk and in their source.
//!
//! Cost: an interval map keyed by start offset. Each record removes the
//! extents it covers entirely (each extent is removed at most once), splits
//! at most two, and inserts one, so `n` records take O(n log n) time and the
//! map never holds more than 2n + 1 extents (far fewer for sequential writes,
//! which merge as they arrive).

use std::collections::BTreeMap;
use std::ops::Bound;

use super::format::{RecordKind, RecordMeta};

/// Where the final bytes of an extent come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentSource {
    /// `len` bytes starting at file offset `pos` of log number `log_index`
    /// (the index the caller gave when feeding the records).
    Log { log_index: usize, pos: u64 },
    /// Zeros.
    Zero,
    /// The disk's own bytes at the same offset, as they were when log
    /// number `log_index` was rotated out (an in-image record: read
    /// through that log's held side file, `capture::held`).
    Image { log_index: usize },
}

impl ExtentSource {
    /// The source of the part of an extent that starts `skip` bytes in.
    fn advanced(self, skip: u64) -> ExtentSource {
        match self {
            ExtentSource::Log { log_index, pos } => ExtentSource::Log { log_index, pos: pos + skip },
            ExtentSource::Zero | ExtentSource::Image { .. } => self,
        }
    }
}

/// A disk range and where its content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Disk byte offset.
    pub offset: u64,
    pub len: u64,
    pub source: ExtentSource,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Whether `next` continues this extent on disk and in the same source.
    fn continues_with(&self, next: &Extent) -> bool {
        self.end() == next.offset && self.source.advanced(self.len) == next.source
    }
}

/// Builds the coalesced extent list; see the module docs.
#[derive(Debug, Default, Clone)]
pub struct Coalescer {
    /// start offset -> (len, source); entries never overlap.
    map: BTreeMap<u64, (u64, ExtentSource)>,
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    /// Adds one record; call in log order, logs oldest first.
    pub fn push(&mut self, log_index: usize, meta: &RecordMeta) {
        let source = match meta.kind {
            RecordKind::Write => ExtentSource::Log { log_index, pos: meta.payload_pos },
            RecordKind::Zero => ExtentSource::Zero,
            RecordKind::InImage => ExtentSource::Image { log_index },
        };
        self.insert(Extent { offset: meta.offset, len: meta.len, source });
    }

    /// Number of extents currently held (before the final merge pass).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The extents, sorted by offset, disjoint, contiguous ones merged.
    pub fn finish(self) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::with_capacity(self.map.len());
        for (offset, (len, source)) in self.map {
            let next = Extent { offset, len, source };
            match out.last_mut() {
                Some(prev) if prev.continues_with(&next) => prev.len += next.len,
                _ => out.push(next),
            }
        }
        out
    }

    fn insert(&mut self, new: Extent) {
        if new.len == 0 {
            return;
        }
        let (start, end) = (new.offset, new.end());
        // An extent that starts before `start` and reaches into the new one:
        // keep its head, and its tail if it also reaches past `end`.
        if let Some((&s, &(len, src))) = self.map.range(..start).next_back() {
            if s + len > start {
                self.map.insert(s, (start - s, src));
                if s + len > end {
                    self.map.insert(end, (s + len - end, src.advanced(end - s)));
                }
            }
        }
        // Extents that start inside the new one: drop them, keeping the tail
        // of the last one if it reaches past `end`.
        let covered: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in covered {
            let (len, src) = self.map.remove(&s).expect("key just listed");
            if s + len > end {
                self.map.insert(end, (s + len - end, src.advanced(end - s)));
            }
        }
        self.insert_merging(new);
    }

    /// Inserts into a gap, merging with neighbours that continue it.
    fn insert_merging(&mut self, mut new: Extent) {
        if let Some((&s, &(len, source))) = self.map.range(..new.offset).next_back() {
            let prev = Extent { offset: s, len, source };
            if prev.continues_with(&new) {
                self.map.remove(&s);
                new = Extent { offset: s, len: len + new.len, source };
            }
        }
        if let Some((&s, &(len, source))) = self.map.range((Bound::Included(new.end()), Bound::Unbounded)).next() {
            if new.continues_with(&Extent { offset: s, len, source }) {
                self.map.remove(&s);
                new.len += len;
            }
        }
        self.map.insert(new.offset, (new.len, new.source));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{read_payload_into, scan, LogHeader, LogWriter};
    use proptest::prelude::*;
    use std::fs::File;

    fn w(seq: u64, offset: u64, len: u64, payload_pos: u64) -> RecordMeta {
        RecordMeta { seq, kind: RecordKind::Write, offset, len, payload_pos }
    }

    fn z(seq: u64, offset: u64, len: u64) -> RecordMeta {
        RecordMeta { seq, kind: RecordKind::Zero, offset, len, payload_pos: 0 }
    }

    fn log(log_index: usize, pos: u64) -> ExtentSource {
        ExtentSource::Log { log_index, pos }
    }

    fn ext(offset: u64, len: u64, source: ExtentSource) -> Extent {
        Extent { offset, len, source }
    }

    fn coalesce(recs: &[(usize, RecordMeta)]) -> Vec<Extent> {
        let mut c = Coalescer::new();
        for (i, r) in recs {
            c.push(*i, r);
        }
        c.finish()
    }

    #[test]
    fn a_write_inside_another_splits_it_with_the_tail_pos_moved() {
        let got = coalesce(&[(0, w(1, 100, 100, 5000)), (0, w(2, 120, 10, 9000))]);
        assert_eq!(got, vec![ext(100, 20, log(0, 5000)), ext(120, 10, log(0, 9000)), ext(130, 70, log(0, 5030))]);
    }

    #[test]
    fn overlapping_heads_and_tails_are_trimmed() {
        let got = coalesce(&[
            (0, w(1, 0, 10, 1000)),
            (0, w(2, 20, 10, 2000)),
            (1, z(1, 5, 20)), // covers the tail of the first and the head of the second
        ]);
        assert_eq!(got, vec![ext(0, 5, log(0, 1000)), ext(5, 20, ExtentSource::Zero), ext(25, 5, log(0, 2005))]);
    }

    #[test]
    fn a_record_covering_many_replaces_them_all() {
        let mut recs: Vec<_> = (0..10).map(|i| (0, w(i + 1, i * 10, 5, 100 * i))).collect();
        recs.push((2, w(1, 3, 90, 7000)));
        let got = coalesce(&recs);
        assert_eq!(got, vec![ext(0, 3, log(0, 0)), ext(3, 90, log(2, 7000)), ext(93, 2, log(0, 903))]);
    }

    #[test]
    fn contiguous_extents_merge_only_when_their_sources_continue() {
        // Sequential writes laid out back to back in the log (40-byte record
        // headers between payloads) do not merge; adjacent zeros do.
        let got = coalesce(&[(0, w(1, 0, 4, 100)), (0, w(2, 4, 4, 144)), (0, z(3, 8, 4)), (0, z(4, 12, 4))]);
        assert_eq!(got, vec![ext(0, 4, log(0, 100)), ext(4, 4, log(0, 144)), ext(8, 8, ExtentSource::Zero)]);
        // Pieces of one split write that become adjacent again merge back.
        let got = coalesce(&[(0, w(1, 0, 100, 1000)), (0, z(2, 40, 10)), (1, w(1, 40, 10, 1040))]);
        assert_eq!(got, vec![ext(0, 40, log(0, 1000)), ext(40, 10, log(1, 1040)), ext(50, 50, log(0, 1050))]);
        let got = coalesce(&[(0, w(1, 0, 100, 1000)), (0, z(2, 40, 10)), (0, w(3, 40, 10, 1040))]);
        assert_eq!(got, vec![ext(0, 100, log(0, 1000))]);
    }

    #[test]
    fn many_small_records_stay_fast_and_small() {
        // 300k random 4K writes over a 1 GiB disk, then sequential ones.
        const SEQ: u64 = 200_000;
        let mut c = Coalescer::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..300_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.push(0, &w(i + 1, (x % (1 << 18)) * 4096, 4096, i * 4136));
        }
        let zero_all = z(1, 0, 1 << 30);
        c.push(1, &zero_all);
        assert_eq!(c.len(), 1);
        for i in 0..SEQ {
            c.push(2, &w(i + 1, i * 4096, 4096, 4096 + i * 4096));
        }
        assert!(c.len() <= 2);
        let got = c.finish();
        assert_eq!(
            got,
            vec![ext(0, SEQ * 4096, log(2, 4096)), ext(SEQ * 4096, (1 << 30) - SEQ * 4096, ExtentSource::Zero)]
        );
    }

    const DISK: u64 = 16 * 1024;

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        Zero(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..DISK, 1u64..3000).prop_map(|(off, len)| {
            let len = len.min(DISK - off).max(1);
            (off.min(DISK - len), len)
        });
        prop_oneof![
            3 => (range.clone(), any::<u8>())
                .prop_map(|((off, len), s)| Op::Write(off, (0..len).map(|i| s.wrapping_add(i as u8)).collect())),
            1 => range.prop_map(|(off, len)| Op::Zero(off, len)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Applying the coalesced extents (bytes read from the logs) to a disk
        /// gives what applying every record in order gives, and touches only
        /// bytes some record touched.
        #[test]
        fn coalesced_extents_equal_replaying_every_record(
            logs in prop::collection::vec(prop::collection::vec(op(), 0..25), 1..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut files = Vec::new();
            let mut scans = Vec::new();
            let mut header = LogHeader::new("vm", "d", 1, 0, 0);
            for (i, ops) in logs.iter().enumerate() {
                let path = dir.path().join(format!("d.{i}.hrl"));
                let mut wr = LogWriter::create(&path, &header).unwrap();
                for op in ops {
                    match op {
                        Op::Write(off, data) => wr.append_write(*off, data).unwrap(),
                        Op::Zero(off, len) => wr.append_zero(*off, *len).unwrap(),
                    }
                }
                wr.seal().unwrap();
                header = header.successor(0);
                scans.push(scan(&path).unwrap());
                files.push(File::open(&path).unwrap());
            }

            // Reference: every op in order, on a disk filled with a pattern so
            // that zeroing is visible, plus a map of touched bytes.
            let mut expected: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8 + 1).collect();
            let mut touched = vec![false; DISK as usize];
            for op in logs.iter().flatten() {
                let (off, len) = match op { Op::Write(o, d) => (*o, d.len() as u64), Op::Zero(o, l) => (*o, *l) };
                let r = off as usize..(off + len) as usize;
                match op { Op::Write(_, d) => expected[r.clone()].copy_from_slice(d), Op::Zero(..) => expected[r.clone()].fill(0) }
                touched[r].iter_mut().for_each(|t| *t = true);
            }

            let mut c = Coalescer::new();
            for (i, s) in scans.iter().enumerate() {
                for r in &s.records {
                    c.push(i, r);
                }
            }
            let extents = c.finish();

            let mut got: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8 + 1).collect();
            let mut covered = vec![false; DISK as usize];
            for (k, e) in extents.iter().enumerate() {
                prop_assert!(e.len > 0);
                if k > 0 {
                    let prev = &extents[k - 1];
                    prop_assert!(prev.end() <= e.offset, "sorted and disjoint");
                    prop_assert!(!prev.continues_with(e), "contiguous extents merged");
                }
                let r = e.offset as usize..e.end() as usize;
                covered[r.clone()].iter_mut().for_each(|t| *t = true);
                match e.source {
                    ExtentSource::Zero => got[r].fill(0),
                    ExtentSource::Log { log_index, pos } => {
                        let meta = RecordMeta { seq: 0, kind: RecordKind::Write, offset: e.offset, len: e.len, payload_pos: pos };
                        read_payload_into(&files[log_index], &meta, &mut got[r]).unwrap();
                    }
                    // Covered with the image by `capture::disk`'s shipment test.
                    ExtentSource::Image { .. } => unreachable!("these logs have no in-image records"),
                }
            }
            prop_assert!(got == expected);
            prop_assert!(covered == touched);
        }
    }
}
