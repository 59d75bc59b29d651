//! Block quantization of linear weights in ggml formats (candle's `QTensor`), shared by the
//! services that quantize at load time: the formats, their names, the load-time setting and a
//! row-parallel quantizer.

use std::{borrow::Cow, fmt, str::FromStr, thread};

use candle_core::{
    Device, Result, Tensor,
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
