//! What a request reserves from the memory budget: its activation peak, estimated from the
//! token count, the batch and the model configuration.
//!
//! One forward at a time runs on the engine (CFG runs its two passes one after the other), so
//! the peak is that of one forward over `S = 512 + N_img + N_conditions` tokens:
//! - `B·S·D` elements in the model dtype, about 22 times over: the residual stream, norms,
//!   modulated inputs, q/k/v and their RoPE'd copies, the single block's fused projection
//!   (`9·D` wide), the SwiGLU product (`3·D`) and the `4·D` concat before `to_out`;
//! - `B·S·D` f32 elements about 4 times over: attention's f32 temporaries;
//! - twice the f32 score block (scores and probabilities), capped by the attention chunk size;
//! - a fixed 64 MiB for the run's own tensors (latents, noise, conditions, RoPE tables).
//!
//! The multiples are calibrated against the CUDA memory pool's measured peak on an H100
//! (`klein-bench components`, docs/performance.md): the estimate is 10–21 % above the measured
//! peak from 512² batch 1 to 1024² batch 4.

use candle_core::DType;

use crate::model::{AttentionConfig, Config};

/// Fixed per-request allowance, bytes.
pub const FIXED_BYTES: u64 = 64 << 20;

/// Estimated activation peak, bytes, of one forward of `batch` items over `tokens` tokens.
pub fn activation_bytes(
    cfg: &Config,
    dtype: DType,
    batch: usize,
    tokens: usize,
    attention: &AttentionConfig,
) -> u64 {
    let (b, s, d) = (batch as u64, tokens as u64, cfg.hidden_size() as u64);
    let e = dtype.size_in_bytes() as u64;
    let elements = b * s * d;
    let full_scores = b * cfg.num_attention_heads as u64 * s * s * 4;
    let rows = attention.query_chunk(batch * cfg.num_attention_heads, tokens) as u64;
    let chunk_scores = b * cfg.num_attention_heads as u64 * rows.min(s) * s * 4;
    elements * (22 * e + 4 * 4) + 2 * chunk_scores.min(full_scores) + FIXED_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_tokens_and_batch_and_caps_scores() {
        let cfg = Config::klein_4b();
        let attn = AttentionConfig::default();
        let one = activation_bytes(&cfg, DType::BF16, 1, 512 + 4096, &attn);
        let two = activation_bytes(&cfg, DType::BF16, 2, 512 + 4096, &attn);
        let refs = activation_bytes(&cfg, DType::BF16, 1, 512 + 8192, &attn);
        assert!(two > one && refs > one);
        // 1024² with klein-4B in bf16: about 1.4 GiB with the default 256 MiB score chunks.
        assert!((1_000 << 20..2_000 << 20).contains(&one), "{one}");
        let big_chunks = AttentionConfig {
            max_score_bytes: 4 << 30,
        };
        assert!(activation_bytes(&cfg, DType::BF16, 1, 4608, &big_chunks) > one + (2 << 30));
    }

    #[test]
    fn estimates_cover_the_peaks_measured_on_an_h100_within_25_percent() {
        // (batch, tokens, measured GiB): `klein-bench --device cuda:0 components`, bf16,
        // random klein-4B weights, H100 80GB HBM3, 2026-11-26 (docs/performance.md).
        let measured = [
            (1, 512 + 1024, 0.63),
            (2, 512 + 1024, 0.93),
            (4, 512 + 1024, 1.36),
            (1, 512 + 4096, 1.13),
            (2, 512 + 4096, 1.77),
            (4, 512 + 4096, 3.38),
        ];
        let cfg = Config::klein_4b();
        for (batch, tokens, gib) in measured {
            let est = activation_bytes(&cfg, DType::BF16, batch, tokens, &cfg.attention) as f64
                / (1u64 << 30) as f64;
            assert!(
                (gib..=gib * 1.25).contains(&est),
                "batch {batch}, {tokens} tokens: estimate {est:.2} GiB vs measured {gib} GiB"
            );
        }
    }
}
