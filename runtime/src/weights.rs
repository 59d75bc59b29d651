//! Finding and mapping safetensors weights in the diffusers / transformers folder layouts;
//! [`gguf`] reads GGUF files.
//!
//! A model folder holds either one `*.safetensors` file or a sharded set listed by a
//! `*.safetensors.index.json` (`{"weight_map": {"key": "shard-file"}}`); the index is always
//! read, shard names are never guessed. [`component_dir`] accepts a pipeline root (with
//! `model_index.json`) or the component folder itself.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{DType, Device, safetensors::MmapedSafetensors};
use candle_nn::VarBuilder;
use klein_kernels::quant::MappedTensors;

pub(crate) mod backend;
pub mod gguf;

/// A weights folder that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{0}: no such directory")]
    NotADirectory(PathBuf),
    #[error(
        "{dir}: neither a pipeline root with a `{component}/` folder nor a `{component}` folder with config.json"
    )]
    NoComponent { dir: PathBuf, component: String },
    #[error("{0}: no *.safetensors file and no *.safetensors.index.json")]
    NoWeights(PathBuf),
    #[error("{0}: more than one *.safetensors.index.json")]
    AmbiguousIndex(PathBuf),
    #[error("{path}: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mapping weights: {0}")]
    Candle(#[from] candle_core::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The folder of `component` (e.g. `vae`, `transformer`, `text_encoder`) given either a
/// pipeline root or the component folder itself.
pub fn component_dir(dir: &Path, component: &str) -> Result<PathBuf, WeightsError> {
    if !dir.is_dir() {
        return Err(WeightsError::NotADirectory(dir.to_owned()));
    }
    let nested = dir.join(component);
    if nested.join("config.json").is_file() {
        return Ok(nested);
    }
    if dir.join("config.json").is_file() && !dir.join("model_index.json").is_file() {
        return Ok(dir.to_owned());
    }
    Err(WeightsError::NoComponent {
        dir: dir.to_owned(),
        component: component.to_owned(),
    })
}

/// The safetensors files of a model folder: the shards named by its index, or its single file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let mut indexes = Vec::new();
    let mut singles = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(path);
        } else if name.ends_with(".safetensors") {
            singles.push(path);
        }
    }
    match indexes.len() {
        0 => {}
        1 => return shards_of(&indexes[0]),
        _ => return Err(WeightsError::AmbiguousIndex(dir.to_owned())),
    }
    singles.sort();
    match singles.len() {
        0 => Err(WeightsError::NoWeights(dir.to_owned())),
        _ => Ok(singles),
    }
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let bad = |reason: String| WeightsError::BadIndex {
        path: index.to_owned(),
        reason,
    };
    let text = fs::read_to_string(index).map_err(io(index))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: BTreeSet<&str> = map
        .values()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| bad("a weight_map value is not a string".into()))
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(files.len());
    for file in files {
        if file.contains('/') || file.contains("..") {
            return Err(bad(format!("shard name {file:?} leaves the folder")));
        }
        let path = dir.join(file);
        if !path.is_file() {
            return Err(bad(format!("shard {file} is missing")));
        }
        out.push(path);
    }
    Ok(out)
}

/// Memory-maps `files` into a [`VarBuilder`] that yields tensors as `dtype` on `device`, each
/// tensor's bytes copied by every core and, to a GPU, sent in page-locked transfers
/// ([`klein_kernels::upload`]).
///
/// The files must not change while mapped: serve weights from a read-only volume.
pub fn mmap_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    let mapped = mmap_safetensors(files)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend::Mapped(mapped)),
        dtype,
        device.clone(),
    ))
}

/// `files` mapped for the load-time quantizers to read their weights from directly
/// (`klein_kernels::quant::with_mapped`), as [`mmap_var_builder`] maps them.
pub fn mapped_tensors(files: &[PathBuf]) -> Result<Arc<dyn MappedTensors>, WeightsError> {
    Ok(Arc::new(backend::Mapped(mmap_safetensors(files)?)))
}

/// Memory-maps `files` as they are stored (names, dtypes), for reading tensor by tensor.
///
/// The files must not change while mapped, as for [`mmap_var_builder`].
#[allow(unsafe_code)]
pub fn mmap_safetensors(files: &[PathBuf]) -> Result<MmapedSafetensors, WeightsError> {
    // SAFETY: the mapped files are treated as immutable for the life of the process; the
    // deployment mounts weights read-only (see deploy/).
    Ok(unsafe { MmapedSafetensors::multi(files)? })
}

/// Reads a JSON config file into `T`.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, WeightsError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| WeightsError::BadIndex {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}
