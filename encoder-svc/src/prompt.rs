//! Prompt -> token ids, exactly as diffusers' `Flux2KleinPipeline` does it (spec §1.3, pitfall
//! 25): the Qwen3 chat template (one user turn, generation prompt, thinking disabled) built
//! by hand, tokenized with `tokenizer/tokenizer.json` without added special tokens (the
//! template's `<|im_start|>` etc. are matched as added tokens), right-truncated to
//! [`SEQ_LEN`] and right-padded with `<|endoftext|>`.

use std::path::Path;

use tokenizers::Tokenizer;

/// Tokens per prompt the transformer reads (`max_sequence_length`).
pub const SEQ_LEN: usize = 512;

/// The padding token, looked up by its text (its id differs between vocabularies).
pub const PAD_TOKEN: &str = "<|endoftext|>";

/// Tokens the chat template relies on; each must be an added token of the tokenizer.
const TEMPLATE_TOKENS: [&str; 4] = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"];

/// A tokenizer file that cannot serve the klein prompt format.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
    #[error("{path}: {token:?} is not an added token of this tokenizer")]
    MissingToken { path: String, token: String },
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// The Qwen3 chat-template text of one user prompt (`apply_chat_template(
/// [{"role": "user", "content": prompt}], add_generation_prompt=True, enable_thinking=False)`).
pub fn chat_template(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

/// Token ids of one templated prompt, before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptIds {
    /// At most [`SEQ_LEN`] ids.
    pub ids: Vec<u32>,
    /// True when the templated prompt was longer than [`SEQ_LEN`] and lost its tail.
    pub truncated: bool,
}

/// The klein prompt tokenizer.
#[derive(Debug)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
}

impl PromptTokenizer {
    /// Loads `tokenizer.json`, checks the template and padding tokens, and switches off any
    /// truncation or padding the file configures (this type does both itself).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let name = path.display().to_string();
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: name.clone(),
            reason: e.to_string(),
        })?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| TokenizerError::Load {
                path: name.clone(),
                reason: e.to_string(),
            })?
            .with_padding(None);
        let added = tokenizer.get_added_tokens_decoder();
        let added_id = |token: &str| {
            added
                .iter()
                .find(|(_, t)| t.content == token)
                .map(|(id, _)| *id)
                .ok_or_else(|| TokenizerError::MissingToken {
                    path: name.clone(),
                    token: token.to_owned(),
                })
        };
        for token in TEMPLATE_TOKENS {
            added_id(token)?;
        }
        let pad_id = added_id(PAD_TOKEN)?;
        Ok(Self { tokenizer, pad_id })
    }

    /// Id of [`PAD_TOKEN`].
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Ids of the templated `prompt`, right-truncated to [`SEQ_LEN`].
    pub fn encode(&self, prompt: &str) -> Result<PromptIds, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode(chat_template(prompt), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        let truncated = ids.len() > SEQ_LEN;
        ids.truncate(SEQ_LEN);
        Ok(PromptIds { ids, truncated })
    }
}

/// Right-pads `ids` with `pad_id` to [`SEQ_LEN`]: (input_ids, attention_mask with 1 = token).
pub fn pad(ids: &[u32], pad_id: u32) -> (Vec<u32>, Vec<u32>) {
    let n = ids.len().min(SEQ_LEN);
    let mut padded = ids[..n].to_vec();
    padded.resize(SEQ_LEN, pad_id);
    let mut mask = vec![1u32; n];
    mask.resize(SEQ_LEN, 0);
    (padded, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_matches_the_spec_string() {
        assert_eq!(
            chat_template("a cat"),
            "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
    }

    #[test]
    fn pads_on_the_right_and_masks_padding() {
        let (ids, mask) = pad(&[7, 8, 9], 0);
        assert_eq!(ids.len(), SEQ_LEN);
        assert_eq!(&ids[..4], &[7, 8, 9, 0]);
        assert_eq!(mask.iter().sum::<u32>(), 3);
        assert_eq!(&mask[..4], &[1, 1, 1, 0]);
        let long: Vec<u32> = (0..600).collect();
        let (ids, mask) = pad(&long, 0);
        assert_eq!(ids, (0..512).collect::<Vec<u32>>());
        assert!(mask.iter().all(|&m| m == 1));
    }
}
