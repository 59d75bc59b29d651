//! The stock-candle compositions the kernels replace, rounding like torch (spec §7.1): each op
//! computed in f32 where torch upcasts, rounded once to the model dtype. The model runs these
//! where no kernel applies; the parity tests hold the kernels to them.

use candle_core::{D, DType, Result, Tensor};

use crate::{Conv, PadRows, RopeStyle};

/// Σx and Σx² of each (batch, group) of x (B, C, H, W) over rows `rows.0..rows.1` and columns
/// `cols.0..cols.1`, in f64. (B·groups, 2)
pub fn group_moments(
    x: &Tensor,
    groups: usize,
    rows: (usize, usize),
    cols: (usize, usize),
) -> Result<Tensor> {
    let b = x.dim(0)?;
    let part = x
        .to_dtype(DType::F64)?
        .narrow(2, rows.0, rows.1 - rows.0)?
        .narrow(3, cols.0, cols.1 - cols.0)?
        .contiguous()?
        .reshape((b * groups, ()))?;
    Tensor::cat(&[part.sum_keepdim(1)?, part.sqr()?.sum_keepdim(1)?], 1)
}

/// `x · scale + shift` per (batch, channel) in f32, rounded to x's dtype, then optionally SiLU
/// ([`silu`]). x (B, C, H, W), scale and shift (B, C) f32.
pub fn channel_affine(x: &Tensor, scale: &Tensor, shift: &Tensor, silu: bool) -> Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let y = x
        .to_dtype(DType::F32)?
        .broadcast_mul(&scale.reshape((b, c, 1, 1))?)?
        .broadcast_add(&shift.reshape((b, c, 1, 1))?)?
        .to_dtype(x.dtype())?;
    if silu { self::silu(&y) } else { Ok(y) }
}

/// SiLU computed in f32 and rounded once to the input dtype (torch's `F.silu` on bf16). candle's
/// CUDA kernel for bf16 does exactly that in one pass (`x / (1 + exp(-x))` in f32, the same
/// expression as its f32 kernel, then one rounding: the GPU test
/// `bf16_silu_is_the_f32_silu_rounded_once`); its CPU kernel and its f16 kernel round every
/// operation, so those go through f32.
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F32 | DType::F64 => xs.silu(),
        DType::BF16 if xs.device().is_cuda() => xs.silu(),
        dtype => xs.to_dtype(DType::F32)?.silu()?.to_dtype(dtype),
    }
}

/// `nn.LayerNorm(D, elementwise_affine=False, eps)` over the last axis, normalised in f32,
/// rounded once.
pub fn layer_norm(xs: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = xs.dim(D::Minus1)?;
    let ones = Tensor::ones(dim, xs.dtype(), xs.device())?;
    let zeros = Tensor::zeros(dim, xs.dtype(), xs.device())?;
    candle_nn::ops::layer_norm(&xs.contiguous()?, &ones, &zeros, eps as f32)
}

/// `(1 + scale) ⊙ x + shift`, one rounding per op. shift / scale (B, 1, D) broadcast over the
/// sequence of x (B, S, D).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    (scale + 1.0)?.broadcast_mul(x)?.broadcast_add(shift)
}

/// `modulate(layer_norm(x), shift, scale)`.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    modulate(&layer_norm(x, eps)?, shift, scale)
}

/// `x + y ⊙ gate`, gate (B, 1, D) broadcast over the sequence.
pub fn gate_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    x + y.broadcast_mul(gate)?
}

/// `silu(gate) ⊙ up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    silu(gate)? * up
}

/// Per-head `RMSNorm(hd)`: `dtype(x · rsqrt(mean(x²) + eps)) ⊙ w`, the normalised value rounded
/// before the weight product (torch's composite `rms_norm`). Normalised in f32: candle's CPU
/// kernel would round the RMS itself to bf16 first. (.., hd) → (.., hd)
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ones = Tensor::ones(weight.dim(0)?, DType::F32, weight.device())?;
    let x32 = xs.to_dtype(DType::F32)?.contiguous()?;
    candle_nn::ops::rms_norm(&x32, &ones, eps as f32)?
        .to_dtype(xs.dtype())?
        .broadcast_mul(weight)
}

/// Interleaved RoPE (pairs (2j, 2j+1)) applied in f32 and rounded to the input dtype:
/// `out[2j] = x[2j] cos − x[2j+1] sin`, `out[2j+1] = x[2j+1] cos + x[2j] sin`.
/// (B, H, S, hd) with cos / sin (S, hd/2) → (B, H, S, hd)
pub fn rope_interleaved(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x32 = xs.to_dtype(DType::F32)?.contiguous()?;
    candle_nn::rotary_emb::rope_i(&x32, cos, sin)?.to_dtype(xs.dtype())
}

/// Rotate-half RoPE (pairs (j, j + hd/2)) in the input dtype's arithmetic, every product and sum
/// rounded (transformers' `q * cos + rotate_half(q) * sin`): `out[j] = x[j] cos − x[j+hd/2] sin`,
/// `out[j+hd/2] = x[j+hd/2] cos + x[j] sin`. The tables are cast to the input dtype.
/// (B, H, S, hd) with cos / sin (S, hd/2) → (B, H, S, hd)
pub fn rope_rotate_half(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    candle_nn::rotary_emb::rope(
        &xs.contiguous()?,
        &cos.to_dtype(dtype)?.contiguous()?,
        &sin.to_dtype(dtype)?.contiguous()?,
    )
}

/// (B, S, H·hd) → RMSNorm per head → (B, H, S, hd) → RoPE of `style` with rows `rope_offset..`
/// of the tables.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope(
    src: &Tensor,
    weight: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    rope_offset: usize,
    eps: f64,
    style: RopeStyle,
) -> Result<Tensor> {
    let (b, s, _) = src.dims3()?;
    let x = src.reshape((b, s, heads, weight.dim(0)?))?;
    let x = rms_norm(&x, weight, eps)?.transpose(1, 2)?.contiguous()?;
    let (cos, sin) = (
        cos.narrow(0, rope_offset, s)?,
        sin.narrow(0, rope_offset, s)?,
    );
    match style {
        RopeStyle::Interleaved => rope_interleaved(&x, &cos.contiguous()?, &sin.contiguous()?),
        RopeStyle::RotateHalf => rope_rotate_half(&x, &cos, &sin),
    }
}

/// `softmax(q kᵀ / √hd) v` in f32, rounded once; q (B, H, S_q, hd), k / v (B, H, S_kv, hd)
/// → (B, S_q, H·hd). Materialises every score: for tests and small shapes.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, s_q, hd) = q.dims4()?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let scores = (f32(q)?.matmul(&f32(k)?.t()?)? / (hd as f64).sqrt())?;
    let o = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&f32(v)?)?;
    o.transpose(1, 2)?
        .reshape((b, s_q, h * hd))?
        .to_dtype(q.dtype())
}

/// Grouped-query attention in f32, rounded once: q (B, H, S_q, hd), k / v (B, H_kv, S_kv, hd),
/// query head h reading key/value head h / (H / H_kv) (transformers' `repeat_kv`); keys where
/// `key_mask` (B, S_kv) is 0 and, when `causal`, keys after the query get −∞ before the softmax.
/// → (B, S_q, H·hd). Materialises every score.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: &Tensor,
    causal: bool,
) -> Result<Tensor> {
    let (b, h, s_q, hd) = q.dims4()?;
    let (_, h_kv, s_kv, _) = k.dims4()?;
    let (n_rep, dtype) = (h / h_kv, q.dtype());
    let device = q.device();
    let keys = key_mask.ne(0u32)?.reshape((b, 1, s_kv))?;
    let allowed = if causal {
        let (i, j) = (
            Tensor::arange(0u32, s_q as u32, device)?,
            Tensor::arange(0u32, s_kv as u32, device)?,
        );
        let causal = i.reshape((s_q, 1))?.broadcast_ge(&j.reshape((1, s_kv))?)?;
        causal.unsqueeze(0)?.broadcast_mul(&keys)?
    } else {
        keys.repeat((1, s_q, 1))?
    };
    let open = Tensor::zeros((b, s_q, s_kv), DType::F32, device)?;
    let blocked = Tensor::full(f32::NEG_INFINITY, (b, s_q, s_kv), device)?;
    let bias = allowed
        .where_cond(&open, &blocked)?
        .reshape((b, 1, 1, s_q, s_kv))?;
    let f32 = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let q = f32(q)?.reshape((b, h_kv, n_rep * s_q, hd))?;
    let scores = (q.matmul(&f32(k)?.t()?)? / (hd as f64).sqrt())?
        .reshape((b, h_kv, n_rep, s_q, s_kv))?
        .broadcast_add(&bias)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, h_kv, n_rep * s_q, s_kv))?;
    probs
        .matmul(&f32(v)?)?
        .reshape((b, h, s_q, hd))?
        .transpose(1, 2)?
        .reshape((b, s_q, h * hd))?
        .to_dtype(dtype)
}

/// A GroupNorm's per-(batch, channel) affine from its statistics in f32: `scale = rstd · weight`,
/// `shift = bias − mean · scale`. x (B, C, H, W) → ((B, C), (B, C)) f32.
pub fn group_norm_affine(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, c, h, w) = x.dims4()?;
    let xf = x
        .to_dtype(DType::F32)?
        .reshape((b, groups, c / groups * h * w))?;
    let mean = xf.mean_keepdim(2)?;
    let centred = xf.broadcast_sub(&mean)?;
    let rstd = (centred.sqr()?.mean_keepdim(2)? + eps)?.sqrt()?.recip()?;
    let per_channel = |t: &Tensor| t.repeat((1, 1, c / groups))?.reshape((b, c));
    let scale = per_channel(&rstd)?.broadcast_mul(&weight.reshape((1, c))?)?;
    let shift = bias
        .reshape((1, c))?
        .broadcast_sub(&per_channel(&mean)?.broadcast_mul(&scale)?)?;
    Ok((scale, shift))
}

/// GroupNorm with an affine (f32 weight and bias), statistics and affine in f32, rounded once
/// to x's dtype; with `silu`, SiLU in f32 of the rounded value, rounded again.
/// (B, C, H, W) → (B, C, H, W)
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (scale, shift) = group_norm_affine(x, weight, bias, groups, eps)?;
    channel_affine(x, &scale, &shift, silu)
}

/// `conv(x, weight) + bias (+ residual)`, one candle op each (cuDNN's algorithm `conv.algo`
/// where candle runs cuDNN; the precision is cuDNN's default).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    conv: Conv,
) -> Result<Tensor> {
    let y = x.conv2d_with_algo(weight, conv.padding, conv.stride, 1, 1, conv.algo)?;
    let y = y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?;
    match residual {
        Some(r) => r + y,
        None => Ok(y),
    }
}

/// Rows `[row0, row0 + rows)` of x (B, C, H, W), zero-padded on every side as `pad` says.
pub fn pad_rows(x: &Tensor, pad: PadRows) -> Result<Tensor> {
    x.narrow(2, pad.row0, pad.rows)?
        .pad_with_zeros(2, pad.top, pad.bottom)?
        .pad_with_zeros(3, pad.left, pad.right)
}
