//! The mid-block self-attention (diffusers `Attention` with `AttnProcessor2_0`, one head of
//! width C, spec §1.4): `x + to_out(softmax(q kᵀ / √C) v)` over the H·W positions, with
//! `q, k, v = to_q/to_k/to_v(group_norm(x))` (linear layers with bias).
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

use super::{Config, config::NORM_EPS, layers::Linear, norm::GroupNorm};

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

/// Single-head spatial self-attention with a residual connection.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    attention_bytes: u64,
}

impl Attention {
    pub fn new(cfg: &Config, channels: usize, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(cfg, channels, NORM_EPS, vb.pp("group_norm"))?,
            to_q: Linear::new(channels, channels, vb.pp("to_q"))?,
            to_k: Linear::new(channels, channels, vb.pp("to_k"))?,
            to_v: Linear::new(channels, channels, vb.pp("to_v"))?,
            to_out: Linear::new(channels, channels, vb.pp("to_out").pp("0"))?,
            attention_bytes: cfg.chunking.attention_bytes,
        })
    }

    /// (B, C, H, W) -> (B, C, H, W)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        drop(tokens);
        let f32_kernel =
            q.dtype() == DType::F32 && klein_kernels::flash_attention_f32_applies(x.device(), c);
        let mut o = if f32_kernel {
            let head = |t: &Tensor| t.unsqueeze(1);
            klein_kernels::flash_attention(&head(&q)?, &head(&k)?, &head(&v)?)?
        } else {
            chunked_attention(&q, &k, &v, self.attention_bytes)?
        };
        drop((q, k, v));
        o = self.to_out.forward(&o)?;
        o.transpose(1, 2)?.reshape((b, c, h, w))? + x
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
