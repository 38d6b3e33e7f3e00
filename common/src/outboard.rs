//! The outboard of a blob — its chunks' BLAKE3 chaining values — and chunk
//! verification against it.
//!
//! Every chunk is a complete, aligned subtree of the blob's BLAKE3 tree (chunks
//! are a power-of-two multiple of BLAKE3's 1 KiB chunk), so a chunk's chaining
//! value is `Hasher::new().set_input_offset(start).update(chunk).finalize_non_root()`,
//! and the chaining values merge to the root exactly as BLAKE3 builds its tree:
//! the left subtree holds the largest power of two of chunks below the total.
//! A receiver checks once that the outboard merges to the blob id, then checks
//! each chunk against its own chaining value. A blob of one chunk (or none)
//! has an empty outboard: its only chunk is checked against the id itself.
//!
//! The chaining values do not bind the blob's size by themselves: a false size
//! claim with the same chunk count merges to the same root. It is caught at the
//! last chunk, whose true bytes then have the wrong length, and whose claimed
//! length no bytes can match.

use std::{fs::File, io, os::unix::fs::FileExt};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use rayon::prelude::*;
use sha2::Digest as _;

use crate::{BlobId, chunks::Geometry, id::Sha256Digest};

/// Why data does not match the blob it claims to be part of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The outboard has the wrong number of chaining values for the size.
    #[error(
        "outboard of blob {id} has {got} chaining values, expected {expected} for {size} bytes"
    )]
    OutboardLength {
        /// The blob.
        id: BlobId,
        /// Size claimed.
        size: u64,
        /// Chaining values expected.
        expected: usize,
        /// Chaining values given.
        got: usize,
    },
    /// The chaining values do not merge to the id (wrong entries or a wrong size claim).
    #[error("outboard of blob {id} does not hash to its id (wrong chaining values or size)")]
    OutboardMismatch {
        /// The blob.
        id: BlobId,
    },
    /// The chunk index is past the end of the blob.
    #[error("chunk {index} of blob {id} is out of range ({count} chunks)")]
    ChunkIndex {
        /// The blob.
        id: BlobId,
        /// Index given.
        index: u32,
        /// Chunks the blob has.
        count: u32,
    },
    /// The chunk has the wrong length.
    #[error("chunk {index} of blob {id} is {got} bytes, expected {expected}")]
    ChunkLength {
        /// The blob.
        id: BlobId,
        /// The chunk.
        index: u32,
        /// Expected length.
        expected: u64,
        /// Length given.
        got: u64,
    },
    /// The chunk's hash does not match.
    #[error("chunk {index} of blob {id} fails verification")]
    ChunkHash {
        /// The blob.
        id: BlobId,
        /// The chunk.
        index: u32,
    },
}

/// A blob's geometry and verified chaining values.
///
/// Holding an `Outboard` means its chaining values merge to its id: it is built
/// only by [`Outboard::verified`] or by hashing the data itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outboard {
    id: BlobId,
    geometry: Geometry,
    /// One per chunk, or none for a blob of at most one chunk.
    cvs: Vec<ChainingValue>,
}

/// The chaining value of chunk `index` (a non-root subtree).
fn chunk_cv(geometry: &Geometry, index: u32, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(geometry.chunk_range(index).start);
    h.update(data);
    h.finalize_non_root()
}

/// Merges the chaining values of a non-root subtree.
fn merge_non_root(cvs: &[ChainingValue]) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_len(cvs.len());
    merge_subtrees_non_root(
        &merge_non_root(&cvs[..left]),
        &merge_non_root(&cvs[left..]),
        Mode::Hash,
    )
}

/// The largest power of two below `n` (`n >= 2`): the left subtree's share.
fn left_len(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root hash of at least two chunks' chaining values.
fn merge_root(cvs: &[ChainingValue]) -> blake3::Hash {
    let left = left_len(cvs.len());
    merge_subtrees_root(
        &merge_non_root(&cvs[..left]),
        &merge_non_root(&cvs[left..]),
        Mode::Hash,
    )
}

impl Outboard {
    /// Checks `chaining_values` (32 bytes each, concatenated) against `id` for
    /// a blob of `size` bytes.
    pub fn verified(id: BlobId, size: u64, chaining_values: &[u8]) -> Result<Self, VerifyError> {
        let geometry = Geometry::new(size);
        let expected = Self::expected_len(&geometry);
        if !chaining_values.len().is_multiple_of(32) || chaining_values.len() / 32 != expected {
            return Err(VerifyError::OutboardLength {
                id,
                size,
                expected,
                got: chaining_values.len().div_ceil(32),
            });
        }
        let cvs: Vec<ChainingValue> = chaining_values
            .chunks_exact(32)
            // Cannot fail: chunks_exact yields 32-byte slices.
            .map(|c| c.try_into().expect("32 bytes"))
            .collect();
        if !cvs.is_empty() && merge_root(&cvs) != id.to_hash() {
            return Err(VerifyError::OutboardMismatch { id });
        }
        Ok(Self { id, geometry, cvs })
    }

    /// The outboard of a blob of `size` bytes whose chunks' chaining values
    /// were computed from the chunks themselves as they were written (an
    /// origin download): the id is their merge, so no byte is read again.
    /// `None` for a blob of one chunk (its id is the hash of the bytes) or
    /// when the count does not match the geometry.
    pub fn from_chunk_values(size: u64, cvs: Vec<ChainingValue>) -> Option<Self> {
        let geometry = Geometry::new(size);
        if geometry.chunk_count() < 2 || cvs.len() != geometry.chunk_count() as usize {
            return None;
        }
        Some(Self {
            id: merge_root(&cvs).into(),
            geometry,
            cvs,
        })
    }

    /// The outboard of a blob of at most one chunk: nothing to check until the
    /// chunk arrives. `None` when `size` needs more than one chunk.
    pub fn single_chunk(id: BlobId, size: u64) -> Option<Self> {
        let geometry = Geometry::new(size);
        (geometry.chunk_count() == 1).then_some(Self {
            id,
            geometry,
            cvs: Vec::new(),
        })
    }

    fn expected_len(geometry: &Geometry) -> usize {
        match geometry.chunk_count() {
            1 => 0,
            n => n as usize,
        }
    }

    /// Hashes `data` (in parallel, chunk by chunk) into its outboard.
    pub fn compute(data: &[u8]) -> Self {
        let geometry = Geometry::new(data.len() as u64);
        let count = geometry.chunk_count();
        if count == 1 {
            return Self {
                id: BlobId::of(data),
                geometry,
                cvs: Vec::new(),
            };
        }
        let cvs: Vec<ChainingValue> = (0..count)
            .into_par_iter()
            .map(|i| {
                let r = geometry.chunk_range(i);
                chunk_cv(&geometry, i, &data[r.start as usize..r.end as usize])
            })
            .collect();
        Self {
            id: merge_root(&cvs).into(),
            geometry,
            cvs,
        }
    }

    /// The chaining value of chunk `index` of a blob with `geometry`, from
    /// the chunk's bytes alone (meaningful when the blob has several chunks:
    /// a lone chunk is the root). What a receiver checks a chunk against
    /// before the blob's id is known (an origin download under way).
    pub fn chunk_chaining_value(geometry: &Geometry, index: u32, data: &[u8]) -> [u8; 32] {
        chunk_cv(geometry, index, data)
    }

    /// The blob's id.
    pub const fn id(&self) -> BlobId {
        self.id
    }

    /// The blob's geometry.
    pub const fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The blob's size in bytes.
    pub const fn size(&self) -> u64 {
        self.geometry.size()
    }

    /// The chaining values, 32 bytes each, concatenated (the wire and disk form).
    pub fn chaining_values(&self) -> Vec<u8> {
        self.cvs.concat()
    }

    /// Checks one chunk's bytes.
    pub fn verify_chunk(&self, index: u32, data: &[u8]) -> Result<(), VerifyError> {
        let count = self.geometry.chunk_count();
        if index >= count {
            return Err(VerifyError::ChunkIndex {
                id: self.id,
                index,
                count,
            });
        }
        let expected = self.geometry.chunk_len(index);
        if data.len() as u64 != expected {
            return Err(VerifyError::ChunkLength {
                id: self.id,
                index,
                expected,
                got: data.len() as u64,
            });
        }
        let ok = if self.cvs.is_empty() {
            blake3::hash(data) == self.id.to_hash()
        } else {
            // blake3::Hash compares in constant time.
            blake3::Hash::from_bytes(chunk_cv(&self.geometry, index, data))
                == blake3::Hash::from_bytes(self.cvs[index as usize])
        };
        if ok {
            Ok(())
        } else {
            Err(VerifyError::ChunkHash { id: self.id, index })
        }
    }
}

/// What hashing a file yields.
#[derive(Debug, Clone)]
pub struct FileDigest {
    /// The outboard (and with it the id and geometry).
    pub outboard: Outboard,
    /// SHA-256 of the bytes, when asked for.
    pub sha256: Option<Sha256Digest>,
}

/// The SHA-256 of the first `size` bytes of `file`, in one sequential pass
/// of 4 MiB reads.
pub fn sha256_file(file: &File, size: u64) -> io::Result<Sha256Digest> {
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < size {
        let n = buf.len().min((size - offset) as usize);
        file.read_exact_at(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}

/// Hashes a file through a read-only memory map: no copy out of the page
/// cache, chunks in parallel. For the CLI's `nebula hash`, where a file
/// truncated while being hashed may kill the process (as it would `b3sum`);
/// the daemon uses [`digest_file`], which cannot be hurt that way.
pub fn digest_path_mmap(path: &std::path::Path, with_sha256: bool) -> io::Result<FileDigest> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    if size == 0 {
        return digest_file(&file, 0, with_sha256);
    }
    // SAFETY: the map is read-only and private to this call; a concurrent
    // truncation raises SIGBUS rather than undefined reads, as with b3sum.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let data: &[u8] = &map;
    let (outboard, sha256) = rayon::join(
        || Outboard::compute(data),
        || {
            with_sha256.then(|| {
                let mut hasher = sha2::Sha256::new();
                hasher.update(data);
                Sha256Digest(hasher.finalize().into())
            })
        },
    );
    Ok(FileDigest { outboard, sha256 })
}

/// Hashes an open file of `size` bytes: chunks in parallel on the rayon pool,
/// SHA-256 (when `with_sha256`) in one sequential pass beside them. Reads with
/// `pread`, so memory stays at one buffer per thread whatever the file size.
pub fn digest_file(file: &File, size: u64, with_sha256: bool) -> io::Result<FileDigest> {
    let geometry = Geometry::new(size);
    let count = geometry.chunk_count();
    let chunks = || -> io::Result<Outboard> {
        if count == 1 {
            let mut buf = vec![0u8; size as usize];
            file.read_exact_at(&mut buf, 0)?;
            return Ok(Outboard {
                id: BlobId::of(&buf),
                geometry,
                cvs: Vec::new(),
            });
        }
        let cvs = (0..count)
            .into_par_iter()
            .map_init(Vec::new, |buf, i| {
                let r = geometry.chunk_range(i);
                buf.resize((r.end - r.start) as usize, 0);
                file.read_exact_at(buf, r.start)?;
                Ok(chunk_cv(&geometry, i, buf))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Outboard {
            id: merge_root(&cvs).into(),
            geometry,
            cvs,
        })
    };
    let sha = || with_sha256.then(|| sha256_file(file, size)).transpose();
    let (outboard, sha256) = rayon::join(chunks, sha);
    Ok(FileDigest {
        outboard: outboard?,
        sha256: sha256?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: usize = 1 << 20;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        // A cheap mix of position and seed that never repeats at chunk distance.
        (0..len)
            .map(|i| {
                let x = (i as u64 ^ u64::from(seed) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                (x >> 56) as u8
            })
            .collect()
    }

    fn check_all_chunks_verify(bytes: &[u8]) {
        let ob = Outboard::compute(bytes);
        assert_eq!(
            ob.id().to_hash(),
            blake3::hash(bytes),
            "len {}",
            bytes.len()
        );
        let again = Outboard::verified(ob.id(), bytes.len() as u64, &ob.chaining_values()).unwrap();
        for i in 0..ob.geometry().chunk_count() {
            let r = ob.geometry().chunk_range(i);
            again
                .verify_chunk(i, &bytes[r.start as usize..r.end as usize])
                .unwrap();
        }
    }

    #[test]
    fn edge_sizes_hash_like_blake3_and_verify() {
        for len in [
            0,
            1,
            1023,
            1024,
            1025,
            MIB - 1,
            MIB,
            MIB + 1,
            2 * MIB,
            3 * MIB + 7,
            5 * MIB + 123,
        ] {
            check_all_chunks_verify(&data(len, 7));
        }
    }

    #[test]
    fn corruption_is_rejected() {
        let bytes = data(5 * MIB + 123, 3);
        let ob = Outboard::compute(&bytes);
        let g = *ob.geometry();
        for i in 0..g.chunk_count() {
            let r = g.chunk_range(i);
            let chunk = &bytes[r.start as usize..r.end as usize];
            let mut flipped = chunk.to_vec();
            let bit = (i as usize * 7919) % (flipped.len() * 8);
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(
                ob.verify_chunk(i, &flipped),
                Err(VerifyError::ChunkHash { .. })
            ));
            assert!(matches!(
                ob.verify_chunk(i, &chunk[..chunk.len() - 1]),
                Err(VerifyError::ChunkLength { .. })
            ));
            let mut longer = chunk.to_vec();
            longer.push(0);
            assert!(matches!(
                ob.verify_chunk(i, &longer),
                Err(VerifyError::ChunkLength { .. })
            ));
            // A chunk that is right for another index is wrong here.
            if i + 1 < g.chunk_count() - 1 {
                let next = g.chunk_range(i + 1);
                assert!(
                    ob.verify_chunk(i, &bytes[next.start as usize..next.end as usize])
                        .is_err()
                );
            }
        }
        assert!(matches!(
            ob.verify_chunk(g.chunk_count(), b""),
            Err(VerifyError::ChunkIndex { .. })
        ));
        // Every wrong outboard entry is caught by the root check.
        let cvs = ob.chaining_values();
        for entry in 0..g.chunk_count() as usize {
            let mut bad = cvs.clone();
            bad[entry * 32 + 5] ^= 0x10;
            assert_eq!(
                Outboard::verified(ob.id(), bytes.len() as u64, &bad),
                Err(VerifyError::OutboardMismatch { id: ob.id() })
            );
        }
        // Wrong length, wrong size claim.
        assert!(matches!(
            Outboard::verified(ob.id(), bytes.len() as u64, &cvs[..cvs.len() - 32]),
            Err(VerifyError::OutboardLength { .. })
        ));
        assert!(matches!(
            Outboard::verified(ob.id(), bytes.len() as u64, &cvs[..cvs.len() - 1]),
            Err(VerifyError::OutboardLength { .. })
        ));
        // A wrong size claim that keeps the chunk count merges to the same root
        // (the tree binds lengths through the chunks), so it is caught at the
        // last chunk: the true bytes have the wrong length for the claim, and
        // bytes of the claimed length cannot match the chaining value.
        let last = g.chunk_count() - 1;
        let r = g.chunk_range(last);
        let tail = &bytes[r.start as usize..];
        for claim in [bytes.len() as u64 + 1, bytes.len() as u64 - 1] {
            if let Ok(lie) = Outboard::verified(ob.id(), claim, &cvs) {
                assert!(lie.verify_chunk(last, tail).is_err());
                let mut padded = tail.to_vec();
                padded.resize(lie.geometry().chunk_len(last) as usize, 0);
                assert!(lie.verify_chunk(last, &padded).is_err());
            }
        }
        // A claim that changes the chunk count is refused outright.
        assert!(Outboard::verified(ob.id(), 2 << 20, &cvs).is_err());
        assert!(Outboard::verified(ob.id(), 9 << 20, &cvs).is_err());
    }

    #[test]
    fn single_chunk_blobs_check_against_the_id() {
        for len in [0, 1, 1024, MIB] {
            let bytes = data(len, 9);
            let id = BlobId::of(&bytes);
            let ob = Outboard::single_chunk(id, len as u64).unwrap();
            ob.verify_chunk(0, &bytes).unwrap();
            assert!(Outboard::verified(id, len as u64, &[]).is_ok());
            if len > 0 {
                let mut bad = bytes.clone();
                bad[len / 2] ^= 1;
                assert!(ob.verify_chunk(0, &bad).is_err());
            }
        }
        assert!(Outboard::single_chunk(BlobId::of(b""), MIB as u64 + 1).is_none());
    }

    #[test]
    fn digest_file_matches_compute_and_sha256() {
        use std::io::Write;
        for len in [0, 1, MIB + 1, 3 * MIB] {
            let bytes = data(len, 1);
            let mut f = tempfile::tempfile().unwrap();
            f.write_all(&bytes).unwrap();
            let d = digest_file(&f, len as u64, true).unwrap();
            assert_eq!(d.outboard, Outboard::compute(&bytes));
            let sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            assert_eq!(d.sha256, Some(Sha256Digest(sha)));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_sizes_hash_like_blake3(len in 0usize..(6 * MIB), seed in any::<u8>()) {
            check_all_chunks_verify(&data(len, seed));
        }

        #[test]
        fn any_flipped_bit_is_rejected(len in (MIB + 1)..(4 * MIB), bit in any::<usize>()) {
            let bytes = data(len, 5);
            let ob = Outboard::compute(&bytes);
            let mut bad = bytes.clone();
            let bit = bit % (len * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            let index = (bit / 8 / MIB) as u32;
            let r = ob.geometry().chunk_range(index);
            prop_assert!(ob.verify_chunk(index, &bad[r.start as usize..r.end as usize]).is_err());
        }
    }
}
