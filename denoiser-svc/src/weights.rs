//! Finding and loading the transformer checkpoint.
//!
//! Accepted layouts:
//! - a diffusers pipeline root (`model_index.json` + `transformer/`) or its `transformer/`
//!   folder: `config.json` plus one `*.safetensors` or a sharded set with its index;
//! - a BFL single file (`flux-2-klein-4b.safetensors`, also BFL's and ComfyUI's fp8 files): its
//!   config is derived from the tensor shapes and its names are mapped on the fly
//!   ([`crate::model::bfl`]);
//! - a GGUF file with the BFL names (ComfyUI-GGUF, stable-diffusion.cpp; [`crate::gguf`]): the
//!   same, its block-quantized projections kept in their blocks.
//!
//! With a `quantize` setting the blocks' projections are read on the host, quantized there
//! and only their blocks reach the device ([`Checkpoint::with_quantize`]).
//!
//! Whether the model is step-distilled comes from the pipeline root's `model_index.json`
//! (`is_distilled`, absent = false as in diffusers); a single file or a bare `transformer/`
//! folder carries no such flag, so the service configuration must state it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use klein_kernels::{
    StoredBlocks,
    quant::{Quantize, with_mapped},
};
use klein_runtime::{
    models::{HostWeights, ModelSource},
    weights::{self, WeightsError, gguf::is_gguf},
};

use crate::{
    error::DenoiseError,
    gguf::GgufTransformer,
    graphed::GraphedTransformer,
    lora::{LoraError, LoraSpec, Loras, NamedAdapters},
    model::{AttentionConfig, Config, Flux2Transformer2DModel, bfl},
};

/// A checkpoint that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("building the transformer: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// The on-disk naming of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// diffusers `Flux2Transformer2DModel` names.
    Diffusers,
    /// BFL `flux2` names (fused qkv, (shift, scale) final layer).
    Bfl,
    /// BFL names in a GGUF file.
    Gguf,
}

impl Format {
    /// The name Info reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Diffusers => "diffusers",
            Self::Bfl => "bfl",
            Self::Gguf => "gguf",
        }
    }
}

/// A located checkpoint: what to load and how.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Model identifier: the pipeline folder's name, or the file stem.
    pub model_id: String,
    /// The transformer configuration.
    pub config: Config,
    /// How tensors are named.
    pub format: Format,
    /// The safetensors files, or the GGUF file.
    pub files: Vec<PathBuf>,
    /// `model_index.json`'s `is_distilled`, when the checkpoint has one.
    pub is_distilled: Option<bool>,
    /// A BFL safetensors file's names carry [`bfl::PREFIX`] (ComfyUI's copies).
    pub prefixed: bool,
    /// The BFL names (without the prefix) of the weights a BFL file stores in float8 e4m3.
    fp8: Arc<BTreeSet<String>>,
    /// How many weights those hold.
    fp8_elements: u64,
    /// The open GGUF file ([`Format::Gguf`]).
    gguf: Option<Arc<GgufTransformer>>,
    /// LoRA adapters merged into the weights at load ([`Self::with_loras`]).
    loras: Option<Arc<Loras>>,
}

impl Checkpoint {
    /// Locates the checkpoint at `path` (pipeline root, `transformer/` folder, BFL or GGUF
    /// file).
    pub fn locate(path: &Path) -> Result<Self, LoadError> {
        let invalid = |reason: String| LoadError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let model_id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("flux2-klein")
            .to_owned();
        if path.is_file() && is_gguf(path) {
            return Self::gguf(path, model_id);
        }
        if path.is_file() {
            let mut header = safetensors_header(path)?;
            let prefixed = header.contains_key(&format!("{}img_in.weight", bfl::PREFIX));
            if prefixed {
                header = header
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(bfl::PREFIX)?.to_owned(), v)))
                    .collect();
            }
            let fp8: BTreeSet<String> = header
                .iter()
                .filter(|(_, (_, dtype))| dtype == "F8_E4M3")
                .map(|(name, _)| name.clone())
                .collect();
            let fp8_elements = fp8
                .iter()
                .map(|name| header[name].0.iter().product::<usize>() as u64)
                .sum();
            let shapes = header
                .into_iter()
                .map(|(k, (shape, _))| (k, shape))
                .collect();
            return Ok(Self {
                model_id,
                config: single_file_config(path, &shapes)?,
                format: Format::Bfl,
                files: vec![path.to_owned()],
                is_distilled: None,
                prefixed,
                fp8: Arc::new(fp8),
                fp8_elements,
                gguf: None,
                loras: None,
            });
        }
        let dir = weights::component_dir(path, "transformer")?;
        let config: Config = weights::read_config(&dir.join("config.json"))?;
        config.validate().map_err(invalid)?;
        let files = weights::safetensors_files(&dir)?;
        let root = if dir == path {
            dir.parent()
        } else {
            Some(path)
        };
        let is_distilled = match root {
            Some(root) => pipeline_is_distilled(root)?,
            None => None,
        };
        let model_id = root
            .filter(|_| is_distilled.is_some())
            .and_then(|r| r.file_name())
            .and_then(|s| s.to_str())
            .map_or(model_id, str::to_owned);
        Ok(Self {
            model_id,
            config,
            format: Format::Diffusers,
            files,
            is_distilled,
            prefixed: false,
            fp8: Arc::default(),
            fp8_elements: 0,
            gguf: None,
            loras: None,
        })
    }

    /// A GGUF transformer: BFL names, the config from their shapes, its quantized projections
    /// the model's [`Config::stored`].
    fn gguf(path: &Path, model_id: String) -> Result<Self, LoadError> {
        let file = Arc::new(GgufTransformer::open(path)?);
        let mut config = single_file_config(path, &file.shapes())?;
        config.stored = Some(StoredBlocks(file.clone()));
        Ok(Self {
            model_id,
            config,
            format: Format::Gguf,
            files: vec![path.to_owned()],
            is_distilled: None,
            prefixed: false,
            fp8: Arc::default(),
            fp8_elements: 0,
            gguf: Some(file),
            loras: None,
        })
    }

    /// Memory-maps the weights and builds the model in `dtype` on `device`.
    pub fn load(
        &self,
        dtype: DType,
        device: &Device,
        attention: AttentionConfig,
    ) -> Result<Flux2Transformer2DModel, LoadError> {
        if let Some(file) = &self.gguf {
            return self.build(file.var_builder(dtype, device), attention);
        }
        let vb = weights::mmap_var_builder(&self.files, dtype, device)?;
        // The quantizers read a diffusers checkpoint's bytes themselves: its names are the
        // model's (a BFL file's are renamed, and its float8 weights scaled, on the way).
        if self.format == Format::Diffusers && self.config.quantize.format().is_some() {
            let mut mapped = weights::mapped_tensors(&self.files)?;
            if let Some(loras) = &self.loras {
                mapped = loras.hide_updated(mapped);
            }
            return with_mapped(mapped, || self.build(vb, attention));
        }
        self.build(vb, attention)
    }

    /// Builds the model from `vb` (its tensors under this checkpoint's names).
    pub fn build(
        &self,
        vb: VarBuilder<'static>,
        attention: AttentionConfig,
    ) -> Result<Flux2Transformer2DModel, LoadError> {
        let vb = match self.format {
            Format::Diffusers => vb,
            Format::Bfl if self.prefixed => bfl::BflBackend::var_builder(
                vb.pp(bfl::PREFIX.trim_end_matches('.')),
                self.fp8.clone(),
            ),
            Format::Bfl | Format::Gguf => bfl::BflBackend::var_builder(vb, self.fp8.clone()),
        };
        let config = Config {
            attention,
            ..self.config.clone()
        };
        let Some(loras) = &self.loras else {
            return Ok(Flux2Transformer2DModel::new(&config, vb)?);
        };
        let (vb, merged) = loras.var_builder(vb);
        let model = Flux2Transformer2DModel::new(&config, vb)?;
        loras.check_all_merged(&merged)?;
        Ok(model)
    }

    /// The same checkpoint built with its blocks' projections quantized at load time
    /// ([`Config::quantize`]).
    pub fn with_quantize(mut self, quantize: Quantize) -> Self {
        self.config.quantize = quantize;
        self
    }

    /// The same checkpoint with the LoRA adapters of `specs` merged into its weights at load
    /// ([`crate::lora`]). A GGUF transformer's stored blocks take none.
    pub fn with_loras(mut self, specs: &[LoraSpec]) -> Result<Self, LoadError> {
        if !specs.is_empty() && self.format == Format::Gguf {
            return Err(LoadError::Invalid {
                path: self.files[0].clone(),
                reason: "a LoRA is merged into dense weights: serve the diffusers folder or a \
                         BFL safetensors file (quantized at load with `quantize`), not a GGUF \
                         transformer"
                    .into(),
            });
        }
        self.loras = Loras::read(specs)?;
        Ok(self)
    }

    /// Weights a BFL file stores in float8 e4m3.
    pub fn fp8_elements(&self) -> u64 {
        self.fp8_elements
    }

    /// Bytes the weights take on the device in `dtype` (the projections in their blocks when
    /// quantized).
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        self.config.weight_bytes(dtype)
    }
}

/// The configuration of the single file `path` (safetensors or GGUF) from its BFL names'
/// `shapes` (BFL files carry no config).
fn single_file_config(
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<Config, LoadError> {
    let invalid = |reason: &str| LoadError::Invalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if !shapes.contains_key("img_in.weight") {
        return Err(invalid(
            "a single file must carry the BFL flux2 names (no `img_in.weight`): BFL's \
             safetensors, or GGUF as ComfyUI-GGUF and stable-diffusion.cpp write it; point at the \
             diffusers folder instead",
        ));
    }
    bfl::config_from_shapes(shapes)
        .ok_or_else(|| invalid("not a FLUX.2 transformer (shapes do not fit)"))
}

/// `model_index.json`'s `is_distilled` in the pipeline root `root` (absent = false, as in
/// diffusers); `None` without a `model_index.json`.
pub fn pipeline_is_distilled(root: &Path) -> Result<Option<bool>, LoadError> {
    let index = root.join("model_index.json");
    if !index.is_file() {
        return Ok(None);
    }
    let json: serde_json::Value = weights::read_config(&index)?;
    let distilled = json.get("is_distilled").and_then(|v| v.as_bool());
    Ok(Some(distilled.unwrap_or(false)))
}

/// A checkpoint as one model of the service's registry.
#[derive(Debug, Clone)]
pub struct TransformerSource {
    pub checkpoint: Checkpoint,
    pub dtype: DType,
    pub attention: AttentionConfig,
    /// Whether its steps replay CUDA graphs (on a GPU).
    pub cuda_graphs: bool,
    /// The adapters requests may apply, uploaded with the model.
    pub adapters: Arc<NamedAdapters>,
}

impl ModelSource for TransformerSource {
    type Model = GraphedTransformer;
    type Error = DenoiseError;

    /// The weights and, at most, their adapters' factors.
    fn device_bytes(&self) -> u64 {
        self.checkpoint.weight_bytes(self.dtype) + self.adapters.device_bytes(self.dtype)
    }

    /// The host copy keeps the dense weights, float8 ones as stored; a quantized model is
    /// quantized again from them when it comes back to the device.
    fn host_bytes(&self) -> u64 {
        let size = self.dtype.size_in_bytes() as u64;
        let fp8 = self.checkpoint.fp8_elements();
        (self.checkpoint.config.param_count() * size).saturating_sub(fp8 * (size - 1))
    }

    /// A GGUF file's blocks are read from the file again instead.
    fn has_host_copy(&self) -> bool {
        self.checkpoint.format != Format::Gguf
    }

    fn read_host(&self) -> Result<HostWeights, DenoiseError> {
        Ok(
            HostWeights::read(&self.checkpoint.files, self.dtype, |_| true)
                .map_err(LoadError::from)?,
        )
    }

    fn build(
        &self,
        host: Option<&HostWeights>,
        device: &Device,
    ) -> Result<GraphedTransformer, DenoiseError> {
        let model = match host {
            Some(h) => self
                .checkpoint
                .build(h.var_builder(self.dtype, device), self.attention)?,
            None => self.checkpoint.load(self.dtype, device, self.attention)?,
        };
        let adapters = self
            .adapters
            .resident(&model, self.dtype, device)
            .map_err(LoadError::from)?;
        Ok(GraphedTransformer::new(
            model,
            adapters,
            self.cuda_graphs,
            device,
        ))
    }
}

/// Tensor name → (shape, stored dtype), from a safetensors header (8-byte little-endian length,
/// then JSON).
fn safetensors_header(path: &Path) -> Result<BTreeMap<String, (Vec<usize>, String)>, LoadError> {
    let invalid = |reason: String| LoadError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let io = |e: std::io::Error| invalid(e.to_string());
    let mut file = fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(invalid(format!("safetensors header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let json: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
    Ok(json
        .into_iter()
        .filter_map(|(name, v)| {
            let shape = v.get("shape")?.as_array()?;
            let shape = shape
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()?;
            let dtype = v.get("dtype")?.as_str()?.to_owned();
            Some((name, (shape, dtype)))
        })
        .collect())
}
