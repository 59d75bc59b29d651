//! FLUX.2 transformers in GGUF files, as ComfyUI-GGUF (`tools/convert.py`, then llama.cpp's
//! quantizer) and stable-diffusion.cpp write them: the BFL single-file names ([`bfl`]),
//! optionally under `model.diffusion_model.`, each tensor in its own ggml type (the blocks'
//! projections typically Q4_K … Q8_0, a Q4_K_M file mixing several; norms and small tensors
//! F32; the rest BF16, F16 or quantized too).
//!
//! The block projections the file stores quantized stay in their blocks on the device
//! ([`BlockSource`], taken by `klein_kernels::stacked_linear`): a fused BFL `qkv` is the
//! model's stacked q/k/v as it is, copied from the file's mapping to the device in one piece.
//! Every other tensor is converted to the model dtype when it is read
//! ([`GgufTransformer::var_builder`]), as diffusers' GGUF loader computes with it: F32, F16
//! and BF16 on the device they go to, ggml blocks dequantized on the host.
//! [`write_gguf`] writes such a file from a diffusers or BFL checkpoint.

mod write;

pub use write::{Written, write_gguf};

use std::{borrow::Cow, collections::BTreeMap, path::Path, sync::Arc};

use candle_core::{
    DType, Device, Result, Shape, Tensor,
    quantized::{GgmlDType, QStorage, QTensor},
};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use klein_kernels::{
    BlockSource,
    quant::{StoredRows, dense_dtype, is_block_quantized},
};
use klein_runtime::weights::gguf::{GgufFile, StoredTensor};

use crate::model::bfl::{self, PREFIX, Source};

/// An open GGUF transformer file.
#[derive(Debug)]
pub struct GgufTransformer {
    file: GgufFile,
    /// [`PREFIX`] when the file's names carry it, else empty.
    prefix: &'static str,
}

impl GgufTransformer {
    /// Reads the header and tensor index of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let prefix = if file.tensor_infos().any(|(n, _)| n.starts_with(PREFIX)) {
            PREFIX
        } else {
            ""
        };
        Ok(Self { file, prefix })
    }

    /// Every tensor's shape, under its BFL name (the prefix dropped).
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.bfl_infos()
            .map(|(name, _, shape)| (name.to_owned(), shape.to_vec()))
            .collect()
    }

    /// (BFL name, stored type, shape) of every tensor under the prefix.
    fn bfl_infos(&self) -> impl Iterator<Item = (&str, GgmlDType, &[usize])> {
        self.file.tensor_infos().filter_map(|(name, info)| {
            let name = name.strip_prefix(self.prefix)?;
            Some((name, info.ggml_dtype, info.shape.dims()))
        })
    }

    /// BFL tensor `name` as stored.
    fn stored(&self, name: &str) -> Result<StoredTensor<'_>> {
        self.file.stored(&format!("{}{name}", self.prefix))
    }

    /// A [`VarBuilder`] over the BFL names, each tensor dequantized to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Dense(self.clone())), dtype, device.clone())
    }
}

/// Diffusers names of the block projections: their stored blocks, a fused `qkv`'s rows cut
/// into its three projections.
impl BlockSource for GgufTransformer {
    fn blocks(&self, name: &str) -> Result<Option<StoredRows<'_>>> {
        let (src, chunk) = match bfl::source(name) {
            Some(Source::Plain(src)) => (src, None),
            Some(Source::Chunk3(src, i)) => (src, Some(i)),
            Some(Source::SwapHalves(_)) | None => return Ok(None),
        };
        match self.file.tensor_info(&format!("{}{src}", self.prefix)) {
            Some(info) if is_block_quantized(info.ggml_dtype) => {}
            _ => return Ok(None),
        }
        let t = self.stored(&src)?;
        let (rows, width) = t.shape.dims2()?;
        let rows = match chunk {
            None => 0..rows,
            Some(i) => i * rows / 3..(i + 1) * rows / 3,
        };
        Ok(Some(StoredRows {
            dtype: t.dtype,
            width,
            whole: Cow::Borrowed(t.bytes),
            rows,
        }))
    }

    fn stored(&self) -> Vec<(usize, usize, GgmlDType)> {
        self.bfl_infos()
            .filter(|&(name, dtype, _)| bfl::is_projection(name) && is_block_quantized(dtype))
            .filter_map(|(_, dtype, shape)| match *shape {
                [rows, width] => Some((rows, width, dtype)),
                _ => None,
            })
            .collect()
    }
}

/// The file's tensors under their BFL names, in the model dtype.
struct Dense(Arc<GgufTransformer>);

impl Dense {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = self.0.stored(name)?;
        match dense_dtype(t.dtype) {
            Some(stored) => {
                klein_kernels::upload::tensor_from_bytes(t.bytes, stored, t.shape.dims(), dev)?
                    .to_dtype(dtype)
            }
            None => {
                let host = QStorage::from_data(Cow::Borrowed(t.bytes), &Device::Cpu, t.dtype)?;
                QTensor::new(host, t.shape.clone())?
                    .dequantize(&Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)
            }
        }
    }
}

impl SimpleBackend for Dense {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        bfl::expect_shape(self.load(name, dtype, dev)?, s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0
            .file
            .tensor_info(&format!("{}{name}", self.0.prefix))
            .is_some()
    }
}
