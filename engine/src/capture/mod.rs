//! Capture: every write to a protected disk reaches the disk image and its
//! change log before it is acknowledged ([`disk`]); the copy-before-write
//! snapshot that gives the initial copy and a resync their point in time
//! ([`snapshot`]); the same for the bytes a sealed log leaves in the image
//! until its point is committed ([`held`]). [`extents`] finds the holes of
//! a disk file (NBD block status) and zeroes ranges that must stay
//! allocated. [`shared_flush`] lets one device cache flush make a
//! FLUSH durable in both the log and the image.

pub mod disk;
pub mod extents;
pub mod held;
pub mod ranges;
pub mod shared_flush;
pub mod snapshot;
