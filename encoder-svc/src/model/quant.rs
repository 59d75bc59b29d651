//! Layers whose weights are either dense (the model dtype) or block-quantized (ggml formats run
//! by candle's quantized matmul on CPU and CUDA).
//!
//! A quantized linear layer keeps its weight in ggml blocks on the device. On the host it runs
//! candle's quantized matmul, which also quantizes the activations to 8 bits per block (Q8_K).
//! On CUDA every call carries 512 tokens per prompt, a prefill-sized GEMM: there the weight is
//! dequantized to the activation dtype for the call (`klein_kernels::dequantize`: Q4_K straight
//! to bf16 in one pass) and multiplied by cuBLAS, which keeps the activations unquantized (only
//! one projection is ever dense at a time). Norm weights always stay dense.

use std::{borrow::Cow, fmt, str::FromStr, sync::Arc, thread};

use candle_core::{
    DType, Device, Module, Result, Tensor,
    quantized::{GgmlDType, QStorage, QTensor},
};

/// A block-quantization format for the linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// k-quant, 4.5 bits per weight, super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4K,
    /// 4.5 bits per weight, blocks of 32 with one f16 scale.
    Q4_0,
    /// 5 bits per weight, blocks of 32 with an f16 scale and an f16 min.
    Q4_1,
    /// k-quant, 6.56 bits per weight, super-blocks of 256.
    Q6K,
    /// 8.5 bits per weight, blocks of 32.
    Q8_0,
}

/// A format name that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseQuantFormatError(String);

impl fmt::Display for ParseQuantFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown quantization {:?}: expected q4k, q4_0, q4_1, q6k or q8_0",
            self.0
        )
    }
}

impl std::error::Error for ParseQuantFormatError {}

impl QuantFormat {
    /// Every format, for reports and tests.
    pub const ALL: [QuantFormat; 5] = [Self::Q4K, Self::Q4_0, Self::Q4_1, Self::Q6K, Self::Q8_0];

    /// The candle/ggml block type.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4K => GgmlDType::Q4K,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Weights per block: a row's width must be a multiple of it.
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// The block-32 format used for rows whose width is not a multiple of a k-quant's 256:
    /// the one with the best accuracy per byte at a similar size (measured on the fixtures;
    /// see the crate docs).
    fn block32_fallback(self) -> Self {
        match self {
            Self::Q4K | Self::Q4_0 => Self::Q4_0,
            Self::Q4_1 => Self::Q4_1,
            Self::Q6K | Self::Q8_0 => Self::Q8_0,
        }
    }

    /// The format a weight with rows of `width` elements gets: this one when the width is a
    /// multiple of its block, else its block-32 fallback, else none (the weight stays dense).
    pub fn for_width(self, width: usize) -> Option<Self> {
        [self, self.block32_fallback()]
            .into_iter()
            .find(|f| width.is_multiple_of(f.block_size()))
    }
}

impl FromStr for QuantFormat {
    type Err = ParseQuantFormatError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q4k" | "q4_k" => Ok(Self::Q4K),
            "q4_0" => Ok(Self::Q4_0),
            "q4_1" => Ok(Self::Q4_1),
            "q6k" | "q6_k" => Ok(Self::Q6K),
            "q8_0" => Ok(Self::Q8_0),
            _ => Err(ParseQuantFormatError(s.to_owned())),
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Q4K => "q4k",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q6K => "q6k",
            Self::Q8_0 => "q8_0",
        })
    }
}

/// Quantizes a host (rows, width) tensor to `format` on `device`. ggml blocks never cross a
/// row and candle quantizes on one thread, so the rows are split over the host's cores and the
/// blocks concatenated: the bytes equal a single-threaded `QTensor::quantize`.
pub fn quantize_rows(host: &Tensor, format: GgmlDType, device: &Device) -> Result<QTensor> {
    let (rows, width) = host.dims2()?;
    let threads = thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = rows.div_ceil(threads.clamp(1, rows.max(1)));
    let parts: Vec<_> = thread::scope(|scope| {
        let jobs: Vec<_> = (0..rows)
            .step_by(chunk.max(1))
            .map(|start| {
                scope.spawn(move || -> Result<Vec<u8>> {
                    // A compact copy: `QTensor::quantize` reads its source's storage from
                    // the start, ignoring a view's offset.
                    let part = host
                        .narrow(0, start, chunk.min(rows - start))?
                        .force_contiguous()?;
                    Ok(QTensor::quantize(&part, format)?.data()?.into_owned())
                })
            })
            .collect();
        jobs.into_iter().map(|job| job.join()).collect()
    });
    let parts = parts
        .into_iter()
        .map(|p| p.map_err(|_| candle_core::Error::msg("a quantization thread panicked"))?)
        .collect::<Result<Vec<_>>>()?;
    let storage = QStorage::from_data(Cow::Owned(parts.concat()), device, format)?;
    QTensor::new(storage, (rows, width))
}

/// A short lowercase name of a ggml block type, for reports (`q4k`, `q6k`, `f32`, ...).
pub fn ggml_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_ascii_lowercase()
}

/// A bias-free linear layer `y = x Wᵀ`, dense or quantized.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Weight (out, in) in the model dtype.
    Dense(candle_nn::Linear),
    /// Block-quantized weight (out, in).
    Quantized(Arc<QTensor>),
}

impl Linear {
    /// A dense layer from an (out, in) weight.
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }

    /// A quantized layer; float "quantized" tensors (f32/f16/bf16 in a GGUF file) become dense
    /// layers in `dtype`.
    pub fn from_qtensor(weight: QTensor, dtype: DType) -> Result<Self> {
        match weight.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(Self::dense(
                weight.dequantize(&weight.device())?.to_dtype(dtype)?,
            )),
            _ => Ok(Self::Quantized(Arc::new(weight))),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::Quantized(w) if x.device().is_cuda() => {
                let dense = klein_kernels::dequantize(w, x.dtype())?;
                candle_nn::Linear::new(dense, None).forward(x)
            }
            Self::Quantized(w) => x.contiguous()?.apply_op1_no_bwd(w.as_ref()),
        }
    }
}

/// A token-embedding table, dense or quantized.
#[derive(Debug)]
pub enum Embedding {
    /// Table (vocab, hidden) in the model dtype.
    Dense(Tensor),
    /// Block-quantized table (vocab, hidden); looked-up rows are dequantized to the model dtype.
    Quantized { table: Box<QTensor>, dtype: DType },
}

impl Embedding {
    /// A quantized table; a float one (f32/f16/bf16 in a GGUF file) becomes dense in `dtype`.
    pub fn from_qtensor(table: QTensor, dtype: DType) -> Result<Self> {
        match table.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => Ok(Self::Dense(
                table.dequantize(&table.device())?.to_dtype(dtype)?,
            )),
            _ => Ok(Self::Quantized {
                table: Box::new(table),
                dtype,
            }),
        }
    }

    /// Rows of the table for `ids` (B, L) -> (B, L, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(table) => {
                let (b, l) = ids.dims2()?;
                let hidden = table.dim(1)?;
                table
                    .index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, l, hidden))
            }
            Self::Quantized { table, dtype } => table.embedding(ids)?.to_dtype(*dtype),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_quants_fall_back_to_block_32_formats_on_narrow_rows() {
        assert_eq!(QuantFormat::Q4K.for_width(2560), Some(QuantFormat::Q4K));
        assert_eq!(QuantFormat::Q4K.for_width(64), Some(QuantFormat::Q4_0));
        assert_eq!(QuantFormat::Q6K.for_width(128), Some(QuantFormat::Q8_0));
        assert_eq!(QuantFormat::Q4_1.for_width(64), Some(QuantFormat::Q4_1));
        assert_eq!(QuantFormat::Q4K.for_width(48), None);
    }

    #[test]
    fn row_parallel_quantization_gives_the_same_blocks() {
        let w = Tensor::randn(0f32, 1.0, (37, 64), &Device::Cpu).unwrap();
        for f in [QuantFormat::Q4_0, QuantFormat::Q8_0] {
            let whole = QTensor::quantize(&w, f.ggml()).unwrap();
            let split = quantize_rows(&w, f.ggml(), &Device::Cpu).unwrap();
            assert_eq!(split.shape(), whole.shape());
            assert_eq!(split.data().unwrap(), whole.data().unwrap(), "{f}");
        }
    }

    #[test]
    fn names_round_trip() {
        for f in QuantFormat::ALL {
            assert_eq!(f.to_string().parse::<QuantFormat>().unwrap(), f);
        }
        assert!("int4".parse::<QuantFormat>().is_err());
        assert_eq!(ggml_name(GgmlDType::Q4K), "q4k");
    }
}
