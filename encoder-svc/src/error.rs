//! The service's one error type and its single mapping to gRPC status codes.

use klein_runtime::{
    budget::AdmissionError, device::DeviceError, engine::EngineError, gpu_memory,
    models::RegistryError, server::ServeError, tls::TlsError, weights::WeightsError,
};

use crate::prompt::TokenizerError;

/// Everything that can go wrong in encoder-svc, from startup to a request.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// Bad request input; names the field.
    #[error("{field}: {reason}")]
    Validation { field: String, reason: String },
    /// The memory budget refused the request.
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The engine thread is gone or the job panicked.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A bad or inconsistent configuration (startup only).
    #[error("configuration: {0}")]
    Config(String),
    /// The weights plus runtime overhead do not fit the memory budget (startup only).
    #[error(
        "gpu_memory_budget {budget} bytes is too small: weights take {weights} bytes and the runtime needs {overhead} more"
    )]
    BudgetTooSmall {
        budget: u64,
        weights: u64,
        overhead: u64,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("tensor codec: {0}")]
    Codec(#[from] klein_proto::tensor::TensorCodecError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The model registry: an unknown model, or a configuration it cannot hold.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl EncoderError {
    /// A validation error on `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A stable label for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation { .. } => "validation",
            Self::Admission(_) => "admission",
            Self::Engine(EngineError::Stopped) => "unavailable",
            Self::Engine(EngineError::Panicked(_)) => "panic",
            Self::Config(_) | Self::BudgetTooSmall { .. } | Self::Tls(_) => "config",
            Self::Tokenizer(_) => "tokenizer",
            Self::Weights(_) | Self::Device(_) | Self::Io(_) => "startup",
            Self::Model(_) | Self::Codec(_) => "model",
            Self::Serve(_) => "transport",
            Self::Registry(RegistryError::Unknown { .. }) => "validation",
            Self::Registry(RegistryError::NoRoom { .. }) => "admission",
            Self::Registry(_) => "config",
        }
    }
}

impl From<EncoderError> for tonic::Status {
    fn from(err: EncoderError) -> Self {
        match &err {
            EncoderError::Validation { .. } => tonic::Status::invalid_argument(err.to_string()),
            EncoderError::Admission(_) | EncoderError::Registry(RegistryError::NoRoom { .. }) => {
                tonic::Status::resource_exhausted(err.to_string())
            }
            EncoderError::Registry(RegistryError::Unknown { .. }) => {
                tonic::Status::invalid_argument(format!("model: {err}"))
            }
            EncoderError::Engine(EngineError::Stopped) => {
                tonic::Status::unavailable(err.to_string())
            }
            _ if gpu_memory::is_out_of_memory(&err.to_string()) => {
                tonic::Status::resource_exhausted(err.to_string())
            }
            _ => tonic::Status::internal(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_kind_to_its_status() {
        let cases = [
            (
                EncoderError::invalid("prompts", "empty"),
                tonic::Code::InvalidArgument,
            ),
            (
                EncoderError::Admission(AdmissionError::QueueFull {
                    budget: "encoder".into(),
                    depth: 3,
                }),
                tonic::Code::ResourceExhausted,
            ),
            (
                EncoderError::Engine(EngineError::Stopped),
                tonic::Code::Unavailable,
            ),
            (
                EncoderError::Engine(EngineError::Panicked("x".into())),
                tonic::Code::Internal,
            ),
            (
                EncoderError::Model(candle_core::Error::msg("shape")),
                tonic::Code::Internal,
            ),
            (
                EncoderError::Model(candle_core::Error::msg(
                    r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#,
                )),
                tonic::Code::ResourceExhausted,
            ),
            (
                EncoderError::Registry(RegistryError::Unknown {
                    id: "x".into(),
                    available: vec!["a".into()],
                }),
                tonic::Code::InvalidArgument,
            ),
            (
                EncoderError::Registry(RegistryError::NoRoom {
                    id: "a".into(),
                    tier: klein_runtime::models::Tier::Device,
                }),
                tonic::Code::ResourceExhausted,
            ),
            (
                EncoderError::Registry(RegistryError::Duplicate("a".into())),
                tonic::Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let label = err.error_type();
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code, "{label}: {status:?}");
        }
        let status = tonic::Status::from(EncoderError::invalid("prompts[2]", "too long"));
        assert_eq!(status.message(), "prompts[2]: too long");
    }
}
