//! Byte-range locks for the write path: changes to overlapping ranges of a
//! disk run one at a time, changes to disjoint ranges run in parallel.
//!
//! A change holds its range from before its log record is appended until
//! its disk write is done, so for any two overlapping changes the order of
//! their records in the log is the order in which they reached the disk.
//! That is what lets a restarted daemon replay the log onto the disk and
//! get the disk as it was (see `disk`'s header). Which of two overlapping
//! changes in flight at once goes first is not fixed; neither was
//! acknowledged before the other started, so either order is correct.
//!
//! Held ranges are few (one per request in flight), so a list and a
//! condition variable do; waiters re-check after every release.

use std::sync::{Condvar, Mutex};

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// Held ranges; dropping the guard releases them.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    ranges: Vec<(u64, u64)>,
}

/// Whether two half-open ranges `[start, end)` share a byte.
pub fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLocks {
    pub fn new() -> Self {
        RangeLocks::default()
    }

    /// Waits until no held range overlaps `[offset, offset + len)`, then holds it.
    /// `len` is at least 1 (zero-length changes take no lock).
    #[cfg(test)]
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock_all(&[(offset, len)])
    }

    /// Waits until none of `ranges` (`(offset, len)`, mutually disjoint)
    /// overlaps a held range, then holds them all at once. Taking a batch
    /// all or nothing is what keeps two batches that want each other's
    /// ranges from deadlocking.
    pub fn lock_all(&self, ranges: &[(u64, u64)]) -> RangeGuard<'_> {
        let ranges: Vec<(u64, u64)> =
            ranges.iter().map(|&(offset, len)| (offset, offset.saturating_add(len.max(1)))).collect();
        debug_assert!(
            ranges.iter().enumerate().all(|(i, a)| ranges[..i].iter().all(|b| !overlaps(*a, *b))),
            "a batch's ranges are disjoint"
        );
        let mut held = self.held.lock().expect("range lock list is never poisoned");
        while held.iter().any(|&h| ranges.iter().any(|&r| overlaps(h, r))) {
            held = self.released.wait(held).expect("range lock list is never poisoned");
        }
        held.extend_from_slice(&ranges);
        RangeGuard { locks: self, ranges }
    }

    /// Ranges held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.lock().expect("range lock list is never poisoned").len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().expect("range lock list is never poisoned");
        for range in &self.ranges {
            if let Some(i) = held.iter().position(|h| h == range) {
                held.swap_remove(i);
            }
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlap_table() {
        let cases = [
            ((0, 10), (10, 20), false),
            ((0, 10), (9, 20), true),
            ((5, 6), (0, 100), true),
            ((0, 100), (5, 6), true),
            ((20, 30), (0, 10), false),
            ((0, u64::MAX), (u64::MAX - 1, u64::MAX), true),
        ];
        for (a, b, want) in cases {
            assert_eq!(overlaps(a, b), want, "{a:?} {b:?}");
            assert_eq!(overlaps(b, a), want, "{b:?} {a:?}");
        }
    }

    #[test]
    fn disjoint_ranges_are_held_together_and_an_overlapping_one_waits() {
        let locks = Arc::new(RangeLocks::new());
        let a = locks.lock(0, 4096);
        let b = locks.lock(4096, 4096); // disjoint: no wait
        assert_eq!(locks.held(), 2);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, entered) = (locks.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = locks.lock(4000, 200); // overlaps both
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "an overlapping change waits");
        drop(a);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "still overlaps the second range");
        drop(b);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn a_batch_is_taken_whole_and_never_deadlocks_with_a_crossing_batch() {
        // Two batches that each want a range the other holds would deadlock
        // if taken one range at a time.
        let locks = Arc::new(RangeLocks::new());
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                let locks = locks.clone();
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let batch = if i % 2 == 0 { [(0, 10), (100, 10)] } else { [(100, 10), (0, 10)] };
                        let g = locks.lock_all(&batch);
                        assert_eq!(g.ranges.len(), 2);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(locks.held(), 0);
        let a = locks.lock(5, 1);
        let entered = Arc::new(AtomicBool::new(false));
        let t = {
            let (locks, entered) = (locks.clone(), entered.clone());
            std::thread::spawn(move || {
                let _g = locks.lock_all(&[(200, 1), (0, 10)]);
                entered.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(Ordering::SeqCst), "one overlapping range holds the whole batch back");
        assert_eq!(locks.held(), 1, "nothing of the waiting batch is held");
        drop(a);
        t.join().unwrap();
        assert_eq!(locks.held(), 0);
    }

    #[test]
    fn overlapping_changes_never_run_at_once() {
        // Each holder marks the bytes it holds; no byte is ever marked twice.
        let locks = Arc::new(RangeLocks::new());
        let bytes: Arc<Vec<AtomicBool>> = Arc::new((0..24).map(|_| AtomicBool::new(false)).collect());
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let (locks, bytes) = (locks.clone(), bytes.clone());
                std::thread::spawn(move || {
                    for j in 0..300u64 {
                        let (off, len) = ((i * 7 + j * 3) % 20, 1 + (i + j) % 4);
                        let _g = locks.lock(off, len);
                        for b in off..off + len {
                            assert!(!bytes[b as usize].swap(true, Ordering::SeqCst), "byte {b} held twice");
                        }
                        std::thread::yield_now();
                        for b in off..off + len {
                            bytes[b as usize].store(false, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(locks.held(), 0);
    }
}
