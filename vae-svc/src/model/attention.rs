//! The mid-block self-attention (diffusers `Attention` with `AttnProcessor2_0`, one head of
//! width C, spec §1.4): `x + to_out(softmax(q kᵀ / √C) v)` over the H·W positions, with
//! `q, k, v = to_q/to_k/to_v(group_norm(x))` (linear layers with bias). The output projection
//! writes NCHW directly (`W_out · oᵀ`); its bias and the residual follow in one per-channel
//! affine and one add.
//!
//! At 1024² the decoder attends over 16 384 positions; the full f32 score matrix would take
//! 1 GiB. On a CUDA f32 model the flash kernel (`klein_kernels::flash_attention`, split fp16)
//! never forms it; elsewhere queries are processed in blocks sized by
//! [`Chunking::attention_bytes`] (scores and softmax are computed in f32, as torch's fused
//! kernels do for bf16 inputs).
//!
//! [`Chunking::attention_bytes`]: super::Chunking

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{Config, config::NORM_EPS, layers::gemm_dtype, norm::GroupNorm};

/// Query rows per block so that one block's f32 scores and softmax fit `max_bytes`.
pub fn query_rows(batch: usize, keys: usize, max_bytes: u64) -> usize {
    let per_row = (2 * batch * keys * 4) as u64;
    ((max_bytes / per_row.max(1)) as usize).clamp(1, keys.max(1))
}

/// `softmax(q kᵀ · scale) v` with the queries in blocks of at most `max_bytes` of scores.
/// q, k, v: (B, N, C) -> (B, N, C) in q's dtype.
pub fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, max_bytes: u64) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let scale = 1.0 / (c as f64).sqrt();
    let kt = k.to_dtype(DType::F32)?.t()?;
    let v = v.to_dtype(DType::F32)?;
    let block = |q: &Tensor| -> Result<Tensor> {
        let scores = (q.to_dtype(DType::F32)? * scale)?.matmul(&kt)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        drop(scores);
        probs.matmul(&v)?.to_dtype(q.dtype())
    };
    let rows = query_rows(b, n, max_bytes);
    if rows >= n {
        return block(q);
    }
    let out = Tensor::zeros((b, n, c), q.dtype(), q.device())?;
    for r0 in (0..n).step_by(rows) {
        let o = block(&q.narrow(1, r0, rows.min(n - r0))?)?;
        out.slice_set(&o, 1, r0)?;
    }
    Ok(out)
}

/// Single-head spatial self-attention with a residual connection. The projections are kept as
/// the forward applies them (checkpoint keys below): stacked, so that the flash kernel's path
/// takes q, k and v from one product (the composition takes one product each), and two biases
/// move or drop without changing the result. `to_k`'s bias adds `q·b_k` to every
/// score of a query, which the softmax cancels. `to_v`'s bias adds `b_v` to every output row,
/// since each row of the softmax sums to 1, so it joins `to_out`'s bias as `W_out · b_v`.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: GroupNorm,
    /// `to_q.weight`, `to_k.weight`, `to_v.weight` stacked: (3C, C).
    qkv_weight: Tensor,
    /// `to_q.bias` (C).
    q_bias: Tensor,
    /// `to_out.0.weight` (C, C).
    out_weight: Tensor,
    /// `to_out.0.bias + to_out.0.weight · to_v.bias` (C), f32.
    out_bias: Tensor,
    attention_bytes: u64,
}

impl Attention {
    pub fn new(cfg: &Config, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let c = channels;
        let weight = |name: &str| vb.pp(name).get((c, c), "weight");
        let bias = |name: &str| vb.pp(name).get(c, "bias");
        // Read for its shape check only: the softmax cancels it.
        bias("to_k")?;
        let out = vb.pp("to_out").pp("0");
        let out_weight = out.get((c, c), "weight")?;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let v_bias = f32(&bias("to_v")?)?.unsqueeze(1)?;
        let out_bias =
            (f32(&out.get(c, "bias")?)? + f32(&out_weight)?.matmul(&v_bias)?.squeeze(1)?)?;
        Ok(Self {
            group_norm: GroupNorm::new(cfg, channels, NORM_EPS, vb.pp("group_norm"))?,
            qkv_weight: Tensor::cat(&[weight("to_q")?, weight("to_k")?, weight("to_v")?], 0)?,
            q_bias: bias("to_q")?,
            out_weight,
            out_bias,
            attention_bytes: cfg.chunking.attention_bytes,
        })
    }

    /// (B, C, H, W) -> (B, C, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let dt = gemm_dtype(x);
        // (B, H·W, C) as a transposed view of the normed x: the product reads it in place.
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .to_dtype(dt)?
            .transpose(1, 2)?;
        // Rows [from, from + n) of the stacked projections, applied to every token.
        let weight = self.qkv_weight.to_dtype(dt)?;
        let project = |tokens: &Tensor, from: usize, n: usize| {
            tokens.matmul(&weight.narrow(0, from, n)?.broadcast_left(b)?.t()?)
        };
        let q_bias = self.q_bias.to_dtype(dt)?;
        let f32_kernel =
            x.dtype() == DType::F32 && klein_kernels::flash_attention_f32_applies(x.device(), c);
        let o = if f32_kernel {
            // One product for all three; the kernel reads k and v in place, rows 3C apart.
            let qkv = project(&tokens, 0, 3 * c)?;
            drop(tokens);
            let q = qkv.narrow(2, 0, c)?.broadcast_add(&q_bias)?;
            let (k, v) = (qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?);
            let head = |t: &Tensor| t.unsqueeze(1);
            klein_kernels::flash_attention(&head(&q)?, &head(&k)?, &head(&v)?)?
        } else {
            // The composition's products take contiguous q, k and v: one product each.
            let own = |t: Tensor| t.to_dtype(x.dtype());
            let q = own(project(&tokens, 0, c)?.broadcast_add(&q_bias)?)?;
            let (k, v) = (
                own(project(&tokens, c, c)?)?,
                own(project(&tokens, 2 * c, c)?)?,
            );
            drop(tokens);
            chunked_attention(&q, &k, &v, self.attention_bytes)?
        };
        // W_out · oᵀ: (B, C, H·W), the NCHW layout, with o read transposed in place.
        let out_weight = self.out_weight.to_dtype(dt)?.broadcast_left(b)?;
        let y = out_weight
            .matmul(&o.to_dtype(dt)?.transpose(1, 2)?)?
            .to_dtype(x.dtype())?
            .reshape((b, c, h, w))?;
        drop(o);
        let ones = Tensor::ones((b, c), DType::F32, x.device())?;
        let bias = self
            .out_bias
            .unsqueeze(0)?
            .broadcast_as((b, c))?
            .contiguous()?;
        klein_kernels::channel_affine(&y, &ones, &bias, false)? + x
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn chunked_attention_equals_the_full_matrix() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 37, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 37, 16), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 37, 16), &dev).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.25).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&v)
            .unwrap();
        for max_bytes in [u64::MAX, 1, 2 * 2 * 37 * 4 * 5] {
            let got = chunked_attention(&q, &k, &v, max_bytes).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(
                diff.to_scalar::<f32>().unwrap() < 1e-5,
                "max_bytes {max_bytes}"
            );
        }
        assert_eq!(query_rows(1, 16384, 256 << 20), 2048);
    }
}
