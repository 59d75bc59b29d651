//! What a request reserves from the memory budget: its activation peak, estimated from the
//! token count, the batch and the model configuration.
//!
//! One forward at a time runs on the engine (CFG runs its two passes one after the other), so
//! the peak is that of one forward over `S = 512 + N_img + N_conditions` tokens. With the flash
//! attention kernel (CUDA, bf16) it is
//! - `B·S·D` elements in the model dtype, about 23 times over: the residual stream, modulated
//!   inputs, q/k/v, the single block's fused projection (`9·D` wide), the SwiGLU product
//!   (`3·D`) and the `4·D` concat before `to_out`;
//!
//! and where attention is the f32 composition (CPU, f32), instead
//! - `B·S·D` elements in the model dtype about 22 times over, and in f32 about 4 times over
//!   (attention's f32 copies of q, k, v and its output);
//! - twice the f32 score block (scores and probabilities), capped by the attention chunk size.
//!
//! Both add a fixed 64 MiB for the run's own tensors (latents, noise, conditions, RoPE tables)
//! and, with quantized projections, the widest projection's dense weight that one product
//! dequantizes (in the model dtype where a kernel writes bf16 directly,
//! `klein_kernels::fused_dequantize_formats`, else through an f32 copy as well).
//! The multiples are calibrated against the CUDA memory pool's measured peak on an H100
//! (`klein-bench components`, docs/performance.md).

use candle_core::DType;

use crate::model::{AttentionConfig, Config};

/// Fixed per-request allowance, bytes.
pub const FIXED_BYTES: u64 = 64 << 20;

/// Estimated activation peak, bytes, of one forward of `batch` items over `tokens` tokens;
/// `flash`: attention runs the flash kernel (`klein_kernels::flash_attention_applies`).
pub fn activation_bytes(
    cfg: &Config,
    dtype: DType,
    batch: usize,
    tokens: usize,
    attention: &AttentionConfig,
    flash: bool,
) -> u64 {
    let (b, s, d) = (batch as u64, tokens as u64, cfg.hidden_size() as u64);
    let e = dtype.size_in_bytes() as u64;
    let elements = b * s * d;
    let dequantized = cfg
        .quantized_projections()
        .into_iter()
        .map(|(n, format)| {
            let direct = flash && klein_kernels::fused_dequantize_formats().any(|f| f == format);
            n as u64 * if direct { e } else { 4 + e }
        })
        .max()
        .unwrap_or(0);
    if flash {
        return elements * 23 * e + FIXED_BYTES + dequantized;
    }
    let full_scores = b * cfg.num_attention_heads as u64 * s * s * 4;
    let rows = attention.query_chunk(batch * cfg.num_attention_heads, tokens) as u64;
    let chunk_scores = b * cfg.num_attention_heads as u64 * rows.min(s) * s * 4;
    elements * (22 * e + 4 * 4) + 2 * chunk_scores.min(full_scores) + FIXED_BYTES + dequantized
}

/// What a request's `adapters` LoRA adapters add to its peak: each adapted layer's product
/// reads its adapters' summed terms, a tensor of its output's size beside the output; with two
/// or more adapters the sum of the terms so far and the next term's product are both live
/// before it. The widest layer is the single block's `3·D + 2·F` projection.
pub fn lora_bytes(cfg: &Config, dtype: DType, batch: usize, tokens: usize, adapters: usize) -> u64 {
    let widest = (3 * cfg.hidden_size() + 2 * cfg.mlp_hidden()) as u64;
    let outputs = adapters.min(2) as u64;
    outputs * batch as u64 * tokens as u64 * widest * dtype.size_in_bytes() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_tokens_and_batch_and_caps_scores() {
        let cfg = Config::klein_4b();
        let attn = AttentionConfig::default();
        let one = activation_bytes(&cfg, DType::BF16, 1, 512 + 4096, &attn, false);
        let two = activation_bytes(&cfg, DType::BF16, 2, 512 + 4096, &attn, false);
        let refs = activation_bytes(&cfg, DType::BF16, 1, 512 + 8192, &attn, false);
        assert!(two > one && refs > one);
        // 1024² with klein-4B in bf16: about 1.4 GiB with the default 256 MiB score chunks.
        assert!((1_000 << 20..2_000 << 20).contains(&one), "{one}");
        let big_chunks = AttentionConfig {
            max_score_bytes: 4 << 30,
        };
        assert!(activation_bytes(&cfg, DType::BF16, 1, 4608, &big_chunks, false) > one + (2 << 30));
    }

    #[test]
    fn quantized_projections_add_their_widest_dequantized_weight() {
        use klein_kernels::quant::{QuantFormat, Quantize};

        let cfg = Config::klein_9b();
        let attn = AttentionConfig::default();
        let dense = activation_bytes(&cfg, DType::BF16, 1, 4608, &attn, true);
        let with = |format| Config {
            quantize: Quantize::Format(format),
            ..cfg.clone()
        };
        let widest = 36864 * 4096;
        let q4k = activation_bytes(&with(QuantFormat::Q4K), DType::BF16, 1, 4608, &attn, true);
        assert_eq!(q4k - dense, widest * 2);
        let q8 = activation_bytes(&with(QuantFormat::Q8_0), DType::BF16, 1, 4608, &attn, true);
        assert_eq!(q8 - dense, widest * 2);
        // Without the kernels (the f32 composition's path): through an f32 copy.
        let dense = activation_bytes(&cfg, DType::BF16, 1, 4608, &attn, false);
        let q8 = activation_bytes(&with(QuantFormat::Q8_0), DType::BF16, 1, 4608, &attn, false);
        assert_eq!(q8 - dense, widest * 6);
    }

    /// Every estimate covers its measured peak and stays within `over` of it.
    fn check_calibration(flash: bool, measured: &[(usize, usize, f64)], over: f64) {
        let cfg = Config::klein_4b();
        for &(batch, tokens, gib) in measured {
            let est = activation_bytes(&cfg, DType::BF16, batch, tokens, &cfg.attention, flash)
                as f64
                / (1u64 << 30) as f64;
            assert!(
                (gib..=gib * over).contains(&est),
                "flash {flash}, batch {batch}, {tokens} tokens: estimate {est:.2} GiB vs measured {gib} GiB"
            );
        }
    }

    #[test]
    fn estimates_cover_the_peaks_measured_on_an_h100() {
        // (batch, tokens, measured GiB): `klein-bench --device cuda:0 components`, bf16,
        // random klein-4B weights, H100 80GB HBM3, 2026-11-26 (docs/performance.md). The f32
        // composition's attention, within 25 %:
        let composed = [
            (1, 512 + 1024, 0.63),
            (2, 512 + 1024, 0.93),
            (4, 512 + 1024, 1.36),
            (1, 512 + 4096, 1.13),
            (2, 512 + 4096, 1.77),
            (4, 512 + 4096, 3.38),
        ];
        check_calibration(false, &composed, 1.25);
        // The flash kernel, within 35 % (the fixed 64 MiB is most of the 512² batch-1 margin):
        let flash = [
            (1, 512 + 1024, 0.20),
            (2, 512 + 1024, 0.40),
            (4, 512 + 1024, 0.81),
            (1, 512 + 4096, 0.61),
            (2, 512 + 4096, 1.21),
            (4, 512 + 4096, 2.43),
        ];
        check_calibration(true, &flash, 1.35);
    }

    #[test]
    fn adapters_add_one_widest_output_or_two() {
        let cfg = Config::klein_9b();
        let lora = |n| lora_bytes(&cfg, DType::BF16, 1, 4608, n);
        // The single block's projection at 1024²: 4608 tokens × 36864 columns of bf16.
        let widest = 4608 * 36864 * 2;
        assert_eq!(
            (lora(0), lora(1), lora(2), lora(8)),
            (0, widest, 2 * widest, 2 * widest)
        );
        assert_eq!(lora_bytes(&cfg, DType::BF16, 2, 4608, 1), 2 * widest);
    }
}
