//! Where a klein-4B transformer step at 1024² goes: every GEMM, attention and fused kernel of one
//! step (5 double blocks, 20 single blocks; 4096 image + 512 text tokens, D 3072, 24 heads of
//! 128, MLP 9216, batch 1, bf16), each timed alone at its real shape with the same candle /
//! `klein_kernels` call the model makes, times how often a step runs it. The sum is set against
//! the whole step (`components --only transformer`); what the sum leaves out (the modulation
//! and embedding layers, the output norm and projection, launch gaps) is the difference.

use candle_core::{D, Device, Module, Result, Tensor};
use klein_kernels::{Linear, RopeStyle};
use serde::Serialize;

use crate::{
    components::time_queued,
    kernels::{DIM, HEAD_DIM, HEADS, IMG, MLP, TXT, randn},
};

/// One part of the step.
#[derive(Debug, Clone, Serialize)]
pub struct PartRow {
    pub part: String,
    /// "gemm", "attention" or "kernel" (the step has no copies left).
    pub kind: &'static str,
    pub count: usize,
    /// Median ms of one call.
    pub ms: f64,
    /// TFLOP/s of one call (GEMMs and attention).
    pub tflops: Option<f64>,
}

impl PartRow {
    pub fn step_ms(&self) -> f64 {
        self.ms * self.count as f64
    }
}

const DOUBLE: usize = 5;
const SINGLE: usize = 20;

/// A bias-free linear layer (out, in) with random weights.
fn linear(out: usize, inp: usize, dev: &Device) -> Result<Linear> {
    Ok(Linear::new((randn(&[out, inp], dev)? * 0.02)?))
}

/// Columns `col..col + DIM` of a (B, S, C) projection as heads (B, H, S, hd), viewed in place
/// as the model's `heads` does.
fn heads(x: &Tensor, col: usize) -> Result<Tensor> {
    let (b, s, c) = x.dims3()?;
    x.reshape((b, s, c / HEAD_DIM, HEAD_DIM))?
        .narrow(2, col / HEAD_DIM, HEADS)?
        .transpose(1, 2)
}

/// `x + gate·y` and the LayerNorm + modulation of the result in one kernel, as every residual
/// but each stream's last runs: the residual, its norm alongside.
fn residual_norm(x: &Tensor, y: &Tensor, mods: &[Tensor]) -> Result<Tensor> {
    Ok(klein_kernels::gate_residual_norm(x, y, &mods[2], &mods[0], &mods[1], 1e-6)?.0)
}

pub fn run(dev: &Device, iters: usize) -> Result<Vec<PartRow>> {
    // Each call's output reuses pooled memory, as in denoiser-svc, not a fresh mapping.
    klein_runtime::gpu_memory::keep_freed_memory(dev);
    let s = IMG + TXT;
    let mut rows = Vec::new();
    let mut part = |name: String,
                    kind: &'static str,
                    count: usize,
                    flops: Option<f64>,
                    f: &mut dyn FnMut() -> Result<Tensor>|
     -> Result<()> {
        let ms = time_queued(dev, 3, iters, f)?;
        rows.push(PartRow {
            part: name,
            kind,
            count,
            ms,
            tflops: flops.map(|fl| fl / (ms * 1e-3) / 1e12),
        });
        Ok(())
    };
    let gemm_flops = |m: usize, k: usize, n: usize| Some(2.0 * (m * k * n) as f64);

    // Single-stream blocks.
    let x = randn(&[1, s, DIM], dev)?;
    let proj = linear(3 * DIM + 2 * MLP, DIM, dev)?;
    let p = proj.forward(&x)?;
    part(
        format!(
            "single: to_qkv_mlp_proj ({s}×{DIM} → {})",
            3 * DIM + 2 * MLP
        ),
        "gemm",
        SINGLE,
        gemm_flops(s, DIM, 3 * DIM + 2 * MLP),
        &mut || proj.forward(&x),
    )?;
    let cat = randn(&[1, s, DIM + MLP], dev)?;
    let to_out = linear(DIM, DIM + MLP, dev)?;
    part(
        format!("single: to_out ({s}×{} → {DIM})", DIM + MLP),
        "gemm",
        SINGLE,
        gemm_flops(s, DIM + MLP, DIM),
        &mut || to_out.forward(&cat),
    )?;
    let mods = randn(&[1, 1, 3 * DIM], dev)?.chunk(3, D::Minus1)?;
    let norm_w = randn(&[HEAD_DIM], dev)?;
    let angles = (Tensor::rand(0f32, 1.0, (s, HEAD_DIM / 2), dev)? * 6.0)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let rope = |cols: &Tensor, offset: usize| {
        klein_kernels::qk_norm_rope(
            cols,
            &norm_w,
            &cos,
            &sin,
            HEADS,
            offset,
            1e-6,
            RopeStyle::Interleaved,
        )
    };
    part(
        "single: LayerNorm + modulation (the first block's)".into(),
        "kernel",
        1,
        None,
        &mut || klein_kernels::layer_norm_modulate(&x, &mods[0], &mods[1], 1e-6),
    )?;
    part(
        "single: QK norm + RoPE (k; q's runs in the attention)".into(),
        "kernel",
        SINGLE,
        None,
        &mut || rope(&p.narrow(D::Minus1, DIM, DIM)?, 0),
    )?;
    // k as the norm kernel writes it, q and v read in the projection, [o | MLP] in one buffer.
    let k = randn(&[1, HEADS, s, HEAD_DIM], dev)?;
    let v = heads(&p, 2 * DIM)?;
    let q_norm = klein_kernels::QNorm {
        weight: norm_w.clone(),
        cos: cos.clone(),
        sin: sin.clone(),
        rope_offset: 0,
        eps: 1e-6,
    };
    let attention_flops = 4.0 * (s * s * HEAD_DIM * HEADS) as f64;
    part(
        format!(
            "single: flash attention {HEADS} × {s} × {HEAD_DIM}, q's norm + RoPE inside, + SwiGLU into [o | MLP]"
        ),
        "attention",
        SINGLE,
        Some(attention_flops),
        &mut || {
            klein_kernels::flash_attention_with_swiglu_norm_q(
                &p.narrow(D::Minus1, 0, DIM)?,
                &q_norm,
                &k,
                &v,
                &p.narrow(D::Minus1, 3 * DIM, MLP)?,
                &p.narrow(D::Minus1, 3 * DIM + MLP, MLP)?,
            )
        },
    )?;
    let o = randn(&[1, s, DIM], dev)?;
    part(
        "single: x + gate·y (the last block's)".into(),
        "kernel",
        1,
        None,
        &mut || klein_kernels::gate_residual(&x, &o, &mods[2]),
    )?;
    part(
        "single: x + gate·y and the next block's LayerNorm + modulation".into(),
        "kernel",
        SINGLE - 1,
        None,
        &mut || residual_norm(&x, &o, &mods),
    )?;

    // Double-stream blocks: each projection once for the image and once for the text tokens.
    let mut qkv = Vec::new();
    for (stream, tokens) in [("img", IMG), ("txt", TXT)] {
        let x = randn(&[1, tokens, DIM], dev)?;
        let stacked = linear(3 * DIM, DIM, dev)?;
        part(
            format!(
                "double {stream}: stacked q, k, v projection ({tokens}×{DIM} → {})",
                3 * DIM
            ),
            "gemm",
            DOUBLE,
            gemm_flops(tokens, DIM, 3 * DIM),
            &mut || stacked.forward(&x),
        )?;
        qkv.push(stacked.forward(&x)?);
        let square = linear(DIM, DIM, dev)?;
        let joint = randn(&[1, s, DIM], dev)?;
        let start = if stream == "txt" { 0 } else { TXT };
        part(
            format!("double {stream}: to_out on its rows of the joint output"),
            "gemm",
            DOUBLE,
            gemm_flops(tokens, DIM, DIM),
            &mut || square.forward(&joint.narrow(1, start, tokens)?),
        )?;
        let ff_in = linear(2 * MLP, DIM, dev)?;
        let ff_out = linear(DIM, MLP, dev)?;
        let u = ff_in.forward(&x)?;
        let act = randn(&[1, tokens, MLP], dev)?;
        part(
            format!(
                "double {stream}: ff linear_in ({tokens}×{DIM} → {})",
                2 * MLP
            ),
            "gemm",
            DOUBLE,
            gemm_flops(tokens, DIM, 2 * MLP),
            &mut || ff_in.forward(&x),
        )?;
        part(
            format!("double {stream}: ff linear_out ({tokens}×{MLP} → {DIM})"),
            "gemm",
            DOUBLE,
            gemm_flops(tokens, MLP, DIM),
            &mut || ff_out.forward(&act),
        )?;
        part(
            format!("double {stream}: LayerNorm + modulation (the first block's attention's)"),
            "kernel",
            1,
            None,
            &mut || klein_kernels::layer_norm_modulate(&x, &mods[0], &mods[1], 1e-6),
        )?;
        part(
            format!("double {stream}: SwiGLU"),
            "kernel",
            DOUBLE,
            None,
            &mut || {
                klein_kernels::swiglu(
                    &u.narrow(D::Minus1, 0, MLP)?,
                    &u.narrow(D::Minus1, MLP, MLP)?,
                )
            },
        )?;
        let y = randn(&[1, tokens, DIM], dev)?;
        part(
            format!("double {stream}: x + gate·y (the last block's MLP's)"),
            "kernel",
            1,
            None,
            &mut || klein_kernels::gate_residual(&x, &y, &mods[2]),
        )?;
        part(
            format!("double {stream}: x + gate·y and the next LayerNorm + modulation"),
            "kernel",
            2 * DOUBLE - 1,
            None,
            &mut || residual_norm(&x, &y, &mods),
        )?;
    }
    let (img_p, txt_p) = (&qkv[0], &qkv[1]);
    let cols = |p: &Tensor, i: usize| p.narrow(D::Minus1, i * DIM, DIM);
    part(
        "double: joint [txt; img] QK norm + RoPE (k; q's runs in the attention)".into(),
        "kernel",
        DOUBLE,
        None,
        &mut || {
            klein_kernels::qk_norm_rope_joint(
                (&cols(txt_p, 1)?, &norm_w),
                (&cols(img_p, 1)?, &norm_w),
                &cos,
                &sin,
                HEADS,
                1e-6,
            )
        },
    )?;
    let (v_txt, v_img) = (heads(txt_p, 2 * DIM)?, heads(img_p, 2 * DIM)?);
    part(
        format!(
            "double: flash attention {HEADS} × {s} × {HEAD_DIM}, q's norm + RoPE inside, q and v read from both projections"
        ),
        "attention",
        DOUBLE,
        Some(attention_flops),
        &mut || {
            klein_kernels::flash_attention_split_v_norm_q(
                &cols(txt_p, 0)?,
                &q_norm,
                &cols(img_p, 0)?,
                &norm_w,
                &k,
                &v_txt,
                &v_img,
            )
        },
    )?;
    Ok(rows)
}
