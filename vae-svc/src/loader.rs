//! Finding and loading the VAE weights: a diffusers pipeline root, its `vae/` folder, or a
//! single safetensors file (BFL's `ae.safetensors`, or a diffusers-named file). The layout of
//! a single file is detected from its keys; a single file carries no config, so the class
//! defaults (the released FLUX.2 VAE) apply unless a `config.json` is given.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use klein_kernels::{ConvPrecision, ConvWeights};
use klein_runtime::weights;

use crate::{
    error::VaeError,
    model::{
        AutoencoderKLFlux2, Chunking, Config,
        bfl::{BFL_PROBE_KEY, BflBackend},
    },
};

/// A key every diffusers-named VAE file has.
const DIFFUSERS_PROBE_KEY: &str = "encoder.down_blocks.0.resnets.0.conv1.weight";

/// How the weights are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// diffusers `vae/diffusion_pytorch_model.safetensors` names.
    Diffusers,
    /// BFL `ae.safetensors` names.
    Bfl,
}

impl WeightsFormat {
    /// Stable lowercase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Diffusers => "diffusers",
            Self::Bfl => "bfl",
        }
    }
}

/// Where to load from and how.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Pipeline root, `vae/` folder or safetensors file.
    pub path: PathBuf,
    /// `config.json` for a single file; the class defaults when absent.
    pub single_file_config: Option<PathBuf>,
    /// Execution limits for the model.
    pub chunking: Chunking,
}

/// A loaded model and what the service reports about it.
pub struct Loaded {
    pub model: AutoencoderKLFlux2,
    pub config: Config,
    pub format: WeightsFormat,
    /// Bytes the loaded model holds on its device: the tensors read, in the compute dtype,
    /// and the low parts its split-TF32 convolutions keep.
    pub weight_bytes: u64,
    /// The folder (pipeline) or file name.
    pub model_id: String,
}

/// Loads the VAE onto `device` in `dtype`.
pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> Result<Loaded, VaeError> {
    let path = &source.path;
    let (files, config_path, format, model_id) = if path.is_file() {
        let files = vec![path.clone()];
        let probe = weights::mmap_var_builder(&files, dtype, device)?;
        let format = if probe.contains_tensor(BFL_PROBE_KEY) {
            WeightsFormat::Bfl
        } else if probe.contains_tensor(DIFFUSERS_PROBE_KEY) {
            WeightsFormat::Diffusers
        } else {
            return Err(VaeError::Config(format!(
                "{}: neither a BFL ae.safetensors nor a diffusers VAE file (no {BFL_PROBE_KEY} / {DIFFUSERS_PROBE_KEY})",
                path.display()
            )));
        };
        (
            files,
            source.single_file_config.clone(),
            format,
            file_id(path),
        )
    } else {
        let dir = weights::component_dir(path, "vae")?;
        let files = weights::safetensors_files(&dir)?;
        (
            files,
            Some(dir.join("config.json")),
            WeightsFormat::Diffusers,
            folder_id(&dir),
        )
    };
    let mut config: Config = match &config_path {
        Some(p) => weights::read_config(p)?,
        None => Config::default(),
    };
    config.chunking = source.chunking.on(device);
    config.validate().map_err(VaeError::Config)?;
    let stages = config.block_out_channels.len();
    let raw = weights::mmap_var_builder(&files, dtype, device)?;
    let named = match format {
        WeightsFormat::Diffusers => raw,
        WeightsFormat::Bfl => VarBuilder::from_backend(
            Box::new(BflBackend::new(raw, stages)),
            dtype,
            device.clone(),
        ),
    };
    let bytes = Arc::new(AtomicU64::new(0));
    let counting = Counting {
        inner: named,
        bytes: bytes.clone(),
        precision: config.chunking.conv_precision,
    };
    let vb = VarBuilder::from_backend(Box::new(counting), dtype, device.clone());
    let model = AutoencoderKLFlux2::new(&config, vb)?;
    Ok(Loaded {
        model,
        config,
        format,
        weight_bytes: bytes.load(Ordering::Relaxed),
        model_id,
    })
}

/// `name` for `.../name/vae`, `name` for a pipeline root or component folder `name`.
fn folder_id(component: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent_is_pipeline = component
        .parent()
        .is_some_and(|p| p.join("model_index.json").is_file());
    let id = if parent_is_pipeline {
        component.parent().and_then(name)
    } else {
        name(component)
    };
    id.unwrap_or_else(|| "vae".into())
}

fn file_id(file: &Path) -> String {
    file.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vae".into())
}

/// Adds up the bytes the model keeps resident: every tensor it asks for, and the low parts
/// its split-TF32 convolutions derive from their weights ([`ConvWeights::derived_bytes`]).
/// Counted, not read off the device's memory pool: in a process that also loads other
/// models (`klein serve`), the pool grows with theirs too.
struct Counting {
    inner: VarBuilder<'static>,
    bytes: Arc<AtomicU64>,
    precision: ConvPrecision,
}

impl SimpleBackend for Counting {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self
            .inner
            .get_with_hints_dtype(s, name, h, dtype)?
            .to_device(dev)?;
        let derived = match t.rank() {
            4 => ConvWeights::derived_bytes(&t, self.precision)?,
            _ => 0,
        };
        let n = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.bytes.fetch_add(n + derived, Ordering::Relaxed);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked_dtype(name, dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}
