//! Shared helpers for encoder-svc's integration tests: the tiny fixture pipeline and its
//! test prompts.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use encoder_svc::prompt::PromptTokenizer;
use klein_test_support::{manifest, pipeline_dir};

/// The distilled tiny pipeline (its text encoder and tokenizer are shared with the base one).
pub fn model_dir() -> PathBuf {
    pipeline_dir("tiny-klein-4b")
}

/// The golden prompts, in golden index order (`p{i}.*` keys): short, empty, unicode, over-long.
pub fn fixture_prompts() -> Vec<String> {
    manifest()["cases"]["text_embeddings"]["params"]["prompts"]
        .as_array()
        .expect("text_embeddings.params.prompts")
        .iter()
        .map(|p| p.as_str().expect("prompt is a string").to_owned())
        .collect()
}

/// The fixture's tokenizer.
pub fn tokenizer() -> PromptTokenizer {
    tokenizer_in(&model_dir())
}

/// The tokenizer of the pipeline folder `dir` (every fixture pipeline has the same one).
pub fn tokenizer_in(dir: &Path) -> PromptTokenizer {
    PromptTokenizer::from_file(&dir.join("tokenizer/tokenizer.json")).expect("tokenizer")
}
