//! `Flux2Transformer2DModel`: the FLUX.2 [klein] flow transformer (spec §2).
//!
//! Reference: diffusers 0.42.1 `models/transformers/transformer_flux2.py`
//! (huggingface/diffusers@58eb52c, identical math). Shared timestep modulation for every block,
//! `num_layers` double-stream blocks (separate image and text weights, joint attention with the
//! text first), `num_single_layers` single-stream blocks (one fused qkv + MLP projection), an
//! adaptive output norm with the (scale, shift) order, and 4-axis interleaved RoPE. No biases.
//!
//! Every elementwise op runs in the model dtype and rounds after each op, as torch does
//! (spec §7.1); norms, softmax and RoPE compute in f32 internally.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use klein_kernels::{Linear, linear_no_bias};
use serde::Deserialize;

use super::{
    attention::AttentionConfig,
    blocks::{
        AdaLayerNormContinuous, Flux2Modulation, Flux2SingleTransformerBlock,
        Flux2TimestepGuidanceEmbeddings, Flux2TransformerBlock, Stream,
    },
    embeddings::{PositionId, Rope, rope},
};

/// `transformer/config.json` (the keys diffusers writes for klein; §1.2).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    #[serde(default = "default_timestep_channels")]
    pub timestep_guidance_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_axes_dims_rope")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub guidance_embeds: bool,
    /// How attention is computed: a runtime setting, not part of `config.json`.
    #[serde(skip)]
    pub attention: AttentionConfig,
}

fn default_patch_size() -> usize {
    1
}
fn default_in_channels() -> usize {
    128
}
fn default_timestep_channels() -> usize {
    256
}
fn default_mlp_ratio() -> f64 {
    3.0
}
fn default_axes_dims_rope() -> Vec<usize> {
    vec![32; 4]
}
fn default_rope_theta() -> f64 {
    2000.0
}
fn default_eps() -> f64 {
    1e-6
}

impl Config {
    /// FLUX.2 [klein] 4B (and klein-base-4B).
    pub fn klein_4b() -> Self {
        Self {
            patch_size: 1,
            in_channels: 128,
            out_channels: None,
            num_layers: 5,
            num_single_layers: 20,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 7680,
            timestep_guidance_channels: 256,
            mlp_ratio: 3.0,
            axes_dims_rope: vec![32; 4],
            rope_theta: 2000.0,
            eps: 1e-6,
            guidance_embeds: false,
            attention: AttentionConfig::default(),
        }
    }

    /// FLUX.2 [klein] 9B (and klein-base-9B).
    pub fn klein_9b() -> Self {
        Self {
            num_layers: 8,
            num_single_layers: 24,
            num_attention_heads: 32,
            joint_attention_dim: 12288,
            ..Self::klein_4b()
        }
    }

    /// Hidden size `D = heads * head_dim`.
    pub fn hidden_size(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// MLP hidden size `F = D * mlp_ratio`.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size() as f64 * self.mlp_ratio) as usize
    }

    /// Output channels (`out_channels`, else `in_channels`).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Number of weights (§6.1), for weight-memory accounting.
    pub fn param_count(&self) -> u64 {
        let (d, f, hd) = (
            self.hidden_size() as u64,
            self.mlp_hidden() as u64,
            self.attention_head_dim as u64,
        );
        let double = 8 * d * d + 2 * (2 * f * d + f * d) + 4 * hd;
        let single = (3 * d + 2 * f) * d + (d + f) * d + 2 * hd;
        let modulation = 15 * d * d;
        let time = self.timestep_guidance_channels as u64 * d + d * d;
        let embed = (self.in_channels as u64 + self.joint_attention_dim as u64) * d;
        let out = 2 * d * d + d * self.out_channels() as u64;
        self.num_layers as u64 * double
            + self.num_single_layers as u64 * single
            + modulation
            + time
            + embed
            + out
    }

    /// Rejects configurations this implementation does not run.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.guidance_embeds {
            return Err("guidance_embeds=true: FLUX.2 [klein] has no guidance embedder".into());
        }
        if self.patch_size != 1 {
            return Err(format!("patch_size {} (klein uses 1)", self.patch_size));
        }
        if self.out_channels() != self.in_channels {
            return Err("out_channels must equal in_channels".into());
        }
        let rope_dims: usize = self.axes_dims_rope.iter().sum();
        if rope_dims != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(format!(
                "axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            ));
        }
        Ok(())
    }
}

/// The whole transformer (§2.9).
#[derive(Debug, Clone)]
pub struct Flux2Transformer2DModel {
    cfg: Config,
    time_guidance_embed: Flux2TimestepGuidanceEmbeddings,
    double_stream_modulation_img: Flux2Modulation,
    double_stream_modulation_txt: Flux2Modulation,
    single_stream_modulation: Flux2Modulation,
    x_embedder: Linear,
    context_embedder: Linear,
    transformer_blocks: Vec<Flux2TransformerBlock>,
    single_transformer_blocks: Vec<Flux2SingleTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Linear,
}

impl Flux2Transformer2DModel {
    /// Builds the model from diffusers-named weights (BFL files go through [`super::bfl`]).
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let d = cfg.hidden_size();
        let blocks = vb.pp("transformer_blocks");
        let singles = vb.pp("single_transformer_blocks");
        Ok(Self {
            cfg: cfg.clone(),
            time_guidance_embed: Flux2TimestepGuidanceEmbeddings::new(
                cfg,
                vb.pp("time_guidance_embed"),
            )?,
            double_stream_modulation_img: Flux2Modulation::new(
                cfg,
                2,
                vb.pp("double_stream_modulation_img"),
            )?,
            double_stream_modulation_txt: Flux2Modulation::new(
                cfg,
                2,
                vb.pp("double_stream_modulation_txt"),
            )?,
            single_stream_modulation: Flux2Modulation::new(
                cfg,
                1,
                vb.pp("single_stream_modulation"),
            )?,
            x_embedder: linear_no_bias(cfg.in_channels, d, vb.pp("x_embedder"))?,
            context_embedder: linear_no_bias(
                cfg.joint_attention_dim,
                d,
                vb.pp("context_embedder"),
            )?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| Flux2TransformerBlock::new(cfg, blocks.pp(i)))
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..cfg.num_single_layers)
                .map(|i| Flux2SingleTransformerBlock::new(cfg, singles.pp(i)))
                .collect::<Result<_>>()?,
            norm_out: AdaLayerNormContinuous::new(cfg, vb.pp("norm_out"))?,
            proj_out: linear_no_bias(d, cfg.out_channels(), vb.pp("proj_out"))?,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// RoPE tables for the token sequence `[txt_ids; img_ids]` (text first, §2.5).
    pub fn rope(&self, ids: &[PositionId], dev: &candle_core::Device) -> Result<Rope> {
        rope(ids, &self.cfg.axes_dims_rope, self.cfg.rope_theta, dev)
    }

    /// One forward (§2.9).
    ///
    /// - `hidden_states` (B, N, 128): noisy tokens, then any clean reference tokens;
    /// - `encoder_hidden_states` (B, L, joint_attention_dim): prompt embeddings;
    /// - `timesteps`: the pipeline's `t = σ·1000` per batch item (f32); the model rounds it to
    ///   τ exactly as diffusers does for the weights' dtype;
    /// - `rope`: tables for `[txt (L); hidden_states (N)]` from [`Self::rope`].
    ///
    /// Returns the velocity for every token of `hidden_states`, (B, N, 128).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timesteps: &[f32],
        rope: &Rope,
    ) -> Result<Tensor> {
        let dtype = hidden_states.dtype();
        let temb = self
            .time_guidance_embed
            .forward(timesteps, dtype, hidden_states.device())?;
        let mod_img = self.double_stream_modulation_img.forward(&temb)?;
        let mod_txt = self.double_stream_modulation_txt.forward(&temb)?;
        let mod_single = self.single_stream_modulation.forward(&temb)?;

        let mut img = Stream::new(self.x_embedder.forward(hidden_states)?);
        let mut txt = Stream::new(self.context_embedder.forward(encoder_hidden_states)?);
        let doubles = self.transformer_blocks.len();
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            (img, txt) = block.forward(&img, &txt, &mod_img, &mod_txt, rope, i + 1 < doubles)?;
        }
        let txt_len = txt.x.dim(1)?;
        let mut x = Stream::new(Tensor::cat(&[txt.x, img.x], 1)?);
        let singles = self.single_transformer_blocks.len();
        for (i, block) in self.single_transformer_blocks.iter().enumerate() {
            x = block.forward(&x, &mod_single, rope, i + 1 < singles)?;
        }
        let x = x.x;
        let img = x.narrow(1, txt_len, x.dim(1)? - txt_len)?;
        self.proj_out.forward(&self.norm_out.forward(&img, &temb)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_counts_match_the_spec() {
        assert_eq!(Config::klein_4b().param_count(), 3_875_544_576);
        assert_eq!(Config::klein_9b().param_count(), 9_078_581_248);
    }

    #[test]
    fn config_reads_diffusers_json_and_refuses_guidance_embeds() {
        let json = r#"{"num_layers":5,"num_single_layers":20,"attention_head_dim":128,
            "num_attention_heads":24,"joint_attention_dim":7680,"out_channels":null,
            "guidance_embeds":false}"#;
        let cfg: Config = serde_json::from_str(json).unwrap();
        assert_eq!(cfg, Config::klein_4b());
        assert!(cfg.validate().is_ok());
        let bad = Config {
            guidance_embeds: true,
            ..cfg
        };
        assert!(bad.validate().unwrap_err().contains("guidance"));
    }
}
