//! What the service knows about each configured model without touching its weights: request
//! limits, the shape the admission estimate needs, and its Info entry.

use std::collections::HashMap;

use candle_core::DType;
use klein_kernels::quant::ggml_name;
use klein_proto::pb;
use klein_runtime::models::ModelStatus;

use crate::{
    config::{Config, LoraSpec, ModelEntry},
    error::DenoiseError,
    model::Config as ModelConfig,
    validate::{MAX_STEPS, RequestContext, TEXT_TOKENS},
    weights::Checkpoint,
};

/// Steps and guidance scale a model runs with when the request leaves them unset (spec §1.1).
pub fn defaults(distilled: bool) -> (u32, f32) {
    if distilled { (4, 1.0) } else { (50, 4.0) }
}

/// The LoRA adapters merged into the model, `PATH:SCALE` each, comma-separated; empty for
/// none.
fn loras(specs: &[LoraSpec]) -> String {
    let specs: Vec<String> = specs
        .iter()
        .map(|s| format!("{}:{}", s.path.display(), s.scale))
        .collect();
    specs.join(",")
}

/// The names of the entry's adapters, sorted.
fn adapter_names(entry: &ModelEntry) -> Vec<String> {
    let mut names: Vec<String> = entry.adapters.iter().map(|a| a.name.clone()).collect();
    names.sort();
    names
}

/// The projections a GGUF checkpoint stores quantized, counted by block type
/// (`q4k:100,q6k:12`); empty for a dense checkpoint.
fn stored_blocks(cfg: &ModelConfig) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for (_, _, format) in cfg.stored_projections() {
        *counts.entry(ggml_name(format)).or_insert(0) += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(f, n)| format!("{f}:{n}")).collect();
    counts.join(",")
}

/// `klein-4b`, `klein-base-9b`, ... for the released shapes; `custom` for any other.
pub fn variant(cfg: &ModelConfig, distilled: bool) -> String {
    let size = match (cfg.num_layers, cfg.num_single_layers, cfg.hidden_size()) {
        (5, 20, 3072) => "4b",
        (8, 24, 4096) => "9b",
        _ => return "custom".into(),
    };
    if distilled {
        format!("klein-{size}")
    } else {
        format!("klein-base-{size}")
    }
}

/// One configured model.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// Request limits and shape, for validation.
    pub context: RequestContext,
    /// The transformer configuration, for the admission estimate.
    pub config: ModelConfig,
    /// The static part of its Info entry.
    pub info: pb::ModelInfo,
}

impl ServedModel {
    /// The model `entry` names, found at `checkpoint`.
    pub fn new(
        entry: &ModelEntry,
        checkpoint: &Checkpoint,
        dtype: DType,
        config: &Config,
    ) -> Result<Self, DenoiseError> {
        let is_distilled = entry
            .is_distilled
            .or(checkpoint.is_distilled)
            .ok_or_else(|| {
                DenoiseError::Config(format!(
                    "{}: no model_index.json says whether the model is distilled; set is_distilled",
                    entry.path.display()
                ))
            })?;
        let model_id = entry
            .id
            .clone()
            .unwrap_or_else(|| checkpoint.model_id.clone());
        let c = &checkpoint.config;
        let details: HashMap<String, String> = [
            ("hidden_size", c.hidden_size().to_string()),
            ("num_layers", c.num_layers.to_string()),
            ("num_single_layers", c.num_single_layers.to_string()),
            ("num_attention_heads", c.num_attention_heads.to_string()),
            ("joint_attention_dim", c.joint_attention_dim.to_string()),
            ("is_distilled", is_distilled.to_string()),
            ("checkpoint_format", checkpoint.format.as_str().into()),
            ("quantize", c.quantize.to_string()),
            ("lora", loras(&entry.lora)),
            ("stored_blocks", stored_blocks(c)),
            ("max_steps", MAX_STEPS.to_string()),
            ("text_tokens", TEXT_TOKENS.to_string()),
            ("max_references", config.max_references.to_string()),
            (
                "attention_chunk_bytes",
                config.attention_chunk_bytes.0.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let (default_steps, default_guidance_scale) = defaults(is_distilled);
        let info = pb::ModelInfo {
            id: model_id.clone(),
            variant: variant(c, is_distilled),
            distilled: is_distilled,
            default_steps,
            default_guidance_scale,
            text_encoder: entry.text_encoder.clone().unwrap_or_default(),
            weight_bytes: checkpoint.weight_bytes(dtype),
            details,
            adapters: adapter_names(entry),
            ..Default::default()
        };
        let context = RequestContext {
            model_id,
            is_distilled,
            context_dim: c.joint_attention_dim,
            channels: c.in_channels,
            max_batch: config.max_batch as usize,
            max_image_side: config.max_image_side as usize,
            max_image_pixels: config.max_image_pixels,
            max_references: config.max_references as usize,
            adapters: adapter_names(entry),
        };
        Ok(Self {
            context,
            config: c.clone(),
            info,
        })
    }

    /// The Info entry with the registry's view of residency.
    pub fn info(&self, status: Option<&ModelStatus>) -> pb::ModelInfo {
        let mut info = self.info.clone();
        if let Some(s) = status {
            s.fill(&mut info);
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_shapes_are_named_and_others_are_custom() {
        let mut cfg: ModelConfig = serde_json::from_value(serde_json::json!({
            "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
            "attention_head_dim": 128, "joint_attention_dim": 7680, "in_channels": 128,
            "axes_dims_rope": [32, 32, 32, 32]
        }))
        .unwrap();
        assert_eq!(variant(&cfg, true), "klein-4b");
        assert_eq!(variant(&cfg, false), "klein-base-4b");
        cfg.num_layers = 8;
        cfg.num_single_layers = 24;
        cfg.num_attention_heads = 32;
        assert_eq!(variant(&cfg, true), "klein-9b");
        cfg.num_layers = 2;
        assert_eq!(variant(&cfg, true), "custom");
        assert_eq!(defaults(true), (4, 1.0));
        assert_eq!(defaults(false), (50, 4.0));
    }
}
