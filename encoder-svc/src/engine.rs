//! The encoder the engine thread owns: the loaded [`TextEncoder`] and the padding it needs.
//!
//! [`Encoder::load`] reads the architecture (`text_encoder/config.json`, or a GGUF file's
//! metadata) and the weights (safetensors, optionally quantized at load time, or GGUF) onto the
//! configured device. [`Encoder::encode`] pads a batch of token-id lists to [`SEQ_LEN`], runs
//! the model and brings the embeddings back to the host.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use klein_kernels::quant::with_mapped;
use klein_runtime::{
    models::{HostWeights, ModelSource},
    weights::{component_dir, mapped_tensors, mmap_var_builder, read_config, safetensors_files},
};

use crate::{
    error::EncoderError,
    model::{
        gguf::GgufFile,
        quant::QuantFormat,
        qwen3::{self, Config, TextEncoder},
        weights::{QuantPlan, WeightReport, Weights},
    },
    prompt::{PromptIds, SEQ_LEN, pad},
};

/// Where the weights come from and how they are held on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Diffusers pipeline root (with `text_encoder/`) or the `text_encoder/` folder itself.
    pub model_dir: PathBuf,
    /// A pre-quantized Qwen3 GGUF file to take the weights from instead of safetensors.
    pub gguf: Option<PathBuf>,
    /// Compute dtype (activations, dense weights, output).
    pub dtype: DType,
    /// Load-time quantization of safetensors weights; `None` keeps them dense.
    pub quantize: Option<QuantPlan>,
}

/// The loaded text encoder.
pub struct Encoder {
    model: TextEncoder,
    pad_id: u32,
    report: WeightReport,
}

impl Encoder {
    /// Loads the model described by `spec` onto `device`; `pad_id` fills padding positions.
    pub fn load(spec: &ModelSpec, pad_id: u32, device: &Device) -> Result<Self, EncoderError> {
        let Some(path) = &spec.gguf else {
            let dir = component_dir(&spec.model_dir, "text_encoder")?;
            let cfg: Config = read_config(&dir.join("config.json"))?;
            let files = safetensors_files(&dir)?;
            let vb = mmap_var_builder(&files, spec.dtype, device)?;
            let weights = Weights::safetensors(vb, spec.quantize);
            if spec.quantize.is_none() {
                return Self::build(&cfg, weights, pad_id);
            }
            // The quantizers read the checkpoint's bytes themselves.
            let mapped = mapped_tensors(&files)?;
            return with_mapped(mapped, || Self::build(&cfg, weights, pad_id));
        };
        let (cfg, weights) = gguf_weights(spec, path, device)?;
        Self::build(&cfg, weights, pad_id)
    }

    /// Builds the safetensors model of `spec` on `device` from weights already in host RAM.
    pub fn from_host(
        spec: &ModelSpec,
        host: &HostWeights,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self, EncoderError> {
        let cfg = spec.config()?;
        let weights = Weights::safetensors(host.var_builder(spec.dtype, device), spec.quantize);
        Self::build(&cfg, weights, pad_id)
    }

    fn build(cfg: &Config, weights: Weights<'_>, pad_id: u32) -> Result<Self, EncoderError> {
        let model = TextEncoder::new(cfg, weights.clone())?;
        let report = weights.report();
        for t in &report.tensors {
            tracing::debug!(key = %t.key, format = %t.format, bytes = t.bytes, "weight");
        }
        tracing::info!(
            total_bytes = report.total_bytes(),
            formats = %report.summary(),
            "text encoder weights loaded"
        );
        Ok(Self {
            model,
            pad_id,
            report,
        })
    }

    /// The loaded model.
    pub fn model(&self) -> &TextEncoder {
        &self.model
    }

    /// Every weight tensor with its format and bytes.
    pub fn report(&self) -> &WeightReport {
        &self.report
    }

    /// Embeddings of each prompt, (n, [`SEQ_LEN`], 3·hidden) in the model dtype, on the host.
    pub fn encode(&self, prompts: &[PromptIds]) -> Result<Tensor, EncoderError> {
        let device = self.model.device();
        let mut ids = Vec::with_capacity(prompts.len() * SEQ_LEN);
        let mut mask = Vec::with_capacity(prompts.len() * SEQ_LEN);
        for p in prompts {
            let (i, m) = pad(&p.ids, self.pad_id);
            ids.extend(i);
            mask.extend(m);
        }
        let shape = (prompts.len(), SEQ_LEN);
        let ids = Tensor::from_vec(ids, shape, device)?;
        let mask = Tensor::from_vec(mask, shape, device)?;
        Ok(self.model.forward(&ids, &mask)?.to_device(&Device::Cpu)?)
    }
}

impl ModelSpec {
    /// The architecture: `text_encoder/config.json`, or the GGUF file's metadata.
    pub fn config(&self) -> Result<Config, EncoderError> {
        match &self.gguf {
            Some(path) => Ok(GgufFile::open(path)?.config()?),
            None => {
                let dir = component_dir(&self.model_dir, "text_encoder")?;
                Ok(read_config(&dir.join("config.json"))?)
            }
        }
    }
}

/// Bytes the weights the model reads (the embedding, the first [`qwen3::LAYERS_RUN`] layers)
/// take on the device in `dtype` under `plan`: exact for safetensors checkpoints.
pub fn weight_bytes(cfg: &Config, dtype: DType, plan: Option<QuantPlan>) -> u64 {
    let s = dtype.size_in_bytes() as u64;
    let matrix = |rows: usize, width: usize, format: Option<QuantFormat>| -> u64 {
        match format.and_then(|f| f.for_width(width)) {
            Some(f) => {
                let g = f.ggml();
                (rows * width / g.block_size() * g.type_size()) as u64
            }
            None => (rows * width) as u64 * s,
        }
    };
    let (d, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let linear = plan.map(|p| p.linear);
    let layer = matrix(h * hd, d, linear)
        + 2 * matrix(kv * hd, d, linear)
        + matrix(d, h * hd, linear)
        + 2 * matrix(i, d, linear)
        + matrix(d, i, linear)
        + (2 * d + 2 * hd) as u64 * s;
    matrix(cfg.vocab_size, d, plan.and_then(|p| p.embedding)) + qwen3::LAYERS_RUN as u64 * layer
}

/// Whether a checkpoint key is read by the model (the host copy keeps only these).
pub fn is_read(key: &str) -> bool {
    if key.starts_with("model.embed_tokens.") {
        return true;
    }
    key.strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse::<usize>().ok())
        .is_some_and(|n| n < qwen3::LAYERS_RUN)
}

/// One configured text encoder as a model of the service's registry.
pub struct EncoderSource {
    pub spec: ModelSpec,
    pub config: Config,
    pub pad_id: u32,
}

impl ModelSource for EncoderSource {
    type Model = Encoder;
    type Error = EncoderError;

    fn device_bytes(&self) -> u64 {
        match &self.spec.gguf {
            // What the file holds: an upper bound (it may carry layers the model never reads).
            Some(path) => std::fs::metadata(path).map_or(0, |m| m.len()),
            None => weight_bytes(&self.config, self.spec.dtype, self.spec.quantize),
        }
    }

    fn host_bytes(&self) -> u64 {
        weight_bytes(&self.config, self.spec.dtype, None)
    }

    fn has_host_copy(&self) -> bool {
        self.spec.gguf.is_none()
    }

    fn read_host(&self) -> Result<HostWeights, EncoderError> {
        let dir = component_dir(&self.spec.model_dir, "text_encoder")?;
        Ok(HostWeights::read(
            &safetensors_files(&dir)?,
            self.spec.dtype,
            is_read,
        )?)
    }

    fn build(&self, host: Option<&HostWeights>, device: &Device) -> Result<Encoder, EncoderError> {
        match host {
            Some(h) => Encoder::from_host(&self.spec, h, self.pad_id, device),
            None => Encoder::load(&self.spec, self.pad_id, device),
        }
    }
}

/// Config and weights from a GGUF file; a `text_encoder/config.json` next to it, if any, must
/// describe the same architecture.
fn gguf_weights<'a>(
    spec: &ModelSpec,
    path: &Path,
    device: &Device,
) -> Result<(Config, Weights<'a>), EncoderError> {
    let file = GgufFile::open(path)?;
    let cfg = file.config()?;
    if let Ok(dir) = component_dir(&spec.model_dir, "text_encoder") {
        let expected: Config = read_config(&dir.join("config.json"))?;
        let shape = |c: &Config| {
            (
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim(),
                c.rope_theta(),
            )
        };
        if shape(&cfg) != shape(&expected) {
            return Err(EncoderError::Config(format!(
                "{} does not match {}: (hidden, intermediate, heads, kv heads, head_dim, rope theta) {:?} vs {:?}",
                path.display(),
                dir.join("config.json").display(),
                shape(&cfg),
                shape(&expected)
            )));
        }
    }
    Ok((cfg, Weights::gguf(file, spec.dtype, device)))
}

/// Bytes of one prompt's embedding on the wire: [`SEQ_LEN`] × 3·hidden × dtype size.
pub fn embedding_bytes(cfg: &Config, dtype: DType) -> u64 {
    (SEQ_LEN * cfg.output_dim() * dtype.size_in_bytes()) as u64
}
