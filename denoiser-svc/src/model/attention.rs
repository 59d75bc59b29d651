//! Attention of the FLUX.2 transformer.
//!
//! `softmax(q kᵀ / √hd) v` over every token (no mask: all text tokens, padding included, are
//! keys, §2.6). On a CUDA device in bf16 the flash kernel of `klein_kernels` computes it without
//! the score matrix. Elsewhere it is computed in f32 and rounded once to the model dtype, with
//! queries processed in chunks so that the f32 score block `(B, H, chunk, S_kv)` never exceeds
//! [`AttentionConfig::max_score_bytes`]: a 1024² image (4608 tokens, 24 heads) would otherwise
//! need 2 GiB of scores per layer.

use candle_core::{DType, Result, Tensor};

/// How attention is computed where the flash kernel does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Largest f32 score block materialised at once, bytes (at least one query row is always
    /// processed, whatever this says).
    pub max_score_bytes: usize,
}

impl Default for AttentionConfig {
    /// 256 MiB of scores.
    fn default() -> Self {
        Self {
            max_score_bytes: 256 << 20,
        }
    }
}

impl AttentionConfig {
    /// Query rows per chunk for `batch_heads` (B·H) rows of `kv_len` keys.
    pub fn query_chunk(&self, batch_heads: usize, kv_len: usize) -> usize {
        let row_bytes = batch_heads.max(1) * kv_len.max(1) * DType::F32.size_in_bytes();
        (self.max_score_bytes / row_bytes).max(1)
    }
}

/// Scaled dot-product attention without a mask.
/// q (B, H, S_q, hd), k and v (B, H, S_kv, hd) → (B, S_q, H·hd) in q's dtype, heads merged.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttentionConfig) -> Result<Tensor> {
    if klein_kernels::flash_attention_fused(q) {
        return klein_kernels::flash_attention(q, k, v);
    }
    let (b, h, s_q, hd) = q.dims4()?;
    let dtype = q.dtype();
    let s_kv = k.dim(2)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let q = q.to_dtype(DType::F32)?;
    let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let chunk = cfg.query_chunk(b * h, s_kv);
    let mut outs = Vec::with_capacity(s_q.div_ceil(chunk));
    let mut start = 0;
    while start < s_q {
        let len = chunk.min(s_q - start);
        let qc = q.narrow(2, start, len)?.contiguous()?;
        let scores = (qc.matmul(&kt)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?
        .reshape((b, s_q, h * hd))?
        .to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let hd = q.dim(3).unwrap() as f64;
        let s = (q.matmul(&k.t().unwrap()).unwrap() / hd.sqrt()).unwrap();
        candle_nn::ops::softmax_last_dim(&s)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    #[test]
    fn chunked_attention_matches_the_naive_one() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 41, 16), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 41, 16), &dev).unwrap();
        // 7 query rows per chunk: 2*3*41*4 bytes per row.
        let cfg = AttentionConfig {
            max_score_bytes: 7 * 2 * 3 * 41 * 4,
        };
        assert_eq!(cfg.query_chunk(6, 41), 7);
        let got = attention(&q, &k, &v, &cfg).unwrap();
        let want = naive(&q, &k, &v)
            .transpose(1, 2)
            .unwrap()
            .reshape((2, 37, 3 * 16))
            .unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
