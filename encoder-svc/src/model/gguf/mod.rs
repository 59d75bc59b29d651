//! Pre-quantized Qwen3 weights in a GGUF file (llama.cpp's `convert_hf_to_gguf.py` layout).
//!
//! llama.cpp renames the transformers keys ([`tensor_name`]) but keeps their layout: Qwen3 uses
//! the NEOX (rotate-half) RoPE, so unlike LLaMA its `attn_q` / `attn_k` rows are not permuted.
//! The architecture numbers come from the `qwen3.*` metadata ([`GgufFile::config`]); GGUF
//! stores no vocabulary size, so it is read from `token_embd.weight`.

use std::path::Path;

use candle_core::{
    Device, Result,
    quantized::{QTensor, gguf_file::Value},
};

use super::qwen3::Config;

mod write;

pub use write::{Written, write_gguf};

/// `general.architecture` of a Qwen3 GGUF file.
pub const ARCHITECTURE: &str = "qwen3";

/// Metadata keys (after the `qwen3.` prefix) that describe the architecture.
pub mod keys {
    /// Decoder layers.
    pub const BLOCK_COUNT: &str = "qwen3.block_count";
    /// Hidden size.
    pub const EMBEDDING_LENGTH: &str = "qwen3.embedding_length";
    /// MLP intermediate size.
    pub const FEED_FORWARD_LENGTH: &str = "qwen3.feed_forward_length";
    /// Query heads.
    pub const HEAD_COUNT: &str = "qwen3.attention.head_count";
    /// Key/value heads.
    pub const HEAD_COUNT_KV: &str = "qwen3.attention.head_count_kv";
    /// Head dimension.
    pub const KEY_LENGTH: &str = "qwen3.attention.key_length";
    /// RMSNorm epsilon.
    pub const RMS_EPS: &str = "qwen3.attention.layer_norm_rms_epsilon";
    /// RoPE theta.
    pub const ROPE_FREQ_BASE: &str = "qwen3.rope.freq_base";
}

/// The GGUF name of a transformers `Qwen3ForCausalLM` key, e.g.
/// `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`.
pub fn tensor_name(key: &str) -> Option<String> {
    if key == "model.embed_tokens.weight" {
        return Some("token_embd.weight".into());
    }
    if key == "model.norm.weight" {
        return Some("output_norm.weight".into());
    }
    let rest = key.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let name = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{suffix}"))
}

/// An open Qwen3 GGUF file.
pub struct GgufFile(klein_runtime::weights::gguf::GgufFile);

impl GgufFile {
    /// Reads the header and tensor index of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self(klein_runtime::weights::gguf::GgufFile::open(path)?))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        Ok(self.0.require(key)?.to_u64()? as usize)
    }

    /// A float as the decimal the writer meant (f32 `1e-6` -> f64 `1e-6`, not 9.99999997e-7).
    fn f64(&self, key: &str) -> Result<f64> {
        match self.0.require(key)? {
            Value::F64(v) => Ok(*v),
            Value::F32(v) => v
                .to_string()
                .parse()
                .map_err(|_| candle_core::Error::msg(format!("GGUF metadata {key}: {v}"))),
            v => candle_core::bail!("GGUF metadata {key} is not a float: {v:?}"),
        }
    }

    /// The architecture described by the `qwen3.*` metadata.
    pub fn config(&self) -> Result<Config> {
        let arch = self.0.require("general.architecture")?.to_string()?;
        if arch != ARCHITECTURE {
            candle_core::bail!("GGUF architecture is {arch:?}, expected {ARCHITECTURE:?}")
        }
        let embed = self
            .0
            .tensor_info("token_embd.weight")
            .ok_or_else(|| candle_core::Error::msg("GGUF has no token_embd.weight"))?;
        let hidden_size = self.usize(keys::EMBEDDING_LENGTH)?;
        let num_attention_heads = self.usize(keys::HEAD_COUNT)?;
        let head_dim = match self.0.metadata(keys::KEY_LENGTH) {
            Some(v) => v.to_u64()? as usize,
            None => hidden_size / num_attention_heads,
        };
        Ok(Config {
            vocab_size: embed.shape.dims2()?.0,
            hidden_size,
            intermediate_size: self.usize(keys::FEED_FORWARD_LENGTH)?,
            num_hidden_layers: self.usize(keys::BLOCK_COUNT)?,
            num_attention_heads,
            num_key_value_heads: self.usize(keys::HEAD_COUNT_KV)?,
            head_dim: Some(head_dim),
            rms_norm_eps: self.f64(keys::RMS_EPS)?,
            rope_theta: Some(self.f64(keys::ROPE_FREQ_BASE)?),
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            use_sliding_window: false,
            hidden_act: "silu".into(),
        })
    }

    /// The tensor stored for transformers key `key`, on `device`.
    pub fn tensor(&self, key: &str, device: &Device) -> Result<QTensor> {
        let name = tensor_name(key)
            .ok_or_else(|| candle_core::Error::msg(format!("{key} has no GGUF name")))?;
        self.0.tensor(&name, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_transformers_keys_to_llama_cpp_names() {
        let cases = [
            ("model.embed_tokens.weight", Some("token_embd.weight")),
            (
                "model.layers.0.input_layernorm.weight",
                Some("blk.0.attn_norm.weight"),
            ),
            (
                "model.layers.26.post_attention_layernorm.weight",
                Some("blk.26.ffn_norm.weight"),
            ),
            (
                "model.layers.3.self_attn.q_proj.weight",
                Some("blk.3.attn_q.weight"),
            ),
            (
                "model.layers.3.self_attn.k_proj.weight",
                Some("blk.3.attn_k.weight"),
            ),
            (
                "model.layers.3.self_attn.v_proj.weight",
                Some("blk.3.attn_v.weight"),
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                Some("blk.3.attn_output.weight"),
            ),
            (
                "model.layers.3.self_attn.q_norm.weight",
                Some("blk.3.attn_q_norm.weight"),
            ),
            (
                "model.layers.3.self_attn.k_norm.weight",
                Some("blk.3.attn_k_norm.weight"),
            ),
            (
                "model.layers.12.mlp.gate_proj.weight",
                Some("blk.12.ffn_gate.weight"),
            ),
            (
                "model.layers.12.mlp.up_proj.weight",
                Some("blk.12.ffn_up.weight"),
            ),
            (
                "model.layers.12.mlp.down_proj.weight",
                Some("blk.12.ffn_down.weight"),
            ),
            ("model.norm.weight", Some("output_norm.weight")),
            ("lm_head.weight", None),
            ("model.layers.x.mlp.up_proj.weight", None),
            ("model.layers.1.mlp.act.weight", None),
        ];
        for (key, want) in cases {
            assert_eq!(tensor_name(key).as_deref(), want, "{key}");
        }
    }
}
