//! Device and dtype selection. `cpu` always works; `cuda` / `cuda:N` needs a build with the
//! `cuda` feature and a visible GPU, and fails fast with a clear message otherwise.

use std::{fmt, str::FromStr};

use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU.
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

/// A device that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("invalid device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    Parse(String),
    #[error("device cuda:{0} was asked for, but this binary was built without the `cuda` feature")]
    CudaNotBuilt(usize),
    #[error("device cuda:{ordinal} is not available: {reason}")]
    CudaUnavailable { ordinal: usize, reason: String },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, failing fast when CUDA is asked for but not built or not present.
    pub fn open(&self) -> Result<Device, DeviceError> {
        match *self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) if !cfg!(feature = "cuda") => {
                Err(DeviceError::CudaNotBuilt(ordinal))
            }
            Self::Cuda(ordinal) => {
                let device =
                    Device::new_cuda(ordinal).map_err(|e| DeviceError::CudaUnavailable {
                        ordinal,
                        reason: e.to_string(),
                    })?;
                without_event_tracking(&device);
                Ok(device)
            }
        }
    }
}

/// Stops cudarc from creating and destroying two CUDA events with every buffer: it records them
/// only to order work across streams it created (`CudaContext::new_stream`, `fork`), and nothing
/// here creates one: every kernel, copy and free of a device goes to the one stream candle opens
/// for it (CUDA's per-thread default stream), which cudarc never orders against another.
/// At a step's head, where the GPU waits for the host to queue small kernels, those four driver
/// calls per buffer were a measurable part of the host's time (docs/performance.md, 32nd session).
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn without_event_tracking(device: &Device) {
    if let Device::Cuda(cuda) = device {
        // SAFETY: cudarc's events only order a buffer's uses across streams of its own, and no
        // such stream is ever created on this context (see above); buffers created before this
        // call (none: the device was just opened) would keep their events.
        unsafe { cuda.disable_event_tracking() };
    }
}

#[cfg(not(feature = "cuda"))]
fn without_event_tracking(_: &Device) {}

/// Compute dtype of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// float32.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// float16 (refused by the VAE and the text encoder: activations overflow).
    F16,
}

/// A dtype name that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid dtype {0:?}: expected \"f32\", \"bf16\" or \"f16\"")]
pub struct ParseDTypeError(String);

impl FromStr for DTypeSpec {
    type Err = ParseDTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            _ => Err(ParseDTypeError(s.to_owned())),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl From<DTypeSpec> for DType {
    fn from(spec: DTypeSpec) -> Self {
        match spec {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::Bf16 => DType::BF16,
            DTypeSpec::F16 => DType::F16,
        }
    }
}

/// Serde through `Display` / `FromStr`, so config files and env vars use the same words as
/// flags.
macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_str!(DeviceSpec);
serde_via_str!(DTypeSpec);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        let cases: &[(&str, Option<DeviceSpec>)] = &[
            ("cpu", Some(DeviceSpec::Cpu)),
            ("CPU", Some(DeviceSpec::Cpu)),
            ("cuda", Some(DeviceSpec::Cuda(0))),
            ("cuda:3", Some(DeviceSpec::Cuda(3))),
            ("cuda:", None),
            ("cuda:x", None),
            ("tpu", None),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<DeviceSpec>().ok(), *want, "{text:?}");
        }
    }

    #[test]
    fn cpu_opens_and_cuda_fails_fast_without_the_feature() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).open().unwrap_err();
            assert!(matches!(err, DeviceError::CudaNotBuilt(0)), "{err}");
        }
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!("bf16".parse::<DTypeSpec>().unwrap(), DTypeSpec::Bf16);
        assert_eq!("float32".parse::<DTypeSpec>().unwrap(), DTypeSpec::F32);
        assert!("int8".parse::<DTypeSpec>().is_err());
        assert_eq!(DType::from(DTypeSpec::Bf16), DType::BF16);
    }
}
