//! Memory accounting: what one forward needs on the device, and what the budget leaves for
//! activations once the weights are loaded. Pure arithmetic; no device is queried.
//!
//! The activation estimate sums the tensors alive at the peak of a decoder layer, from the
//! shapes in `model/qwen3.rs`, per sequence of `len` tokens (s = dtype bytes, D hidden,
//! I intermediate, H / K query / key-value heads, hd head width):
//! - kept for the whole forward: the residual stream, three saved hidden states and their
//!   concatenation (7·len·D·s) and the attention bias with its construction temporaries
//!   (3·len²·4 + 2·len²);
//! - attention peak: f32 scores, scaled scores and biased scores (3·H·len²·4), the q/k/v
//!   projections, norms, RoPE outputs and f32 copies (len·(H+2K)·hd·(3s+8)), the normed input
//!   with its f32 temporary (len·D·(4+s));
//! - MLP peak: gate, up, product and the f32 SiLU temporaries (len·I·(4s+8)) plus the normed
//!   input;
//! - quantized matmul scratch: the activations widened to f32 and quantized to 8 bits
//!   (len·max(D, I)·6).
//!
//! The layer peak is the larger of attention and MLP.
//!
//! A quantized model on CUDA also holds one projection dense while it multiplies
//! ([`dequantize_scratch_bytes`]); that is a fixed cost (the engine runs one job at a time),
//! taken from the budget once at startup. On the host, candle keeps a repacked copy of each
//! quantized weight after its first use (about the size of the quantized weights), which this
//! accounting does not include.

use candle_core::DType;

use crate::{error::EncoderError, model::qwen3::Config};

/// Estimated peak activation bytes of one forward over `sequences` sequences of `len` tokens.
pub fn activation_bytes(cfg: &Config, dtype: DType, sequences: usize, len: usize) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let (t, d, i) = (
        len as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
    );
    let (h, k, hd) = (
        cfg.num_attention_heads as u64,
        cfg.num_key_value_heads as u64,
        cfg.head_dim() as u64,
    );
    let kept = 7 * t * d * s + 3 * t * t * 4 + 2 * t * t;
    let normed = t * d * (4 + s);
    let attention = 3 * h * t * t * 4 + t * (h + 2 * k) * hd * (3 * s + 8) + normed;
    let mlp = t * i * (4 * s + 8) + normed;
    let scratch = t * d.max(i) * 6;
    sequences as u64 * (kept + attention.max(mlp) + scratch)
}

/// The largest projection dequantized for one call: in f32, then in the compute dtype.
pub fn dequantize_scratch_bytes(cfg: &Config, dtype: DType) -> u64 {
    let d = cfg.hidden_size as u64;
    let widest =
        (cfg.intermediate_size as u64).max((cfg.num_attention_heads * cfg.head_dim()) as u64);
    d * widest * (4 + dtype.size_in_bytes() as u64)
}

/// Bytes left for activations: `budget - weights - overhead`, refusing a budget that cannot
/// hold the weights plus the runtime, or that leaves less than `min_activation` (one prompt).
pub fn activation_capacity(
    budget: u64,
    weights: u64,
    overhead: u64,
    min_activation: u64,
) -> Result<u64, EncoderError> {
    let too_small = || EncoderError::BudgetTooSmall {
        budget,
        weights,
        overhead: overhead + min_activation,
    };
    let left = budget
        .checked_sub(weights)
        .and_then(|b| b.checked_sub(overhead))
        .ok_or_else(too_small)?;
    if left < min_activation {
        return Err(too_small());
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_grows_linearly_with_sequences_and_fits_a_4b_batch_in_gigabytes() {
        let cfg = Config::qwen3_4b();
        let one = activation_bytes(&cfg, DType::BF16, 1, 512);
        assert_eq!(activation_bytes(&cfg, DType::BF16, 8, 512), 8 * one);
        assert!(activation_bytes(&cfg, DType::F32, 1, 512) > one);
        // Qwen3-4B, 512 tokens, bf16: ~0.2 GB per prompt (scores dominate: 32 heads x 512² x 4 B x 3).
        assert!((150e6..300e6).contains(&(one as f64)), "{one}");
        let big = activation_bytes(&Config::qwen3_8b(), DType::BF16, 1, 512);
        assert!(big > one);
        // gate_proj of Qwen3-4B: 9728 x 2560 in f32 + bf16.
        assert_eq!(dequantize_scratch_bytes(&cfg, DType::BF16), 9728 * 2560 * 6);
    }

    #[test]
    fn capacity_refuses_budgets_that_cannot_work() {
        let cases: &[(u64, u64, u64, u64, Option<u64>)] = &[
            (10_000, 6_000, 1_000, 500, Some(3_000)),
            (10_000, 6_000, 1_000, 3_000, Some(3_000)),
            (10_000, 6_000, 1_000, 3_001, None),
            (10_000, 9_500, 1_000, 1, None),
            (10_000, 11_000, 0, 1, None),
        ];
        for &(budget, weights, overhead, min, want) in cases {
            let got = activation_capacity(budget, weights, overhead, min).ok();
            assert_eq!(got, want, "{budget} {weights} {overhead} {min}");
        }
        let err = activation_capacity(100, 90, 20, 1).unwrap_err().to_string();
        assert!(err.contains("gpu_memory_budget 100"), "{err}");
    }
}
