//! LoRA adapters a request chooses: named adapter files read at start, uploaded with their
//! model, and added unmerged to the layers they touch for the runs that name them, each with
//! the request's scale, as PEFT computes an unfused adapter (`y = W x + Σ B(A x)·scale`).
//!
//! A model's adapters are stored per layer: for a layer stacking several weights (q, k and v),
//! one `down` of the distinct modules' A rows and one `up` whose column block per module holds
//! its B rows for the weights it updates (zeros elsewhere), the adapter's own scale in `up`.
//! A request's view of the model shares every weight and factor; only the request's scale is
//! its own, applied to the rank-wide `down x`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    str::FromStr,
};

use candle_core::{DType, Device, Result, Tensor};
use klein_proto::lora::{MAX_NAME, valid_name};
use serde::{Deserialize, Serialize};

use super::{LoraError, Loras, file::read_adapter};
use crate::model::{
    Flux2Transformer2DModel,
    projection::{LowRank, MapProjections, Projection},
};

/// An adapter requests may name: `name` and its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    pub name: String,
    pub path: PathBuf,
}

impl FromStr for AdapterSpec {
    type Err = String;

    /// `NAME=PATH`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.split_once('=') {
            Some((name, path)) if valid_name(name) && !path.is_empty() => Ok(Self {
                name: name.into(),
                path: path.into(),
            }),
            _ => Err(format!(
                "{s:?}: expected NAME=PATH, NAME of 1–{MAX_NAME} letters, digits, `.`, `_` or `-`"
            )),
        }
    }
}

/// A model's named adapters as read from their files (host, f32), each on its own.
#[derive(Debug, Default)]
pub struct NamedAdapters {
    adapters: BTreeMap<String, Loras>,
}

impl NamedAdapters {
    /// Reads every file of `specs`; a name given twice is an error.
    pub fn read(specs: &[AdapterSpec]) -> std::result::Result<Self, LoraError> {
        let mut adapters = BTreeMap::new();
        for spec in specs {
            let invalid = |reason: String| LoraError {
                path: spec.path.clone(),
                reason,
            };
            if !valid_name(&spec.name) {
                return Err(invalid(format!("{:?} is not an adapter name", spec.name)));
            }
            let loras = Loras {
                adapters: vec![read_adapter(&spec.path, 1.0)?],
            };
            if adapters.insert(spec.name.clone(), loras).is_some() {
                return Err(invalid(format!("adapter name {:?} given twice", spec.name)));
            }
        }
        Ok(Self { adapters })
    }

    /// Device bytes the stored factors take at most in `dtype`: each module's A, and its B
    /// rows padded at most threefold (a stacked layer's `up` holds zeros beside each module's
    /// block; the widest stack is q, k and v).
    pub fn device_bytes(&self, dtype: DType) -> u64 {
        let elements: usize = self
            .adapters
            .values()
            .flat_map(|l| l.adapters.iter())
            .flat_map(|a| a.modules.values())
            .map(|u| u.down.elem_count() + 3 * u.up.elem_count())
            .sum();
        (elements * dtype.size_in_bytes()) as u64
    }

    /// Every adapter's factors for `model`'s layers, in `dtype` on `dev`. An adapter module
    /// that matches no layer is an error, as in a merge.
    pub fn resident(
        &self,
        model: &Flux2Transformer2DModel,
        dtype: DType,
        dev: &Device,
    ) -> std::result::Result<ResidentAdapters, LoraError> {
        let mut by_name = BTreeMap::new();
        for (name, loras) in &self.adapters {
            let adapter = &loras.adapters[0];
            let invalid = |e: candle_core::Error| LoraError {
                path: adapter.path.clone(),
                reason: e.to_string(),
            };
            let mut used = BTreeSet::new();
            let factors = model
                .projections()
                .map_err(invalid)?
                .iter()
                .map(|p| layer_factors(loras, p, &mut used, dtype, dev))
                .collect::<Result<Vec<_>>>()
                .map_err(invalid)?;
            if let Some(module) = adapter.modules.keys().find(|k| !used.contains(*k)) {
                return Err(LoraError {
                    path: adapter.path.clone(),
                    reason: format!(
                        "module `{module}` matches no weight of this transformer (another \
                         model's adapter?)"
                    ),
                });
            }
            by_name.insert(name.clone(), factors);
        }
        Ok(ResidentAdapters { by_name })
    }
}

/// One adapter's (down, up) for a layer, if it touches any of the layer's weights; the
/// modules it used recorded in `used`.
fn layer_factors(
    loras: &Loras,
    p: &Projection,
    used: &mut BTreeSet<String>,
    dtype: DType,
    dev: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    // The distinct modules (A, rank) and, per weight, its module and scaled B rows.
    let mut modules: Vec<(&str, &Tensor)> = Vec::new();
    let mut blocks: Vec<Option<(usize, Tensor)>> = Vec::with_capacity(p.parts().len());
    for part in p.parts() {
        let updates = loras.updates(&part.name);
        let (_, key, u, source) = match updates.as_slice() {
            [] => {
                blocks.push(None);
                continue;
            }
            [one] => one,
            _ => candle_core::bail!("several modules update {}", part.name),
        };
        let up = match source {
            Some(source) => source.rows(&u.up)?,
            None => u.up.clone(),
        };
        if up.dims() != [part.rows, u.down.dim(0)?] || u.down.dim(1)? != part.cols {
            candle_core::bail!(
                "LoRA module `{key}` gives ({}, {}) for {} of ({}, {})",
                up.dim(0)?,
                u.down.dim(1)?,
                part.name,
                part.rows,
                part.cols
            );
        }
        let index = match modules.iter().position(|(k, _)| k == key) {
            Some(i) => i,
            None => {
                modules.push((key, &u.down));
                modules.len() - 1
            }
        };
        used.insert((*key).to_owned());
        blocks.push(Some((index, (up * f64::from(u.scale))?)));
    }
    if modules.is_empty() {
        return Ok(None);
    }
    let ranks: Vec<usize> = modules
        .iter()
        .map(|(_, a)| a.dim(0))
        .collect::<Result<_>>()?;
    let rank: usize = ranks.iter().sum();
    let down = Tensor::cat(&modules.iter().map(|(_, a)| *a).collect::<Vec<_>>(), 0)?;
    let rows = p
        .parts()
        .iter()
        .zip(&blocks)
        .map(|(part, block)| match block {
            None => Tensor::zeros((part.rows, rank), DType::F32, &Device::Cpu),
            Some((i, b)) => {
                let before: usize = ranks[..*i].iter().sum();
                let after = rank - before - ranks[*i];
                let zeros = |n| Tensor::zeros((part.rows, n), DType::F32, &Device::Cpu);
                Tensor::cat(&[zeros(before)?, b.clone(), zeros(after)?], 1)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let up = Tensor::cat(&rows, 0)?;
    let send = |t: &Tensor| t.to_dtype(dtype)?.to_device(dev);
    Ok(Some((send(&down)?, send(&up)?)))
}

/// A resident model's adapters: per adapter name, its factors for each layer in the model's
/// order ([`Flux2Transformer2DModel::projections`]).
#[derive(Debug, Default)]
pub struct ResidentAdapters {
    by_name: BTreeMap<String, Vec<Option<(Tensor, Tensor)>>>,
}

impl ResidentAdapters {
    /// Device bytes the factors take.
    pub fn device_bytes(&self) -> u64 {
        self.by_name
            .values()
            .flatten()
            .flatten()
            .map(|(d, u)| ((d.elem_count() + u.elem_count()) * d.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// `model` with the adapters `loras` names added unmerged, each at its scale, in order;
    /// it shares every weight with `model`. A name this model does not hold is an error
    /// (requests are validated against the names first).
    pub fn view(
        &self,
        model: &Flux2Transformer2DModel,
        loras: &[(String, f32)],
    ) -> Result<Flux2Transformer2DModel> {
        let chosen = loras
            .iter()
            .map(|(name, scale)| match self.by_name.get(name) {
                Some(f) => Ok((f, f64::from(*scale))),
                None => Err(candle_core::Error::msg(format!(
                    "no adapter {name:?} on this model"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut layer = 0;
        model.map_projections(&mut |p| {
            let terms: Vec<LowRank> = chosen
                .iter()
                .filter_map(|(factors, scale)| {
                    factors[layer].as_ref().map(|(down, up)| LowRank {
                        down: down.clone(),
                        up: up.clone(),
                        scale: *scale,
                    })
                })
                .collect();
            layer += 1;
            Ok(if terms.is_empty() {
                p.clone()
            } else {
                p.with_low_rank(terms)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_is_a_name_and_a_path() {
        let a: AdapterSpec = "anime-v2.1=/loras/a.safetensors".parse().unwrap();
        assert_eq!(
            (a.name.as_str(), a.path),
            ("anime-v2.1", PathBuf::from("/loras/a.safetensors"))
        );
        for bad in [
            "=/a",
            "a",
            "a=",
            ".x=/a",
            "a b=/a",
            "../x=/a",
            &format!("{}=/a", "n".repeat(65)),
        ] {
            assert!(bad.parse::<AdapterSpec>().is_err(), "{bad}");
        }
    }
}
