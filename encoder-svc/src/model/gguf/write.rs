//! A text encoder written as a Qwen3 GGUF file in the layout [`super`] reads (llama.cpp's), its
//! projections and embedding quantized by a [`QuantPlan`] exactly as loading with that plan
//! quantizes them: a checkpoint is quantized once (`klein quantize --text-encoder-out`) and
//! then loads without quantizing at every start.

use std::path::Path;

use candle_core::{
    Device,
    quantized::{QTensor, gguf_file::Value},
};
use klein_kernels::quant::to_stored;
use klein_runtime::weights::{
    component_dir, gguf, mmap_safetensors, read_config, safetensors_files,
};

use super::{ARCHITECTURE, keys, tensor_name};
use crate::{
    error::EncoderError,
    model::{qwen3::Config, weights::QuantPlan},
};

/// The transformers key of the token-embedding table.
const EMBEDDING: &str = "model.embed_tokens.weight";

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Tensors in the file.
    pub tensors: usize,
    /// Of them, tensors in ggml blocks (projections and the embedding table).
    pub quantized: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// Writes the Qwen3 text encoder of `model_dir` (a pipeline folder or its `text_encoder/`) to
/// `out`: each tensor with a llama.cpp name ([`tensor_name`]; `lm_head` has none and is left
/// out), the projections in `plan.linear`'s blocks (or its block-32 fallback), the embedding
/// table in `plan.embedding`'s, 1-D tensors in F32, anything else in its stored dtype; the
/// architecture as `qwen3.*` metadata from `config.json` (a folder whose `config.json` is not
/// a Qwen3 one is a configuration error). The file is for this crate's reader:
/// llama.cpp itself would also need the tokenizer's metadata, which is not written. The blocks
/// are quantized on `quantize_on` (the host or a GPU: the same bytes).
pub fn write_gguf(
    model_dir: &Path,
    plan: QuantPlan,
    out: &Path,
    quantize_on: &Device,
) -> Result<Written, EncoderError> {
    let dir = component_dir(model_dir, "text_encoder")?;
    let cfg: Config = read_config(&dir.join("config.json")).map_err(|e| {
        EncoderError::Config(format!(
            "{} holds no Qwen3 text encoder ({e}): point at the pipeline folder or its \
             text_encoder/",
            dir.display()
        ))
    })?;
    let mapped = mmap_safetensors(&safetensors_files(&dir)?)?;
    let mut stored = Vec::new();
    let mut quantized = 0;
    for (key, _) in mapped.tensors() {
        let Some(name) = tensor_name(&key) else {
            continue;
        };
        let t = mapped.load(&key, &Device::Cpu)?;
        let format = match *t.dims() {
            [_, width] if key == EMBEDDING => plan.embedding.and_then(|f| f.for_width(width)),
            [_, width] => plan.linear.for_width(width),
            _ => None,
        };
        quantized += usize::from(format.is_some());
        let q = to_stored(&t, format, quantize_on)?;
        stored.push((name, q));
    }
    stored.sort_by(|a, b| a.0.cmp(&b.0));
    let count = |v: usize| Value::U32(v as u32);
    let metadata = [
        ("general.architecture", Value::String(ARCHITECTURE.into())),
        ("general.quantization_version", Value::U32(2)),
        (keys::BLOCK_COUNT, count(cfg.num_hidden_layers)),
        (keys::EMBEDDING_LENGTH, count(cfg.hidden_size)),
        (keys::FEED_FORWARD_LENGTH, count(cfg.intermediate_size)),
        (keys::HEAD_COUNT, count(cfg.num_attention_heads)),
        (keys::HEAD_COUNT_KV, count(cfg.num_key_value_heads)),
        (keys::KEY_LENGTH, count(cfg.head_dim())),
        (keys::RMS_EPS, Value::F32(cfg.rms_norm_eps as f32)),
        (keys::ROPE_FREQ_BASE, Value::F32(cfg.rope_theta() as f32)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf::write(out, &metadata, &tensors)?;
    Ok(Written {
        tensors: stored.len(),
        quantized,
        bytes: stored
            .iter()
            .map(|(_, q)| q.storage_size_in_bytes() as u64)
            .sum(),
    })
}
