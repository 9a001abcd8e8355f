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

/// Bytes of disk a file takes (allocated blocks), which is less than its
/// length for a sparse file.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    meta.blocks() * 512
}

/// Panics with the first differing offset when two files differ; reads
/// them 1 MiB at a time, for images too large to hold in memory.
pub fn assert_same_files(what: &str, got: &Path, want: &Path) {
    use std::io::Read;
    let open = |p: &Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("{what}: opening {}: {e}", p.display()));
    let (mut g, mut w) = (open(got), open(want));
    let len = |f: &std::fs::File| f.metadata().expect("stat").len();
    assert_eq!(len(&g), len(&w), "{what}: {} and {} differ in size", got.display(), want.display());
    let (mut gb, mut wb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let n = g.read(&mut gb).unwrap_or_else(|e| panic!("{what}: reading {}: {e}", got.display()));
        if n == 0 {
            return;
        }
        w.read_exact(&mut wb[..n]).unwrap_or_else(|e| panic!("{what}: reading {}: {e}", want.display()));
        if gb[..n] != wb[..n] {
            let i = gb[..n].iter().zip(&wb[..n]).position(|(a, b)| a != b).expect("a difference");
            panic!("{what}: {} differs from {} at offset {}", got.display(), want.display(), at + i as u64);
        }
        at += n as u64;
    }
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

/// Every file under `dir` (a local target's objects), by path relative to
/// it: (inode, bytes). A put writes a new file and renames it over its key,
/// so an object put again shows a new inode.
pub fn target_objects(dir: &Path) -> std::collections::BTreeMap<String, (u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let m = e.metadata().unwrap_or_else(|err| panic!("stat {}: {err}", e.path().display()));
            if m.is_dir() {
                stack.push(e.path());
            } else if !name.starts_with('.') {
                let rel = e.path().strip_prefix(dir).expect("under dir").to_string_lossy().into_owned();
                out.insert(rel, (m.ino(), m.len()));
            }
        }
    }
    out
}
