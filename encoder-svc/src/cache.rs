//! A bytes-bounded LRU cache of prompt embeddings.
//!
//! Keys are (model id, variant, prompt): the variant names the dtype and weight format
//! (`bf16/q4k`), so embeddings from different weights never mix. Values are the wire bytes of
//! one prompt's embedding plus its token facts, so a hit costs a hash lookup and a copy: no
//! tokenization and no model work. An entry's size is its embedding bytes plus its prompt
//! bytes; inserting evicts least-recently-used entries until the total fits the capacity, and
//! an entry larger than the whole capacity is not stored. Capacity 0 disables the cache.

use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use klein_runtime::lru::ByteLru;

/// What a cached embedding is looked up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Model id.
    pub model: Arc<str>,
    /// Dtype and weight format, e.g. `bf16/q4k`.
    pub variant: Arc<str>,
    /// The prompt text, as sent.
    pub prompt: String,
}

/// One prompt's embedding and token facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedEmbedding {
    /// Raw little-endian elements of the (512, 3·hidden) embedding.
    pub data: Bytes,
    /// Tokens before padding.
    pub token_count: u32,
    /// Whether the templated prompt was cut at 512 tokens.
    pub truncated: bool,
}

/// Counters and sizes, for Info and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub capacity: u64,
    pub bytes: u64,
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// The prompt-embedding cache; shared by all requests.
pub struct PromptCache {
    lru: Mutex<ByteLru<CacheKey, CachedEmbedding>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl PromptCache {
    /// A cache holding at most `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        metrics::gauge!("klein_encoder_cache_capacity_bytes").set(capacity as f64);
        Self {
            lru: Mutex::new(ByteLru::new(capacity)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ByteLru<CacheKey, CachedEmbedding>> {
        // Every update below leaves the maps consistent before it can panic.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `key`, marked most recently used; counts a hit or a miss.
    pub fn get(&self, key: &CacheKey) -> Option<CachedEmbedding> {
        let found = self.lock().get(key);
        let (counter, metric) = match found {
            Some(_) => (&self.hits, "klein_encoder_cache_hits_total"),
            None => (&self.misses, "klein_encoder_cache_misses_total"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric).increment(1);
        found
    }

    /// Stores `value` under `key`, evicting least-recently-used entries to make room.
    pub fn insert(&self, key: CacheKey, value: CachedEmbedding) {
        let bytes = (value.data.len() + key.prompt.len()) as u64;
        let mut lru = self.lock();
        let evicted = lru.insert(key, value, bytes);
        metrics::gauge!("klein_encoder_cache_bytes").set(lru.bytes() as f64);
        metrics::gauge!("klein_encoder_cache_entries").set(lru.len() as f64);
        drop(lru);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
            metrics::counter!("klein_encoder_cache_evictions_total").increment(evicted);
        }
    }

    /// Current counters and sizes.
    pub fn stats(&self) -> CacheStats {
        let lru = self.lock();
        CacheStats {
            capacity: lru.capacity(),
            bytes: lru.bytes(),
            entries: lru.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prompt: &str) -> CacheKey {
        CacheKey {
            model: "m".into(),
            variant: "f32/none".into(),
            prompt: prompt.into(),
        }
    }

    fn value(bytes: usize) -> CachedEmbedding {
        CachedEmbedding {
            data: Bytes::from(vec![7u8; bytes]),
            token_count: 12,
            truncated: false,
        }
    }

    #[test]
    fn evicts_the_least_recently_used_to_stay_within_bytes() {
        // Entry size = 99 data bytes + 1 prompt byte = 100.
        let cache = PromptCache::new(300);
        for p in ["a", "b", "c"] {
            cache.insert(key(p), value(99));
        }
        assert!(cache.get(&key("a")).is_some(), "a becomes most recent");
        cache.insert(key("d"), value(99));
        assert!(cache.get(&key("b")).is_none(), "b was least recent");
        for p in ["a", "c", "d"] {
            assert!(cache.get(&key(p)).is_some(), "{p}");
        }
        let s = cache.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (3, 300, 1));
        assert_eq!((s.hits, s.misses), (4, 1));
    }

    #[test]
    fn keys_differ_by_model_variant_and_prompt() {
        let cache = PromptCache::new(1 << 20);
        cache.insert(key("a"), value(10));
        let other_variant = CacheKey {
            variant: "bf16/q4k".into(),
            ..key("a")
        };
        let other_model = CacheKey {
            model: "n".into(),
            ..key("a")
        };
        assert!(cache.get(&other_variant).is_none());
        assert!(cache.get(&other_model).is_none());
        assert!(cache.get(&key("a ")).is_none());
        assert_eq!(cache.get(&key("a")), Some(value(10)));
    }

    #[test]
    fn oversized_entries_and_zero_capacity_store_nothing() {
        let cache = PromptCache::new(50);
        cache.insert(key("a"), value(60));
        assert_eq!(cache.stats().entries, 0);
        let off = PromptCache::new(0);
        off.insert(key("a"), value(1));
        assert!(off.get(&key("a")).is_none());
    }

    #[test]
    fn replacing_a_key_keeps_the_byte_count_exact() {
        let cache = PromptCache::new(1000);
        cache.insert(key("a"), value(99));
        cache.insert(key("a"), value(199));
        let s = cache.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (1, 200, 0));
    }
}
