//! LoRA adapters merged into the transformer's weights at load: each weight a LoRA touches is
//! read as `W + Σ scale · (B @ A)` in f32, then in the model dtype, as diffusers'
//! `load_lora_weights` + `fuse_lora(lora_scale)` computes it. Served models are fixed at start-up
//! (server-wide, like SGLang's `set_lora`); a model entry per adapter set gives requests a choice
//! by model id.
//!
//! The three layouts diffusers reads for FLUX.2 are read:
//! - diffusers / PEFT: `transformer.<module>.lora_A.weight` / `lora_B.weight`, scale
//!   `lora_alpha / r` from the file's `lora_adapter_metadata` (`alpha_pattern`, `use_rslora`),
//!   else 1;
//! - ai-toolkit: BFL names under `diffusion_model.` (or PEFT's `base_model.model.`), `lora_A` /
//!   `lora_B` or `lora_down` / `lora_up`; a fused `qkv`'s B splits into q, k and v rows;
//! - kohya: `lora_unet_<BFL name with _>.lora_down.weight` / `lora_up.weight` and `alpha`
//!   (scale `alpha / r`).
//!
//! A module of the file that matches no weight of the transformer is an error, as is any
//! other key (LoKr, DoRA, full diffs), rather than an adapter silently left out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use klein_kernels::quant::MappedTensors;
use serde::{Deserialize, Serialize};

use crate::model::bfl::{self, Source};

/// One adapter file and the strength it is merged with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    /// Multiplies the file's own scale (diffusers' `lora_scale`).
    #[serde(default = "one")]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

impl FromStr for LoraSpec {
    type Err = String;

    /// `PATH` or `PATH:SCALE`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.is_empty() {
            return Err("expected PATH or PATH:SCALE".into());
        }
        let (path, scale) = match s.rsplit_once(':') {
            Some((path, scale)) if !path.is_empty() => match scale.parse::<f32>() {
                Ok(scale) if scale.is_finite() => (path, scale),
                Ok(_) => return Err(format!("{s:?}: the scale must be finite")),
                Err(_) => (s, 1.0),
            },
            _ => (s, 1.0),
        };
        Ok(Self {
            path: path.into(),
            scale,
        })
    }
}

/// A LoRA file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("LoRA {path}: {reason}")]
pub struct LoraError {
    pub path: PathBuf,
    pub reason: String,
}

/// One low-rank update: `scale · (up @ down)`, both f32 on the host.
struct Update {
    down: Tensor,
    up: Tensor,
    scale: f32,
}

/// The updates of one file, by module name as the file spells it (prefix stripped).
struct Adapter {
    path: PathBuf,
    modules: BTreeMap<String, Update>,
}

/// Which rows of an update a diffusers weight takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rows {
    All,
    /// Third `i` (q, k, v of a fused `qkv`).
    Third(usize),
    /// The two halves swapped (BFL's final (shift, scale) against diffusers' (scale, shift)).
    Swapped,
}

/// The adapters merged into one transformer.
pub struct Loras {
    adapters: Vec<Adapter>,
}

impl fmt::Debug for Loras {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.adapters.iter().map(|a| a.path.display()))
            .finish()
    }
}

impl Loras {
    /// Reads every file of `specs` (none: `None`).
    pub fn read(specs: &[LoraSpec]) -> std::result::Result<Option<Arc<Self>>, LoraError> {
        if specs.is_empty() {
            return Ok(None);
        }
        let adapters = specs
            .iter()
            .map(|s| read_adapter(&s.path, s.scale))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Some(Arc::new(Self { adapters })))
    }

    /// Modules, per adapter, that update the diffusers weight `name` (`….weight`).
    fn updates<'a>(&'a self, name: &str) -> Vec<(usize, &'a str, &'a Update, Rows)> {
        let Some(stem) = name.strip_suffix(".weight") else {
            return Vec::new();
        };
        let mut keys = vec![(stem.to_owned(), Rows::All)];
        if let Some(source) = bfl::source(name) {
            let (src, rows) = match source {
                Source::Plain(s) => (s, Rows::All),
                Source::Chunk3(s, i) => (s, Rows::Third(i)),
                Source::SwapHalves(s) => (s, Rows::Swapped),
            };
            if let Some(src) = src.strip_suffix(".weight") {
                let kohya = src.replace('.', "_");
                if kohya != src {
                    keys.push((kohya, rows));
                }
                keys.push((src.to_owned(), rows));
            }
        }
        let mut found = Vec::new();
        for (i, adapter) in self.adapters.iter().enumerate() {
            for (key, rows) in &keys {
                if let Some((k, u)) = adapter.modules.get_key_value(key) {
                    found.push((i, k.as_str(), u, *rows));
                }
            }
        }
        found
    }

    /// Whether any adapter updates the diffusers weight `name`.
    pub fn touches(&self, name: &str) -> bool {
        !self.updates(name).is_empty()
    }

    /// `inner` (diffusers names) with the updates merged into the weights read through it, and
    /// the record of the modules merged, for [`Self::check_all_merged`].
    pub fn var_builder(
        self: &Arc<Self>,
        inner: VarBuilder<'static>,
    ) -> (VarBuilder<'static>, Merged) {
        let merged = Merged::default();
        let (dtype, device) = (inner.dtype(), inner.device().clone());
        let backend = Backend {
            inner,
            loras: self.clone(),
            merged: merged.clone(),
        };
        (
            VarBuilder::from_backend(Box::new(backend), dtype, device),
            merged,
        )
    }

    /// An error naming the first module no weight took: a name of another model, or a layout
    /// this reader maps differently.
    pub fn check_all_merged(&self, merged: &Merged) -> std::result::Result<(), LoraError> {
        let merged = merged
            .0
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |m| m.clone());
        for (i, adapter) in self.adapters.iter().enumerate() {
            if let Some(name) = adapter
                .modules
                .keys()
                .find(|k| !merged.contains(&(i, (*k).clone())))
            {
                return Err(LoraError {
                    path: adapter.path.clone(),
                    reason: format!(
                        "module `{name}` matches no weight of this transformer (another \
                         model's adapter?)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// `source` without the weights an adapter updates, so the load-time quantizers read those
    /// through the merging builder.
    pub fn hide_updated(
        self: &Arc<Self>,
        source: Arc<dyn MappedTensors>,
    ) -> Arc<dyn MappedTensors> {
        Arc::new(Unupdated {
            inner: source,
            loras: self.clone(),
        })
    }

    /// `w`, the diffusers weight `name`, with every update merged (f32, then `w`'s dtype).
    fn merge(&self, name: &str, w: Tensor, merged: &Merged) -> Result<Tensor> {
        let updates = self.updates(name);
        if updates.is_empty() {
            return Ok(w);
        }
        let dev = w.device().clone();
        let mut sum = w.to_dtype(DType::F32)?;
        for (i, key, u, rows) in updates {
            let delta =
                (u.up.to_device(&dev)?.matmul(&u.down.to_device(&dev)?)? * f64::from(u.scale))?;
            let delta = match rows {
                Rows::All => delta,
                Rows::Third(t) => {
                    let n = delta.dim(0)? / 3;
                    delta.narrow(0, t * n, n)?
                }
                Rows::Swapped => {
                    let half = delta.dim(0)? / 2;
                    Tensor::cat(
                        &[delta.narrow(0, half, half)?, delta.narrow(0, 0, half)?],
                        0,
                    )?
                }
            };
            if delta.shape() != sum.shape() {
                candle_core::bail!(
                    "LoRA module `{key}` gives {:?} for {name} of {:?}",
                    delta.shape(),
                    sum.shape()
                )
            }
            sum = (sum + delta)?;
            if let Ok(mut m) = merged.0.lock() {
                m.insert((i, key.to_owned()));
            }
        }
        sum.to_dtype(w.dtype())
    }
}

/// The (adapter, module) pairs a build merged.
#[derive(Debug, Clone, Default)]
pub struct Merged(Arc<Mutex<BTreeSet<(usize, String)>>>);

/// A transformer's builder with the updates merged on the way.
struct Backend {
    inner: VarBuilder<'static>,
    loras: Arc<Loras>,
    merged: Merged,
}

impl Backend {
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let w = self
            .inner
            .clone()
            .set_device(dev.clone())
            .get_unchecked_dtype(name, dtype)?;
        self.loras.merge(name, w, &self.merged)
    }
}

impl SimpleBackend for Backend {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        bfl::expect_shape(self.read(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.read(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A checkpoint's mapped tensors less those an adapter updates.
struct Unupdated {
    inner: Arc<dyn MappedTensors>,
    loras: Arc<Loras>,
}

impl MappedTensors for Unupdated {
    fn tensor(&self, name: &str) -> Option<(DType, Vec<usize>, &[u8])> {
        if self.loras.touches(name) {
            return None;
        }
        self.inner.tensor(name)
    }
}

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

fn read_adapter(path: &Path, user_scale: f32) -> std::result::Result<Adapter, LoraError> {
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
    fn a_spec_is_a_path_with_an_optional_scale() {
        let spec = |s: &str| s.parse::<LoraSpec>();
        assert_eq!(spec("a.safetensors").unwrap().scale, 1.0);
        let s = spec("/x/a.safetensors:0.75").unwrap();
        assert_eq!((s.path, s.scale), (PathBuf::from("/x/a.safetensors"), 0.75));
        let s = spec("c:/x:y.safetensors").unwrap();
        assert_eq!(
            (s.path, s.scale),
            (PathBuf::from("c:/x:y.safetensors"), 1.0)
        );
        assert!(spec("a:inf").is_err() && spec("").is_err());
    }

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
