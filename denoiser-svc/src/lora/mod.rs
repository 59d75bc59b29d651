//! LoRA adapters, two ways:
//! - merged into the transformer's weights at load: each weight a LoRA touches is read as
//!   `W + Σ scale · (B @ A)` in f32, then in the model dtype, as diffusers computes it with
//!   `load_lora_weights` and `fuse_lora(lora_scale)` (on the host, by every core); a model
//!   entry per adapter set;
//! - per request ([`NamedAdapters`]): named adapters of a model, added unmerged to a view of it for
//!   the runs that name them, each with the request's strength.
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
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use klein_kernels::{quant::MappedTensors, upload};
use serde::{Deserialize, Serialize};

use crate::model::bfl::{self, Source};

mod file;
mod merge;
mod unmerged;

pub use unmerged::{AdapterSpec, NamedAdapters, ResidentAdapters};

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
            .map(|s| file::read_adapter(&s.path, s.scale))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Some(Arc::new(Self { adapters })))
    }

    /// Modules, per adapter, that update the diffusers weight `name` (`….weight`), with the
    /// BFL source whose rows the weight takes when the module has a BFL name (a fused `qkv`'s
    /// third, the final layer's halves swapped).
    fn updates<'a>(&'a self, name: &str) -> Vec<(usize, &'a str, &'a Update, Option<Source>)> {
        let Some(stem) = name.strip_suffix(".weight") else {
            return Vec::new();
        };
        let mut keys = vec![(stem.to_owned(), None)];
        if let Some(source) = bfl::source(name)
            && let Some(src) = source.name().strip_suffix(".weight")
        {
            let kohya = src.replace('.', "_");
            if kohya != src {
                keys.push((kohya, Some(source.clone())));
            }
            keys.push((src.to_owned(), Some(source)));
        }
        let mut found = Vec::new();
        for (i, adapter) in self.adapters.iter().enumerate() {
            for (key, source) in &keys {
                if let Some((k, u)) = adapter.modules.get_key_value(key) {
                    found.push((i, k.as_str(), u, source.clone()));
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

    /// Logs what a build merged and how long its reads, merges and sends took on the host; an
    /// error naming the first module no weight took: a name of another model, or a layout this
    /// reader maps differently.
    pub fn check_all_merged(&self, merged: &Merged) -> std::result::Result<(), LoraError> {
        let log = merged
            .0
            .lock()
            .map_or_else(|e| e.into_inner().clone(), |m| m.clone());
        tracing::info!(
            adapters = ?self,
            modules = log.modules.len(),
            weights = log.weights,
            read_s = log.read.as_secs_f64(),
            merge_s = log.merge.as_secs_f64(),
            send_s = log.send.as_secs_f64(),
            "LoRA adapters merged into the transformer"
        );
        for (i, adapter) in self.adapters.iter().enumerate() {
            if let Some(name) = adapter
                .modules
                .keys()
                .find(|k| !log.modules.contains(&(i, (*k).clone())))
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

    /// `w`, the diffusers weight `name` on the host, with every update merged
    /// ([`merge::add_products`]).
    fn merge(&self, name: &str, w: Tensor, merged: &Merged) -> Result<Tensor> {
        let updates = self.updates(name);
        if updates.is_empty() {
            return Ok(w);
        }
        let mut products = Vec::with_capacity(updates.len());
        for (i, key, u, source) in updates {
            // The row selection and the scale go on B (rows × rank).
            let up = match source {
                Some(source) => source.rows(&u.up)?,
                None => u.up.clone(),
            };
            let (rows, cols) = (up.dim(0)?, u.down.dim(1)?);
            if w.dims() != [rows, cols] {
                candle_core::bail!(
                    "LoRA module `{key}` gives ({rows}, {cols}) for {name} of {:?}",
                    w.shape()
                )
            }
            products.push(merge::Product {
                up: (up * f64::from(u.scale))?,
                down: u.down.clone(),
            });
            if let Ok(mut log) = merged.0.lock() {
                log.modules.insert((i, key.to_owned()));
            }
        }
        merge::add_products(&w, &products)
    }
}

/// What a build merged ([`Loras::check_all_merged`]).
#[derive(Debug, Clone, Default)]
pub struct Merged(Arc<Mutex<MergeLog>>);

#[derive(Debug, Clone, Default)]
struct MergeLog {
    /// (adapter, module) pairs.
    modules: BTreeSet<(usize, String)>,
    /// Weights updated, and the time reading them, merging and sending them took.
    weights: usize,
    read: Duration,
    merge: Duration,
    send: Duration,
}

/// A transformer's builder with the updates merged on the way.
struct Backend {
    inner: VarBuilder<'static>,
    loras: Arc<Loras>,
    merged: Merged,
}

impl Backend {
    /// Weight `name` on `dev`; an updated one is read and merged on the host by every core,
    /// then sent ([`klein_kernels::upload`]): merged on a GPU, its f32 transients would be cut
    /// from the pool between the weights, memory a load under an MPS limit cannot spare
    /// (docs/performance.md, thirty-sixth and thirty-seventh sessions).
    fn read(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let inner = self.inner.clone();
        if !self.loras.touches(name) {
            return inner
                .set_device(dev.clone())
                .get_unchecked_dtype(name, dtype);
        }
        let t0 = Instant::now();
        let w = inner
            .set_device(Device::Cpu)
            .get_unchecked_dtype(name, dtype)?;
        let t1 = Instant::now();
        let w = self.loras.merge(name, w, &self.merged)?;
        let t2 = Instant::now();
        let out = upload::to_device(&w, dev)?;
        if let Ok(mut log) = self.merged.0.lock() {
            log.weights += 1;
            log.read += t1 - t0;
            log.merge += t2 - t1;
            log.send += t2.elapsed();
        }
        Ok(out)
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
}
