//! Chunk geometry (a pure function of blob size, so every peer agrees on it)
//! and [`ChunkSet`], the bitmap of chunks a peer holds.

use std::ops::Range;

/// The smallest chunk: 1 MiB.
pub const MIN_CHUNK_SIZE: u64 = 1 << 20;

/// Chunk size doubles until a blob has at most this many chunks.
pub const MAX_CHUNKS: u64 = 8192;

/// How a blob of a given size is cut into chunks.
///
/// A blob has `ceil(size / chunk_size)` chunks, the last one possibly short; the
/// empty blob has one empty chunk, so every blob has at least one chunk to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    size: u64,
    /// A power of two, at least [`MIN_CHUNK_SIZE`].
    chunk_size: u64,
}

impl Geometry {
    /// The geometry of a blob of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut chunk_size = MIN_CHUNK_SIZE;
        while size.div_ceil(chunk_size) > MAX_CHUNKS {
            chunk_size *= 2;
        }
        Self { size, chunk_size }
    }

    /// The blob's size in bytes.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per chunk (the last chunk may be shorter).
    pub const fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks, at least one.
    pub fn chunk_count(&self) -> u32 {
        // At most MAX_CHUNKS, so it fits.
        self.size.div_ceil(self.chunk_size).max(1) as u32
    }

    /// Byte range of chunk `index` inside the blob.
    ///
    /// # Panics
    /// When `index` is not below [`Self::chunk_count`].
    pub fn chunk_range(&self, index: u32) -> Range<u64> {
        assert!(index < self.chunk_count(), "chunk {index} out of range");
        let start = u64::from(index) * self.chunk_size;
        // Saturating: the last chunk of a blob near u64::MAX bytes (a size
        // any peer may announce) would end past u64::MAX.
        start..start.saturating_add(self.chunk_size).min(self.size)
    }

    /// Length of chunk `index` in bytes.
    pub fn chunk_len(&self, index: u32) -> u64 {
        let r = self.chunk_range(index);
        r.end - r.start
    }
}

/// A set of chunk indexes, stored as a bitmap: bit `i % 8` of byte `i / 8` is
/// chunk `i` (the wire format of every `chunks` field).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChunkSet {
    bits: Vec<u8>,
    len: u32,
    count: u32,
}

impl ChunkSet {
    /// An empty set for a blob of `len` chunks.
    pub fn new(len: u32) -> Self {
        Self {
            bits: vec![0; (len as usize).div_ceil(8)],
            len,
            count: 0,
        }
    }

    /// Every chunk of a blob of `len` chunks.
    pub fn full(len: u32) -> Self {
        let mut set = Self::new(len);
        for i in 0..len {
            set.insert(i);
        }
        set
    }

    /// Reads a wire bitmap for a blob of `len` chunks; bits past `len` are ignored,
    /// missing trailing bytes count as zeros.
    pub fn from_bitmap(bitmap: &[u8], len: u32) -> Self {
        let mut set = Self::new(len);
        let n = set.bits.len().min(bitmap.len());
        set.bits[..n].copy_from_slice(&bitmap[..n]);
        if !len.is_multiple_of(8)
            && let Some(last) = set.bits.last_mut()
        {
            *last &= (1u8 << (len % 8)) - 1;
        }
        set.count = set.bits.iter().map(|b| b.count_ones()).sum();
        set
    }

    /// The wire bitmap.
    pub fn to_bitmap(&self) -> Vec<u8> {
        self.bits.clone()
    }

    /// The wire bitmap, borrowed.
    pub fn as_bitmap(&self) -> &[u8] {
        &self.bits
    }

    /// Number of chunks the blob has (the set's universe).
    pub const fn len(&self) -> u32 {
        self.len
    }

    /// Number of chunks in the set.
    pub const fn count(&self) -> u32 {
        self.count
    }

    /// No chunk is in the set.
    pub const fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every chunk is in the set.
    pub const fn is_full(&self) -> bool {
        self.count == self.len
    }

    /// Whether chunk `i` is in the set (false when out of range).
    pub fn contains(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Adds chunk `i`; returns whether it was new. Out-of-range indexes are ignored.
    pub fn insert(&mut self, i: u32) -> bool {
        if i >= self.len || self.contains(i) {
            return false;
        }
        self.bits[(i / 8) as usize] |= 1 << (i % 8);
        self.count += 1;
        true
    }

    /// Removes chunk `i`; returns whether it was there.
    pub fn remove(&mut self, i: u32) -> bool {
        if !self.contains(i) {
            return false;
        }
        self.bits[(i / 8) as usize] &= !(1 << (i % 8));
        self.count -= 1;
        true
    }

    /// The chunks in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|&i| self.contains(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn chunk_size_doubles_until_8192_chunks() {
        assert_eq!(Geometry::new(0).chunk_size(), MIB);
        assert_eq!(Geometry::new(0).chunk_count(), 1);
        assert_eq!(Geometry::new(0).chunk_len(0), 0);
        assert_eq!(Geometry::new(1).chunk_count(), 1);
        assert_eq!(Geometry::new(MIB).chunk_count(), 1);
        assert_eq!(Geometry::new(MIB + 1).chunk_count(), 2);
        assert_eq!(Geometry::new(MIB + 1).chunk_len(1), 1);
        assert_eq!(Geometry::new(8192 * MIB).chunk_size(), MIB);
        assert_eq!(Geometry::new(8192 * MIB + 1).chunk_size(), 2 * MIB);
        assert_eq!(Geometry::new(8192 * MIB + 1).chunk_count(), 4097);
        assert_eq!(Geometry::new(1 << 40).chunk_count(), 8192);
    }

    #[test]
    fn chunk_set_round_trips_bitmaps() {
        let mut s = ChunkSet::new(10);
        assert!(s.insert(0) && s.insert(9) && !s.insert(9) && !s.insert(10));
        assert_eq!(s.count(), 2);
        let t = ChunkSet::from_bitmap(&s.to_bitmap(), 10);
        assert_eq!(s, t);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![0, 9]);
        // Stray bits past the end are dropped.
        let u = ChunkSet::from_bitmap(&[0xff, 0xff, 0xff], 10);
        assert_eq!(u.count(), 10);
        assert!(u.is_full());
        assert!(ChunkSet::full(3).is_full());
    }
}

/// Property tests (issue 10, fuzzing): geometry and bitmaps from any size
/// and any bytes, as they arrive from the network. `PROPTEST_CASES` sets
/// the cases.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn size() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            0u64..(64 << 20),
            (u64::MAX - (64 << 20))..=u64::MAX,
            (0u32..64).prop_map(|s| 1u64 << s),
        ]
    }

    proptest! {
        #[test]
        fn fuzz_chunks_tile_the_blob_for_any_size(size in size(), pick in any::<u32>()) {
            let g = Geometry::new(size);
            let n = g.chunk_count();
            prop_assert!(n >= 1 && u64::from(n) <= MAX_CHUNKS);
            prop_assert!(g.chunk_size().is_power_of_two() && g.chunk_size() >= MIN_CHUNK_SIZE);
            // The first, the last and one in between.
            for i in [0, n - 1, pick % n] {
                let r = g.chunk_range(i);
                prop_assert!(r.start <= r.end && r.end <= size);
                prop_assert_eq!(r.start, u64::from(i) * g.chunk_size());
                prop_assert_eq!(g.chunk_len(i), r.end - r.start);
                if i + 1 < n {
                    prop_assert_eq!(r.end - r.start, g.chunk_size());
                }
            }
            prop_assert_eq!(g.chunk_range(n - 1).end, size);
        }

        #[test]
        fn fuzz_bitmaps_from_the_wire(bitmap in proptest::collection::vec(any::<u8>(), 0..300), len in 0u32..2000) {
            let set = ChunkSet::from_bitmap(&bitmap, len);
            prop_assert_eq!(set.len(), len);
            prop_assert!(set.count() <= len);
            prop_assert_eq!(set.iter().count() as u32, set.count());
            prop_assert!(set.iter().all(|i| i < len));
            prop_assert_eq!(set.as_bitmap().len(), (len as usize).div_ceil(8));
            prop_assert_eq!(ChunkSet::from_bitmap(&set.to_bitmap(), len), set.clone());
            let mut copy = set.clone();
            for i in [0, len.saturating_sub(1), len, u32::MAX] {
                let had = copy.contains(i);
                prop_assert_eq!(copy.remove(i), had);
                prop_assert_eq!(copy.insert(i), i < len);
            }
        }
    }

    #[test]
    fn issue10_fuzz_the_last_chunk_of_the_largest_blob_does_not_overflow() {
        let g = Geometry::new(u64::MAX);
        let last = g.chunk_count() - 1;
        assert_eq!(g.chunk_range(last).end, u64::MAX);
    }
}
