//! Synthetic churn: a seedable generator of disk operations.
//!
//! [`Churn`] is pure: from a [`ChurnShape`] and a seed it yields the same
//! sequence of [`Op`]s every time, and the payload bytes of data writes come
//! from a second generator seeded from the same seed, so filling payloads (or
//! not) never shifts the op sequence. The run module carries the ops out
//! against the engine; nothing here touches a disk.

use std::ops::RangeInclusive;

use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, RngCore, SeedableRng};

/// Offsets of data and zero writes are multiples of this (a disk sector), as
/// a guest's would be; lengths are any byte count in the configured range.
pub const SECTOR: u64 = 512;

/// What the generator produces: which disks, how big the writes, how often
/// zero-writes and flushes come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChurnShape {
    /// Size in bytes of each disk of the VM; ops pick a disk uniformly.
    pub disk_sizes: Vec<u64>,
    /// Bytes per data or zero write, inclusive; at most the smallest disk.
    pub write_size: RangeInclusive<u64>,
    /// Share of ops that zero a range (NBD WRITE_ZEROES / TRIM), 0..=100.
    pub zero_percent: u8,
    /// Share of ops that flush a disk, 0..=100 (with `zero_percent`, at most 100).
    pub flush_percent: u8,
}

impl ChurnShape {
    /// Checks the shape can be generated from; names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.disk_sizes.is_empty() {
            return Err("disks: a VM needs at least one disk".into());
        }
        let (min, max) = (*self.write_size.start(), *self.write_size.end());
        if min == 0 || min > max {
            return Err(format!("write-size: {min}..{max} must be a non-empty range of at least 1 byte"));
        }
        let smallest = *self.disk_sizes.iter().min().expect("checked non-empty above");
        if max > smallest {
            return Err(format!(
                "write-size: the largest write ({max} bytes) exceeds the disk size ({smallest} bytes)"
            ));
        }
        if u16::from(self.zero_percent) + u16::from(self.flush_percent) > 100 {
            return Err(format!(
                "zero-percent + flush-percent: {} + {} is over 100",
                self.zero_percent, self.flush_percent
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Write `len` payload bytes at `offset` (payload from [`Churn::fill_payload`]).
    Data,
    /// Zero `len` bytes at `offset`.
    Zeroes,
    /// Make the disk's acknowledged writes durable; `offset` and `len` are 0.
    Flush,
}

/// One operation on one disk of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Op {
    /// Index into [`ChurnShape::disk_sizes`].
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
    pub kind: OpKind,
}

/// A seeded stream of ops for one VM.
pub struct Churn {
    shape: ChurnShape,
    /// Decides every op; nothing else draws from it.
    ops: StdRng,
    /// Payload bytes; separate so payloads do not move the op sequence.
    payload: SmallRng,
}

/// Payload seeds differ from op seeds by this constant (any odd 64-bit value).
const PAYLOAD_SALT: u64 = 0x9E37_79B9_7F4A_7C15;

impl Churn {
    pub fn new(shape: ChurnShape, seed: u64) -> Result<Self, String> {
        shape.validate()?;
        Ok(Churn { shape, ops: StdRng::seed_from_u64(seed), payload: SmallRng::seed_from_u64(seed ^ PAYLOAD_SALT) })
    }

    pub fn shape(&self) -> &ChurnShape {
        &self.shape
    }

    pub fn next_op(&mut self) -> Op {
        let disk = self.ops.random_range(0..self.shape.disk_sizes.len());
        let roll = self.ops.random_range(0..100u8);
        let kind = if roll < self.shape.flush_percent {
            OpKind::Flush
        } else if roll < self.shape.flush_percent + self.shape.zero_percent {
            OpKind::Zeroes
        } else {
            OpKind::Data
        };
        if kind == OpKind::Flush {
            return Op { disk, offset: 0, len: 0, kind };
        }
        let size = self.shape.disk_sizes[disk];
        let len = self.ops.random_range(self.shape.write_size.clone());
        // Highest sector-aligned offset at which `len` bytes still fit.
        let last_sector = (size - len) / SECTOR;
        let offset = self.ops.random_range(0..=last_sector) * SECTOR;
        Op { disk, offset, len, kind }
    }

    /// Fills `buf` with the next payload bytes (incompressible, like
    /// encrypted or already-compressed guest data).
    pub fn fill_payload(&mut self, buf: &mut [u8]) {
        self.payload.fill_bytes(buf);
    }
}

impl Iterator for Churn {
    type Item = Op;

    fn next(&mut self) -> Option<Op> {
        Some(self.next_op())
    }
}

/// Seed of VM number `index` derived from the run's seed, so VMs churn
/// differently yet every run with the same seed is the same.
pub fn vm_seed(run_seed: u64, index: usize) -> u64 {
    // splitmix64 step: neighbouring indices give unrelated seeds.
    let mut z = run_seed.wrapping_add((index as u64 + 1).wrapping_mul(PAYLOAD_SALT));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ChurnShape {
        ChurnShape {
            disk_sizes: vec![8 << 20, 1 << 20, (300 << 10) + 7],
            write_size: 4096..=256 << 10,
            zero_percent: 10,
            flush_percent: 5,
        }
    }

    #[test]
    fn ops_stay_within_their_disk_and_sizes_within_the_range() {
        let s = shape();
        let mut churn = Churn::new(s.clone(), 42).unwrap();
        for op in churn.by_ref().take(50_000) {
            let size = s.disk_sizes[op.disk];
            match op.kind {
                OpKind::Flush => assert_eq!((op.offset, op.len), (0, 0), "{op:?}"),
                OpKind::Data | OpKind::Zeroes => {
                    assert!(s.write_size.contains(&op.len), "{op:?}");
                    assert!(op.offset + op.len <= size, "{op:?} past the end of a {size}-byte disk");
                    assert_eq!(op.offset % SECTOR, 0, "{op:?}");
                }
            }
        }
    }

    #[test]
    fn a_write_as_big_as_the_disk_fits_at_offset_zero() {
        let s =
            ChurnShape { disk_sizes: vec![1 << 20], write_size: 1 << 20..=1 << 20, zero_percent: 0, flush_percent: 0 };
        for op in Churn::new(s, 3).unwrap().take(100) {
            assert_eq!((op.offset, op.len, op.kind), (0, 1 << 20, OpKind::Data));
        }
    }

    #[test]
    fn same_seed_gives_same_ops_and_payloads() {
        let (mut a, mut b) = (Churn::new(shape(), 7).unwrap(), Churn::new(shape(), 7).unwrap());
        let (mut pa, mut pb) = (vec![0u8; 4096], vec![0u8; 4096]);
        for _ in 0..1000 {
            assert_eq!(a.next_op(), b.next_op());
            a.fill_payload(&mut pa);
            b.fill_payload(&mut pb);
            assert_eq!(pa, pb);
        }
        let other: Vec<Op> = Churn::new(shape(), 8).unwrap().take(100).collect();
        let mine: Vec<Op> = Churn::new(shape(), 7).unwrap().take(100).collect();
        assert_ne!(other, mine, "a different seed gives different ops");
    }

    #[test]
    fn payloads_do_not_shift_the_op_sequence() {
        let plain: Vec<Op> = Churn::new(shape(), 9).unwrap().take(500).collect();
        let mut churn = Churn::new(shape(), 9).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let with_payloads: Vec<Op> = (0..500)
            .map(|_| {
                let op = churn.next_op();
                churn.fill_payload(&mut buf[..op.len as usize]);
                op
            })
            .collect();
        assert_eq!(plain, with_payloads);
    }

    #[test]
    fn every_kind_and_disk_shows_up_in_proportion() {
        let s = shape();
        let ops: Vec<Op> = Churn::new(s.clone(), 1).unwrap().take(20_000).collect();
        let share = |k: OpKind| ops.iter().filter(|o| o.kind == k).count() as f64 / ops.len() as f64 * 100.0;
        assert!((share(OpKind::Zeroes) - 10.0).abs() < 1.5, "zeroes {}", share(OpKind::Zeroes));
        assert!((share(OpKind::Flush) - 5.0).abs() < 1.0, "flushes {}", share(OpKind::Flush));
        for d in 0..s.disk_sizes.len() {
            assert!(ops.iter().any(|o| o.disk == d), "disk {d} never chosen");
        }
    }

    #[test]
    fn bad_shapes_are_refused_with_the_field_named() {
        let cases = [
            (ChurnShape { disk_sizes: vec![], ..shape() }, "disks"),
            (ChurnShape { write_size: 0..=10, ..shape() }, "write-size"),
            (ChurnShape { write_size: RangeInclusive::new(4096, 1), ..shape() }, "write-size"),
            (ChurnShape { write_size: 4096..=2 << 20, ..shape() }, "write-size"),
            (ChurnShape { zero_percent: 60, flush_percent: 41, ..shape() }, "zero-percent"),
        ];
        for (s, field) in cases {
            let e = Churn::new(s, 1).err().expect("refused");
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }

    #[test]
    fn vm_seeds_differ_and_are_stable() {
        assert_eq!(vm_seed(1, 0), vm_seed(1, 0));
        let seeds: std::collections::HashSet<u64> = (0..1000).map(|i| vm_seed(1, i)).collect();
        assert_eq!(seeds.len(), 1000);
        assert_ne!(vm_seed(1, 0), vm_seed(2, 0));
    }
}
