//! The blocks of `Flux2Transformer2DModel` (spec §2.2–§2.8), bottom-up: timestep embedding,
//! shared modulation, double-stream attention and block, single-stream attention and block,
//! and the adaptive output norm.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use klein_kernels::{
    gate_residual, gate_residual_norm, layer_norm_modulate, reference::silu, swiglu,
};

use super::{
    attention::attention,
    embeddings::{Rope, timestep_features},
    layers::{FeedForward, QkNorm},
    projection::{MapFn, MapProjections, Projection, linear, projection},
    transformer::Config,
};

/// `time_guidance_embed.timestep_embedder`: Linear(256, D) → SiLU → Linear(D, D).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Projection,
    linear_2: Projection,
}

impl TimestepEmbedding {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.hidden_size();
        Ok(Self {
            linear_1: linear(cfg.timestep_guidance_channels, d, vb.pp("linear_1"))?,
            linear_2: linear(d, d, vb.pp("linear_2"))?,
        })
    }

    /// (B, 256) → (B, D)
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(xs)?)?)
    }
}

impl MapProjections for TimestepEmbedding {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            linear_1: f(&self.linear_1)?,
            linear_2: f(&self.linear_2)?,
        })
    }
}

/// `time_guidance_embed` (klein: timestep only, no guidance embedder).
#[derive(Debug, Clone)]
pub struct Flux2TimestepGuidanceEmbeddings {
    timestep_embedder: TimestepEmbedding,
    channels: usize,
}

impl Flux2TimestepGuidanceEmbeddings {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            timestep_embedder: TimestepEmbedding::new(cfg, vb.pp("timestep_embedder"))?,
            channels: cfg.timestep_guidance_channels,
        })
    }

    /// The sinusoidal features (`time_proj`, B × channels, on `dev` in `dtype`) of the
    /// pipeline timesteps `t = σ·1000`, one per batch item: computed on the host.
    pub fn features(
        &self,
        timesteps: &[f32],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        timestep_features(timesteps, self.channels, dtype, dev)
    }

    /// `temb` (B, D) of [`Self::features`].
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        self.timestep_embedder.forward(features)
    }
}

impl MapProjections for Flux2TimestepGuidanceEmbeddings {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            timestep_embedder: self.timestep_embedder.map_projections(f)?,
            channels: self.channels,
        })
    }
}

/// `double_stream_modulation_{img,txt}` / `single_stream_modulation`: Linear(silu(temb)). Every
/// modulation and `norm_out` take the same silu(temb): the model computes it once and passes it.
#[derive(Debug, Clone)]
pub struct Flux2Modulation {
    linear: Projection,
    sets: usize,
}

impl Flux2Modulation {
    /// `sets` = 2 for the double-stream modulations (6D), 1 for the single-stream one (3D).
    pub fn new(cfg: &Config, sets: usize, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.hidden_size();
        Ok(Self {
            linear: linear(d, 3 * sets * d, vb.pp("linear"))?,
            sets,
        })
    }

    /// silu(temb) (B, D) → `3·sets` chunks of (B, 1, D), in the order (shift, scale, gate) per
    /// set.
    pub fn forward(&self, silu_temb: &Tensor) -> Result<Vec<Tensor>> {
        let mods = self.linear.forward(silu_temb)?.unsqueeze(1)?;
        mods.chunk(3 * self.sets, D::Minus1)
    }
}

impl MapProjections for Flux2Modulation {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            linear: f(&self.linear)?,
            sets: self.sets,
        })
    }
}

/// One (shift, scale, gate) modulation set, each (B, 1, D).
pub struct Mod<'a> {
    shift: &'a Tensor,
    scale: &'a Tensor,
    gate: &'a Tensor,
}

impl<'a> Mod<'a> {
    pub fn set(chunks: &'a [Tensor], index: usize) -> Self {
        Self {
            shift: &chunks[3 * index],
            scale: &chunks[3 * index + 1],
            gate: &chunks[3 * index + 2],
        }
    }
}

/// A residual stream between blocks: `x` and, where the block before computed it together with
/// its last residual, `normed`: the next block's attention norm of x (the blocks of one kind
/// share their modulation, so the block before knows it).
pub struct Stream {
    pub x: Tensor,
    normed: Option<Tensor>,
}

impl Stream {
    pub fn new(x: Tensor) -> Self {
        Self { x, normed: None }
    }

    /// `(1 + scale) ⊙ LayerNorm(x) + shift` with `m`'s shift and scale: the norm the block
    /// before made, else computed now.
    fn norm(&self, m: &Mod<'_>, eps: f64) -> Result<Tensor> {
        match &self.normed {
            Some(n) => Ok(n.clone()),
            None => layer_norm_modulate(&self.x, m.shift, m.scale, eps),
        }
    }
}

/// `x + gate ⊙ y` as a stream; with `next`, also the norm of the result under `next`'s shift
/// and scale, in the same pass.
fn residual(
    x: &Tensor,
    y: &Tensor,
    gate: &Tensor,
    next: Option<&Mod<'_>>,
    eps: f64,
) -> Result<Stream> {
    Ok(match next {
        Some(m) => {
            let (x, n) = gate_residual_norm(x, y, gate, m.shift, m.scale, eps)?;
            Stream { x, normed: Some(n) }
        }
        None => Stream::new(gate_residual(x, y, gate)?),
    })
}

/// Columns `col..col + D` of a contiguous (B, S, C) projection as heads (B, H, S, hd): a strided
/// view, no copy (the flash kernel reads it in place; the fallback path copies). `col` and C are
/// multiples of hd.
fn heads(x: &Tensor, col: usize, cfg: &Config) -> Result<Tensor> {
    let (b, s, c) = x.dims3()?;
    let hd = cfg.attention_head_dim;
    x.contiguous()?
        .reshape((b, s, c / hd, hd))?
        .narrow(2, col / hd, cfg.num_attention_heads)?
        .transpose(1, 2)
}

/// `transformer_blocks.{i}.attn` (`Flux2Attention`): separate image and text projections.
/// Each stream's q, k and v projections (`to_q`, `to_k`, `to_v`; `add_q_proj`, `add_k_proj`,
/// `add_v_proj`) are stacked into one (3D, D) weight at load: one GEMM per stream. The joint
/// norm + RoPE kernel reads the k columns of both in place, and the attention reads the text
/// then the image q and v columns in place, normalising and rotating the queries itself
/// ([`klein_kernels::flash_attention_split_v_norm_q`]).
#[derive(Debug, Clone)]
pub struct Flux2Attention {
    /// `to_q`, `to_k`, `to_v`.
    to_qkv: Projection,
    to_out: Projection,
    norm_q: QkNorm,
    norm_k: QkNorm,
    /// `add_q_proj`, `add_k_proj`, `add_v_proj`.
    add_qkv_proj: Projection,
    to_add_out: Projection,
    norm_added_q: QkNorm,
    norm_added_k: QkNorm,
    cfg: Config,
}

impl Flux2Attention {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let (d, hd, eps) = (cfg.hidden_size(), cfg.attention_head_dim, cfg.eps);
        Ok(Self {
            to_qkv: projection(cfg, &[vb.pp("to_q"), vb.pp("to_k"), vb.pp("to_v")], (d, d))?,
            to_out: projection(cfg, &[vb.pp("to_out").pp("0")], (d, d))?,
            norm_q: QkNorm::new(hd, eps, vb.pp("norm_q"))?,
            norm_k: QkNorm::new(hd, eps, vb.pp("norm_k"))?,
            add_qkv_proj: projection(
                cfg,
                &[
                    vb.pp("add_q_proj"),
                    vb.pp("add_k_proj"),
                    vb.pp("add_v_proj"),
                ],
                (d, d),
            )?,
            to_add_out: projection(cfg, &[vb.pp("to_add_out")], (d, d))?,
            norm_added_q: QkNorm::new(hd, eps, vb.pp("norm_added_q"))?,
            norm_added_k: QkNorm::new(hd, eps, vb.pp("norm_added_k"))?,
            cfg: cfg.clone(),
        })
    }

    /// Joint attention over `[txt; img]`; returns (img (B, N, D), txt (B, L, D)).
    pub fn forward(&self, img: &Tensor, txt: &Tensor, rope: &Rope) -> Result<(Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (d, h, txt_len) = (cfg.hidden_size(), cfg.num_attention_heads, txt.dim(1)?);
        let (p_txt, p_img) = (self.add_qkv_proj.forward(txt)?, self.to_qkv.forward(img)?);
        let cols = |p: &Tensor, i: usize| p.narrow(D::Minus1, i * d, d);
        // Joint sequence [txt; img]: the image tokens take RoPE rows after the text's. Columns
        // `i` of both projections, each normed by its stream's weight.
        let joint_rope = |i: usize, txt_norm: &QkNorm, img_norm: &QkNorm| {
            txt_norm.forward_joint_rope(&cols(&p_txt, i)?, img_norm, &cols(&p_img, i)?, rope, h)
        };
        let k = joint_rope(1, &self.norm_added_k, &self.norm_k)?;
        let (v_txt, v_img) = (heads(&p_txt, 2 * d, cfg)?, heads(&p_img, 2 * d, cfg)?);
        // The kernel applies each stream's q norm and RoPE itself.
        let o = if klein_kernels::flash_attention_fused(&k) {
            klein_kernels::flash_attention_split_v_norm_q(
                &cols(&p_txt, 0)?,
                &self.norm_added_q.query(rope, 0),
                &cols(&p_img, 0)?,
                self.norm_q.weight(),
                &k,
                &v_txt,
                &v_img,
            )?
        } else {
            let q = joint_rope(0, &self.norm_added_q, &self.norm_q)?;
            attention(&q, &k, &Tensor::cat(&[v_txt, v_img], 2)?, &cfg.attention)?
        };
        let total = o.dim(1)?;
        let o_txt = o.narrow(1, 0, txt_len)?;
        let o_img = o.narrow(1, txt_len, total - txt_len)?;
        Ok((
            self.to_out.forward(&o_img)?,
            self.to_add_out.forward(&o_txt)?,
        ))
    }
}

impl MapProjections for Flux2Attention {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            to_qkv: f(&self.to_qkv)?,
            to_out: f(&self.to_out)?,
            add_qkv_proj: f(&self.add_qkv_proj)?,
            to_add_out: f(&self.to_add_out)?,
            ..self.clone()
        })
    }
}

/// `transformer_blocks.{i}` (`Flux2TransformerBlock`, §2.6).
#[derive(Debug, Clone)]
pub struct Flux2TransformerBlock {
    /// LayerNorm eps (no affine) of the adaptive norms.
    eps: f64,
    attn: Flux2Attention,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl Flux2TransformerBlock {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            eps: cfg.eps,
            attn: Flux2Attention::new(cfg, vb.pp("attn"))?,
            ff: FeedForward::new(cfg, vb.pp("ff"))?,
            ff_context: FeedForward::new(cfg, vb.pp("ff_context"))?,
        })
    }

    /// img (B, N, D), txt (B, L, D) → updated (img, txt). With `next_block`, another double
    /// block follows: its attention norms come out with the streams.
    pub fn forward(
        &self,
        img: &Stream,
        txt: &Stream,
        mod_img: &[Tensor],
        mod_txt: &[Tensor],
        rope: &Rope,
        next_block: bool,
    ) -> Result<(Stream, Stream)> {
        let (msa, mlp) = (Mod::set(mod_img, 0), Mod::set(mod_img, 1));
        let (c_msa, c_mlp) = (Mod::set(mod_txt, 0), Mod::set(mod_txt, 1));

        let eps = self.eps;
        let (o_img, o_txt) =
            self.attn
                .forward(&img.norm(&msa, eps)?, &txt.norm(&c_msa, eps)?, rope)?;

        let (img, m_img) = gate_residual_norm(&img.x, &o_img, msa.gate, mlp.shift, mlp.scale, eps)?;
        let next = next_block.then_some(&msa);
        let img = residual(&img, &self.ff.forward(&m_img)?, mlp.gate, next, eps)?;

        let (txt, m_txt) =
            gate_residual_norm(&txt.x, &o_txt, c_msa.gate, c_mlp.shift, c_mlp.scale, eps)?;
        let next = next_block.then_some(&c_msa);
        let txt = residual(
            &txt,
            &self.ff_context.forward(&m_txt)?,
            c_mlp.gate,
            next,
            eps,
        )?;
        Ok((img, txt))
    }
}

impl MapProjections for Flux2TransformerBlock {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            eps: self.eps,
            attn: self.attn.map_projections(f)?,
            ff: self.ff.map_projections(f)?,
            ff_context: self.ff_context.map_projections(f)?,
        })
    }
}

/// `single_transformer_blocks.{i}.attn` (`Flux2ParallelSelfAttention`).
#[derive(Debug, Clone)]
pub struct Flux2ParallelSelfAttention {
    to_qkv_mlp_proj: Projection,
    to_out: Projection,
    norm_q: QkNorm,
    norm_k: QkNorm,
    cfg: Config,
}

impl Flux2ParallelSelfAttention {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let (d, f, hd) = (cfg.hidden_size(), cfg.mlp_hidden(), cfg.attention_head_dim);
        Ok(Self {
            to_qkv_mlp_proj: projection(cfg, &[vb.pp("to_qkv_mlp_proj")], (3 * d + 2 * f, d))?,
            to_out: projection(cfg, &[vb.pp("to_out")], (d, d + f))?,
            norm_q: QkNorm::new(hd, cfg.eps, vb.pp("norm_q"))?,
            norm_k: QkNorm::new(hd, cfg.eps, vb.pp("norm_k"))?,
            cfg: cfg.clone(),
        })
    }

    /// (B, S, D) → (B, S, D): attention and the SwiGLU MLP from one projection.
    pub fn forward(&self, x: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (d, f) = (self.cfg.hidden_size(), self.cfg.mlp_hidden());
        let p = self.to_qkv_mlp_proj.forward(x)?;
        let cols = |start, len| p.narrow(D::Minus1, start, len);
        let (q, k, v) = (cols(0, d)?, cols(d, d)?, heads(&p, 2 * d, &self.cfg)?);
        let (gate, up) = (cols(3 * d, f)?, cols(3 * d + f, f)?);
        self.attend(&q, 0, &k, &v, (&gate, &up), rope)
    }

    /// [`Self::forward`] for x's rows `start..start + len` alone: every row's keys and
    /// values, only those rows' queries, MLP and output (the last block, whose other rows the
    /// model discards). The projection runs as three products over views of its weight
    /// (q and the MLP over the rows, k and v over all of x), each the same columns of the
    /// whole projection. → (B, len, D)
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rope: &Rope,
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        let (d, f) = (self.cfg.hidden_size(), self.cfg.mlp_hidden());
        let parts = self
            .to_qkv_mlp_proj
            .split_rows(x.dtype(), &[d, 2 * d, 2 * f])?;
        let [to_q, to_kv, to_mlp] = &parts[..] else {
            unreachable!("three parts were asked for")
        };
        let rows = x.narrow(1, start, len)?;
        let (q, kv, mlp) = (
            to_q.forward(&rows)?,
            to_kv.forward(x)?,
            to_mlp.forward(&rows)?,
        );
        let (k, v) = (kv.narrow(D::Minus1, 0, d)?, heads(&kv, d, &self.cfg)?);
        let (gate, up) = (mlp.narrow(D::Minus1, 0, f)?, mlp.narrow(D::Minus1, f, f)?);
        self.attend(&q, start, &k, &v, (&gate, &up), rope)
    }

    /// `to_out([attention | SwiGLU(gate, up)])` for the queries q (B, S_q, D), raw projection
    /// columns taking RoPE rows `rope_offset..`, over the raw keys k (B, S, D) and the values
    /// v (B, H, S, hd). `to_out` reads [attention | MLP]: the kernels write both halves of one
    /// buffer, and the attention applies `norm_q` and RoPE to q itself.
    fn attend(
        &self,
        q: &Tensor,
        rope_offset: usize,
        k: &Tensor,
        v: &Tensor,
        (gate, up): (&Tensor, &Tensor),
        rope: &Rope,
    ) -> Result<Tensor> {
        let h = self.cfg.num_attention_heads;
        let k = self.norm_k.forward_rope(k, rope, h, 0)?;
        let joint = if klein_kernels::flash_attention_fused(&k) {
            klein_kernels::flash_attention_with_swiglu_norm_q(
                q,
                &self.norm_q.query(rope, rope_offset),
                &k,
                v,
                gate,
                up,
            )?
        } else {
            let q = self.norm_q.forward_rope(q, rope, h, rope_offset)?;
            let o = attention(&q, &k, v, &self.cfg.attention)?;
            Tensor::cat(&[o, swiglu(gate, up)?], D::Minus1)?
        };
        self.to_out.forward(&joint)
    }
}

impl MapProjections for Flux2ParallelSelfAttention {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            to_qkv_mlp_proj: f(&self.to_qkv_mlp_proj)?,
            to_out: f(&self.to_out)?,
            ..self.clone()
        })
    }
}

/// `single_transformer_blocks.{i}` (`Flux2SingleTransformerBlock`, §2.7).
#[derive(Debug, Clone)]
pub struct Flux2SingleTransformerBlock {
    /// LayerNorm eps (no affine) of the adaptive norm.
    eps: f64,
    attn: Flux2ParallelSelfAttention,
}

impl Flux2SingleTransformerBlock {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            eps: cfg.eps,
            attn: Flux2ParallelSelfAttention::new(cfg, vb.pp("attn"))?,
        })
    }

    /// x = [txt; img] (B, S, D) → (B, S, D). With `next_block`, another single block follows:
    /// its attention norm comes out with the stream.
    pub fn forward(
        &self,
        x: &Stream,
        mods: &[Tensor],
        rope: &Rope,
        next_block: bool,
    ) -> Result<Stream> {
        let m = Mod::set(mods, 0);
        let y = self.attn.forward(&x.norm(&m, self.eps)?, rope)?;
        residual(&x.x, &y, m.gate, next_block.then_some(&m), self.eps)
    }

    /// [`Self::forward`]'s rows `start..start + len` of the result alone, (B, len, D), for the
    /// last block ([`Flux2ParallelSelfAttention::forward_rows`]).
    pub fn forward_rows(
        &self,
        x: &Stream,
        mods: &[Tensor],
        rope: &Rope,
        start: usize,
        len: usize,
    ) -> Result<Tensor> {
        let m = Mod::set(mods, 0);
        let y = self
            .attn
            .forward_rows(&x.norm(&m, self.eps)?, rope, start, len)?;
        gate_residual(&x.x.narrow(1, start, len)?, &y, m.gate)
    }
}

impl MapProjections for Flux2SingleTransformerBlock {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            eps: self.eps,
            attn: self.attn.map_projections(f)?,
        })
    }
}

/// `norm_out` (`AdaLayerNormContinuous`): rows [0:D] are the SCALE, [D:2D] the SHIFT.
#[derive(Debug, Clone)]
pub struct AdaLayerNormContinuous {
    linear: Projection,
    /// LayerNorm eps (no affine).
    eps: f64,
}

impl AdaLayerNormContinuous {
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.hidden_size();
        Ok(Self {
            linear: linear(d, 2 * d, vb.pp("linear"))?,
            eps: cfg.eps,
        })
    }

    /// x (B, N, D), silu(temb) (B, D) → (B, N, D)
    pub fn forward(&self, x: &Tensor, silu_temb: &Tensor) -> Result<Tensor> {
        let e = self.linear.forward(silu_temb)?.unsqueeze(1)?;
        let chunks = e.chunk(2, D::Minus1)?;
        layer_norm_modulate(x, &chunks[1], &chunks[0], self.eps)
    }
}

impl MapProjections for AdaLayerNormContinuous {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            linear: f(&self.linear)?,
            eps: self.eps,
        })
    }
}
