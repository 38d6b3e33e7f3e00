//! Files of random bytes and their blob ids, hashed as they are written.

use std::{fs::File, io::Write, path::Path};

use nebula_common::BlobId;
use rand::{RngCore, SeedableRng};

/// Writes `size` pseudo-random bytes from `seed` to `path` and returns their
/// blob id; panics on an I/O error.
pub fn random_file(path: &Path, size: usize, seed: u64) -> BlobId {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    BlobId::from(write_random(path, size as u64, &mut rng).unwrap())
}

/// Writes `size` random bytes to `path` and returns their BLAKE3 hash (the
/// blob id). Blocking: call it from `spawn_blocking` in async code.
pub fn write_random_file(path: &Path, size: u64) -> std::io::Result<blake3::Hash> {
    write_random(path, size, &mut rand::rng())
}

fn write_random(path: &Path, size: u64, rng: &mut impl RngCore) -> std::io::Result<blake3::Hash> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(hasher.finalize())
}

/// The BLAKE3 id of a file's bytes (the `b3sum` reference).
pub fn file_id(path: &Path) -> BlobId {
    BlobId::from(hash_file(path).unwrap())
}

/// BLAKE3 of a file, on every core. Blocking: call it from `spawn_blocking`
/// in async code.
pub fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize())
}
