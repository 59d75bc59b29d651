//! Micro-benchmarks of `klein_kernels`: each fused kernel next to the stock-candle composition
//! it replaces, on the klein-4B shapes of one 1024² transformer step (4096 image + 512 text
//! tokens, D 3072, 24 heads of 128, MLP 9216; the attention also at 512²'s 1024 + 512 tokens),
//! of the Qwen3-4B text encoder (512 tokens,
//! hidden 2560, 32 query / 8 key-value heads of 128, MLP 9728, 4-bit linears) and of a 1024²
//! VAE decode, with the kernel's floor on this card: bytes moved at the device-copy rate
//! (GroupNorm: two reads and a write), or FLOPs at the bf16 matmul rate; and load-time
//! quantization on the device against the host's cores, its floor the weight's upload.

use candle_core::{D, DType, Device, Result, Tensor, quantized::QTensor};
use klein_kernels::{RopeStyle, reference};
use serde::Serialize;

use crate::components::time_queued;

/// One kernel, timed fused and as the composition.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRow {
    pub kernel: String,
    pub case: String,
    /// Median ms of the fused kernel (device synchronised).
    pub fused_ms: f64,
    /// Median ms of the stock-candle composition.
    pub reference_ms: f64,
    /// Bytes moved (elementwise) or FLOPs (attention) at this card's rate, or the weight's
    /// plain upload (load-time quantization), ms.
    pub floor_ms: f64,
    /// "bytes", "flops" or "upload": what the floor counts.
    pub bound: &'static str,
}

/// The card's rates the floors use.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    /// Device-to-device copy, GB/s (bytes read + written).
    pub copy_gbps: f64,
    /// Dense bf16 matmul, TFLOP/s.
    pub matmul_tflops: f64,
}

pub(crate) const TXT: usize = 512;
pub(crate) const IMG: usize = 4096;
pub(crate) const DIM: usize = 3072;
pub(crate) const HEADS: usize = 24;
pub(crate) const HEAD_DIM: usize = 128;
pub(crate) const MLP: usize = 9216;
const FLUX: RopeStyle = RopeStyle::Interleaved;

/// Qwen3-4B: prompt tokens, hidden size, query and key-value heads, MLP width.
const ENC_TOKENS: usize = 512;
const ENC_DIM: usize = 2560;
const ENC_HEADS: usize = 32;
const ENC_KV_HEADS: usize = 8;
const ENC_MLP: usize = 9728;

/// Standard-normal bf16 tensor.
pub(crate) fn randn(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16)
}

/// Times every kernel, or only those whose name contains `only`; the 1024² step's attention
/// also against each of `attention_keys` keys.
pub fn run(
    dev: &Device,
    iters: usize,
    rates: Rates,
    only: Option<&str>,
    attention_keys: &[usize],
) -> Result<Vec<KernelRow>> {
    // Each call's output reuses pooled memory, as in denoiser-svc, not a fresh mapping.
    klein_runtime::gpu_memory::keep_freed_memory(dev);
    let s = TXT + IMG;
    let bf16 = 2.0;
    let bytes_ms = |bytes: f64| bytes / (rates.copy_gbps * 1e9) * 1e3;
    let mut rows = Vec::new();
    let mut row = |kernel: &str,
                   case: String,
                   fused: &mut dyn FnMut() -> Result<Tensor>,
                   composed: &mut dyn FnMut() -> Result<Tensor>,
                   floor_ms: f64,
                   bound: &'static str|
     -> Result<()> {
        if only.is_some_and(|name| !kernel.contains(name)) {
            return Ok(());
        }
        let fused_ms = time_queued(dev, 3, iters, fused)?;
        let reference_ms = time_queued(dev, 3, iters, composed)?;
        rows.push(KernelRow {
            kernel: kernel.to_owned(),
            case,
            fused_ms,
            reference_ms,
            floor_ms,
            bound,
        });
        Ok(())
    };

    let x = randn(&[1, s, DIM], dev)?;
    let y = randn(&[1, s, DIM], dev)?;
    let mods = randn(&[1, 1, 3 * DIM], dev)?.chunk(3, D::Minus1)?;
    let (shift, scale, gate) = (&mods[0], &mods[1], &mods[2]);
    let act = (s * DIM) as f64 * bf16;
    row(
        "layer_norm_modulate",
        format!("x (1, {s}, {DIM})"),
        &mut || klein_kernels::layer_norm_modulate(&x, shift, scale, 1e-6),
        &mut || reference::layer_norm_modulate(&x, shift, scale, 1e-6),
        bytes_ms(2.0 * act),
        "bytes",
    )?;
    row(
        "gate_residual",
        format!("x, y (1, {s}, {DIM})"),
        &mut || klein_kernels::gate_residual(&x, &y, gate),
        &mut || reference::gate_residual(&x, &y, gate),
        bytes_ms(3.0 * act),
        "bytes",
    )?;
    row(
        "gate_residual_norm",
        format!("x, y (1, {s}, {DIM}) → the residual and its LayerNorm + modulation"),
        &mut || Ok(klein_kernels::gate_residual_norm(&x, &y, gate, shift, scale, 1e-6)?.0),
        &mut || {
            let r = reference::gate_residual(&x, &y, gate)?;
            reference::layer_norm_modulate(&r, shift, scale, 1e-6)
        },
        bytes_ms(4.0 * act),
        "bytes",
    )?;

    let p = randn(&[1, s, 3 * DIM + 2 * MLP], dev)?;
    let (g0, u0) = (3 * DIM, 3 * DIM + MLP);
    row(
        "swiglu",
        format!(
            "single-block projection (1, {s}, {}) → (1, {s}, {MLP})",
            3 * DIM + 2 * MLP
        ),
        &mut || {
            klein_kernels::swiglu(
                &p.narrow(D::Minus1, g0, MLP)?,
                &p.narrow(D::Minus1, u0, MLP)?,
            )
        },
        &mut || {
            reference::swiglu(
                &p.narrow(D::Minus1, g0, MLP)?,
                &p.narrow(D::Minus1, u0, MLP)?,
            )
        },
        bytes_ms(3.0 * (s * MLP) as f64 * bf16),
        "bytes",
    )?;

    let weight = randn(&[HEAD_DIM], dev)?;
    let angles = (Tensor::rand(0f32, 1.0, (s, HEAD_DIM / 2), dev)? * std::f64::consts::TAU)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let k = p.narrow(D::Minus1, DIM, DIM)?;
    row(
        "qk_norm_rope",
        format!("k columns of the projection → (1, {HEADS}, {s}, {HEAD_DIM})"),
        &mut || klein_kernels::qk_norm_rope(&k, &weight, &cos, &sin, HEADS, 0, 1e-6, FLUX),
        &mut || reference::qk_norm_rope(&k, &weight, &cos, &sin, HEADS, 0, 1e-6, FLUX),
        bytes_ms(2.0 * act + 2.0 * (s * HEAD_DIM / 2 * 4) as f64),
        "bytes",
    )?;
    // The double blocks' q: text rows and image rows from their own stacked q / k projections.
    let (txt, img) = (
        randn(&[1, TXT, 2 * DIM], dev)?.narrow(D::Minus1, 0, DIM)?,
        randn(&[1, IMG, 2 * DIM], dev)?.narrow(D::Minus1, 0, DIM)?,
    );
    row(
        "qk_norm_rope_joint",
        format!("[txt; img] q columns of two projections → (1, {HEADS}, {s}, {HEAD_DIM})"),
        &mut || {
            klein_kernels::qk_norm_rope_joint(
                (&txt, &weight),
                (&img, &weight),
                &cos,
                &sin,
                HEADS,
                1e-6,
            )
        },
        &mut || {
            Tensor::cat(
                &[
                    reference::qk_norm_rope(&txt, &weight, &cos, &sin, HEADS, 0, 1e-6, FLUX)?,
                    reference::qk_norm_rope(&img, &weight, &cos, &sin, HEADS, TXT, 1e-6, FLUX)?,
                ],
                2,
            )
        },
        bytes_ms(2.0 * act + 2.0 * (s * HEAD_DIM / 2 * 4) as f64),
        "bytes",
    )?;

    // The 1024² step's joint attention (Hopper: 144-key tiles) and the 512² step's (128-key);
    // then the 1024² step's queries against `attention_keys` keys: the same work items (query
    // tiles), each with fewer or more key tiles.
    let square = [s, TXT + IMG / 4].map(|t| (t, t));
    for (queries, keys) in square
        .into_iter()
        .chain(attention_keys.iter().map(|&k| (s, k)))
    {
        let (q, k, v) = (
            randn(&[1, HEADS, queries, HEAD_DIM], dev)?,
            randn(&[1, HEADS, keys, HEAD_DIM], dev)?,
            randn(&[1, HEADS, keys, HEAD_DIM], dev)?,
        );
        let flops = 4.0 * (queries * keys * HEAD_DIM * HEADS) as f64;
        let case = if queries == keys {
            format!("{HEADS} heads × {queries} tokens × {HEAD_DIM}")
        } else {
            format!("{HEADS} heads × {queries} queries × {keys} keys × {HEAD_DIM}")
        };
        row(
            "flash_attention",
            case,
            &mut || klein_kernels::flash_attention(&q, &k, &v),
            &mut || reference::attention(&q, &k, &v),
            flops / (rates.matmul_tflops * 1e12) * 1e3,
            "flops",
        )?;
    }

    // The VAE decoder's mid-block attention at 1024²: one head of 512 over 128² positions, f32.
    // Its floor: three fp16 products (split fp16) at the bf16 rate.
    let n = 128 * 128;
    let (q, k, v) = (
        Tensor::randn(0f32, 1.0, (1, 1, n, 512), dev)?,
        Tensor::randn(0f32, 1.0, (1, 1, n, 512), dev)?,
        Tensor::randn(0f32, 1.0, (1, 1, n, 512), dev)?,
    );
    row(
        "flash_attention_f32",
        format!("VAE mid block: 1 head × {n} positions × 512, f32"),
        &mut || klein_kernels::flash_attention(&q, &k, &v),
        &mut || reference::attention(&q, &k, &v),
        3.0 * 4.0 * (n * n * 512) as f64 / (rates.matmul_tflops * 1e12) * 1e3,
        "flops",
    )?;
    drop((q, k, v));

    // The VAE decoder's widest norm: 128 channels at 1024², f32, 32 groups, then SiLU.
    let x = Tensor::randn(0f32, 1.0, (1, 128, 1024, 1024), dev)?;
    let weight = Tensor::randn(0f32, 1.0, 128, dev)?;
    let bias = Tensor::randn(0f32, 1.0, 128, dev)?;
    row(
        "group_norm_silu",
        "VAE x (1, 128, 1024, 1024) f32, 32 groups".to_owned(),
        &mut || klein_kernels::group_norm(&x, &weight, &bias, 32, 1e-6, true),
        &mut || reference::group_norm(&x, &weight, &bias, 32, 1e-6, true),
        bytes_ms(3.0 * x.elem_count() as f64 * 4.0),
        "bytes",
    )?;
    // A tiled decode's norm halves on the same tensor: the moments over a tile's own part (its
    // middle 768 rows), the per-channel affine + SiLU with statistics from elsewhere.
    let (own_rows, own_cols) = ((128, 896), (0, 1024));
    row(
        "group_moments",
        "VAE x (1, 128, 1024, 1024) f32, 32 groups, rows 128..896".to_owned(),
        &mut || klein_kernels::group_moments(&x, 32, own_rows, own_cols),
        &mut || reference::group_moments(&x, 32, own_rows, own_cols),
        bytes_ms(x.elem_count() as f64 * 4.0 * 0.75),
        "bytes",
    )?;
    let scale = Tensor::randn(0f32, 1.0, (1, 128), dev)?;
    let shift = Tensor::randn(0f32, 1.0, (1, 128), dev)?;
    row(
        "channel_affine",
        "VAE x (1, 128, 1024, 1024) f32, SiLU".to_owned(),
        &mut || klein_kernels::channel_affine(&x, &scale, &shift, true),
        &mut || reference::channel_affine(&x, &scale, &shift, true),
        bytes_ms(2.0 * x.elem_count() as f64 * 4.0),
        "bytes",
    )?;
    // The decoder output to u8 pixels; the composition is the device part of the path it
    // replaced (its rounding to u8 ran on the host, over 4 × the bytes).
    let x = Tensor::randn(0f32, 1.0, (1, 3, 1024, 1024), dev)?;
    row(
        "rgb_u8",
        "VAE output (1, 3, 1024, 1024) f32 → (1, 1024, 1024, 3) u8".to_owned(),
        &mut || klein_kernels::rgb_u8(&x),
        &mut || {
            x.affine(0.5, 0.5)?
                .clamp(0f32, 1f32)?
                .permute((0, 2, 3, 1))?
                .contiguous()
        },
        bytes_ms(x.elem_count() as f64 * 5.0),
        "bytes",
    )?;

    // The text encoder's kernels, one layer's worth each.
    let l = ENC_TOKENS;
    let x = (randn(&[1, l, ENC_DIM], dev)? * 4.0)?;
    let weight = randn(&[ENC_DIM], dev)?;
    let act = (l * ENC_DIM) as f64 * bf16;
    row(
        "rms_norm",
        format!("Qwen3 hidden (1, {l}, {ENC_DIM})"),
        &mut || klein_kernels::rms_norm(&x, &weight, 1e-6),
        &mut || reference::rms_norm(&x, &weight, 1e-6),
        bytes_ms(2.0 * act),
        "bytes",
    )?;

    let q_cols = randn(&[1, l, ENC_HEADS * HEAD_DIM], dev)?;
    let weight = randn(&[HEAD_DIM], dev)?;
    let angles = (Tensor::rand(0f32, 1.0, (l, HEAD_DIM / 2), dev)? * 100.0)?;
    let round = |t: Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let (cos, sin) = (round(angles.cos()?)?, round(angles.sin()?)?);
    let qwen = RopeStyle::RotateHalf;
    row(
        "qk_norm_rope_rotate_half",
        format!(
            "Qwen3 q projection (1, {l}, {}) → (1, {ENC_HEADS}, {l}, {HEAD_DIM})",
            ENC_HEADS * HEAD_DIM
        ),
        &mut || klein_kernels::qk_norm_rope(&q_cols, &weight, &cos, &sin, ENC_HEADS, 0, 1e-6, qwen),
        &mut || reference::qk_norm_rope(&q_cols, &weight, &cos, &sin, ENC_HEADS, 0, 1e-6, qwen),
        bytes_ms(2.0 * (l * ENC_HEADS * HEAD_DIM) as f64 * bf16),
        "bytes",
    )?;

    let (q, k, v) = (
        randn(&[1, ENC_HEADS, l, HEAD_DIM], dev)?,
        randn(&[1, ENC_KV_HEADS, l, HEAD_DIM], dev)?,
        randn(&[1, ENC_KV_HEADS, l, HEAD_DIM], dev)?,
    );
    // A 300-token prompt padded to 512.
    let mask = Tensor::arange(0u32, l as u32, dev)?
        .lt(300u32)?
        .to_dtype(DType::U32)?
        .unsqueeze(0)?;
    let causal_flops = 2.0 * (l * l * HEAD_DIM * ENC_HEADS) as f64;
    row(
        "masked_attention",
        format!("causal + padding, {ENC_HEADS} / {ENC_KV_HEADS} heads × {l} tokens × {HEAD_DIM}"),
        &mut || klein_kernels::masked_attention(&q, &k, &v, &mask, true),
        &mut || reference::masked_attention(&q, &k, &v, &mask, true),
        causal_flops / (rates.matmul_tflops * 1e12) * 1e3,
        "flops",
    )?;

    let (gate, up) = (randn(&[1, l, ENC_MLP], dev)?, randn(&[1, l, ENC_MLP], dev)?);
    row(
        "swiglu_pair",
        format!("Qwen3 gate and up (1, {l}, {ENC_MLP}) each"),
        &mut || klein_kernels::swiglu(&gate, &up),
        &mut || reference::swiglu(&gate, &up),
        bytes_ms(3.0 * (l * ENC_MLP) as f64 * bf16),
        "bytes",
    )?;

    // Each format with a one-pass bf16 kernel, on the encoder's widest weight: the floor reads
    // the blocks once and writes bf16 once.
    let w = Tensor::randn(0f32, 0.02, (ENC_MLP, ENC_DIM), &Device::Cpu)?;
    let n = (ENC_MLP * ENC_DIM) as f64;
    for format in klein_kernels::fused_dequantize_formats() {
        let w = QTensor::quantize_onto(&w, format, dev)?;
        let block_bytes_per_weight = format.type_size() as f64 / format.block_size() as f64;
        let name = format!("{format:?}").to_lowercase();
        row(
            &format!("dequantize_{name}"),
            format!("Qwen3 gate_proj ({ENC_MLP}, {ENC_DIM}) {format:?} → bf16"),
            &mut || klein_kernels::dequantize(&w, DType::BF16),
            &mut || w.dequantize(dev)?.to_dtype(DType::BF16),
            bytes_ms(n * (block_bytes_per_weight + bf16)),
            "bytes",
        )?;
    }
    rows.extend(quantize_rows(dev, iters, only)?);
    Ok(rows)
}

/// Load-time quantization of the encoder's widest weight (bf16, on the host) into each format:
/// "fused" on the device, the upload included; "composition" on the host's cores (both
/// `quant::quantize_rows`). The floor is the weight's plain upload (`to_device`), timed here.
/// Only the formats whose row name contains `only`, if given.
fn quantize_rows(dev: &Device, iters: usize, only: Option<&str>) -> Result<Vec<KernelRow>> {
    use klein_kernels::quant::{QuantFormat, quantize_rows};
    use std::time::Instant;

    let host =
        Tensor::randn(0f32, 0.02, (ENC_MLP, ENC_DIM), &Device::Cpu)?.to_dtype(DType::BF16)?;
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        let mut ms = Vec::new();
        for _ in 0..iters.clamp(1, 5) + 1 {
            let t = Instant::now();
            f()?;
            dev.synchronize()?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.remove(0);
        Ok(crate::components::median(ms))
    };
    let kernels = QuantFormat::ALL
        .map(|format| (format, format!("quantize_{format}")))
        .into_iter()
        .filter(|(_, kernel)| only.is_none_or(|name| kernel.contains(name)))
        .collect::<Vec<_>>();
    if kernels.is_empty() {
        return Ok(Vec::new());
    }
    let upload_ms = time(&|| host.to_device(dev).map(drop))?;
    kernels
        .into_iter()
        .map(|(format, kernel)| {
            let g = format.ggml();
            Ok(KernelRow {
                kernel,
                case: format!(
                    "Qwen3 gate_proj ({ENC_MLP}, {ENC_DIM}) bf16 on the host → {g:?} on the \
                     device, against the host's cores"
                ),
                fused_ms: time(&|| quantize_rows(&host, g, dev).map(drop))?,
                reference_ms: time(&|| quantize_rows(&host, g, &Device::Cpu).map(drop))?,
                floor_ms: upload_ms,
                bound: "upload",
            })
        })
        .collect()
}
