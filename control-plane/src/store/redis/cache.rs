//! [`Recent`]: answers read from Redis lately, reused for a short while.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;

use super::MAX_CACHED_SWARMS;

/// Values read from Redis lately, each usable for `ttl` after it was read;
/// bounded by [`MAX_CACHED_SWARMS`] (past it, it starts over).
#[derive(Debug)]
pub(super) struct Recent<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Recent<K, V> {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (Instant, V)>> {
        // The map holds only copies of answers; a panic mid-insert leaves it usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    pub(super) fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        if !self.enabled() {
            return None;
        }
        let map = self.lock();
        let (read, value) = map.get(key)?;
        (read.elapsed() < self.ttl).then(|| value.clone())
    }

    pub(super) fn insert(&self, key: K, value: V) {
        if !self.enabled() {
            return;
        }
        let mut map = self.lock();
        if map.len() >= MAX_CACHED_SWARMS {
            map.clear();
        }
        map.insert(key, (Instant::now(), value));
    }

    pub(super) fn remove(&self, key: &K) {
        if self.enabled() {
            self.lock().remove(key);
        }
    }

    pub(super) fn clear(&self) {
        if self.enabled() {
            self.lock().clear();
        }
    }
}
