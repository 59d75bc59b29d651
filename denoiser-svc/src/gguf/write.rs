//! A transformer written as a GGUF file in the layout [`super`] reads (ComfyUI-GGUF's: the BFL
//! names, `general.architecture` "flux"), its block projections quantized: a checkpoint is
//! quantized once (`klein quantize`) and then loads without quantizing at every start.

use std::{collections::BTreeMap, path::Path};

use candle_core::{
    DType, Device, Tensor,
    quantized::{QTensor, gguf_file},
};
use klein_kernels::quant::{QuantFormat, to_stored};
use klein_runtime::weights::{gguf, mmap_safetensors};

use crate::{
    model::bfl::{self, Source},
    weights::{Checkpoint, Format, LoadError},
};

/// What [`write_gguf`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Tensors in the file.
    pub tensors: usize,
    /// Of them, projections in the format's blocks.
    pub quantized: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// How a BFL tensor is made from the checkpoint's tensors.
enum Parts {
    /// One tensor as it is.
    Whole(String),
    /// q, k and v stacked into the fused `qkv`, by chunk index.
    Fused(Vec<(usize, String)>),
    /// The final layer's modulation, its two halves swapped back to BFL's (shift, scale).
    Swapped(String),
}

/// Writes `checkpoint`'s transformer to `out`: the block projections in `format`'s blocks (its
/// block-32 fallback where a row is narrower than a k-quant's, dense where no block fits), 1-D
/// tensors in F32, every other tensor in its stored dtype (BF16, F16, else F32; an fp8 weight
/// times its scale in F32). The blocks are quantized on `quantize_on` (the host or a GPU: the
/// same bytes).
pub fn write_gguf(
    checkpoint: &Checkpoint,
    format: QuantFormat,
    out: &Path,
    quantize_on: &Device,
) -> Result<Written, LoadError> {
    let invalid = |reason: String| LoadError::Invalid {
        path: checkpoint.files.first().cloned().unwrap_or_default(),
        reason,
    };
    if checkpoint.format == Format::Gguf {
        return Err(invalid("already a GGUF file".into()));
    }
    let mapped = mmap_safetensors(&checkpoint.files)?;
    let prefix = if checkpoint.prefixed { bfl::PREFIX } else { "" };
    let mut targets: BTreeMap<String, Parts> = BTreeMap::new();
    for (name, _) in mapped.tensors() {
        let source = match checkpoint.format {
            _ if bfl::is_companion(&name) => continue,
            Format::Bfl => match name.strip_prefix(prefix) {
                Some(bfl) => Source::Plain(bfl.to_owned()),
                None => continue,
            },
            _ => bfl::source(&name).ok_or_else(|| invalid(format!("{name} has no BFL name")))?,
        };
        match source {
            Source::Plain(bfl) => {
                targets.insert(bfl, Parts::Whole(name));
            }
            Source::Chunk3(bfl, i) => {
                let parts = targets
                    .entry(bfl)
                    .or_insert_with(|| Parts::Fused(Vec::new()));
                if let Parts::Fused(parts) = parts {
                    parts.push((i, name));
                }
            }
            Source::SwapHalves(bfl) => {
                targets.insert(bfl, Parts::Swapped(name));
            }
        }
    }
    // A tensor of the file, an fp8 weight scaled.
    let load = |name: &str| -> candle_core::Result<Tensor> {
        let t = mapped.load(name, &Device::Cpu)?;
        match bfl::weight_scale(name).filter(|s| mapped.get(s).is_ok()) {
            Some(scale) => bfl::scaled(&t, &mapped.load(&scale, &Device::Cpu)?, DType::F32),
            None => Ok(t),
        }
    };
    let mut stored = Vec::with_capacity(targets.len());
    let mut quantized = 0;
    for (name, parts) in targets {
        let t = match parts {
            Parts::Whole(src) => load(&src)?,
            Parts::Fused(mut parts) => {
                parts.sort_by_key(|&(i, _)| i);
                let parts = parts
                    .iter()
                    .map(|(_, src)| load(src))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
            Parts::Swapped(src) => {
                let t = load(&src)?;
                let half = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, half, half)?, t.narrow(0, 0, half)?], 0)?
            }
        };
        let blocks = match t.dims() {
            &[_, width] if bfl::is_projection(&name) => format.for_width(width),
            _ => None,
        };
        quantized += usize::from(blocks.is_some());
        let q = to_stored(&t, blocks, quantize_on)?;
        stored.push((name, q));
    }
    let bytes = stored
        .iter()
        .map(|(_, q)| q.storage_size_in_bytes() as u64)
        .sum();
    let arch = gguf_file::Value::String("flux".into());
    let version = gguf_file::Value::U32(2);
    let metadata = [
        ("general.architecture", &arch),
        ("general.quantization_version", &version),
    ];
    let tensors: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf::write(out, &metadata, &tensors).map_err(|e| LoadError::Invalid {
        path: out.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Written {
        tensors: stored.len(),
        quantized,
        bytes,
    })
}
