//! Qwen3 as the FLUX.2 [klein] text encoder (spec §1.3, §3.5, pitfalls 8, 10, 11).
//!
//! Reference: transformers 5.24.0 `Qwen3ForCausalLM`
//! (<https://github.com/huggingface/transformers/blob/v5.24.0/src/transformers/models/qwen3/modeling_qwen3.py>)
//! as diffusers 0.42.1 `Flux2KleinPipeline._get_qwen3_prompt_embeds` drives it.
//!
//! Only `model.embed_tokens` and the first 27 decoder layers run. The output is the residual
//! stream after decoder layers 9, 18 and 27 (transformers `hidden_states[9|18|27]`: the output
//! of 0-based layers 8, 17, 26, before the final `model.norm`), concatenated on the feature
//! axis in that order: (B, L, 3·hidden). The attention mask is causal plus key padding; the
//! positions are 0..L whatever the mask, so padding rows see every real token before them.
//!
//! Numerics follow torch op by op: RMSNorm normalises in f32 and rounds to the model dtype
//! before the gain; the RoPE cos/sin are computed in f32 and rounded to the model dtype, with
//! rotate-half pairs (i, i + head_dim/2) and theta 1e6; attention scores and the softmax run in
//! f32; SiLU is evaluated in f32. On CUDA in bf16 the norms, RoPE, attention and SwiGLU run as
//! `klein_kernels` fused kernels with the same roundings; elsewhere as their compositions.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use klein_kernels::RopeStyle;
use serde::Deserialize;

use super::{
    quant::{Embedding, Linear},
    weights::Weights,
};

/// transformers `hidden_states` indices the pipeline stacks (index k = output of layer k - 1).
pub const HIDDEN_STATE_LAYERS: [usize; 3] = [9, 18, 27];

/// Decoder layers that run: up to the last stacked hidden state.
pub const LAYERS_RUN: usize = HIDDEN_STATE_LAYERS[2];

/// A RoPE description (`rope_parameters` in transformers 5 configs, `rope_scaling` before).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    /// `default` is the only type Qwen3 uses; anything else is refused.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// RoPE base.
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `text_encoder/config.json` (`Qwen3Config`); the keys this encoder reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Absent in some configs: then hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 key; 5.x writes `rope_parameters.rope_theta`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_hidden_act() -> String {
    "silu".into()
}

impl Config {
    /// Qwen3-4B, the klein-4B text encoder (spec §1.3).
    pub fn qwen3_4b() -> Self {
        Self::sized(2560, 9728)
    }

    /// Qwen3-8B, the klein-9B text encoder (spec §1.3).
    pub fn qwen3_8b() -> Self {
        Self::sized(4096, 12288)
    }

    fn sized(hidden_size: usize, intermediate_size: usize) -> Self {
        Self {
            vocab_size: 151_936,
            hidden_size,
            intermediate_size,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: Some(128),
            rms_norm_eps: 1e-6,
            rope_theta: Some(1_000_000.0),
            rope_parameters: None,
            rope_scaling: None,
            attention_bias: false,
            use_sliding_window: false,
            hidden_act: default_hidden_act(),
        }
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base: `rope_parameters.rope_theta`, else `rope_theta`, else Qwen3Config's 10 000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Width of the output features: the three stacked hidden states.
    pub fn output_dim(&self) -> usize {
        HIDDEN_STATE_LAYERS.len() * self.hidden_size
    }

    /// Refuses configurations this encoder does not implement.
    pub fn validate(&self) -> Result<()> {
        let fail = |what: String| {
            Err(candle_core::Error::msg(format!(
                "text encoder config: {what}"
            )))
        };
        if self.num_hidden_layers < LAYERS_RUN {
            return fail(format!(
                "{} layers, the pipeline reads hidden state {LAYERS_RUN}",
                self.num_hidden_layers
            ));
        }
        let (h, kv, hd) = (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim(),
        );
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            return fail(format!(
                "{h} query heads are not a multiple of {kv} key/value heads"
            ));
        }
        if hd == 0 || !hd.is_multiple_of(2) {
            return fail(format!("head_dim {hd} must be even"));
        }
        if self.hidden_act != "silu" {
            return fail(format!("hidden_act {:?} (only silu)", self.hidden_act));
        }
        if self.attention_bias {
            return fail("attention_bias is not supported".into());
        }
        if self.use_sliding_window {
            return fail("sliding-window attention is not supported".into());
        }
        for p in [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
        {
            if let Some(kind) = p.rope_type.as_deref().filter(|k| *k != "default") {
                return fail(format!("rope type {kind:?} (only default)"));
            }
        }
        Ok(())
    }
}

// ==================== helpers ====================

/// RoPE tables cos, sin: (L, head_dim/2) f32 holding values rounded to `dtype`. Angles
/// `pos · θ^(-2i/head_dim)` are computed in f32 as transformers' default RoPE does.
fn rope_tables(
    cfg: &Config,
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let theta = cfg.rope_theta() as f32;
    let inv_freq: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / hd as f32))
        .collect();
    let angles: Vec<f32> = (0..len)
        .flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f))
        .collect();
    let table = |f: fn(f32) -> f32| {
        let v: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
        Tensor::from_vec(v, (len, hd / 2), device)?
            .to_dtype(dtype)?
            .to_dtype(DType::F32)
    };
    Ok((table(f32::cos)?, table(f32::sin)?))
}

// ==================== blocks ====================

/// `weight ⊙ dtype(f32(x) · rsqrt(mean(f32(x)²) + eps))` over the last axis.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: Weights<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.norm(size)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        klein_kernels::rms_norm(x, &self.weight, self.eps)
    }

    /// Per-head norm and rotate-half RoPE: projection (B, L, heads·hd) → (B, heads, L, hd).
    fn forward_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
        klein_kernels::qk_norm_rope(
            x,
            &self.weight,
            cos,
            sin,
            heads,
            0,
            self.eps,
            RopeStyle::RotateHalf,
        )
    }
}

/// Grouped-query self-attention with per-head QK RMSNorm and rotate-half RoPE.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, vb: Weights<'_>) -> Result<Self> {
        let (h, kv, hd, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim(),
            cfg.hidden_size,
        );
        Ok(Self {
            q_proj: vb.pp("q_proj").linear(d, h * hd)?,
            k_proj: vb.pp("k_proj").linear(d, kv * hd)?,
            v_proj: vb.pp("v_proj").linear(d, kv * hd)?,
            o_proj: vb.pp("o_proj").linear(h * hd, d)?,
            q_norm: RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: RmsNorm::new(hd, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
        })
    }

    /// x: (B, L, hidden); cos, sin: (L, head_dim/2); mask: (B, L) u32, 1 = token, 0 = padding
    /// -> (B, L, hidden). Causal plus key padding; query heads j·n_rep .. (j+1)·n_rep share
    /// key/value head j (transformers `repeat_kv`).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let (h, kv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self
            .q_norm
            .forward_rope(&self.q_proj.forward(x)?, cos, sin, h)?;
        let k = self
            .k_norm
            .forward_rope(&self.k_proj.forward(x)?, cos, sin, kv)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, l, kv, hd))?
            .transpose(1, 2)?;
        let out = klein_kernels::masked_attention(&q, &k, &v, mask, true)?;
        self.o_proj.forward(&out)
    }
}

/// SwiGLU MLP: `down_proj(silu(gate_proj(x)) ⊙ up_proj(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Config, vb: Weights<'_>) -> Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: vb.pp("gate_proj").linear(d, i)?,
            up_proj: vb.pp("up_proj").linear(d, i)?,
            down_proj: vb.pp("down_proj").linear(i, d)?,
        })
    }

    /// (B, L, hidden) -> (B, L, hidden).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let act = klein_kernels::swiglu(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&act)
    }
}

/// Pre-norm decoder layer: `x += attn(norm(x)); x += mlp(norm(x))`.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &Config, vb: Weights<'_>) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        Ok(Self {
            input_layernorm: RmsNorm::new(cfg.hidden_size, eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                cfg.hidden_size,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    /// (B, L, hidden) -> (B, L, hidden).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + mlp
    }
}

// ==================== model ====================

/// The text encoder: embeddings and decoder layers 0..27 of `Qwen3Model`.
#[derive(Debug)]
pub struct TextEncoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    cfg: Config,
    dtype: DType,
    device: Device,
}

impl TextEncoder {
    /// Loads `model.embed_tokens` and `model.layers.0..27` from `vb`.
    pub fn new(cfg: &Config, vb: Weights<'_>) -> Result<Self> {
        cfg.validate()?;
        let model = vb.pp("model");
        let embed_tokens = model
            .pp("embed_tokens")
            .embedding(cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..LAYERS_RUN)
            .map(|i| DecoderLayer::new(cfg, model.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Compute dtype (also the dtype of the output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the weights; inputs must live there.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// input_ids: (B, L) u32; attention_mask: (B, L) u32, 1 = token, 0 = padding
    /// -> (B, L, 3·hidden): `[hidden_states[9] | hidden_states[18] | hidden_states[27]]`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (_, l) = input_ids.dims2()?;
        if attention_mask.dims() != input_ids.dims() {
            candle_core::bail!(
                "attention_mask {:?} does not match input_ids {:?}",
                attention_mask.shape(),
                input_ids.shape()
            )
        }
        let (cos, sin) = rope_tables(&self.cfg, l, self.dtype, &self.device)?;
        let mut x = self.embed_tokens.forward(input_ids)?;
        let mut states = Vec::with_capacity(HIDDEN_STATE_LAYERS.len());
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &cos, &sin, attention_mask)?;
            if HIDDEN_STATE_LAYERS.contains(&(i + 1)) {
                states.push(x.clone());
            }
        }
        Tensor::cat(&states, D::Minus1)
    }
}
