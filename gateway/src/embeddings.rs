//! The denoisers' embeddings handles a repeated prompt reuses.
//!
//! A denoiser keeps the embeddings of each request under a handle it returns with the result
//! (`DenoiseResult.embeddings_handle`). The gateway remembers the handle per prompt (with the
//! model, the text encoder, the negative prompt when CFG applies, and the image count, which
//! sets the embeddings' batch) and sends the next request with the same prompt the handle
//! instead of the embeddings: no encoder call, and no 7.9 MB per image through two hops. When
//! the denoiser no longer holds them (FAILED_PRECONDITION "embeddings handle unknown":
//! evicted, restarted, another replica), the gateway forgets the handle, encodes and sends the
//! embeddings.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use klein_runtime::lru::ByteLru;
use tonic::Code;

use crate::{error::GatewayError, validate::ValidGenerate};

/// Bytes of handle entries kept (keys and handles): some ten thousand typical prompts.
const CAPACITY_BYTES: u64 = 4 << 20;

/// What a handle is remembered under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HandleKey {
    model: String,
    text_encoder: String,
    prompt: String,
    negative_prompt: Option<String>,
    num_images: u32,
}

impl HandleKey {
    /// The key of `req`'s embeddings.
    pub fn of(req: &ValidGenerate) -> Self {
        Self {
            model: req.model.id.clone(),
            text_encoder: req.model.text_encoder.clone(),
            prompt: req.prompt.clone(),
            negative_prompt: req.cfg.map(|_| req.negative_prompt.clone()),
            num_images: req.num_images,
        }
    }

    fn bytes(&self, handle: &Bytes) -> u64 {
        let negative = self.negative_prompt.as_ref().map_or(0, String::len);
        (self.model.len() + self.text_encoder.len() + self.prompt.len() + negative + handle.len())
            as u64
    }
}

/// The remembered handles; shared by all requests.
pub struct EmbeddingHandles {
    lru: Mutex<ByteLru<HandleKey, Bytes>>,
}

impl Default for EmbeddingHandles {
    fn default() -> Self {
        Self {
            lru: Mutex::new(ByteLru::new(CAPACITY_BYTES)),
        }
    }
}

impl EmbeddingHandles {
    fn lock(&self) -> MutexGuard<'_, ByteLru<HandleKey, Bytes>> {
        // The map is consistent between its calls; a panic inside one cannot leave it torn.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle remembered for `key`.
    pub fn get(&self, key: &HandleKey) -> Option<Bytes> {
        self.lock().get(key)
    }

    /// Remembers `handle` for `key` (an empty handle: the denoiser kept nothing).
    pub fn remember(&self, key: HandleKey, handle: Bytes) {
        let mut lru = self.lock();
        if handle.is_empty() {
            lru.remove(&key);
        } else {
            let bytes = key.bytes(&handle);
            lru.insert(key, handle, bytes);
        }
    }

    /// Forgets the handle for `key`.
    pub fn forget(&self, key: &HandleKey) {
        self.lock().remove(key);
    }
}

/// Whether `err` is the denoiser's answer to a handle it does not hold.
pub fn is_unknown_handle(err: &GatewayError) -> bool {
    matches!(err, GatewayError::Downstream { status, .. }
        if status.code() == Code::FailedPrecondition
            && status.message().starts_with("embeddings handle unknown"))
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;
    use crate::error::Stage;

    fn key(prompt: &str, negative: Option<&str>, num_images: u32) -> HandleKey {
        HandleKey {
            model: "klein-4b".into(),
            text_encoder: "qwen3-4b".into(),
            prompt: prompt.into(),
            negative_prompt: negative.map(Into::into),
            num_images,
        }
    }

    #[test]
    fn handles_are_remembered_per_prompt_negative_and_image_count() {
        let handles = EmbeddingHandles::default();
        let h = Bytes::from_static(&[7; 16]);
        handles.remember(key("a cat", None, 1), h.clone());
        assert_eq!(handles.get(&key("a cat", None, 1)), Some(h));
        assert_eq!(handles.get(&key("a cat", None, 2)), None);
        assert_eq!(handles.get(&key("a cat", Some(""), 1)), None);
        assert_eq!(handles.get(&key("a dog", None, 1)), None);
        handles.forget(&key("a cat", None, 1));
        assert_eq!(handles.get(&key("a cat", None, 1)), None);
        handles.remember(key("a cat", None, 1), Bytes::new());
        assert_eq!(
            handles.get(&key("a cat", None, 1)),
            None,
            "nothing kept, nothing remembered"
        );
    }

    #[test]
    fn only_the_denoisers_unknown_handle_answer_counts() {
        let err = |code, msg: &str| GatewayError::Downstream {
            stage: Stage::Denoiser,
            status: Status::new(code, msg),
        };
        assert!(is_unknown_handle(&err(
            Code::FailedPrecondition,
            "embeddings handle unknown: 00; send prompt_embeds"
        )));
        assert!(!is_unknown_handle(&err(Code::FailedPrecondition, "other")));
        assert!(!is_unknown_handle(&err(
            Code::InvalidArgument,
            "embeddings handle unknown"
        )));
    }
}
