//! [`Session`]: an origin download under way, shared with other peers before
//! its blob id exists; [`Sessions`]: those this peer offers.
//!
//! A leaf: fetches by URL (`origin`) fill the table, the serving side
//! (`exchange::serve`) reads it, and neither imports the other for it.
//!
//! The leaseholder writes the origin's bytes into a scratch file; each chunk,
//! once whole, gets its chaining value (which depends only on the chunk's
//! bytes and index, not on the rest of the blob). Waiting peers ask the holder
//! for its session (`GetSession`), fetch the chunks it holds (`GetChunks` with
//! `session`), check each against the holder's chaining value before writing
//! it into their own session, and end with the whole file, which the store
//! hashes into the blob id. A waiting peer that takes the lease over keeps
//! its chunks and asks the origin only for the rest.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;
use nebula_common::{ChunkSet, Geometry, Outboard, Scratch};
use nebula_proto::v1 as pb;

/// The largest object fetched from an origin (4 TiB): a bigger size announced
/// by an origin or a peer is refused before anything is sized by it.
pub(crate) const MAX_SIZE: u64 = 1 << 42;

/// What identifies one version of the origin's content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Validators {
    /// Total size in bytes.
    pub(crate) size: u64,
    /// `ETag`, verbatim.
    pub(crate) etag: String,
    /// `Last-Modified`, verbatim.
    pub(crate) last_modified: String,
}

/// Origin downloads under way that other peers may fetch from, by key:
/// filled by fetches by URL, read by the serving side. Clones share the table.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sessions(Arc<dashmap::DashMap<String, Arc<Session>>>);

impl Sessions {
    /// The session offered under `key`, if any.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<Session>> {
        self.0.get(key).map(|s| Arc::clone(s.value()))
    }

    /// Offers `session` under its key, in place of any other.
    pub(crate) fn offer(&self, session: &Arc<Session>) {
        self.0.insert(session.key.clone(), Arc::clone(session));
    }

    /// Stops offering `session`, unless another session took its key or it
    /// is offered again (its `serving` count is above zero).
    pub(crate) fn withdraw(&self, session: &Arc<Session>) {
        self.0.remove_if(&session.key, |_, s| {
            Arc::ptr_eq(s, session) && s.serving.load(std::sync::atomic::Ordering::Acquire) == 0
        });
    }
}

/// One origin download, as a holder or a follower of it.
#[derive(Debug)]
pub(crate) struct Session {
    /// The control plane's name for it.
    pub(crate) key: String,
    scratch: Scratch,
    layout: Mutex<Option<Layout>>,
    /// Layouts made so far.
    generations: std::sync::atomic::AtomicU64,
    /// `Offered` guards alive: the session is offered while any is.
    pub(crate) serving: std::sync::atomic::AtomicUsize,
    /// Peers that asked for this session lately, by the address they serve
    /// on, so that followers find each other.
    followers: Mutex<HashMap<String, (String, Instant)>>,
}

/// A follower that has not asked for this long is no longer offered.
const FOLLOWER_FRESH: Duration = Duration::from_secs(10);
/// Followers remembered; followers offered per answer.
const MAX_FOLLOWERS: usize = 256;
const OFFERED_FOLLOWERS: usize = 8;

/// What is known once the origin has said what it sends.
#[derive(Debug)]
struct Layout {
    /// Which layout this is: updates computed against an older one are dropped.
    generation: u64,
    validators: Validators,
    geometry: Geometry,
    have: ChunkSet,
    /// Chaining values of the chunks held; zero elsewhere.
    cvs: Vec<[u8; 32]>,
    /// The byte ranges written into each chunk not yet whole (the holder's
    /// record, to know when one is: a range written twice, by a resumed or
    /// abandoned request, counts once).
    written: Vec<Vec<(u64, u64)>>,
}

impl Layout {
    fn new(validators: Validators, generation: u64) -> Self {
        let geometry = Geometry::new(validators.size);
        let n = geometry.chunk_count() as usize;
        Self {
            generation,
            validators,
            geometry,
            have: ChunkSet::new(n as u32),
            cvs: vec![[0; 32]; n],
            written: vec![Vec::new(); n],
        }
    }
}

/// Why a chunk from another peer's session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Its bytes do not hash to the chaining value the holder gave.
    Mismatch,
    /// Not a chunk of this download, or of another length.
    Malformed,
}

impl Session {
    /// An empty session writing into `scratch`.
    pub(crate) fn new(key: String, scratch: Scratch) -> Arc<Self> {
        Arc::new(Self {
            key,
            scratch,
            layout: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            serving: std::sync::atomic::AtomicUsize::new(0),
            followers: Mutex::new(HashMap::new()),
        })
    }

    fn layout(&self) -> MutexGuard<'_, Option<Layout>> {
        // Every update is one step; a panic cannot leave it half-done.
        self.layout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The scratch file.
    pub(crate) fn file(&self) -> &Arc<File> {
        self.scratch.file()
    }

    /// Where the scratch file is.
    pub(crate) fn path(&self) -> &Path {
        self.scratch.path()
    }

    /// The scratch, for the store to adopt once complete.
    pub(crate) fn scratch(&self) -> &Scratch {
        &self.scratch
    }

    /// The blob's outboard from the chunks' chaining values, once every
    /// chunk is held; `None` before, and for a blob of one chunk (whose id
    /// is the hash of its bytes).
    pub(crate) fn outboard(&self) -> Option<Outboard> {
        let guard = self.layout();
        let l = guard.as_ref()?;
        if l.have.count() != l.geometry.chunk_count() {
            return None;
        }
        Outboard::from_chunk_values(l.validators.size, l.cvs.clone())
    }

    /// The origin is sending the version `v`: chunks of another version are
    /// forgotten. Answers whether the chunks held were kept.
    pub(crate) fn begin(&self, v: &Validators) -> bool {
        let mut layout = self.layout();
        if layout.as_ref().is_some_and(|l| l.validators == *v) {
            return true;
        }
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A shorter version must not keep the longer one's tail.
        let _ = self.file().set_len(v.size);
        *layout = Some(Layout::new(v.clone(), generation));
        false
    }

    /// Forgets everything (the content changed, or a peer lied).
    pub(crate) fn reset(&self) {
        *self.layout() = None;
    }

    /// The version held, if any.
    pub(crate) fn validators(&self) -> Option<Validators> {
        self.layout().as_ref().map(|l| l.validators.clone())
    }

    /// The holder wrote `len` bytes at `at`: chunks that are now whole are
    /// read back and get their chaining values. Blocking.
    pub(crate) fn wrote(&self, at: u64, len: u64) {
        let (generation, whole): (u64, Vec<(u32, Geometry)>) = {
            let mut guard = self.layout();
            let Some(l) = guard.as_mut() else { return };
            if len == 0 || l.written.is_empty() {
                return;
            }
            let size = l.geometry.chunk_size();
            let (first, last) = (at / size, (at + len - 1) / size);
            let mut whole = Vec::new();
            for i in first..=last.min(l.written.len() as u64 - 1) {
                let r = l.geometry.chunk_range(i as u32);
                let (from, to) = (at.max(r.start), (at + len).min(r.end));
                if from >= to || l.have.contains(i as u32) {
                    continue;
                }
                let ranges = &mut l.written[i as usize];
                if cover(ranges, from, to) >= r.end - r.start {
                    ranges.clear();
                    whole.push((i as u32, l.geometry));
                }
            }
            (l.generation, whole)
        };
        for (i, geometry) in whole {
            let r = geometry.chunk_range(i);
            let mut data = vec![0; (r.end - r.start) as usize];
            if self.file().read_exact_at(&mut data, r.start).is_err() {
                continue;
            }
            let cv = Outboard::chunk_chaining_value(&geometry, i, &data);
            if let Some(l) = self.layout().as_mut()
                && l.generation == generation
            {
                l.cvs[i as usize] = cv;
                l.have.insert(i);
            }
        }
    }

    /// A follower took `data` as chunk `index` from a holder that gave `cv`:
    /// checked, written, and held. Blocking.
    pub(crate) fn accept(&self, index: u32, data: &[u8], cv: [u8; 32]) -> Result<(), Refused> {
        let (generation, geometry) = match self.layout().as_ref() {
            Some(l) if index < l.geometry.chunk_count() => (l.generation, l.geometry),
            _ => return Err(Refused::Malformed),
        };
        let r = geometry.chunk_range(index);
        if data.len() as u64 != r.end - r.start {
            return Err(Refused::Malformed);
        }
        // blake3::Hash compares in constant time.
        let got = blake3::Hash::from_bytes(Outboard::chunk_chaining_value(&geometry, index, data));
        if got != blake3::Hash::from_bytes(cv) {
            return Err(Refused::Mismatch);
        }
        if self.file().write_all_at(data, r.start).is_err() {
            return Err(Refused::Malformed);
        }
        nebula_common::store::start_writeback(self.file(), r.start, r.end - r.start);
        if let Some(l) = self.layout().as_mut()
            && l.generation == generation
        {
            l.cvs[index as usize] = cv;
            l.have.insert(index);
            l.written[index as usize].clear();
        }
        Ok(())
    }

    /// The bytes of a chunk held, for another peer. Blocking.
    pub(crate) fn read_chunk(&self, index: u32) -> Option<Bytes> {
        let r = {
            let guard = self.layout();
            let l = guard.as_ref()?;
            if !l.have.contains(index) {
                return None;
            }
            l.geometry.chunk_range(index)
        };
        let mut data = vec![0; (r.end - r.start) as usize];
        self.file().read_exact_at(&mut data, r.start).ok()?;
        Some(Bytes::from(data))
    }

    /// The chunks held, for a blob of `size` bytes (empty when another size).
    pub(crate) fn held(s: &pb::Session, size: u64) -> ChunkSet {
        let count = Geometry::new(size).chunk_count();
        if s.size != size {
            return ChunkSet::new(count);
        }
        ChunkSet::from_bitmap(&s.chunks, count)
    }

    /// The length of chunk `index` of the version held (0 when none).
    pub(crate) fn chunk_len(&self, index: u32) -> u64 {
        self.layout()
            .as_ref()
            .filter(|l| index < l.geometry.chunk_count())
            .map_or(0, |l| l.geometry.chunk_len(index))
    }

    /// Whether chunk `index` is held.
    pub(crate) fn has(&self, index: u32) -> bool {
        self.layout()
            .as_ref()
            .is_some_and(|l| l.have.contains(index))
    }

    /// Every chunk is held.
    pub(crate) fn is_complete(&self) -> bool {
        self.layout()
            .as_ref()
            .is_some_and(|l| l.have.count() == l.geometry.chunk_count())
    }

    /// Bytes held.
    pub(crate) fn bytes_held(&self) -> u64 {
        self.layout()
            .as_ref()
            .map_or(0, |l| l.have.iter().map(|i| l.geometry.chunk_len(i)).sum())
    }

    /// Byte ranges (inclusive) of the chunks not held, merged, in order.
    pub(crate) fn missing(&self) -> Vec<(u64, u64)> {
        let guard = self.layout();
        let Some(l) = guard.as_ref() else {
            return Vec::new();
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for i in 0..l.geometry.chunk_count() {
            if l.have.contains(i) {
                continue;
            }
            let r = l.geometry.chunk_range(i);
            match ranges.last_mut() {
                Some(last) if last.1 + 1 == r.start => last.1 = r.end - 1,
                _ => ranges.push((r.start, r.end - 1)),
            }
        }
        ranges
    }

    /// What a `GetSession` from `asker` (its peer id and the address it
    /// serves on) answers: the session, with the other peers following it.
    pub(crate) fn to_wire_for(&self, asker: Option<&(String, String)>) -> pb::Session {
        let now = Instant::now();
        let others: Vec<(String, String)> = {
            let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
            followers.retain(|_, (_, seen)| now.duration_since(*seen) < FOLLOWER_FRESH);
            if let Some((id, addr)) = asker
                && (followers.len() < MAX_FOLLOWERS || followers.contains_key(addr))
            {
                followers.insert(addr.clone(), (id.clone(), now));
            }
            let mut others: Vec<(&String, &(String, Instant))> = followers
                .iter()
                .filter(|(a, _)| Some(*a) != asker.map(|(_, a)| a))
                .collect();
            // The most recent first: they are the likeliest to hold new chunks.
            others.sort_by_key(|o| std::cmp::Reverse(o.1.1));
            others
                .into_iter()
                .take(OFFERED_FOLLOWERS)
                .map(|(addr, (id, _))| (id.clone(), addr.clone()))
                .collect()
        };
        pb::Session {
            peer_ids: others.iter().map(|(id, _)| id.clone()).collect(),
            peers: others.into_iter().map(|(_, addr)| addr).collect(),
            ..self.to_wire()
        }
    }

    /// What a `GetSession` answers, without peers.
    pub(crate) fn to_wire(&self) -> pb::Session {
        let guard = self.layout();
        let Some(l) = guard.as_ref() else {
            return pb::Session::default();
        };
        let cvs: Vec<u8> = l.have.iter().flat_map(|i| l.cvs[i as usize]).collect();
        pb::Session {
            size: l.validators.size,
            etag: l.validators.etag.clone(),
            last_modified: l.validators.last_modified.clone(),
            chunks: Bytes::from(l.have.to_bitmap()),
            chaining_values: Bytes::from(cvs),
            complete: l.have.count() == l.geometry.chunk_count(),
            peers: Vec::new(),
            peer_ids: Vec::new(),
        }
    }
}

/// Adds `from..to` to `ranges` (kept sorted and disjoint) and answers how
/// many bytes they cover.
fn cover(ranges: &mut Vec<(u64, u64)>, from: u64, to: u64) -> u64 {
    ranges.push((from, to));
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    *ranges = merged;
    ranges.iter().map(|(a, b)| b - a).sum()
}

/// A holder's `GetSession` answer, read: its version and the chaining value
/// of each chunk it holds.
#[derive(Debug)]
pub(crate) struct Offer {
    pub(crate) validators: Validators,
    pub(crate) chunks: Vec<(u32, [u8; 32])>,
    /// Other followers to fetch from: (peer id, address).
    pub(crate) peers: Vec<(String, String)>,
}

impl Offer {
    /// `None` when the answer is malformed (a chaining value per chunk held).
    pub(crate) fn read(s: &pb::Session) -> Option<Self> {
        if s.size > MAX_SIZE {
            return None;
        }
        let validators = Validators {
            size: s.size,
            etag: s.etag.clone(),
            last_modified: s.last_modified.clone(),
        };
        let count = Geometry::new(s.size).chunk_count();
        let held = ChunkSet::from_bitmap(&s.chunks, count);
        let indexes: Vec<u32> = held.iter().collect();
        if s.chaining_values.len() != indexes.len() * 32 {
            return None;
        }
        let chunks = indexes
            .into_iter()
            .zip(s.chaining_values.chunks_exact(32))
            .map(|(i, cv)| (i, cv.try_into().unwrap_or([0; 32])))
            .collect();
        Some(Self {
            validators,
            chunks,
            peers: s
                .peer_ids
                .iter()
                .zip(&s.peers)
                .take(OFFERED_FOLLOWERS)
                .map(|(id, addr)| (id.clone(), addr.clone()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(dir: &Path) -> (nebula_common::Store, Arc<Session>) {
        let store = nebula_common::Store::open(dir).unwrap();
        let session = Session::new("k".into(), store.scratch().unwrap());
        (store, session)
    }

    #[test]
    fn a_holders_chunks_check_out_at_a_follower() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let ((_, holder), (store, follower)) = (session(&a), session(&b));
        let size = 3 * (1 << 20) + 12345;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let v = Validators {
            size: size as u64,
            etag: "\"e\"".into(),
            last_modified: String::new(),
        };
        holder.begin(&v);
        // Written out of order, in odd pieces.
        for (at, len) in [
            (2_000_000u64, 1_000_000u64),
            (0, 2_000_000),
            (3_000_000, size as u64 - 3_000_000),
        ] {
            holder
                .file()
                .write_all_at(&data[at as usize..(at + len) as usize], at)
                .unwrap();
            holder.wrote(at, len);
        }
        assert!(holder.is_complete());
        let offer = Offer::read(&holder.to_wire()).unwrap();
        follower.begin(&offer.validators);
        for &(i, cv) in &offer.chunks {
            let chunk = holder.read_chunk(i).unwrap();
            let mut bad = chunk.to_vec();
            bad[10] ^= 1;
            assert_eq!(follower.accept(i, &bad, cv), Err(Refused::Mismatch));
            follower.accept(i, &chunk, cv).unwrap();
        }
        assert!(follower.is_complete());
        assert_eq!(std::fs::read(follower.path()).unwrap(), data);
        assert!(follower.missing().is_empty());

        // The id from the chaining values is the hash of the bytes, and the
        // store takes the file as that blob without reading it again.
        let outboard = follower.outboard().unwrap();
        assert_eq!(outboard.id(), nebula_common::BlobId::of(&data));
        let blob = store.adopt(follower.scratch(), outboard).unwrap();
        assert!(blob.is_complete());
        let out = dir.path().join("out");
        store.export(&blob.id(), &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);
        // The session still reads what it served from.
        assert_eq!(follower.read_chunk(0).unwrap()[..], data[..1 << 20]);
    }

    #[test]
    fn a_range_written_twice_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, s) = session(dir.path());
        let mib = 1u64 << 20;
        let data: Vec<u8> = (0..2 * mib).map(|i| (i % 253) as u8).collect();
        s.begin(&Validators {
            size: 2 * mib,
            ..Validators::default()
        });
        let write = |at: u64, len: u64| {
            s.file()
                .write_all_at(&data[at as usize..(at + len) as usize], at)
                .unwrap();
            s.wrote(at, len);
        };
        // A request that broke after 600 KiB, resumed from the start: the
        // first chunk is not whole until its last byte is written.
        write(0, 600 << 10);
        write(0, 600 << 10);
        assert!(!s.has(0));
        write(600 << 10, mib - (600 << 10) - 1);
        assert!(!s.has(0));
        write(mib - 1, mib + 1);
        assert!(s.is_complete());
        assert_eq!(s.outboard().unwrap().id(), nebula_common::BlobId::of(&data));
    }

    #[test]
    fn missing_ranges_merge_and_a_new_version_forgets() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, s) = session(dir.path());
        let mib = 1u64 << 20;
        let v = Validators {
            size: 4 * mib,
            ..Validators::default()
        };
        s.begin(&v);
        s.file().set_len(4 * mib).unwrap();
        s.wrote(mib, mib);
        assert_eq!(s.missing(), vec![(0, mib - 1), (2 * mib, 4 * mib - 1)]);
        assert_eq!(s.bytes_held(), mib);
        assert!(s.begin(&v));
        assert!(!s.begin(&Validators {
            etag: "\"2\"".into(),
            ..v
        }));
        assert_eq!(s.bytes_held(), 0);
    }
}
