//! Files of pseudo-random bytes and their blob ids.

use std::{fs::File, io::Write, path::Path};

use nebula_common::BlobId;

/// Writes `size` pseudo-random bytes to `path` and returns their blob id.
pub fn random_file(path: &Path, size: usize, seed: u64) -> BlobId {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
    BlobId::from(hasher.finalize())
}

/// The BLAKE3 id of a file's bytes (the `b3sum` reference).
pub fn file_id(path: &Path) -> BlobId {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path).unwrap();
    BlobId::from(hasher.finalize())
}
