//! The transformer's linear layers as the checkpoint names them ([`Projection`]): dense or
//! block-quantized weights (`klein_kernels::Linear`), the diffusers names stacked into each, and
//! the unmerged LoRA terms a request's adapters add (`crate::lora`). [`MapProjections`] walks
//! a model's layers, which is how a request's view of the resident model is built.

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use klein_kernels::{Linear, stacked_linear};

use super::transformer::Config;

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
            // A part is no checkpoint weight of its own: it is not adapted again.
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
