//! Small building blocks of the FLUX.2 transformer, each rounding like torch (spec §7.1). The
//! arithmetic lives in `klein_kernels`: a fused CUDA kernel on the GPU in bf16, the stock-candle
//! composition elsewhere.

use std::sync::Arc;

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use klein_kernels::{Linear, stacked_linear};

use super::{embeddings::Rope, transformer::Config};

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

/// A linear layer of the checkpoint: the weights stacked into it, by diffusers name in order
/// ([`Part`]), and the unmerged LoRA terms of a request's adapters ([`LowRank`]), each added
/// to the layer's product as PEFT adds an unfused adapter's `B(A x)·scale`.
#[derive(Debug, Clone)]
pub struct Projection {
    linear: Linear,
    parts: Arc<[Part]>,
    low_rank: Vec<LowRank>,
}

/// One checkpoint weight stacked into a [`Projection`]: its name (`….weight`) and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
}

/// One adapter's unmerged term of a layer, `up((down x) · scale)`: `down` (R, K) and `up`
/// (N, R) in the layer's dtype, the adapter's own scale already in `up`, `scale` the request's.
#[derive(Debug, Clone)]
pub struct LowRank {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

impl LowRank {
    /// `(down x) · scale`, the rank-wide input of `up`.
    fn inner(&self, x: &Tensor) -> Result<Tensor> {
        Linear::new(self.down.clone()).forward(x)? * self.scale
    }

    /// The term, plus `acc` when given (summed in the `up` product's epilogue on cuBLASLt).
    fn forward(&self, x: &Tensor, acc: Option<&Tensor>) -> Result<Tensor> {
        let up = Linear::new(self.up.clone());
        match acc {
            Some(acc) => up.forward_add(&self.inner(x)?, acc),
            None => up.forward(&self.inner(x)?),
        }
    }
}

impl Projection {
    fn new(linear: Linear, parts: Vec<Part>) -> Self {
        Self {
            linear,
            parts: parts.into(),
            low_rank: Vec::new(),
        }
    }

    /// The checkpoint weights stacked into the layer, in its rows' order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The layer with `terms` in place of its LoRA terms (the weights shared).
    pub fn with_low_rank(&self, terms: Vec<LowRank>) -> Self {
        Self {
            low_rank: terms,
            ..self.clone()
        }
    }

    /// The layer cut along its output rows ([`Linear::split_rows`]), each part with its rows
    /// of every LoRA term.
    pub fn split_rows(&self, dtype: DType, rows: &[usize]) -> Result<Vec<Projection>> {
        let mut start = 0;
        let mut out = Vec::with_capacity(rows.len());
        for (linear, &len) in self.linear.split_rows(dtype, rows)?.into_iter().zip(rows) {
            let terms = self
                .low_rank
                .iter()
                .map(|t| {
                    Ok(LowRank {
                        up: t.up.narrow(0, start, len)?,
                        ..t.clone()
                    })
                })
                .collect::<Result<_>>()?;
            start += len;
            out.push(Projection {
                linear,
                parts: Arc::new([]),
                low_rank: terms,
            });
        }
        Ok(out)
    }
}

impl Module for Projection {
    /// The product, plus the LoRA terms: summed among themselves, then read by the layer's
    /// product as its addend ([`Linear::forward_add`]), so no pass over the output adds them.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut terms: Option<Tensor> = None;
        for t in &self.low_rank {
            terms = Some(t.forward(x, terms.as_ref())?);
        }
        match terms {
            Some(terms) => self.linear.forward_add(x, &terms),
            None => self.linear.forward(x),
        }
    }
}

/// A block projection: the (`out`, `in`) weights under `vbs` stacked into one layer, in the
/// blocks the checkpoint stores them in ([`Config::stored`]), else quantized when the
/// configuration says so ([`Config::quantize`]).
pub fn projection(
    cfg: &Config,
    vbs: &[VarBuilder<'_>],
    shape: (usize, usize),
) -> Result<Projection> {
    let parts = vbs
        .iter()
        .map(|vb| Part {
            name: format!("{}.weight", vb.prefix()),
            rows: shape.0,
            cols: shape.1,
        })
        .collect();
    let linear = stacked_linear(vbs, shape, cfg.quantize, cfg.stored.as_ref())?;
    Ok(Projection::new(linear, parts))
}

/// A dense layer of (`out`, `in`) weights under `vb` (never quantized).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder<'_>) -> Result<Projection> {
    let part = Part {
        name: format!("{}.weight", vb.prefix()),
        rows: out_dim,
        cols: in_dim,
    };
    let linear = klein_kernels::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Projection::new(linear, vec![part]))
}

/// What [`MapProjections`] asks of each layer: its replacement.
pub type MapFn<'a> = &'a mut dyn FnMut(&Projection) -> Result<Projection>;

/// Every [`Projection`] of a model part replaced by `f`'s answer for it, in a copy that shares
/// everything else: how a request's adapters become a view of the resident model.
pub trait MapProjections: Sized {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self>;
}

/// `f` over a list of model parts.
pub fn map_all<T: MapProjections>(items: &[T], f: MapFn<'_>) -> Result<Vec<T>> {
    items.iter().map(|i| i.map_projections(f)).collect()
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
