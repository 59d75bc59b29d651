//! Where the text encoder's tensors come from, addressed by their checkpoint (transformers)
//! keys such as `model.layers.3.self_attn.q_proj.weight`.
//!
//! - **safetensors** (the diffusers `text_encoder/` folder, bf16 or f32): norms load in the
//!   model dtype; linear weights load dense, or are quantized at load time by a [`QuantPlan`]
//!   (quantization runs on the host, then the blocks move to the device); the embedding stays
//!   dense unless the plan names a format for it.
//! - **GGUF** (a pre-quantized Qwen3 file in llama.cpp's layout, see [`super::gguf`]): every
//!   tensor keeps the file's format; float tensors become dense in the model dtype.
//!
//! Every loaded tensor is recorded (key, format, bytes) in a [`WeightReport`].

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use candle_core::{DType, Device, Result, Tensor, quantized::QTensor};
use candle_nn::VarBuilder;

use super::{
    gguf::GgufFile,
    quant::{Embedding, Linear, QuantFormat, Quantize, ggml_name, quantize_mapped, quantize_rows},
};

/// How to quantize a safetensors checkpoint at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantPlan {
    /// Format of the attention and MLP projections (rows too narrow for it fall back to a
    /// block-32 format, see [`QuantFormat::for_width`]).
    pub linear: QuantFormat,
    /// Format of the token-embedding table; `None` keeps it in the model dtype.
    pub embedding: Option<QuantFormat>,
}

impl QuantPlan {
    /// The plan for a service's `quantize` setting, if any. The embedding gets q8_0 whatever
    /// the linear format: it halves Qwen3-4B's 0.78 GB bf16 table and costs next to nothing
    /// (fixture prompt 0 with q4_0 projections: rel-L2 vs f32 0.167 with a dense table, 0.168
    /// with q8_0, 0.207 with q4_0).
    pub fn of(quantize: Quantize) -> Option<Self> {
        quantize.format().map(Self::projections_in)
    }

    /// Projections in `linear`'s blocks, the embedding in q8_0 ([`Self::of`]'s plan).
    pub fn projections_in(linear: QuantFormat) -> Self {
        Self {
            linear,
            embedding: Some(QuantFormat::Q8_0),
        }
    }
}

/// One loaded tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRecord {
    /// Checkpoint key.
    pub key: String,
    /// Storage format: a dtype (`bf16`, `f32`) or a ggml block type (`q4k`, `q4_0`, ...).
    pub format: String,
    /// Bytes it occupies on the device.
    pub bytes: u64,
}

/// What was loaded, in which format, and how many bytes it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightReport {
    /// Every tensor, in load order.
    pub tensors: Vec<TensorRecord>,
}

impl WeightReport {
    /// Bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Whether any tensor is held in a ggml block format.
    pub fn has_quantized(&self) -> bool {
        self.tensors.iter().any(|t| t.format.starts_with('q'))
    }

    /// Tensor count and bytes per format.
    pub fn by_format(&self) -> BTreeMap<String, (usize, u64)> {
        let mut out = BTreeMap::new();
        for t in &self.tensors {
            let e = out.entry(t.format.clone()).or_insert((0, 0));
            e.0 += 1;
            e.1 += t.bytes;
        }
        out
    }

    /// A one-line summary, e.g. `bf16: 108 tensors 1.1 MiB; q4k: 189 tensors 1461.9 MiB`.
    pub fn summary(&self) -> String {
        self.by_format()
            .iter()
            .map(|(f, (n, b))| format!("{f}: {n} tensors {:.1} MiB", *b as f64 / (1 << 20) as f64))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

enum Source<'a> {
    Safetensors {
        vb: VarBuilder<'a>,
        plan: Option<QuantPlan>,
    },
    Gguf {
        file: Box<GgufFile>,
        dtype: DType,
        device: Device,
    },
}

/// A tensor source with a key prefix, handed down the model like a `VarBuilder`.
#[derive(Clone)]
pub struct Weights<'a> {
    source: Arc<Source<'a>>,
    report: Arc<Mutex<WeightReport>>,
    prefix: String,
}

impl<'a> Weights<'a> {
    /// Tensors from a safetensors `VarBuilder` (its dtype and device are the model's),
    /// quantized at load time when `plan` is given.
    pub fn safetensors(vb: VarBuilder<'a>, plan: Option<QuantPlan>) -> Self {
        Self::new(Source::Safetensors { vb, plan })
    }

    /// Tensors from a GGUF file, with dense tensors in `dtype` on `device`.
    pub fn gguf(file: GgufFile, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Gguf {
            file: Box::new(file),
            dtype,
            device: device.clone(),
        })
    }

    fn new(source: Source<'a>) -> Self {
        Self {
            source: Arc::new(source),
            report: Arc::default(),
            prefix: String::new(),
        }
    }

    /// The same source under `prefix.name`.
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        Self {
            prefix: if self.prefix.is_empty() {
                name
            } else {
                format!("{}.{name}", self.prefix)
            },
            ..self.clone()
        }
    }

    /// Compute dtype of dense tensors and activations.
    pub fn dtype(&self) -> DType {
        match &*self.source {
            Source::Safetensors { vb, .. } => vb.dtype(),
            Source::Gguf { dtype, .. } => *dtype,
        }
    }

    /// Device the tensors live on.
    pub fn device(&self) -> Device {
        match &*self.source {
            Source::Safetensors { vb, .. } => vb.device().clone(),
            Source::Gguf { device, .. } => device.clone(),
        }
    }

    /// Everything loaded so far through any clone of this source.
    pub fn report(&self) -> WeightReport {
        self.lock_report().clone()
    }

    fn key(&self) -> String {
        format!("{}.weight", self.prefix)
    }

    fn lock_report(&self) -> std::sync::MutexGuard<'_, WeightReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, format: String, bytes: usize) {
        let key = self.key();
        self.lock_report().tensors.push(TensorRecord {
            key,
            format,
            bytes: bytes as u64,
        });
    }

    fn record_dense(&self, t: &Tensor) {
        let format = format!("{:?}", t.dtype()).to_ascii_lowercase();
        self.record(format, t.elem_count() * t.dtype().size_in_bytes());
    }

    fn record_quantized(&self, q: &QTensor) {
        self.record(ggml_name(q.dtype()), q.storage_size_in_bytes());
    }

    /// A GGUF tensor of exactly `shape`.
    fn gguf_tensor(
        file: &GgufFile,
        device: &Device,
        key: &str,
        shape: &[usize],
    ) -> Result<QTensor> {
        let q = file.tensor(key, device)?;
        if q.shape().dims() != shape {
            candle_core::bail!(
                "{key}: shape {:?} in the GGUF file, expected {shape:?}",
                q.shape()
            )
        }
        Ok(q)
    }

    /// The dense gain vector `weight` of an RMSNorm, in the model dtype.
    pub fn norm(&self, size: usize) -> Result<Tensor> {
        let t = match &*self.source {
            Source::Safetensors { vb, .. } => vb.get(size, &self.key())?,
            Source::Gguf {
                file,
                dtype,
                device,
            } => Self::gguf_tensor(file, device, &self.key(), &[size])?
                .dequantize(device)?
                .to_dtype(*dtype)?,
        };
        self.record_dense(&t);
        Ok(t)
    }

    /// The bias-free linear layer whose `weight` is (out_dim, in_dim).
    pub fn linear(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let layer = match &*self.source {
            Source::Safetensors { vb, plan } => {
                match plan.and_then(|p| p.linear.for_width(in_dim)) {
                    Some(format) => Linear::from_qtensor(
                        self.quantize(vb, (out_dim, in_dim), format)?,
                        vb.dtype(),
                    )?,
                    None => {
                        let w = vb.get((out_dim, in_dim), &self.key())?;
                        self.record_dense(&w);
                        Linear::dense(w)
                    }
                }
            }
            Source::Gguf {
                file,
                dtype,
                device,
            } => {
                let q = Self::gguf_tensor(file, device, &self.key(), &[out_dim, in_dim])?;
                self.record_quantized(&q);
                Linear::from_qtensor(q, *dtype)?
            }
        };
        Ok(layer)
    }

    /// The token-embedding table `weight` of shape (vocab, hidden).
    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Embedding> {
        match &*self.source {
            Source::Safetensors { vb, plan } => {
                match plan
                    .and_then(|p| p.embedding)
                    .and_then(|f| f.for_width(hidden))
                {
                    Some(format) => Ok(Embedding::Quantized {
                        table: Box::new(self.quantize(vb, (vocab, hidden), format)?),
                        dtype: vb.dtype(),
                    }),
                    None => {
                        let w = vb.get((vocab, hidden), &self.key())?;
                        self.record_dense(&w);
                        Ok(Embedding::Dense(w))
                    }
                }
            }
            Source::Gguf {
                file,
                dtype,
                device,
            } => {
                let q = Self::gguf_tensor(file, device, &self.key(), &[vocab, hidden])?;
                self.record_quantized(&q);
                Embedding::from_qtensor(q, *dtype)
            }
        }
    }

    /// Loads `weight` in the model's dtype when that is bf16 (a bf16 file's weights as stored,
    /// no conversion, as the transformer's projections are read), else in f32, and quantizes
    /// it for the model's device: on a CUDA device from the checkpoint's bytes where the load
    /// runs inside `with_mapped` and the file stores it in that dtype (`quantize_mapped`),
    /// else from a host read (`quantize_rows`: on a CUDA device there, else across the host's
    /// cores).
    fn quantize(
        &self,
        vb: &VarBuilder<'a>,
        shape: (usize, usize),
        format: QuantFormat,
    ) -> Result<QTensor> {
        let dtype = match vb.dtype() {
            DType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        let name = match vb.prefix().as_str() {
            "" => self.key(),
            prefix => format!("{prefix}.{}", self.key()),
        };
        if let Some(q) = quantize_mapped(&[name], dtype, shape, format.ggml(), vb.device())? {
            self.record_quantized(&q);
            return Ok(q);
        }
        let host = vb
            .clone()
            .set_device(Device::Cpu)
            .set_dtype(dtype)
            .get(shape, &self.key())?;
        let q = quantize_rows(&host, format.ggml(), vb.device())?;
        self.record_quantized(&q);
        Ok(q)
    }
}
