//! Validated prompt embeddings, and the cache that keeps them under handles.
//!
//! Every request sends 512 tokens of embeddings per image (7.9 MB for klein-4B in bf16), which
//! cross the gateway and are checked again even when the prompt repeats. The service keeps the
//! embeddings it validated under a random 16-byte handle, returned in
//! `DenoiseResult.embeddings_handle`; a later request sends the handle instead
//! (`DenoiseRequest.embeddings_handle`) and skips the transfer and the checks. The handles are
//! random, not derived from the content, so no caller can name embeddings it was not given. A
//! bytes-bounded LRU in host memory, like the encoder's prompt cache; an unknown handle (evicted,
//! restarted, another replica) is FAILED_PRECONDITION, and the caller sends the embeddings.

use std::sync::{Mutex, MutexGuard};

use candle_core::Tensor;
use klein_runtime::lru::ByteLru;

use crate::error::DenoiseError;

/// A request's validated embeddings: `[B, 512, C_ctx]` and the negatives of the same shape.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub prompt: Tensor,
    pub negative: Option<Tensor>,
}

impl Embeddings {
    /// Host bytes held.
    pub fn bytes(&self) -> u64 {
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        size(&self.prompt) + self.negative.as_ref().map_or(0, size)
    }
}

/// A handle's bytes.
pub type Handle = [u8; 16];

/// The embeddings cache; shared by all requests.
pub struct EmbeddingsCache {
    lru: Mutex<ByteLru<Handle, Embeddings>>,
}

impl EmbeddingsCache {
    /// A cache holding at most `capacity` bytes of embeddings (0: none).
    pub fn new(capacity: u64) -> Self {
        Self {
            lru: Mutex::new(ByteLru::new(capacity)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ByteLru<Handle, Embeddings>> {
        // The map is consistent between its calls; a panic inside one cannot leave it torn.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The embeddings under `handle`, or FAILED_PRECONDITION.
    pub fn get(&self, handle: &[u8]) -> Result<Embeddings, DenoiseError> {
        let found = Handle::try_from(handle)
            .ok()
            .and_then(|h| self.lock().get(&h));
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("klein_denoiser_embeddings_cache_total", "outcome" => outcome)
            .increment(1);
        found.ok_or_else(|| {
            let shown: String = handle.iter().map(|b| format!("{b:02x}")).collect();
            DenoiseError::EmbeddingsUnknown(format!("{shown} is not held by this replica"))
        })
    }

    /// Keeps `embeddings` under a fresh handle; `None` when they do not fit (or the cache is
    /// off, or the system has no randomness to draw a handle from).
    pub fn keep(&self, embeddings: &Embeddings) -> Option<Handle> {
        let bytes = embeddings.bytes();
        let mut lru = self.lock();
        if bytes > lru.capacity() {
            return None;
        }
        let mut handle = Handle::default();
        getrandom::fill(&mut handle).ok()?;
        lru.insert(handle, embeddings.clone(), bytes);
        metrics::gauge!("klein_denoiser_embeddings_cache_bytes").set(lru.bytes() as f64);
        Some(handle)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn embeddings(tokens: usize) -> Embeddings {
        Embeddings {
            prompt: Tensor::zeros((1, tokens, 8), DType::BF16, &Device::Cpu).unwrap(),
            negative: None,
        }
    }

    #[test]
    fn kept_embeddings_come_back_under_their_handle_until_evicted() {
        // Each entry: 1 x 10 x 8 bf16 = 160 bytes; room for two.
        let cache = EmbeddingsCache::new(320);
        let a = cache.keep(&embeddings(10)).unwrap();
        let b = cache.keep(&embeddings(10)).unwrap();
        assert_ne!(a, b, "handles are drawn at random");
        assert_eq!(cache.get(&a).unwrap().prompt.dims(), &[1, 10, 8]);
        cache.keep(&embeddings(10)).unwrap();
        let err = cache.get(&b).unwrap_err();
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition,
            "b was the least recently used"
        );
        assert!(cache.get(&a).is_ok());
    }

    #[test]
    fn malformed_handles_and_a_disabled_cache_hold_nothing() {
        let cache = EmbeddingsCache::new(1 << 20);
        let err = cache.get(b"short").unwrap_err().to_string();
        assert!(
            err.starts_with("embeddings handle unknown: 73686f7274"),
            "{err}"
        );
        assert!(EmbeddingsCache::new(0).keep(&embeddings(10)).is_none());
        assert!(
            cache.keep(&embeddings(1 << 17)).is_none(),
            "larger than the cache"
        );
    }
}
