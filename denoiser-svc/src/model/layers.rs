//! Small building blocks of the FLUX.2 transformer, each rounding like torch (spec §7.1). The
//! arithmetic lives in `klein_kernels`: a fused CUDA kernel on the GPU in bf16, the stock-candle
//! composition elsewhere.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{
    embeddings::Rope,
    projection::{MapFn, MapProjections, Projection, projection},
    transformer::Config,
};

/// Per-head QK `RMSNorm(head_dim)` (`dtype(x · rsqrt(mean(x²) + eps)) ⊙ w`), applied together
/// with the interleaved RoPE that follows it.
#[derive(Debug, Clone)]
pub struct QkNorm {
    weight: Tensor,
    eps: f64,
}

impl QkNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    /// Projection columns (B, S, H·hd) → normed and rotated heads (B, H, S, hd); token `s`
    /// takes RoPE row `rope_offset + s` (the text tokens come first in the joint sequence).
    pub fn forward_rope(
        &self,
        xs: &Tensor,
        rope: &Rope,
        heads: usize,
        rope_offset: usize,
    ) -> Result<Tensor> {
        klein_kernels::qk_norm_rope(
            xs,
            &self.weight,
            &rope.cos,
            &rope.sin,
            heads,
            rope_offset,
            self.eps,
            klein_kernels::RopeStyle::Interleaved,
        )
    }

    /// The norm's weight (hd), as the attention takes a second stream's
    /// ([`klein_kernels::flash_attention_split_v_norm_q`]).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// This norm and RoPE rows `rope_offset..` as the attention takes them for its queries
    /// ([`klein_kernels::flash_attention_with_swiglu_norm_q`],
    /// [`klein_kernels::flash_attention_split_v_norm_q`]).
    pub fn query(&self, rope: &Rope, rope_offset: usize) -> klein_kernels::QNorm {
        klein_kernels::QNorm {
            weight: self.weight.clone(),
            cos: rope.cos.clone(),
            sin: rope.sin.clone(),
            rope_offset,
            eps: self.eps,
        }
    }

    /// The double-stream blocks' joint `[txt; img]`: `xs` (B, L, H·hd) normed by this weight,
    /// `img_xs` (B, N, H·hd) by `img_norm`'s, rotated with RoPE rows 0.. and L.. →
    /// (B, H, L + N, hd), written in one pass where the kernel applies.
    pub fn forward_joint_rope(
        &self,
        xs: &Tensor,
        img_norm: &QkNorm,
        img_xs: &Tensor,
        rope: &Rope,
        heads: usize,
    ) -> Result<Tensor> {
        klein_kernels::qk_norm_rope_joint(
            (xs, &self.weight),
            (img_xs, &img_norm.weight),
            &rope.cos,
            &rope.sin,
            heads,
            self.eps,
        )
    }
}

/// `Flux2FeedForward`: `linear_out(silu(u[:F]) ⊙ u[F:])`, `u = linear_in(x)` — the gate is the
/// FIRST half.
#[derive(Debug, Clone)]
pub struct FeedForward {
    linear_in: Projection,
    linear_out: Projection,
}

impl FeedForward {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let (d, f) = (cfg.hidden_size(), cfg.mlp_hidden());
        Ok(Self {
            linear_in: projection(cfg, &[vb.pp("linear_in")], (2 * f, d))?,
            linear_out: projection(cfg, &[vb.pp("linear_out")], (d, f))?,
        })
    }
}

impl MapProjections for FeedForward {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            linear_in: f(&self.linear_in)?,
            linear_out: f(&self.linear_out)?,
        })
    }
}

impl Module for FeedForward {
    /// (B, S, D) → (B, S, D)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let u = self.linear_in.forward(xs)?;
        let f = u.dim(D::Minus1)? / 2;
        let (gate, up) = (u.narrow(D::Minus1, 0, f)?, u.narrow(D::Minus1, f, f)?);
        self.linear_out.forward(&klein_kernels::swiglu(&gate, &up)?)
    }
}
