//! The tensor codec: [`pb::Tensor`] (raw little-endian row-major bytes) <-> candle [`Tensor`].
//!
//! [`decode`] checks, in this order and before any allocation: a known dtype, a rank in
//! `1..=max_rank`, no zero dimension, a shape product that does not overflow and stays within
//! `max_elements`, and a byte length equal to `elements * size_of(dtype)`. Every failure is a
//! typed [`TensorCodecError`]; [`FieldError`] names the request field and maps to
//! `INVALID_ARGUMENT`.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};

use crate::pb;

/// Bounds a received tensor must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted rank.
    pub max_rank: usize,
    /// Largest accepted element count.
    pub max_elements: u64,
}

impl Default for Limits {
    /// Rank 8 and 64 Mi elements (the 64 MiB message limit holds fewer for every dtype but u8).
    fn default() -> Self {
        Self {
            max_rank: 8,
            max_elements: 64 * 1024 * 1024,
        }
    }
}

/// Why a wire tensor was refused (decode) or cannot be sent (encode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorCodecError {
    #[error("is required")]
    Missing,
    #[error("dtype is unspecified")]
    UnspecifiedDtype,
    #[error("unknown dtype value {0}")]
    UnknownDtype(i32),
    #[error("rank {rank} is outside 1..={max}")]
    Rank { rank: usize, max: usize },
    #[error("dimension {axis} is zero (empty tensors are not accepted)")]
    ZeroDim { axis: usize },
    #[error("shape {shape:?} has more than {max} elements")]
    TooManyElements { shape: Vec<u64>, max: u64 },
    #[error("data has {actual} bytes, shape and dtype need {expected}")]
    ByteLength { expected: u64, actual: u64 },
    #[error("dtype {0:?} cannot travel on the wire")]
    UnsupportedDtype(DType),
    #[error("candle: {0}")]
    Candle(String),
}

/// A [`TensorCodecError`] at a named request field; becomes `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {source}")]
pub struct FieldError {
    /// The request field, e.g. `prompt_embeds` or `inpaint.mask`.
    pub field: String,
    /// What was wrong with it.
    pub source: TensorCodecError,
}

impl TensorCodecError {
    /// Attaches the request field this tensor came from.
    pub fn at(self, field: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            source: self,
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(err: FieldError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// The candle dtype of a wire dtype value.
pub fn dtype_from_wire(value: i32) -> Result<DType, TensorCodecError> {
    match pb::Dtype::try_from(value) {
        Ok(pb::Dtype::Unspecified) => Err(TensorCodecError::UnspecifiedDtype),
        Ok(pb::Dtype::F32) => Ok(DType::F32),
        Ok(pb::Dtype::Bf16) => Ok(DType::BF16),
        Ok(pb::Dtype::F16) => Ok(DType::F16),
        Ok(pb::Dtype::U8) => Ok(DType::U8),
        Ok(pb::Dtype::I64) => Ok(DType::I64),
        Err(_) => Err(TensorCodecError::UnknownDtype(value)),
    }
}

/// The wire dtype of a candle dtype.
pub fn dtype_to_wire(dtype: DType) -> Result<pb::Dtype, TensorCodecError> {
    match dtype {
        DType::F32 => Ok(pb::Dtype::F32),
        DType::BF16 => Ok(pb::Dtype::Bf16),
        DType::F16 => Ok(pb::Dtype::F16),
        DType::U8 => Ok(pb::Dtype::U8),
        DType::I64 => Ok(pb::Dtype::I64),
        other => Err(TensorCodecError::UnsupportedDtype(other)),
    }
}

/// A wire tensor's validated header: dtype and shape, with `data` known to fit them exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, each >= 1.
    pub shape: Vec<usize>,
}

/// Validates a wire tensor's header against its data length; allocates nothing large.
pub fn check(tensor: &pb::Tensor, limits: &Limits) -> Result<Checked, TensorCodecError> {
    let dtype = dtype_from_wire(tensor.dtype)?;
    let rank = tensor.shape.len();
    if rank == 0 || rank > limits.max_rank {
        return Err(TensorCodecError::Rank {
            rank,
            max: limits.max_rank,
        });
    }
    let too_many = || TensorCodecError::TooManyElements {
        shape: tensor.shape.clone(),
        max: limits.max_elements,
    };
    let mut elements: u64 = 1;
    for (axis, &dim) in tensor.shape.iter().enumerate() {
        if dim == 0 {
            return Err(TensorCodecError::ZeroDim { axis });
        }
        elements = elements.checked_mul(dim).ok_or_else(too_many)?;
    }
    if elements > limits.max_elements {
        return Err(too_many());
    }
    let expected = elements
        .checked_mul(dtype.size_in_bytes() as u64)
        .ok_or_else(too_many)?;
    let actual = tensor.data.len() as u64;
    if expected != actual {
        return Err(TensorCodecError::ByteLength { expected, actual });
    }
    let shape = tensor
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| too_many()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Checked { dtype, shape })
}

/// Decodes a wire tensor onto `device` with the default [`Limits`].
pub fn decode(tensor: &pb::Tensor, device: &Device) -> Result<Tensor, TensorCodecError> {
    decode_with_limits(tensor, device, &Limits::default())
}

/// Decodes a wire tensor onto `device`, refusing anything outside `limits`.
pub fn decode_with_limits(
    tensor: &pb::Tensor,
    device: &Device,
    limits: &Limits,
) -> Result<Tensor, TensorCodecError> {
    let checked = check(tensor, limits)?;
    Tensor::from_raw_buffer(&tensor.data, checked.dtype, &checked.shape, device)
        .map_err(|e| TensorCodecError::Candle(e.to_string()))
}

/// Index of the first NaN or infinite element of a float wire tensor, read from its bytes (an
/// all-ones exponent) without decoding it; `None` when every element is finite or the dtype is
/// not a float one. Blocks are checked branch-free (the compiler vectorises them); only a
/// block that holds one is searched.
pub fn first_non_finite(tensor: &pb::Tensor) -> Option<usize> {
    fn find<const N: usize>(data: &[u8], exponent: u32) -> Option<usize> {
        const BLOCK: usize = 4096;
        let bits = |c: &[u8]| {
            let mut word = [0u8; 4];
            word[..N].copy_from_slice(c);
            u32::from_le_bytes(word) & exponent == exponent
        };
        data.chunks(BLOCK * N).enumerate().find_map(|(b, block)| {
            let any = block.chunks_exact(N).fold(false, |acc, c| acc | bits(c));
            if any {
                block.chunks_exact(N).position(bits).map(|i| b * BLOCK + i)
            } else {
                None
            }
        })
    }
    match pb::Dtype::try_from(tensor.dtype).ok()? {
        pb::Dtype::F32 => find::<4>(&tensor.data, 0x7F80_0000),
        pb::Dtype::Bf16 => find::<2>(&tensor.data, 0x7F80),
        pb::Dtype::F16 => find::<2>(&tensor.data, 0x7C00),
        _ => None,
    }
}

/// A vector of plain numbers seen as its bytes, so that [`Bytes`] can own it without a copy.
struct VecBytes<T>(Vec<T>);

impl<T: bytemuck::Pod> AsRef<[u8]> for VecBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// The elements of `tensor` (row-major, read once from its device) as owned bytes.
fn element_bytes<T>(tensor: &Tensor) -> Result<Bytes, TensorCodecError>
where
    T: candle_core::WithDType + bytemuck::Pod,
{
    let values = tensor
        .flatten_all()
        .and_then(|t| t.to_vec1::<T>())
        .map_err(|e| TensorCodecError::Candle(e.to_string()))?;
    Ok(Bytes::from_owner(VecBytes(values)))
}

/// Encodes a candle tensor (any device, any layout) as a contiguous little-endian wire tensor.
/// The elements are copied once, from the tensor's storage (on any device) into bytes the
/// message owns.
pub fn encode(tensor: &Tensor) -> Result<pb::Tensor, TensorCodecError> {
    let dtype = dtype_to_wire(tensor.dtype())?;
    let shape = tensor.dims().iter().map(|&d| d as u64).collect();
    let data = match dtype {
        pb::Dtype::F32 => element_bytes::<f32>(tensor)?,
        pb::Dtype::Bf16 => element_bytes::<half::bf16>(tensor)?,
        pb::Dtype::F16 => element_bytes::<half::f16>(tensor)?,
        pb::Dtype::U8 => element_bytes::<u8>(tensor)?,
        pb::Dtype::I64 => element_bytes::<i64>(tensor)?,
        pb::Dtype::Unspecified => return Err(TensorCodecError::UnspecifiedDtype),
    };
    Ok(pb::Tensor {
        dtype: dtype as i32,
        shape,
        data,
    })
}

/// Decodes an optional message field that the request requires.
pub fn decode_required(
    tensor: Option<&pb::Tensor>,
    field: &str,
    device: &Device,
    limits: &Limits,
) -> Result<Tensor, FieldError> {
    let tensor = tensor.ok_or_else(|| TensorCodecError::Missing.at(field))?;
    decode_with_limits(tensor, device, limits).map_err(|e| e.at(field))
}
