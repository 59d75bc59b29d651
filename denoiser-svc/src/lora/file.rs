//! Reading an adapter file: its layout from the key prefixes, each module's A, B and alpha,
//! and its scale (kohya's `alpha`, PEFT's metadata, or 1).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use candle_core::{DType, Device, Tensor};

use super::{Adapter, LoraError, Update};

/// The file's layout, from its key prefixes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Diffusers,
    AiToolkit,
    Kohya,
}

const PREFIXES: [(&str, Layout); 4] = [
    ("transformer.", Layout::Diffusers),
    ("diffusion_model.", Layout::AiToolkit),
    ("base_model.model.", Layout::AiToolkit),
    ("lora_unet_", Layout::Kohya),
];

/// A module's tensors as read.
#[derive(Default)]
struct Pieces {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f32>,
}

/// What a key holds.
enum Part {
    Down,
    Up,
    Alpha,
}

const SUFFIXES: [(&str, Part); 5] = [
    (".lora_A.weight", Part::Down),
    (".lora_down.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_up.weight", Part::Up),
    (".alpha", Part::Alpha),
];

pub(super) fn read_adapter(
    path: &Path,
    user_scale: f32,
) -> std::result::Result<Adapter, LoraError> {
    let invalid = |reason: String| LoraError {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| invalid(e.to_string()))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
    let metadata = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lora_adapter_metadata"))
        .map(|json| PeftConfig::parse(json))
        .transpose()
        .map_err(invalid)?;
    if metadata.as_ref().is_some_and(|m| m.use_dora) {
        return Err(invalid("DoRA adapters (use_dora) are not supported".into()));
    }
    let mut parts: BTreeMap<String, Pieces> = BTreeMap::new();
    let mut layout = None;
    for (key, t) in tensors {
        let unsupported = || {
            invalid(format!(
                "unsupported key `{key}` (LoRA A/B or down/up and alpha only)"
            ))
        };
        let (rest, l) = PREFIXES
            .iter()
            .find_map(|&(p, l)| key.strip_prefix(p).map(|rest| (rest, l)))
            .ok_or_else(unsupported)?;
        if *layout.get_or_insert(l) != l {
            return Err(invalid(format!("`{key}` mixes another layout's names in")));
        }
        let (module, part) = SUFFIXES
            .iter()
            .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m, p)))
            .ok_or_else(unsupported)?;
        let entry = parts.entry(module.to_owned()).or_default();
        let t = t.to_dtype(DType::F32).map_err(|e| invalid(e.to_string()))?;
        match part {
            Part::Down => entry.down = Some(t),
            Part::Up => entry.up = Some(t),
            Part::Alpha => {
                let alpha = t
                    .flatten_all()
                    .and_then(|t| t.get(0))
                    .and_then(|t| t.to_scalar::<f32>());
                entry.alpha = Some(alpha.map_err(|e| invalid(format!("`{key}`: {e}")))?);
            }
        }
    }
    if parts.is_empty() {
        return Err(invalid("no LoRA tensors".into()));
    }
    let mut modules = BTreeMap::new();
    for (module, Pieces { down, up, alpha }) in parts {
        let (Some(down), Some(up)) = (down, up) else {
            return Err(invalid(format!(
                "module `{module}` lacks its A (down) or B (up) matrix"
            )));
        };
        let rank = match (down.dims(), up.dims()) {
            (&[r, _], &[_, r2]) if r == r2 && r > 0 => r,
            (d, u) => {
                return Err(invalid(format!(
                    "module `{module}`: A {d:?} and B {u:?} are not (rank, in) and (out, rank)"
                )));
            }
        };
        let scale = match (alpha, &metadata) {
            (Some(alpha), _) => alpha / rank as f32,
            (None, Some(peft)) => peft.scale(&module, rank),
            (None, None) => 1.0,
        };
        modules.insert(
            module,
            Update {
                down,
                up,
                scale: scale * user_scale,
            },
        );
    }
    Ok(Adapter {
        path: path.to_owned(),
        modules,
    })
}

/// The adapter settings diffusers stores with a PEFT LoRA (`lora_adapter_metadata`, keys
/// under `transformer.`).
#[derive(Debug, Default, PartialEq)]
struct PeftConfig {
    lora_alpha: Option<f32>,
    alpha_pattern: HashMap<String, f32>,
    use_rslora: bool,
    use_dora: bool,
}

impl PeftConfig {
    fn parse(json: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("lora_adapter_metadata: {e}"))?;
        let get = |k: &str| v.get(format!("transformer.{k}")).or_else(|| v.get(k));
        let alpha_pattern = get("alpha_pattern")
            .and_then(|p| p.as_object())
            .map(|p| {
                p.iter()
                    .filter_map(|(k, a)| Some((k.clone(), a.as_f64()? as f32)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            lora_alpha: get("lora_alpha").and_then(|a| a.as_f64()).map(|a| a as f32),
            alpha_pattern,
            use_rslora: get("use_rslora").and_then(|b| b.as_bool()).unwrap_or(false),
            use_dora: get("use_dora").and_then(|b| b.as_bool()).unwrap_or(false),
        })
    }

    /// PEFT's scale of `module` of rank `rank`: its alpha (a pattern naming the module or a
    /// suffix of it, else `lora_alpha`, else the rank) over the rank, or over √rank with
    /// rsLoRA.
    fn scale(&self, module: &str, rank: usize) -> f32 {
        let pattern = self.alpha_pattern.iter().find(|(k, _)| {
            module == k.as_str()
                || module
                    .strip_suffix(k.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        });
        let alpha = pattern
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
            .unwrap_or(rank as f32);
        if self.use_rslora {
            alpha / (rank as f32).sqrt()
        } else {
            alpha / rank as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_scales_follow_alpha_pattern_and_rslora() {
        let cfg = PeftConfig::parse(
            r#"{"transformer.lora_alpha": 8, "transformer.r": 4,
                "transformer.alpha_pattern": {"attn.to_q": 2}}"#,
        )
        .unwrap();
        assert_eq!(cfg.scale("transformer_blocks.0.attn.to_k", 4), 2.0);
        assert_eq!(cfg.scale("transformer_blocks.0.attn.to_q", 4), 0.5);
        assert_eq!(
            cfg.scale("transformer_blocks.0.xattn.to_q", 4),
            2.0,
            "only whole names"
        );
        assert_eq!(cfg.scale("proj_out", 16), 0.5, "the module's own rank");
        let rs = PeftConfig::parse(r#"{"lora_alpha": 8, "use_rslora": true}"#).unwrap();
        assert_eq!(rs.scale("proj_out", 16), 2.0);
        assert_eq!(PeftConfig::default().scale("proj_out", 16), 1.0);
        assert!(PeftConfig::parse("not json").is_err());
    }
}
