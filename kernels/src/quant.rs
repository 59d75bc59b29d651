//! Block quantization of linear weights in ggml formats (candle's `QTensor`), shared by the
//! services that quantize at load time: the formats, their names, the load-time setting, a
//! row-parallel quantizer, and stacks of row ranges of stored blocks (GGUF projections).

use std::{borrow::Cow, fmt, ops::Range, str::FromStr, thread};

use candle_core::{
    DType, Device, Result, Tensor,
    quantized::{GgmlDType, QStorage, QTensor},
};

#[cfg(feature = "cuda")]
mod device;
mod mapped;

pub use mapped::{MappedTensors, quantize_mapped, with_mapped};

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
    /// the one with the best accuracy per byte at a similar size (measured on the encoder's
    /// fixtures; see encoder-svc's crate docs).
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

/// A service's load-time quantization setting: `none` or a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantize {
    /// Keep every weight in the compute dtype.
    #[default]
    None,
    /// Quantize the layers the service quantizes to this format.
    Format(QuantFormat),
}

impl Quantize {
    /// The format, if any.
    pub fn format(self) -> Option<QuantFormat> {
        match self {
            Self::None => None,
            Self::Format(f) => Some(f),
        }
    }
}

impl FromStr for Quantize {
    type Err = ParseQuantFormatError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Self::None),
            other => other.parse().map(Self::Format),
        }
    }
}

impl fmt::Display for Quantize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Format(q) => q.fmt(f),
        }
    }
}

impl serde::Serialize for Quantize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Quantize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Quantizes a host (rows, width) tensor (any float dtype) to `format` on `device`, with the
/// bytes of a single-threaded `QTensor::quantize`. On a CUDA device the formats of
/// [`QuantFormat`] are quantized there (`quant/device.rs`; a zero scale may carry the other
/// sign, where the host's own sign is unspecified). Otherwise ggml blocks never cross a
/// row and candle converts and quantizes on one thread, so the rows are split over the host's
/// cores, each part converted to f32 and quantized there, and the blocks concatenated.
pub fn quantize_rows(host: &Tensor, format: GgmlDType, device: &Device) -> Result<QTensor> {
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(dev), Some(stem)) = (device, device::kernel(format)) {
        return device::quantize_rows(host, format, stem, dev);
    }
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
                        .to_dtype(DType::F32)?
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
    let storage = crate::upload::blocks(&parts.concat(), format, device)?;
    QTensor::new(storage, (rows, width))
}

/// `t` (on the host) as a file stores it, on the host: in `blocks`' format, quantized on
/// `quantize_on` ([`quantize_rows`]: a CUDA device's kernels write the host quantizer's bytes),
/// else dense, vectors in F32 and matrices in their own dtype (BF16, F16; anything else F32).
pub fn to_stored(t: &Tensor, blocks: Option<QuantFormat>, quantize_on: &Device) -> Result<QTensor> {
    match blocks {
        Some(format) => {
            let q = quantize_rows(t, format.ggml(), quantize_on)?;
            if q.device().is_cpu() {
                return Ok(q);
            }
            let host = QStorage::from_data(q.data()?, &Device::Cpu, q.dtype())?;
            QTensor::new(host, q.shape())
        }
        None => {
            let dense = match t.dtype() {
                DType::BF16 if t.rank() > 1 => GgmlDType::BF16,
                DType::F16 if t.rank() > 1 => GgmlDType::F16,
                _ => GgmlDType::F32,
            };
            QTensor::quantize(t, dense)
        }
    }
}

/// Bytes `elements` weights take in `dtype`'s blocks.
pub fn stored_bytes(dtype: GgmlDType, elements: usize) -> usize {
    elements / dtype.block_size() * dtype.type_size()
}

/// The dense dtype of a ggml type that is one (F32, F16, BF16); `None` for block formats.
pub fn dense_dtype(dtype: GgmlDType) -> Option<DType> {
    match dtype {
        GgmlDType::F32 => Some(DType::F32),
        GgmlDType::F16 => Some(DType::F16),
        GgmlDType::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Whether `dtype` is a block-quantized format (not F32, F16 or BF16).
pub fn is_block_quantized(dtype: GgmlDType) -> bool {
    dense_dtype(dtype).is_none()
}

/// Rows of a 2-D tensor in ggml blocks, as a file stores it: ggml blocks run along a row, so a
/// row range is a byte range of the stored tensor.
#[derive(Debug, Clone)]
pub struct StoredRows<'a> {
    pub dtype: GgmlDType,
    /// Weights a row.
    pub width: usize,
    /// The whole stored tensor the rows belong to.
    pub whole: Cow<'a, [u8]>,
    /// Which of its rows.
    pub rows: Range<usize>,
}

impl StoredRows<'_> {
    fn row_bytes(&self) -> usize {
        stored_bytes(self.dtype, self.width)
    }

    /// The rows' bytes; an error where they run past the stored tensor.
    fn bytes(&self) -> Result<&[u8]> {
        let n = self.row_bytes();
        self.whole
            .get(self.rows.start * n..self.rows.end * n)
            .ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "rows {:?} of a {}-row tensor",
                    self.rows,
                    self.whole.len() / n.max(1)
                ))
            })
    }

    /// `next`, when it continues these rows in the same stored tensor, joined to them.
    fn join(&self, next: &Self) -> Option<Self> {
        let same = std::ptr::eq(self.whole.as_ptr(), next.whole.as_ptr())
            && self.whole.len() == next.whole.len()
            && (self.dtype, self.width) == (next.dtype, next.width);
        (same && self.rows.end == next.rows.start).then(|| Self {
            rows: self.rows.start..next.rows.end,
            ..self.clone()
        })
    }
}

/// Row ranges of one block type and width stacked, on `device`: ranges that continue each
/// other in one stored tensor (a fused q/k/v read as its three projections) go to the device
/// as the one range they are, without a copy on the host.
pub fn stack_rows(parts: &[StoredRows<'_>], device: &Device) -> Result<QTensor> {
    let Some(first) = parts.first() else {
        candle_core::bail!("stacking no tensors")
    };
    let (dtype, width) = (first.dtype, first.width);
    let mut runs: Vec<StoredRows<'_>> = Vec::new();
    for part in parts {
        if (part.dtype, part.width) != (dtype, width) {
            candle_core::bail!(
                "stacking {:?} rows of width {} onto {dtype:?} rows of width {width}",
                part.dtype,
                part.width
            )
        }
        match runs.last().and_then(|run| run.join(part)) {
            Some(joined) => *runs.last_mut().expect("a run was joined") = joined,
            None => runs.push(part.clone()),
        }
    }
    let rows = parts.iter().map(|p| p.rows.len()).sum::<usize>();
    let data = match runs.as_slice() {
        [run] => Cow::Borrowed(run.bytes()?),
        runs => Cow::Owned(
            runs.iter()
                .map(StoredRows::bytes)
                .collect::<Result<Vec<_>>>()?
                .concat(),
        ),
    };
    QTensor::new(crate::upload::blocks(&data, dtype, device)?, (rows, width))
}

/// A short lowercase name of a ggml block type, for reports (`q4k`, `q6k`, `f32`, ...).
pub fn ggml_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}").to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_tensors_keep_their_dtype_or_take_the_blocks_asked_for() -> Result<()> {
        let dev = Device::Cpu;
        let m = Tensor::randn(0f32, 1.0, (4, 64), &dev)?;
        let stored = |t: &Tensor, blocks| to_stored(t, blocks, &dev).map(|q| q.dtype());
        assert_eq!(stored(&m.to_dtype(DType::BF16)?, None)?, GgmlDType::BF16);
        assert_eq!(stored(&m.to_dtype(DType::F16)?, None)?, GgmlDType::F16);
        assert_eq!(stored(&m, None)?, GgmlDType::F32);
        let v = m.get(0)?.to_dtype(DType::BF16)?;
        assert_eq!(stored(&v, None)?, GgmlDType::F32, "vectors in F32");
        let bf16 = m.to_dtype(DType::BF16)?;
        let q = to_stored(&bf16, Some(QuantFormat::Q8_0), &dev)?;
        assert_eq!(q.dtype(), GgmlDType::Q8_0);
        assert_eq!(
            q.data()?,
            QTensor::quantize(&bf16.to_dtype(DType::F32)?, GgmlDType::Q8_0)?.data()?,
            "the bf16 matrix's blocks are those of its values in f32"
        );
        Ok(())
    }

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
        let w16 = w.to_dtype(DType::BF16).unwrap();
        for f in [QuantFormat::Q4_0, QuantFormat::Q8_0] {
            let whole = QTensor::quantize(&w, f.ggml()).unwrap();
            let split = quantize_rows(&w, f.ggml(), &Device::Cpu).unwrap();
            assert_eq!(split.shape(), whole.shape());
            assert_eq!(split.data().unwrap(), whole.data().unwrap(), "{f}");
            // A bf16 source converts in the threads: the blocks of its f32 values.
            let whole = QTensor::quantize(&w16, f.ggml()).unwrap();
            let split = quantize_rows(&w16, f.ggml(), &Device::Cpu).unwrap();
            assert_eq!(
                split.data().unwrap(),
                whole.data().unwrap(),
                "{f} from bf16"
            );
        }
    }

    #[test]
    fn row_ranges_and_stacks_are_the_rows_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 64), &dev)?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let all = q.dequantize(&dev)?;
        let data = q.data()?;
        fn rows(whole: &[u8], rows: Range<usize>) -> StoredRows<'_> {
            StoredRows {
                dtype: GgmlDType::Q8_0,
                width: 64,
                whole: Cow::Borrowed(whole),
                rows,
            }
        }
        let copy = data.to_vec();
        let stacked = |parts: &[StoredRows<'_>]| -> Result<Vec<Vec<f32>>> {
            stack_rows(parts, &dev)?.dequantize(&dev)?.to_vec2::<f32>()
        };
        // Ranges that continue each other in one tensor are joined; others are not.
        let joined = [rows(&data, 0..2), rows(&data, 2..3), rows(&data, 3..6)];
        assert!(joined[0].join(&joined[1]).is_some_and(|j| j.rows == (0..3)));
        assert!(joined[0].join(&joined[2]).is_none());
        assert!(joined[0].join(&rows(&copy, 2..3)).is_none());
        assert_eq!(stacked(&joined)?, all.to_vec2::<f32>()?);
        let apart = [rows(&data, 3..6), rows(&copy, 0..2), rows(&data, 2..3)];
        let want = Tensor::cat(
            &[
                all.narrow(0, 3, 3)?,
                all.narrow(0, 0, 2)?,
                all.narrow(0, 2, 1)?,
            ],
            0,
        )?;
        assert_eq!(stacked(&apart)?, want.to_vec2::<f32>()?);
        assert_eq!(
            stacked(&[rows(&copy, 2..3)])?,
            all.narrow(0, 2, 1)?.to_vec2::<f32>()?
        );
        assert!(stack_rows(&[rows(&data, 4..7)], &dev).is_err());
        let other = StoredRows {
            dtype: GgmlDType::Q4_0,
            ..rows(&data, 0..1)
        };
        assert!(stack_rows(&[rows(&data, 0..1), other], &dev).is_err());
        assert!(stack_rows(&[], &dev).is_err());
        Ok(())
    }

    #[test]
    fn block_types_and_their_bytes() {
        assert_eq!(stored_bytes(GgmlDType::Q8_0, 64), 68);
        assert_eq!(stored_bytes(GgmlDType::Q4K, 512), 288);
        assert_eq!(stored_bytes(GgmlDType::BF16, 3), 6);
        assert!(is_block_quantized(GgmlDType::Q6K));
        assert!(!is_block_quantized(GgmlDType::BF16));
    }

    #[test]
    fn names_round_trip() {
        for f in QuantFormat::ALL {
            assert_eq!(f.to_string().parse::<QuantFormat>().unwrap(), f);
            assert_eq!(
                Quantize::Format(f).to_string().parse::<Quantize>().unwrap(),
                Quantize::Format(f)
            );
        }
        assert!("int4".parse::<QuantFormat>().is_err());
        assert_eq!("none".parse::<Quantize>().unwrap(), Quantize::None);
        assert_eq!(ggml_name(GgmlDType::Q4K), "q4k");
    }
}
