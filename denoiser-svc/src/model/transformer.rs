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

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;
use klein_kernels::{
    StoredBlocks,
    quant::{Quantize, stored_bytes},
    reference::silu,
};
use serde::Deserialize;

use super::{
    attention::AttentionConfig,
    blocks::{
        AdaLayerNormContinuous, Flux2Modulation, Flux2SingleTransformerBlock,
        Flux2TimestepGuidanceEmbeddings, Flux2TransformerBlock, Stream,
    },
    embeddings::{PositionId, Rope, rope},
    projection::{MapFn, MapProjections, Projection, linear, map_all},
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
    /// Load-time quantization of the blocks' projections (the attention's q/k/v and output,
    /// the MLPs, the single blocks' fused projections: 96 % of klein-9B's weights); the
    /// embedders, modulations and output layers stay in the model dtype. A runtime setting.
    #[serde(skip)]
    pub quantize: Quantize,
    /// The projections a checkpoint stores in ggml blocks (a GGUF file): used as stored,
    /// whatever [`Self::quantize`] says, which then applies to the projections stored dense.
    #[serde(skip)]
    pub stored: Option<StoredBlocks>,
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
            quantize: Quantize::None,
            stored: None,
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
        let (d, hd) = (self.hidden_size() as u64, self.attention_head_dim as u64);
        let projections: u64 = self
            .projections()
            .iter()
            .map(|&(count, rows, width)| (count * rows * width) as u64)
            .sum();
        // QK norms: four per double block, two per single block.
        let norms = (4 * self.num_layers as u64 + 2 * self.num_single_layers as u64) * hd;
        let modulation = 15 * d * d;
        let time = self.timestep_guidance_channels as u64 * d + d * d;
        let embed = (self.in_channels as u64 + self.joint_attention_dim as u64) * d;
        let out = 2 * d * d + d * self.out_channels() as u64;
        projections + norms + modulation + time + embed + out
    }

    /// The blocks' projections as (count, rows, width): the weights [`Self::quantize`] applies
    /// to, stacked as the model holds them.
    pub fn projections(&self) -> [(usize, usize, usize); 6] {
        let (d, f) = (self.hidden_size(), self.mlp_hidden());
        let (double, single) = (self.num_layers, self.num_single_layers);
        [
            (2 * double, 3 * d, d),     // to_qkv, add_qkv_proj
            (2 * double, d, d),         // to_out, to_add_out
            (2 * double, 2 * f, d),     // ff and ff_context linear_in
            (2 * double, d, f),         // ff and ff_context linear_out
            (single, 3 * d + 2 * f, d), // to_qkv_mlp_proj
            (single, d, d + f),         // to_out
        ]
    }

    /// Device bytes of the weights in `dtype`, the projections in their quantized blocks.
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        let e = dtype.size_in_bytes() as u64;
        let as_dense = self.param_count() * e;
        let loaded =
            self.projections()
                .into_iter()
                .fold(as_dense, |bytes, (count, rows, width)| {
                    let n = (count * rows * width) as u64;
                    bytes - n * e + self.projection_bytes(n, width, e)
                });
        self.stored_projections()
            .fold(loaded, |bytes, (rows, width, format)| {
                let n = (rows * width) as u64;
                bytes - self.projection_bytes(n, width, e) + stored_bytes(format, n as usize) as u64
            })
    }

    /// Bytes of `n` projection weights in rows of `width` as loaded from a dense checkpoint:
    /// in [`Self::quantize`]'s blocks where they apply, else `e` bytes each.
    fn projection_bytes(&self, n: u64, width: usize, e: u64) -> u64 {
        match self.quantize.format().and_then(|f| f.for_width(width)) {
            Some(f) => n / f.block_size() as u64 * f.ggml().type_size() as u64,
            None => n * e,
        }
    }

    /// (rows, width, type) of the projections [`Self::stored`] holds in blocks.
    pub fn stored_projections(&self) -> impl Iterator<Item = (usize, usize, GgmlDType)> {
        self.stored.iter().flat_map(|s| s.0.stored())
    }

    /// Every quantized projection as (elements, block type): the dense weights its products
    /// dequantize, one at a time.
    pub fn quantized_projections(&self) -> Vec<(usize, GgmlDType)> {
        let loaded = self.quantize.format().into_iter().flat_map(|format| {
            self.projections()
                .into_iter()
                .filter_map(move |(_, rows, width)| {
                    Some((rows * width, format.for_width(width)?.ggml()))
                })
        });
        let stored = self
            .stored_projections()
            .map(|(rows, width, format)| (rows * width, format));
        loaded.chain(stored).collect()
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
    x_embedder: Projection,
    context_embedder: Projection,
    transformer_blocks: Vec<Flux2TransformerBlock>,
    single_transformer_blocks: Vec<Flux2SingleTransformerBlock>,
    norm_out: AdaLayerNormContinuous,
    proj_out: Projection,
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
            x_embedder: linear(cfg.in_channels, d, vb.pp("x_embedder"))?,
            context_embedder: linear(cfg.joint_attention_dim, d, vb.pp("context_embedder"))?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| Flux2TransformerBlock::new(cfg, blocks.pp(i)))
                .collect::<Result<_>>()?,
            single_transformer_blocks: (0..cfg.num_single_layers)
                .map(|i| Flux2SingleTransformerBlock::new(cfg, singles.pp(i)))
                .collect::<Result<_>>()?,
            norm_out: AdaLayerNormContinuous::new(cfg, vb.pp("norm_out"))?,
            proj_out: linear(d, cfg.out_channels(), vb.pp("proj_out"))?,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Every linear layer, in the model's order (each a copy sharing its weights).
    pub fn projections(&self) -> Result<Vec<Projection>> {
        let mut all = Vec::new();
        self.map_projections(&mut |p| {
            all.push(p.clone());
            Ok(p.clone())
        })?;
        Ok(all)
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
        let n = hidden_states.dim(1)?;
        self.forward_first(hidden_states, encoder_hidden_states, timesteps, rope, n)
    }

    /// [`Self::forward`]'s velocity for the first `outputs` tokens of `hidden_states` alone,
    /// (B, outputs, 128): the noisy tokens, whose references the sampler does not step. The
    /// last single block computes only those rows' queries, MLP and output, every token's keys
    /// and values (the text rows' and references' outputs are discarded by the model anyway).
    pub fn forward_first(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timesteps: &[f32],
        rope: &Rope,
        outputs: usize,
    ) -> Result<Tensor> {
        let features =
            self.timestep_features(timesteps, hidden_states.dtype(), hidden_states.device())?;
        self.forward_features(
            hidden_states,
            encoder_hidden_states,
            &features,
            rope,
            outputs,
        )
    }

    /// The timesteps' sinusoidal features (B, 256) in `dtype` on `dev`, computed on the host:
    /// what [`Self::forward_features`] takes for the timesteps.
    pub fn timestep_features(
        &self,
        timesteps: &[f32],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        self.time_guidance_embed.features(timesteps, dtype, dev)
    }

    /// [`Self::forward_first`] with the timesteps as [`Self::timestep_features`]: every input a
    /// device tensor, so the forward queues device work alone (a CUDA graph can capture it).
    pub fn forward_features(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_features: &Tensor,
        rope: &Rope,
        outputs: usize,
    ) -> Result<Tensor> {
        let n = hidden_states.dim(1)?;
        if outputs == 0 || outputs > n {
            bail!("the velocity of {outputs} of {n} tokens asked for");
        }
        let temb = self.time_guidance_embed.forward(timestep_features)?;
        let silu_temb = silu(&temb)?;
        let mod_img = self.double_stream_modulation_img.forward(&silu_temb)?;
        let mod_txt = self.double_stream_modulation_txt.forward(&silu_temb)?;
        let mod_single = self.single_stream_modulation.forward(&silu_temb)?;

        let mut img = Stream::new(self.x_embedder.forward(hidden_states)?);
        let mut txt = Stream::new(self.context_embedder.forward(encoder_hidden_states)?);
        let doubles = self.transformer_blocks.len();
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            (img, txt) = block.forward(&img, &txt, &mod_img, &mod_txt, rope, i + 1 < doubles)?;
        }
        let txt_len = txt.x.dim(1)?;
        let mut x = Stream::new(Tensor::cat(&[txt.x, img.x], 1)?);
        let img = match self.single_transformer_blocks.split_last() {
            Some((last, blocks)) => {
                for block in blocks {
                    x = block.forward(&x, &mod_single, rope, true)?;
                }
                last.forward_rows(&x, &mod_single, rope, txt_len, outputs)?
            }
            None => x.x.narrow(1, txt_len, outputs)?,
        };
        self.proj_out
            .forward(&self.norm_out.forward(&img, &silu_temb)?)
    }
}

impl MapProjections for Flux2Transformer2DModel {
    fn map_projections(&self, f: MapFn<'_>) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            time_guidance_embed: self.time_guidance_embed.map_projections(f)?,
            double_stream_modulation_img: self.double_stream_modulation_img.map_projections(f)?,
            double_stream_modulation_txt: self.double_stream_modulation_txt.map_projections(f)?,
            single_stream_modulation: self.single_stream_modulation.map_projections(f)?,
            x_embedder: f(&self.x_embedder)?,
            context_embedder: f(&self.context_embedder)?,
            transformer_blocks: map_all(&self.transformer_blocks, f)?,
            single_transformer_blocks: map_all(&self.single_transformer_blocks, f)?,
            norm_out: self.norm_out.map_projections(f)?,
            proj_out: f(&self.proj_out)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use klein_kernels::quant::QuantFormat;

    use super::*;

    #[test]
    fn param_counts_match_the_spec() {
        assert_eq!(Config::klein_4b().param_count(), 3_875_544_576);
        assert_eq!(Config::klein_9b().param_count(), 9_078_581_248);
    }

    #[test]
    fn projections_are_the_blocks_weights_and_quantize_to_their_blocks() {
        for cfg in [Config::klein_4b(), Config::klein_9b()] {
            let (d, f) = (cfg.hidden_size() as u64, cfg.mlp_hidden() as u64);
            let blocks = cfg.num_layers as u64 * (8 * d * d + 6 * f * d)
                + cfg.num_single_layers as u64 * ((3 * d + 2 * f) * d + (d + f) * d);
            let counted: u64 = cfg
                .projections()
                .iter()
                .map(|&(c, r, w)| (c * r * w) as u64)
                .sum();
            assert_eq!(counted, blocks);
            let dense = cfg.weight_bytes(DType::BF16);
            assert_eq!(dense, cfg.param_count() * 2);
            let q4k = Config {
                quantize: Quantize::Format(QuantFormat::Q4K),
                ..cfg.clone()
            };
            // 144 bytes per 256 weights in the projections, 2 per weight elsewhere.
            assert_eq!(
                q4k.weight_bytes(DType::BF16),
                dense - 2 * blocks + blocks / 256 * 144
            );
        }
        let nine = Config {
            quantize: Quantize::Format(QuantFormat::Q4K),
            ..Config::klein_9b()
        };
        let widest = nine
            .quantized_projections()
            .into_iter()
            .max_by_key(|&(n, _)| n);
        assert_eq!(widest, Some((36864 * 4096, GgmlDType::Q4K)));
        assert!(Config::klein_9b().quantized_projections().is_empty());
    }

    /// Stored projections count in their stored blocks; `quantize` still applies to the
    /// others.
    #[test]
    fn stored_projections_count_in_their_blocks() {
        use std::sync::Arc;

        use klein_kernels::BlockSource;

        /// klein-4B's single blocks' fused projections stored in Q8_0.
        struct Linear1;
        impl BlockSource for Linear1 {
            fn blocks(&self, _: &str) -> Result<Option<klein_kernels::quant::StoredRows<'_>>> {
                Ok(None)
            }
            fn stored(&self) -> Vec<(usize, usize, GgmlDType)> {
                vec![(27648, 3072, GgmlDType::Q8_0); 20]
            }
        }
        let dense = Config::klein_4b();
        let stored = Config {
            stored: Some(StoredBlocks(Arc::new(Linear1))),
            ..dense.clone()
        };
        let n = 20 * 27648 * 3072;
        let (bf16, q8) = (2 * n, n / 32 * 34);
        let dense_bytes = dense.weight_bytes(DType::BF16);
        assert_eq!(stored.weight_bytes(DType::BF16), dense_bytes - bf16 + q8);
        let both = Config {
            quantize: Quantize::Format(QuantFormat::Q4K),
            ..stored.clone()
        };
        let q4k = Config {
            quantize: Quantize::Format(QuantFormat::Q4K),
            ..dense
        };
        let q4k_linear1 = n / 256 * 144;
        assert_eq!(
            both.weight_bytes(DType::BF16),
            q4k.weight_bytes(DType::BF16) - q4k_linear1 + q8
        );
        assert_eq!(stored.quantized_projections().len(), 20);
        assert_eq!(stored, stored.clone());
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
