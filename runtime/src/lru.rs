//! A bytes-bounded least-recently-used map: the services' caches (the encoder's prompt
//! embeddings, the denoiser's embeddings kept under handles, the gateway's handles). Each entry
//! has a size in bytes; inserting evicts least-recently-used entries until the total fits the
//! capacity, and an entry larger than the whole capacity is not stored (capacity 0 stores
//! nothing). Not synchronised: callers hold it in a mutex.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
};

struct Entry<V> {
    value: V,
    bytes: u64,
    tick: u64,
}

/// The map; see the module documentation.
pub struct ByteLru<K, V> {
    capacity: u64,
    map: HashMap<K, Entry<V>>,
    /// Last-use tick -> key; the first entry is the least recently used.
    order: BTreeMap<u64, K>,
    next_tick: u64,
    bytes: u64,
}

impl<K: Eq + Hash + Clone, V: Clone> ByteLru<K, V> {
    /// An empty map holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            map: HashMap::new(),
            order: BTreeMap::new(),
            next_tick: 0,
            bytes: 0,
        }
    }

    /// The value under `key`, marked most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let tick = self.next_tick;
        let entry = self.map.get_mut(key)?;
        self.order.remove(&entry.tick);
        entry.tick = tick;
        self.order.insert(tick, key.clone());
        self.next_tick += 1;
        Some(entry.value.clone())
    }

    /// Stores `value` (`bytes` in size) under `key`, replacing what was there and evicting
    /// least-recently-used entries to make room; returns how many it evicted. An entry larger
    /// than the capacity is not stored (what `key` held before is dropped all the same).
    pub fn insert(&mut self, key: K, value: V, bytes: u64) -> u64 {
        self.remove(&key);
        if bytes > self.capacity {
            return 0;
        }
        let mut evicted = 0;
        while self.bytes + bytes > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(old) = self.map.remove(&oldest) {
                self.bytes -= old.bytes;
            }
            evicted += 1;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.order.insert(tick, key.clone());
        self.map.insert(key, Entry { value, bytes, tick });
        self.bytes += bytes;
        evicted
    }

    /// Drops the entry under `key`; whether there was one.
    pub fn remove(&mut self, key: &K) -> bool {
        match self.map.remove(key) {
            Some(old) => {
                self.order.remove(&old.tick);
                self.bytes -= old.bytes;
                true
            }
            None => false,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The capacity, bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_to_stay_within_bytes() {
        let mut lru = ByteLru::new(300);
        for k in ["a", "b", "c"] {
            assert_eq!(lru.insert(k, 1, 100), 0);
        }
        assert_eq!(lru.get(&"a"), Some(1), "a becomes most recent");
        assert_eq!(lru.insert("d", 2, 100), 1);
        assert_eq!(lru.get(&"b"), None, "b was least recent");
        for k in ["a", "c", "d"] {
            assert!(lru.get(&k).is_some(), "{k}");
        }
        assert_eq!((lru.len(), lru.bytes()), (3, 300));
    }

    #[test]
    fn oversized_entries_and_zero_capacity_store_nothing() {
        let mut lru = ByteLru::new(50);
        lru.insert("a", 1, 10);
        lru.insert("a", 2, 60);
        assert!(
            lru.is_empty(),
            "the oversized value replaced nothing and stayed out"
        );
        let mut off = ByteLru::new(0);
        off.insert("a", 1, 1);
        assert_eq!(off.get(&"a"), None);
    }

    #[test]
    fn replacing_and_removing_keep_the_byte_count_exact() {
        let mut lru = ByteLru::new(1000);
        lru.insert("a", 1, 100);
        lru.insert("a", 2, 200);
        assert_eq!((lru.len(), lru.bytes(), lru.get(&"a")), (1, 200, Some(2)));
        assert!(lru.remove(&"a"));
        assert!(!lru.remove(&"a"));
        assert_eq!((lru.len(), lru.bytes()), (0, 0));
    }
}
