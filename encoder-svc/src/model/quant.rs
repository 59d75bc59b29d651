//! Layers whose weights are either dense (the model dtype) or block-quantized (ggml formats run
//! by candle's quantized matmul on CPU and CUDA).
//!
//! A quantized linear layer keeps its weight in ggml blocks on the device. On the host it runs
//! candle's quantized matmul, which also quantizes the activations to 8 bits per block (Q8_K).
//! On CUDA every call carries 512 tokens per prompt, a prefill-sized GEMM: there the weight is
//! dequantized to the activation dtype for the call (`klein_kernels::dequantize`: Q4_K straight
//! to bf16 in one pass) and multiplied by cuBLAS, which keeps the activations unquantized (only
//! one projection is ever dense at a time). Norm weights always stay dense.

use std::sync::Arc;

use candle_core::{
    DType, Module, Result, Tensor,
    quantized::{GgmlDType, QTensor},
};
pub use klein_kernels::quant::{
    ParseQuantFormatError, QuantFormat, Quantize, ggml_name, quantize_mapped, quantize_rows,
};

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
