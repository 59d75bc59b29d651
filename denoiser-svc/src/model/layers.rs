//! Small building blocks of the FLUX.2 transformer, each rounding like torch (spec §7.1):
//! computed in f32 internally, rounded once to the model dtype.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear_no_bias};

use super::transformer::Config;

/// SiLU computed in f32 and rounded once to the input dtype (torch's `F.silu` on bf16).
pub fn silu(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F32 | DType::F64 => xs.silu(),
        dtype => xs.to_dtype(DType::F32)?.silu()?.to_dtype(dtype),
    }
}

/// `(1 + scale) ⊙ x + shift`, one rounding per op in the model dtype. `shift`/`scale`
/// (B, 1, D) broadcast over the sequence of `x` (B, S, D).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    (scale + 1.0)?.broadcast_mul(x)?.broadcast_add(shift)
}

/// `nn.LayerNorm(D, elementwise_affine=False, eps)` over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    eps: f64,
}

impl LayerNorm {
    pub fn new(eps: f64) -> Self {
        Self { eps }
    }

    /// (.., D) → (.., D), normalised in f32, rounded once.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dim = xs.dim(D::Minus1)?;
        let ones = Tensor::ones(dim, xs.dtype(), xs.device())?;
        let zeros = Tensor::zeros(dim, xs.dtype(), xs.device())?;
        candle_nn::ops::layer_norm(&xs.contiguous()?, &ones, &zeros, self.eps as f32)
    }
}

/// Per-head QK `RMSNorm(head_dim)`: `dtype(x · rsqrt(mean(x²) + eps)) ⊙ w` — the normalised
/// value is rounded before the weight multiply, as torch's composite `rms_norm`.
#[derive(Debug, Clone)]
pub struct QkNorm {
    weight: Tensor,
    ones: Tensor,
    eps: f32,
}

impl QkNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        let weight = vb.get(dim, "weight")?;
        let ones = Tensor::ones(dim, weight.dtype(), weight.device())?;
        Ok(Self {
            weight,
            ones,
            eps: eps as f32,
        })
    }

    /// (B, S, H, hd) → (B, S, H, hd)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.contiguous()?, &self.ones, self.eps)?
            .broadcast_mul(&self.weight)
    }
}

/// `Flux2FeedForward`: `linear_out(silu(u[:F]) ⊙ u[F:])`, `u = linear_in(x)` — the gate is the
/// FIRST half.
#[derive(Debug, Clone)]
pub struct FeedForward {
    linear_in: Linear,
    linear_out: Linear,
}

impl FeedForward {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let (d, f) = (cfg.hidden_size(), cfg.mlp_hidden());
        Ok(Self {
            linear_in: linear_no_bias(d, 2 * f, vb.pp("linear_in"))?,
            linear_out: linear_no_bias(f, d, vb.pp("linear_out"))?,
        })
    }
}

impl Module for FeedForward {
    /// (B, S, D) → (B, S, D)
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let u = self.linear_in.forward(xs)?;
        let f = u.dim(D::Minus1)? / 2;
        let hidden = (silu(&u.narrow(D::Minus1, 0, f)?)? * u.narrow(D::Minus1, f, f)?)?;
        self.linear_out.forward(&hidden)
    }
}
