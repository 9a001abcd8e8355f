//! Disk images: random contents, large images written in chunks, and
//! comparisons that say where two images differ.

use std::io::Write;
use std::path::Path;

use rand::RngCore;

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rng().fill_bytes(&mut data);
    data
}

/// A file of `size` random bytes; returns its contents.
pub fn random_disk(path: &Path, size: u64) -> Vec<u8> {
    let data = random_bytes(size as usize);
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    data
}

/// Writes `len` bytes to `path`, chunk by chunk (1 MiB), as `random(i)`
/// says: random data for chunk `i` if true, explicit zeros otherwise. The
/// file is fully allocated and synced either way; for images too large to
/// hold in memory.
pub fn write_image(path: &Path, len: u64, random: impl Fn(u64) -> bool) {
    const CHUNK: u64 = 1 << 20;
    let f = std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let mut w = std::io::BufWriter::with_capacity(8 << 20, f);
    let mut rng = rand::rng();
    let mut buf = vec![0u8; CHUNK as usize];
    let zeros = vec![0u8; CHUNK as usize];
    let mut done = 0;
    let mut i = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        let chunk = if random(i) {
            rng.fill_bytes(&mut buf[..n]);
            &buf[..n]
        } else {
            &zeros[..n]
        };
        w.write_all(chunk).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        done += n as u64;
        i += 1;
    }
    w.into_inner().expect("flush image").sync_all().expect("sync image");
}

/// Reads a whole file, panicking with its path on failure.
pub fn read_file(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Panics with the first and last differing offsets when two images differ.
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: size differs");
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).expect("a difference");
        let last = got.len() - 1 - got.iter().rev().zip(want.iter().rev()).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: bytes differ from offset {first} ({first:#x}) to {last} ({last:#x}): got {:#04x}, want {:#04x}",
            got[first], want[first]
        );
    }
}
